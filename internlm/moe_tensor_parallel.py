"""MoE layers under Megatron-style tensor parallelism (`parallel.tensor.mode` "mtp" or "msp"), applied
from outside the model, as the dense layers' plan in parallelize.py.

Every rank of a tensor group holds every token of the micro-batch (gathered from the sequence shards
under "msp"), routes them exactly as one process does (the gate is replicated, so capacity and drops
are those of one process), and runs each expert on its 1/tp slice of the expert's FFN width: w1 and w3
split by rows, w2 by columns, as a dense FFN under TP. Each rank's expert output is then a partial sum
over the width, reduced over the group (reduce-scatter back to the sequence shards under "msp",
all-reduce under "mtp"). A residual MoE's dense FFN is split the same way.

Gradients: what depends on the width slice is partial on each rank, what the router computes is whole
on every rank. So the routing weights (and a residual MoE's mixing coefficients) pass through
`_SumGradOverTP`, the identity forward whose backward all-reduces over the group: the gate then gets
the whole gradient, the same on every rank, as the load-balancing loss already does. The input reaches
the experts (backward: reduce over the group) and the router (backward: each rank keeps its own shard)
by two different paths, so the router's gradient is counted once.

With expert parallelism on top (ep x tp), each expert-parallel group is the ranks of one tensor-parallel
position: experts are split over ep by expert and over tp by width (a 3-D (edp, ep, tp) mesh), and the
tokens (every rank of a tensor group has the same ones) go through the expert dispatch before the
reduction over tp.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.profiler import record_function

from internlm.model.moe import MoEFeedForward, combine_experts, mixing_coefficients, moe_layers, route

# the dimension of each weight that holds the FFN width
WIDTH_DIM = {"w1": 1, "w3": 1, "w2": 2}  # experts: w1/w3 [E, ffn, h], w2 [E, h, ffn]
RESIDUAL_WIDTH_DIM = {"w1": 0, "w3": 0, "w2": 1}  # the residual MoE's dense FFN (nn.Linear weights)


def _seq_first(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1).contiguous()


def _all_gather_seq(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """[B, T/S, h] on each rank -> [B, T, h], the ranks' shards in rank order."""
    local = _seq_first(x)
    out = local.new_empty((size * local.shape[0], *local.shape[1:]))
    dist.all_gather_into_tensor(out, local, group=group)
    return out.transpose(0, 1)


def _reduce_scatter_seq(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """[B, T, h] partial sums on each rank -> this rank's [B, T/S, h] of their sum."""
    full = _seq_first(x)
    out = full.new_empty((full.shape[0] // size, *full.shape[1:]))
    dist.reduce_scatter_tensor(out, full, group=group)
    return out.transpose(0, 1)


class _GatherTokens(torch.autograd.Function):
    """msp: the sequence shard -> (all tokens for the experts, all tokens for the router). Backward:
    the experts' gradients are partial (reduce-scatter), the router's whole on every rank (own shard)."""

    @staticmethod
    def forward(ctx, x, group, size: int, rank: int):
        ctx.group, ctx.size, ctx.rank = group, size, rank
        full = _all_gather_seq(x, group, size)
        return full, full.clone()

    @staticmethod
    def backward(ctx, g_experts, g_router):
        grad = _reduce_scatter_seq(g_experts, ctx.group, ctx.size)
        n = grad.shape[1]
        return grad + g_router.narrow(1, ctx.rank * n, n), None, None, None


class _GatherSeq(torch.autograd.Function):
    """Sequence shards -> the whole sequence on every rank; backward sums the ranks' gradients of this
    rank's shard (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group, size: int):
        ctx.group, ctx.size = group, size
        return _all_gather_seq(x, group, size)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group, ctx.size), None, None


class _ScatterTokens(torch.autograd.Function):
    """msp: partial sums over the FFN width -> this rank's sequence shard of their sum."""

    @staticmethod
    def forward(ctx, x, group, size: int):
        ctx.group, ctx.size = group, size
        return _reduce_scatter_seq(x, group, size)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group, ctx.size), None, None


class _SumGradOverTP(torch.autograd.Function):
    """Identity; backward all-reduces the gradient over the tensor group (Megatron's "copy to region")."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverTP(torch.autograd.Function):
    """mtp: all-reduce the partial sums; the gradient (whole on every rank) passes unchanged."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _swiglu(x, w1, w3, w2):
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


class TensorParallelMoE:
    """The forward of one MoE layer under tensor parallelism (see the module's docstring)."""

    def __init__(self, layer: MoEFeedForward, group, size: int, sequence_parallel: bool):
        self.layer, self.group, self.size, self.seq = layer, group, size, sequence_parallel
        self.rank = dist.get_rank(group)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer, group = self.layer, self.group
        x = _local(x)  # msp: the norm's DTensor, sharded over the sequence; mtp: every token
        if self.seq:
            x_experts, x_router = _GatherTokens.apply(x, group, self.size, self.rank)
        else:
            x_experts, x_router = _SumGradOverTP.apply(x, group), x
        shape = x_experts.shape
        flat, flat_router = x_experts.reshape(-1, shape[-1]), x_router.reshape(-1, shape[-1])
        with record_function("moe_routing"):
            logits = F.linear(flat_router.float(), _local(layer.gate.weight).float())
            weights, experts, kept, aux, load = route(logits, layer.top_k, layer.capacity(flat.shape[0]))
            chosen = experts.masked_fill(~kept, -1)
            weights = _SumGradOverTP.apply(weights, group)
        if layer.dispatch is None:
            with record_function("moe_experts"):
                w1, w3, w2 = (_local(getattr(layer.experts, n)).to(flat.dtype) for n in ("w1", "w3", "w2"))
                out = combine_experts(flat, weights, chosen, w1, w3, w2, layer.experts.fp32_gemm)
        else:
            out = layer.dispatch(layer.experts, flat, weights, chosen)
        if layer.residual_mlp is not None:
            mlp = layer.residual_mlp
            coef = mixing_coefficients(flat_router, _local(layer.coefficient.weight), _local(layer.coefficient.bias))
            coef = _SumGradOverTP.apply(coef, group).to(out.dtype)
            dense = _swiglu(flat, *(_local(getattr(mlp, n).weight).to(flat.dtype) for n in ("w1", "w3", "w2")))
            out = out * coef[:, :1] + dense * coef[:, 1:]
        layer.aux_loss = aux
        layer.stats = dict(load=load.detach(), dropped=(~kept).sum().detach())
        out = out.reshape(shape)
        return _ScatterTokens.apply(out, group, self.size) if self.seq else _SumOverTP.apply(out, group)


def shard_experts_over_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Split every MoE layer's experts (and a residual MoE's dense FFN) over the FFN width on the tensor
    mesh and give the layer the tensor-parallel forward. Expert parallelism, applied after, re-lays the
    experts on its (edp, ep, tp) mesh."""
    for _, layer in moe_layers(model):
        for name, dim in WIDTH_DIM.items():
            full = getattr(layer.experts, name)
            setattr(layer.experts, name, nn.Parameter(distribute_tensor(full.data, tp_mesh, [Shard(dim)],
                                                                        src_data_rank=None)))
        if layer.residual_mlp is not None:
            for name, dim in RESIDUAL_WIDTH_DIM.items():
                linear = getattr(layer.residual_mlp, name)
                linear.weight = nn.Parameter(distribute_tensor(linear.weight.data, tp_mesh, [Shard(dim)],
                                                               src_data_rank=None))
        layer.forward = TensorParallelMoE(layer, tp_mesh.get_group(), tp_mesh.size(), sequence_parallel)
