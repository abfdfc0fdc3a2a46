"""The offline demo corpus and its tokenizer (round trips, and id-for-id agreement with transformers)."""

import json

import pytest

from internlm.data.demo import prepare_demo_data
from internlm.data.tokenized import TokenizedFolder

TINY = dict(vocab_size=512, max_mb=0.3, valid_fraction=0.05, verbose=False)

PYTHON_SNIPPET = '''class Stack:
    """A stack.

    Push and pop."""

    def push(self, item):
\tif item is None:  # a tab-indented line
\t\treturn


        self.items.append(item)   # blank lines above, spaces before this comment
'''

SNIPPETS = [
    PYTHON_SNIPPET,
    "    return x  # starts with a run of spaces",
    " one leading space",
    "\n\nleading newlines\n",
    "trailing spaces   ",
    "\tx = 1\r\n\ty = 2",
    "numbers 1234567 and 3.14159, unicode: café 中文 😀",
    "",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, prepare_demo_data(out, **TINY)


def test_layout_and_contents(demo):
    import sentencepiece as spm

    out, result = demo
    assert result == {
        "train_folder": str(out / "train"),
        "valid_folder": str(out / "valid"),
        "tokenizer_path": str(out / "tokenizer" / "tokenizer.model"),
    }
    for split in ("train", "valid"):
        for typ in ("en", "code"):
            assert list((out / split / typ).glob("*.bin")), f"{split}/{typ} has no .bin"

    done = json.loads((out / "DONE").read_text())
    assert done["params"]["vocab_size"] == 512 and done["params"]["max_mb"] == 0.3
    total_bytes = sum(s["bytes"] for s in done["stats"].values())
    assert 0.2e6 < total_bytes < 0.5e6

    sp = spm.SentencePieceProcessor(model_file=result["tokenizer_path"])
    assert sp.get_piece_size() == 512
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)

    train = TokenizedFolder(result["train_folder"])
    valid = TokenizedFolder(result["valid_folder"], type_names=train.type_names)
    assert train.type_names == ["code", "en"]
    assert int(train.lengths.sum()) == done["stats"]["train/en"]["tokens"] + done["stats"]["train/code"]["tokens"]
    assert len(valid) < len(train)

    # The .bin samples are bos + encode(raw text) + eos, in the raw files' order.
    raw_code = [json.loads(line)["text"] for line in open(out / "raw" / "train_code.jsonl", encoding="utf-8")]
    first_code, type_id = train[0]  # "code" sorts first
    assert train.type_names[type_id] == "code"
    assert first_code.tolist() == [sp.bos_id(), *sp.encode(raw_code[0]), sp.eos_id()]

    # No validation text is trained on.
    train_texts = set()
    for typ in ("en", "code"):
        train_texts.update(json.loads(x)["text"] for x in open(out / "raw" / f"train_{typ}.jsonl", encoding="utf-8"))
    valid_code = [json.loads(x)["text"] for x in open(out / "raw" / "valid_code.jsonl", encoding="utf-8")]
    assert valid_code and not train_texts & set(valid_code)


def test_reuse_and_rebuild(tmp_path, capsys):
    first = prepare_demo_data(tmp_path, **TINY)
    model = tmp_path / "tokenizer" / "tokenizer.model"
    stamp = model.stat().st_mtime_ns
    done = (tmp_path / "DONE").read_text()

    assert prepare_demo_data(tmp_path, **{**TINY, "verbose": True}) == first
    assert "reusing" in capsys.readouterr().out
    assert model.stat().st_mtime_ns == stamp and (tmp_path / "DONE").read_text() == done

    prepare_demo_data(tmp_path, **{**TINY, "vocab_size": 520})  # other parameters: rebuilt
    assert json.loads((tmp_path / "DONE").read_text())["params"]["vocab_size"] == 520
    assert model.stat().st_mtime_ns != stamp


def _samples(out):
    texts = []
    for typ in ("en", "code"):
        with open(out / "raw" / f"valid_{typ}.jsonl", encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f][:30]
    return texts


def test_tokenizer_round_trip(demo):
    import sentencepiece as spm

    out, result = demo
    sp = spm.SentencePieceProcessor(model_file=result["tokenizer_path"])
    for text in SNIPPETS + _samples(out):
        assert sp.decode(sp.encode(text)) == text
    assert sp.unk_id() not in sp.encode(PYTHON_SNIPPET + "\x00\x7f ☃")  # byte fallback, never <unk>


def test_transformers_reproduces_ids(demo):
    transformers = pytest.importorskip("transformers")
    import sentencepiece as spm

    out, result = demo
    sp = spm.SentencePieceProcessor(model_file=result["tokenizer_path"])
    folder = out / "tokenizer"  # holds tokenizer.model
    auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    # No dummy prefix in the model; LlamaTokenizer must be told, AutoTokenizer reads it from the model.
    llama = transformers.LlamaTokenizer.from_pretrained(str(folder), add_prefix_space=False)
    for text in SNIPPETS + _samples(out):
        ids = sp.encode(text)
        assert auto.encode(text, add_special_tokens=False) == ids, repr(text[:60])
        assert llama.encode(text, add_special_tokens=False) == ids, repr(text[:60])
        assert auto.decode(ids) == text
