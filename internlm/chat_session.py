"""Chatting with a checkpoint, without any user interface: what tools/web_demo.py's page runs.

    session = load_session("runs/demo/ckpt/300")             # model + tokenizer + facts, loaded once
    prompt = build_prompt(session, [{"role": "user", "content": "hi"}], system="", max_new_tokens=64)
    reply = Reply(session, prompt, temperature=0.0)          # greedy
    for text in reply: print(text, end="")                   # the answer, a piece at a time
    reply.text                                               # the whole answer (stop token left out)

A tokenizer with InternLM's chat pieces gets the chat template (internlm.data.chat.ChatEncoder) and
the answer stops at <|im_end|> or eos; one without them continues the latest message as plain text.
A prompt longer than the model's context loses its oldest turns (the system message is kept).
Problems a user can fix are raised as UserError, worded for them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from internlm.errors import UserError


class PromptTooLong(UserError):
    """The newest message alone (with the system prompt) does not fit in the model's context."""


@dataclass
class ChatSession:
    model: object  # internlm.model.internlm.InternLM, in eval mode
    sp: object  # sentencepiece.SentencePieceProcessor
    tokenizer_path: str
    encoder: object | None  # internlm.data.chat.ChatEncoder, None for a tokenizer without the chat pieces
    plain_reason: str = ""  # why there is no chat template (the ChatEncoder's error), when there is none
    facts: dict = field(default_factory=dict)  # what the page shows about the checkpoint, in order
    details: list = field(default_factory=list)  # tools/ckpt_info.py's description of a training checkpoint

    @property
    def context(self) -> int:
        """The longest sequence (prompt + answer) the model takes: its max_position_embeddings."""
        return int(self.model.args.max_position_embeddings)

    @property
    def stop_ids(self) -> list[int]:
        eos = [self.sp.eos_id()] if self.sp.eos_id() >= 0 else []
        return ([self.encoder.end] if self.encoder is not None else []) + eos


def load_session(ckpt, tokenizer: str | None = None, device: str = "cpu", dtype: str = "float32") -> ChatSession:
    """The model of a training checkpoint (step folder or save folder) or a Hugging Face folder, its
    tokenizer (found as tools/generate.py finds it, unless given) and the facts worth showing."""
    import sentencepiece as spm
    import torch

    from internlm.checkpoint.reader import resolve_ckpt_dir
    from internlm.cli.generate import find_tokenizer
    from internlm.config import torch_dtype
    from internlm.data.chat import ChatEncoder
    from internlm.hf.weights import is_hf_dir
    from internlm.inference import load_model

    path = Path(ckpt)
    if not path.is_dir():
        raise UserError(f"{str(path)!r} does not exist or is not a folder: pass a training checkpoint "
                        "(a step folder or its save folder) or a Hugging Face model folder.")
    if not is_hf_dir(path):
        resolve_ckpt_dir(path)  # says why the folder is not a checkpoint
    tok_path = find_tokenizer(str(path), tokenizer)
    if not tok_path or not Path(tok_path).is_file():
        where = (f"{tok_path!r} does not exist" if tok_path
                 else f"{str(path)!r} has no tokenizer.model and its config names none")
        raise UserError(f"no tokenizer: {where}; pass --tokenizer PATH/tokenizer.model.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (use --device cpu).")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    except (OSError, RuntimeError) as exc:
        raise UserError(f"cannot read the tokenizer {tok_path!r}: {exc}") from None
    model = load_model(path, device=device, dtype=torch_dtype(dtype))
    if sp.get_piece_size() > model.args.vocab_size:
        raise UserError(f"the tokenizer {tok_path!r} has {sp.get_piece_size()} pieces, more than the model's "
                        f"vocab_size {model.args.vocab_size}: it is not this model's tokenizer.")
    try:
        encoder, reason = ChatEncoder(sp, tok_path), ""
    except UserError as exc:
        encoder, reason = None, str(exc)
    session = ChatSession(model=model, sp=sp, tokenizer_path=str(tok_path), encoder=encoder, plain_reason=reason)
    session.facts, session.details = checkpoint_facts(model, tok_path, device, dtype)
    return session


def checkpoint_facts(model, tokenizer_path, device, dtype) -> tuple[dict, list[str]]:
    """({name: value} to show, tools/ckpt_info.py's lines for a training checkpoint) of a loaded model."""
    import json

    from internlm.checkpoint import layout
    from internlm.cli.ckpt_info import describe
    from internlm.hf.weights import is_hf_dir

    path = Path(model.source_path)
    args = model.args
    facts = {"checkpoint": str(path)}
    meta, details = {}, []
    if is_hf_dir(path):
        hf_type = json.loads((path / "config.json").read_text()).get("model_type")
        facts["format"] = "Hugging Face folder" + (f" ({hf_type})" if hf_type else "")
    else:
        try:
            info = layout.check_checkpoint(path, allow_model_only=True)
            meta, details = info.meta, describe(info)
            facts["step"] = info.step
        except UserError:
            pass
    facts["model type"] = meta.get("model_type") or args.model_type
    facts["parameters"] = f"{(meta.get('num_params') or args.num_params()) / 1e6:.2f}M"
    if meta.get("tokens_seen"):
        facts["tokens trained"] = f"{meta['tokens_seen']:,}"
    facts["context"] = f"{args.max_position_embeddings} tokens"
    facts["tokenizer"] = str(tokenizer_path)
    facts["device"] = f"{device}, {dtype}"
    return facts, details


@dataclass
class Prompt:
    ids: list[int]
    max_new_tokens: int  # what is asked for, less what would run past the context
    notice: str = ""  # what was left out to fit the context, worded for the user


def build_prompt(session: ChatSession, messages: list[dict], system: str = "", max_new_tokens: int = 64) -> Prompt:
    """The ids generation continues for a conversation whose last message is the user's. With the chat
    template: the system message, then as many of the newest turns as leave room for max_new_tokens (at
    least the newest message); without it: the newest message as plain text, cut from the start to fit."""
    context = session.context
    budget = max(context - max_new_tokens, context // 2)  # the room the prompt may take when it must be cut
    if session.encoder is None:
        sp = session.sp
        bos = [sp.bos_id()] if sp.bos_id() >= 0 else []
        text = sp.encode(messages[-1]["content"])
        keep = max(budget - len(bos), 1)
        notice = ""
        if len(text) > keep:
            notice = (f"The text is longer than the model's context ({context} tokens): only its last {keep} "
                      "tokens were continued.")
            text = text[-keep:]
        ids = bos + text
        return Prompt(ids, max(0, min(max_new_tokens, context - len(ids))), notice)
    head = [{"role": "system", "content": system}] if system else []
    turns = list(messages)
    ids = session.encoder.encode_prompt(head + turns)
    dropped = 0
    while len(ids) > budget and len(turns) > 1:
        drop = 2 if len(turns) > 2 and turns[1]["role"] == "assistant" else 1  # a user turn and its answer
        turns, dropped = turns[drop:], dropped + drop
        ids = session.encoder.encode_prompt(head + turns)
    if len(ids) >= context:
        with_system = " and the system prompt" if head else ""
        raise PromptTooLong(f"The message is too long: with the chat template{with_system} it takes {len(ids)} "
                            f"tokens, and the model's context is {context} tokens. Shorten it.")
    notice = ""
    if dropped:
        notice = (f"The conversation is longer than the model's context ({context} tokens, {max_new_tokens} of them "
                  f"kept for the answer): its oldest {dropped} message{'s' if dropped > 1 else ''} "
                  f"{'were' if dropped > 1 else 'was'} left out of the prompt"
                  + (" (the system prompt is kept)." if head else "."))
    return Prompt(ids, max(0, min(max_new_tokens, context - len(ids))), notice)


class IncrementalDecoder:
    """Text of a growing list of token ids, a piece at a time: the whole list is decoded each time and
    the new end is what comes out, so characters spread over several byte pieces and the spaces that
    sentencepiece attaches to pieces come out as in a single decode. A decode that ends in an
    incomplete character (U+FFFD) waits for the next piece."""

    def __init__(self, sp):
        self.sp = sp
        self.ids: list[int] = []
        self.emitted = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.sp.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        new, self.emitted = text[len(self.emitted):], text
        return new

    @property
    def text(self) -> str:
        return self.sp.decode(self.ids)


class Reply:
    """The answer to a Prompt, generated while it is iterated (each item: the text a token added).
    After the iteration: `text`, `ids` (stop token left out), `stopped` (the model ended its turn),
    `seconds`."""

    def __init__(self, session: ChatSession, prompt: Prompt, temperature: float = 0.8, top_p: float = 0.9,
                 repetition_penalty: float = 1.0, top_k: int = 0, generator=None):
        self.session, self.prompt = session, prompt
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                             generator=generator, vocab_limit=session.sp.get_piece_size())
        self.decoder = IncrementalDecoder(session.sp)
        self.stopped = False
        self.seconds = 0.0

    def __iter__(self):
        from internlm.inference import stream_generate

        start = time.perf_counter()
        stop = set(self.session.stop_ids)
        for token in stream_generate(self.session.model, self.prompt.ids, self.prompt.max_new_tokens,
                                     eos_token_id=list(stop), **self.sampling):
            if token in stop:
                self.stopped = True
                break
            piece = self.decoder.add(token)
            self.seconds = time.perf_counter() - start
            if piece:
                yield piece
        self.seconds = time.perf_counter() - start

    @property
    def ids(self) -> list[int]:
        return list(self.decoder.ids)

    @property
    def text(self) -> str:
        return self.decoder.text
