"""The optimizer state of an InternEvo checkpoint folder (ckpt_type="internevo", content with "optimizer"):
AdamW's moments and step, and the fp16 loss scale, loaded into our optimizer under any layout.

What InternEvo writes (internlm/checkpoint/components.py save_optimizer_checkpoint, HybridZeroOptimizer
.state_dict in internlm/solver/optimizer/hybrid_zero_optim.py): one file `optimizer_tp{t}_pp{p}_zo{z}.pt`
per tensor-parallel rank t, pipeline stage p and ZeRO rank z, holding

- `base_optim_states`: the state dict of a torch AdamW whose parameters are flat fp32 tensors, one per
  parameter group and ZeRO rank: `state[k]` = {step, exp_avg, exp_avg_sq} of the group's flat tensor,
  `param_groups[g]["params"]` = [k];
- `flat_fp32_weights`: {g: that flat fp32 tensor}, the master weights;
- `zero_devide_optim_plan`: [g][z] -> the ids of the parameters in that flat tensor, in order, each
  `"{i}_{d0}_{d1}..."`: the parameter's index in its group sorted by size (largest first, ties in the
  model's registration order) and its shape. The group's parameters are dealt to the ZeRO ranks one by
  one, each to the rank holding the fewest elements so far;
- `grad_scaler`: the dynamic loss scale's state (the same keys as ours).

Which of the rank's parameters a segment of the flat tensor is: the plan gives its shape and its place
among equal shapes; the master weight in `flat_fp32_weights`, rounded to the model file's dtype, is that
parameter's tensor in `model_tp{t}_pp{p}.pt` (InternEvo copies the one into the other after every step).
A segment is matched to the first not yet matched tensor of the file, in the file's order, with its
shape and those values (tensors equal in value, e.g. norms still at 1, are told apart by that order).
The moments are then merged over tp and pp exactly as the weights are (internevo_format.InternEvoSource)
and resharded into this run's layout.

Read with torch.load(weights_only=True); the one class InternEvo's param groups pickle, its ParallelMode
enum, is read as its value by a stand-in (no InternEvo code is needed or run).

Not read (one-line errors): isp folders' optimizer files (`optimizer_wp*`), MoE folders' expert groups,
files without the plan (older InternEvo releases) and HybridZeroOptimizer_v2's format.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from internlm.checkpoint.internevo_format import InternEvoSource, load_error
from internlm.checkpoint.layout import CheckpointError

OPTIM_FILE_RE = re.compile(r"^optimizer_(tp|wp)(\d+)_pp(\d+)_zo(\d+)\.pt$")
MOMENTS = ("exp_avg", "exp_avg_sq")


def optimizer_files(folder: Path) -> dict[tuple[int, int], list[Path]]:
    """(tp rank, pp rank) -> its ZeRO ranks' files, in ZeRO order."""
    found: dict[tuple[int, int], dict[int, Path]] = {}
    for f in sorted(Path(folder).iterdir()):
        m = OPTIM_FILE_RE.match(f.name)
        if not m:
            continue
        if m.group(1) == "wp":
            raise CheckpointError(f"{f} is an isp optimizer file: the optimizer state of isp folders cannot be "
                                  f"loaded so far; load content=('model', 'sampler', 'scheduler') (AdamW's moments "
                                  f"restart).")
        found.setdefault((int(m.group(2)), int(m.group(3))), {})[int(m.group(4))] = f
    if not found:
        raise CheckpointError(f"{folder} holds no optimizer_tp{{t}}_pp{{p}}_zo{{z}}.pt file: InternEvo saved no "
                              f"optimizer state there; load content=('model', 'sampler', 'scheduler').")
    out = {}
    for key, by_zero in found.items():
        missing = [z for z in range(max(by_zero) + 1) if z not in by_zero]
        if missing:
            raise CheckpointError(f"{Path(folder) / f'optimizer_tp{key[0]}_pp{key[1]}_zo{missing[0]}.pt'} is "
                                  f"missing (the folder has ZeRO ranks up to {max(by_zero)}).")
        out[key] = [by_zero[z] for z in sorted(by_zero)]
    return out


def _shape(ident: str, path: Path) -> tuple[int, ...]:
    parts = str(ident).split("_")
    try:
        return tuple(int(d) for d in parts[1:])
    except ValueError:
        raise CheckpointError(f"{path}: zero_devide_optim_plan holds {ident!r}, not '<index>_<dim>_<dim>...'"
                              ) from None


def _parallel_mode(value):
    """Stands in for InternEvo's ParallelMode enum, which its param groups pickle (optimizer_mode,
    dp_mode): the member's value, and nothing of InternEvo's code."""
    return str(value)


# where InternEvo's releases define ParallelMode; nothing else beyond weights_only's tensors and containers
_THEIR_GLOBALS = [(_parallel_mode, f"internlm.core.context.{m}.ParallelMode")
                  for m in ("process_group_initializer", "parallel_context")]


def _load_optim(path: Path) -> dict:
    try:
        with torch.serialization.safe_globals(_THEIR_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a refused pickle, a truncated file ...: name the file
        raise load_error(path, exc) from None


def _segments(path: Path) -> tuple[list[tuple[int, int, tuple, dict]], dict | None]:
    """[(group, index in the group, shape, {"weight", "exp_avg", "exp_avg_sq", "step"})] of one file, and
    its grad_scaler state."""
    states = _load_optim(path)
    if not isinstance(states, dict) or "base_optim_states" not in states:
        raise CheckpointError(f"{path} is not a HybridZeroOptimizer state (no 'base_optim_states'); only that "
                              f"optimizer's files can be loaded.")
    plan, flats = states.get("zero_devide_optim_plan"), states.get("flat_fp32_weights", {})
    if plan is None:
        raise CheckpointError(f"{path} has no zero_devide_optim_plan (InternEvo releases before it was saved): "
                              f"which parameter each part of the flat state is cannot be known; load "
                              f"content=('model', 'sampler', 'scheduler').")
    base = states["base_optim_states"]
    zero = int(OPTIM_FILE_RE.match(path.name).group(4))
    out = []
    for g, ranks in enumerate(plan):
        ids = ranks[zero] if zero < len(ranks) else []
        if not ids:
            continue
        if g not in flats:
            raise CheckpointError(f"{path}: group {g} has parameters in the plan but no flat_fp32_weights.")
        keys = base["param_groups"][g]["params"]
        state = base["state"].get(keys[0]) if len(keys) == 1 else None
        if state is None or any(k not in state for k in MOMENTS):
            raise CheckpointError(f"{path}: group {g} has no AdamW state (exp_avg, exp_avg_sq) for its flat "
                                  f"parameter.")
        flat = {"weight": flats[g].reshape(-1), **{k: state[k].reshape(-1) for k in MOMENTS}}
        shapes = [_shape(i, path) for i in ids]
        sizes = [int(torch.Size(s).numel()) for s in shapes]
        if sum(sizes) != flat["weight"].numel():
            raise CheckpointError(f"{path}: group {g}'s plan covers {sum(sizes)} elements, its flat tensor holds "
                                  f"{flat['weight'].numel()}.")
        step = float(state["step"]) if "step" in state else 0.0
        pieces = {k: v.split(sizes) for k, v in flat.items()}
        for n, (ident, shape) in enumerate(zip(ids, shapes)):
            out.append((g, int(str(ident).split("_")[0]), shape,
                        {**{k: pieces[k][n].reshape(shape) for k in pieces}, "step": step}))
    return out, states.get("grad_scaler")


def _match(model_sd: dict, segments: list, path: Path, model_path: Path) -> dict[str, dict]:
    """Their key -> {exp_avg, exp_avg_sq, step}: each segment given to the first unmatched tensor of the
    model file (in its order) with the segment's shape and its master weight's values."""
    order = list(model_sd)
    taken: set[str] = set()
    out = {}
    for g, i, shape, seg in sorted(segments, key=lambda s: (s[0], s[1])):
        found = None
        for key in order:
            t = model_sd[key]
            if key in taken or tuple(t.shape) != shape:
                continue
            if torch.equal(seg["weight"].to(t.dtype), t):
                found = key
                break
        if found is None:
            raise CheckpointError(f"{path}: parameter {i} of group {g} (shape {list(shape)}) matches no tensor "
                                  f"of {model_path.name} (its master weight differs from every tensor of that "
                                  f"shape): the optimizer and model files are not from the same step.")
        taken.add(found)
        out[found] = {k: seg[k] for k in (*MOMENTS, "step")}
    return out


def read_moments(folder, args) -> tuple[dict[str, InternEvoSource], float, dict | None]:
    """({"exp_avg": source, "exp_avg_sq": source} giving full tensors by our names, AdamW's step, the
    loss scale state) of an InternEvo folder."""
    folder = Path(folder)
    weights = InternEvoSource(folder, args)
    if weights.isp:
        raise CheckpointError(f"{folder} is an isp folder: its optimizer state cannot be loaded so far; load "
                              f"content=('model', 'sampler', 'scheduler') (AdamW's moments restart).")
    if args.num_experts:
        raise CheckpointError(f"{folder} is a MoE folder: its optimizer state (expert groups) cannot be loaded "
                              f"so far; load content=('model', 'sampler', 'scheduler').")
    files = optimizer_files(folder)
    moments = {k: {} for k in MOMENTS}
    steps, scaler = set(), None
    for (t, w, p), model_path in sorted(weights.files.items()):
        if (t, p) not in files:
            raise CheckpointError(f"{folder / f'optimizer_tp{t}_pp{p}_zo0.pt'} is missing (the folder has "
                                  f"{model_path.name}).")
        segments = []
        for path in files[(t, p)]:
            got, grad_scaler = _segments(path)
            segments += got
            scaler = scaler if scaler is not None else grad_scaler
        matched = _match(weights.state_dicts[(t, w, p)], segments, files[(t, p)][0], model_path)
        unmatched = [k for k in weights.state_dicts[(t, w, p)] if k not in matched and "inv_freq" not in k]
        if unmatched:
            raise CheckpointError(f"{files[(t, p)][0].parent}: no optimizer state for {unmatched[0]!r} of "
                                  f"{model_path.name} in optimizer_tp{t}_pp{p}_zo*.pt.")
        for k in MOMENTS:
            moments[k][(t, w, p)] = {key: v[k] for key, v in matched.items()}
        steps |= {v["step"] for v in matched.values()}
    if len(steps) > 1:
        raise CheckpointError(f"{folder}: the optimizer files hold different AdamW steps {sorted(steps)}.")
    return {k: weights.over(moments[k]) for k in MOMENTS}, steps.pop() if steps else 0.0, scaler


@torch.no_grad()
def load_internevo_optimizer(model_parts, part_optimizers, folder, args) -> tuple[float, dict | None]:
    """Fill our optimizers' AdamW state from an InternEvo folder (any layout: the full moments are
    distributed as each parameter is). Returns AdamW's step and the loss scale state."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    from internlm.checkpoint.state import _FLAT_OPTIM, optimizer_state
    from internlm.hf.weights import copy_full_into

    sources, step, scaler = read_moments(folder, args)
    templates = optimizer_state(model_parts, part_optimizers)  # creates the state on a fresh optimizer
    for part, opt, sd in zip(model_parts, part_optimizers, templates):
        for key in list(sd):
            if not key.startswith("state."):
                continue
            fqn, what = key[len("state."):].rsplit(".", 1)
            if what == "step":
                sd[key] = torch.full_like(sd[key], step)
            elif what in MOMENTS:
                copy_full_into(sd[key], sources[what].full_tensor(fqn, sd[key].shape))
        set_optimizer_state_dict(part, opt, sd, options=_FLAT_OPTIM)
    return step, scaler
