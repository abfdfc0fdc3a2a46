"""Chat and instruction data: InternLM's chat template with loss masks, the same ids as transformers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from internlm.data.chat import CHAT_TOKENS, ChatEncoder, instruction_messages, render
from internlm.data.text import SPM_TRAINER_OPTIONS, iter_records
from internlm.data.tokenized import DataFormatError, TokenizedFile
from tests.helpers import ROOT, run_python

CONVERSATIONS = [
    [{"role": "user", "content": "What does heapq.heappush do?"},
     {"role": "assistant", "content": "Push item onto heap, maintaining the heap invariant."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "  leading spaces and\ttabs\n\nand newlines"},
     {"role": "assistant", "content": "def f(x):\n    return x * 2\n"},
     {"role": "user", "content": "caf\u00e9 \u4e2d\u6587 \U0001f600"},
     {"role": "assistant", "content": "\n starts with a newline"}],
    [{"role": "user", "content": "empty answer"}, {"role": "assistant", "content": ""}],
]


@pytest.fixture(scope="module")
def sp(spm_model):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(spm_model))


@pytest.fixture(scope="module")
def hf_tokenizer(spm_model, tmp_path_factory):
    from transformers import AutoTokenizer

    from internlm.hf.tokenizer_files import write_tokenizer_files

    out = tmp_path_factory.mktemp("hf_tok")
    write_tokenizer_files(spm_model, out)
    return AutoTokenizer.from_pretrained(str(out))


def hf_ids(tok, messages, **kw):
    ids = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_ids_equal_transformers_apply_chat_template(sp, spm_model, hf_tokenizer, i):
    messages = CONVERSATIONS[i]
    ids = ChatEncoder(sp, spm_model).encode(messages)
    assert [abs(t) for t in ids] == hf_ids(hf_tokenizer, messages)
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False) == render(messages, bos="<s>")


def test_generation_prompt_equals_transformers(sp, spm_model, hf_tokenizer):
    messages = CONVERSATIONS[1][:4]
    ids = ChatEncoder(sp, spm_model).encode_prompt(messages)
    assert ids == hf_ids(hf_tokenizer, messages, add_generation_prompt=True)


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_loss_only_on_assistant_content_and_end(sp, spm_model, i):
    messages = CONVERSATIONS[i]
    ids = ChatEncoder(sp, spm_model).encode(messages)
    im_end = sp.piece_to_id("<|im_end|>")
    # the runs of positive ids, decoded, are the assistant turns' contents each followed by <|im_end|>
    runs, current = [], []
    for t in ids:
        if t > 0:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        assert run[-1] == im_end
        # a token that spans "assistant\n" and the answer's start ("\n\n") carries loss with the answer
        text = sp.decode(run[:-1])
        assert text.endswith(answer) and "assistant\n".endswith(text[:len(text) - len(answer)]), (text, answer)
    # every <|im_end|> of a non-assistant turn is masked
    assert sum(1 for t in ids if t == -im_end) == sum(1 for m in messages if m["role"] != "assistant")


def test_instruction_is_a_user_and_an_assistant_turn(sp, spm_model):
    rec = {"instruction": "Reverse the word.", "input": "stressed", "output": "desserts"}
    msgs = instruction_messages(rec)
    assert msgs == [{"role": "user", "content": "Reverse the word.\n\nstressed"},
                    {"role": "assistant", "content": "desserts"}]
    assert instruction_messages({**rec, "input": ""})[0]["content"] == "Reverse the word."


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tokenize(tmp_path, inp, tokenizer, *extra):
    out = tmp_path / "out" / "sft" / "data.bin"
    return run_python([ROOT / "tools" / "tokenizer.py", "--text_input_path", inp, "--bin_output_path", out,
                       "--tokenizer_path", tokenizer, *extra], timeout=120), out


def test_tokenizer_tool_detects_chat_and_instruction(tmp_path, sp, spm_model):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in CONVERSATIONS])
    proc, out = tokenize(tmp_path, chat, spm_model, "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    f = TokenizedFile(out)
    enc = ChatEncoder(sp, spm_model)
    for k, m in enumerate(CONVERSATIONS):
        assert f[k].tolist() == enc.encode(m)
    alpaca = [{"instruction": "Upper-case it.", "input": "abc", "output": "ABC"},
              {"instruction": "Say hi.", "input": "", "output": "hi"}]
    proc, out = tokenize(tmp_path, write_jsonl(tmp_path / "alpaca.jsonl", alpaca), spm_model)
    assert proc.returncode == 0, proc.stderr
    f = TokenizedFile(out)
    assert [f[k].tolist() for k in range(2)] == [enc.encode(instruction_messages(r)) for r in alpaca]
    assert (f[0] < 0).any() and (f[0] > 0).any()
    # plain text stays all-loss: bos + ids + eos
    proc, out = tokenize(tmp_path, write_jsonl(tmp_path / "text.jsonl", [{"text": "hello"}]), spm_model)
    assert proc.returncode == 0 and TokenizedFile(out)[0].tolist() == [1] + sp.encode("hello") + [2]


@pytest.mark.parametrize("line, words", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}',
     r"line 2: message 1 must be .*role.* with role 'bot'"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "line 2: the conversation has no assistant"),
    ('{"text": "a text line in a chat file"}', r"line 2 is not chat data: it needs \"messages\""),
    ('{"messages": [oops', "line 2 is not valid JSON"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}',
     r"line 2: message 0 must be"),
])
def test_a_malformed_line_names_file_and_line(tmp_path, spm_model, line, words):
    good = json.dumps({"messages": CONVERSATIONS[0]})
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n")
    proc, out = tokenize(tmp_path, path, spm_model)
    assert proc.returncode == 2
    assert str(path) in proc.stderr and "Traceback" not in proc.stderr
    assert pytest.importorskip("re").search(words, proc.stderr), proc.stderr
    assert not out.exists()  # nothing half-written


def test_forced_format_and_txt_refusal(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}])
    with pytest.raises(DataFormatError, match="line 1 is not chat data"):
        list(iter_records(path, "chat"))
    txt = tmp_path / "a.txt"
    txt.write_text("plain\n")
    with pytest.raises(DataFormatError, match="chat data must be .jsonl or .json"):
        list(iter_records(txt, "chat"))
    assert [r for _, r in iter_records(path, "auto")] == [{"instruction": "x", "output": "y"}]


def test_a_tokenizer_without_chat_pieces_is_a_clear_error(tmp_path):
    import sentencepiece as spm

    options = {k: v for k, v in SPM_TRAINER_OPTIONS.items() if k != "user_defined_symbols"}
    text = ["the quick brown fox jumps over the lazy dog %d" % i for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=300, minloglevel=2, **options)
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}])
    proc, _ = tokenize(tmp_path, chat, tmp_path / "plain.model")
    assert proc.returncode == 2
    assert "has no '<|im_start|>' piece" in proc.stderr and "tools/train_tokenizer.py" in proc.stderr


def test_trained_tokenizers_have_the_chat_pieces(sp):
    assert [sp.piece_to_id(p) for p in CHAT_TOKENS] == [3, 4]
    assert sp.encode("<|im_end|>") == [4]
    assert np.all(np.array(sp.encode("x<|im_start|>y")) != 0)


def test_hf_added_chat_tokens_over_unused_pieces(tmp_path):
    """InternLM2/3 chat tokenizers keep <|im_start|>/<|im_end|> as HF added tokens over unused pieces of
    the sentencepiece model (tokenizer_config.json's added_tokens_decoder): chat data uses those ids,
    the export keeps them, and transformers' apply_chat_template gives the same ids."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from internlm.hf.tokenizer_files import write_tokenizer_files

    options = {k: v for k, v in SPM_TRAINER_OPTIONS.items() if k != "user_defined_symbols"}
    text = ["the quick brown fox jumps over the lazy dog %d" % i for i in range(200)] + [
        json.dumps(c) for c in CONVERSATIONS]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=400, minloglevel=2,
                                   **dict(options, user_defined_symbols=["[UNUSED_0]", "[UNUSED_1]"]))
    model = tmp_path / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    start, end = sp.piece_to_id("[UNUSED_0]"), sp.piece_to_id("[UNUSED_1]")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        str(start): {"content": "<|im_start|>", "special": True}, str(end): {"content": "<|im_end|>", "special": True}
    }}))
    enc = ChatEncoder(sp, model)
    assert (enc.start, enc.end) == (start, end)
    messages = CONVERSATIONS[0]
    ids = enc.encode(messages)
    assert ids.count(end) == 1 and ids.count(-end) == 1 and ids.count(-start) == 2  # the answer's end carries loss
    out = tmp_path / "hf"
    write_tokenizer_files(model, out)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert [abs(t) for t in ids] == hf_ids(tok, messages)
    assert enc.encode_prompt(messages[:1]) == hf_ids(tok, messages[:1], add_generation_prompt=True)


def test_sft_demo_examples_are_held_out_by_module(tmp_path):
    """The SFT demo's answers follow its rules, and no module gives both training and test lines."""
    import ast

    from internlm.data import sft_demo

    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    for i in range(6):
        (lib / f"m{i}.py").write_text(f"class C{i}:\n    def __init__(self, a=1):\n        pass\n\n"
                                      f"    def _get_{i}(self, x):\n        return x\n\n"
                                      f"def public_{i}(a, *, b=None):\n    return a\n\n"
                                      f"    # not a def line\ndef {'_' * (i % 2)}two_{i}(cls):\n    pass\n")
    split = sft_demo.sft_examples(num_test=4, stdlib=str(lib))
    answers = {r["messages"][0]["content"].splitlines()[1]: r["messages"][1]["content"]
               for part in split.values() for r in part}
    assert answers["def __init__(self, a=1):"] == "a special method with default values"
    assert answers["def _get_0(self, x):"] == "a private method without default values"
    assert answers["def public_0(a, *, b=None):"] == "a public function with default values"
    assert answers["def _two_1(cls):"] == "a private class method without default values"
    modules = {part: {r["messages"][0]["content"].split("_")[-1].split("(")[0] for r in recs
                      if "public_" in r["messages"][0]["content"]} for part, recs in split.items()}
    assert modules["test"] and modules["train"] and not modules["test"] & modules["train"]
    assert len(split["test"]) >= 4
    node = ast.parse("def f(self, /, a, *args, b=2, **kw): pass").body[0]
    assert sft_demo.describe(node) == "a public method with default values"
