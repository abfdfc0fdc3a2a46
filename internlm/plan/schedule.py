"""What the pipeline schedule costs, read from the trainer's own schedule object.

`pipeline.build_schedule` is run on stand-in stages under a fake process group (shapes.fake_world);
PyTorch's schedule then lists every rank's actions in order (`pipeline_order`): forwards (F), full
backwards (B) or, under the zero-bubble schedules, input-gradient (I) and weight-gradient (W) halves.
From that list:

- `schedule_in_flight`: the micro-batches whose activations a rank holds at its peak: a forward adds
  one to its stage, the backward that ends it (W under zero-bubble, which keeps the matmul inputs until
  then) removes it; a stage holds 1/num_chunks of the rank's layers.
- `schedule_memory_states`: what the rank holds as each of its backwards starts and as it ends:
  activations (as above) and the share of its weight gradients that exist, none at the start of a step
  (the optimizer set them to None), a stage's from its first backward (W under zero-bubble) on. Without
  pipelining the list is F0 B0 F1 B1 ...: with micro_num=1 the activations are gone (all but the last
  layer's) by the time the gradients are there (all but the last layer's).
- `schedule_bubble`: the idle time of the slowest rank over its busy time, from replaying every rank's
  list with the dependencies between stages (a stage's forward after the previous stage's, its
  backward after the next stage's; the last stage's after its own forward) and the costs F = 1,
  B = 2, I = W = 1 per stage (its share of the rank's layers); communication is left to the plan's
  own terms.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from internlm import pipeline
from internlm.plan.shapes import fake_world

COST = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}


@functools.lru_cache(maxsize=256)
def _orders(pp: int, num_chunks: int, mode: str, micro_num: int) -> dict[int, list[tuple[str, int, int]]]:
    """rank -> [(kind, stage, micro-batch)] in the order the schedule runs them (compute actions only)."""
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle, ScheduleGPipe
    from torch.distributed.pipelining.schedules import _ComputationType as C

    kinds = {C.FORWARD: "F", C.FULL_BACKWARD: "B", C.BACKWARD_INPUT: "I", C.BACKWARD_WEIGHT: "W"}
    with fake_world(pp, 0):
        ids = pipeline.stage_ids_of_rank(0, pp, num_chunks, mode)
        stand_ins = [nn.Linear(1, 1, device="meta") for _ in ids]
        schedule, _ = pipeline.build_schedule(stand_ins, ids, pp * num_chunks, torch.device("cpu"),
                                              dist.group.WORLD, micro_num, None, mode, num_chunks)
        order = schedule.pipeline_order
    if isinstance(schedule, PipelineScheduleSingle):
        # a single-stage schedule runs its own loop (_step_microbatches), and its pipeline_order is only a
        # picture of it (for 1F1B's last rank a wrong one): the loop's order, GPipe's or 1F1B's
        gpipe = isinstance(schedule, ScheduleGPipe)
        return {rank: _single_stage_order(rank, pp, micro_num, gpipe) for rank in range(pp)}
    return {rank: [(kinds[a.computation_type], a.stage_index, a.microbatch_index) for a in order[rank]
                   if a is not None and a.computation_type in kinds] for rank in range(pp)}


def _single_stage_order(rank: int, pp: int, m: int, gpipe: bool) -> list[tuple[str, int, int]]:
    """GPipe: every forward, then every backward. 1F1B (Schedule1F1B._step_microbatches): min(m, pp - rank)
    forwards, then a backward and a forward in turn while forwards remain, then the remaining backwards."""
    if gpipe:
        return [("F", rank, i) for i in range(m)] + [("B", rank, i) for i in range(m)]
    warmup = min(m, pp - rank)
    out = [("F", rank, i) for i in range(warmup)]
    for i in range(m):
        out.append(("B", rank, i))
        if warmup + i < m:
            out.append(("F", rank, warmup + i))
    return out


@functools.lru_cache(maxsize=256)
def schedule_memory_states(pp: int, num_chunks: int, mode: str, pp_rank: int,
                           micro_num: int) -> tuple[tuple[float, float, bool], ...]:
    """(activations, gradients, start) on `pp_rank` as each of its backwards (B, or W under zero-bubble)
    starts (start=True) and as it ends: micro-batches of activations in units of the rank's layers and
    the fraction of the rank's weight gradients materialised (see above). A forward only adds
    activations, so the largest holdings are among these states."""
    order = (_single_stage_order(0, 1, micro_num, gpipe=False) if pp == 1
             else _orders(pp, num_chunks, mode, micro_num)[pp_rank])
    held: dict[int, int] = {}
    graded: set[int] = set()
    states = []
    for kind, stage, _ in order:
        if kind == "F":
            held[stage] = held.get(stage, 0) + 1
        elif kind in ("B", "W"):
            states.append((sum(held.values()) / num_chunks, len(graded) / num_chunks, True))
            held[stage] -= 1
            graded.add(stage)
            states.append((sum(held.values()) / num_chunks, len(graded) / num_chunks, False))
    return tuple(states)


def schedule_in_flight(pp: int, num_chunks: int, mode: str, pp_rank: int, micro_num: int) -> float:
    """Peak micro-batches of activations on `pp_rank`, in units of the rank's layers (see above)."""
    return max(a for a, _, _ in schedule_memory_states(pp, num_chunks, mode, pp_rank, micro_num))


@functools.lru_cache(maxsize=256)
def schedule_fsdp_gathers(pp: int, num_chunks: int, mode: str, pp_rank: int, micro_num: int) -> float:
    """All-gathers per step of an FSDP unit that reshards after forward, on `pp_rank` under pipelining
    (the mean over the rank's stages). PyTorch's schedules run every backward but the step's final
    gradient reduction without resharding (backward_maybe_with_nosync): a forward gathers the unit when it
    is sharded and reshards it after; a backward (B, or I under zero-bubble) gathers it when it is sharded
    and keeps it; W needs no weights. A unit that keeps its weights after forward is gathered once."""
    counts = []
    for stage in {s for _, s, _ in _orders(pp, num_chunks, mode, micro_num)[pp_rank]}:
        sharded, gathers = True, 0
        for kind, sid, _ in _orders(pp, num_chunks, mode, micro_num)[pp_rank]:
            if sid != stage or kind == "W":
                continue
            gathers += sharded
            sharded = kind == "F"
        counts.append(gathers)
    return sum(counts) / len(counts)


@functools.lru_cache(maxsize=256)
def schedule_bubble(pp: int, num_chunks: int, mode: str, micro_num: int) -> float:
    """Idle over busy time of the slowest rank when every rank runs its list (see above)."""
    if pp == 1:
        return 0.0
    orders = _orders(pp, num_chunks, mode, micro_num)
    last = pp * num_chunks - 1
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * pp
    nxt = [0] * pp
    remaining = sum(len(o) for o in orders.values())
    while remaining:
        progressed = False
        for rank in range(pp):
            while nxt[rank] < len(orders[rank]):
                kind, stage, mb = orders[rank][nxt[rank]]
                if kind == "F":
                    deps = [("F", stage - 1, mb)] if stage > 0 else []
                elif kind == "W":
                    deps = [("I", stage, mb)]
                elif stage == last:
                    deps = [("F", stage, mb)]
                else:  # B or I: after the next stage's input gradient (its B or I)
                    deps = [("B", stage + 1, mb), ("I", stage + 1, mb)]
                    deps = [d for d in deps if d in done] or deps[:1]
                if any(d not in done for d in deps):
                    break
                start = max([free[rank]] + [done[d] for d in deps])
                free[rank] = done[(kind, stage, mb)] = start + COST[kind] / num_chunks
                nxt[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"the {mode} schedule's action lists wait on each other (pp={pp}, chunks={num_chunks})")
    busy = 3.0 * micro_num  # every rank: micro_num forwards and backwards of all its layers
    return (max(free) - busy) / busy
