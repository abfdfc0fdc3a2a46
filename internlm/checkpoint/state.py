"""The tensors of a checkpoint: model and optimizer state as one flat, FQN-keyed DCP state dict,
and the per-rank RNG states.

DCP keys (the contract other tools rely on):
    model.<fqn>                 every parameter by its canonical name (`model.layers.0.attention.wq.weight`),
                                stored as the full logical tensor whatever tp/pp/dp/zero1 layout saved it
    optim.state.<fqn>.<name>    AdamW's `step`, `exp_avg`, `exp_avg_sq` for that parameter
Only tensors go into DCP, so loading never unpickles objects; the optimizer's hyperparameters come
from the config and the schedulers (state.json), not from the checkpoint.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from internlm.checkpoint import safe_dcp
from internlm.checkpoint.layout import CheckpointError

MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."
_FLAT_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)


def model_state(parts) -> list[dict]:
    """One {"model.<fqn>": tensor} dict per model part (DTensors stay sharded: DCP writes each
    shard once and records its place in the full tensor)."""
    return [{MODEL_PREFIX + k: v for k, v in get_model_state_dict(part).items()} for part in parts]


def optimizer_state(parts, optimizers) -> list[dict]:
    """One flattened optimizer state dict per part (all entries, param_groups included)."""
    return [get_optimizer_state_dict(part, opt, options=_FLAT_OPTIM) for part, opt in zip(parts, optimizers)]


def optimizer_tensors(flat_optim: dict) -> dict:
    return {OPTIM_PREFIX + k: v for k, v in flat_optim.items() if k.startswith("state.")}


def save_state_dict(parts, optimizers) -> dict:
    out = {}
    for sd in model_state(parts):
        out.update(sd)
    for sd in optimizer_state(parts, optimizers):
        out.update(optimizer_tensors(sd))
    return out


def check_keys(path, wanted: dict) -> None:
    """Every rank checks that its keys exist in the checkpoint with the right full shapes; if any
    rank finds a problem, every rank raises it (so no rank is left waiting in a collective)."""
    problem = None
    try:
        saved = safe_dcp.read_metadata(path).state_dict_metadata
    except CheckpointError as exc:
        problem, saved = str(exc), {}
    if problem is None:
        missing = [k for k in wanted if k not in saved]
        not_tensors = [k for k in wanted if k in saved and not isinstance(saved[k], TensorStorageMetadata)]
        if not_tensors:
            problem = (f"checkpoint {path} stores {not_tensors[0]!r} as a pickled object, not a tensor; refusing "
                       f"to load it")
        # a DTensor's shape is its full logical shape, as the checkpoint records it
        shapes = [f"{k}: saved {list(saved[k].size)}, model {list(v.shape)}" for k, v in wanted.items()
                  if k in saved and isinstance(saved[k], TensorStorageMetadata)
                  and tuple(saved[k].size) != tuple(v.shape)]
        if problem is None and (missing or shapes):
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:3])}")
            if shapes:
                parts.append(f"{len(shapes)} shape mismatch(es), e.g. {'; '.join(shapes[:2])}")
            problem = f"checkpoint {path} does not fit this model: " + "; ".join(parts)
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, problem)
        problem = next((p for p in everyone if p), None)
    if problem:
        raise CheckpointError(problem)


def load_tensors(flat: dict, path, no_dist: bool = False) -> None:
    """dcp.load of tensors only, metadata read safely (safe_dcp); a failure names the checkpoint."""
    try:
        dcp.load(flat, storage_reader=safe_dcp.SafeReader(str(path)), planner=safe_dcp.TensorOnlyPlanner(),
                 no_dist=no_dist)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP wraps per-rank failures
        inner = [f[0] if isinstance(f, tuple) else f for f in getattr(exc, "failures", {}).values()]
        inner = [e for e in inner if isinstance(e, BaseException)]
        if inner and isinstance(inner[0], CheckpointError):
            raise inner[0] from None
        exc = inner[0] if inner else exc
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"checkpoint {path} is corrupt: reading its tensors failed "
                              f"({type(exc).__name__}: {first[0] if first else ''})") from None


def load_model(parts, path) -> int:
    """Load `model.<fqn>` into the parts (any layout: DCP reshards). Returns the number of tensors."""
    per_part = model_state(parts)
    flat = {k: v for sd in per_part for k, v in sd.items()}
    check_keys(path, flat)
    load_tensors(flat, path)
    for part, sd in zip(parts, per_part):
        set_model_state_dict(part, {k[len(MODEL_PREFIX):]: flat[k] for k in sd})
    return len(flat)


def load_optimizer(parts, optimizers, path) -> int:
    """Load AdamW's per-parameter state (resharded by DCP); hyperparameters stay as configured."""
    templates = optimizer_state(parts, optimizers)  # creates the state on a fresh optimizer
    flat = {}
    for sd in templates:
        flat.update(optimizer_tensors(sd))
    check_keys(path, flat)
    load_tensors(flat, path)
    for part, opt, sd in zip(parts, optimizers, templates):
        for k in list(sd):
            if k.startswith("state."):
                sd[k] = flat[OPTIM_PREFIX + k]
        set_optimizer_state_dict(part, opt, sd, options=_FLAT_OPTIM)
    return len(flat)


# ---- RNG -------------------------------------------------------------------------------------------

def rng_state(device: torch.device) -> dict:
    """This rank's RNG states as tensors and numbers (loadable with torch.load(weights_only=True))."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_pos": int(np_pos), "numpy_has_gauss": int(np_has_gauss), "numpy_gauss": float(np_gauss),
        "python_version": int(py_version), "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": py_gauss,
    }
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def load_rng_file(path) -> dict:
    """One rank's RNG file, read with torch.load(weights_only=True); a failure names the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, garbage or a planted pickle
        raise CheckpointError(f"cannot read the RNG state {path}: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((state["python_version"], tuple(int(x) for x in state["python_state"].tolist()),
                     state["python_gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
