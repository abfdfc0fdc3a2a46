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
import time
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
        """The last `n` lines of the workers' output, without torchrun's own report of the failure
        (its traceback of the launcher says nothing about why a worker failed)."""
        lines = (self.stdout + "\n" + self.stderr).strip().splitlines()
        cut = next((i for i, line in enumerate(lines) if "elastic/multiprocessing/api.py" in line
                    and "failed (exitcode" in line), None)
        summary = [lines[cut]] if cut is not None else []
        if cut is not None:
            lines = lines[:cut]
        return "\n".join(lines[-n:] + summary)


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_NCCL_ASYNC_ERROR_HANDLING="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    env.pop("MASTER_ADDR", None)
    env.pop("MASTER_PORT", None)
    return env


def command(nproc: int, config: Path, overrides: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(TRAIN), "--config", str(config), *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--max_restarts", "0",
            "--monitor_interval", "0.2", str(TRAIN), "--config", str(config), *overrides]


def run(nproc: int, overrides: list[str], workdir: Path, timeout: float = 300.0, config: Path | None = None) -> RunResult:
    """Run train.py with `nproc` processes in `workdir`; returns the metrics records of the run
    (empty when the run failed). The whole process group is killed on timeout."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = config or write_config(workdir)
    run_folder = workdir / "run"
    args = command(nproc, config, [*overrides, f"monitor.run_folder={str(run_folder)!r}"])
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=workdir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session we started: torchrun and its workers
        out, err = proc.communicate()
        err += f"\n[harness] killed after {timeout:.0f}s timeout"
        return RunResult(-9, out, err, time.perf_counter() - t0)
    result = RunResult(proc.returncode, out, err, time.perf_counter() - t0)
    metrics = run_folder / "metrics.jsonl"
    if proc.returncode == 0 and metrics.exists():
        result.records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return result


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
