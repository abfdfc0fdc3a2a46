"""Attention over packed sequences.

A packed micro-batch is one row of several samples; `position_ids` restart at 0 where a sample
starts, so they carry both the rotary positions and the sample boundaries. Attention never crosses
a boundary. Backends:
- "flash": flash-attn's varlen kernel (CUDA, when importable), fed cu_seqlens;
- "sdpa": PyTorch SDPA with a block-diagonal causal mask (one kernel call, any device);
- "sdpa_loop": PyTorch SDPA per sample with is_causal=True (no mask, fastest on CPU for long rows).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional GPU fast path
    from flash_attn import flash_attn_varlen_func  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_varlen_func = None


def flash_available() -> bool:
    return flash_attn_varlen_func is not None and torch.cuda.is_available()


def resolve_backend(requested: str, device: torch.device, use_flash_attn: bool = True) -> str:
    if requested == "flash":
        if not flash_available():
            raise RuntimeError("model.attn_backend='flash' needs flash-attn and a CUDA device")
        return "flash"
    if requested in ("sdpa", "sdpa_loop"):
        return requested
    if use_flash_attn and device.type == "cuda" and flash_available():
        return "flash"
    return "sdpa_loop" if device.type == "cpu" else "sdpa"


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] ids that increase at every sample start (position 0)."""
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=-1)


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative sample lengths over the flattened [B*T] tokens and the longest sample."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0, as_tuple=False).flatten()
    if starts.numel() == 0 or starts[0] != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    ends = torch.cat([starts[1:], starts.new_tensor([flat.numel()])])
    cu = torch.cat([starts, ends[-1:]]).to(torch.int32)
    return cu, int((ends - starts).max().item())


def _segment_lengths(positions: torch.Tensor) -> list[int]:
    """Lengths of the packed samples of one row of positions (a new sample where position == 0)."""
    starts = torch.nonzero(positions == 0, as_tuple=False).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = starts + [positions.numel()]
    return [e - s for s, e in zip(bounds[:-1], bounds[1:])]


def _expand_kv(k: torch.Tensor, v: torch.Tensor, n_heads: int):
    rep = n_heads // k.shape[2]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
    return k, v


def packed_attention(q, k, v, position_ids, backend: str, scale: float | None = None) -> torch.Tensor:
    """q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D]; causal within each packed sample."""
    bsz, seqlen, n_heads, head_dim = q.shape
    if backend == "flash":
        cu, max_len = cu_seqlens(position_ids)
        out = flash_attn_varlen_func(
            q.reshape(bsz * seqlen, n_heads, head_dim), k.reshape(bsz * seqlen, -1, head_dim),
            v.reshape(bsz * seqlen, -1, head_dim), cu, cu, max_len, max_len, causal=True,
            softmax_scale=scale)
        return out.view(bsz, seqlen, n_heads, head_dim)
    k, v = _expand_kv(k, v, n_heads)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    if backend == "sdpa_loop":
        # torch.split (not slicing) so that backward joins the pieces' gradients with one cat
        # instead of zero-filling a full-size gradient per sample
        rows = []
        for b in range(bsz):
            lens = _segment_lengths(position_ids[b])
            qs, ks, vs = (t[b:b + 1].split(lens, dim=2) for t in (q, k, v))
            pieces = [F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)
                      for qi, ki, vi in zip(qs, ks, vs)]
            rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
        out = torch.cat(rows, dim=0) if bsz > 1 else rows[0]
    else:
        seg = segment_ids(position_ids)
        same = seg[:, :, None] == seg[:, None, :]
        causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril()
        mask = (same & causal)[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)
