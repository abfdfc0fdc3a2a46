"""`train.py --profiling` (InternEvo's flag): a torch.profiler trace of a few training steps.

Every rank profiles itself: the first step after the profiler starts is skipped (it compiles and warms
up), the next one warms the profiler up, and the three after it are recorded, with shapes and memory.
The trace is written as Chrome trace JSON (open it in chrome://tracing or https://ui.perfetto.dev) to
`<run_folder>/profile/trace_rank<R>_steps<A>-<B>.json`. On CUDA the allocator's history is recorded
over the same steps and dumped as `<run_folder>/profile/memory_snapshot_rank<R>.pickle` (drag it
into https://pytorch.org/memory_viz). A run shorter than the window is traced as far as it goes.
"""
from __future__ import annotations

from pathlib import Path

import torch

from internlm.log import logger

WAIT, WARMUP, ACTIVE = 1, 1, 3


class StepProfiler:
    def __init__(self, run_folder, rank: int, device: torch.device, first_step: int = 0):
        self.folder = Path(run_folder) / "profile"
        self.rank, self.device = rank, device
        self.first_step = first_step  # the trainer's step count when the profiler starts
        self.last_step = first_step
        self.trace_path: Path | None = None
        self.snapshot_path: Path | None = None
        self._cuda = device.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self._cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(
            activities=activities, record_shapes=True, profile_memory=True,
            schedule=torch.profiler.schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE, repeat=1),
            on_trace_ready=self._write)
        self._running = False

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._cuda:
            try:
                torch.cuda.memory._record_memory_history(max_entries=100_000)
            except Exception as exc:  # noqa: BLE001 - a missing snapshot must not stop training
                logger.warning(f"--profiling: no CUDA memory snapshot ({exc})")
                self._cuda = False
        self._prof.start()
        self._running = True

    def after_step(self, step: int, metrics: dict | None = None) -> None:
        """A trainer step hook."""
        if self._running:
            self.last_step = step
            self._prof.step()

    def stop(self) -> None:
        """End profiling (writes the trace of a run that ended inside the window)."""
        if self._running:
            self._running = False
            self._prof.stop()
        self._dump_snapshot()

    def _write(self, prof) -> None:
        first = self.first_step + WAIT + WARMUP + 1
        self.trace_path = self.folder / f"trace_rank{self.rank}_steps{first}-{max(first, self.last_step)}.json"
        prof.export_chrome_trace(str(self.trace_path))
        logger.info(f"--profiling: trace of steps {first}-{max(first, self.last_step)} written to {self.trace_path}")
        self._dump_snapshot()

    def _dump_snapshot(self) -> None:
        if not self._cuda or self.snapshot_path is not None:
            return
        self.snapshot_path = self.folder / f"memory_snapshot_rank{self.rank}.pickle"
        try:
            torch.cuda.memory._dump_snapshot(str(self.snapshot_path))
            torch.cuda.memory._record_memory_history(enabled=None)
            logger.info(f"--profiling: CUDA memory snapshot written to {self.snapshot_path}")
        except Exception as exc:  # noqa: BLE001
            logger.warning(f"--profiling: could not write the CUDA memory snapshot ({exc})")
