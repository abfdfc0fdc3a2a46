"""Layout errors that depend on the world size are reported by every rank, with the config key named
and no traceback, before the ranks do any collective work that could hang."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests import launcher


@dataclass(frozen=True)
class BadLayout:
    name: str
    nproc: int
    overrides: tuple[str, ...]
    message: str  # what every rank's error line must hold

    def job(self) -> launcher.Job:
        # a short timeout: a rank stuck in a collective would show up as a timeout here
        return launcher.Job(self.name, self.nproc, (*self.overrides, "data.total_steps=2"), timeout=150.0)

    def jobs(self) -> list[launcher.Job]:
        return [self.job()]


BAD_LAYOUTS = [
    BadLayout("pp4_on_2", 2, ("parallel.pipeline.size=4",),
              "world size 2 is not divisible by parallel.tensor.size(1) * parallel.pipeline.size(4)"),
    BadLayout("tp2_on_3", 3, ("parallel.tensor.size=2",),
              "world size 3 is not divisible by parallel.tensor.size(2) * parallel.pipeline.size(1)"),
    BadLayout("zero1-2_on_dp3", 3, ("parallel.zero1.size=2",),
              "parallel.zero1.size=2 does not divide the data-parallel size 3"),
]


@pytest.mark.parametrize("bad", BAD_LAYOUTS, ids=[b.name for b in BAD_LAYOUTS])
def test_world_dependent_layout_error(bad: BadLayout, runner):
    result = runner.result(bad.job())
    out = launcher.worker_output(result)
    assert result.returncode not in (0, -9), f"expected a clean failure, got exit {result.returncode}:\n{result.tail()}"
    for rank in range(bad.nproc):
        assert f"[rank {rank}] error: {bad.message}" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "exitcode: 2" in result.stderr  # torchrun saw the config-error exit code, not a crash
    assert not result.records
