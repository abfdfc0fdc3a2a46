"""Load a trained model on one device and sample from it.

    from internlm import load_model
    model = load_model("runs/demo/ckpt/300")          # a training checkpoint (DCP + config.yaml)
    model = load_model("hf_out", dtype=torch.bfloat16)  # or a Hugging Face folder (llama/internlm3/internlm2)
    logits = model(input_ids)                          # [B, T, vocab]
    new_ids = generate(model, prompt_ids, 64, greedy=True)  # or, a token at a time: stream_generate(...)

Generation re-runs the whole sequence for every new token (no KV cache): simple and exactly the
training forward pass, which is what a quick look at a checkpoint needs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch

from internlm import builders
from internlm.model.attention import resolve_backend
from internlm.model.internlm import InternLM, Kernels
from internlm.perf import resolve_cpu_matmul


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
    kernels = Kernels(attn_backend=resolve_backend("auto", device, dtype=dtype),
                      cpu_fp32_gemm=resolve_cpu_matmul("auto", device, dtype))
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


def apply_repetition_penalty(logits: torch.Tensor, ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty, as transformers applies it: the logit of every token already in `ids`
    is divided by `penalty` when positive and multiplied by it when negative (> 1 discourages repeats).
    logits [..., V], ids [..., T]; returns new logits."""
    if penalty == 1.0:
        return logits
    seen = logits.gather(-1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(-1, ids, seen)


@torch.no_grad()
def stream_generate(model: InternLM, input_ids: list[int] | torch.Tensor, max_new_tokens: int = 64,
                    greedy: bool = False, temperature: float = 0.8, top_p: float = 0.9, top_k: int = 0,
                    eos_token_id: int | Sequence[int] | None = None, generator: torch.Generator | None = None,
                    repetition_penalty: float = 1.0, vocab_limit: int | None = None) -> Iterator[int]:
    """Continue one sequence, yielding each new token id as soon as it is chosen (stops after
    eos_token_id, or after any of several stop ids such as eos and <|im_end|>, when given).
    `temperature <= 0` is greedy; `repetition_penalty` (1.0: off) is apply_repetition_penalty over
    the prompt and what was generated so far; `vocab_limit` keeps the ids below it (a tokenizer with
    fewer pieces than the model's padded vocabulary)."""
    stop = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be positive, got {repetition_penalty}")
    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ValueError("generate needs at least one input token (e.g. the bos token)")
    for _ in range(max_new_tokens):
        logits = apply_repetition_penalty(model(ids)[0, -1].float(), ids[0], repetition_penalty)[:vocab_limit]
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
        yield token
        if token in stop:
            return
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)


def generate(model: InternLM, input_ids: list[int] | torch.Tensor, max_new_tokens: int = 64, greedy: bool = False,
             temperature: float = 0.8, top_p: float = 0.9, top_k: int = 0,
             eos_token_id: int | Sequence[int] | None = None,
             generator: torch.Generator | None = None, repetition_penalty: float = 1.0,
             vocab_limit: int | None = None) -> list[int]:
    """Continue one sequence; returns the new token ids (stream_generate, collected)."""
    return list(stream_generate(model, input_ids, max_new_tokens, greedy=greedy, temperature=temperature,
                                top_p=top_p, top_k=top_k, eos_token_id=eos_token_id, generator=generator,
                                repetition_penalty=repetition_penalty, vocab_limit=vocab_limit))
