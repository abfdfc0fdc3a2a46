"""Data checked at start (internlm/data/check.py): meta coverage, token counts and token ids, with the
file, the sample and the value in the error; and train.py refusing a bad folder before step 1."""
from __future__ import annotations

import json

import numpy as np
import pytest

from internlm.data.check import check_file, check_folder
from internlm.data.tokenized import DataFormatError, TokenizedFile, TokenizedFolder, meta_path, write_bin
from tests.helpers import TRAIN, read_metrics, run_python, write_config

VOCAB = 128


def samples(n=400, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=int(rng.integers(0, 40))).tolist() for _ in range(n)]


def written(tmp_path, tokens=None, name="en/a.bin"):
    path = tmp_path / name
    write_bin(path, samples() if tokens is None else tokens)
    return path


def test_a_good_folder_passes_with_a_summary(tmp_path):
    a = samples(400, seed=1)
    b = samples(50, seed=2)
    write_bin(tmp_path / "en" / "a.bin", a)
    write_bin(tmp_path / "code" / "b.bin", b)
    summary = check_folder(TokenizedFolder(tmp_path), VOCAB)
    assert (summary.files, summary.samples) == (2, 450)
    assert summary.tokens_per_type == {"code": sum(map(len, b)), "en": sum(map(len, a))}
    assert summary.tokens == sum(map(len, a + b))
    assert f"2 file(s), 450 samples, {summary.tokens:,} tokens (code" in summary.line()


def test_a_meta_that_lists_too_few_rows_is_refused(tmp_path):
    path = written(tmp_path)
    meta = np.load(meta_path(path))
    with open(meta_path(path), "wb") as f:
        np.save(f, meta[:10])
    with pytest.raises(DataFormatError, match=r"a.bin.meta: lists 10 samples but .*a.bin holds 400 lines"):
        check_file(TokenizedFile(path), VOCAB)


def test_a_meta_pointing_every_row_at_one_sample_is_refused(tmp_path):
    path = written(tmp_path)
    meta = np.load(meta_path(path))
    meta[:, 0] = 0
    meta[:, 1] = meta[0, 1]
    with open(meta_path(path), "wb") as f:
        np.save(f, meta)
    with pytest.raises(DataFormatError, match=r"sample 1 starts at byte offset 0, but line 1 of .* starts at \d+"):
        check_file(TokenizedFile(path), VOCAB)


def test_a_wrong_token_count_is_refused(tmp_path):
    path = written(tmp_path, [[1, 2, 3], [4, 5], [6]])
    meta = np.load(meta_path(path))
    meta[1, 1] = 7
    with open(meta_path(path), "wb") as f:
        np.save(f, meta)
    with pytest.raises(DataFormatError, match=r"sample 1 at byte offset \d+ has 2 tokens but .* says 7"):
        check_file(TokenizedFile(path), VOCAB)


@pytest.mark.parametrize("bad, words, allow_negative", [(VOCAB, f">= model.vocab_size={VOCAB}", True),
                                                        (-VOCAB, "negative", True), (-3, "negative", False)])
def test_an_out_of_range_token_names_file_sample_and_value(tmp_path, bad, words, allow_negative):
    tokens = samples(100)
    tokens[61] = [5, 6, bad, 7]
    path = written(tmp_path, tokens)
    with pytest.raises(DataFormatError, match=rf"a.bin: sample 61 \(byte offset \d+\) holds token id {bad}, {words}"):
        check_file(TokenizedFile(path), VOCAB, allow_negative=allow_negative)


def test_negative_ids_are_masks_and_pass_by_default(tmp_path):
    path = written(tmp_path, [[1, -2, 3], [-(VOCAB - 1)]])
    assert check_file(TokenizedFile(path), VOCAB) == 4
    summary = check_folder(TokenizedFolder(tmp_path), VOCAB)
    assert summary.masked == 2 and "4 tokens (en 4), 2 masked (input only)" in summary.line()
    with pytest.raises(DataFormatError, match="holds token id -128"):
        check_file(TokenizedFile(written(tmp_path, [[-VOCAB]], "x.bin")), VOCAB, allow_negative=True)


def test_lines_with_other_keys_take_the_slow_path_with_the_same_checks(tmp_path):
    path = tmp_path / "b.bin"
    lines = [json.dumps({"tokens": t, "type_id": 3}) + "\n" for t in ([1, 2], [], [3, 200])]
    path.write_text("".join(lines))
    offsets = np.cumsum([0] + [len(x) for x in lines[:-1]])
    with open(meta_path(path), "wb") as f:
        np.save(f, np.stack([offsets, [2, 0, 2]], axis=1).astype(np.int32))
    with pytest.raises(DataFormatError, match="sample 2 .* holds token id 200"):
        check_file(TokenizedFile(path), VOCAB)


def test_a_file_cut_short_is_refused(tmp_path):
    path = written(tmp_path, [[1, 2], [3, 4]])
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataFormatError, match="has no newline: the file was cut short"):
        check_file(TokenizedFile(path), VOCAB)


def test_train_py_refuses_bad_data_before_the_first_step(tmp_path):
    tokens = samples(200)
    tokens[150] = [1, 2, VOCAB + 5]
    write_bin(tmp_path / "data" / "en" / "a.bin", tokens)
    cfg = write_config(tmp_path, data=dict(train_folder=str(tmp_path / "data"), total_steps=2),
                       monitor=dict(run_folder=str(tmp_path / "run")))
    proc = run_python([TRAIN, "--config", cfg], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"holds token id {VOCAB + 5}, >= model.vocab_size={VOCAB}" in proc.stderr and "sample 150" in proc.stderr
    assert read_metrics(tmp_path / "run") == []
    ok = write_config(tmp_path, name="ok.py", data=dict(train_folder=str(tmp_path / "data"), total_steps=2,
                                                         check_data=False),
                      monitor=dict(run_folder=str(tmp_path / "run2")))
    proc = run_python([TRAIN, "--config", ok], cwd=tmp_path)  # unchecked, the bad sample is not reached in 2 steps
    assert proc.returncode == 0, proc.stderr[-2000:]
