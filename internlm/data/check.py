"""Data checked before training starts, so that a bad file fails at step 0 with its name, not at step 62.

`check_file` verifies one X.bin against its X.bin.meta and the vocabulary, vectorised with numpy:

- the meta table covers the .bin exactly: one row per line, in order, contiguous and non-overlapping
  (a meta that lists 10 of 400 lines, or points every row at sample 0, is found here);
- each row's token count is its line's;
- every token id is in [0, vocab_size), or in (-vocab_size, 0) for a masked token (InternEvo's
  convention for a token that is input but not target; refused when `allow_negative=False`).

Lines written by this framework's tools (`{"tokens":[...]}` and nothing else) are parsed in one pass
over the bytes; other lines (e.g. with InternEvo's extra "type_id" key) are parsed one by one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from internlm.data.tokenized import DataFormatError, TokenizedFile, TokenizedFolder, meta_path

_PREFIX = b'{"tokens":['
_NOT_NUMBER = bytes(c for c in range(256) if chr(c) not in "0123456789-")
_TO_SPACES = bytes.maketrans(_NOT_NUMBER, b" " * len(_NOT_NUMBER))


@dataclass
class FolderSummary:
    root: str
    files: int
    samples: int
    tokens: int
    tokens_per_type: dict = field(default_factory=dict)
    seconds: float = 0.0
    masked: int = 0  # tokens stored negative: input only, never a target

    def line(self) -> str:
        types = ", ".join(f"{name} {n:,}" for name, n in self.tokens_per_type.items())
        masked = f", {self.masked:,} masked (input only)" if self.masked else ""
        return (f"data {self.root}: {self.files} file(s), {self.samples:,} samples, {self.tokens:,} tokens "
                f"({types}){masked}; checked in {self.seconds:.2f}s")


def _parse_ints(text: bytes) -> np.ndarray:
    """Whitespace-separated integers -> int64 array, in C."""
    if not text.strip():
        return np.zeros(0, dtype=np.int64)
    return np.fromstring(text, dtype=np.int64, sep=" ")


def _line_starts(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ends = np.flatnonzero(data == 10)
    return np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.zeros(0, dtype=np.int64), ends


def check_file(file: TokenizedFile, vocab_size: int, allow_negative: bool = True) -> int:
    """Raise DataFormatError naming the file, the sample and the problem; returns the token count."""
    return _check_file(file, vocab_size, allow_negative)[0]


def _check_file(file: TokenizedFile, vocab_size: int, allow_negative: bool) -> tuple[int, int]:
    """(tokens, masked tokens) of a file that passes the checks."""
    raw = file.path.read_bytes()
    data = np.frombuffer(raw, dtype=np.uint8)
    mpath = meta_path(file.path)
    starts, ends = _line_starts(data)
    if len(raw) and raw[-1:] != b"\n":
        raise DataFormatError(f"{file.path}: the last line (byte offset {int(starts[-1]) if len(starts) else 0}) "
                              f"has no newline: the file was cut short")
    offsets, lengths = file._offsets, file.lengths
    if len(offsets) != len(starts):
        raise DataFormatError(f"{mpath}: lists {len(offsets)} samples but {file.path} holds {len(starts)} lines; "
                              f"rewrite it with tools/tokenizer.py")
    bad = np.flatnonzero(offsets != starts)
    if len(bad):
        i = int(bad[0])
        raise DataFormatError(f"{mpath}: sample {i} starts at byte offset {int(offsets[i])}, but line {i} of "
                              f"{file.path} starts at {int(starts[i])} (rows must cover the lines in order)")
    fast = raw.count(b":") == len(starts) and raw.count(_PREFIX) == len(starts)
    if fast:
        tokens = _parse_ints(raw.translate(_TO_SPACES))
        commas = np.concatenate([[0], np.cumsum(data == 44)])
        per_line = commas[ends] - commas[starts]
        empty = data[starts + len(_PREFIX)] == ord("]")
        counts = np.where(empty, 0, per_line + 1)
    else:
        parsed = [file[i] for i in range(len(file))]
        counts = np.asarray([len(t) for t in parsed], dtype=np.int64)
        tokens = np.concatenate(parsed) if parsed else np.zeros(0, dtype=np.int64)
    bad = np.flatnonzero(counts != lengths)
    if len(bad) or counts.sum() != len(tokens):
        i = int(bad[0]) if len(bad) else 0
        raise DataFormatError(f"{file.path}: sample {i} at byte offset {int(offsets[i])} has {int(counts[i])} tokens "
                              f"but {mpath} says {int(lengths[i])}")
    low = 0 if not allow_negative else -(vocab_size - 1)
    bad = np.flatnonzero((tokens < low) | (tokens >= vocab_size))
    if len(bad):
        k = int(bad[0])
        i = int(np.searchsorted(np.cumsum(lengths), k, side="right"))
        what = "negative" if tokens[k] < 0 else f">= model.vocab_size={vocab_size}"
        raise DataFormatError(f"{file.path}: sample {i} (byte offset {int(offsets[i])}) holds token id "
                              f"{int(tokens[k])}, {what}; the data was tokenized with another tokenizer, or "
                              f"vocab_size is too small")
    return int(len(tokens)), int((tokens < 0).sum())


def check_folder(folder: TokenizedFolder, vocab_size: int, allow_negative: bool = True) -> FolderSummary:
    t0 = time.perf_counter()
    per_type = {name: 0 for name in folder.type_names}
    total = masked = 0
    for file, type_id in zip(folder.files, folder.file_type_ids):
        n, m = _check_file(file, vocab_size, allow_negative)
        per_type[folder.type_names[type_id]] += n
        total += n
        masked += m
    return FolderSummary(root=str(folder.root), files=len(folder.files), samples=len(folder), tokens=total,
                         tokens_per_type=per_type, seconds=time.perf_counter() - t0, masked=masked)
