"""What each rank holds, read off the real model: the trainer's own build (meta device, pipeline split,
`parallelize`: TP plan, checkpointing, FSDP2) run under a fake process group of the planned world size.

Nothing is allocated and nothing is sent: torch's "fake" backend completes every collective at once and
the meta device has no storage, so a 70B layout on 1,024 GPUs is read in seconds on a laptop, from the
same code that will train it (no second description of the model that could drift).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from internlm import builders, pipeline
from internlm.config import torch_dtype
from internlm.model.internlm import InternLM
from internlm.model.moe import moe_layers
from internlm.parallel_dims import ParallelDims
from internlm.parallelize import parallelize


@dataclass
class StageShapes:
    """The parameters one pipeline rank holds (all its model chunks together)."""
    pp_rank: int
    stage_ids: list[int]
    num_layers: int  # transformer blocks on this rank
    first: bool  # holds the embedding
    last: bool  # holds the head (and the loss)
    stored_numel: int  # local elements as stored: after TP, PP and ZeRO/FSDP sharding
    compute_numel: int  # local elements a forward uses: after TP and PP, before ZeRO/FSDP sharding
    largest_block_numel: int  # compute elements of the largest transformer block (FSDP's unit)
    param_names: list[str] = field(default_factory=list)
    last_blocks_numel: int = 0  # compute elements of each model part's last block (FSDP keeps them gathered)
    expert_numel: int = 0  # compute elements of expert-parallel experts (left out of the blocks' FSDP)
    moe_layers: int = 0  # MoE feed-forward layers on this rank
    expert_stored_numel: int = 0  # their stored elements (fewer when sharded over their replicas, edp)


@contextlib.contextmanager
def fake_world(world_size: int, rank: int):
    """A process group of `world_size` in this process, as rank `rank`, whose collectives do nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the planner builds its own (fake) process group: call it outside a distributed run")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _compute_numel(p: torch.Tensor) -> int:
    """Elements of the parameter a forward uses on this rank: sharding over tp (or the experts' ep) is
    kept, sharding over data-parallel dims (FSDP/ZeRO) is gathered before use."""
    if not isinstance(p, DTensor):
        return p.numel()
    names = p.device_mesh.mesh_dim_names or ()
    div = 1
    for i, placement in enumerate(p.placements):
        name = names[i] if i < len(names) else ""
        if placement.is_shard() and name in ("tp", "ep", "wp", "head", "context"):
            div *= p.device_mesh.size(i)
    return math.ceil(p.numel() / div)


def _stored_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


def stage_shapes(cfg, dims: ParallelDims, middle_once: bool = False) -> list[StageShapes]:
    """StageShapes for every pipeline rank (rank pp_rank * dp * tp stands for its stage: data- and
    tensor-parallel ranks of a stage hold the same amounts, up to a padding element). `middle_once`:
    build one middle pipeline rank and copy it to the others (they hold neither embedding nor head and,
    when the layers divide evenly, as many blocks): what --search does to stay fast."""
    args = builders.model_args(cfg)
    kernels = builders.kernels(cfg, torch.device("cpu"))
    dtype = torch_dtype(cfg.model.dtype)
    num_stages = dims.pp * dims.num_chunks
    out = []
    even = args.num_layers % num_stages == 0
    for pp_rank in range(dims.pp):
        if middle_once and even and 1 < pp_rank < dims.pp - 1:
            mid = out[1]
            ids = pipeline.stage_ids_of_rank(pp_rank, dims.pp, dims.num_chunks, dims.pp_mode)
            out.append(StageShapes(pp_rank, ids, mid.num_layers, False, False, mid.stored_numel, mid.compute_numel,
                                   mid.largest_block_numel, mid.param_names, mid.last_blocks_numel,
                                   mid.expert_numel, mid.moe_layers, mid.expert_stored_numel))
            continue
        rank = pp_rank * dims.dp * dims.tp
        with fake_world(dims.world_size, rank):
            mesh = dims.build_mesh("cpu")
            with torch.device("meta"):
                full = InternLM(args, kernels)
            if dims.pp > 1:
                ids = pipeline.stage_ids_of_rank(pp_rank, dims.pp, dims.num_chunks, dims.pp_mode)
                parts = [pipeline.build_stage_module(full, sid, num_stages) for sid in ids]
            else:
                ids, parts = [0], [full]
            stored = compute = largest = layers = last_blocks = experts = experts_stored = n_moe = 0
            names = []
            for part in parts:
                parallelize(part, dims, mesh, cfg.model, dtype, cfg.hybrid_zero_optimizer)
                for name, p in part.named_parameters():
                    stored += _stored_numel(p)
                    compute += _compute_numel(p)
                    names.append(name)
                    if isinstance(p, DTensor) and "ep" in (p.device_mesh.mesh_dim_names or ()):
                        experts += _compute_numel(p)
                        experts_stored += _stored_numel(p)
                blocks = list(part.layers.values())
                for block in blocks:
                    largest = max(largest, sum(_compute_numel(p) for p in block.parameters()))
                if blocks:
                    last_blocks += sum(_compute_numel(p) for p in blocks[-1].parameters())
                layers += len(part.layers)
                n_moe += len(moe_layers(part))
            out.append(StageShapes(pp_rank, ids, layers, first=0 in ids, last=num_stages - 1 in ids,
                                   stored_numel=stored, compute_numel=compute, largest_block_numel=largest,
                                   param_names=names, last_blocks_numel=last_blocks, expert_numel=experts,
                                   moe_layers=n_moe, expert_stored_numel=experts_stored))
            dims._fsdp_mesh = dims._sp_groups = dims._expert_mesh = None  # meshes of the fake group
    return out
