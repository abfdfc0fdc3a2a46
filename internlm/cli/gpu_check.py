"""GPU proof in one run: correctness of the CUDA paths against the CPU, and throughput against Hugging Face.

    python tools/gpu_check.py [--out DIR] [--budget SECONDS] [--tiny] [--stages env,attention,moe,parity,bench]

Made for a GPU machine lent for a few minutes with no network: one command, every result written
under --out (default: $OUT when set, else runs/gpu_check) as it arrives, so a run cut short still
leaves what it measured. Stages, in order:

1. env: torch/CUDA versions, the device, which attention kernels are importable, the measured bf16
   and fp32 GEMM peaks.
2. attention: packed attention (every backend available on the device: flash-attn, torch varlen,
   SDPA rows/mask/buckets, per-sample loop) against a float64 per-sample reference on the CPU, output
   and q/k/v gradients, in bf16 and fp32: document masks must hold on the GPU kernels.
3. moe: the MoE experts' grouped GEMM (F.grouped_mm) against the per-expert loop, outputs and
   gradients in bf16 and fp32 against an fp64 reference, and the time of one forward + backward of each
   (milliseconds, same shapes, same call).
4. parity: `train.py` on a small InternLM2-shaped model, 10 steps on the device against the same run
   on the CPU (same seed, same data): fp32 losses within 1e-3 relative, bf16 within 2e-2.
5. bench: `tools/benchmark.py` on configs/bench_1.8b.py (InternLM2-1.8B's shape, seq 4096, bf16):
   defaults against the HF transformers loop (with a profiler trace of one step), then selective
   activation checkpointing, torch.compile, and both: TGS, TFLOPS, MFU against the measured bf16
   GEMM peak, peak memory and the kernel report line of each.

Ends with one markdown table (printed and written as gpu_check.md) and gpu_check.json. Each stage
runs in its own process with what is left of --budget, so a crash or hang costs one row, not the run.
Without CUDA (or with --tiny) the same stages run with tiny shapes on the CPU, skipping what needs
CUDA, which is how CI tests this script.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the source checkout (its configs/) of an editable install

STAGES = ("env", "attention", "moe", "parity", "bench")
MOE_TOL = {"float32": 1e-4, "bfloat16": 2e-2}  # relative L2 error of the experts' output and gradients
PARITY_TOL = {"float32": 1e-3, "bfloat16": 2e-2}  # max relative loss difference over the steps
ATTN_TOL = {"float32": 2e-4, "bfloat16": 2e-2}  # relative L2 error of output and gradients vs float64
# a small InternLM2-shaped model (GQA) for the CPU/GPU parity runs
PARITY_MODEL = ["model.num_layers=2", "model.hidden_size=256", "model.num_attention_heads=8",
                "model.num_kv_attention_heads=4", "model.multiple_of=64", "model.vocab_size=4000",
                "data.seq_len=512", "data.micro_bsz=1", "data.micro_num=2", "data.dummy_num_samples=400",
                "model.max_position_embeddings=1024"]
TINY_PARITY_MODEL = ["model.num_layers=1", "model.hidden_size=64", "model.num_attention_heads=4",
                     "model.num_kv_attention_heads=2", "model.multiple_of=16", "model.vocab_size=512",
                     "data.seq_len=64", "data.micro_bsz=1", "data.micro_num=2", "data.dummy_num_samples=100"]
TINY_BENCH = ["model.num_layers=1", "model.hidden_size=64", "model.num_attention_heads=4",
              "model.num_kv_attention_heads=2", "model.intermediate_size=128", "model.vocab_size=512",
              "data.seq_len=64", "data.micro_bsz=1", "data.micro_num=2", "data.dummy_num_samples=100",
              "model.max_position_embeddings=64"]
# (row name, overrides, compare with HF, profile) for the throughput stage
BENCH_VARIANTS = (
    ("defaults", [], True, True),
    ("compile", ["model.compile=True"], False, False),
    ("compile + selective AC", ["model.compile=True", "model.checkpoint=True", "model.checkpoint_policy='selective'"],
     False, False),
    ("selective AC", ["model.checkpoint=True", "model.checkpoint_policy='selective'"], False, False),
    ("full AC", ["model.checkpoint=True"], False, False),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check",
                   help="results folder (default: $OUT, else runs/gpu_check)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and step counts (automatic without CUDA)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--bench-config", default=str(ROOT / "configs" / "bench_1.8b.py"),
                   help="config of the throughput stage (default configs/bench_1.8b.py)")
    p.add_argument("--bench-variants", default=None,
                   help="comma-separated subset of the throughput rows (default: all): "
                        + ", ".join(v[0] for v in BENCH_VARIANTS))
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        p.error(f"unknown stage(s) {bad}; choose from {list(STAGES)}")
    args.stages = stages
    args.bench_overrides = []
    return args


# ---- the run's bookkeeping -----------------------------------------------------------------------

class Run:
    """Deadline, log file and results JSON, rewritten after every stage."""

    def __init__(self, out: Path, budget: float, tiny: bool, cuda: bool):
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + budget
        self.log_path = out / "gpu_check.log"
        self.log_path.write_text("")
        self.results = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "tiny": tiny, "cuda": cuda, "stages": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, msg: str) -> None:
        print(msg, flush=True)
        with open(self.log_path, "a") as f:
            f.write(msg + "\n")

    def save(self, stage: str, value) -> None:
        self.results["stages"][stage] = value
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def command(self, cmd: list[str], timeout: float, cwd: Path | None = None) -> tuple[int, str, float]:
        """Run a command with the time left (at most `timeout`); its output goes to the log."""
        limit = max(1.0, min(timeout, self.left()))
        self.log(f"$ {' '.join(cmd)}   (limit {limit:.0f}s)")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=limit)
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or b""
            out = out.decode(errors="replace") if isinstance(out, bytes) else out
            rc, text = 124, out + f"\n[gpu_check] timed out after {limit:.0f}s"
        with open(self.log_path, "a") as f:
            f.write(text + f"\n[exit code {rc}]\n")
        return rc, text, time.monotonic() - t0


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# ---- 1. environment ------------------------------------------------------------------------------

def stage_env(run: Run, device) -> dict:
    import torch

    from internlm import metrics
    from internlm.model.attention import flash_available, varlen_available

    info = dict(torch=torch.__version__, cuda=torch.version.cuda, device=str(device),
                flash_attn=flash_available(), torch_varlen=varlen_available(), cpu_count=os.cpu_count())
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                    datasheet_bf16_tflops=metrics.known_peak_tflops(props.name, torch.bfloat16))
    seconds = 1.0 if device.type == "cuda" else 0.1
    info["gemm_tflops_bf16"] = metrics.measure_peak_tflops(torch.bfloat16, device, seconds=seconds)
    info["gemm_tflops_fp32"] = metrics.measure_peak_tflops(torch.float32, device, seconds=seconds)
    run.log(f"[env] {json.dumps(info)}")
    return info


# ---- 2. packed attention on the device vs a float64 per-sample reference --------------------------

def _packed_layout(total: int, gen):
    """Sample lengths (short and long, as packed data has) filling `total` tokens, and position ids
    (a tensor)."""
    import torch

    lengths, left = [], total
    while left > 0:
        n = int(torch.randint(1, max(2, total // 3), (1,), generator=gen))
        if torch.rand(1, generator=gen).item() < 0.3:
            n = int(torch.randint(1, 17, (1,), generator=gen))  # a few very short samples
        n = min(n, left)
        lengths.append(n)
        left -= n
    pos = torch.cat([torch.arange(n) for n in lengths])
    return lengths, pos


def _reference(q, k, v, lengths, do, mask_docs: bool = True):
    """Per-sample causal attention in float64 on the CPU: output and q/k/v gradients for `do`."""
    import torch

    q, k, v = (t.detach().double().cpu().requires_grad_(True) for t in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scale = q.shape[-1] ** -0.5
    outs, start = [], 0
    spans = [(0, sum(lengths))] if not mask_docs else []
    if mask_docs:
        for n in lengths:
            spans.append((start, start + n))
            start += n
    for s, e in spans:
        qi, ki, vi = (t[0, s:e].transpose(0, 1) for t in (q, kk, vv))  # [H, n, D]
        att = (qi @ ki.transpose(-1, -2)) * scale
        att = att.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))
        outs.append((att.softmax(-1) @ vi).transpose(0, 1))
    out = torch.cat(outs)[None]
    out.backward(do.double().cpu())
    return out.detach(), q.grad, k.grad, v.grad


def _rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def check_attention(device, tiny: bool, seed: int = 0) -> dict:
    """Every attention backend available on `device`, in bf16 and fp32, against the reference."""
    import torch

    from internlm.model.attention import (
        BACKENDS,
        VARLEN_DTYPES,
        flash_available,
        packed_attention,
        plan_attention,
        varlen_available,
    )

    total, hq, hkv, d = (256, 4, 2, 32) if tiny else (4096, 16, 8, 128)
    gen = torch.Generator().manual_seed(seed)
    lengths, pos = _packed_layout(total, gen)
    q = torch.randn(1, total, hq, d, generator=gen)
    k = torch.randn(1, total, hkv, d, generator=gen)
    v = torch.randn(1, total, hkv, d, generator=gen)
    do = torch.randn(1, total, hq, d, generator=gen)
    ref = _reference(q, k, v, lengths, do)
    # the check has teeth only if ignoring the document boundaries would fail it
    no_mask = _reference(q, k, v, lengths, do, mask_docs=False)
    leak = _rel(no_mask[0], ref[0])
    rows = []
    for backend in BACKENDS:
        if backend == "flash" and not flash_available():
            continue
        if backend == "varlen" and (device.type != "cuda" or not varlen_available()):
            continue
        for dtype in (torch.bfloat16, torch.float32):
            if backend in ("flash", "varlen") and dtype not in VARLEN_DTYPES:
                continue
            name = str(dtype).replace("torch.", "")
            row = dict(backend=backend, dtype=name, samples=len(lengths), tokens=total)
            try:
                qd, kd, vd = (t.to(device, dtype).detach().clone().requires_grad_(True) for t in (q, k, v))
                plan = plan_attention(pos[None].to(device), backend)
                out = packed_attention(qd, kd, vd, plan)
                out.backward(do.to(device, dtype))
                errs = [_rel(out.detach(), ref[0]), _rel(qd.grad, ref[1]), _rel(kd.grad, ref[2]),
                        _rel(vd.grad, ref[3])]
                row.update(plan=plan.kind, err_out=errs[0], err_dq=errs[1], err_dk=errs[2], err_dv=errs[3],
                           max_err=max(errs), tol=ATTN_TOL[name])
                row["ok"] = bool(max(errs) <= ATTN_TOL[name] and all(e == e for e in errs))
            except Exception as exc:  # noqa: BLE001 - a failing kernel is a result, not a crash
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
            rows.append(row)
    return dict(rows=rows, doc_mask_leak_error=leak, ok=bool(rows) and all(r["ok"] for r in rows)
                and leak > 10 * max(ATTN_TOL.values()))


# ---- 3. MoE experts: grouped GEMM vs the loop ------------------------------------------------------

def check_moe(device, tiny: bool, seed: int = 0, repeats: int = 5) -> dict:
    """internlm.model.moe.expert_ffn with F.grouped_mm and with the per-expert loop, in bf16 and fp32:
    error against float64 on the CPU, and milliseconds per forward + backward."""
    import torch

    from internlm.model import moe

    experts, tokens, h, ffn = (4, 256, 64, 128) if tiny else (8, 4096, 1024, 2816)  # (an fp64 CPU reference)
    gen = torch.Generator().manual_seed(seed)
    counts = torch.multinomial(torch.ones(experts), tokens, replacement=True, generator=gen).bincount(
        minlength=experts).tolist()
    x = torch.randn(tokens, h, generator=gen)
    w1, w3 = (torch.randn(experts, ffn, h, generator=gen) / h ** 0.5 for _ in range(2))
    w2 = torch.randn(experts, h, ffn, generator=gen) / ffn ** 0.5
    grad = torch.randn(tokens, h, generator=gen)
    ref_in = [t.double().requires_grad_() for t in (x, w1, w3, w2)]
    was = moe.USE_GROUPED_MM
    try:
        moe.USE_GROUPED_MM = False
        moe.expert_ffn(ref_in[0], counts, *ref_in[1:]).backward(grad.double())
        refs = [t.grad for t in ref_in]
        rows = []
        for dtype in (torch.bfloat16, torch.float32):
            name = str(dtype).replace("torch.", "")
            for grouped in (True, False):
                moe.USE_GROUPED_MM = grouped
                row = dict(dtype=name, kernel="grouped_mm" if grouped else "loop", experts=experts, tokens=tokens,
                           hidden=h, ffn=ffn)
                try:
                    leaves = [t.to(device, dtype).detach().clone().requires_grad_() for t in (x, w1, w3, w2)]
                    runs = grouped and moe._grouped_mm_runs(leaves[0], leaves[1])
                    if grouped and not runs:
                        row.update(ok=True, skipped="F.grouped_mm does not take these operands here")
                        rows.append(row)
                        continue
                    out = moe.expert_ffn(leaves[0], counts, *leaves[1:])
                    out.backward(grad.to(device, dtype))
                    ref_out = moe.expert_ffn(*[t.detach() for t in ref_in[:1]], counts,
                                             *[t.detach() for t in ref_in[1:]])
                    errs = [_rel(out.detach(), ref_out)] + [_rel(t.grad, r) for t, r in zip(leaves, refs)]
                    times = []
                    for _ in range(repeats):
                        for t in leaves:
                            t.grad = None
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        moe.expert_ffn(leaves[0], counts, *leaves[1:]).backward(grad.to(device, dtype))
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        times.append(time.perf_counter() - t0)
                    row.update(max_err=max(errs), tol=MOE_TOL[name], ms=1e3 * sorted(times)[len(times) // 2],
                               ok=bool(max(errs) <= MOE_TOL[name]))
                except Exception as exc:  # noqa: BLE001 - a failing kernel is a result, not a crash
                    row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
                rows.append(row)
    finally:
        moe.USE_GROUPED_MM = was
    for dtype in ("bfloat16", "float32"):
        pair = {r["kernel"]: r for r in rows if r["dtype"] == dtype and "ms" in r}
        if len(pair) == 2:
            pair["grouped_mm"]["speedup_vs_loop"] = pair["loop"]["ms"] / pair["grouped_mm"]["ms"]
    return dict(rows=rows, ok=all(r["ok"] for r in rows))


# ---- 4. train.py on the device vs the CPU ---------------------------------------------------------

def _losses(run_folder: Path) -> tuple[list[float], list[float]]:
    losses, norms = [], []
    for line in (run_folder / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses.append(float(rec["loss"]))
            norms.append(float(rec.get("grad_norm", float("nan"))))
    return losses, norms


def compare_runs(ref: list[float], ref_norm: list[float], got: list[float], got_norm: list[float], steps: int,
                 tol: float) -> dict:
    """Losses (and grad norms) of the device run against the CPU run, step by step."""
    if len(ref) != steps or len(got) != steps:
        raise RuntimeError(f"expected {steps} logged steps, got {len(ref)} (cpu) and {len(got)} (device)")
    rel = [abs(a - b) / abs(b) if math.isfinite(a) else math.inf for a, b in zip(got, ref)]
    norm_rel = [abs(a - b) / abs(b) for a, b in zip(got_norm, ref_norm) if b]
    return dict(loss_cpu=ref, loss_device=got, max_rel_loss_diff=max(rel),
                max_rel_grad_norm_diff=max(norm_rel) if norm_rel else None, learned=ref[-1] < ref[0],
                ok=bool(max(rel) <= tol))


def stage_parity(run: Run, cuda: bool, tiny: bool, workdir: Path) -> dict:
    steps = 3 if tiny else 10
    model = TINY_PARITY_MODEL if tiny else PARITY_MODEL
    dtypes = ("float32",) if tiny else ("float32", "bfloat16")
    # without CUDA the "device" side is the CPU with the per-sample attention loop: the plumbing runs
    # and the comparison still means something (two attention paths, one training curve)
    device = "cuda" if cuda else "cpu_sdpa_loop"
    side_overrides = {"cpu": ["device='cpu'", "cpu_malloc_tuning=True"],
                      "cuda": ["device='cuda'"],
                      "cpu_sdpa_loop": ["device='cpu'", "model.attn_backend='sdpa_loop'"]}
    base = [sys.executable, "-m", "internlm.cli.train", "--config", str(ROOT / "configs" / "demo.py"),
            "data.type='tokenized'", "data.train_folder=None", "data.valid_folder=None", "data.valid_every=0",
            "ckpt.enable_save_ckpt=False",
            f"data.total_steps={steps}", f"lr_scheduler.total_steps={steps}", "monitor.log_every=1",
            "adam.lr=1e-3", *model]
    jobs = {}
    for dtype in dtypes:
        for dev in ("cpu", device):
            folder = workdir / f"{dtype}_{dev}"
            cmd = base + [f"model.dtype='torch.{dtype}'", f"monitor.run_folder='{folder}'", *side_overrides[dev]]
            jobs[(dtype, dev)] = (cmd, folder)
    # all runs at once: the CPU runs share the cores, the device runs the GPU
    run.log(f"[parity] {len(jobs)} train.py runs of {steps} steps: " + ", ".join(f"{d}/{v}" for d, v in jobs))
    procs = {}
    limit = max(1.0, min(240.0, run.left()))
    threads = max(1, (os.cpu_count() or 2) // max(1, sum(1 for _, v in jobs if v.startswith("cpu"))))
    for key, (cmd, _folder) in jobs.items():
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        procs[key] = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
    outputs = {}
    t0 = time.monotonic()
    for key, proc in procs.items():
        try:
            text, _ = proc.communicate(timeout=max(1.0, limit - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            text = (proc.communicate()[0] or "") + "\n[gpu_check] timed out"
        outputs[key] = (proc.returncode, text)
        with open(run.log_path, "a") as f:
            f.write(f"$ {' '.join(jobs[key][0])}\n{text}\n[exit code {proc.returncode}]\n")
    rows = []
    for dtype in dtypes:
        row = dict(dtype=dtype, device=device, steps=steps, tol=PARITY_TOL[dtype])
        try:
            for dev in ("cpu", device):
                rc, text = outputs[(dtype, dev)]
                if rc != 0:
                    raise RuntimeError(f"train.py on {dev} ({dtype}) exited {rc}:\n{_tail(text)}")
            ref, ref_norm = _losses(jobs[(dtype, "cpu")][1])
            got, got_norm = _losses(jobs[(dtype, device)][1])
            row.update(compare_runs(ref, ref_norm, got, got_norm, steps, PARITY_TOL[dtype]))
        except Exception as exc:  # noqa: BLE001 - reported in the table
            row.update(ok=False, error=str(exc)[-1500:])
        rows.append(row)
        run.log(f"[parity] {dtype}: " + (f"max relative loss difference {row['max_rel_loss_diff']:.2e} "
                                         f"(tol {row['tol']:.0e})" if "max_rel_loss_diff" in row
                                         else f"FAILED: {row.get('error', '')[:300]}"))
    return dict(rows=rows, compared_with=device, ok=all(r["ok"] for r in rows))


# ---- 4. throughput -------------------------------------------------------------------------------

def stage_bench(run: Run, args, tiny: bool) -> dict:
    wanted = None if not args.bench_variants else {v.strip() for v in args.bench_variants.split(",")}
    variants = [v for v in BENCH_VARIANTS if wanted is None or v[0] in wanted]
    rows = []
    for name, overrides, compare, profile in variants:
        if run.left() < 20:
            rows.append(dict(name=name, ok=False, error="skipped: out of time budget"))
            continue
        json_path = run.out / "bench_tmp.json"
        json_path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "internlm.cli.benchmark", "--config", args.bench_config,
               *(TINY_BENCH if tiny else []), *args.bench_overrides, *overrides, "--json", str(json_path),
               "--name", name]
        cmd += ["--steps", "2", "--warmup", "1", "--peak-seconds", "0.1"] if tiny else ["--steps", "5", "--warmup", "2"]
        if compare:
            cmd += ["--compare", "hf"]
        if profile:
            cmd += ["--trace", str(run.out / ("trace_defaults.json.gz"))]
        rc, text, wall = run.command(cmd, timeout=300.0)
        row = dict(name=name, overrides=list(args.bench_overrides) + overrides, wall_s=round(wall, 1))
        if rc == 0 and json_path.exists():
            r = json.loads(json_path.read_text())
            json_path.unlink()
            row.update(ok=True, **{k: r.get(k) for k in (
                "params", "tokens_per_step", "tgs", "tflops", "mfu", "peak_tflops", "peak_tflops_bf16",
                "mfu_datasheet", "peak_tflops_datasheet", "step_time_median", "step_time_min", "step_time_max",
                "peak_memory_bytes", "loss_first", "loss_last", "kernels", "attention", "optimizer", "device_name",
                "hf_tgs", "hf_mfu", "hf_tflops", "hf_peak_memory_bytes", "hf_step_time_median", "speedup_vs_hf",
                "hf_attention", "profile_ours", "profile_hf", "trace")})
        else:
            row.update(ok=False, error=f"exit code {rc}:\n{_tail(text, 25)}")
        rows.append(row)
        run.log(f"[bench] {name}: " + (f"TGS {row['tgs']:.0f}, MFU {100 * row['mfu']:.1f}%, "
                                        f"peak {row['peak_memory_bytes'] / 2**30:.1f} GiB"
                                        + (f", {row['speedup_vs_hf']:.2f}x HF" if row.get("speedup_vs_hf") else "")
                                        if row["ok"] else "FAILED"))
        run.save("bench", dict(rows=rows, config=args.bench_config))
    return dict(rows=rows, config=args.bench_config, ok=bool(rows) and all(r["ok"] for r in rows))


# ---- the report ----------------------------------------------------------------------------------

def _gib(n) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "-"


def markdown(results: dict) -> str:
    st = results["stages"]
    lines = [f"# GPU check, {results['date']}", ""]
    env = st.get("env")
    if env and "error" not in env:
        lines.append(f"Device: {env.get('device_name', env['device'])}; torch {env['torch']} (CUDA {env['cuda']}); "
                     f"transformers {env.get('transformers')}; flash-attn {'yes' if env['flash_attn'] else 'no'}; "
                     f"torch varlen {'yes' if env['torch_varlen'] else 'no'}; measured GEMM peak bf16 "
                     f"{env['gemm_tflops_bf16']:.1f} TFLOPS, fp32 {env['gemm_tflops_fp32']:.1f} TFLOPS.")
        lines.append("")
    att = st.get("attention")
    if att:
        lines += ["## Packed attention vs float64 per-sample reference", "",
                  f"Ignoring the document boundaries would give a relative error of "
                  f"{att.get('doc_mask_leak_error', float('nan')):.2f}.", "",
                  "| backend | dtype | plan | out | dq | dk | dv | tol | ok |", "|---|---|---|---|---|---|---|---|---|"]
        for r in att.get("rows", []):
            if "error" in r:
                lines.append(f"| {r['backend']} | {r['dtype']} | - | {r['error'][:80]} | | | | "
                             f"{r.get('tol', '')} | no |")
                continue
            lines.append(f"| {r['backend']} | {r['dtype']} | {r['plan']} | {r['err_out']:.1e} | {r['err_dq']:.1e} | "
                         f"{r['err_dk']:.1e} | {r['err_dv']:.1e} | {r['tol']:.0e} | {'yes' if r['ok'] else 'NO'} |")
        if "error" in att:
            lines.append(f"\nattention stage failed: {att['error'][:500]}")
        lines.append("")
    moe_st = st.get("moe")
    if moe_st:
        lines += ["## MoE experts: grouped GEMM vs loop (fp64 reference)", "",
                  "| dtype | kernel | shape (E, tokens, h, ffn) | max rel err | tol | fwd+bwd ms | vs loop | ok |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in moe_st.get("rows", []):
            shape = f"{r['experts']}, {r['tokens']}, {r['hidden']}, {r['ffn']}"
            if "ms" in r:
                sp = f"{r['speedup_vs_loop']:.2f}x" if "speedup_vs_loop" in r else "-"
                lines.append(f"| {r['dtype']} | {r['kernel']} | {shape} | {r['max_err']:.1e} | {r['tol']:.0e} | "
                             f"{r['ms']:.2f} | {sp} | {'yes' if r['ok'] else 'NO'} |")
            else:
                lines.append(f"| {r['dtype']} | {r['kernel']} | {shape} | "
                             f"{(r.get('skipped') or r.get('error', ''))[:80]} | | | | {'yes' if r['ok'] else 'NO'} |")
        if "error" in moe_st:
            lines.append(f"\nmoe stage failed: {moe_st['error'][:500]}")
        lines.append("")
    par = st.get("parity")
    if par:
        lines += [f"## train.py on {par.get('compared_with', '?')} vs CPU (same seed and data)", "",
                  "| dtype | steps | max rel loss diff | max rel grad-norm diff | tol | ok |",
                  "|---|---|---|---|---|---|"]
        for r in par.get("rows", []):
            if "max_rel_loss_diff" in r:
                gn = r["max_rel_grad_norm_diff"]
                lines.append(f"| {r['dtype']} | {r['steps']} | {r['max_rel_loss_diff']:.2e} | "
                             f"{gn:.2e} | {r['tol']:.0e} | {'yes' if r['ok'] else 'NO'} |" if gn is not None else
                             f"| {r['dtype']} | {r['steps']} | {r['max_rel_loss_diff']:.2e} | - | {r['tol']:.0e} | "
                             f"{'yes' if r['ok'] else 'NO'} |")
            else:
                lines.append(f"| {r['dtype']} | {r.get('steps')} | failed: {r.get('error', '')[:120]!r} | | | no |")
        if "error" in par:
            lines.append(f"\nparity stage failed: {par['error'][:500]}")
        lines.append("")
    bench = st.get("bench")
    if bench:
        lines += [f"## Throughput ({Path(bench.get('config', '')).name})", "",
                  "| run | tokens/step | TGS | TFLOPS | MFU (measured peak) | MFU (datasheet) | step s | peak mem "
                  "| HF TGS | HF MFU | HF peak mem | vs HF |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in bench.get("rows", []):
            if not r.get("ok"):
                err = r.get("error", "").strip().splitlines()
                lines.append(f"| {r['name']} | failed: {(err[-1] if err else '')[:150]} | | | | | | | | | | |")
                continue
            hf = r.get("hf_tgs") is not None
            mfu_ds = f"{100 * r['mfu_datasheet']:.1f}%" if r.get("mfu_datasheet") else "-"
            lines.append(
                f"| {r['name']} | {r['tokens_per_step']} | {r['tgs']:.0f} | {r['tflops']:.1f} | "
                f"{100 * r['mfu']:.1f}% | "
                f"{mfu_ds} | {r['step_time_median']:.3f} | {_gib(r['peak_memory_bytes'])} | "
                + (f"{r['hf_tgs']:.0f} | {100 * r['hf_mfu']:.1f}% | {_gib(r['hf_peak_memory_bytes'])} | "
                   f"{r['speedup_vs_hf']:.2f}x |" if hf else "- | - | - | - |"))
        kernels = [(r["name"], r["kernels"]) for r in bench.get("rows", []) if r.get("ok") and r.get("kernels")]
        if kernels:
            lines += ["", "Kernels:"]
            for name, k in kernels:
                lines.append(f"- {name}: " + ", ".join(f"{a}={b}" for a, b in k.items()))
        prof = next((r.get("profile_ours") for r in bench.get("rows", []) if r.get("profile_ours")), None)
        if prof:
            key = "self_device_ms" if results.get("cuda") else "self_cpu_ms"
            lines += ["", f"Top ops of one profiled step (ours, self {'CUDA' if results.get('cuda') else 'CPU'} time):",
                      ""]
            for o in prof[:12]:
                lines.append(f"- {o['name'][:70]}: {o[key]:.1f} ms ({100 * o['share']:.1f}%), {o['calls']} calls")
        lines.append("")
    verdict = {k: ("ok" if v.get("ok") else "FAILED") for k, v in st.items() if isinstance(v, dict) and "ok" in v}
    lines.append("Stages: " + ", ".join(f"{k} {v}" for k, v in verdict.items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from internlm.log import setup_logging

    setup_logging()
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    run = Run(Path(args.out).resolve(), args.budget, tiny, cuda)
    run.log(f"[gpu_check] device {device}, tiny={tiny}, budget {args.budget:.0f}s, stages {args.stages}, "
            f"results in {run.out}")
    for stage in args.stages:
        t0 = time.monotonic()
        if run.left() < 5:
            run.save(stage, dict(ok=False, error="skipped: out of time budget"))
            continue
        try:
            if stage == "env":
                value = stage_env(run, device)
                value["ok"] = True
            elif stage == "attention":
                value = check_attention(device, tiny)
                for r in value["rows"]:
                    run.log(f"[attention] {r['backend']:9s} {r['dtype']:8s} "
                            + (f"max rel err {r['max_err']:.2e} (tol {r['tol']:.0e})" if "max_err" in r
                               else r.get("error", "")) + ("" if r["ok"] else "  FAILED"))
                bad = [r for r in value["rows"] if r["backend"] == "varlen" and not r["ok"]]
                if bad:  # the default CUDA backend failed its check: measure throughput with SDPA instead
                    args.bench_overrides = ["model.attn_backend='sdpa'"]
                    run.log("[attention] torch varlen failed its check: the throughput stage uses SDPA")
            elif stage == "moe":
                value = check_moe(device, tiny)
                for r in value["rows"]:
                    run.log(f"[moe] {r['dtype']:8s} {r['kernel']:10s} "
                            + (f"max rel err {r['max_err']:.2e} (tol {r['tol']:.0e}), {r['ms']:.2f} ms" if "ms" in r
                               else r.get("skipped") or r.get("error", "")) + ("" if r["ok"] else "  FAILED"))
            elif stage == "parity":
                with tempfile.TemporaryDirectory(prefix="gpu_check_parity_") as workdir:
                    value = stage_parity(run, cuda, tiny, Path(workdir))
            else:
                value = stage_bench(run, args, tiny)
        except Exception as exc:  # noqa: BLE001 - one stage's failure must not lose the others
            import traceback

            value = dict(ok=False, error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}")
            run.log(f"[{stage}] FAILED: {value['error']}")
        value["seconds"] = round(time.monotonic() - t0, 1)
        run.save(stage, value)
    table = markdown(run.results)
    (run.out / "gpu_check.md").write_text(table)
    run.log(table)
    failed = [k for k, v in run.results["stages"].items() if not v.get("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
