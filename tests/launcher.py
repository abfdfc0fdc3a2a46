"""The one launcher of training runs in the tests: `train.py` (or any script) single-process or under
torchrun, in a work folder of its own, and the comparison of the per-step metrics of two runs.

Every parity run trains the tiny model of tests/helpers.py on the same deterministic dummy data
(``data.train_folder=None``) with the same seed, so any parallel layout must reproduce the
single-process losses and gradient norms. The global batch is ``dp * data.micro_num`` micro-batches;
callers keep it constant by giving each layout ``micro_num = GLOBAL_MICRO // dp``.

A run's output goes to files in its work folder (stdout.log, stderr.log), never to a pipe nobody
reads, so a long run that is polled (`start`) cannot block on a full pipe.
"""
from __future__ import annotations

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

from tests.helpers import TRAIN, clean_env, read_metrics, write_config

GLOBAL_MICRO = 4  # micro-batches per optimizer step, summed over data-parallel ranks
STEPS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(nproc: int, script: Path, args: list[str]) -> list[str]:
    """`python script args`, or the same under torchrun with `nproc` workers on this machine."""
    if nproc == 1:
        return [sys.executable, str(script), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--max_restarts", "0",
            "--monitor_interval", "0.2", str(script), *args]


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    records: list = field(default_factory=list)  # metrics.jsonl of the run ([] when there is none)
    run_folder: Path | None = None

    @property
    def out(self) -> str:
        return self.stdout + "\n" + self.stderr

    def by_step(self) -> dict:
        return {r["step"]: r for r in self.records}

    def tail(self, n: int = 40) -> str:
        """The last `n` lines of the workers' output, then torchrun's one-line verdict (its own
        traceback of the launcher says nothing about why a worker failed)."""
        lines = self.out.strip().splitlines()
        cut = _torchrun_report_start(lines)
        return "\n".join(lines[:cut][-n:] + lines[cut:cut + 1])


def _torchrun_report_start(lines: list[str]) -> int:
    """Index of the line where torchrun starts reporting a failed worker (len(lines) if none)."""
    return next((i for i, line in enumerate(lines) if "elastic/multiprocessing/api.py" in line
                 and "failed (exitcode" in line), len(lines))


def worker_output(result: RunResult) -> str:
    """stdout + stderr of the training processes, without torchrun's own failure report (which
    always holds a Python traceback of the launcher)."""
    lines = result.out.splitlines()
    return "\n".join(lines[:_torchrun_report_start(lines)])


# ---------------------------------------------------------------------------------------------------
# processes

def _children_map() -> dict[int, list[int]]:
    """parent pid -> child pids, from Linux /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    return children


def _descendants(pid: int) -> list[int]:
    """Process ids below `pid`. torchrun starts each worker in a session of its own, so killing
    torchrun's process group alone would leave the workers running."""
    children = _children_map()
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def _kill_tree(proc: subprocess.Popen):
    """SIGKILL a run: its own process group (torchrun or the single process) and every process below it."""
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
        _kill_tree(proc)


class Started:
    """A run in progress: poll it, signal it, read its metrics as they come, then `wait` for it."""

    def __init__(self, args: list[str], workdir: Path, run_folder: Path | None, env: dict):
        self.workdir, self.run_folder = workdir, run_folder
        self._stdout, self._stderr = workdir / "stdout.log", workdir / "stderr.log"
        self.t0 = time.perf_counter()
        with open(self._stdout, "w") as out, open(self._stderr, "w") as err:
            self.proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        with _LIVE_LOCK:
            _LIVE.add(self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def send_signal(self, sig: int):
        self.proc.send_signal(sig)

    def children(self) -> list[int]:
        """The direct children of the started process (torchrun's workers)."""
        return sorted(_children_map().get(self.proc.pid, []))

    def records(self) -> list[dict]:
        """The metrics logged so far."""
        return read_metrics(self.run_folder) if self.run_folder else []

    def output(self) -> str:
        """stdout + stderr so far."""
        return self._stdout.read_text(errors="replace") + "\n" + self._stderr.read_text(errors="replace")

    def kill(self):
        """SIGKILL the run and everything below it (no chance to clean up), and reap it."""
        _kill_tree(self.proc)
        self.proc.wait()
        self._forget()

    def wait(self, timeout: float = 300.0) -> RunResult:
        """Wait for the end of the run; on timeout it is killed and the result has returncode -9."""
        note = ""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(self.proc)
            self.proc.wait()
            note = f"\n[launcher] killed after {timeout:.0f}s timeout"
        finally:
            self._forget()
        return RunResult(-9 if note else self.proc.returncode, self._stdout.read_text(errors="replace"),
                         self._stderr.read_text(errors="replace") + note, time.perf_counter() - self.t0,
                         self.records(), self.run_folder)

    def _forget(self):
        with _LIVE_LOCK:
            _LIVE.discard(self.proc)


def start_script(nproc: int, script: Path, args: list[str], workdir: Path, env: dict | None = None,
                 run_folder: Path | None = None) -> Started:
    """Start `script args` with `nproc` processes (torchrun when more than one) in `workdir`, with
    helpers.clean_env() updated by `env`."""
    workdir.mkdir(parents=True, exist_ok=True)
    return Started(command(nproc, script, args), workdir, run_folder, clean_env(**(env or {})))


def start(nproc: int, overrides: list[str], workdir: Path, config: Path | None = None,
          env: dict | None = None) -> Started:
    """Start train.py with `nproc` processes in `workdir` on `config` (default: the tiny config,
    written there) with config `overrides`; its run folder is workdir/run."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = config or write_config(workdir)
    run_folder = workdir / "run"
    args = ["--config", str(config), *overrides, f"monitor.run_folder={str(run_folder)!r}"]
    return start_script(nproc, TRAIN, args, workdir, env, run_folder)


def run(nproc: int, overrides: list[str], workdir: Path, timeout: float = 300.0, config: Path | None = None,
        env: dict | None = None) -> RunResult:
    """`start` and wait: the run's exit code, output and metrics records. On timeout torchrun and
    its workers are killed."""
    return start(nproc, overrides, workdir, config, env).wait(timeout)


# ---------------------------------------------------------------------------------------------------
# the session's runs, started ahead of time

@dataclass(frozen=True)
class Job:
    """One train.py run on the tiny config: the unit the session runner starts ahead of time and caches."""
    name: str
    nproc: int
    overrides: tuple[str, ...]
    timeout: float = 300.0


@dataclass(frozen=True)
class ProbeLayout:
    """A layout run for two steps with one of train.py's measuring flags (--count-comm, --track-memory):
    a test parameter whose run the session runner starts ahead of time."""
    flag: str
    name: str
    nproc: int
    overrides: tuple[str, ...]

    def job(self) -> Job:
        return Job(f"{self.flag.strip('-')}_{self.name}", self.nproc,
                   (self.flag, "data.total_steps=2", *self.overrides), timeout=240.0)

    def jobs(self) -> list[Job]:
        return [self.job()]

    def config_overrides(self) -> list[str]:
        return [o for o in self.job().overrides if not o.startswith("--")]


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


# ---------------------------------------------------------------------------------------------------
# parity

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
