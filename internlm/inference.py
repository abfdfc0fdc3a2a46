"""Load a trained model on one device and sample from it.

    from internlm import load_model
    model = load_model("runs/demo/ckpt/300")          # a training checkpoint (DCP + config.yaml)
    model = load_model("hf_out", dtype=torch.bfloat16)  # or a Hugging Face folder (llama/internlm3/internlm2)
    logits = model(input_ids)                          # [B, T, vocab]

Generation re-runs the whole sequence for every new token (no KV cache): simple and exactly the
training forward pass, which is what a quick look at a checkpoint needs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from internlm import builders
from internlm.model.attention import resolve_backend
from internlm.model.internlm import InternLM, Kernels


def load_model(path, device="cpu", dtype: torch.dtype = torch.float32) -> InternLM:
    """Our InternLM model (eval mode) from a training checkpoint folder (a `<step>` folder, or a
    checkpoint root whose newest step is taken) or from a Hugging Face model folder."""
    from internlm.checkpoint.reader import load_ckpt_into_parts, read_ckpt_config, resolve_ckpt_dir
    from internlm.hf.mapping import model_args_from_hf_config
    from internlm.hf.weights import HFWeights, is_hf_dir, load_hf_into_parts

    device = torch.device(device)
    path = Path(path)
    if is_hf_dir(path):
        args = model_args_from_hf_config(HFWeights(path).config)
        fill = load_hf_into_parts
    else:
        ckpt = resolve_ckpt_dir(path)
        args = builders.model_args(read_ckpt_config(ckpt))
        path = ckpt
        fill = load_ckpt_into_parts
    kernels = Kernels(attn_backend=resolve_backend("auto", device, dtype=dtype))
    with torch.device("meta"):
        model = InternLM(args, kernels)
    model.to_empty(device=device)
    if args.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight  # to_empty unties shared parameters
    with torch.no_grad():
        model.float()
        fill([model], path)
    model.to(dtype)
    model.eval()
    model.source_path = str(path)
    return model


def _filter_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p (nucleus sampling)."""
    sorted_probs, order = torch.sort(probs, descending=True)
    cumulative = sorted_probs.cumsum(-1)
    drop = cumulative - sorted_probs > top_p  # the mass before this token already reaches top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    out = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return out / out.sum(-1, keepdim=True)


@torch.no_grad()
def generate(model: InternLM, input_ids: list[int] | torch.Tensor, max_new_tokens: int = 64, greedy: bool = False,
             temperature: float = 0.8, top_p: float = 0.9, top_k: int = 0,
             eos_token_id: int | Sequence[int] | None = None,
             generator: torch.Generator | None = None) -> list[int]:
    """Continue one sequence; returns the new token ids (stops after eos_token_id, or after any of
    several stop ids such as eos and <|im_end|>, when given)."""
    stop = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ValueError("generate needs at least one input token (e.g. the bos token)")
    new = []
    for _ in range(max_new_tokens):
        logits = model(ids)[0, -1].float()
        if greedy or temperature <= 0:
            token = int(torch.argmax(logits))
        else:
            logits = logits / temperature
            if top_k and top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, -1)
            if 0 < top_p < 1:
                probs = _filter_top_p(probs, top_p)
            token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        new.append(token)
        if token in stop:
            break
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return new
