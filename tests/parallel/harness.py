"""Run `train.py` on a tiny model, single-process or under torchrun, and compare the per-step metrics.

Every run trains the same tiny model on the same deterministic dummy data (``data.train_folder=None``)
with the same seed, so any parallel layout must reproduce the single-process losses and gradient
norms. The global batch is ``dp * data.micro_num`` micro-batches; callers keep it constant by giving
each layout ``micro_num = GLOBAL_MICRO // dp``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "train.py"

GLOBAL_MICRO = 4  # micro-batches per optimizer step, summed over data-parallel ranks
STEPS = 10

# A small model that still has every structural feature the layouts split: GQA (4 heads, 2 kv heads,
# both divisible by tp=2), 4 layers (pp=2 x num_chunks=2 stages of one layer), vocab 128 (tp-divisible).
TINY_CONFIG = """\
JOB_NAME = "parity"
model_type = "INTERNLM2_PUBLIC"
model = dict(num_attention_heads=4, num_kv_attention_heads=2, hidden_size=64, num_layers=4, vocab_size=128,
             mlp_ratio=8 / 3, multiple_of=32, dtype="torch.float32", max_position_embeddings=256,
             num_chunks=1, checkpoint=False)
data = dict(seq_len=64, micro_num=4, micro_bsz=2, total_steps=10, train_folder=None, valid_folder=None,
            valid_every=0, dummy_num_samples=400)
hybrid_zero_optimizer = dict(clip_grad_norm=1.0)
adam = dict(lr=1e-3, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.01)
lr_scheduler = dict(total_steps=10, warmup_ratio=0.2, eta_min=1e-4)  # fixed: a shorter run is a prefix
parallel = dict(zero1=dict(size=-1), tensor=dict(size=1, mode="mtp"), pipeline=dict(size=1),
                collective_timeout_s=120)
monitor = dict(log_every=1, peak_tflops=1.0)
seed = 20240
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.py"
    path.write_text(TINY_CONFIG)
    return path


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    records: list = field(default_factory=list)

    def tail(self, n: int = 40) -> str:
        """The last `n` lines of the workers' output, then torchrun's one-line verdict (its own
        traceback of the launcher says nothing about why a worker failed)."""
        lines = (self.stdout + "\n" + self.stderr).strip().splitlines()
        cut = _torchrun_report_start(lines)
        return "\n".join(lines[:cut][-n:] + lines[cut:cut + 1])


def _torchrun_report_start(lines: list[str]) -> int:
    """Index of the line where torchrun starts reporting a failed worker (len(lines) if none)."""
    return next((i for i, line in enumerate(lines) if "elastic/multiprocessing/api.py" in line
                 and "failed (exitcode" in line), len(lines))


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # not a worker of ours
        env.pop(key, None)
    return env


def command(nproc: int, config: Path, overrides: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(TRAIN), "--config", str(config), *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--max_restarts", "0",
            "--monitor_interval", "0.2", str(TRAIN), "--config", str(config), *overrides]


_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def _descendants(pid: int) -> list[int]:
    """Process ids below `pid` (Linux /proc). torchrun starts each worker in a session of its own,
    so killing torchrun's process group alone would leave the workers running."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _kill_run(proc: subprocess.Popen):
    """Kill a run this harness started: its own process group (torchrun) and every process below it."""
    workers = _descendants(proc.pid) if os.path.isdir("/proc") else []
    for kill, target in [(os.killpg, proc.pid), *((os.kill, pid) for pid in workers)]:
        try:
            kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def kill_live():
    """Kill the runs still going (the session is ending early)."""
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        _kill_run(proc)


def run(nproc: int, overrides: list[str], workdir: Path, timeout: float = 300.0,
        config: Path | None = None) -> RunResult:
    """Run train.py with `nproc` processes in `workdir`; returns the metrics records of the run
    (empty when the run failed). On timeout torchrun and its workers are killed."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = config or write_config(workdir)
    run_folder = workdir / "run"
    args = command(nproc, config, [*overrides, f"monitor.run_folder={str(run_folder)!r}"])
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=workdir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    with _LIVE_LOCK:
        _LIVE.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_run(proc)
        out, err = proc.communicate()
        err += f"\n[harness] killed after {timeout:.0f}s timeout"
        return RunResult(-9, out, err, time.perf_counter() - t0)
    finally:
        with _LIVE_LOCK:
            _LIVE.discard(proc)
    result = RunResult(proc.returncode, out, err, time.perf_counter() - t0)
    metrics = run_folder / "metrics.jsonl"
    if proc.returncode == 0 and metrics.exists():
        result.records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return result


@dataclass(frozen=True)
class Job:
    """One train.py run: the unit the session runner starts ahead of time and caches."""
    name: str
    nproc: int
    overrides: tuple[str, ...]
    timeout: float = 300.0


class Runner:
    """Runs Jobs `workers` at a time in the background, each once per session.

    The machine these tests are written for has 2 cores, and a 2-process gloo run leaves them
    partly idle (start-up, rendezvous, waits in collectives), so two runs side by side finish
    sooner than one after the other; the numbers compared do not depend on timing."""

    def __init__(self, tmp_path_factory, workers: int):
        self.tmp = tmp_path_factory
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="train-run")
        self.futures: dict[Job, Future] = {}

    def submit(self, job: Job) -> Future:
        if job not in self.futures:
            workdir = self.tmp.mktemp(job.name)  # in the calling thread: mktemp is not thread-safe
            self.futures[job] = self.pool.submit(run, job.nproc, list(job.overrides), workdir, job.timeout)
        return self.futures[job]

    def result(self, job: Job) -> RunResult:
        return self.submit(job).result()

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
        kill_live()


def worker_output(result: RunResult) -> str:
    """stdout + stderr of the training processes, without torchrun's own failure report (which
    always holds a Python traceback of the launcher)."""
    lines = (result.stdout + "\n" + result.stderr).splitlines()
    return "\n".join(lines[:_torchrun_report_start(lines)])


def max_rel_diff(ref: list[float], got: list[float]) -> float:
    out = 0.0
    for a, b in zip(ref, got):
        if a is None or b is None:
            return float("inf")
        out = max(out, abs(a - b) / max(abs(a), 1e-12))
    return out


@dataclass
class Parity:
    loss: float
    grad_norm: float
    steps: int

    def __str__(self) -> str:
        return f"loss {self.loss:.1e}, grad_norm {self.grad_norm:.1e} over {self.steps} steps"


def compare(ref: RunResult, got: RunResult, steps: int) -> Parity:
    """Max relative difference of loss and grad_norm over the first `steps` steps. Fails the test
    (with the run's output tail) when a run did not finish or did not log every step."""
    assert ref.returncode == 0 and len(ref.records) >= steps, \
        f"reference run failed (exit {ref.returncode}):\n{ref.tail()}"
    assert got.returncode == 0, f"parallel run failed (exit {got.returncode}):\n{got.tail()}"
    assert len(got.records) == steps, f"expected {steps} metrics records, got {len(got.records)}:\n{got.tail()}"
    r, g = ref.records[:steps], got.records[:steps]
    assert [x["step"] for x in g] == list(range(1, steps + 1))
    # the LR schedule does not depend on the layout at all: it must match exactly
    assert [x["lr"] for x in g] == [x["lr"] for x in r]
    assert all(x["stepped"] for x in g)
    return Parity(loss=max_rel_diff([x["loss"] for x in r], [x["loss"] for x in g]),
                  grad_norm=max_rel_diff([x["grad_norm"] for x in r], [x["grad_norm"] for x in g]),
                  steps=steps)
