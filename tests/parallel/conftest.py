"""Shared fixtures for the multi-process parity tests: cached single-process references and a
summary table of the measured parity printed at the end of the session."""
from __future__ import annotations

import pytest

from tests.parallel import harness

_PARITY_ROWS: list[tuple[str, str, str, str, str]] = []


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """reference(overrides) -> the single-process RunResult for those overrides, run once per session."""
    cache: dict[tuple, harness.RunResult] = {}

    def get(overrides: tuple[str, ...] = ()) -> harness.RunResult:
        key = tuple(overrides)
        if key not in cache:
            workdir = tmp_path_factory.mktemp("reference")
            cache[key] = harness.run(1, [f"data.micro_num={harness.GLOBAL_MICRO}", *key], workdir)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def parity_log():
    """parity_log(name, procs, parity, tolerance, seconds): records a row of the summary table."""

    def log(name: str, nproc: int, parity: harness.Parity, tolerance: float, seconds: float):
        _PARITY_ROWS.append((name, str(nproc), f"{parity.loss:.1e}", f"{parity.grad_norm:.1e}",
                             f"{tolerance:.0e}  {seconds:5.1f}s"))

    return log


def pytest_terminal_summary(terminalreporter):
    if not _PARITY_ROWS:
        return
    tr = terminalreporter
    tr.section("parallel parity (max relative difference vs. one process)")
    header = ("layout", "procs", "loss", "grad_norm", "tolerance  time")
    widths = [max(len(r[i]) for r in [header, *_PARITY_ROWS]) for i in range(len(header))]
    for row in [header, *_PARITY_ROWS]:
        tr.write_line("  ".join(c.ljust(w) for c, w in zip(row, widths)))
