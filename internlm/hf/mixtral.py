"""MoE export: our INTERNLM_MoE -> transformers' Mixtral (MixtralForCausalLM, no remote code).

Mixtral routes each token to its top-k experts by a softmax over the router logits, renormalised over
the k chosen, and never drops a token: exactly our `moe_type="Dropless"` with top_k >= 2, and our GShard
routing wherever no token exceeded an expert's capacity. What Mixtral cannot hold is refused:
- top_k = 1 (ours weights the expert by its probability, Mixtral's renormalisation makes it 1),
- the residual MoE (a dense FFN mixed in per token: no native architecture has it),
- attention biases (InternLM v1's default for INTERNLM_MoE; train with model.no_bias=True to export).

Names, ours -> Mixtral's (under "model.layers.N."; attention, norms, embedding and head as Llama's):
    feed_forward.gate.weight          mlp.gate.weight                 [E, h]
    feed_forward.experts.w1 | w3      mlp.experts.gate_up_proj        [E, 2 * ffn, h]  (w1 rows first)
    feed_forward.experts.w2           mlp.experts.down_proj           [E, h, ffn]
"""
from __future__ import annotations

import torch

from internlm.errors import ConversionError
from internlm.model.shape import drops_tokens

MOE_LAYER = {"feed_forward.gate.weight": "mlp.gate.weight", "feed_forward.experts.w2": "mlp.experts.down_proj"}
FUSED_UP = "mlp.experts.gate_up_proj"


def check_mixtral(args) -> list[str]:
    """Raise ConversionError when Mixtral cannot hold this MoE model; else notes for the report."""
    if args.moe_use_residual:
        raise ConversionError("the residual MoE (model.moe_use_residual=True) has no native transformers "
                              "architecture: a dense FFN mixed with the experts per token; nothing was written.")
    if args.top_k < 2:
        raise ConversionError(f"moe.top_k={args.top_k}: our top-1 routing weights the expert by its router "
                              f"probability, Mixtral renormalises the chosen weights to 1, so no native transformers "
                              f"architecture matches it; nothing was written.")
    if args.qkv_bias or args.o_bias:
        raise ConversionError(f"model_type {args.model_type} has attention biases (InternEvo's default for "
                              f"INTERNLM_MoE); Mixtral has none. Train with model.no_bias=True to export.")
    if args.rope_scaling:
        raise ConversionError("rope_scaling is not exported for MoE models (Mixtral export).")
    if drops_tokens(args.moe_type):
        return [f"moe_type={args.moe_type!r} drops tokens beyond an expert's capacity in training; Mixtral routes "
                f"every token, so its outputs equal the model's in evaluation wherever no token was dropped "
                f"(moe_type='Dropless' matches exactly)"]
    return []


def mixtral_entries(layer: int, ours: dict[str, torch.Size], full_tensor) -> list[tuple[str, torch.Size, callable]]:
    """(HF name, shape, producer) for the MoE tensors of one layer; `full_tensor(our name)` reads ours."""
    p = f"layers.{layer}.feed_forward."
    hf = f"model.layers.{layer}."
    out = [(hf + MOE_LAYER[k], ours[f"layers.{layer}.{k}"], (lambda n=f"layers.{layer}.{k}": full_tensor(n)))
           for k in MOE_LAYER]
    w1 = ours[p + "experts.w1"]

    def gate_up():
        return torch.cat([full_tensor(p + "experts.w1"), full_tensor(p + "experts.w3")], dim=1)

    out.append((hf + "mlp.experts." + "gate_up_proj", torch.Size((w1[0], 2 * w1[1], w1[2])), gate_up))
    return out


def mixtral_config(args, llama_config: dict) -> dict:
    """config.json for MixtralForCausalLM from the Llama one of the same attention."""
    cfg = {k: v for k, v in llama_config.items() if k not in ("attention_bias", "mlp_bias", "pretraining_tp")}
    cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=args.num_experts,
               num_experts_per_tok=args.top_k, router_jitter_noise=0.0, output_router_logits=False,
               sliding_window=None)
    return cfg
