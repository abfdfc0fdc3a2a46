"""The parallel layout: world = pp x dp_replicate x dp_shard x tp, tp innermost.

Hybrid ZeRO: parameters, gradients and optimizer state are sharded within groups of
`zero1_size` data-parallel ranks (dp_shard) and replicated across the dp / zero1_size groups
(dp_replicate). zero1_size == dp shards over all of dp; zero1_size == 1 is plain replication.

Rank r has coordinates (pp, dp_replicate, dp_shard, tp) in row-major order, e.g. for
pp=2, dp=2 (zero1=2), tp=2: ranks 0,1 form a tp group, ranks 0,2 a dp group, ranks 0,4 a pp group.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


def shard_group_size(zero1_size: int, dp: int) -> int:
    """`parallel.zero1.size` -> ranks that shard params/grads/optimizer state: -1 or 0 -> all of dp; a
    size above dp is capped at dp."""
    return dp if zero1_size <= 0 or zero1_size > dp else zero1_size


@dataclass
class ParallelDims:
    world_size: int
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    tp_mode: str = "mtp"  # "mtp" or "msp" (tensor + sequence parallel)
    reshard_after_forward: bool = False  # parallel.zero1.fsdp: parameters resharded after forward (ZeRO-3)
    num_chunks: int = 1
    pp_mode: str = "1f1b"

    def __post_init__(self):
        product = self.pp * self.dp_replicate * self.dp_shard * self.tp
        if product != self.world_size:
            raise ValueError(f"pp({self.pp}) x dp_replicate({self.dp_replicate}) x dp_shard({self.dp_shard}) "
                             f"x tp({self.tp}) = {product} != world size {self.world_size}")

    @classmethod
    def from_config(cls, cfg, world_size: int) -> "ParallelDims":
        par = cfg.parallel
        tp, pp = par.tensor.size, par.pipeline.size
        dp = world_size // (tp * pp)
        zero1 = shard_group_size(par.zero1.size, dp)
        return cls(world_size=world_size, pp=pp, dp_replicate=dp // zero1, dp_shard=zero1, tp=tp,
                   tp_mode=par.tensor.mode, reshard_after_forward=par.zero1.fsdp, num_chunks=cfg.model.num_chunks,
                   pp_mode=par.pipeline.mode)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def sequence_parallel(self) -> bool:
        return self.tp > 1 and self.tp_mode == "msp"

    def coords(self, rank: int) -> dict:
        out = {}
        for name, size in reversed(list(zip(MESH_DIMS, (self.pp, self.dp_replicate, self.dp_shard, self.tp)))):
            out[name] = rank % size
            rank //= size
        out["dp"] = out["dp_replicate"] * self.dp_shard + out["dp_shard"]
        return out

    def describe(self) -> str:
        return (f"world={self.world_size} pp={self.pp} dp={self.dp} (zero1={self.dp_shard}, "
                f"replicas={self.dp_replicate}{', fsdp' if self.reshard_after_forward else ''}) "
                f"tp={self.tp} ({self.tp_mode})"
                + (f" num_chunks={self.num_chunks} pp_mode={self.pp_mode}" if self.pp > 1 else ""))

    def build_mesh(self, device_type: str) -> DeviceMesh:
        mesh = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard, self.tp),
                                mesh_dim_names=MESH_DIMS)
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        return mesh
