"""The .bin/.bin.meta format, its error messages, and tools/tokenizer.py + tools/train_tokenizer.py
(the `spm_model` fixture of tests/conftest.py is trained through the latter)."""

import copy
import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from internlm.data.tokenized import DataFormatError, TokenizedFile, TokenizedFolder, write_bin
from tests.helpers import ROOT, run_python

TOOLS = ROOT / "tools"


def _load_tool(name):
    return importlib.import_module(f"internlm.cli.{name}")


tokenizer_tool = _load_tool("tokenizer")

SAMPLES = [[1, 2, 3], [], [70000, 5], list(range(100)), [2**31 - 1, 0]]


def test_write_bin_round_trip(tmp_path):
    path = tmp_path / "a.bin"
    assert write_bin(path, [np.asarray(s, dtype=np.int64) for s in SAMPLES]) == len(SAMPLES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.bin.meta"]  # no temp files left

    with open(path.with_name("a.bin.meta"), "rb") as f:
        meta = np.load(f, allow_pickle=False)
    assert meta.dtype == np.int32 and meta.shape == (len(SAMPLES), 2)
    raw = path.read_bytes()
    for (offset, count), sample in zip(meta, SAMPLES):
        line = raw[offset : raw.index(b"\n", offset)]
        assert json.loads(line) == {"tokens": sample} and count == len(sample)

    data = TokenizedFile(path)
    assert len(data) == len(SAMPLES)
    assert data.lengths.tolist() == [len(s) for s in SAMPLES]
    for i, sample in enumerate(SAMPLES):
        got = data[i]
        assert got.dtype == np.int64 and got.tolist() == sample
    assert data[-1].tolist() == SAMPLES[-1]
    with pytest.raises(IndexError):
        data[len(SAMPLES)]

    clone = copy.deepcopy(data)  # goes through __getstate__: the open mmap is dropped, reopened lazily
    assert clone._mm is None and clone[3].tolist() == SAMPLES[3]


def test_reads_internevo_style_lines(tmp_path):
    """InternEvo writes `json.dumps` lines (with spaces) and sometimes a type_id; both read fine."""
    path = tmp_path / "x.bin"
    lines = [json.dumps({"tokens": [5, 6, 7], "type_id": 2}) + "\n", json.dumps({"tokens": [8]}) + "\n"]
    path.write_text("".join(lines))
    with open(str(path) + ".meta", "wb") as f:
        np.save(f, np.array([[0, 3], [len(lines[0]), 1]], dtype=np.int32))
    data = TokenizedFile(path)
    assert [data[0].tolist(), data[1].tolist()] == [[5, 6, 7], [8]]


def _write_meta(path, array):
    with open(str(path) + ".meta", "wb") as f:
        np.save(f, array)


@pytest.fixture
def good_bin(tmp_path):
    path = tmp_path / "good.bin"
    write_bin(path, [[1, 2, 3], [4, 5]])
    return path


def test_error_missing_meta(tmp_path):
    path = tmp_path / "nometa.bin"
    path.write_text('{"tokens":[1]}\n')
    with pytest.raises(DataFormatError, match=r"nometa\.bin.*meta.*not found"):
        TokenizedFile(path)


def test_error_missing_bin(tmp_path):
    with pytest.raises(DataFormatError, match=r"absent\.bin"):
        TokenizedFile(tmp_path / "absent.bin")


@pytest.mark.parametrize(
    "meta, pattern",
    [
        (np.zeros((2, 3), dtype=np.int32), r"\(N, 2\).*shape \(2, 3\)"),
        (np.zeros(4, dtype=np.int32), r"\(N, 2\).*shape \(4,\)"),
        (np.zeros((2, 2), dtype=np.float32), r"integer array.*float32"),
    ],
)
def test_error_bad_meta_array(good_bin, meta, pattern):
    _write_meta(good_bin, meta)
    with pytest.raises(DataFormatError, match=pattern) as err:
        TokenizedFile(good_bin)
    assert "good.bin.meta" in str(err.value)


def test_error_meta_not_npy(good_bin):
    Path(str(good_bin) + ".meta").write_bytes(b"this is not numpy")
    with pytest.raises(DataFormatError, match=r"good\.bin\.meta.*not a readable \.npy"):
        TokenizedFile(good_bin)


def test_error_offset_beyond_file(good_bin):
    size = good_bin.stat().st_size
    _write_meta(good_bin, np.array([[0, 3], [size + 10, 2]], dtype=np.int32))
    with pytest.raises(DataFormatError, match=rf"sample 1 has byte offset {size + 10} outside .*good\.bin"):
        TokenizedFile(good_bin)


def test_error_invalid_json(good_bin):
    _write_meta(good_bin, np.array([[0, 3], [3, 2]], dtype=np.int32))  # offset 3 is mid-line
    data = TokenizedFile(good_bin)
    assert data[0].tolist() == [1, 2, 3]
    with pytest.raises(DataFormatError, match=r"good\.bin: sample 1 at byte offset 3 is not valid JSON"):
        data[1]


def test_error_no_tokens_key(tmp_path):
    path = tmp_path / "notokens.bin"
    path.write_text('{"tokens":[1]}\n{"ids":[1,2]}\n')
    _write_meta(path, np.array([[0, 1], [15, 2]], dtype=np.int32))
    data = TokenizedFile(path)
    with pytest.raises(DataFormatError, match=r'notokens\.bin: sample 1 at byte offset 15 has no "tokens"'):
        data[1]


def test_error_count_mismatch(good_bin):
    second = len('{"tokens":[1,2,3]}\n')
    _write_meta(good_bin, np.array([[0, 3], [second, 7]], dtype=np.int32))
    data = TokenizedFile(good_bin)
    pattern = rf"good\.bin: sample 1 at byte offset {second} has 2 tokens but the meta file says 7"
    with pytest.raises(DataFormatError, match=pattern):
        data[1]


def test_folder_types_and_order(tmp_path):
    write_bin(tmp_path / "en" / "a.bin", [[1], [2, 2]])
    write_bin(tmp_path / "code" / "x" / "b.bin", [[3, 3, 3]])
    write_bin(tmp_path / "top.bin", [[4, 4, 4, 4]])
    (tmp_path / "en" / "notes.txt").write_text("ignored")

    folder = TokenizedFolder(tmp_path)
    assert folder.type_names == ["code", "default", "en"]
    assert len(folder) == 4
    # files sorted by relative path: code/x/b.bin, en/a.bin, top.bin
    items = [(t.tolist(), type_id) for t, type_id in (folder[i] for i in range(len(folder)))]
    assert items == [([3, 3, 3], 0), ([1], 2), ([2, 2], 2), ([4, 4, 4, 4], 1)]
    assert folder.lengths.tolist() == [3, 1, 2, 4]
    assert folder.type_ids.tolist() == [0, 2, 2, 1]
    assert folder[-1][0].tolist() == [4, 4, 4, 4]

    pinned = TokenizedFolder(tmp_path / "en", type_names=["default", "en", "zh"])
    assert pinned[0][1] == 0  # files directly in the root are "default"
    with pytest.raises(DataFormatError, match="not among the types"):
        TokenizedFolder(tmp_path, type_names=["en"])


def test_folder_errors(tmp_path):
    with pytest.raises(DataFormatError, match=r"nowhere: data folder not found"):
        TokenizedFolder(tmp_path / "nowhere")
    (tmp_path / "empty" / "en").mkdir(parents=True)
    with pytest.raises(DataFormatError, match=r"empty: no \.bin files"):
        TokenizedFolder(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------
# tools/train_tokenizer.py and tools/tokenizer.py

TEXTS = [
    "Return the sum of a and b.",
    "def add(a, b):\n    return a + b\n",
    "\tindented with a tab   and runs   of spaces",
    "    starts with spaces",
    "unicode: café, naïve, 中文, emoji 😀 and digits 31415",
]


def _expected(sp, texts):
    return [[sp.bos_id(), *sp.encode(t), sp.eos_id()] for t in texts]


def test_tokenizer_cli_txt(tmp_path, spm_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    txt = tmp_path / "in.txt"
    txt.write_text("first line\n\nsecond   line\twith tab\n   third\n", encoding="utf-8")
    out = tmp_path / "out" / "en" / "in.bin"
    proc = run_python([TOOLS / "tokenizer.py", "--text_input_path", txt, "--bin_output_path", out,
                       "--tokenizer_path", spm_model], timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = TokenizedFile(out)
    lines = ["first line", "second   line\twith tab", "   third"]  # blank line skipped
    assert [data[i].tolist() for i in range(len(data))] == _expected(sp, lines)
    assert [sp.decode(data[i].tolist()[1:-1]) for i in range(len(data))] == lines


def test_tokenize_file_jsonl_json_and_workers(tmp_path, spm_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    texts = TEXTS * 120  # several batches, so the pool really splits the work
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps({"content": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    one = tmp_path / "w1.bin"
    two = tmp_path / "w2.bin"
    assert tokenizer_tool.tokenize_file(jsonl, one, spm_model, workers=1, text_key="content") == len(texts)
    assert tokenizer_tool.tokenize_file(jsonl, two, spm_model, workers=2, text_key="content") == len(texts)
    assert one.read_bytes() == two.read_bytes()
    assert Path(str(one) + ".meta").read_bytes() == Path(str(two) + ".meta").read_bytes()
    data = TokenizedFile(one)
    assert [data[i].tolist() for i in range(len(data))] == _expected(sp, texts)

    as_json = tmp_path / "in.json"
    as_json.write_text(json.dumps([{"text": TEXTS[0]}, TEXTS[1]]))
    n = tokenizer_tool.tokenize_file(as_json, tmp_path / "j.bin", spm_model, add_bos=False)
    data = TokenizedFile(tmp_path / "j.bin")
    assert n == 2 and data[1].tolist() == sp.encode(TEXTS[1]) + [sp.eos_id()]


def test_tokenizer_cli_errors(tmp_path, spm_model):
    def run(*args):
        return run_python([TOOLS / "tokenizer.py", *args], timeout=120)

    proc = run("--text_input_path", str(tmp_path / "missing.txt"), "--bin_output_path", str(tmp_path / "o.bin"),
               "--tokenizer_path", str(spm_model))
    assert proc.returncode == 2 and "missing.txt" in proc.stderr and "Traceback" not in proc.stderr

    txt = tmp_path / "in.txt"
    txt.write_text("hello\n")
    proc = run("--text_input_path", str(txt), "--bin_output_path", str(tmp_path / "o.bin"),
               "--tokenizer_path", str(tmp_path / "nope.model"))
    assert proc.returncode == 2 and "nope.model" in proc.stderr and "Traceback" not in proc.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"other": 1}\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl: line 2 has no 'text' key"):
        tokenizer_tool.tokenize_file(bad, tmp_path / "o.bin", spm_model)
    assert not (tmp_path / "o.bin").exists()  # nothing half-written
