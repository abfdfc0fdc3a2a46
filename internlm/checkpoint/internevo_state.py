"""The training progress of an InternEvo checkpoint folder: where a run loaded with ckpt_type="internevo"
and content ("model", "sampler", "scheduler") continues.

What InternEvo's checkpoint manager writes beside the model files (internlm/checkpoint/components.py
and checkpoint_manager.py; internlm/core/trainer.py's TrainState):

- `context.pt`: TrainState.state_dict(), plain numbers: `step_count` (optimizer updates), `batch_count`,
  `num_consumed_tokens`, `num_consumed_samples_in_epoch`, `inf_nan_skip_batches`, `tensorboard_folder`.
- `sampler.pt`: its StaticBatchSampler's state: `epoch`, `num_consumed_samples_in_epoch`, `batch_count`,
  `seed`, and numpy arrays (`rng_state`, `indices`).
- `schedulder.pt` (sic): the LR scheduler's state (`last_epoch`, `base_lrs`, ...).
- `optimizer_tp{t}_pp{p}_zo{z}.pt` (isp: `optimizer_tp{t}_wp{w}_pp{p}_dp{d}.pt`): HybridZeroOptimizer's
  state_dict(), read by internevo_optim.py when content has "optimizer" (or is "all"): AdamW's moments
  and step, and the loss scale.

What carries over: the step (so the LR and beta2 schedules continue where InternEvo's stopped, shaped
by this config as on our own resume), the consumed tokens, and the data position: the epoch and the
packed rows consumed in it. Our sampler's shuffle is not InternEvo's, so the same number of rows is
skipped, not the same rows. Every file is read with torch.load(weights_only=True); sampler.pt's numpy
arrays need numpy's array reconstructor, allowed for that one load.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from internlm.checkpoint.internevo_format import load_error
from internlm.checkpoint.layout import CheckpointError

CONTEXT, SAMPLER, SCHEDULER = "context.pt", "sampler.pt", "schedulder.pt"
READABLE = ("model", "sampler", "scheduler", "optimizer", "all")


@dataclass
class InternEvoProgress:
    step: int
    consumed_tokens: int
    epoch: int
    samples_in_epoch: int  # packed rows of the current epoch, all data-parallel ranks together
    base_lr: float | None  # the scheduler's base LR, when schedulder.pt is there


def check_content(folder, content) -> None:
    """What of an InternEvo folder can be loaded: the model, the sampler, the scheduler, the optimizer."""
    wanted = set(content)
    if wanted - set(READABLE):
        raise CheckpointError(f"{folder} is an InternEvo checkpoint folder: content may hold {READABLE}; got "
                              f"content={tuple(content)!r}")


def _numpy_globals() -> list:
    import numpy as np

    try:
        reconstruct = np._core.multiarray._reconstruct  # numpy >= 2
    except AttributeError:
        reconstruct = np.core.multiarray._reconstruct
    # files written under numpy 1 and numpy 2 name the reconstructor differently
    # numeric dtypes only: an object array would need its items' classes, which stay refused
    dtypes = [type(np.dtype(t)) for t in ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64",
                                          "int64", "float16", "float32", "float64")]
    return [np.ndarray, np.dtype, *dtypes, (reconstruct, "numpy.core.multiarray._reconstruct"),
            (reconstruct, "numpy._core.multiarray._reconstruct")]


def _read(path: Path, numpy: bool = False) -> dict:
    try:
        if numpy:
            with torch.serialization.safe_globals(_numpy_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix; say which
        raise load_error(path, exc) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not InternEvo's state dict")
    return obj


def _int(state: dict, key: str, path: Path) -> int:
    if key not in state:
        raise CheckpointError(f"{path} has no {key!r} (keys: {sorted(state)[:8]}): not an InternEvo {path.name}")
    try:
        return int(state[key])
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: {key!r} is {state[key]!r}, not a number") from None


def read_progress(folder) -> InternEvoProgress:
    """The step, tokens and data position of an InternEvo checkpoint folder (context.pt, sampler.pt,
    schedulder.pt)."""
    folder = Path(folder)
    context = folder / CONTEXT
    if not context.is_file():
        raise CheckpointError(f"{folder} has no {CONTEXT} (InternEvo's train state): it cannot give the step and "
                              f"data position; load the model only (ckpt.load_ckpt_info content=('model',))")
    state = _read(context)
    step = _int(state, "step_count", context) if "step_count" in state else _int(state, "batch_count", context)
    epoch, samples = 0, _int(state, "num_consumed_samples_in_epoch", context)
    sampler = folder / SAMPLER
    if sampler.is_file():
        epoch = _int(_read(sampler, numpy=True), "epoch", sampler)
    base_lr = None
    scheduler = folder / SCHEDULER
    if scheduler.is_file():
        lrs = _read(scheduler).get("base_lrs")
        base_lr = float(lrs[0]) if lrs else None
    return InternEvoProgress(step=step, consumed_tokens=_int(state, "num_consumed_tokens", context), epoch=epoch,
                             samples_in_epoch=samples, base_lr=base_lr)
