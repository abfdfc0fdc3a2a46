"""`tools/plan.py --explain RUN_FOLDER`: a finished run's measurements next to the plan of the same layout.

What is read from the run folder the trainer wrote:
- `config.yaml` (the resolved config): the layout and model, planned again with `estimate.plan`;
- `metrics.jsonl`: the step time, TGS, TFLOPS, MFU (medians over the steps after the first, which
  pays for warm-up) and the peak memory (the largest `peak_memory_bytes`); the world size follows from
  the tokens of one step and the layout (`dp * micro_num * micro_bsz * seq_len` tokens per step);
- `profile/trace_rank0_steps*.json` when the run had `--profiling`: per profiled step, the time of the
  communication kernels (`nccl*` on GPUs, `gloo:*` on CPUs, overlapped with compute or not), of the
  optimizer step, and the step itself;
- `comm/rank<R>.json` when the run had `--count-comm`: the bytes the peak pipeline stage's first rank
  sent in one step, by collective kind (internlm/comm_count.py), next to the plan's;
- `memory/rank<R>.json` when the run had `--track-memory`: that rank's tensor memory at its peak in one
  step (internlm/memory_probe.py), next to the plan's total.

Each part's ratio measured / predicted is printed, and the part furthest from 1 is named with what
usually explains such a gap. The measured peak is what the process held: on CPU it is the resident set
(the Python runtime and libraries included, a few hundred MiB the plan does not count).
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from internlm.errors import UserError

GiB = 2**30


class ExplainError(UserError, ValueError):
    pass


@dataclass
class Measured:
    world_size: int
    steps: int  # metrics rows used
    step_s: float
    tgs: float
    tflops: float
    mfu: float
    peak_gib: float | None
    trace: str | None = None
    trace_steps: int = 0
    trace_step_s: float | None = None
    comm_s: float | None = None
    optimizer_s: float | None = None


@dataclass
class Explanation:
    layout: str
    hardware: str
    measured: Measured
    rows: list = field(default_factory=list)  # (part, measured, predicted, unit)
    largest_gap: str = ""
    hint: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


HINTS = {
    "step time": "compute runs below the hardware model's efficiencies (small matrices, kernel launches, eager "
                 "elementwise work): try model.compile=True, a larger micro_bsz, or calibrate --peak_tflops",
    "communication": "collectives take longer than the links' modelled bandwidth: check the interconnect "
                     "(NCCL_DEBUG=INFO), keep tp inside a node, or raise zero1 sharding within a node",
    "optimizer": "the optimizer step is slower than one pass over its fp32 states: use the fused AdamW "
                 "(adam.impl) or shard the states wider (zero1)",
    "peak memory": "memory beyond weights, states and activations: the runtime, allocator fragmentation, "
                   "temporary buffers (on CPU the resident set includes the Python runtime)",
    "tensor memory": "tensors the plan does not count: compare the tracked kinds in memory/rank*.json with the "
                     "plan's breakdown (activations of unusual kernels, temporaries)",
}


def _rows(path: Path) -> list[dict]:
    rows = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ExplainError(f"{path}:{n} is not a JSON line ({exc.msg})") from None
    return [r for r in rows if "step_time" in r and "step" in r]


def read_trace(path: Path) -> dict:
    """Per-step seconds of the profiled steps of a torch.profiler Chrome trace: step, communication
    (kernels or gloo work, overlapped or not), optimizer."""
    data = json.loads(path.read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    steps = comm = opt = 0.0
    n_steps = 0
    for e in events:
        if e.get("ph") != "X":
            continue
        name, dur = e.get("name", ""), float(e.get("dur", 0.0)) / 1e6
        if name.startswith("ProfilerStep#"):
            steps += dur
            n_steps += 1
        elif name.startswith("gloo:") or (e.get("cat") == "kernel" and name.lower().startswith("nccl")):
            comm += dur
        elif name.startswith("Optimizer.step#"):
            opt += dur
    if not n_steps:
        raise ExplainError(f"{path} holds no ProfilerStep events (not a trace of train.py --profiling)")
    return {"steps": n_steps, "step_s": steps / n_steps, "comm_s": comm / n_steps, "optimizer_s": opt / n_steps}


def measure(folder: Path, cfg) -> Measured:
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise ExplainError(f"{metrics} does not exist: --explain reads a run folder train.py wrote "
                           f"(monitor.run_folder, with config.yaml and metrics.jsonl)")
    rows = _rows(metrics)
    if not rows:
        raise ExplainError(f"{metrics} holds no training step: let the run log at least one step")
    first = rows[0]
    d = cfg.data
    per_dp = d.micro_num * d.micro_bsz * d.seq_len
    tokens = first["num_consumed_tokens"] / first["step"]
    dp = max(1, round(tokens / per_dp))
    world = dp * cfg.parallel.tensor.size * cfg.parallel.pipeline.size
    used = rows[1:] if len(rows) > 1 else rows
    med = {k: statistics.median(r[k] for r in used) for k in ("step_time", "tgs", "tflops", "mfu")}
    peaks = [r["peak_memory_bytes"] for r in rows if r.get("peak_memory_bytes")]
    m = Measured(world, len(used), med["step_time"], med["tgs"], med["tflops"], med["mfu"],
                 max(peaks) / GiB if peaks else None)
    traces = sorted((folder / "profile").glob("trace_rank0_steps*.json")) if (folder / "profile").is_dir() else []
    if traces:
        t = read_trace(traces[-1])
        m.trace, m.trace_steps, m.trace_step_s = str(traces[-1]), t["steps"], t["step_s"]
        m.comm_s, m.optimizer_s = t["comm_s"], t["optimizer_s"]
    return m


def explain(folder, hw, gpus_per_node: int = 8) -> Explanation:
    from internlm.config import load_config
    from internlm.plan.estimate import plan

    folder = Path(folder)
    config = folder / "config.yaml"
    if not config.is_file():
        raise ExplainError(f"{config} does not exist: --explain reads a run folder train.py wrote "
                           f"(monitor.run_folder, with config.yaml and metrics.jsonl)")
    cfg = load_config(config)
    m = measure(folder, cfg)
    p = plan(cfg, m.world_size, hw, gpus_per_node)
    t = p.time_s
    ex = Explanation(p.layout, f"{m.world_size} x {hw.name}", m)
    ex.rows.append(("step time", m.step_s, t["step"], "s"))
    ex.rows.append(("TGS", m.tgs, p.tgs, "tokens/s/GPU"))
    ex.rows.append(("MFU", m.mfu, p.mfu, ""))
    if m.comm_s is not None and t.get("comm_total"):
        ex.rows.append(("communication", m.comm_s, t["comm_total"], "s"))
    if m.optimizer_s is not None:
        ex.rows.append(("optimizer", m.optimizer_s, t["optimizer"], "s"))
    if m.peak_gib is not None:
        ex.rows.append(("peak memory", m.peak_gib, p.memory_gib["total"], "GiB"))
    ex.rows += _comm_rows(folder, cfg, m.world_size, p)
    ex.rows += _memory_rows(folder, cfg, m.world_size, p)
    candidates = [(abs(math.log(a / b)), name, a / b) for name, a, b, _ in ex.rows
                  if name in HINTS and a > 0 and b > 0]
    if candidates:
        _, name, ratio = max(candidates)
        ex.largest_gap = f"{name}: measured {ratio:.2f}x the prediction"
        ex.hint = HINTS[name] if ratio > 1 else "the run beats the plan here: the hardware model is conservative"
    return ex


def _comm_rows(folder: Path, cfg, world_size: int, p) -> list[tuple]:
    """With `train.py --count-comm`: the bytes the peak stage's first rank sent in the counted step, by
    collective kind, next to the plan's."""
    from internlm.parallel_dims import ParallelDims
    from internlm.plan.estimate import comm_by_kind

    dims = ParallelDims.from_config(cfg, world_size)
    path = folder / "comm" / f"rank{p.peak_stage * dims.dp * dims.tp}.json"
    if not path.is_file():
        return []
    counted = json.loads(path.read_text())["bytes"]
    planned = comm_by_kind(p.comm_bytes)
    mib = 2**20
    return [(f"sent {kind}", counted.get(kind, 0.0) / mib, planned.get(kind, 0.0) / mib, "MiB/step")
            for kind in sorted(set(counted) | set(planned)) if counted.get(kind) or planned.get(kind)]


def _memory_rows(folder: Path, cfg, world_size: int, p) -> list[tuple]:
    """With `train.py --track-memory`: the tensor memory the peak stage's first rank held at its peak."""
    from internlm.parallel_dims import ParallelDims

    dims = ParallelDims.from_config(cfg, world_size)
    path = folder / "memory" / f"rank{p.peak_stage * dims.dp * dims.tp}.json"
    if not path.is_file():
        return []
    tracked = json.loads(path.read_text())["peak_bytes"]
    return [("tensor memory", tracked["total"] / GiB, p.memory_gib["total"], "GiB")]


def report(ex: Explanation) -> list[str]:
    m = ex.measured
    lines = [f"run on {ex.hardware}, layout {ex.layout}; {m.steps} step(s) measured (the first left out)"
             + (f", trace of {m.trace_steps} profiled step(s)" if m.trace else ", no profiler trace (--profiling)")]
    lines.append(f"{'part':<14}{'measured':>14}{'predicted':>14}{'ratio':>8}")
    for name, a, b, unit in ex.rows:
        fmt = (lambda v: f"{100 * v:.2f}%") if name == "MFU" else (lambda v: f"{v:.4g}")
        ratio = f"{a / b:.2f}" if b else "-"
        lines.append(f"{name:<14}{fmt(a):>14}{fmt(b):>14}{ratio:>8}  {unit}")
    if ex.largest_gap:
        lines.append(f"largest gap: {ex.largest_gap}")
        lines.append(f"  {ex.hint}")
    return lines
