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
and resharded into this run's layout. Where the file lacks the plan, it is read from the plan file
InternEvo writes beside it (HybridZeroOptimizer.rank_unique_id, `gpus-{n}_wp-{w}_tp-{t}_dp-{d}_pp-{p}_zo-{z}.pt`).

isp folders: every rank writes `optimizer_tp{t}_wp{w}_pp{p}_dp{d}.pt` (sequence rank t, weight-parallel
rank w, data rank d). Its groups: "default" (and "fp32") hold the rank's weight-parallel shard w of the
block linears and the norms, ZeRO-sharded over the ranks with that shard (ZERO1, a rank not named in
the file's name: from the plan file, or else the one whose share of the plan the master weights all
match); "embed_head" (optimizer_mode DATA) holds the embedding and head of sequence rank t, sharded over
the data ranks d. Each share is read once (the other ranks holding it are replicas).

MoE folders (INTERNLM_MoE): an expert group (`moe=True`, e.g. "moe_ep_size_2") holds the rank's experts
(those of its expert-parallel rank), ZeRO-sharded over the expert-data ranks; which experts and which
rank are told by the master weights, which equal the tensors of model_moe_layer{L}_expert{E}_tp{t}.pt.

fsdp folders (parallel.zero1.fsdp=True): FSDPadaptOptimizer's `optimizer_tp{t}_pp{p}_zo{z}.pt` hold, per
group, one 1-D fp32 piece per parameter (the rank's part of FSDP's flat shard, often empty) and AdamW's
state of it; a parameter's pieces in rank order are the whole parameter (_fsdp_moments).

Read with torch.load(weights_only=True); the one class InternEvo's param groups pickle, its ParallelMode
enum, is read as its value by a stand-in (no InternEvo code is needed or run).

Not read (one-line errors): files with neither the plan nor its plan file (older InternEvo releases),
HybridZeroOptimizer_v2's format, and MoE expert groups in fsdp folders.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from internlm.checkpoint.internevo_format import _IGNORED, InternEvoSource, load_error
from internlm.checkpoint.layout import CheckpointError

OPTIM_FILE_RE = re.compile(r"^optimizer_tp(\d+)_pp(\d+)_zo(\d+)\.pt$")
ISP_OPTIM_FILE_RE = re.compile(r"^optimizer_tp(\d+)_wp(\d+)_pp(\d+)_dp(\d+)\.pt$")
# the plan again, beside the state files: HybridZeroOptimizer.rank_unique_id
PLAN_FILE_RE = re.compile(r"^gpus-(\d+)_wp-(\d+)_tp-(\d+)_dp-(\d+)_pp-(\d+)_zo-(\d+)\.pt$")
MOMENTS = ("exp_avg", "exp_avg_sq")


def optimizer_files(folder: Path) -> dict[tuple[int, int], list[Path]]:
    """mtp/msp folders: (tp rank, pp rank) -> its ZeRO ranks' files, in ZeRO order."""
    found: dict[tuple[int, int], dict[int, Path]] = {}
    for f in sorted(Path(folder).iterdir()):
        m = OPTIM_FILE_RE.match(f.name)
        if m:
            found.setdefault((int(m.group(1)), int(m.group(2))), {})[int(m.group(3))] = f
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


def isp_optimizer_files(folder: Path) -> dict[tuple[int, int, int, int], Path]:
    """isp folders: (tp rank, wp rank, pp rank, dp rank) -> file (every rank writes its own)."""
    found = {tuple(int(g) for g in m.groups()): f for f in sorted(Path(folder).iterdir())
             if (m := ISP_OPTIM_FILE_RE.match(f.name))}
    if not found:
        raise CheckpointError(f"{folder} holds no optimizer_tp{{t}}_wp{{w}}_pp{{p}}_dp{{d}}.pt file: InternEvo saved "
                              f"no optimizer state there; load content=('model', 'sampler', 'scheduler').")
    return found


def _plan_files(folder: Path) -> dict[tuple[int, int, int, int], tuple[int, Path]]:
    """(tp, wp, pp, dp rank) -> (ZeRO rank, the rank's plan file)."""
    out = {}
    for f in sorted(Path(folder).iterdir()):
        m = PLAN_FILE_RE.match(f.name)
        if m:
            _, w, t, d, p, z = (int(g) for g in m.groups())
            out[(t, w, p, d)] = (z, f)
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


def _is_data_group(group: dict) -> bool:
    """isp's "embed_head" group: the embedding and the head, cut over the sequence-parallel ranks and
    ZeRO-sharded over the data-parallel ranks (optimizer_mode DATA); every other group is over the ranks
    holding the same weight-parallel shard (ZERO1)."""
    return group.get("name") == "embed_head" or group.get("optimizer_mode") == "data"


def _groups(path: Path, zero: int | None, data_rank: int | None = None, plan_file: Path | None = None):
    """One file's parameter groups: [(group, "zero1" | "data" | "moe", [candidate segment lists])], the file's
    grad_scaler state. A segment is (group, index in the group, shape, {"weight", "exp_avg", "exp_avg_sq",
    "step"}). `zero` is the file's ZeRO rank (data-group ones: `data_rank`); None: every ZeRO rank whose
    share of the plan has the flat tensor's size is a candidate (the master weights decide later)."""
    states = _load_optim(path)
    if not isinstance(states, dict) or "base_optim_states" not in states:
        raise CheckpointError(f"{path} is not a HybridZeroOptimizer state (no 'base_optim_states'); only that "
                              f"optimizer's files can be loaded.")
    plan = states.get("zero_devide_optim_plan")
    if plan is None and plan_file is not None:  # the copy InternEvo writes beside the file, read only if needed
        plan = _load_optim(plan_file)
    flats = states.get("flat_fp32_weights", {})
    if plan is None:
        raise CheckpointError(f"{path} has no zero_devide_optim_plan and no gpus-*_zo-*.pt plan file is beside it "
                              f"(InternEvo releases before it was saved): which parameter each part of the flat "
                              f"state is cannot be known; load content=('model', 'sampler', 'scheduler').")
    base = states["base_optim_states"]
    out = []
    for g, ranks in enumerate(plan):
        group = base["param_groups"][g] if g < len(base["param_groups"]) else {}
        kind = "moe" if group.get("moe") else "data" if _is_data_group(group) else "zero1"
        # an expert group is ZeRO-sharded over the expert-data ranks, which the file's name does not give
        rank = None if kind == "moe" else data_rank if kind == "data" and data_rank is not None else zero
        if g not in flats:  # a group without parameters on this rank
            if rank is not None and rank < len(ranks) and ranks[rank]:
                raise CheckpointError(f"{path}: group {g} has parameters in the plan but no flat_fp32_weights.")
            continue
        keys = group.get("params", [])
        state = base["state"].get(keys[0]) if len(keys) == 1 else None
        if state is None or any(k not in state for k in MOMENTS):
            raise CheckpointError(f"{path}: group {g} has no AdamW state (exp_avg, exp_avg_sq) for its flat "
                                  f"parameter.")
        flat = {"weight": flats[g].reshape(-1), **{k: state[k].reshape(-1) for k in MOMENTS}}
        step = float(state["step"]) if "step" in state else 0.0
        candidates = []
        for z in ([rank] if rank is not None else range(len(ranks))):
            ids = ranks[z] if z < len(ranks) else []
            shapes = [_shape(i, path) for i in ids]
            sizes = [int(torch.Size(s).numel()) for s in shapes]
            if sum(sizes) != flat["weight"].numel():
                if rank is not None:
                    raise CheckpointError(f"{path}: group {g}'s plan covers {sum(sizes)} elements, its flat tensor "
                                          f"holds {flat['weight'].numel()}.")
                continue
            pieces = {k: v.split(sizes) for k, v in flat.items()}
            candidates.append([(g, int(str(ident).split("_")[0]), shape,
                                {**{k: pieces[k][n].reshape(shape) for k in pieces}, "step": step})
                               for n, (ident, shape) in enumerate(zip(ids, shapes))])
        if not candidates:
            raise CheckpointError(f"{path}: no ZeRO rank's share of group {g}'s plan has the {flat['weight'].numel()} "
                                  f"elements of its flat tensor.")
        out.append((g, kind, candidates))
    return out, states.get("grad_scaler")


def _finds(model_sd: dict, seg) -> bool:
    """Whether some tensor of the model file has the segment's shape and master weight."""
    return any(tuple(t.shape) == seg[2] and torch.equal(seg[3]["weight"].to(t.dtype), t) for t in model_sd.values())


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


def _mtp_segments(folder: Path, weights: InternEvoSource):
    """{(tp, wp, pp) of each model file: (its segments, the first optimizer file)}, grad_scaler state, and
    the experts' {(MoE layer, expert, tp rank): {their key: moments}}."""
    files, plans = optimizer_files(folder), _plan_files(folder)
    out, scaler, experts = {}, None, {}
    for (t, w, p), model_path in sorted(weights.files.items()):
        if (t, p) not in files:
            raise CheckpointError(f"{folder / f'optimizer_tp{t}_pp{p}_zo0.pt'} is missing (the folder has "
                                  f"{model_path.name}).")
        segments = []
        for z, path in enumerate(files[(t, p)]):
            plan_file = next((f for (t2, _, p2, _), (z2, f) in plans.items() if (t2, p2, z2) == (t, p, z)), None)
            groups, grad_scaler = _groups(path, z, plan_file=plan_file)
            segments += [s for _, kind, cands in groups if kind != "moe" for s in cands[0]]
            scaler = scaler if scaler is not None else grad_scaler
            for g, kind, cands in groups:
                if kind == "moe":
                    _match_experts(weights, t, g, cands, path, experts)
        out[(t, w, p)] = (segments, files[(t, p)][0])
    return out, scaler, experts


def _match_experts(weights: InternEvoSource, t: int, g: int, candidates: list, path: Path, experts: dict) -> None:
    """An expert group's share of one file: its ZeRO rank among the expert-data ranks is the candidate
    whose master weights are all experts of tp rank t (model_moe_layer*_expert*_tp{t}.pt); each segment's
    moments go to that expert tensor (the replicas over the expert-data ranks give the same ones)."""
    pool = [(key, name, tensor) for key in sorted(weights.expert_files) if key[2] == t
            for name, tensor in weights.expert_state_dict(key).items()]

    def find(seg):
        return next(((key, name) for key, name, tensor in pool if tuple(tensor.shape) == seg[2]
                     and torch.equal(seg[3]["weight"].to(tensor.dtype), tensor)), None)

    for cand in candidates:
        found = [find(seg) for seg in cand]
        if all(found):
            for (key, name), seg in zip(found, cand):
                experts.setdefault(key, {})[name] = {k: seg[3][k] for k in (*MOMENTS, "step")}
            return
    raise CheckpointError(f"{path}: the master weights of expert group {g} match no experts of the "
                          f"model_moe_layer*_expert*_tp{t}.pt files: the optimizer and model files are not from "
                          f"the same step.")


def _isp_segments(folder: Path, weights: InternEvoSource):
    """As _mtp_segments for an isp folder. Rank (t, w, p, d)'s file holds its ZeRO share of the groups over
    its weight-parallel shard w (the block linears cut over wp, the norms) and its data-parallel share of
    the embedding and head of sequence rank t ("embed_head"). Each share is taken once (the ranks holding
    the same one are replicas), the ZeRO rank from the plan file beside it or else from the master
    weights, which must all be found in a model file of that shard."""
    files, plans = isp_optimizer_files(folder), _plan_files(folder)
    by_w: dict[tuple[int, int], dict] = {}  # (wp rank, pp rank) -> {(group, index): segment}
    by_t: dict[tuple[int, int], dict] = {}  # (tp rank, pp rank) -> the same, of the data groups
    first: dict[int, Path] = {}
    scaler = None
    for (t, w, p, d), path in sorted(files.items()):
        zero, plan_file = plans.get((t, w, p, d), (None, None))
        groups, grad_scaler = _groups(path, zero, data_rank=d, plan_file=plan_file)
        scaler = scaler if scaler is not None else grad_scaler
        first.setdefault(p, path)
        for g, kind, candidates in groups:
            data = kind == "data"
            target = by_t.setdefault((t, p), {}) if data else by_w.setdefault((w, p), {})
            model = next((sd for (t2, w2, p2), sd in sorted(weights.state_dicts.items())
                          if p2 == p and (t2 == t if data else w2 == w)), None)
            if model is None:
                raise CheckpointError(f"{path} has no model file of its {'tp' if data else 'wp'} rank "
                                      f"{t if data else w} (pipeline stage {p}) beside it.")
            chosen = next((c for c in candidates if all(_finds(model, s) for s in c)), None)
            if chosen is None:
                raise CheckpointError(f"{path}: the master weights of group {g} match no tensors of the model "
                                      f"files of {'tp' if data else 'wp'} rank {t if data else w}: the optimizer "
                                      f"and model files are not from the same step.")
            for seg in chosen:
                target.setdefault((seg[0], seg[1]), seg)
    out = {}
    for (t, w, p) in sorted(weights.files):
        segments = list(by_w.get((w, p), {}).values()) + list(by_t.get((t, p), {}).values())
        out[(t, w, p)] = (segments, first.get(p, folder))
    return out, scaler, {}


def _fsdp_moments(folder: Path, weights: InternEvoSource):
    """read_moments of an fsdp folder. FSDPadaptOptimizer's files (`optimizer_tp{t}_pp{p}_zo{z}.pt`, z the
    rank in FSDP's sharding group) hold, per parameter group, a list with one fp32 tensor per parameter of
    the group: the rank's piece of that parameter's share of FSDP's flat parameter, 1-D and possibly
    empty (use_orig_params), with AdamW's state of the same shape. A parameter's pieces put end to end in
    rank order are the whole parameter, flattened; which parameter is told by those master weights, equal
    to a tensor of the merged model file (the first not yet matched of that size, in the file's order)."""
    files = optimizer_files(folder)
    moments = {k: {} for k in MOMENTS}
    steps, scaler = set(), None
    for key, model_path in sorted(weights.files.items()):
        t, _, p = key
        if (t, p) not in files:
            raise CheckpointError(f"{folder / f'optimizer_tp{t}_pp{p}_zo0.pt'} is missing (the folder has "
                                  f"{model_path.name}).")
        per_rank = []  # per ZeRO rank: {group: [(weight piece, state)]}
        for path in files[(t, p)]:
            states = _load_optim(path)
            base, flats = states.get("base_optim_states"), states.get("flat_fp32_weights")
            if not isinstance(base, dict) or not isinstance(flats, dict):
                raise CheckpointError(f"{path} is not an FSDPadaptOptimizer state (no 'base_optim_states' and "
                                      f"'flat_fp32_weights').")
            scaler = scaler if scaler is not None else states.get("grad_scaler")
            groups = {}
            for g, group in enumerate(base["param_groups"]):
                pieces = flats.get(g, [])
                if group.get("moe") and len(pieces):
                    raise CheckpointError(f"{path}: group {g} holds MoE experts, whose FSDP optimizer state cannot "
                                          f"be loaded so far; load content=('model', 'sampler', 'scheduler').")
                if len(pieces) != len(group["params"]):
                    raise CheckpointError(f"{path}: group {g} has {len(group['params'])} parameters and "
                                          f"{len(pieces)} master weights.")
                groups[g] = [(w.reshape(-1), base["state"].get(i, {})) for w, i in zip(pieces, group["params"])]
            per_rank.append(groups)
        sd, taken = weights.state_dicts[key], set()
        for g in sorted(per_rank[0]):
            for j in range(len(per_rank[0][g])):
                parts = [rank[g][j] for rank in per_rank if g in rank and j < len(rank[g])]
                if len(parts) != len(per_rank):
                    raise CheckpointError(f"{files[(t, p)][0].parent}: parameter {j} of group {g} is not in every "
                                          f"optimizer_tp{t}_pp{p}_zo*.pt.")
                whole = torch.cat([w for w, _ in parts])
                name = next((n for n, v in sd.items() if n not in taken and v.numel() == whole.numel()
                             and torch.equal(whole.to(v.dtype), v.reshape(-1))), None)
                if name is None:
                    raise CheckpointError(f"{files[(t, p)][0].parent}: parameter {j} of group {g} ({whole.numel()} "
                                          f"elements over optimizer_tp{t}_pp{p}_zo*.pt) matches no tensor of "
                                          f"{model_path.name} and its dp files: the optimizer and model files are "
                                          f"not from the same step.")
                taken.add(name)
                live = [st for w, st in parts if w.numel()]
                if any(k not in st for st in live for k in MOMENTS):
                    raise CheckpointError(f"{files[(t, p)][0].parent}: parameter {j} of group {g} ({name}) has no "
                                          f"AdamW state (exp_avg, exp_avg_sq).")
                for k in MOMENTS:
                    moments[k].setdefault(key, {})[name] = torch.cat(
                        [st[k].reshape(-1) for w, st in parts if w.numel()]).reshape(sd[name].shape)
                steps |= {float(st["step"]) for st in live if "step" in st}
        unmatched = [n for n in sd if n not in taken and not n.endswith(_IGNORED)]
        if unmatched:
            raise CheckpointError(f"{folder}: no optimizer state for {unmatched[0]!r} of {model_path.name} in "
                                  f"optimizer_tp{t}_pp{p}_zo*.pt.")
    if len(steps) > 1:
        raise CheckpointError(f"{folder}: the optimizer files hold different AdamW steps {sorted(steps)}.")
    return {k: weights.over(moments[k]) for k in MOMENTS}, steps.pop() if steps else 0.0, scaler


def read_moments(folder, args) -> tuple[dict[str, InternEvoSource], float, dict | None]:
    """({"exp_avg": source, "exp_avg_sq": source} giving full tensors by our names, AdamW's step, the
    loss scale state) of an InternEvo folder (mtp/msp, with or without MoE experts, or isp)."""
    folder = Path(folder)
    weights = InternEvoSource(folder, args)
    if weights.fsdp:
        return _fsdp_moments(folder, weights)
    found, scaler, experts = (_isp_segments if weights.isp else _mtp_segments)(folder, weights)
    moments = {k: {} for k in MOMENTS}
    steps = set()
    for key, model_path in sorted(weights.files.items()):
        segments, path = found[key]
        sd = weights.state_dicts[key]
        matched = _match(sd, segments, path, model_path)
        unmatched = [k for k in sd if k not in matched and "inv_freq" not in k]
        if unmatched:
            pattern = "optimizer_tp*_wp*_pp*_dp*.pt" if weights.isp else f"optimizer_tp{key[0]}_pp{key[2]}_zo*.pt"
            raise CheckpointError(f"{folder}: no optimizer state for {unmatched[0]!r} of {model_path.name} in "
                                  f"{pattern}.")
        for k in MOMENTS:
            moments[k][key] = {name: v[k] for name, v in matched.items()}
        steps |= {v["step"] for v in matched.values()}
    for key, path in sorted(weights.expert_files.items()):
        missing = [n for n in weights.expert_state_dict(key) if n not in experts.get(key, {})]
        if missing:
            raise CheckpointError(f"{folder}: no optimizer state for {missing[0]!r} of {path.name} in any expert "
                                  f"group of optimizer_tp{key[2]}_pp*_zo*.pt.")
        steps |= {v["step"] for v in experts[key].values()}
    if len(steps) > 1:
        raise CheckpointError(f"{folder}: the optimizer files hold different AdamW steps {sorted(steps)}.")
    sources = {k: weights.over(moments[k], {key: {n: v[k] for n, v in by_name.items()}
                                            for key, by_name in experts.items()}) for k in MOMENTS}
    return sources, steps.pop() if steps else 0.0, scaler


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
