"""Will this config fit, and how fast will it run? Plans one training step per rank before any GPU is used.

    python tools/plan.py --config configs/7B_sft.py --gpus 8 --gpu A100-80GB
    python tools/plan.py --config configs/7B_sft.py --gpus 64 --gpu H100-80GB --layout "tp=2 zero1=8 ckpt=full"
    python tools/plan.py --config configs/7B_sft.py --gpus 64 --gpu H100-80GB --search --json plans.json
    python tools/plan.py --explain runs/my_run --gpu H100-80GB      # a finished run: measured vs planned

Memory per rank (parameters, gradients, optimizer states, gathered weights, activations, buffers) comes
from the trainer's own model build under a fake process group of --gpus ranks; FLOPs, communication per
collective, the pipeline bubble and the step time follow the hardware model of doc/plan.md. --search
ranks every layout that keeps the config's global batch and fits. Exit status 2 on a layout or config
that cannot be planned (the message names the nearest layout that can).
"""
from __future__ import annotations

import argparse
import json
import sys

from internlm.errors import UserError

GiB = 2**30


def _report(p, hw, gpus: int) -> list[str]:
    mem = p.memory_gib
    lines = [f"layout: {p.layout}   on {gpus} x {hw.name} ({hw.peak_tflops:g} TFLOPS bf16, {hw.memory_gib:g} GiB)",
             f"memory per rank (pipeline rank {p.peak_stage}, the fullest): {mem['total']:.1f} GiB of "
             f"{hw.memory_gib:g} -> {'fits' if p.fits else 'DOES NOT FIT'}"]
    for k, v in mem.items():
        if k != "total":
            lines.append(f"  {k:<18}{v:8.2f} GiB")
    f = p.flops_per_token
    lines.append(f"FLOPs per token: {f['model'] / 1e9:.2f} G (matmuls, causal attention), "
                 f"{f['internevo'] / 1e9:.2f} G (InternEvo's TFLOPS formula)")
    if p.comm_bytes:
        lines.append("sent per rank per step:")
        for k, v in p.comm_bytes.items():
            lines.append(f"  {k:<30}{v / GiB:8.2f} GiB")
    t = p.time_s
    parts = ("gemm", "attention", "elementwise", "fsdp_copy", "recompute", "exposed_comm", "bubble", "optimizer")
    lines.append("step time: " + ", ".join(f"{k} {t[k]:.3f}s" for k in parts) + f" = {t['step']:.3f}s")
    lines.append(f"predicted: TGS {p.tgs:.0f}  TFLOPS {p.tflops:.1f}  MFU {p.mfu:.1%}")
    lines += [f"note: {n}" for n in p.notes]
    return lines


def _nearest(config, overrides, layout, gpus, gpus_per_node) -> str:
    """The valid candidate layout closest to `layout`, as text, or ''."""
    from internlm.config import validate
    from internlm.parallel_dims import ParallelDims
    from internlm.plan.layouts import candidate_layouts, config_layout, format_layout, layout_distance, planned_config

    try:
        base = planned_config(config, overrides)
    except (UserError, ValueError):
        return ""
    want = {**config_layout(base, gpus), **layout}
    if "zero1" not in layout:  # the config's zero1 follows dp, whatever the layout
        del want["zero1"]
    best, best_d = None, None
    for cand in candidate_layouts(base, gpus, gpus_per_node, tp_modes=("mtp", "msp", "isp")):
        d = layout_distance(want, cand)
        if best_d is not None and d >= best_d:
            continue
        try:
            cfg = planned_config(config, overrides, cand)
            validate(cfg, world_size=gpus)
            ParallelDims.from_config(cfg, gpus)
        except (UserError, ValueError):
            continue
        best, best_d = cand, d
    return format_layout(best) if best else ""


def search(config, overrides, gpus, hw, gpus_per_node, top: int):
    """Every candidate layout planned; (fitting plans by TGS, the smallest-memory plan)."""
    from internlm.parallel_dims import ParallelDims
    from internlm.plan.estimate import plan
    from internlm.plan.layouts import candidate_layouts, planned_config, shape_key
    from internlm.plan.shapes import stage_shapes

    base = planned_config(config, overrides)
    cache, plans = {}, []
    for lay in candidate_layouts(base, gpus, gpus_per_node):
        try:
            cfg = planned_config(config, overrides, lay)
            key = shape_key(lay)
            if key not in cache:
                cache[key] = stage_shapes(cfg, ParallelDims.from_config(cfg, gpus), middle_once=True)
            plans.append(plan(cfg, gpus, hw, gpus_per_node, shapes=cache[key]))
        except (UserError, ValueError):
            continue
    fitting = sorted((p for p in plans if p.fits), key=lambda p: -p.tgs)
    smallest = min(plans, key=lambda p: p.memory_gib["total"]) if plans else None
    return fitting[:top], smallest, len(plans)


def _explain(a) -> int:
    from internlm.plan.explain import explain, report
    from internlm.plan.hardware import resolve_hardware

    try:
        hw = resolve_hardware(a.gpu, peak_tflops=a.peak_tflops, memory_gb=a.memory_gb, intra_gbps=a.intra_gbps,
                              inter_gbps=a.inter_gbps)
        ex = explain(a.explain, hw, a.gpus_per_node)
    except (UserError, ValueError, OSError) as exc:
        print(f"plan: {exc}", file=sys.stderr)
        return 2
    print("\n".join(report(ex)))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(ex.to_dict(), fh, indent=1)
    return 0


def main(argv=None) -> int:
    from internlm.log import setup_logging

    setup_logging()
    import logging

    logging.getLogger("internlm").setLevel(logging.WARNING)  # the model builds' info lines, once per layout
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a training config (.py or .yaml)")
    ap.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, as train.py takes them")
    ap.add_argument("--gpus", type=int, help="accelerators in the cluster")
    ap.add_argument("--gpus_per_node", type=int, default=8)
    ap.add_argument("--gpu", default="H100-80GB", help="A100-80GB, H100-80GB, H100-96GB, H200, B200 or cpu")
    ap.add_argument("--peak_tflops", type=float, help="dense bf16 peak, replacing the --gpu figure")
    ap.add_argument("--memory_gb", type=float, help="memory per accelerator (GiB), replacing the --gpu figure")
    ap.add_argument("--intra_gbps", type=float, help="intra-node bandwidth per GPU per direction (GB/s)")
    ap.add_argument("--inter_gbps", type=float, help="inter-node bandwidth per GPU per direction (GB/s)")
    ap.add_argument("--layout", default="", help='e.g. "tp=2 pp=2 zero1=8 fsdp=1 ckpt=selective micro_bsz=2"; '
                                               "words left out keep the config's value")
    ap.add_argument("--search", action="store_true", help="plan every layout keeping the global batch; rank those "
                                                          "that fit by predicted TGS")
    ap.add_argument("--top", type=int, default=10, help="layouts --search prints")
    ap.add_argument("--json", metavar="OUT", help="also write the plan(s) as JSON")
    ap.add_argument("--explain", metavar="RUN_FOLDER", help="a finished run's measurements against the plan of "
                                                            "its layout on --gpu (doc/plan.md)")
    a = ap.parse_args(argv)
    if a.explain:
        return _explain(a)
    if not a.config or a.gpus is None:
        print("plan: --config and --gpus are needed (or --explain RUN_FOLDER)", file=sys.stderr)
        return 2
    if a.gpus < 1 or a.gpus_per_node < 1:
        print("plan: --gpus and --gpus_per_node must be positive", file=sys.stderr)
        return 2

    from internlm.plan.estimate import plan
    from internlm.plan.hardware import resolve_hardware
    from internlm.plan.layouts import parse_layout, planned_config

    try:
        hw = resolve_hardware(a.gpu, peak_tflops=a.peak_tflops, memory_gb=a.memory_gb, intra_gbps=a.intra_gbps,
                              inter_gbps=a.inter_gbps)
        layout = parse_layout(a.layout)
    except (UserError, ValueError) as exc:
        print(f"plan: {exc}", file=sys.stderr)
        return 2
    if a.search:
        try:
            best, smallest, n = search(a.config, a.overrides, a.gpus, hw, a.gpus_per_node, a.top)
        except (UserError, ValueError) as exc:
            print(f"plan: {exc}", file=sys.stderr)
            return 2
        if not best:
            msg = f"plan: no layout of this config fits {a.gpus} x {hw.name} ({hw.memory_gib:g} GiB each)"
            if smallest is not None:
                msg += (f"; the smallest, {smallest.layout}, needs {smallest.memory_gib['total']:.1f} GiB per rank: "
                        f"add GPUs, shorten data.seq_len or lower micro_bsz")
            print(msg, file=sys.stderr)
            return 2
        print(f"{n} layouts planned, {len(best)} best that fit on {a.gpus} x {hw.name}:")
        print(f"{'rank':>4} {'TGS':>8} {'MFU':>6} {'GiB':>6}  layout")
        for i, p in enumerate(best, 1):
            print(f"{i:>4} {p.tgs:>8.0f} {p.mfu:>6.1%} {p.memory_gib['total']:>6.1f}  {p.layout}")
        print()
        print("\n".join(_report(best[0], hw, a.gpus)))
        plans = best
    else:
        try:
            cfg = planned_config(a.config, a.overrides, layout)
            p = plan(cfg, a.gpus, hw, a.gpus_per_node)
        except (UserError, ValueError) as exc:
            near = _nearest(a.config, a.overrides, layout, a.gpus, a.gpus_per_node) if layout else ""
            print(f"plan: {exc}" + (f"\nnearest layout that works: --layout \"{near}\"" if near else ""),
                  file=sys.stderr)
            return 2
        print("\n".join(_report(p, hw, a.gpus)))
        if not p.fits:
            print(f"does not fit: {p.memory_gib['total']:.1f} GiB > {hw.memory_gib:g} GiB; try --search")
        plans = [p]
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"gpus": a.gpus, "gpu": hw.name, "plans": [p.to_dict() for p in plans]}, fh, indent=1)
    return 0
