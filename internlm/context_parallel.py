"""Context parallelism for packed sequences: ring attention over key/value blocks.

The C ranks of a context group each hold 1/C of every micro-batch's tokens (``context_indices``:
contiguous, or "zigzag": the sequence cut into 2C chunks, rank r holding chunks r and 2C-1-r, so that
under the causal mask every rank has about the same work). Attention of the local queries runs against
the key/value block of every rank in turn: the blocks travel round the ring (send to the next rank,
receive from the previous), and the partial results merge with the online-softmax rule (running
log-sum-exp). Backward runs the ring again from the saved output and log-sum-exp; the key/value
gradients travel with their block and arrive back at its owner after the last hop.

Why our own ring and not ``torch.distributed.tensor.experimental.context_parallel``: that one shards
SDPA's causal (or no) mask; packed data needs the block-diagonal causal mask of its samples, which
here comes from the gathered position ids (a token attends to earlier tokens of the same sample, also
when the sample straddles ranks). The blocks are computed with plain fp32 matmuls (exact on every
device); a fused kernel with a mask argument can replace ``_block`` without changing the ring.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["context_indices", "RingAttention", "ring_attention"]


def context_indices(n: int, rank: int, size: int, zigzag: bool) -> torch.Tensor:
    """The positions (of a row of `n` tokens) that context rank `rank` of `size` holds, in order."""
    if zigzag:
        if n % (2 * size):
            raise ValueError(f"zigzag context parallelism cuts {n} tokens into {2 * size} equal chunks")
        c = n // (2 * size)
        first, second = rank * c, (2 * size - 1 - rank) * c
        return torch.cat([torch.arange(first, first + c), torch.arange(second, second + c)])
    if n % size:
        raise ValueError(f"{n} tokens do not split over {size} context-parallel ranks")
    c = n // size
    return torch.arange(rank * c, (rank + 1) * c)


Q_CHUNK = 128  # query rows per block computation (matmul path): bounds the [heads, rows, keys] scores
Q_CHUNK_FLASH = 1024  # with the CPU flash kernel only the [rows, keys] mask is materialised


def _allowed(seg, order, rank, src, a, b):
    """[b - a, Nk]: which keys of rank src's block the queries a:b of this rank may see (same sample,
    not later)."""
    sq, oq = seg[rank][a:b], order[rank][a:b]
    return (sq[:, None] == seg[src][None, :]) & (order[src][None, :] <= oq[:, None])


def _use_flash(q) -> bool:
    """PyTorch's CPU flash-attention kernel takes an additive mask and returns the log-sum-exp (and its
    backward takes them back): exact, tiled, about 4x the matmul path on CPU. Elsewhere the matmul path."""
    return q.device.type == "cpu" and USE_CPU_FLASH and hasattr(torch.ops.aten, _CPU_FLASH)


USE_CPU_FLASH = True  # (tests switch it off to check the matmul path too)
_CPU_FLASH = "_scaled_dot_product_flash_attention_for_cpu"


def _bias(allowed):
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _heads_first(t):  # [N, H, D] -> [1, H, N, D] fp32
    return t.float().permute(1, 0, 2).unsqueeze(0).contiguous()


def _block(q, k, v, allowed, scale):
    """Attention of q [Nq, H, D] to one key/value block k, v [Nk, H, D] under `allowed` [Nq, Nk]:
    (out [Nq, H, D] fp32, lse [Nq, H] fp32; -inf where a query sees no key of this block)."""
    if _use_flash(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _heads_first(q), _heads_first(k), _heads_first(v), 0.0, False, attn_mask=_bias(allowed), scale=scale)
        lse = lse[0].transpose(0, 1).masked_fill(~allowed.any(-1)[:, None], float("-inf"))  # (kernel gives 0)
        return out[0].permute(1, 0, 2), lse
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()).mul_(scale)
    s.masked_fill_(~allowed[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [H, Nq]
    p = s.sub_(torch.where(torch.isinf(lse), 0.0, lse)[..., None]).exp_()  # in place: one [H, Nq, Nk] buffer
    out = torch.einsum("hqk,khd->qhd", p, v.float())
    return out, lse.transpose(0, 1)


def _block_backward(do, q, k, v, out, lse, delta, allowed, scale):
    """Gradients (dq [Nq, H, D], dk, dv [Nk, H, D], fp32) of one block, from the final output and
    log-sum-exp of the queries (the standard flash-attention backward, block by block)."""
    if _use_flash(q):
        safe = torch.where(torch.isinf(lse), 0.0, lse).transpose(0, 1).unsqueeze(0).contiguous()  # [1, H, Nq]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _heads_first(do), _heads_first(q), _heads_first(k), _heads_first(v), _heads_first(out), safe, 0.0,
            False, attn_mask=_bias(allowed), scale=scale)
        return (g[0].permute(1, 0, 2) for g in (dq, dk, dv))
    safe = torch.where(torch.isinf(lse), 0.0, lse).transpose(0, 1)[..., None]  # [H, Nq, 1]
    qf, kf, vf = q.float(), k.float(), v.float()
    p = torch.einsum("qhd,khd->hqk", qf, kf).mul_(scale).sub_(safe).exp_()
    p.masked_fill_(~allowed[None], 0.0)  # [H, Nq, Nk]
    dv = torch.einsum("hqk,qhd->khd", p, do)
    ds = torch.einsum("qhd,khd->hqk", do, vf).sub_(delta.transpose(0, 1)[..., None]).mul_(p)
    del p
    return (torch.einsum("hqk,khd->qhd", ds, kf).mul_(scale), torch.einsum("hqk,qhd->khd", ds, qf).mul_(scale), dv)


def _merge(out, lse, b_out, b_lse):
    """Online-softmax merge of a block's (out, lse) into the running ones."""
    new = torch.logaddexp(lse, b_lse)
    safe = torch.where(torch.isinf(new), 0.0, new)
    w_old = torch.exp(lse - safe)[..., None]
    w_new = torch.exp(b_lse - safe)[..., None]
    return out * w_old + b_out * w_new, new


def _ring_pass(group, tensors):
    """Send `tensors` to the next rank of the ring, receive the previous rank's."""
    group = group if group is not None else dist.group.WORLD
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    nxt = dist.get_global_rank(group, (rank + 1) % size)
    prv = dist.get_global_rank(group, (rank - 1) % size)
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, prv, group) for r in received]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return received


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seg, order, group, scale):
        """q [Nq, H, D], k/v [Nk, H, D] (kv heads already repeated to H); seg/order [C, N]: the sample
        id and global index of every token of every context rank's slice."""
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        chunk = Q_CHUNK_FLASH if _use_flash(q) else Q_CHUNK
        kv = (k, v)
        for step in range(size):
            src = (rank - step) % size
            for a in range(0, q.shape[0], chunk):  # query rows a block at a time: bounded score memory
                b = a + chunk
                allowed = _allowed(seg, order, rank, src, a, b)
                if not allowed.any():  # a block wholly in these queries' future or in other samples
                    continue
                out[a:b], lse[a:b] = _merge(out[a:b], lse[a:b], *_block(q[a:b], kv[0], kv[1], allowed, scale))
            if step < size - 1:
                kv = _ring_pass(group, kv)
        ctx.save_for_backward(q, k, v, out, lse, seg, order)
        ctx.group, ctx.scale = group, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, seg, order = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        do = grad_out.float()
        delta = (do * out).sum(-1)  # [Nq, H]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        chunk = Q_CHUNK_FLASH if _use_flash(q) else Q_CHUNK
        kb, vb = k, v
        for step in range(size):
            src = (rank - step) % size
            for a in range(0, q.shape[0], chunk):
                b = a + chunk
                allowed = _allowed(seg, order, rank, src, a, b)
                if not allowed.any():
                    continue
                gq, gk, gv = _block_backward(do[a:b], q[a:b], kb, vb, out[a:b], lse[a:b], delta[a:b], allowed, scale)
                dq[a:b] += gq
                dk += gk
                dv += gv
            # the block and its gradients move on; after `size` hops they are back at their owner
            if size > 1:
                kb, vb, dk, dv = _ring_pass(group, (kb, vb, dk, dv))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def ring_attention(q, k, v, seg, order, group, scale=None):
    """Causal attention within packed samples of the local queries q [N, Hq, D] against the keys and
    values k/v [N, Hkv, D] of the whole context group (seg/order as in _Ring.forward)."""
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:  # grouped-query attention: every query head sees its kv head
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    return _Ring.apply(q, k, v, seg, order, group, scale)


class RingAttention:
    """An attention kernel (q, k, v, plan -> out) for context-parallel inputs: q/k/v [B, T/C, H, D]
    hold this rank's `context_indices` of each row. The sample ids and global order of every rank's
    tokens come from the gathered position ids, once per forward (kept on the plan)."""

    def __init__(self, group, size: int, zigzag: bool):
        self.group, self.size, self.zigzag = group, size, zigzag

    def layout(self, plan):
        cached = getattr(plan, "_context_parallel_layout", None)
        if cached is None:
            local = plan.position_ids.contiguous()  # [B, T/C]
            parts = [torch.empty_like(local) for _ in range(self.size)]
            dist.all_gather(parts, local, group=self.group)
            b, n = local.shape[0], local.shape[1] * self.size
            full = torch.empty(b, n, dtype=local.dtype, device=local.device)
            index = [context_indices(n, r, self.size, self.zigzag).to(local.device) for r in range(self.size)]
            for r in range(self.size):
                full[:, index[r]] = parts[r]
            start = full == 0
            start[:, 0] = True  # every row starts a sample
            seg_full = torch.cumsum(start.reshape(-1).long(), 0).view(b, n)
            order_full = torch.arange(b * n, device=local.device).view(b, n)
            seg = torch.stack([seg_full[:, i].reshape(-1) for i in index])  # [C, B * T/C]
            order = torch.stack([order_full[:, i].reshape(-1) for i in index])
            cached = (seg, order)
            plan._context_parallel_layout = cached
        return cached

    def __call__(self, q, k, v, plan):
        seg, order = self.layout(plan)
        b, t, h, d = q.shape
        flat = [x.reshape(b * t, x.shape[2], d) for x in (q, k, v)]
        return ring_attention(*flat, seg, order, self.group).reshape(b, t, h, d)
