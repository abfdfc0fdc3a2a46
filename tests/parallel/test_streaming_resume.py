"""Streaming data through the real command: `train.py` with data.type='streaming' on raw chat + text
files, interrupted and resumed, in one process and under a different data-parallel size.

The reference trains 8 steps without stopping. A run saves at step 4 and stops; the second half resumes
from that checkpoint, once in one process (every number bitwise) and once with dp=2 (the same global
batch as micro_num=1 on two ranks: the same tokens, so the counts of processed and loss-carrying tokens
are equal exactly, the losses within the parity tolerance).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests import launcher
from tests.helpers import write_config

pytest.importorskip("datasets")

STREAM = dict(
    JOB_NAME="stream_test",
    model=dict(vocab_size=640, multiple_of=16),
    data=dict(seq_len=32, micro_num=2, micro_bsz=2, total_steps=8, type="streaming", valid_every=4,
              valid_micro_num=2),
    lr_scheduler=dict(total_steps=8, warmup_ratio=0.25, eta_min=2e-4),
    ckpt=dict(enable_save_ckpt=True, checkpoint_every=4, auto_resume=True),
    seed=11,
)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, spm_model):
    root = tmp_path_factory.mktemp("stream_e2e")
    rng = np.random.default_rng(0)
    words = "the model reads tokens and learns what comes next in a stream of text".split()
    (root / "train" / "chat").mkdir(parents=True)
    (root / "train" / "en").mkdir(parents=True)
    with open(root / "train" / "chat" / "c.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"say {i} twice"},
                                             {"role": "assistant", "content": f"{i} {i}"}]}) + "\n")
    with open(root / "train" / "en" / "t.jsonl", "w") as f:
        for _ in range(60):
            f.write(json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(3, 30))))}) + "\n")
    (root / "valid").mkdir()
    with open(root / "valid" / "v.jsonl", "w") as f:
        for _ in range(30):
            f.write(json.dumps({"text": " ".join(rng.choice(words, size=20))}) + "\n")
    data = dict(STREAM["data"], train_folder=str(root / "train"), valid_folder=str(root / "valid"),
                tokenizer_path=str(spm_model))
    config = write_config(root, "stream.py", **dict(STREAM, data=data))
    return root, config


def _train(ws, name, nproc, *overrides, ckpt=None):
    root, config = ws
    ckpt = ckpt or root / f"{name}_ckpt"
    run = launcher.run(nproc, [f"ckpt.save_ckpt_folder={str(ckpt)!r}", *overrides], root / name, 240.0,
                       config=config)
    assert run.returncode == 0, run.tail()
    return run


@pytest.fixture(scope="module")
def reference(ws):
    return _train(ws, "ref", 1)


@pytest.mark.parametrize("nproc", [1, 2])
def test_streaming_resume_matches_uninterrupted(ws, reference, nproc):
    root, _ = ws
    ckpt = root / f"resume{nproc}"
    first = _train(ws, f"first{nproc}", 1, "data.total_steps=4", ckpt=ckpt)
    extra = ["parallel.zero1.size=2", "data.micro_num=1"] if nproc == 2 else []
    second = _train(ws, f"second{nproc}", nproc, *extra, ckpt=ckpt)
    assert "resumed from" in second.out and "(step 4" in second.out
    state = json.loads((ckpt / "4" / "state.json").read_text())
    assert state["sampler"]["kind"] == "streaming"
    ref, got = reference.by_step(), {**first.by_step(), **second.by_step()}
    assert sorted(got) == list(range(1, 9))
    assert "valid_loss" in ref[4] and "valid_loss" in got[4] and "valid_loss" in got[8]
    if nproc == 1:  # (valid_micro_num is per rank: dp=2 validates on twice the rows)
        assert got[8]["valid_loss"] == ref[8]["valid_loss"]
    for step in range(1, 9):
        for key in ("num_consumed_tokens", "num_loss_tokens", "loss_tokens"):
            assert got[step][key] == ref[step][key], (step, key)
        for key in ("loss", "grad_norm"):
            a, b = ref[step][key], got[step][key]
            if nproc == 1:
                assert a == b, (step, key, a, b)
            else:
                assert abs(a - b) <= 1e-5 * abs(a), (step, key, a, b)
    # the chat prompts are masked: fewer tokens carry loss than are processed
    assert 0 < ref[8]["num_loss_tokens"] < ref[8]["num_consumed_tokens"]
