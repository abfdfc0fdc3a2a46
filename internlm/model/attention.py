"""Attention over packed sequences.

A packed micro-batch is one row of several samples; `position_ids` restart at 0 where a sample
starts, so they carry both the rotary positions and the sample boundaries. Attention never crosses
a boundary. The model works out the layout of the samples once per forward (`plan_attention`) and
every layer reuses it. Backends:

- "flash": flash-attn's varlen kernel (CUDA, when importable), fed cu_seqlens;
- "varlen": PyTorch's own varlen flash attention (`torch.nn.attention.varlen`, CUDA, bf16/fp16),
  fed the same cu_seqlens: the packed fast path on a GPU without the flash-attn package;
- "sdpa" (default without flash-attn): PyTorch SDPA, in as few and as regular calls as the layout
  allows. The row is cut into the shortest equal *windows* that start at sample boundaries (the
  loader packs `micro_bsz` rows of `seq_len` tokens end to end and no sample crosses a row, so
  windows are at most `seq_len` long). Then:
    * one sample per window: one causal call over all windows, no mask;
    * windows up to `MASK_WINDOW_MAX` tokens: one call with a block-diagonal causal mask (at that
      size the CPU kernel does not skip masked blocks even when causal, so the mask is free);
    * longer windows: the samples are grouped by length rounded up to `BUCKET` tokens and each
      group is one causal call on right-padded samples (padding after a sample cannot reach it
      under a causal mask, so the result is exact). Few calls, few distinct shapes.
- "sdpa_mask": one masked SDPA call per window, always;
- "sdpa_loop": one SDPA call per sample (the simplest reference).

`upcast` (the model's `attn_compute="float32"`, the default on CPU): the SDPA backends compute in
fp32 from bf16/fp16 q, k, v and hand back the input dtype. PyTorch's CPU flash-attention kernel is
2-3x slower in bf16 than in fp32, its backward above all (see doc/train_performance.md); inputs and
output keep their dtype, so only the softmax and its gradient are held in higher precision.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # optional GPU fast path
    from flash_attn import flash_attn_varlen_func  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_varlen_func = None

try:  # PyTorch's varlen flash attention (torch 2.10+; CUDA kernels only)
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except Exception:  # noqa: BLE001 - older torch
    _torch_varlen_attn = None

BACKENDS = ("flash", "varlen", "sdpa", "sdpa_mask", "sdpa_loop")
VARLEN_DTYPES = (torch.bfloat16, torch.float16)
MASK_WINDOW_MAX = 512  # windows up to this length use one masked call (see the module docstring)
BUCKET = 64  # samples in longer windows are padded to a multiple of this many tokens


def flash_available() -> bool:
    return flash_attn_varlen_func is not None and torch.cuda.is_available()


def varlen_available() -> bool:
    return _torch_varlen_attn is not None and torch.cuda.is_available()


def resolve_backend(requested: str, device: torch.device, use_flash_attn: bool = True,
                    dtype: torch.dtype | None = None) -> str:
    """`model.attn_backend`. "auto": flash-attn when importable on CUDA (and `use_flash_attn`), else
    PyTorch's varlen flash kernel on CUDA for bf16/fp16 compute, else SDPA."""
    if requested == "flash":
        if not flash_available():
            raise RuntimeError("model.attn_backend='flash' needs flash-attn and a CUDA device")
        return "flash"
    if requested == "varlen":
        if not varlen_available() or device.type != "cuda":
            raise RuntimeError("model.attn_backend='varlen' needs torch.nn.attention.varlen (PyTorch 2.10 or "
                               "newer) and a CUDA device; use 'sdpa' elsewhere")
        if dtype is not None and dtype not in VARLEN_DTYPES:
            raise RuntimeError(f"model.attn_backend='varlen' computes in bf16/fp16, not {dtype}; use 'sdpa'")
        return "varlen"
    if requested in BACKENDS:
        return requested
    if use_flash_attn and device.type == "cuda" and flash_available():
        return "flash"
    if device.type == "cuda" and varlen_available() and (dtype is None or dtype in VARLEN_DTYPES):
        return "varlen"
    return "sdpa"


def _varlen_call(q, k, v, cu, max_len, scale):
    """torch varlen attention on [total, H, D], causal, across the API changes of torch 2.10-2.13
    (`is_causal` became `window_size`; `enable_gqa` appeared); without `enable_gqa` the KV heads are
    repeated."""
    import inspect

    params = inspect.signature(_torch_varlen_attn).parameters
    kw = {"scale": scale} if "scale" in params else {}
    if "window_size" in params:
        kw["window_size"] = (-1, 0)
    else:
        kw["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return _torch_varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)


ATTN_COMPUTE = ("auto", "input", "float32")


def resolve_upcast(requested: str, device: torch.device) -> bool:
    """`model.attn_compute`: "float32" upcasts SDPA's inputs, "input" keeps their dtype, "auto" upcasts
    on CPU only (where it is faster; CUDA kernels are fastest in bf16/fp16)."""
    if requested not in ATTN_COMPUTE:
        raise ValueError(f"model.attn_compute must be one of {ATTN_COMPUTE}, got {requested!r}")
    return requested == "float32" or (requested == "auto" and device.type == "cpu")


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sample lengths over the flattened [B*T] tokens and the longest sample.
    Every row of a [B, T] batch starts a sample, whatever its first position."""
    bsz, seqlen = position_ids.shape
    is_start = position_ids == 0
    is_start[:, 0] = True
    starts = torch.nonzero(is_start.reshape(-1), as_tuple=False).flatten()
    ends = torch.cat([starts[1:], starts.new_tensor([bsz * seqlen])])
    cu = torch.cat([starts, ends[-1:]]).to(torch.int32)
    return cu, int((ends - starts).max().item())


@dataclass
class AttentionPlan:
    """The layout of the packed samples of one micro-batch, shared by every layer's attention.

    kind: "flash" | "varlen" | "rows" (one sample per window) | "mask" (block-diagonal mask per window) |
    "buckets" (padded samples grouped by length) | "loop" (one call per sample)."""

    kind: str
    batch: int
    seqlen: int
    window: int = 0
    mask: torch.Tensor | None = None  # [n_windows, 1, W, W] bool, kind "mask"
    lengths: tuple[int, ...] = ()  # sample lengths in order, kind "loop"
    groups: tuple[tuple[int, int, torch.Tensor], ...] = ()  # (count, padded length, gather index)
    scatter: torch.Tensor | None = None  # token -> row of the concatenated group outputs
    cu_seqlens: torch.Tensor | None = None
    max_len: int = 0
    upcast: bool = False  # SDPA computes in fp32 (see the module docstring)
    backend: str = ""  # what it was planned for, and from which positions (to plan other layouts of them)
    position_ids: torch.Tensor | None = None


def _window(is_start: torch.Tensor) -> int:
    """Shortest W dividing the flat length such that every W-th token starts a sample."""
    n = is_start.numel()
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    for w in sorted(set(small + [n // d for d in small])):
        if bool(is_start[::w].all()):
            return w
    return n


def plan_attention(position_ids: torch.Tensor, backend: str, upcast: bool = False) -> AttentionPlan:
    """Work out once per forward how `packed_attention` runs on these packed samples."""
    plan = _plan(position_ids, backend)
    plan.upcast = upcast and plan.kind not in ("flash", "varlen")
    plan.backend, plan.position_ids = backend, position_ids
    return plan


def _plan(position_ids: torch.Tensor, backend: str) -> AttentionPlan:
    bsz, seqlen = position_ids.shape
    if backend not in BACKENDS:
        backend = resolve_backend(backend, position_ids.device)
    if backend in ("flash", "varlen"):
        cu, max_len = cu_seqlens(position_ids)
        return AttentionPlan(backend, bsz, seqlen, cu_seqlens=cu, max_len=max_len)
    device = position_ids.device
    is_start = position_ids.detach().to("cpu") == 0
    is_start[:, 0] = True  # a row (or a pipeline chunk) always starts a new sample
    is_start = is_start.reshape(-1)
    starts = torch.nonzero(is_start).flatten().tolist()
    bounds = starts + [is_start.numel()]
    lengths = tuple(e - s for s, e in zip(bounds[:-1], bounds[1:]))
    if backend == "sdpa_loop":
        return AttentionPlan("loop", bsz, seqlen, lengths=lengths)
    window = _window(is_start)
    n_windows = is_start.numel() // window
    if backend == "sdpa" and len(lengths) == n_windows:
        return AttentionPlan("rows", bsz, seqlen, window=window)
    if backend == "sdpa_mask" or window <= MASK_WINDOW_MAX:
        seg = torch.cumsum(is_start.to(torch.int32), 0).view(n_windows, window).to(device)
        causal = torch.ones(window, window, dtype=torch.bool, device=device).tril()
        mask = (seg[:, :, None] == seg[:, None, :]) & causal
        return AttentionPlan("mask", bsz, seqlen, window=window, mask=mask[:, None])
    return _bucket_plan(bsz, seqlen, starts, lengths, device)


def _bucket_plan(bsz, seqlen, starts, lengths, device) -> AttentionPlan:
    total = bsz * seqlen
    by_len: dict[int, list[tuple[int, int]]] = {}
    for s, n in zip(starts, lengths):
        by_len.setdefault(-(-n // BUCKET) * BUCKET, []).append((s, n))
    groups, scatter, offset = [], torch.empty(total, dtype=torch.long), 0
    for padded, items in sorted(by_len.items()):
        # gather index into the tokens plus one zero row (index `total`) used as padding
        index = torch.full((len(items), padded), total, dtype=torch.long)
        for j, (s, n) in enumerate(items):
            index[j, :n] = torch.arange(s, s + n)
            scatter[s:s + n] = torch.arange(offset + j * padded, offset + j * padded + n)
        groups.append((len(items), padded, index.flatten().to(device)))
        offset += len(items) * padded
    return AttentionPlan("buckets", bsz, seqlen, groups=tuple(groups), scatter=scatter.to(device))


def _sdpa(q, k, v, **kw):
    """SDPA on [B, H, T, D] with grouped KV heads: natively on CPU, repeated elsewhere (the fused CUDA
    kernels other than flash do not all take enable_gqa)."""
    if k.shape[1] != q.shape[1]:
        if q.device.type == "cpu":
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, **kw)


@torch.compiler.disable
def packed_attention(q, k, v, plan: AttentionPlan, scale: float | None = None) -> torch.Tensor:
    """q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D]; causal within each packed sample.
    Left out of torch.compile (one graph break per block): the plan's layout changes from batch to
    batch and would otherwise make every new layout a recompile."""
    bsz, seqlen, n_heads, head_dim = q.shape
    total = bsz * seqlen
    if plan.kind == "flash":
        out = flash_attn_varlen_func(
            q.reshape(total, n_heads, head_dim), k.reshape(total, -1, head_dim),
            v.reshape(total, -1, head_dim), plan.cu_seqlens, plan.cu_seqlens, plan.max_len, plan.max_len,
            causal=True, softmax_scale=scale)
        return out.view(bsz, seqlen, n_heads, head_dim)
    if plan.kind == "varlen":
        if q.dtype not in VARLEN_DTYPES:
            raise RuntimeError(f"attention backend 'varlen' computes in bf16/fp16, got {q.dtype} inputs; "
                               "use model.attn_backend='sdpa' for fp32")
        out = _varlen_call(q.reshape(total, n_heads, head_dim), k.reshape(total, -1, head_dim),
                           v.reshape(total, -1, head_dim), plan.cu_seqlens, plan.max_len, scale)
        return out.view(bsz, seqlen, n_heads, head_dim)
    if plan.upcast and q.dtype in (torch.bfloat16, torch.float16):
        # autocast would cast SDPA's inputs straight back to its lower precision
        with torch.autocast(q.device.type, enabled=False):
            return _sdpa_packed(q.float(), k.float(), v.float(), plan, scale).to(q.dtype)
    return _sdpa_packed(q, k, v, plan, scale)


def _sdpa_packed(q, k, v, plan: AttentionPlan, scale: float | None) -> torch.Tensor:
    bsz, seqlen, n_heads, head_dim = q.shape
    total = bsz * seqlen
    if plan.kind in ("rows", "mask"):
        w = plan.window
        q, k, v = (t.reshape(total // w, w, -1, head_dim).transpose(1, 2) for t in (q, k, v))
        if plan.kind == "rows":
            out = _sdpa(q, k, v, is_causal=True, scale=scale)
        else:
            out = _sdpa(q, k, v, attn_mask=plan.mask, scale=scale)
        return out.transpose(1, 2).reshape(bsz, seqlen, n_heads, head_dim)
    if plan.kind == "loop":
        # torch.split (not slicing) so that backward joins the pieces' gradients with one cat
        # instead of zero-filling a full-size gradient per sample
        qs, ks, vs = (t.reshape(1, total, -1, head_dim).transpose(1, 2).split(plan.lengths, dim=2)
                      for t in (q, k, v))
        pieces = [_sdpa(qi, ki, vi, is_causal=True, scale=scale) for qi, ki, vi in zip(qs, ks, vs)]
        out = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
        return out.transpose(1, 2).reshape(bsz, seqlen, n_heads, head_dim)
    # buckets: gather right-padded samples (padding reads an appended zero row), scatter back
    flat = [t.reshape(total, -1, head_dim) for t in (q, k, v)]
    flat = [torch.cat([t, t.new_zeros(1, *t.shape[1:])]) for t in flat]
    outs = []
    for count, padded, index in plan.groups:
        qg, kg, vg = (t.index_select(0, index).view(count, padded, -1, head_dim).transpose(1, 2) for t in flat)
        outs.append(_sdpa(qg, kg, vg, is_causal=True, scale=scale).transpose(1, 2).reshape(count * padded, n_heads,
                                                                                            head_dim))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out.index_select(0, plan.scatter).view(bsz, seqlen, n_heads, head_dim)
