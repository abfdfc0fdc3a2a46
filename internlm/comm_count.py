"""`train.py --count_comm`: the bytes this rank sends in one training step, by collective kind, counted
from the collectives the step really runs.

A TorchDispatchMode sees every c10d operator (`dist.all_reduce`, FSDP2's all-gathers and
reduce-scatters, pipelining's sends) and every functional collective (DTensor's tensor-parallel
redistributions, loss_parallel), in forward, in backward and in the optimizer step. Each is counted as
the bytes one rank sends under the ring model the planner uses (internlm/plan/estimate.py):

- all_gather of `x` per rank over n ranks: (n - 1) * bytes(x);
- reduce_scatter of `x` (the whole input): (n - 1) / n * bytes(x);
- all_reduce of `x`: 2 (n - 1) / n * bytes(x);
- all_to_all: the bytes of the input that go to other ranks;
- send: bytes(x) (a receive sends nothing).

It also counts the memory traffic of FSDP2's copies around its collectives (`hbm_bytes`, "fsdp_copy":
what its copy-out after each all-gather and its copy-in before each reduce-scatter read and write),
which the planner times on the compute stream.

The step after the first is counted (the first builds pipeline shapes and warms caches), and each rank
writes `<run folder>/comm/rank<R>.json`: {"step", "bytes": {kind: bytes}, "calls": {kind: count},
"hbm_bytes": {"fsdp_copy": bytes}}.
`tools/plan.py --explain RUN` compares it with the plan; tests/unit/test_plan_comm.py checks the plan
against it for each layout. The mode sends every operator of that step through Python: a slower step,
the same numbers.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

_KINDS = {
    "allreduce_": "all_reduce", "allreduce_coalesced_": "all_reduce", "all_reduce": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "_allgather_base_": "all_gather", "allgather_": "all_gather", "allgather_into_tensor_coalesced_": "all_gather",
    "all_gather_into_tensor": "all_gather", "all_gather_into_tensor_coalesced": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "alltoall_base_": "all_to_all", "alltoall_": "all_to_all", "all_to_all_single": "all_to_all",
    "send": "send", "recv_": "recv", "recv_any_source_": "recv", "broadcast_": "broadcast",
    "barrier": "barrier",
}


_FSDP_COPIES = ("split_with_sizes_copy", "chunk_cat")  # torch.ops.fsdp: all-gather copy-out, reduce-scatter copy-in


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _resolve(group_name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def _c10d_group(args):
    """The ProcessGroup argument of a c10d operator, unboxed from its script object."""
    for a in args:
        if isinstance(a, torch._C.ScriptObject) and "ProcessGroup" in str(a._type()):
            return torch._C._distributed_c10d.ProcessGroup.unbox(a)
    return None


class CommCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.hbm: dict[str, float] = defaultdict(float)  # memory traffic of FSDP's copies

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns = func.namespace
        if ns in ("c10d", "_c10d_functional"):
            name = func.__name__.split(".")[0]
            kind = _KINDS.get(name)
            if kind is not None:
                self._count(ns, name, kind, args)
        elif ns == "fsdp" and func.__name__.split(".")[0] in _FSDP_COPIES:
            # FSDP2's copies on the compute stream: the gathered buffer out to the parameters, the
            # gradients into the reduce-scatter's input; read once, written once
            self.hbm["fsdp_copy"] += _nbytes(args[0]) + _nbytes(kwargs.get("out", args[-1]))
        return func(*args, **kwargs)

    def _count(self, ns: str, name: str, kind: str, args) -> None:
        if ns == "_c10d_functional":  # (input, ..., group name)
            group = _resolve(args[-1])
            n, x = dist.get_world_size(group), args[0]
            if name == "all_to_all_single":
                sent = _all_to_all_sent(x, args[2], dist.get_rank(group), n)
            else:
                sent = self._ring(kind, _nbytes(x), n)
        else:
            group = _c10d_group(args)
            n = group.size() if group is not None else 1
            sent = self._c10d_bytes(name, kind, args, n, group)
        self.bytes[kind] += sent
        self.calls[kind] += 1

    @staticmethod
    def _ring(kind: str, nbytes: int, n: int) -> float:
        """Bytes sent by one rank for a collective whose local input holds `nbytes`."""
        if n <= 1:
            return 0.0
        if kind == "all_gather":
            return (n - 1) * nbytes
        if kind == "reduce_scatter":
            return (n - 1) / n * nbytes
        if kind == "all_reduce":
            return 2 * (n - 1) / n * nbytes
        return float(nbytes)

    def _c10d_bytes(self, name: str, kind: str, args, n: int, group) -> float:
        if kind == "send":
            return float(_nbytes(args[0]))
        if kind in ("recv", "barrier", "broadcast"):
            return 0.0
        own = group.rank() if group is not None else 0
        if name == "alltoall_base_":  # (output, input, group, output splits, input splits, ...)
            return _all_to_all_sent(args[1], args[4], own, n)
        if name == "alltoall_":  # (outputs, inputs, group, ...)
            return float(sum(_nbytes(t) for i, t in enumerate(args[1]) if i != own))
        if kind in ("all_gather", "reduce_scatter"):  # (output(s), input(s), group, ...)
            return self._ring(kind, _nbytes(args[1]), n)
        return self._ring(kind, _nbytes(args[0]), n)  # all-reduce: (tensors, group, op, ...)


def _all_to_all_sent(x: torch.Tensor, in_splits, own: int, n: int) -> float:
    """Bytes of all_to_all input `x` (split along dim 0) that leave this rank."""
    total = _nbytes(x)
    rows = x.shape[0] if x.dim() else 1
    kept = in_splits[own] if in_splits else rows / max(n, 1)
    return float(total - kept * total / max(rows, 1))


class StepCommCounter:
    """A trainer step hook that counts one step's collectives (see the module's docstring)."""

    def __init__(self, run_folder, rank: int, first_step: int = 0):
        self.path = Path(run_folder) / "comm" / f"rank{rank}.json"
        self.target = first_step + 2  # count the second step of this run
        self.counter: CommCounter | None = None

    def after_step(self, step: int, metrics: dict | None = None) -> None:
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            record = {"step": step, "bytes": dict(self.counter.bytes), "calls": dict(self.counter.calls),
                      "hbm_bytes": dict(self.counter.hbm)}
            self.path.write_text(json.dumps(record, indent=1, sort_keys=True))
            self.counter = None
        elif step + 1 == self.target:
            self.counter = CommCounter()
            self.counter.__enter__()

    def stop(self) -> None:
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.counter = None
