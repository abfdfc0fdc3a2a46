"""SFT data with loss masks (negative ids, InternEvo's convention) trains under every kind of parallelism
exactly as in one process, counts the tokens that carry loss, and validates per type under the right names.

The data: an `en/` and a `code/` folder of samples whose prompt tokens are stored negative (input, not
target); the validation folder holds only `en/` data (it was once reported as `code`).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from internlm.data.loader import build_train_loader
from internlm.data.packed import IGNORE_INDEX
from internlm.data.tokenized import TokenizedFolder, write_bin
from tests import launcher
from tests.helpers import TINY

VOCAB = TINY["model"]["vocab_size"]
TOL = 1e-4


def sft_samples(seed: int, num: int) -> list[np.ndarray]:
    """bos, a prompt of 4-30 masked tokens, an answer of 2-20 tokens that repeats a piece of the prompt
    (so it can be learnt), eos; samples longer than a row of 64 tokens cross row boundaries."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        prompt = rng.integers(3, VOCAB, size=int(rng.integers(4, 31)))
        answer = np.resize(prompt[: int(rng.integers(1, 5))], int(rng.integers(2, 21)))
        out.append(np.concatenate([[1], -prompt, answer, [2]]))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    write_bin(root / "train" / "en" / "a.bin", sft_samples(1, 300))
    write_bin(root / "train" / "code" / "b.bin", sft_samples(2, 200))
    write_bin(root / "valid" / "en" / "v.bin", sft_samples(3, 80))
    return root


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """reference, tp2, pp2 on the masked data (same global batch), two at a time."""
    common = [f"data.train_folder={str(data / 'train')!r}", f"data.valid_folder={str(data / 'valid')!r}",
              "data.valid_every=5", "data.valid_micro_num=4"]
    jobs = {"reference": (1, []),
            "tp2": (2, ["parallel.tensor.size=2", "parallel.tensor.mode='msp'"]),
            "pp2": (2, ["parallel.pipeline.size=2", "parallel.pipeline.mode='1f1b'"])}
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(launcher.run, nproc, common + extra, tmp_path_factory.mktemp(name), 300.0)
                   for name, (nproc, extra) in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def expected_loss_tokens(data, steps: int) -> list[int]:
    """Per step, the labels that are not ignored in the batches one process trains on."""
    loader = build_train_loader(TokenizedFolder(data / "train"), packed_length=TINY["data"]["seq_len"],
                                micro_num=TINY["data"]["micro_num"], micro_bsz=TINY["data"]["micro_bsz"],
                                dp_rank=0, dp_size=1, seed=TINY["seed"])
    return [int((next(loader)["labels"] != IGNORE_INDEX).sum()) for _ in range(steps)]


def test_masked_data_trains_and_counts_loss_tokens(runs, data):
    ref = runs["reference"]
    assert ref.returncode == 0, ref.tail()
    steps = launcher.STEPS
    assert len(ref.records) == steps
    tokens_per_step = TINY["data"]["micro_num"] * TINY["data"]["micro_bsz"] * TINY["data"]["seq_len"]
    got = [r["loss_tokens"] for r in ref.records]
    assert got == expected_loss_tokens(data, steps)
    assert all(0 < n < tokens_per_step // 2 for n in got)  # most tokens are prompts: no loss on them
    assert ref.records[-1]["num_loss_tokens"] == sum(got)
    assert ref.records[-1]["num_consumed_tokens"] == steps * tokens_per_step  # TGS still counts all tokens
    assert "masked (input only)" in ref.out  # the data check's summary
    assert f"loss_tokens={sum(got)}" in ref.out  # the log line: the running total, once per line
    assert all(line.count("loss_tokens=") == 1 for line in ref.out.splitlines() if "step=" in line)
    losses = [r["loss"] for r in ref.records]
    assert losses[-1] < losses[0]


def test_validation_types_keep_their_names(runs):
    ref = runs["reference"]
    valid = [r for r in ref.records if "valid_loss" in r]
    assert [r["step"] for r in valid] == [5, 10]
    for r in valid:
        assert set(r["valid_type_loss"]) == {"en"}, r["valid_type_loss"]  # not "code": the folder has no code
        assert r["valid_type_loss"]["en"] == pytest.approx(r["valid_loss"], rel=0.2)
    assert set(ref.records[0]["type_loss"]) == {"en", "code"}


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_masked_parity(runs, layout):
    parity = launcher.compare(runs["reference"], runs[layout], launcher.STEPS)
    assert parity.loss <= TOL and parity.grad_norm <= TOL, parity
    ref, got = runs["reference"].records, runs[layout].records
    assert [r["loss_tokens"] for r in got] == [r["loss_tokens"] for r in ref]
    for a, b in zip(ref, got):
        if "valid_loss" in a:
            assert b["valid_loss"] == pytest.approx(a["valid_loss"], rel=TOL)
