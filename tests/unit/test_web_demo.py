"""The browser chat page (tools/web_demo.py) driven by streamlit's AppTest, and the chat logic under it
(internlm.chat_session), on a tiny model trained a few steps with the chat tokenizer.

AppTest runs the page in this process and cannot pass it a command line: the page reads its options
from INTERNLM_WEB_DEMO_ARGS when that is set. Every reply is checked against internlm.inference.generate,
greedy, on the prompt ids the chat template gives for the same conversation.
"""
from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from internlm.chat_session import IncrementalDecoder, PromptTooLong, build_prompt, load_session
from internlm.errors import UserError
from tests.helpers import ROOT, run_python, write_config

streamlit_testing = pytest.importorskip("streamlit.testing.v1")

PAGE = str(ROOT / "tools" / "web_demo.py")
CONTEXT = 256  # the tiny model's max_position_embeddings: a few long turns overflow it
_CKPTS: dict = {}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_chat_ckpt(tmp_path_factory, spm_model) -> Path:
    """The save folder of a tiny model (vocabulary = the chat tokenizer's 600 pieces) trained 4 steps
    on dummy data; its checkpoint carries the tokenizer. Built once per session (the browser test
    shares it)."""
    if spm_model not in _CKPTS:
        tmp = tmp_path_factory.mktemp("web_demo_ckpt")
        cfg = write_config(tmp, model=dict(vocab_size=600, num_layers=2, max_position_embeddings=CONTEXT),
                           data=dict(total_steps=4, tokenizer_path=str(spm_model)), lr_scheduler=dict(total_steps=4),
                           ckpt=dict(enable_save_ckpt=True, save_ckpt_folder=str(tmp / "ckpt"), checkpoint_every=4))
        proc = run_python([ROOT / "train.py", "--config", cfg], cwd=tmp, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert (tmp / "ckpt" / "4" / "tokenizer.model").is_file()
        _CKPTS[spm_model] = tmp / "ckpt"
    return _CKPTS[spm_model]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, spm_model) -> Path:
    return tiny_chat_ckpt(tmp_path_factory, spm_model)


@pytest.fixture(scope="module")
def session(ckpt):
    return load_session(ckpt)


def greedy_reply(session, messages, system="", max_new_tokens=64) -> str:
    """What the page must answer with temperature 0: generate() on the chat template's prompt ids."""
    from internlm.inference import generate

    head = [{"role": "system", "content": system}] if system else []
    ids = session.encoder.encode_prompt(head + messages)
    stop = [session.encoder.end, session.sp.eos_id()]
    new = generate(session.model, ids, max_new_tokens, greedy=True, eos_token_id=stop)
    return session.sp.decode(new[:-1] if new and new[-1] in stop else new)


def page(monkeypatch, *args) -> object:
    monkeypatch.setenv("INTERNLM_WEB_DEMO_ARGS", shlex.join(map(str, args)))
    return streamlit_testing.AppTest.from_file(PAGE, default_timeout=120).run()


def replies(at) -> list[str]:
    return [m.text[0].value for m in at.chat_message if m.name == "assistant"]


def tokens_of(at) -> list[int]:
    """The number of tokens of each reply, from its caption ("12 tokens in 0.3s ...")."""
    return [int(m.caption[0].value.split()[0]) for m in at.chat_message if m.name == "assistant"]


def test_page_chats_greedily_like_generate(ckpt, session, monkeypatch):
    at = page(monkeypatch, "--ckpt", ckpt, "--temperature", "0", "--max_new_tokens", "16")
    assert not at.exception and not at.error, [e.value for e in at.error]
    facts = at.sidebar.markdown[0].value
    assert "step: `4`" in facts and "INTERNLM2_PUBLIC" in facts and "tokens trained: `2,048`" in facts
    assert at.slider(key="temperature").value == 0.0

    at.chat_input[0].set_value("Hello there").run()
    assert not at.exception and not at.error
    history = [{"role": "user", "content": "Hello there"}]
    first = greedy_reply(session, history, max_new_tokens=16)
    assert replies(at) == [first] and first != ""
    assert [m.name for m in at.chat_message] == ["user", "assistant"]
    first_tokens = tokens_of(at)[0]

    # the second turn is answered with the first one in the prompt
    at.chat_input[0].set_value("and then?").run()
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "and then?"}]
    assert replies(at) == [first, greedy_reply(session, history, max_new_tokens=16)] and not at.warning

    at.sidebar.button(key="clear").click().run()
    assert len(at.chat_message) == 0

    # one new token at most; a system prompt from the sidebar goes first
    at.number_input(key="max_new_tokens").set_value(1)
    at.text_area(key="system").set_value("Be brief.")
    at.chat_input[0].set_value("Hello there").run()
    short = greedy_reply(session, [{"role": "user", "content": "Hello there"}], "Be brief.", max_new_tokens=1)
    assert replies(at) == [short]
    assert tokens_of(at) == [1] and first_tokens > 1


def test_long_conversation_drops_oldest_turns_with_a_warning(ckpt, session, monkeypatch):
    sentence = "The quick brown fox jumps over the lazy dog. "
    text = sentence
    while len(session.encoder.encode_prompt([{"role": "user", "content": text}])) < CONTEXT // 2:
        text += sentence
    at = page(monkeypatch, "--ckpt", ckpt, "--temperature", "0", "--max_new_tokens", "8")
    at.chat_input[0].set_value(text).run()
    assert not at.warning
    at.chat_input[0].set_value(text).run()
    assert len(at.warning) == 1 and "oldest 2 messages were left out" in at.warning[0].value
    assert f"context ({CONTEXT} tokens" in at.warning[0].value
    # the answer is the one to the newest message alone
    assert replies(at)[1] == greedy_reply(session, [{"role": "user", "content": text}], max_new_tokens=8)

    at.chat_input[0].set_value(text * 2).run()  # longer than the context by itself: an error, no reply
    assert "The message is too long" in at.error[0].value and len(replies(at)) == 2
    assert not at.exception


def test_bad_input_is_a_clear_error_on_the_page(ckpt, tmp_path, monkeypatch):
    def error_of(*args) -> str:
        at = page(monkeypatch, *args)
        assert not at.exception and len(at.error) == 1 and not at.chat_input
        return at.error[0].value

    assert "does not exist" in error_of("--ckpt", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "is not a training checkpoint" in error_of("--ckpt", tmp_path / "empty")
    assert "required: --ckpt" in error_of("--device", "cpu")
    # a checkpoint whose tokenizer is gone (no copy, and its config names none)
    bare = tmp_path / "bare"
    shutil.copytree(ckpt / "4", bare)
    (bare / "tokenizer.model").unlink()
    cfg = yaml.safe_load((bare / "config.yaml").read_text())
    cfg["data"]["tokenizer_path"] = None
    (bare / "config.yaml").write_text(yaml.safe_dump(cfg))
    message = error_of("--ckpt", bare)
    assert "no tokenizer" in message and "pass --tokenizer" in message


def test_hugging_face_folder_answers_like_its_training_checkpoint(ckpt, session, tmp_path, monkeypatch):
    import torch

    from internlm.hf import export_ckpt_to_hf

    export_ckpt_to_hf(ckpt, tmp_path / "hf", target="llama", dtype=torch.float32, progress=False)
    at = page(monkeypatch, "--ckpt", tmp_path / "hf", "--temperature", "0", "--max_new_tokens", "16")
    assert not at.error and "Hugging Face folder (llama)" in at.sidebar.markdown[0].value
    at.chat_input[0].set_value("Hello there").run()
    assert replies(at) == [greedy_reply(session, [{"role": "user", "content": "Hello there"}], max_new_tokens=16)]


def test_tokenizer_without_chat_pieces_continues_plain_text(ckpt, session, tmp_path, monkeypatch):
    import sentencepiece as spm

    from internlm.inference import generate

    corpus = (ROOT / "internlm" / "chat_session.py").read_text().splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=400, hard_vocab_limit=False, byte_fallback=True, minloglevel=2)
    at = page(monkeypatch, "--ckpt", ckpt, "--tokenizer", tmp_path / "plain.model", "--temperature", "0")
    assert "plain text" in at.info[0].value and not at.text_area  # no system prompt without a template
    at.chat_input[0].set_value("def parse(").run()
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "plain.model"))
    new = generate(session.model, [sp.bos_id()] + sp.encode("def parse("), 64, greedy=True,
                   eos_token_id=sp.eos_id(), vocab_limit=sp.get_piece_size())
    assert replies(at) == [sp.decode(new[:-1] if new and new[-1] == sp.eos_id() else new)]


# --------------------------------------------------------------------------- the logic, without the page

def test_incremental_decoding_matches_a_single_decode(session):
    sp = session.sp
    for text in ["中文 文本 🙂 x", "  def f(x):\n\treturn x", " leading space"]:
        ids = sp.encode(text)
        decoder = IncrementalDecoder(sp)
        pieces = [decoder.add(t) for t in ids]
        assert "".join(pieces) == sp.decode(ids) == decoder.text
        assert not any("\ufffd" in p for p in pieces)  # a character split over byte pieces comes out whole


def test_build_prompt_keeps_the_system_message_and_the_newest_turns(session):
    turn = "The quick brown fox jumps over the lazy dog. " * 3
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"{i} {turn}"}, {"role": "assistant", "content": turn}]
    history.append({"role": "user", "content": "last"})
    prompt = build_prompt(session, history, system="Be brief.", max_new_tokens=32)
    assert len(prompt.ids) <= CONTEXT - 32 and prompt.max_new_tokens == 32
    kept = int(prompt.notice.split("oldest ")[1].split()[0])
    assert kept % 2 == 0 and "system prompt is kept" in prompt.notice
    system = [{"role": "system", "content": "Be brief."}]
    assert prompt.ids == session.encoder.encode_prompt(system + history[kept:])
    assert len(session.encoder.encode_prompt(system + history[kept - 2:])) > CONTEXT - 32  # no more was dropped
    # what fits is left alone, and new tokens never run past the context
    short = build_prompt(session, history[-1:], max_new_tokens=500)
    assert short.notice == "" and short.max_new_tokens == CONTEXT - len(short.ids)
    with pytest.raises(PromptTooLong, match="too long"):
        build_prompt(session, [{"role": "user", "content": turn * 10}])


def test_load_session_errors_are_user_errors(ckpt, tmp_path):
    import sentencepiece as spm

    with pytest.raises(UserError, match="does not exist"):
        load_session(tmp_path / "nope")
    # 256 byte pieces + 400 symbols: more pieces than the model's 600 ids
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c"] * 10), model_prefix=str(tmp_path / "big"),
                                   vocab_size=700, byte_fallback=True, hard_vocab_limit=False, minloglevel=2,
                                   user_defined_symbols=[f"<u{i}>" for i in range(400)])
    with pytest.raises(UserError, match="more than the model's vocab_size 600"):
        load_session(ckpt, tokenizer=str(tmp_path / "big.model"))
