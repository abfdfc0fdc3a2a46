"""Text files to samples, sentencepiece training and encoding: what tools/tokenizer.py,
tools/train_tokenizer.py and the demo share.

`iter_texts` (samples of a .txt, .json or .jsonl file), `train_sentencepiece` (a BPE model for code and
prose) and `encode_texts` (token ids in worker processes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from internlm.data.chat import CHAT_TOKENS
from internlm.data.tokenized import DataFormatError

__all__ = ["iter_texts", "iter_records", "train_sentencepiece", "encode_texts", "encode_records", "RecordEncoder",
           "SPM_TRAINER_OPTIONS", "CHAT_TOKENS"]

# ----------------------------------------------------------------------------------------------------
# Text files -> samples


def iter_texts(path: str | os.PathLike, text_key: str = "text") -> Iterator[str]:
    """Yield the samples of a text file, in file order.

    .txt: each line is a sample (InternEvo's convention), without its line ending.
    .jsonl: one JSON value per line, an object with the text under `text_key` or a bare string.
    .json: a list of such objects or strings.
    Blank samples (empty or whitespace only) are skipped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as e:
                    raise DataFormatError(f"{path}: line {lineno} is not valid JSON ({e})") from None
                text = _text_of(value, text_key, f"{path}: line {lineno}")
                if text.strip():
                    yield text
    elif suffix == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                values = json.load(f)
            except ValueError as e:
                raise DataFormatError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(values, list):
            raise DataFormatError(f"{path}: expected a JSON list of objects or strings, got {type(values).__name__}")
        for i, value in enumerate(values):
            text = _text_of(value, text_key, f"{path}: item {i}")
            if text.strip():
                yield text
    else:  # .txt and anything else: plain text, one sample per line
        with open(path, encoding="utf-8", newline="") as f:
            for line in f:
                text = line.rstrip("\n").rstrip("\r")
                if text.strip():
                    yield text


def _text_of(value, text_key: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if text_key not in value:
            raise DataFormatError(f"{where} has no {text_key!r} key (keys: {sorted(value)[:8]})")
        text = value[text_key]
        if isinstance(text, str):
            return text
        raise DataFormatError(f"{where}: {text_key!r} is a {type(text).__name__}, not a string")
    raise DataFormatError(f"{where} is a {type(value).__name__}, expected an object or a string")


# ----------------------------------------------------------------------------------------------------
# Tokenizer training

# Why these: code keeps its indentation and line breaks only without normalization and whitespace
# collapsing; without a dummy prefix, transformers' LlamaTokenizer(add_prefix_space=False) (which is
# what AutoTokenizer builds from this model's own settings) reproduces sentencepiece's ids exactly,
# texts starting with spaces included; byte fallback means no <unk>: any byte sequence round-trips.
SPM_TRAINER_OPTIONS = dict(
    model_type="bpe",
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    byte_fallback=True,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    # atomic pieces 3 and 4 (never merged with their neighbours), so chat data can be tokenized
    user_defined_symbols=list(CHAT_TOKENS),
)


def train_sentencepiece(
    inputs: Sequence[str | os.PathLike],
    model_prefix: str | os.PathLike,
    vocab_size: int = 8000,
    input_sentence_size: int = 0,
    max_sentence_length: int = 16384,
    text_key: str = "text",
    num_threads: int | None = None,
    seed: int = 0,
) -> Path:
    """Train a sentencepiece BPE model on the samples of `inputs`; returns the path of the .model.

    Samples are read with `iter_texts`, so a .jsonl/.json sample that spans lines (a docstring, a
    chunk of code) is one training sentence and newlines get vocabulary pieces of their own.
    `input_sentence_size` > 0 trains on a random subset of that many samples (seeded, deterministic);
    samples longer than `max_sentence_length` bytes are left out of training (not of encoding).
    """
    import sentencepiece as spm

    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer training input not found: {p}")
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)

    def sentences():
        for p in paths:
            yield from iter_texts(p, text_key)

    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_prefix=str(model_prefix),
            vocab_size=vocab_size,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=input_sentence_size > 0,
            max_sentence_length=max_sentence_length,
            num_threads=num_threads or min(os.cpu_count() or 1, 16),
            minloglevel=2,
            **SPM_TRAINER_OPTIONS,
        )
    except RuntimeError as e:  # e.g. a vocabulary smaller than the alphabet + byte pieces
        raise ValueError(f"sentencepiece training failed for {model_prefix}: {e}") from None
    return Path(str(model_prefix) + ".model")


# ----------------------------------------------------------------------------------------------------
# Records of a data file in a format: text, chat or instruction


def iter_records(path: str | os.PathLike, fmt: str = "auto", text_key: str = "text") -> Iterator[tuple[str, object]]:
    """Yield ``(where, record)`` for each sample of a file: ``where`` is "FILE: line N" (or "item N"), the
    record a string (text) or a dict (chat: ``{"messages": [...]}``; instruction: ``{"instruction",
    "input", "output"}``). ``fmt="auto"`` takes the format of the first record; every record must then be
    of that format, or a DataFormatError names the file and line. Blank text samples are skipped."""
    from internlm.data.chat import FORMATS, detect_format

    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {list(FORMATS)}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json"):
        if fmt in ("chat", "instruction"):
            raise DataFormatError(f"{path}: {fmt} data must be .jsonl or .json (one JSON object per sample)")
        for i, text in enumerate(iter_texts(path, text_key)):
            yield f"{path}: sample {i}", text
        return
    for where, value in _json_values(path):
        if fmt == "auto":
            fmt = detect_format(value)
        if fmt == "text":
            text = _text_of(value, text_key, where)
            if text.strip():
                yield where, text
        else:
            if not isinstance(value, dict) or detect_format(value) != fmt:
                keys = sorted(value)[:8] if isinstance(value, dict) else type(value).__name__
                need = '"messages"' if fmt == "chat" else '"instruction" and "output"'
                raise DataFormatError(f"{where} is not {fmt} data: it needs {need} (got {keys}); "
                                      f"a file holds one format")
            yield where, value


def _json_values(path: Path) -> Iterator[tuple[str, object]]:
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}: line {lineno}", json.loads(line)
                except ValueError as e:
                    raise DataFormatError(f"{path}: line {lineno} is not valid JSON ({e})") from None
        return
    with open(path, encoding="utf-8") as f:
        try:
            values = json.load(f)
        except ValueError as e:
            raise DataFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(values, list):
        raise DataFormatError(f"{path}: expected a JSON list of objects or strings, got {type(values).__name__}")
    for i, value in enumerate(values):
        yield f"{path}: item {i}", value


def record_format(record) -> str:
    from internlm.data.chat import detect_format

    return detect_format(record) if isinstance(record, dict) else "text"


# ----------------------------------------------------------------------------------------------------
# Encoding (module-level so multiprocessing workers can import it under any start method)


class RecordEncoder:
    """Signed ids of a record: text -> [bos] + ids + [eos], all with loss; chat/instruction -> the chat
    template with loss on the assistant turns only (internlm.data.chat)."""

    def __init__(self, tokenizer_path, add_bos: bool = True, add_eos: bool = True):
        import sentencepiece as spm

        self.path = str(tokenizer_path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.add_bos, self.add_eos = add_bos, add_eos
        self._chat = None

    @property
    def chat(self):
        if self._chat is None:
            from internlm.data.chat import ChatEncoder

            self._chat = ChatEncoder(self.sp, self.path, self.add_bos)
        return self._chat

    def texts(self, texts: list[str]) -> list[list[int]]:
        head = [self.sp.bos_id()] if self.add_bos else []
        tail = [self.sp.eos_id()] if self.add_eos else []
        return [head + ids + tail for ids in self.sp.encode(texts, num_threads=1)]

    def batch(self, items: list[tuple[str, object]]) -> list[list[int]]:
        if all(isinstance(r, str) for _, r in items):
            return self.texts([r for _, r in items])
        return [self.one(where, r) for where, r in items]

    def one(self, where: str, record) -> list[int]:
        from internlm.data.chat import instruction_messages

        if isinstance(record, str):
            return self.texts([record])[0]
        if "messages" in record:
            return self.chat.encode(record["messages"], where)
        for k in ("instruction", "output"):
            if not isinstance(record.get(k), str):
                raise DataFormatError(f'{where}: "{k}" must be a string, got {type(record.get(k)).__name__}')
        if not isinstance(record.get("input", ""), (str, type(None))):
            raise DataFormatError(f'{where}: "input" must be a string')
        return self.chat.encode(instruction_messages(record), where)


_worker: RecordEncoder | None = None


def _init_worker(tokenizer_path: str, add_bos: bool, add_eos: bool) -> None:
    global _worker
    _worker = RecordEncoder(tokenizer_path, add_bos, add_eos)


def _encode_batch(items: list[tuple[str, object]]) -> list[list[int]]:
    return _worker.batch(items)


def _batches(items: Iterable, batch_size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_records(
    records: Iterable[tuple[str, object]],
    tokenizer_path: str | os.PathLike,
    workers: int = 1,
    add_bos: bool = True,
    add_eos: bool = True,
    batch_size: int = 256,
) -> Iterator[list[int]]:
    """Signed ids of each ``(where, record)`` of `iter_records`, in input order, with `workers` processes."""
    if workers <= 1:
        enc = RecordEncoder(tokenizer_path, add_bos, add_eos)
        for batch in _batches(records, batch_size):
            yield from enc.batch(batch)
        return

    import multiprocessing

    with multiprocessing.Pool(workers, _init_worker, (str(tokenizer_path), add_bos, add_eos)) as pool:
        for encoded in pool.imap(_encode_batch, _batches(records, batch_size)):
            yield from encoded


def encode_texts(
    texts: Iterable[str],
    tokenizer_path: str | os.PathLike,
    workers: int = 1,
    add_bos: bool = True,
    add_eos: bool = True,
    batch_size: int = 256,
) -> Iterator[list[int]]:
    """Yield [bos] + sp.encode(text) + [eos] for each text, in input order, with `workers` processes."""
    yield from encode_records(((f"sample {i}", t) for i, t in enumerate(texts)), tokenizer_path, workers,
                              add_bos, add_eos, batch_size)
