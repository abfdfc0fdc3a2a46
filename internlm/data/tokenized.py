"""InternEvo's pre-tokenized data format: ``X.bin`` plus ``X.bin.meta``.

``X.bin`` is text, one JSON object per line: ``{"tokens": [int, ...]}`` (InternEvo's tools may add a
``"type_id"`` key, which readers here ignore: the type comes from the folder a file sits in).
``X.bin.meta`` is a ``.npy`` file (written through an open handle, so it keeps its name) holding an
integer array of shape (N, 2): the byte offset of sample i's line in ``X.bin`` and its token count.

The meta file is what makes random access cheap: a reader seeks to the offset and parses one line,
and samplers/packers can plan with the token counts without touching ``X.bin`` at all.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from internlm.errors import UserError

__all__ = ["DataFormatError", "write_bin", "TokenizedFile", "TokenizedFolder", "meta_path"]

_INT32_MAX = np.iinfo(np.int32).max


class DataFormatError(UserError, ValueError):
    """A .bin/.bin.meta file or a data folder is missing or malformed."""


def meta_path(bin_path: str | os.PathLike) -> Path:
    return Path(str(bin_path) + ".meta")


def write_bin(path: str | os.PathLike, token_lists: Iterable[Sequence[int]]) -> int:
    """Write ``path`` (X.bin) and ``path.meta``; returns the number of samples written.

    Both files are first written under temporary names and then renamed, so a reader never sees a
    half-written pair. The meta array is int32 like InternEvo's; it switches to int64 only if byte
    offsets would not fit in int32 (a .bin over 2 GiB).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = f".tmp-{os.getpid()}"
    tmp_bin = Path(str(path) + suffix)
    tmp_meta = Path(str(meta_path(path)) + suffix)
    rows = []
    offset = 0
    try:
        with open(tmp_bin, "wb") as f:
            for tokens in token_lists:
                tokens = [int(t) for t in tokens]
                line = ('{"tokens":[' + ",".join(map(str, tokens)) + "]}\n").encode("ascii")
                f.write(line)
                rows.append((offset, len(tokens)))
                offset += len(line)
        table = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
        dtype = np.int32 if offset <= _INT32_MAX else np.int64
        with open(tmp_meta, "wb") as f:
            np.save(f, table.astype(dtype), allow_pickle=False)
        os.replace(tmp_bin, path)
        os.replace(tmp_meta, meta_path(path))
    finally:
        for tmp in (tmp_bin, tmp_meta):
            if tmp.exists():
                tmp.unlink()
    return len(rows)


class TokenizedFile:
    """Random access to the samples of one X.bin through its X.bin.meta.

    The .bin is memory-mapped on first access (not at construction, and not carried through pickling),
    so objects can be built in one process and read in DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataFormatError(f"{self.path}: data file not found")
        mpath = meta_path(self.path)
        if not mpath.is_file():
            raise DataFormatError(f"{self.path}: meta file {mpath} not found (write it with tools/tokenizer.py)")
        try:
            with open(mpath, "rb") as f:
                meta = np.load(f, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any failure here means "not a usable .npy array"
            raise DataFormatError(f"{mpath}: not a readable .npy array ({type(e).__name__}: {e})") from None
        if not isinstance(meta, np.ndarray) or meta.ndim != 2 or meta.shape[1] != 2:
            shape = getattr(meta, "shape", None)
            raise DataFormatError(f"{mpath}: expected an (N, 2) array of (offset, length), got shape {shape}")
        if not np.issubdtype(meta.dtype, np.integer):
            raise DataFormatError(f"{mpath}: expected an integer array, got dtype {meta.dtype}")
        meta = meta.astype(np.int64)
        self.size = self.path.stat().st_size
        if len(meta):
            bad = np.flatnonzero((meta[:, 0] < 0) | (meta[:, 0] >= self.size))
            if len(bad):
                i = int(bad[0])
                raise DataFormatError(
                    f"{mpath}: sample {i} has byte offset {int(meta[i, 0])} outside {self.path} "
                    f"(file size {self.size} bytes)"
                )
            bad = np.flatnonzero(meta[:, 1] < 0)
            if len(bad):
                i = int(bad[0])
                raise DataFormatError(f"{mpath}: sample {i} has a negative token count {int(meta[i, 1])}")
        self._offsets = meta[:, 0]
        self.lengths = meta[:, 1]
        self._mm: mmap.mmap | None = None
        self._fh = None

    def __len__(self) -> int:
        return len(self.lengths)

    def __repr__(self) -> str:
        return f"TokenizedFile({str(self.path)!r}, samples={len(self)}, tokens={int(self.lengths.sum())})"

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            self._fh = open(self.path, "rb")
            self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_mm"] = None
        state["_fh"] = None
        return state

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._fh.close()
            self._mm = self._fh = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {self.path} ({n} samples)")
        i = int(i) % n
        offset = int(self._offsets[i])
        mm = self._map()
        end = mm.find(b"\n", offset)
        line = mm[offset : end if end != -1 else len(mm)]
        where = f"{self.path}: sample {i} at byte offset {offset}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataFormatError(f"{where} is not valid JSON ({e}); is the .meta file stale?") from None
        if not isinstance(obj, dict) or "tokens" not in obj:
            raise DataFormatError(f'{where} has no "tokens" key')
        try:
            tokens = np.asarray(obj["tokens"], dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise DataFormatError(f'{where}: "tokens" is not a list of integers') from None
        if tokens.ndim != 1:
            raise DataFormatError(f'{where}: "tokens" is not a flat list of integers')
        if len(tokens) != self.lengths[i]:
            raise DataFormatError(
                f"{where} has {len(tokens)} tokens but the meta file says {int(self.lengths[i])}"
            )
        return tokens


class TokenizedFolder:
    """All ``*.bin`` files under ``root`` (recursively), typed by their first-level sub-folder.

    ``root/en/a.bin`` has type "en", ``root/code/x/b.bin`` type "code", ``root/c.bin`` type "default".
    Type ids index the sorted ``type_names``; pass ``type_names`` to pin the mapping (e.g. so a
    validation folder that lacks some type still uses the training folder's ids).
    Samples are ordered by file (sorted by relative path), then by position in the file.
    """

    def __init__(self, root: str | os.PathLike, type_names: Sequence[str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataFormatError(f"{self.root}: data folder not found")
        paths = sorted(
            (p for p in self.root.rglob("*.bin") if p.is_file()),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        if not paths:
            raise DataFormatError(f"{self.root}: no .bin files found in this folder or below it")
        file_types = [self._type_of(p) for p in paths]
        if type_names is None:
            type_names = sorted(set(file_types))
        else:
            unknown = sorted(set(file_types) - set(type_names))
            if unknown:
                raise DataFormatError(f"{self.root}: sub-folders {unknown} are not among the types {list(type_names)}")
        self.type_names = list(type_names)
        type_index = {name: i for i, name in enumerate(self.type_names)}

        self.files = [TokenizedFile(p) for p in paths]
        self.file_type_ids = [type_index[t] for t in file_types]
        counts = [len(f) for f in self.files]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.lengths = (
            np.concatenate([f.lengths for f in self.files]) if self.files else np.zeros(0, dtype=np.int64)
        )
        self.type_ids = np.repeat(np.asarray(self.file_type_ids, dtype=np.int64), counts)

    def _type_of(self, path: Path) -> str:
        parts = path.relative_to(self.root).parts
        return parts[0] if len(parts) > 1 else "default"

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        return (
            f"TokenizedFolder({str(self.root)!r}, files={len(self.files)}, samples={len(self)}, "
            f"tokens={int(self.lengths.sum())}, types={self.type_names})"
        )

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {self.root} ({n} samples)")
        i = int(i) % n
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.files[k][i - int(self._starts[k])], self.file_type_ids[k]
