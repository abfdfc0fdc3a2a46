"""Progress of long tools: a tqdm bar on a terminal, plain lines in logs (CI, nohup, slurm output).

    for item in progress(items, desc="export", total=n, unit="tensors"):
        ...
    with progress_bar(total=nbytes, desc="export", unit="B") as bar:
        bar.update(k)

Without a terminal a bar's carriage returns make a log unreadable, so instead one line is printed at
most every `every` seconds and at the end: `[export] 40/120 tensors (33%), 12s, about 24s left`.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager

from internlm.metrics import format_duration


def _human(n: float, unit: str) -> str:
    if unit != "B":
        return f"{int(n):,}"
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or suffix == "TiB":
            return f"{n:.1f} {suffix}" if suffix != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n}"


class PlainProgress:
    """tqdm's update/close interface, printing a line at most every `every` seconds."""

    def __init__(self, total: float | None, desc: str, unit: str, every: float = 10.0, stream=None):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = stream or sys.stderr
        self.n, self.t0 = 0, time.monotonic()
        self._last = self.t0

    def _line(self) -> str:
        elapsed = time.monotonic() - self.t0
        unit = "" if self.unit == "B" else f" {self.unit}"
        if self.total:
            done = self.n / self.total
            left = elapsed / done * (1 - done) if done > 0 else 0
            return (f"[{self.desc}] {_human(self.n, self.unit)}/{_human(self.total, self.unit)}{unit} "
                    f"({100 * done:.0f}%), {format_duration(elapsed)}"
                    + (f", about {format_duration(left)} left" if done < 1 else ""))
        return f"[{self.desc}] {_human(self.n, self.unit)}{unit}, {format_duration(elapsed)}"

    def update(self, k: float = 1) -> None:
        self.n += k
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            print(self._line(), file=self.stream, flush=True)

    def close(self) -> None:
        print(self._line(), file=self.stream, flush=True)


def _on_terminal(stream) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


@contextmanager
def progress_bar(total: float | None, desc: str, unit: str = "it", every: float = 10.0, stream=None):
    stream = stream or sys.stderr
    if _on_terminal(stream):
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", mininterval=0.5, file=stream)
    else:
        bar = PlainProgress(total, desc, unit, every, stream)
    try:
        yield bar
    finally:
        bar.close()


def progress(iterable, desc: str, total: float | None = None, unit: str = "it", every: float = 10.0, stream=None):
    """Iterate `iterable`, showing progress (see the module docstring)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with progress_bar(total, desc, unit, every, stream) as bar:
        for item in iterable:
            yield item
            bar.update(1)
