"""Streaming data (data.type='streaming'): raw files read with Hugging Face datasets, tokenized on the
fly, packed exactly as the same data pre-tokenized into .bin files, resumable at any step under any
data-parallel size."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("datasets")

from internlm.data.loader import BATCH_KEYS, build_train_loader  # noqa: E402
from internlm.data.packed import IGNORE_INDEX  # noqa: E402
from internlm.data.stream_loader import StreamingLoader, read_corpus  # noqa: E402
from internlm.data.streaming import StreamingCorpus  # noqa: E402
from internlm.data.text import encode_records, iter_records  # noqa: E402
from internlm.data.tokenized import DataFormatError, TokenizedFolder, write_bin  # noqa: E402

SEQ = 32


def _texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "print", "the", "a", "model", "token"]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(n)]


def _chats(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"what is {i} plus {int(rng.integers(100))}?"},
                {"role": "assistant", "content": f"it is {i * 3} or so"}]
        if i % 3 == 0:
            msgs.insert(0, {"role": "system", "content": "be brief"})
        out.append({"messages": msgs})
    return out


def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """en/ (text, two files) and chat/ (conversations, masked): 3 files, 2 types."""
    root = tmp_path_factory.mktemp("stream")
    _write_jsonl(root / "raw" / "en" / "a.jsonl", [{"text": t} for t in _texts(120, 1)])
    _write_jsonl(root / "raw" / "en" / "b.jsonl", [{"text": t} for t in _texts(80, 2)])
    _write_jsonl(root / "raw" / "chat" / "c.jsonl", _chats(90, 3))
    return root


@pytest.fixture(scope="module")
def pretokenized(corpus_dir, spm_model):
    """The same files through tools/tokenizer.py's encoder into .bin files (the reference)."""
    out = corpus_dir / "bin"
    for src in sorted((corpus_dir / "raw").rglob("*.jsonl")):
        rel = src.relative_to(corpus_dir / "raw").with_suffix(".bin")
        write_bin(out / rel, encode_records(iter_records(src), spm_model))
    return out


def _stream(root, spm_model, dp_rank=0, dp_size=1, micro_num=4, micro_bsz=2, **kw) -> StreamingLoader:
    return StreamingLoader(StreamingCorpus(root), spm_model, SEQ, micro_num, micro_bsz, dp_rank, dp_size, **kw)


def _steps(loader, n):
    out = [next(loader) for _ in range(n)]
    if hasattr(loader, "close"):
        loader.close()
    return out


def _same(a, b):
    for key in BATCH_KEYS:
        assert torch.equal(a[key], b[key]), key


def test_batches_equal_pretokenized_data(corpus_dir, pretokenized, spm_model):
    """Streaming packs exactly the rows the .bin path gives for the same data, unshuffled: tokens,
    masks (labels), positions and types, across sample, row and file boundaries."""
    ref_loader = build_train_loader(TokenizedFolder(pretokenized), SEQ, 4, 2, 0, 1, seed=0, shuffle=False)
    stream = _stream(corpus_dir / "raw", spm_model)
    assert stream.type_names == ref_loader.type_names == ["chat", "en"]
    steps = ref_loader.steps_per_epoch
    assert steps >= 5
    ref, got = _steps(ref_loader, steps), _steps(stream, steps)
    for a, b in zip(ref, got):
        _same(a, b)
    masked = torch.cat([g["labels"] for g in got]) == IGNORE_INDEX
    assert masked.float().mean() > 0.2  # the chat prompts are really masked


def test_resume_is_bitwise_and_layout_free(corpus_dir, pretokenized, spm_model):
    """After k steps the saved position resumes the same global batches, also under dp=2 (each rank
    its half of the micro-batches), and across epochs."""
    epoch = build_train_loader(TokenizedFolder(pretokenized), SEQ, 4, 2, 0, 1, seed=0).steps_per_epoch
    n = 2 * epoch + 2 - 7
    full = _steps(_stream(corpus_dir / "raw", spm_model), 7 + n)  # into a third epoch
    first = _stream(corpus_dir / "raw", spm_model)
    _steps(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint's state.json holds
    assert state["kind"] == "streaming" and state["offset"] >= 0
    ranks = [_stream(corpus_dir / "raw", spm_model, dp_rank=r, dp_size=2, micro_num=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    halves = [_steps(r, n) for r in ranks]
    assert ranks[0].state_dict()["epoch"] == 2
    for i in range(n):
        merged = {k: torch.cat([halves[0][i][k], halves[1][i][k]]) for k in BATCH_KEYS}
        _same(full[7 + i], merged)


def test_tokenizer_workers_give_the_same_batches(corpus_dir, spm_model):
    a = _steps(_stream(corpus_dir / "raw", spm_model), 3)
    b = _steps(_stream(corpus_dir / "raw", spm_model, workers=1), 3)
    for x, y in zip(a, b):
        _same(x, y)


def test_parquet_and_saved_dataset_read_as_jsonl(tmp_path, spm_model):
    import datasets

    records = [{"text": t} for t in _texts(150, 5)]
    _write_jsonl(tmp_path / "j" / "d.jsonl", records)
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "p" / "d.parquet"))
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "s"))
    ref = _steps(_stream(tmp_path / "j", spm_model, micro_num=1), 4)
    for root in (tmp_path / "p", tmp_path / "s", tmp_path / "j" / "d.jsonl"):
        for x, y in zip(ref, _steps(_stream(root, spm_model, micro_num=1), 4)):
            _same(x, y)


def test_raw_validation_data_is_read_whole(corpus_dir, spm_model):
    src = read_corpus(StreamingCorpus(corpus_dir / "raw" / "en"), spm_model)
    assert len(src) == 200 and src.type_names == ["default"]
    first = src[0][0]
    assert first[0] == 1 and first[-1] == 2 and (first > 0).all()


def test_bad_data_names_the_file_and_line(tmp_path, spm_model):
    bad = tmp_path / "bad"
    _write_jsonl(bad / "x.jsonl", [{"text": "fine"}] * 3)
    with open(bad / "x.jsonl", "a") as f:
        f.write('{"text": "broken\n')
    with pytest.raises(DataFormatError, match=r"x\.jsonl: line 4 is not valid JSON"):
        _steps(_stream(bad, spm_model, micro_num=1, micro_bsz=1), 2)
    mixed = _write_jsonl(tmp_path / "mixed" / "m.jsonl", [{"text": "a b"}, {"messages": []}])
    with pytest.raises(DataFormatError, match="record 2 is not text data|record 2 has no string 'text'"):
        list(StreamingCorpus(mixed).records(0))
    with pytest.raises(DataFormatError, match="no .*files found"):
        StreamingCorpus(_empty(tmp_path))


def _empty(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.md").write_text("not data")
    return tmp_path / "empty"


def test_resume_refuses_other_data(corpus_dir, spm_model, tmp_path):
    state = _stream(corpus_dir / "raw", spm_model).state_dict()
    other = _write_jsonl(tmp_path / "o" / "z.jsonl", [{"text": "x y"}] * 10)
    with pytest.raises(DataFormatError, match="cannot resume the streaming position"):
        _stream(other.parent, spm_model).load_state_dict(state)
    ref_loader = build_train_loader(TokenizedFolder(corpus_dir / "bin"), SEQ, 1, 1, 0, 1, seed=0)
    with pytest.raises(DataFormatError, match="streaming data"):
        ref_loader.load_state_dict(state)
