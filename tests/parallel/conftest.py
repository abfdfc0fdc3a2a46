"""Fixtures of the multi-process tests: one runner that starts every selected run up front (cached,
so each single-process reference runs once per session), and the parity table printed at the end."""
from __future__ import annotations

import os

import pytest

from tests.parallel import harness

_PARITY_ROWS: list[tuple[str, ...]] = []


@pytest.fixture(scope="session")
def runner(request, tmp_path_factory):
    """A harness.Runner already working through the runs of every selected test: a test's parameter
    that has a `jobs()` method names the runs it needs (its reference first). Runs with more
    processes start first so that the longest one does not come last.
    PARALLEL_TEST_JOBS sets how many runs go side by side (default 2)."""
    r = harness.Runner(tmp_path_factory, int(os.environ.get("PARALLEL_TEST_JOBS", "2")))
    wanted: list[harness.Job] = []
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        for value in (spec.params.values() if spec else ()):
            if hasattr(value, "jobs"):
                wanted += [j for j in value.jobs() if j not in wanted]
    references = [j for j in wanted if j.nproc == 1]
    others = sorted((j for j in wanted if j.nproc > 1), key=lambda j: -j.nproc)
    for job in references + others:
        r.submit(job)
    yield r
    r.close()


@pytest.fixture(scope="session")
def parity_log():
    """parity_log(name, nproc, parity, tolerance, outcome): one row of the summary table."""

    def log(name: str, nproc: int, parity: harness.Parity, tolerance: float, outcome: str):
        _PARITY_ROWS.append((name, str(nproc), f"{parity.loss:.1e}", f"{parity.grad_norm:.1e}",
                             f"{tolerance:.0e}", outcome))

    return log


def pytest_terminal_summary(terminalreporter):
    if not _PARITY_ROWS:
        return
    tr = terminalreporter
    tr.section("parallel parity: max relative difference vs. one process")
    header = ("layout", "procs", "loss", "grad_norm", "tol", "")
    widths = [max(len(r[i]) for r in [header, *_PARITY_ROWS]) for i in range(len(header))]
    for row in [header, *_PARITY_ROWS]:
        tr.write_line("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
