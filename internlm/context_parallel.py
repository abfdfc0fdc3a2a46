"""Context parallelism for packed sequences: ring attention over key/value blocks.

The C ranks of a context group each hold 1/C of every micro-batch's tokens (``context_indices``:
contiguous, or "zigzag": the sequence cut into 2C chunks, rank r holding chunks r and 2C-1-r, so that
under the causal mask every rank has about the same work). Attention of the local queries runs against
the key/value block of every rank in turn: the blocks travel round the ring (send to the next rank,
receive from the previous), and the partial results merge with the online-softmax rule (running
log-sum-exp). Backward runs the ring again from the saved output and log-sum-exp; the key/value
gradients travel with their block and arrive back at its owner after the last hop.

No mask is ever built. A rank's tokens split into *segments*: maximal runs of tokens consecutive in
the packed sequence and in one sample (``_segments``). A query segment sees, of a key segment of the same
sample, all the keys before it and, on its own block, itself causally; nothing of other samples and
nothing later. So every (query chunk, key run) pair the kernel computes is either wholly visible or
top-left causal (``_pieces``), which PyTorch's kernels take without a mask, and the blocks in the
queries' future or in other samples are not computed at all.

InternEvo's double ring (``window``): the context ranks form windows of ``window`` ranks; the blocks go
round the inner ring of each window, and between inner rounds every rank passes the block it started
the round with to the same place in the next window (the outer ring). With ``interleaved`` the windows
take every other rank (InternEvo's placement, so that outer neighbours are adjacent ranks). One window
of all ranks, or windows of one, is the single ring.

Why our own ring and not ``torch.distributed.tensor.experimental.context_parallel``: that one shards
SDPA's causal (or no) mask; packed data needs the block-diagonal causal mask of its samples, which
here comes from the gathered position ids (a token attends to earlier tokens of the same sample, also
when the sample straddles ranks).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["context_indices", "ring_windows", "RingAttention", "ring_attention"]


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


def ring_windows(size: int, window: int = 1, interleaved: bool = False) -> list[list[int]]:
    """The windows of InternEvo's double ring: lists of context ranks, in outer-ring order; position p of
    each window passes to position p of the next. Plain: [0..w), [w..2w), ...; interleaved (as InternEvo
    places them): every other rank, even and odd windows alternating ([0, 2], [1, 3], [4, 6], [5, 7]
    for 8 ranks in windows of 2)."""
    if window < 1 or size % window:
        raise ValueError(f"the double-ring window ({window}) must divide the context size ({size})")
    if not interleaved or window == 1 or window == size:
        return [list(range(s, s + window)) for s in range(0, size, window)]
    if size % (2 * window):
        raise ValueError(f"interleaved windows of {window} take every other rank: the context size ({size}) "
                         f"must be a multiple of {2 * window}")
    out = []
    for s in range(0, size, 2 * window):
        out.append(list(range(s, s + 2 * window, 2)))
        out.append(list(range(s + 1, s + 2 * window, 2)))
    return out


Q_CHUNK = 128  # query rows per piece on the matmul path: bounds the [heads, rows, keys] scores
Q_CHUNK_FLASH = 4096  # with the CPU flash kernel (tiled, no mask): bounds its fp32 copies of q and out


def _segments(seg: torch.Tensor, order: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(start, end, global order of start, sample id) of the maximal local runs of tokens consecutive in
    the packed sequence and in one sample."""
    seg, order = seg.cpu(), order.cpu()
    n = seg.numel()
    if n == 0:
        return []
    cut = ((order[1:] != order[:-1] + 1) | (seg[1:] != seg[:-1])).nonzero().flatten() + 1
    bounds = [0, *cut.tolist(), n]
    return [(a, b, int(order[a]), int(seg[a])) for a, b in zip(bounds[:-1], bounds[1:])]


def _pieces(q_segs, k_segs, chunk: int) -> list[tuple[int, int, int, int, bool]]:
    """The (q_start, q_end, k_start, k_end, causal) computations of local queries against one key/value
    block: keys of the same sample before the query chunk, wholly visible (causal=False), and the keys at
    the chunk's own positions, top-left causal (causal=True; only on the rank's own block). Tokens of a
    sample sit on one rank in consecutive runs, so a key run of the same sample is either before the
    query run, after it, or (own block) the run itself."""
    by_sample: dict[int, list] = {}
    for k in k_segs:
        by_sample.setdefault(k[3], []).append(k)
    out = []
    for qs, qe, qo, sample in q_segs:
        for ks, ke, ko, _ in by_sample.get(sample, ()):
            klen = ke - ks
            for a in range(qs, qe, chunk):
                b = min(a + chunk, qe)
                oa = qo + (a - qs)  # global order of the chunk's first query
                visible = min(max(oa - ko, 0), klen)  # keys before it
                if visible:
                    out.append((a, b, ks, ks + visible, False))
                if ko <= oa < ko + klen:  # the chunk's own positions
                    out.append((a, b, ks + visible, ks + min(klen, visible + (b - a)), True))
    return out


def _use_flash(q) -> bool:
    """PyTorch's CPU flash-attention kernel returns the log-sum-exp (and its backward takes it back):
    exact, tiled, several times the matmul path on CPU. Elsewhere the matmul path."""
    return q.device.type == "cpu" and USE_CPU_FLASH and hasattr(torch.ops.aten, _CPU_FLASH)


USE_CPU_FLASH = True  # (tests switch it off to check the matmul path too)
_CPU_FLASH = "_scaled_dot_product_flash_attention_for_cpu"


def _heads_first(t):  # [N, H, D] -> [1, H, N, D] fp32
    return t.float().permute(1, 0, 2).unsqueeze(0).contiguous()


def _causal_keep(nq: int, nk: int, device) -> torch.Tensor:
    return torch.ones(nq, nk, dtype=torch.bool, device=device).tril_()


def _block(q, k, v, causal: bool, scale):
    """Attention of q [Nq, H, D] to keys/values k, v [Nk, H, D], all visible or top-left causal:
    (out [Nq, H, D] fp32, lse [Nq, H] fp32)."""
    if _use_flash(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _heads_first(q), _heads_first(k), _heads_first(v), 0.0, causal, scale=scale)[:2]
        return out[0].permute(1, 0, 2), lse[0].transpose(0, 1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()).mul_(scale)
    if causal:
        s.masked_fill_(~_causal_keep(s.shape[1], s.shape[2], s.device)[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [H, Nq]
    p = s.sub_(lse[..., None]).exp_()  # in place: one [H, Nq, Nk] buffer
    out = torch.einsum("hqk,khd->qhd", p, v.float())
    return out, lse.transpose(0, 1)


def _block_backward(do, q, k, v, out, lse, delta, causal: bool, scale):
    """Gradients (dq [Nq, H, D], dk, dv [Nk, H, D], fp32) of one piece, from the final output and
    log-sum-exp of the queries (the standard flash-attention backward, piece by piece)."""
    if _use_flash(q):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _heads_first(do), _heads_first(q), _heads_first(k), _heads_first(v), _heads_first(out),
            lse.transpose(0, 1).unsqueeze(0).contiguous(), 0.0, causal, scale=scale)
        return (g[0].permute(1, 0, 2) for g in (dq, dk, dv))
    qf, kf, vf = q.float(), k.float(), v.float()
    p = torch.einsum("qhd,khd->hqk", qf, kf).mul_(scale).sub_(lse.transpose(0, 1)[..., None]).exp_()
    if causal:
        p.masked_fill_(~_causal_keep(p.shape[1], p.shape[2], p.device)[None], 0.0)  # [H, Nq, Nk]
    dv = torch.einsum("hqk,qhd->khd", p, do)
    ds = torch.einsum("qhd,khd->hqk", do, vf).sub_(delta.transpose(0, 1)[..., None]).mul_(p)
    del p
    return (torch.einsum("hqk,khd->qhd", ds, kf).mul_(scale), torch.einsum("hqk,qhd->khd", ds, qf).mul_(scale), dv)


def _merge(out, lse, b_out, b_lse):
    """Online-softmax merge of a piece's (out, lse) into the running ones (in place)."""
    new = torch.logaddexp(lse, b_lse)
    safe = torch.where(torch.isinf(new), 0.0, new)
    out.mul_(torch.exp(lse - safe)[..., None]).add_(b_out * torch.exp(b_lse - safe)[..., None])
    lse.copy_(new)


def _pass(tensors, to: int, frm: int, group):
    """Send `tensors` to context rank `to`, receive as many from context rank `frm`."""
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), dist.get_global_rank(group, to), group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, dist.get_global_rank(group, frm), group) for r in received]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return received


class _Schedule:
    """Who sends to whom in the (double) ring, and whose block this rank holds at each step."""

    def __init__(self, rank: int, windows: list[list[int]]):
        self.windows, self.nw, self.w = windows, len(windows), len(windows[0])
        self.wid, self.pos = next((i, w.index(rank)) for i, w in enumerate(windows) if rank in w)

    def source(self, outer: int, inner: int) -> int:
        return self.windows[(self.wid - outer) % self.nw][(self.pos - inner) % self.w]

    def inner(self, tensors, group):
        win = self.windows[self.wid]
        return _pass(tensors, win[(self.pos + 1) % self.w], win[(self.pos - 1) % self.w], group)

    def outer(self, tensors, group):
        return _pass(tensors, self.windows[(self.wid + 1) % self.nw][self.pos],
                     self.windows[(self.wid - 1) % self.nw][self.pos], group)


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pieces, windows, group, scale):
        """q [Nq, H, D], k/v [Nk, H, D] (kv heads already repeated to H); pieces[src]: the _pieces of
        the local queries against context rank src's block; windows: ring_windows."""
        sched = _Schedule(dist.get_rank(group), windows)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        g = q.shape[1] // k.shape[1]
        kv = (k, v)
        for o in range(sched.nw):
            start = kv
            for i in range(sched.w):
                for a, b, ka, kb, causal in pieces[sched.source(o, i)]:
                    _merge(out[a:b], lse[a:b], *_block(q[a:b], _repeat(kv[0][ka:kb], g), _repeat(kv[1][ka:kb], g),
                                                       causal, scale))
                if i < sched.w - 1:
                    kv = sched.inner(kv, group)
            if o < sched.nw - 1:
                kv = sched.outer(start, group)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pieces, ctx.windows, ctx.group, ctx.scale = pieces, windows, group, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        sched = _Schedule(dist.get_rank(group), ctx.windows)
        do = grad_out.float()
        delta = (do * out).sum(-1)  # [Nq, H]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        g = q.shape[1] // k.shape[1]
        blk = [k, v, torch.zeros(k.shape, dtype=torch.float32, device=k.device),
               torch.zeros(v.shape, dtype=torch.float32, device=v.device)]
        # a block and its gradients travel together: round each window's inner ring (back to where the
        # round began), then on to the next window; after the last outer hop they are home
        for o in range(sched.nw):
            for i in range(sched.w):
                kb_, vb_, dk, dv = blk
                for a, b, ka, kb, causal in ctx.pieces[sched.source(o, i)]:
                    gq, gk, gv = _block_backward(do[a:b], q[a:b], _repeat(kb_[ka:kb], g), _repeat(vb_[ka:kb], g),
                                                 out[a:b], lse[a:b], delta[a:b], causal, scale)
                    dq[a:b] += gq
                    dk[ka:kb] += _fold(gk, g)
                    dv[ka:kb] += _fold(gv, g)
                if sched.w > 1:
                    blk = sched.inner(blk, group)
            if sched.nw > 1:
                blk = sched.outer(blk, group)
        dk, dv = blk[2], blk[3]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _repeat(t, g: int):
    """Grouped-query attention: kv heads [N, Hkv, D] -> one per query head [N, Hkv * g, D]."""
    return t if g == 1 else t.repeat_interleave(g, dim=1)


def _fold(t, g: int):
    """The gradient of _repeat: the g query heads of each kv head summed back [N, Hkv, D]."""
    return t if g == 1 else t.reshape(t.shape[0], t.shape[1] // g, g, t.shape[2]).sum(2)


def ring_attention(q, k, v, pieces, windows, group, scale=None):
    """Causal attention within packed samples of the local queries q [N, Hq, D] against the keys and
    values k/v [N, Hkv, D] of the whole context group (pieces/windows as in _Ring.forward). Under
    grouped-query attention the ring passes the kv heads themselves (Hq / Hkv times fewer bytes than
    repeated ones) and each block repeats them for its query heads."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not group over {k.shape[1]} kv heads")
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    group = group if group is not None else dist.group.WORLD
    return _Ring.apply(q, k, v, pieces, windows, group, scale)


class RingAttention:
    """An attention kernel (q, k, v, plan -> out) for context-parallel inputs: q/k/v [B, T/C, H, D]
    hold this rank's `context_indices` of each row. The sample ids and global order of every rank's
    tokens come from the gathered position ids, once per forward (kept on the plan's positions tensor,
    with the pieces each block computes)."""

    def __init__(self, group, size: int, zigzag: bool, window: int = 1, interleaved: bool = False):
        self.group, self.size, self.zigzag = group, size, zigzag
        self.windows = ring_windows(size, window, interleaved)

    def layout(self, plan, chunk: int):
        # kept on the positions tensor, which every layer's plan shares (FSDP hands each block a copy of
        # the plan dataclass: kept on the plan, it was gathered and computed again in every layer)
        key = plan.position_ids
        cached = getattr(key, "_context_parallel_layout", None)
        if cached is None or cached[0] != chunk:
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
            segs = [_segments(seg_full[:, i].reshape(-1), order_full[:, i].reshape(-1)) for i in index]
            rank = dist.get_rank(self.group)
            cached = (chunk, [_pieces(segs[rank], segs[src], chunk) for src in range(self.size)])
            key._context_parallel_layout = cached
        return cached[1]

    def __call__(self, q, k, v, plan):
        pieces = self.layout(plan, Q_CHUNK_FLASH if _use_flash(q) else Q_CHUNK)
        b, t, h, d = q.shape
        flat = [x.reshape(b * t, x.shape[2], d) for x in (q, k, v)]
        return ring_attention(*flat, pieces, self.windows, self.group).reshape(b, t, h, d)
