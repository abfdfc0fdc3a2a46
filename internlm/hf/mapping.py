"""Names and configs: our model <-> transformers' llama / internlm3 (and InternLM2's published layout).

Parameter names, ours -> HF llama -> InternLM2 published (N = layer index, prefix `model.` on HF names
except the head):
    tok_embeddings.weight            embed_tokens.weight                 tok_embeddings.weight
    layers.N.attention_norm.weight   layers.N.input_layernorm.weight     layers.N.attention_norm.weight
    layers.N.attention.wq/wk/wv      layers.N.self_attn.q/k/v_proj       layers.N.attention.wqkv (fused)
    layers.N.attention.wo            layers.N.self_attn.o_proj           layers.N.attention.wo
    layers.N.ffn_norm.weight         layers.N.post_attention_layernorm   layers.N.ffn_norm.weight
    layers.N.feed_forward.w1/w3/w2   layers.N.mlp.gate/up/down_proj      layers.N.feed_forward.w1/w3/w2
    norm.weight                      norm.weight                         norm.weight
    output.weight                    lm_head.weight (no prefix)          output.weight (no prefix)
Both sides use the rotate-half RoPE convention, so q and k need no permutation.

Configs: `hf_config_dict` writes a transformers config.json for our ModelArgs (refusing, with
ConversionError, what the target cannot hold exactly); `model_args_from_hf_config` reads one back;
`training_config_from_args` makes a training config of ours for such a model.
"""
from __future__ import annotations

import logging
import re

import torch

from internlm.errors import ConversionError
from internlm.model.internlm import InternLM, ModelArgs, canonical_name

logger = logging.getLogger("internlm")

HF_TARGETS = ("llama", "internlm3", "mixtral")

# ------------------------------------------------------------------------------------------- names

# per-layer names: ours -> HF llama (under "model.layers.N.")
_LLAMA_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.wo.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_LLAMA_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LLAMA_LAYER_INV = {v: k for k, v in _LLAMA_LAYER.items()}
_LLAMA_TOP_INV = {v: k for k, v in _LLAMA_TOP.items()}

# InternLM2's published layout keeps our names (under "model.") except the fused q/k/v projection.
INTERNLM2_TOP = {
    "tok_embeddings.weight": "model.tok_embeddings.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "output.weight",
}
LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def to_hf_name(name: str) -> str:
    """Our parameter name -> the transformers Llama name."""
    name = canonical_name(name)
    if name in _LLAMA_TOP:
        return _LLAMA_TOP[name]
    m = LAYER_RE.match(name)
    if m and m.group(2) in _LLAMA_LAYER:
        return f"model.layers.{m.group(1)}.{_LLAMA_LAYER[m.group(2)]}"
    raise KeyError(f"parameter {name!r} has no Hugging Face Llama name")


def from_hf_name(hf_name: str) -> str | None:
    """A transformers Llama name -> ours (None for names we have no parameter for, e.g. rotary buffers)."""
    if hf_name in _LLAMA_TOP_INV:
        return _LLAMA_TOP_INV[hf_name]
    m = _HF_LAYER_RE.match(hf_name)
    if m and m.group(2) in _LLAMA_LAYER_INV:
        return f"layers.{m.group(1)}.{_LLAMA_LAYER_INV[m.group(2)]}"
    return None


def expected_parameters(args: ModelArgs) -> dict[str, torch.Size]:
    """Name -> shape of every parameter of the full model (the head left out when it is tied)."""
    with torch.device("meta"):
        model = InternLM(args)
    return {name: p.shape for name, p in model.named_parameters()}


def layer_sort_key(name: str):
    """Order of our names in the files written: the embedding, the layers by index, then norm and head."""
    m = LAYER_RE.match(name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if name.startswith("tok_embeddings") else 2, 0, name)


# ------------------------------------------------------------------------------------------ config

def check_expressible(args: ModelArgs, target: str) -> None:
    """Raise ConversionError when transformers' `target` model type cannot hold this model exactly."""
    if target not in HF_TARGETS:
        raise ConversionError(f"unknown Hugging Face model type {target!r}; choose one of {', '.join(HF_TARGETS)}.")
    if bool(args.num_experts) != (target == "mixtral"):
        raise ConversionError(f"a {'MoE' if args.num_experts else 'dense'} model exports as "
                              f"{'mixtral' if args.num_experts else 'llama or internlm3'}, not {target}.")
    if args.hidden_size % args.num_attention_heads:
        raise ConversionError(
            f"hidden_size={args.hidden_size} is not a multiple of num_attention_heads={args.num_attention_heads}: "
            f"transformers' {target} config refuses such a model even with an explicit head_dim.")
    if args.num_attention_heads % args.num_kv_attention_heads:
        raise ConversionError("num_attention_heads must be a multiple of num_kv_attention_heads.")
    if args.qkv_bias != args.o_bias:
        raise ConversionError(
            f"the model has {'q/k/v' if args.qkv_bias else 'output-projection'} biases only; transformers' {target} "
            f"puts a bias on q, k, v and o together (attention_bias) or on none of them.")
    if target == "internlm3" and args.qkv_bias:
        raise ConversionError(
            f"model_type {args.model_type} has attention biases, which transformers' internlm3 config refuses "
            f"(it ties attention_bias to mlp_bias); export with --model_type llama, whose attention_bias=True "
            f"is exactly these biases.")
    scaling = args.rope_scaling
    if scaling and scaling.get("type", scaling.get("rope_type")) != "dynamic":
        raise ConversionError(f"rope_scaling {scaling!r} is not expressible; only dynamic NTK scaling is.")


def default_target(args: ModelArgs) -> str:
    if args.num_experts:
        return "mixtral"
    return "internlm3" if args.model_type == "INTERNLM3" else "llama"


def hf_config_dict(args: ModelArgs, target: str, dtype: torch.dtype = torch.bfloat16, bos_token_id: int | None = 1,
                   eos_token_id: int | None = 2, pad_token_id: int | None = None) -> dict:
    """config.json for transformers' `target` ("llama" or "internlm3") holding `args`."""
    check_expressible(args, target)
    scaling = None
    if args.rope_scaling:
        scaling = {"rope_type": "dynamic", "factor": float(args.rope_scaling["factor"])}
    rope_parameters = {"rope_type": "dynamic" if scaling else "default", "rope_theta": float(args.rope_base)}
    if scaling:
        rope_parameters["factor"] = scaling["factor"]
    dtype_name = str(dtype).replace("torch.", "")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": target,
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_kv_attention_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_position_embeddings,
        "rms_norm_eps": float(args.norm_eps),
        # both spellings: rope_theta/rope_scaling for older readers (transformers 4.x, vLLM, LMDeploy),
        # rope_parameters for transformers 5
        "rope_theta": float(args.rope_base),
        "rope_scaling": scaling,
        "rope_parameters": rope_parameters,
        "attention_bias": bool(args.qkv_bias),
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": bool(args.tie_word_embeddings),
        "initializer_range": float(args.init_std),
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": dtype_name,
    }


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    params = hf.get("rope_parameters") or {}
    if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
        raise ConversionError("per-layer-type rope_parameters are not supported.")
    rotary = hf.get("rotary")  # InternLM v1's own spelling: {"base": ..., "type": "origin"|"dynamic"}
    if isinstance(rotary, dict) and not hf.get("rope_theta"):
        theta = float(rotary.get("base", 10000.0))
        if rotary.get("type", "origin") == "dynamic":
            return theta, {"type": "dynamic", "factor": float(rotary.get("scaling_factor", 1.0))}
        return theta, None
    scaling = hf.get("rope_scaling") or None
    theta = hf.get("rope_theta") or params.get("rope_theta") or 10000.0
    if scaling is None and params.get("rope_type", params.get("type", "default")) not in ("default", None):
        scaling = params
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return float(theta), None
    if kind != "dynamic":
        raise ConversionError(f"rope scaling type {kind!r} is not supported (only 'dynamic' NTK scaling is).")
    if hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)) not in (None, 1, 1.0):
        raise ConversionError("partial rotary embeddings (partial_rotary_factor < 1) are not supported.")
    return float(theta), {"type": "dynamic", "factor": float(scaling["factor"])}


def hf_layout(hf: dict) -> str:
    """'internlm2' (fused wqkv, our names) or 'llama' (q/k/v_proj, gate/up/down_proj)."""
    model_type = hf.get("model_type")
    if model_type == "internlm2":
        return "internlm2"
    if model_type in ("llama", "internlm3", "internlm"):
        return "llama"
    raise ConversionError(f"Hugging Face model_type {model_type!r} is not supported; this converter reads "
                          f"llama, internlm3, internlm and internlm2 checkpoints.")


def model_args_from_hf_config(hf: dict) -> ModelArgs:
    """Our ModelArgs for a transformers config.json (llama, internlm3, internlm v1, internlm2)."""
    hf_layout(hf)  # refuses unknown model types
    model_type = hf["model_type"]
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ConversionError(f"hidden_act={hf.get('hidden_act')!r} is not supported (SwiGLU with silu only).")
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    kv = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or hidden // heads)
    if model_type in ("internlm2", "internlm"):  # their `bias` is the attention biases
        bias, mlp_bias = bool(hf.get("bias", model_type == "internlm")), False
    else:  # internlm3's published config spells them qkv_bias / bias
        bias = bool(hf.get("attention_bias", hf.get("qkv_bias", False)))
        mlp_bias = bool(hf.get("mlp_bias", hf.get("bias", False) if model_type == "internlm3" else False))
    if mlp_bias:
        raise ConversionError("mlp_bias=True (biases in the feed-forward projections) is not supported.")
    theta, scaling = _rope_from_hf(hf)
    if model_type == "internlm2":
        ours = "INTERNLM2_PUBLIC"
    elif model_type == "internlm3":
        ours = "INTERNLM3"
    elif model_type == "internlm" or (bias and kv == heads):
        ours = "INTERNLM"
    else:
        ours = "LLAMA2"
    return ModelArgs(
        vocab_size=int(hf["vocab_size"]), hidden_size=hidden, num_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads, num_kv_attention_heads=kv, head_dim=head_dim,
        intermediate_size=int(hf["intermediate_size"]), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_base=theta, rope_scaling=scaling, max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        qkv_bias=bias, o_bias=bias, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)), model_type=ours)


def hf_dtype(hf: dict) -> str:
    name = hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"
    return f"torch.{name}" if not str(name).startswith("torch.") else str(name)


def training_config_from_args(args: ModelArgs, dtype: str = "torch.bfloat16", job_name: str = "from_hf",
                              load_path: str | None = None) -> dict:
    """A raw training config (internlm.config keys) for a model of shape `args`."""
    model = dict(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads, num_kv_attention_heads=args.num_kv_attention_heads,
        head_dim=args.head_dim, intermediate_size=args.intermediate_size, no_bias=not args.qkv_bias,
        layer_norm_epsilon=float(args.norm_eps), rope_base=float(args.rope_base),
        rope_scaling=dict(args.rope_scaling) if args.rope_scaling else None,
        max_position_embeddings=args.max_position_embeddings, tie_word_embeddings=bool(args.tie_word_embeddings),
        init_std=float(args.init_std), dtype=dtype)
    raw = {"JOB_NAME": job_name, "model_type": args.model_type, "model": model,
           "data": dict(seq_len=min(2048, args.max_position_embeddings), train_folder=None, valid_folder=None),
           "hybrid_zero_optimizer": dict(clip_grad_norm=1.0)}  # the default (InternEvo's) clips nothing
    if load_path is not None:
        raw["ckpt"] = dict(load_ckpt_info=dict(path=str(load_path), content=["model"], ckpt_type="internlm"),
                           auto_resume=False)
    return raw


# --------------------------------------------------------------- a model against a checkpoint

_STRUCTURAL = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_attention_heads",
               "head_dim", "intermediate_size", "qkv_bias", "o_bias", "tie_word_embeddings")
_NUMERICAL = ("norm_eps", "rope_base", "rope_scaling", "max_position_embeddings", "norm_head")


def check_args_match(ours: ModelArgs, theirs: ModelArgs, where: str) -> None:
    """Refuse a checkpoint of another shape; only warn about numerical settings that differ."""
    for key in _STRUCTURAL:
        a, b = getattr(ours, key), getattr(theirs, key)
        if a != b:
            raise ConversionError(f"the model has {key}={a} but the checkpoint {where} has {key}={b}.")
    for key in _NUMERICAL:
        a, b = getattr(ours, key), getattr(theirs, key)
        if a != b:
            logger.warning("the model has %s=%s but the checkpoint %s has %s=%s; loading the weights anyway",
                           key, a, where, key, b)
