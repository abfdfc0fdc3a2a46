"""Chat and instruction data: InternLM2/3's chat template, and token ids with loss masks.

A conversation ``[{"role": "system"|"user"|"assistant", "content": "..."}, ...]`` is rendered as

    <s><|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...<|im_end|>\\n

(``CHAT_TEMPLATE`` is the same rendering in the Jinja syntax transformers' ``apply_chat_template``
runs; it is written into exported tokenizers). Only assistant turns carry loss: their content and
their ``<|im_end|>``; everything else is stored negative (InternEvo's mask: input, not target).

An instruction record ``{"instruction", "input", "output"}`` (alpaca) is the conversation
user = instruction (+ blank line + input when there is one), assistant = output.

The ids equal what transformers gives for the rendered text, because ``<|im_start|>`` and
``<|im_end|>`` are atomic pieces of the sentencepiece model (user-defined symbols, see
``internlm.data.text.CHAT_TOKENS``): no piece spans them, so the text between them can be encoded
piece by piece. Within an assistant turn ``assistant\\n`` and the content are encoded as one text,
and the tokens that the prefix alone accounts for are the masked ones (a token spanning both, like
"\n\n" before an answer that starts with a newline, carries loss with the answer).
"""
from __future__ import annotations

from typing import Sequence

from internlm.data.tokenized import DataFormatError

__all__ = ["CHAT_TOKENS", "CHAT_TEMPLATE", "ROLES", "ChatEncoder", "render", "instruction_messages",
           "require_chat_tokens", "detect_format", "FORMATS"]

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "text", "chat", "instruction")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def render(messages: Sequence[dict], add_generation_prompt: bool = False, bos: str = "") -> str:
    """The text CHAT_TEMPLATE renders (``bos`` is the bos token's text, empty for none)."""
    text = bos + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def instruction_messages(record: dict) -> list[dict]:
    prompt = record["instruction"]
    if record.get("input"):
        prompt = f"{prompt}\n\n{record['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def require_chat_tokens(sp, tokenizer_path) -> tuple[int, int]:
    """The ids of <|im_start|> and <|im_end|>: pieces of the sentencepiece model, or HF added tokens
    declared beside it (tokenizer_config.json's added_tokens_decoder, as InternLM2/3 chat models ship
    them over unused pieces); a clear error for a tokenizer without them."""
    added = hf_added_tokens(tokenizer_path)
    ids = []
    for piece in CHAT_TOKENS:
        i = sp.piece_to_id(piece)
        if i == sp.unk_id() or sp.is_control(i) or sp.id_to_piece(i) != piece:
            i = added.get(piece)
        if i is None or not 0 <= i < sp.get_piece_size():
            raise DataFormatError(
                f"tokenizer {tokenizer_path} has no {piece!r} piece, which chat data needs: train the tokenizer "
                f"with tools/train_tokenizer.py (it adds {' and '.join(CHAT_TOKENS)}) or use one that has them")
        ids.append(i)
    return ids[0], ids[1]


def hf_added_tokens(tokenizer_path) -> dict[str, int]:
    """content -> id of the added tokens in the tokenizer_config.json beside a tokenizer.model ({} if none)."""
    import json
    from pathlib import Path

    config = Path(str(tokenizer_path)).parent / "tokenizer_config.json"
    try:
        decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
        return {v["content"]: int(k) for k, v in decoder.items() if isinstance(v, dict) and "content" in v}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def detect_format(value) -> str:
    """'chat', 'instruction' or 'text' from one decoded JSON record (a bare string is text)."""
    if isinstance(value, dict):
        if "messages" in value:
            return "chat"
        if "instruction" in value and "output" in value:
            return "instruction"
    return "text"


class ChatEncoder:
    """Signed token ids (negative = no loss) of conversations, with a sentencepiece processor."""

    def __init__(self, sp, tokenizer_path="tokenizer", add_bos: bool = True):
        self.sp = sp
        self.start, self.end = require_chat_tokens(sp, tokenizer_path)
        self.add_bos = add_bos and sp.bos_id() >= 0
        self.newline = sp.encode("\n")

    def encode(self, messages: Sequence[dict], where: str = "", need_assistant: bool = True) -> list[int]:
        check_messages(messages, where, need_assistant)
        ids = [-self.sp.bos_id()] if self.add_bos else []
        for m in messages:
            role, content = m["role"], m["content"]
            ids.append(-self.start)
            head = self.sp.encode(f"{role}\n")
            if role != "assistant":
                body = self.sp.encode(f"{role}\n{content}")
                ids += [-t for t in body]
                ids.append(-self.end)
            else:
                body = self.sp.encode(f"{role}\n{content}")
                k = _common_prefix(head, body)  # the tokens the prefix alone accounts for
                ids += [-t for t in body[:k]] + body[k:]
                ids.append(self.end)
            ids += [-t for t in self.newline]
        return ids

    def encode_prompt(self, messages: Sequence[dict]) -> list[int]:
        """Unsigned ids of the conversation so far and the assistant's opening: what generation continues."""
        check_messages(messages, "", need_assistant=False)
        ids = [abs(t) for t in self.encode(messages, need_assistant=False)] if messages else (
            [self.sp.bos_id()] if self.add_bos else [])
        return ids + [self.start] + self.sp.encode("assistant\n")


def _common_prefix(a: list[int], b: list[int]) -> int:
    k = 0
    while k < len(a) and k < len(b) and a[k] == b[k]:
        k += 1
    return k


def check_messages(messages, where: str, need_assistant: bool = True) -> None:
    at = f"{where}: " if where else ""
    if not isinstance(messages, list) or (need_assistant and not messages):
        raise DataFormatError(f'{at}"messages" must be a non-empty list of {{"role", "content"}} objects')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            got = {k: type(v).__name__ for k, v in m.items()} if isinstance(m, dict) else type(m).__name__
            raise DataFormatError(f'{at}message {i} must be {{"role": one of {list(ROLES)}, "content": a string}}, '
                                  f"got {got}" + (f" with role {m.get('role')!r}" if isinstance(m, dict) else ""))
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError(f"{at}the conversation has no assistant turn: nothing to learn from")
