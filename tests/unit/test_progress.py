"""Where a run is and how long is left: the log line's step/total and ETA, the tools' progress lines,
and tools/plot_metrics.py."""
from __future__ import annotations

import io
import json

import pytest

from internlm.cli import plot_metrics
from internlm.metrics import EtaClock, format_duration, format_log_line
from internlm.progress import PlainProgress, progress


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (42.4, "42s"), (185, "3m05s"), (7620, "2h07m"),
                                            (273600, "3d04h")])
def test_durations_read_like_a_clock(seconds, text):
    assert format_duration(seconds) == text


def test_eta_uses_recent_steps_and_leaves_out_the_first():
    clock = EtaClock(window=3)
    assert clock.update(30.0, steps_left=9) == 270.0  # only the first step so far
    assert clock.update(1.0, steps_left=8) == 8.0  # the slow (compiling) first step no longer counts
    clock.update(2.0, 7)
    clock.update(3.0, 6)
    assert clock.update(4.0, 5) == pytest.approx(5 * (2.0 + 3.0 + 4.0) / 3)  # the last 3 steps
    assert clock.update(4.0, 0) == 0.0


def test_the_log_line_starts_with_step_of_total_and_eta():
    line = format_log_line(120, {"loss": 5.21134, "total_steps": 300, "eta_s": 64.2, "tgs": 10.0})
    assert line.startswith("step=120/300 eta=1m04s loss=5.2113 ") and "total_steps" not in line


def test_plain_progress_prints_lines_not_a_bar():
    out = io.StringIO()
    items = list(progress(range(5), desc="export", unit="tensors", every=0, stream=out))
    assert items == [0, 1, 2, 3, 4]
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 6  # one per update (every=0) and the final one
    assert lines[0].startswith("[export] 1/5 tensors (20%), 0s, about ")
    assert lines[-1].startswith("[export] 5/5 tensors (100%), ") and "left" not in lines[-1]
    bar = PlainProgress(total=3 * 2**20, desc="export", unit="B", every=3600, stream=out)
    bar.update(2**20)
    bar.close()
    assert out.getvalue().splitlines()[-1].startswith("[export] 1.0 MiB/3.0 MiB (33%)")


def test_plot_metrics_draws_the_last_record_of_each_step(tmp_path):
    rows = [{"step": s, "loss": 5 - 0.1 * s, "lr": 1e-3, "tgs": 100, "mfu": 0.1, "type_loss": {"en": 5.0}}
            for s in (1, 2, 3, 2, 3, 4)]  # steps 2 and 3 again after a resume
    rows[3]["loss"] = 9.0
    rows.append({"step": 4, "loss": 4.5, "valid_loss": 4.7, "valid_type_loss": {"en": 4.7}})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = plot_metrics.read_steps(tmp_path)
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and steps[1]["loss"] == 9.0 and steps[3]["valid_loss"] == 4.7
    assert plot_metrics.main([str(tmp_path), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl: line 2 is not JSON"):
        plot_metrics.read_steps(tmp_path)
    assert plot_metrics.main([str(tmp_path / "nowhere")]) == 2
