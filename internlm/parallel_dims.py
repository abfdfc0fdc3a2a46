"""The parallel layout: world = pp x dp_replicate x dp_shard x tp, tp innermost.

Hybrid ZeRO: parameters, gradients and optimizer state are sharded within groups of
`zero1_size` data-parallel ranks (dp_shard) and replicated across the dp / zero1_size groups
(dp_replicate). zero1_size == dp shards over all of dp; zero1_size == 1 is plain replication.

Rank r has coordinates (pp, dp_replicate, dp_shard, tp) in row-major order, e.g. for
pp=2, dp=2 (zero1=2), tp=2: ranks 0,1 form a tp group, ranks 0,2 a dp group, ranks 0,4 a pp group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
ZERO_BUBBLE_MODES = ("zbh1", "zbv")  # schedules that split backward into input- and weight-gradient passes


def expert_zero_shards(size: int, edp: int) -> bool:
    """InternEvo's parallel.expert_zero1.size: -1/0 (or the replica count edp) shards expert-parallel
    experts over all their replicas, 1 keeps a whole copy on each (validate.py refuses sizes between)."""
    return size != 1 or edp == 1


def expert_parallel_size(size: int, dp: int, num_experts: int) -> int:
    """InternEvo's parallel.expert.size: -1/0 -> the data-parallel size, capped at the number of experts."""
    return min(dp, max(num_experts, 1)) if size <= 0 else size


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
    tp_mode: str = "mtp"  # "mtp", "msp" (tensor + sequence parallel) or "isp" (sequence + head parallel)
    wp: int = 1  # with "isp": ranks of the tp group that shard each weight (weight parallelism)
    zero1_raised_from: int = 0  # zero1.size the config asked for, when weight.size beyond tp raised it
    head: int = 0  # with "isp": 2D sequence parallelism, tp = head x context (0: head = tp, context = 1)
    context: int = 1
    head_first: bool = True  # head-parallel ranks innermost (consecutive)
    window: int = 1  # InternEvo's double ring: context ranks per inner ring (1 or context: one ring)
    interleaved: bool = False  # double-ring windows of every other context rank
    reshard_after_forward: bool = False  # parallel.zero1.fsdp: parameters resharded after forward (ZeRO-3)
    # fsdp (or isp's weight parallelism) asked for under a zero-bubble schedule, whose weight-gradient pass
    # (W) runs after later forwards: a weight resharded by such a forward would take W's gradient on its
    # shard, unreduced. FSDP keeps the stage's weights gathered from the first forward to the step's end.
    fsdp_kept_for_zero_bubble: bool = False
    num_chunks: int = 1
    pp_mode: str = "1f1b"
    ep: int = 1  # MoE expert parallelism: data-parallel ranks that split each layer's experts
    expert_zero: bool = True  # parallel.expert_zero1: expert-parallel experts sharded over their replicas (edp)

    def __post_init__(self):
        product = self.pp * self.dp_replicate * self.dp_shard * self.tp
        if product != self.world_size:
            raise ValueError(f"pp({self.pp}) x dp_replicate({self.dp_replicate}) x dp_shard({self.dp_shard}) "
                             f"x tp({self.tp}) = {product} != world size {self.world_size}")
        if self.tp % self.wp or (self.wp > 1 and self.tp_mode != "isp"):
            raise ValueError(f"weight parallelism ({self.wp}) works within an isp group of size tp={self.tp}")
        if not self.head:
            self.head = self.tp // self.context
        if self.head * self.context != self.tp:
            raise ValueError(f"head({self.head}) x context({self.context}) != tp({self.tp})")
        if self.dp % self.ep or (self.ep > 1 and self.isp > 1):
            raise ValueError(f"expert parallelism ({self.ep}) splits the data-parallel ranks (dp={self.dp}) "
                             f"of a run without isp")
        self._fsdp_mesh = None
        self._sp_groups = None
        self._expert_mesh = None

    @classmethod
    def from_config(cls, cfg, world_size: int) -> "ParallelDims":
        par = cfg.parallel
        tp, pp = par.tensor.size, par.pipeline.size
        dp = world_size // (tp * pp)
        zero1 = shard_group_size(par.zero1.size, dp)
        isp = par.tensor.mode == "isp"
        # weight.size beyond the isp group shards over data-parallel ranks too: zero1's job here (it shards
        # over dp_shard x wp), so wp stops at the group and zero1 grows to cover the rest (InternEvo's
        # 8B_internlm3.py: tensor.size=1, weight.size=16, zero1.size=1 still shards each weight 16 ways)
        wp = min(par.weight.size, tp) if isp else par.weight.size
        raised_from = 0
        if isp and par.weight.size > tp:
            beyond = math.gcd(par.weight.size // tp, dp)
            wanted = zero1 * beyond // math.gcd(zero1, beyond)  # both divide dp, so their lcm does
            if wanted != zero1:
                raised_from, zero1 = zero1, wanted
        s2d = par.sequence_2D
        two_d = isp and s2d.enable
        ep = expert_parallel_size(par.expert.size, dp, cfg.model.num_experts) if cfg.model.num_experts else 1
        reshard = par.zero1.fsdp or (isp and par.weight.size > 1)
        zero_bubble = pp > 1 and par.pipeline.mode in ZERO_BUBBLE_MODES
        return cls(world_size=world_size, pp=pp, dp_replicate=dp // zero1, dp_shard=zero1, tp=tp,
                   tp_mode=par.tensor.mode, wp=wp,
                   # weight parallelism gathers weights for each use and frees them after (InternEvo's wp);
                   # not under the zero-bubble schedules (fsdp_kept_for_zero_bubble)
                   reshard_after_forward=reshard and not zero_bubble, fsdp_kept_for_zero_bubble=reshard and zero_bubble,
                   num_chunks=cfg.model.num_chunks, pp_mode=par.pipeline.mode,
                   head=s2d.head_size if two_d else 0, context=s2d.context_size if two_d else 1,
                   head_first=s2d.device_placement_strategy.head_first, zero1_raised_from=raised_from,
                   window=s2d.window_size if two_d else 1,
                   interleaved=s2d.device_placement_strategy.interleaved if two_d else False,
                   ep=ep, expert_zero=expert_zero_shards(par.expert_zero1.size, dp // ep))

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def sequence_parallel(self) -> bool:
        return self.tp > 1 and self.tp_mode == "msp"

    @property
    def tensor_parallel(self) -> int:
        """Megatron-style tensor parallel degree (mtp/msp): weights split, tokens replicated."""
        return self.tp if self.tp_mode != "isp" else 1

    @property
    def isp(self) -> int:
        """Sequence-parallel degree of "isp": tokens split, weights whole (or split by wp)."""
        return self.tp if self.tp_mode == "isp" else 1

    @property
    def edp(self) -> int:
        """Replicas of each expert-parallel expert: the expert groups of the data-parallel ranks."""
        return self.dp // self.ep

    @property
    def expert_shard(self) -> bool:
        """Whether expert-parallel experts (their weights, gradients and AdamW state) are sharded over
        their replicas by FSDP, as InternEvo's expert ZeRO group does (internlm.expert_parallel)."""
        return self.ep > 1 and self.edp > 1 and self.expert_zero

    @property
    def fsdp(self) -> bool:
        """Whether FSDP (Hybrid ZeRO) wraps the model: data parallelism, or isp's replicated weights."""
        return self.dp > 1 or self.isp > 1

    def sp_coords(self, tp_rank: int) -> tuple[int, int]:
        """(head rank, context rank) of a tp-group rank under 2D sequence parallelism."""
        if self.head_first:
            return tp_rank % self.head, tp_rank // self.head
        return tp_rank // self.context, tp_rank % self.context

    def sp_groups(self, mesh: DeviceMesh):
        """(head group, context group) of this rank: the tp group split in two (built once, on every rank)."""
        if self._sp_groups is None:
            inner = (self.context, self.head) if self.head_first else (self.head, self.context)
            names = ("context", "head") if self.head_first else ("head", "context")
            two_d = init_device_mesh(mesh.device_type, (self.pp, self.dp_replicate, self.dp_shard, *inner),
                                     mesh_dim_names=("pp", "dp_replicate", "dp_shard", *names))
            self._sp_groups = (two_d["head"].get_group(), two_d["context"].get_group())
        return self._sp_groups

    def fsdp_mesh(self, mesh: DeviceMesh) -> DeviceMesh:
        """The 2-D (replicate, shard) mesh of Hybrid ZeRO for this rank. Without isp: dp_replicate x
        dp_shard. With isp the tp group holds S = tp / wp replicas of wp shards of each weight, so
        FSDP replicates over dp_replicate x (tp / wp) and shards over dp_shard x wp: a mesh of its own
        (its ranks are not a slice of the main one), built once, on every rank."""
        if self.isp == 1:
            return mesh["dp_replicate", "dp_shard"]
        if self._fsdp_mesh is None:
            import torch

            ranks = torch.arange(self.world_size).reshape(self.pp, self.dp_replicate, self.dp_shard,
                                                          self.tp // self.wp, self.wp)
            ranks = ranks.permute(0, 1, 3, 2, 4).reshape(self.pp, self.dp_replicate * self.tp // self.wp,
                                                         self.dp_shard * self.wp)
            full = DeviceMesh(mesh.device_type, ranks, mesh_dim_names=("pp", "fsdp_replicate", "fsdp_shard"))
            self._fsdp_mesh = full["fsdp_replicate", "fsdp_shard"]
        return self._fsdp_mesh

    def expert_mesh(self, device_type: str) -> DeviceMesh:
        """(edp, ep) mesh of expert parallelism (internlm.expert_parallel), built once, on every rank."""
        if self._expert_mesh is None:
            from internlm.expert_parallel import expert_mesh

            self._expert_mesh = expert_mesh(device_type, self.world_size, self.ep, self.pp, self.tensor_parallel)
        return self._expert_mesh

    def coords(self, rank: int) -> dict:
        out = {}
        for name, size in reversed(list(zip(MESH_DIMS, (self.pp, self.dp_replicate, self.dp_shard, self.tp)))):
            out[name] = rank % size
            rank //= size
        out["dp"] = out["dp_replicate"] * self.dp_shard + out["dp_shard"]
        return out

    def describe(self) -> str:
        raised = f" raised from {self.zero1_raised_from} by weight.size" if self.zero1_raised_from else ""
        return (f"world={self.world_size} pp={self.pp} dp={self.dp} (zero1={self.dp_shard}{raised}, "
                f"replicas={self.dp_replicate}{', fsdp' if self.reshard_after_forward else ''}"
                f"{', fsdp kept gathered for zero-bubble' if self.fsdp_kept_for_zero_bubble else ''}) "
                f"tp={self.tp} ({self.tp_mode}{f', wp={self.wp}' if self.wp > 1 else ''}"
                f"{f', head={self.head} x context={self.context}' if self.context > 1 else ''})"
                + (f" num_chunks={self.num_chunks} pp_mode={self.pp_mode}" if self.pp > 1 else "")
                + (f" ep={self.ep}" if self.ep > 1 else "")
                + (f" (experts {'sharded over' if self.expert_shard else 'whole on'} edp={self.edp})"
                   if self.ep > 1 and self.edp > 1 else ""))

    def build_mesh(self, device_type: str) -> DeviceMesh:
        mesh = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard, self.tp),
                                mesh_dim_names=MESH_DIMS)
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        return mesh
