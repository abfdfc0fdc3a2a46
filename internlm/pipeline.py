"""Pipeline parallelism with torch.distributed.pipelining.

The model is cut into pp * num_chunks stages of consecutive layers. Each stage is the same InternLM
module with the layers it does not own deleted (names unchanged), the embedding kept only on the
first stage and the final norm and head only on the last. `position_ids` travel to every stage as
a keyword argument chunked with the micro-batches, so packed-sample boundaries are known everywhere.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from internlm.model.internlm import InternLM


def stage_ids_of_rank(pp_rank: int, pp_size: int, num_chunks: int, mode: str) -> list[int]:
    if mode == "zbv":  # V shape: rank r holds stage r and stage 2*pp-1-r
        return [pp_rank, 2 * pp_size - 1 - pp_rank]
    return [pp_rank + c * pp_size for c in range(num_chunks)]  # looped placement


def layer_range(stage_id: int, num_stages: int, num_layers: int) -> range:
    per, extra = divmod(num_layers, num_stages)
    start = stage_id * per + min(stage_id, extra)
    return range(start, start + per + (1 if stage_id < extra else 0))


def build_stage_module(model: InternLM, stage_id: int, num_stages: int) -> InternLM:
    """A copy of the (meta-device) model that keeps only stage `stage_id`'s part."""
    stage = copy.deepcopy(model)
    keep = {str(i) for i in layer_range(stage_id, num_stages, model.args.num_layers)}
    for name in list(stage.layers.keys()):
        if name not in keep:
            del stage.layers[name]
    if stage_id != 0:
        stage.tok_embeddings = None
    if stage_id != num_stages - 1:
        stage.norm = None
        stage.output = None
    return stage


def schedule_class(mode: str, num_chunks: int):
    if mode == "zbv":
        return ScheduleZBVZeroBubble
    if mode == "zbh1":
        return ScheduleInterleavedZeroBubble
    if mode == "gpipe":
        return ScheduleGPipe
    return ScheduleInterleaved1F1B if num_chunks > 1 else Schedule1F1B


def build_schedule(stage_modules: list[nn.Module], stage_ids: list[int], num_stages: int, device: torch.device,
                   pp_group, n_microbatches: int, loss_fn, mode: str, num_chunks: int):
    stages = [PipelineStage(m, sid, num_stages, device, group=pp_group) for m, sid in zip(stage_modules, stage_ids)]
    cls = schedule_class(mode, num_chunks)
    multi = cls in (ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble)
    # scale_grads: each micro-batch's gradient is divided by n_microbatches, i.e. the step's
    # gradient is the mean over micro-batches, as in the non-pipelined gradient accumulation.
    if multi:
        return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=True), stages
    return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=True), stages
