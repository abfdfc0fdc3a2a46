"""Training throughput of the real trainer: TGS, TFLOPS, MFU, step time, peak memory; optionally
against a Hugging Face transformers training loop of the same model on the same tokens.

    python tools/benchmark.py --config configs/bench_100m.py [KEY=VALUE ...] [--steps 5] [--warmup 2]
                              [--compare hf] [--alternate 1] [--profile] [--json OUT]
    torchrun --nproc_per_node 4 tools/benchmark.py --config configs/demo.py parallel.tensor=2

The trainer runs on generated tokens: data.train_folder/valid_folder are forced to None, validation
and checkpoint saving and resuming off, and the run folder goes to a temporary directory. Figures are those of the
median step (see doc/train_performance.md and doc/metrics.md for the formulas); MFU is against a
matmul peak measured in the same run for the model's dtype.

With --compare hf (one process only) each side runs in its own worker process: ours k steps, HF k
steps, and so on (k = --alternate), which cancels the drift of a shared machine, and each process's
peak memory is its own. Both workers build the same packed loader from the same config and seed; the
tool checks every step's token checksum on both sides.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# always a fresh model on generated data, never a resume
FORCED = ["data.type='tokenized'", "data.train_folder=None", "data.valid_folder=None", "data.valid_every=0",
          "ckpt.enable_save_ckpt=False", "ckpt.auto_resume=False", "ckpt.load_ckpt_info=None"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a .py or .yaml training config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--steps", type=int, default=5, help="measured steps per side (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per side first (default 2)")
    p.add_argument("--compare", choices=["hf"], default=None, help="also train a HF transformers model")
    p.add_argument("--alternate", type=int, default=1, metavar="K", help="with --compare: steps per turn (default 1)")
    p.add_argument("--profile", action="store_true", help="profile one extra step per side; print the top ops")
    p.add_argument("--trace", default=None, metavar="PATH",
                   help="with --profile (implied): write our side's profiled step as a Chrome trace (.json or "
                        ".json.gz)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as a JSON object")
    p.add_argument("--peak-seconds", type=float, default=0.5, help="time per dtype of the matmul peak probe")
    p.add_argument("--name", default=None, help="row label in the table (default: the config's file name)")
    args = p.parse_intermixed_args(argv)
    if args.trace:
        args.profile = True
    if args.steps < 1 or args.warmup < 0 or args.alternate < 1:
        p.error("--steps and --alternate must be >= 1 and --warmup >= 0")
    return args


# ---- running the sides ---------------------------------------------------------------------------

class _Remote:
    """A side living in a worker process (internlm.cli.benchmark_sides.serve_side), driven over a pipe."""

    def __init__(self, ctx, side_name, config_path, overrides):
        from internlm.cli.benchmark_sides import serve_side

        self.name = side_name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve_side, args=(side_name, config_path, overrides, child), daemon=True)
        self.proc.start()
        child.close()

    def _answer(self):
        try:
            status, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the {self.name} worker died (exit code {self.proc.exitcode})") from None
        if status != "ok":
            raise RuntimeError(f"the {self.name} worker failed:\n{value}")
        return value

    def call(self, *cmd):
        self.conn.send(cmd)
        return self._answer()

    def ready(self):
        return self._answer()

    def stop(self):
        try:
            if self.proc.is_alive():
                self.call("stop")
        finally:
            self.proc.join(timeout=60)
            if self.proc.is_alive():
                self.proc.terminate()


class _Local:
    """Our trainer in this process (the only choice under torchrun)."""

    name = "ours"

    def __init__(self, cfg):
        from internlm.cli.benchmark_sides import OursSide

        self.side = OursSide(cfg)

    def call(self, *cmd):
        from internlm.cli.benchmark_sides import dispatch

        return dispatch(self.side, cmd)

    def stop(self):
        self.side.close()


def _alternate(sides, warmup: int, steps: int, k: int, log) -> dict:
    """Warm-up then measured steps, k at a time per side in turn. Returns name -> measured step records."""
    from internlm.metrics import EtaClock, format_duration

    records = {s.name: [] for s in sides}
    clock, left = EtaClock(), warmup + steps  # ETA over both phases, all sides, wall-clock per step
    for phase, total in (("warmup", warmup), ("measure", steps)):
        done = 0
        while done < total:
            n = min(k, total - done)
            t0 = time.monotonic()
            for s in sides:
                out = s.call("run", n)
                for i, r in enumerate(out):
                    log(f"[bench] {phase} {s.name} step {done + i + 1}/{total}: {r['step_time']:.3f}s "
                        f"(cpu {r['cpu_time']:.2f}s) "
                        f"loss={r['loss']:.4f} tgs={r['tgs']:.1f}")
                if phase == "measure":
                    records[s.name].extend(out)
            done += n
            left -= n
            eta = clock.update((time.monotonic() - t0) / n, left)
            log(f"[bench] {warmup + steps - left}/{warmup + steps} steps per side done, "
                f"eta {format_duration(eta)}")
    if len(sides) == 2:
        a, b = (records[s.name] for s in sides)
        if [r["digest"] for r in a] != [r["digest"] for r in b]:
            raise RuntimeError("the two sides did not train on the same tokens (batch checksums differ)")
    return records


# ---- figures -------------------------------------------------------------------------------------

def _figures(cfg, info: dict, recs: list[dict], peak_tflops: float, world_size: int) -> dict:
    """TGS, TFLOPS and MFU of the median step, by the trainer's own formulas (internlm.metrics)."""
    from internlm import builders, metrics
    from internlm.cli.benchmark_sides import cpu_stats, median_low_index, step_stats

    times = [r["step_time"] for r in recs]
    t = times[median_low_index(times)]
    speed = metrics.step_throughput(builders.model_args(cfg), cfg.model, tokens=info["tokens_per_step"], step_time_s=t,
                              world_size=world_size, seq_len=cfg.data.seq_len, peak_flops=peak_tflops * 1e12)
    return dict(**speed, **step_stats(times), **cpu_stats(recs), step_times=times, loss_first=recs[0]["loss"],
                loss_last=recs[-1]["loss"])


def _loadavg() -> float | None:
    """The 1-minute load average: on a shared machine it says how much the timings can be trusted."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _gib(n) -> str:
    return f"{n / 2**30:.2f} GiB"


HEADER = ("| config | layout | params | tokens/step | ours TGS | TFLOPS | MFU | step time min/med/max (s) "
          "| peak mem | HF TGS | HF MFU | HF peak mem | speedup |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(r: dict) -> str:
    hf = r.get("hf_tgs") is not None
    cells = [r["name"], r["layout"], f"{r['params'] / 1e6:.1f}M", str(r["tokens_per_step"]), f"{r['tgs']:.1f}",
             f"{r['tflops']:.4f}", f"{100 * r['mfu']:.1f}%",
             f"{r['step_time_min']:.2f} / {r['step_time_median']:.2f} / {r['step_time_max']:.2f}",
             _gib(r["peak_memory_bytes"]),
             f"{r['hf_tgs']:.1f}" if hf else "-", f"{100 * r['hf_mfu']:.1f}%" if hf else "-",
             _gib(r["hf_peak_memory_bytes"]) if hf else "-", f"{r['speedup_vs_hf']:.2f}x" if hf else "-"]
    return "| " + " | ".join(cells) + " |"


# ---- main ----------------------------------------------------------------------------------------

def _start_sides(args, cfg, overrides) -> list:
    if not args.compare:
        return [_Local(cfg)]
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    sides = [_Remote(ctx, "ours", args.config, overrides), _Remote(ctx, "hf", args.config, overrides)]
    for s in sides:
        s.ready()
    return sides


def _describe(log, info: dict, hf_info: dict | None, args) -> None:
    log(f"[bench] layout: {info['layout']}  device: {info['device']} ({info['device_name']})  "
        f"torch threads: {info['threads']}")
    log(f"[bench] ours: {info['params'] / 1e6:.2f}M params, attention={info['attention']}, "
        f"optimizer={info['optimizer']}, dtype={info['dtype']}, autocast={info['autocast']}, compile={info['compile']}")
    log("[bench] ours kernels: " + ", ".join(f"{k}={v}" for k, v in info["kernels"].items()))
    if hf_info:
        log(f"[bench] hf:   {hf_info['model']} {hf_info['params'] / 1e6:.2f}M params, "
            f"attention={hf_info['attention']}, "
            f"optimizer={hf_info['optimizer']}, {hf_info['dtype']}, autocast={hf_info['autocast']}")
    log(f"[bench] tokens per step: {info['tokens_per_step']}; warmup {args.warmup}, measure {args.steps} steps"
        + (f", alternating {args.alternate} at a time" if args.compare else ""))


def benchmark(args, cfg, sides, log) -> dict:
    """Run the steps on every side and gather the figures into one flat dict."""
    ours = sides[0]
    info = ours.call("describe")
    hf_info = sides[1].call("describe") if len(sides) > 1 else None
    _describe(log, info, hf_info, args)
    load_before = _loadavg()
    peaks = ours.call("peaks", args.peak_seconds)
    records = _alternate(sides, args.warmup, args.steps, args.alternate, log)
    load_after = _loadavg()
    after = ours.call("peaks", args.peak_seconds)  # a peak is a best case: keep the better probe
    peaks = {k: max(v, after[k]) for k, v in peaks.items()}
    peak = peaks.get(info["dtype"].replace("torch.", ""), peaks["float32"])
    if info["kernels"]["linear"].startswith("fp32 GEMM"):
        # model.cpu_matmul="fp32": our matmuls run as fp32 GEMMs, so MFU is against that GEMM's peak
        # when it is the higher one (both sides against the same peak)
        peak = max(peak, peaks["float32"])
    mem = ours.call("memory")
    keys = ("layout", "params", "world_size", "tokens_per_step", "device", "device_name", "dtype", "threads",
            "attention", "optimizer", "torch_version", "kernels")
    result = dict(name=args.name or Path(args.config).stem, config=args.config, overrides=list(args.overrides),
                  steps=args.steps, warmup=args.warmup, **{k: info[k] for k in keys},
                  loadavg_1min=[load_before, load_after], cpu_count=os.cpu_count(),
                  peak_tflops=peak, peak_tflops_bf16=peaks["bfloat16"], peak_tflops_fp32=peaks["float32"],
                  peak_memory_bytes=mem["peak_memory_bytes"], memory_baseline_bytes=mem["baseline_rss"])
    result.update(_figures(cfg, info, records["ours"], peak, info["world_size"]))
    sheet = info["datasheet_peak_tflops"]
    if sheet:  # a known GPU: MFU against its data-sheet peak too
        result.update(peak_tflops_datasheet=sheet, mfu_datasheet=result["mfu"] * peak / sheet)
    if hf_info:
        hf_mem = sides[1].call("memory")
        hf = _figures(cfg, hf_info, records["hf"], peak, 1)
        result.update({f"hf_{k}": v for k, v in hf.items() if k != "model_flops_per_token"})
        result.update(hf_params=hf_info["params"], hf_model=hf_info["model"], hf_attention=hf_info["attention"],
                      hf_optimizer=hf_info["optimizer"], hf_peak_memory_bytes=hf_mem["peak_memory_bytes"],
                      hf_memory_baseline_bytes=hf_mem["baseline_rss"], speedup_vs_hf=result["tgs"] / hf["tgs"],
                      speedup_vs_hf_cpu_time=hf["cpu_time_median"] / result["cpu_time_median"])
        if hf_info["params"] != info["params"]:
            log(f"[bench] WARNING: parameter counts differ: ours {info['params']}, hf {hf_info['params']}")
    if args.profile:
        on_gpu = info["device"].startswith("cuda")
        for s in sides:
            trace = str(Path(args.trace).resolve()) if args.trace and s.name == "ours" else None
            ops = s.call("profile", 15, trace)
            if trace:
                result["trace"] = trace
                log(f"[bench] trace of the profiled {s.name} step: {trace}")
            result[f"profile_{s.name}"] = ops
            moe = {o["name"]: o["device_ms" if on_gpu else "cpu_ms"] for o in ops if o["name"].startswith("moe_")}
            if moe and s.name == "ours":  # a MoE model's named ranges, forward only, against the step
                result["moe_ranges_ms"] = moe
                log("[bench] MoE ranges of the profiled step (forward, inclusive): " + ", ".join(
                    f"{k} {v:.1f} ms ({100 * v / 1e3 / result['step_time_median']:.1f}% of the median step)"
                    for k, v in sorted(moe.items())))
            log(f"[bench] profile of one more {s.name} step, top ops by self {'CUDA' if on_gpu else 'CPU'} time:")
            for o in ops:
                log(f"    {o['name'][:60]:60s} calls={o['calls']:6d} self_cpu={o['self_cpu_ms']:9.1f} ms"
                    + (f" self_cuda={o['self_device_ms']:9.1f} ms" if on_gpu else "") + f" {100 * o['share']:5.1f}%")
    return result


def main(argv=None) -> int:
    from internlm.log import setup_logging

    setup_logging()
    args = parse_args(argv)
    from internlm.config import load_config

    if args.compare and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("[bench] --compare hf runs in one process (the HF loop has no parallel layout); "
              "run it without torchrun", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    run_folder = tempfile.mkdtemp(prefix="internlm_bench_")
    overrides = list(args.overrides) + FORCED + [f"monitor.run_folder={run_folder!r}"]
    cfg = load_config(args.config, overrides)
    sides = []
    try:
        sides = _start_sides(args, cfg, overrides)
        result = benchmark(args, cfg, sides, log)
    finally:
        for s in sides:
            try:
                s.stop()
            except Exception as exc:  # noqa: BLE001 - report, keep shutting down
                print(f"[bench] stopping {s.name}: {exc}", file=sys.stderr)
        if not args.compare:
            from internlm.launch import shutdown

            shutdown()
        shutil.rmtree(run_folder, ignore_errors=True)

    if rank == 0:
        load = " -> ".join(f"{x:.1f}" for x in result["loadavg_1min"] if x is not None)
        print(f"[bench] peak matmul TFLOPS measured here: bf16 {result['peak_tflops_bf16']:.4f}, "
              f"fp32 {result['peak_tflops_fp32']:.4f}; MFU uses {result['peak_tflops']:.4f}; "
              f"load average {load} on {result['cpu_count']} CPUs")
        print(HEADER)
        print(table_row(result), flush=True)
        if args.json:
            bad = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                print(f"[bench] WARNING: non-finite figures {bad}", file=sys.stderr)
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
