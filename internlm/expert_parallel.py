"""Expert parallelism (InternEvo's `parallel.expert.size`), applied from outside the model.

The data-parallel ranks split into groups of `ep` ranks; each rank of a group holds `num_experts / ep`
of every MoE layer's experts, and the groups replicate one another ("edp", size dp / ep). Each rank
routes its own tokens (so capacity and drops are those of one process on the same micro-batch), sends
each routed token to the rank holding its expert with one `all_to_all_single`, runs its local experts
on what it received, and sends the outputs back with another; autograd runs the same exchanges in
reverse in backward. Expert weights are DTensors sharded over the expert dimension: checkpoints hold
full tensors (DCP) and load into any other expert-parallel size or one process, and the global gradient
norm counts each expert once.

Over their replicas (edp) the experts are either sharded (InternEvo's expert ZeRO group, the default):
each layer's experts are an FSDP module of their own on the edp mesh, their weights gathered for the
local expert compute and their gradients reduce-scattered, summed over edp and divided by dp (the mean
over dp FSDP takes for the other weights); or whole on every replica (`parallel.expert_zero1.size=1`):
DTensors on an (edp, ep) mesh, left out of FSDP, their gradients all-reduced by `reduce_expert_grads`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.profiler import record_function

from internlm.model.moe import Experts, expert_ffn, moe_layers

EXPERT_WEIGHTS = ("w1", "w3", "w2")


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def expert_mesh(device_type: str, world_size: int, ep: int, pp: int = 1, tp: int = 1) -> DeviceMesh:
    """(edp, ep) of this rank's pipeline stage: its data-parallel ranks in groups of `ep` consecutive
    ones; with tensor parallelism (edp, ep, tp): each tensor-parallel position has its own groups."""
    ranks = torch.arange(world_size).reshape(pp, world_size // (pp * ep * tp), ep, tp)
    names = ("edp", "ep", "tp") if tp > 1 else ("edp", "ep")
    if tp == 1:
        ranks = ranks[..., 0]
    if pp == 1:
        return DeviceMesh(device_type, ranks[0], mesh_dim_names=names)
    return DeviceMesh(device_type, ranks, mesh_dim_names=("pp", *names))[names]


class LocalExperts(Experts):
    """A MoE layer's experts under expert parallelism: this rank's experts, run on the rows the dispatch
    brought (a module call, so that FSDP gathers the weights for it and reduces their gradients)."""

    def forward(self, rows: torch.Tensor, local_id: torch.Tensor) -> torch.Tensor:
        w1, w3, w2 = (getattr(self, n).to_local().to(rows.dtype) for n in EXPERT_WEIGHTS)
        order = torch.argsort(local_id, stable=True)
        counts = torch.bincount(local_id, minlength=w1.shape[0]).tolist()
        out = expert_ffn(rows[order], counts, w1, w3, w2, self.fp32_gemm)
        return out[torch.argsort(order)]  # back to the order the rows arrived in


class ExpertDispatch:
    """Replaces a MoE layer's local expert loop: tokens to the experts' ranks and back (see above)."""

    def __init__(self, group, ep: int, num_experts: int):
        self.group, self.ep = group, ep
        self.local = num_experts // ep
        self.first = dist.get_rank(group) * self.local

    def __call__(self, experts: nn.Module, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor):
        with record_function("moe_dispatch"):
            rows, plan = self._send(x, weights, chosen)
        with record_function("moe_experts"):
            out = experts(rows, plan["got_expert"] - self.first)
        with record_function("moe_combine"):
            back = all_to_all_single_autograd(out, plan["send"], plan["recv"], self.group)
            token, w = plan["token"], plan["weight"]
            return torch.zeros_like(x).index_add(0, token, back * w.unsqueeze(-1).to(back.dtype))

    def _send(self, x, weights, chosen):
        k = chosen.shape[1]
        flat_e, flat_w = chosen.reshape(-1), weights.reshape(-1)
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(k)
        picked = (flat_e >= 0).nonzero().squeeze(-1)
        picked = picked[torch.argsort(flat_e[picked], stable=True)]  # by expert, hence by rank
        expert = flat_e[picked]
        send = torch.bincount(expert // self.local, minlength=self.ep)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_sizes, recv_sizes = send.tolist(), recv.tolist()
        got_expert = expert.new_empty(sum(recv_sizes))
        dist.all_to_all_single(got_expert, expert, recv_sizes, send_sizes, group=self.group)
        rows = all_to_all_single_autograd(x[token[picked]], recv_sizes, send_sizes, self.group)
        return rows, dict(got_expert=got_expert, send=send_sizes, recv=recv_sizes, token=token[picked],
                          weight=flat_w[picked])

def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh, ep: int, shard_over_edp: bool) -> list[nn.Parameter]:
    """Shard every MoE layer's experts over the mesh's "ep" dimension (and, on a mesh with "tp", over
    the FFN width as internlm.moe_tensor_parallel split them) and give the layer the dispatch. With
    `shard_over_edp` the weights live on the (ep[, tp]) mesh, for `shard_experts_over_edp` to shard
    over edp; else on the whole mesh, replicated over edp. Returns the expert parameters."""
    from internlm.moe_tensor_parallel import WIDTH_DIM

    tp = "tp" in (mesh.mesh_dim_names or ())
    local_dims = ("ep", "tp") if tp else ("ep",)
    on = mesh[local_dims] if shard_over_edp else mesh
    params = []
    for _, layer in moe_layers(model):
        layer.experts.__class__ = LocalExperts  # same parameters and names; forward runs the rank's experts
        for name in EXPERT_WEIGHTS:
            full = getattr(layer.experts, name)
            if isinstance(full, DTensor):  # split over tp already: the same global tensor, re-laid
                full = torch.empty(full.shape, dtype=full.dtype, device=full.device)
            placements = ([] if shard_over_edp else [Replicate()]) + [Shard(0)] \
                + ([Shard(WIDTH_DIM[name])] if tp else [])
            sharded = nn.Parameter(distribute_tensor(full.data, on, placements, src_data_rank=None))
            setattr(layer.experts, name, sharded)
            params.append(sharded)
        layer.dispatch = ExpertDispatch(mesh["ep"].get_group(), ep, layer.num_experts)
    return params


def shard_experts_over_edp(model: nn.Module, mesh: DeviceMesh, mp_policy, reshard_after_forward: bool):
    """Each MoE layer's experts become an FSDP module on the edp mesh (before the blocks are wrapped, so
    that the blocks leave them to it): weights, gradients and AdamW state split over the replicas.
    FSDP averages their gradients over edp; reduce_expert_grads divides them by ep after (gloo has no
    pre-multiplied sum for a custom divide factor), which makes the mean over dp."""
    from torch.distributed.fsdp import fully_shard

    for _, layer in moe_layers(model):
        fully_shard(layer.experts, mesh=mesh["edp"], mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)


@torch.no_grad()
def reduce_expert_grads(model_parts, mesh: DeviceMesh, dp: int) -> None:
    """Each rank's expert gradients hold what its expert group's tokens contributed; sum them over the
    groups (edp) and divide by the data-parallel size: the mean over dp that FSDP gives the others."""
    edp = mesh["edp"].size()
    group = mesh["edp"].get_group() if edp > 1 else None
    for part in model_parts:
        for _, layer in moe_layers(part):
            sharded = is_fsdp(layer.experts)  # FSDP reduced them over edp: the mean, sum / edp
            for name in EXPERT_WEIGHTS:
                grad = getattr(layer.experts, name).grad
                if grad is None:
                    continue
                local = grad.to_local() if isinstance(grad, DTensor) else grad
                if sharded:
                    local.div_(dp // edp)
                    continue
                if group is not None:
                    dist.all_reduce(local, group=group)
                local.div_(dp)
