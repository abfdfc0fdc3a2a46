"""`python tools/demo.py --sft` end to end on a small budget: a 12-step demo model on a small corpus,
finetuned 80 steps on the stdlib chat task with masks, answers held-out prompts greedily well above
the majority answer's share (the full run, 200 steps from the 300-step demo, scores 99.5%:
doc/finetune.md)."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.helpers import ROOT, run_python

pytest.importorskip("datasets")

EVAL = 60


def _demo(args, cwd):
    proc = run_python([ROOT / "tools" / "demo.py", *args], cwd=cwd, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    return out


def test_sft_demo_learns_the_task(tmp_path):
    for name in ("configs", "tools", "train.py"):
        (tmp_path / name).symlink_to(ROOT / name)
    _demo(["--max_mb", "0.4", "data.total_steps=12"], tmp_path)
    out = _demo(["--sft", "--eval", str(EVAL), "data.total_steps=80", "lr_scheduler.total_steps=80"], tmp_path)
    assert "[demo-sft] the demo's checkpoint: runs/demo/ckpt/12 (step 12)" in out
    result = json.loads((tmp_path / "runs" / "demo_sft" / "sft_eval.json").read_text())
    assert result["total"] == EVAL and result["masks"] is True and result["steps"] == 80
    assert f"exact match on {EVAL} held-out prompts: {result['accuracy']:.1%}" in out
    test = [json.loads(line) for line in (tmp_path / "demo_data" / "sft" / "test.jsonl").read_text().splitlines()]
    majority = Counter(r["messages"][1]["content"] for r in test[:EVAL]).most_common(1)[0][1] / EVAL
    assert result["accuracy"] >= majority + 0.2, (result["accuracy"], majority)
    # masked: only the answers carry loss
    rows = [json.loads(line) for line in (tmp_path / "runs" / "demo_sft" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["num_loss_tokens"] < 0.4 * rows[-1]["num_consumed_tokens"]
