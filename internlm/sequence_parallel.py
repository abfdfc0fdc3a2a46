"""InternEvo's "isp" mode: sequence parallelism with head-parallel attention (DeepSpeed-Ulysses style).

With ``parallel.tensor = dict(size=S, mode="isp")`` the S ranks of a tensor group each hold every
weight (or 1/W of it under ``parallel.weight.size=W``, gathered by FSDP) and 1/S of every micro-batch's
tokens: embedding, norms, projections, feed-forward and loss all run on the local slice of the
sequence. Attention alone needs whole samples, so around it two all-to-alls trade the sequence split
for a head split: before, each rank sends every other rank its slice of that rank's heads and receives
the whole sequence of its own heads; after, the reverse. Any attention kernel, packed varlen
attention included, then runs unchanged on whole packed sequences of S-th of the heads.

What changes for the rest of the step:
- the trainer feeds rank r tokens [r*T/S, (r+1)*T/S) of every micro-batch (``local_slice``);
- a micro-batch's loss is the mean over all its labelled tokens, so each rank divides its local sum by
  the group's total count (``internlm.loss``), and the gradients of the S partial losses add up;
- the weights are replicated (or sharded, with weight parallelism) over the group like data-parallel
  replicas, so FSDP reduces their gradients over dp x S ranks (``ParallelDims.fsdp_mesh``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from internlm.model.attention import AttentionPlan, plan_attention

__all__ = ["local_slice", "UlyssesAttention", "apply_sequence_parallel", "token_indices"]


def local_slice(t: torch.Tensor, rank: int, size: int, dim: int = 1) -> torch.Tensor:
    """Rank `rank`'s contiguous 1/size of `t` along `dim` (the sequence)."""
    n = t.shape[dim]
    if n % size:
        raise ValueError(f"a sequence of {n} tokens does not split over {size} sequence-parallel ranks")
    return t.narrow(dim, rank * (n // size), n // size)


class _Exchange(torch.autograd.Function):
    """all_to_all over the first dimension (size S: chunk j goes to rank j, chunk i comes from rank i).
    The exchange is its own inverse, so backward is the same exchange of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)  # (empty_like of a permuted view would keep its strides)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def seq_to_heads(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """[B, T/S, H, D] (local tokens, all heads) -> [B, T, H/S, D] (all tokens, local heads)."""
    b, t, h, d = x.shape
    x = x.reshape(b, t, size, h // size, d).permute(2, 0, 1, 3, 4)  # [S, B, T/S, H/S, D]: chunk j -> rank j
    x = _Exchange.apply(x, group)  # chunk i: rank i's tokens of my heads
    return x.permute(1, 0, 2, 3, 4).reshape(b, size * t, h // size, d)


def heads_to_seq(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """[B, T, H/S, D] (all tokens, local heads) -> [B, T/S, H, D] (local tokens, all heads)."""
    b, t, h, d = x.shape
    x = x.reshape(b, size, t // size, h, d).permute(1, 0, 2, 3, 4)  # chunk j: rank j's tokens
    x = _Exchange.apply(x, group)  # chunk i: my tokens of rank i's heads
    return x.permute(1, 2, 0, 3, 4).reshape(b, t // size, size * h, d)


class UlyssesAttention:
    """Wraps an attention kernel (q, k, v, plan -> out) for sequence-parallel inputs: the plan of the
    whole sequence is made once per forward from the gathered positions and kept on the local positions
    tensor, which every layer's plan shares (FSDP's input cast hands each block a copy of the plan
    dataclass, so a plan kept on the dataclass was gathered again in every layer); recomputation in
    backward reuses it."""

    def __init__(self, inner, group, size: int):
        self.inner, self.group, self.size = inner, group, size

    def full_plan(self, plan: AttentionPlan) -> AttentionPlan:
        key = plan.position_ids
        full = getattr(key, "_sequence_parallel_plan", None)
        if full is None:
            local = key.contiguous()
            parts = [torch.empty_like(local) for _ in range(self.size)]
            dist.all_gather(parts, local, group=self.group)
            full = plan_attention(torch.cat(parts, dim=1), plan.backend, plan.upcast)
            key._sequence_parallel_plan = full
        return full

    def __call__(self, q, k, v, plan: AttentionPlan):
        full = self.full_plan(plan)
        q, k, v = (seq_to_heads(t, self.group, self.size) for t in (q, k, v))
        return heads_to_seq(self.inner(q, k, v, full), self.group, self.size)


def apply_sequence_parallel(model, group, size: int, context_group=None, context_size: int = 1,
                            window: int = 1, interleaved: bool = False) -> None:
    """Wrap every attention kernel of `model` (one model part): ring attention over the context group
    when context_size > 1 (2D sequence parallelism; `window`/`interleaved`: InternEvo's double ring),
    inside the all-to-alls of the head group when size > 1."""
    from internlm.context_parallel import RingAttention

    for block in model.layers.values():
        attention = block.attention
        if isinstance(attention.attend, (UlyssesAttention, RingAttention)):
            continue
        kernel = attention.attend
        if context_size > 1:
            kernel = RingAttention(context_group, context_size, zigzag=True, window=window, interleaved=interleaved)
        if size > 1:
            kernel = UlyssesAttention(kernel, group, size)
        attention.attend = kernel


def token_indices(n: int, tp_rank: int, dims) -> torch.Tensor:
    """The positions of a row of `n` tokens that tp-group rank `tp_rank` holds under isp: its context
    rank's zigzag chunks (2D), then its contiguous piece of those for its head rank."""
    from internlm.context_parallel import context_indices

    head, context = dims.sp_coords(tp_rank)
    chunk = context_indices(n, context, dims.context, zigzag=dims.context > 1)
    return chunk.view(dims.head, -1)[head]
