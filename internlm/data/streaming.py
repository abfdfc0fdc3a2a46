"""Raw data read with Hugging Face `datasets` and tokenized on the fly (``data.type="streaming"``).

A *streaming corpus* is one of

- a data file: ``.jsonl`` / ``.json`` (one JSON object per sample), ``.parquet`` or ``.txt`` (a line a
  sample);
- a folder of such files, searched recursively and typed by their first-level sub-folder as the
  ``.bin`` folders are (``root/en/a.jsonl`` has type "en", ``root/b.jsonl`` type "default");
- a folder written by ``datasets``' ``save_to_disk`` (its "train" split for a DatasetDict).

Files are read in sorted order, records in file order, with ``datasets``' streaming readers (local
files only, nothing downloaded). Each record is text (a ``"text"`` field), chat (``"messages"``) or
instruction (``"instruction"``/``"input"``/``"output"``) data, detected per file from its first record
or forced by ``data.format``, and encoded by ``internlm.data.text.RecordEncoder`` with the same loss
masks as ``tools/tokenizer.py`` writes into ``.bin`` files.

A position in the corpus is ``(epoch, file, record, offset)``: the next token to train on is token
``offset`` of that record. It depends on nothing but the data, so it resumes under any layout.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from internlm.data.tokenized import DataFormatError

__all__ = ["StreamingCorpus", "Position", "Sample", "samples_from", "STREAM_SUFFIXES", "is_streaming_folder"]

STREAM_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
CHUNK = 256  # records tokenized together


class Position(NamedTuple):
    epoch: int
    file: int
    record: int
    offset: int


class Sample(NamedTuple):
    tokens: np.ndarray  # signed ids: negative = input only
    type_id: int
    epoch: int
    file: int
    record: int
    offset: int  # where `tokens` starts in the record's encoding (non-zero only for a resumed record)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def is_streaming_folder(path) -> bool:
    """Whether `path` holds raw data for streaming rather than .bin token files."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() in STREAM_SUFFIXES
    if _is_saved_dataset(path):
        return True
    return path.is_dir() and not any(path.rglob("*.bin")) and any(
        p.suffix.lower() in STREAM_SUFFIXES for p in path.rglob("*") if p.is_file())


def _datasets():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only, never the hub
    try:
        import datasets
    except ImportError:
        from internlm.errors import UserError

        raise UserError("data.type='streaming' reads data with Hugging Face datasets: "
                        "pip install 'internlm-train[stream]' (or pip install datasets)") from None
    datasets.disable_progress_bars()
    return datasets


class StreamingCorpus:
    """The files of a streaming corpus, their types and their records."""

    def __init__(self, root, type_names=None, fmt: str = "auto"):
        from internlm.data.chat import FORMATS

        if fmt not in FORMATS:
            raise DataFormatError(f"data.format={fmt!r}: choose one of {list(FORMATS)}")
        self.root = Path(root)
        self.fmt = fmt
        if self.root.is_file() or _is_saved_dataset(self.root):
            if self.root.is_file() and self.root.suffix.lower() not in STREAM_SUFFIXES:
                raise DataFormatError(f"{self.root}: streaming reads {sorted(STREAM_SUFFIXES)} files or a "
                                      "datasets save_to_disk folder")
            paths = [self.root]
        elif self.root.is_dir():
            paths = sorted((p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in STREAM_SUFFIXES),
                           key=lambda p: p.relative_to(self.root).as_posix())
            if not paths:
                raise DataFormatError(f"{self.root}: no {'/'.join(sorted(STREAM_SUFFIXES))} files found in this "
                                      "folder or below it")
        else:
            raise DataFormatError(f"{self.root}: data folder or file not found")
        self.paths = paths
        file_types = [self._type_of(p) for p in paths]
        if type_names is None:
            type_names = sorted(set(file_types))
        unknown = sorted(set(file_types) - set(type_names))
        if unknown:
            raise DataFormatError(f"{self.root}: sub-folders {unknown} are not among the types {list(type_names)}")
        self.type_names = list(type_names)
        self.file_type_ids = [self.type_names.index(t) for t in file_types]

    def _type_of(self, path: Path) -> str:
        if path == self.root:
            return "default"
        parts = path.relative_to(self.root).parts
        return parts[0] if len(parts) > 1 else "default"

    @property
    def names(self) -> list[str]:
        """The files as recorded in a checkpoint (relative to the root)."""
        return [p.name if p == self.root else p.relative_to(self.root).as_posix() for p in self.paths]

    def _rows(self, path: Path, start: int) -> Iterator[dict]:
        ds = _datasets()
        if _is_saved_dataset(path):
            data = ds.load_from_disk(str(path))
            if isinstance(data, ds.DatasetDict):
                if "train" not in data:
                    raise DataFormatError(f"{path}: a DatasetDict without a 'train' split (has {list(data)})")
                data = data["train"]
            return iter(data.select(range(min(start, len(data)), len(data))))
        builder = STREAM_SUFFIXES[path.suffix.lower()]
        data = ds.load_dataset(builder, data_files=[str(path)], split="train", streaming=True)
        return iter(data.skip(start) if start else data)

    def records(self, file: int, start: int = 0) -> Iterator[tuple[int, str, object]]:
        """``(record index, where, record)`` of file `file` from record `start`: a string (text) or a
        dict (chat, instruction). Blank text records are skipped (their index is used up)."""
        from internlm.data.chat import detect_format

        path = self.paths[file]
        fmt = self.fmt
        rows = self._rows(path, start)
        index = start
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as exc:  # pyarrow's parse errors: name the file and where
                raise DataFormatError(_read_error(path, index, exc)) from None
            where = f"{path}: record {index + 1}"
            if not isinstance(row, dict):
                raise DataFormatError(f"{where} is a {type(row).__name__}, expected an object")
            row = _drop_none(row)
            if fmt == "auto":
                fmt = detect_format(row)
            if fmt == "text":
                text = row.get("text")
                if not isinstance(text, str):
                    raise DataFormatError(f"{where} has no string 'text' field (keys: {sorted(row)[:8]})")
                if text.strip():
                    yield index, where, text
            else:
                if detect_format(row) != fmt:
                    need = '"messages"' if fmt == "chat" else '"instruction" and "output"'
                    raise DataFormatError(f"{where} is not {fmt} data: it needs {need} (got {sorted(row)[:8]}); "
                                          "a file holds one format")
                yield index, where, row
            index += 1


def _drop_none(value):
    """Arrow fills the fields a record lacks with None; the encoder wants them absent."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _read_error(path: Path, index: int, exc: Exception) -> str:
    """The message for a file datasets cannot read: the exact line for a JSON Lines file."""
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except ValueError as e:
                    return f"{path}: line {lineno} is not valid JSON ({e})"
    return f"{path}: cannot read the records after record {index} ({type(exc).__name__}: {exc})"


def samples_from(corpus: StreamingCorpus, encoder, start: Position, min_length: int = 0,
                 pool=None) -> Iterator[Sample]:
    """Encoded samples from `start` on, epoch after epoch; the first is the start record from its offset.
    Samples shorter than ``min_length`` (and empty ones) are skipped whole. `pool`, a
    ``multiprocessing.Pool`` whose workers hold a RecordEncoder, tokenizes chunks in parallel."""
    epoch, file, record = start.epoch, start.file, start.record
    offset = start.offset
    while True:
        found = False
        for f in range(file, len(corpus.paths)):
            records = corpus.records(f, record if f == file else 0)
            chunks = _chunks(records)
            for chunk, encoded in _encode(chunks, encoder, pool):
                for (index, _, _), ids in zip(chunk, encoded):
                    found = True
                    if len(ids) < max(min_length, 1):
                        continue
                    tokens, at = np.asarray(ids, dtype=np.int64), 0
                    if offset:
                        tokens, at, offset = tokens[offset:], offset, 0
                        if not len(tokens):
                            continue
                    yield Sample(tokens, corpus.file_type_ids[f], epoch, f, index, at)
            offset = 0
        if not found and file == 0 and record == 0:
            raise DataFormatError(f"{corpus.root}: no samples to train on")
        epoch, file, record = epoch + 1, 0, 0


def _chunks(records) -> Iterator[list]:
    while True:
        chunk = list(itertools.islice(records, CHUNK))
        if not chunk:
            return
        yield chunk


def _encode(chunks, encoder, pool):
    if pool is None:
        for chunk in chunks:
            yield chunk, encoder.batch([(where, rec) for _, where, rec in chunk])
        return
    from collections import deque

    from internlm.data.text import _encode_batch

    pending = deque()

    def items():
        for chunk in chunks:
            pending.append(chunk)
            yield [(where, rec) for _, where, rec in chunk]

    for encoded in pool.imap(_encode_batch, items()):
        yield pending.popleft(), encoded
