"""Packing variable-length samples into fixed-length rows.

A *sample source* is anything with ``__len__``, ``__getitem__(i) -> (tokens, type_id)``,
``lengths`` (token count of every sample, as a numpy array) and ``type_names``.
``TokenizedFolder`` (the .bin/.bin.meta reader) and ``DummySource`` below are two of them.

``PackedDataset`` lays the kept samples end to end as one token stream and cuts it into rows of
``packed_length`` tokens, the way InternEvo packs pretraining data: no padding, and a sample that
crosses a row boundary is split between the two rows. The row index is a cumulative sum over the
sample lengths, so building it costs one numpy pass however many samples there are, and a row reads
only the few samples that overlap it.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "DummySource", "PackedDataset", "cu_seqlens_from_position_ids"]


class DummySource:
    """Deterministic synthetic samples, for smoke tests and benchmarks without a corpus.

    Sample ``i`` depends only on ``(seed, i)``, so it is the same whatever order samples are read in.
    Each sample is ``bos``, then a short random motif repeated, then ``eos``: random tokens drawn from a
    Zipf-like distribution, with structure a model can pick up, so the loss on dummy data falls below
    ``log(vocab_size)`` and a smoke test can tell a training run that learns from one that does not. Types alternate
    between ``dummy_a`` (even samples) and ``dummy_b`` (odd samples).
    """

    type_names = ["dummy_a", "dummy_b"]

    def __init__(
        self,
        vocab_size: int,
        num_samples: int,
        seed: int,
        min_len: int = 8,
        max_len: int = 256,
        bos_id: int = 1,
        eos_id: int = 2,
        max_motif_len: int = 16,
    ):
        if vocab_size <= max(bos_id, eos_id):
            raise ValueError(f"vocab_size={vocab_size} must exceed bos_id={bos_id} and eos_id={eos_id}")
        if not 2 <= min_len <= max_len:
            raise ValueError(f"need 2 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
        if num_samples < 0 or seed < 0:
            raise ValueError(f"num_samples and seed must be non-negative, got {num_samples}, {seed}")
        self.vocab_size = vocab_size
        self.seed = seed
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.max_motif_len = max(1, max_motif_len)
        self.lengths = np.random.default_rng(seed).integers(min_len, max_len + 1, size=num_samples, dtype=np.int64)
        # Zipf-like token frequencies (p(k) ~ 1/(k+2)), as in natural text: a model learns the
        # unigram distribution within a few steps, so the loss visibly falls from log(vocab_size).
        weights = 1.0 / (np.arange(vocab_size, dtype=np.float64) + 2.0)
        self._cdf = np.cumsum(weights / weights.sum())

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        index = index % len(self)
        length = int(self.lengths[index])
        # A per-sample generator keyed on (seed, index) keeps random access cheap and order-free.
        rng = np.random.default_rng([self.seed, index])
        motif_len = int(rng.integers(1, self.max_motif_len + 1))
        draws = rng.random(motif_len)
        motif = np.minimum(np.searchsorted(self._cdf, draws), self.vocab_size - 1).astype(np.int64)
        tokens = np.resize(motif, length)
        tokens[0] = self.bos_id
        tokens[-1] = self.eos_id
        return tokens, index % 2


class PackedDataset:
    """Fixed-length rows cut from the concatenation of a source's samples.

    Samples shorter than ``min_length`` are dropped; the rest are concatenated in source order and
    row ``r`` holds stream tokens ``[r * packed_length, (r + 1) * packed_length)``. The tail that does
    not fill a whole row is dropped. A row is returned as a dict of int64 arrays of length
    ``packed_length``:

    - ``input_ids``: the tokens;
    - ``labels``: the next token of the same *piece* (the part of one sample inside this row), and
      ``IGNORE_INDEX`` on the last token of every piece, so no prediction crosses a sample boundary
      (nor a row boundary, where the next token is not in this row);
    - ``position_ids``: 0, 1, ... restarting at each piece, which is also how attention finds the
      sequence boundaries (see ``cu_seqlens_from_position_ids``);
    - ``type_ids``: the type of the sample each token comes from.

    Loss masks follow InternEvo's convention: a sample token stored as ``-id`` is token ``id`` in the
    input but never a target, so the label of the position before it is ``IGNORE_INDEX``. Masks are
    per token, so they survive packing, splitting at row boundaries and ``pack_sample_into_one``.
    (Token 0 cannot be marked this way; it is always a target when it follows in the same piece.)

    With ``pack_sample_into_one=True`` the row is treated as one sequence, as InternEvo's option of
    that name does: positions run 0..packed_length-1 and labels are the next token of the stream
    (``IGNORE_INDEX`` only at the row's last position).
    """

    def __init__(self, source, packed_length: int, min_length: int = 0, pack_sample_into_one: bool = False):
        if packed_length <= 0:
            raise ValueError(f"packed_length must be positive, got {packed_length}")
        self.source = source
        self.packed_length = int(packed_length)
        self.min_length = int(min_length)
        self.pack_sample_into_one = bool(pack_sample_into_one)
        self.type_names = list(source.type_names)

        lengths = np.asarray(source.lengths, dtype=np.int64)
        if lengths.ndim != 1 or len(lengths) != len(source):
            raise ValueError(f"source.lengths must be 1-D with one entry per sample ({len(source)}), "
                             f"got shape {lengths.shape}")
        self._lengths = lengths
        keep = lengths >= max(self.min_length, 1)  # empty samples add nothing to the stream
        # kept_samples[j] is the source index of the j-th kept sample; it starts at stream offset
        # sample_offsets[j] and ends at sample_offsets[j + 1].
        self.kept_samples = np.flatnonzero(keep).astype(np.int64)
        self.sample_offsets = np.zeros(len(self.kept_samples) + 1, dtype=np.int64)
        np.cumsum(lengths[keep], out=self.sample_offsets[1:])
        self.num_dropped_samples = int(len(lengths) - len(self.kept_samples))
        self.num_tokens = int(self.sample_offsets[-1])
        self.num_rows = self.num_tokens // self.packed_length

    def __len__(self) -> int:
        return self.num_rows

    def _check_row(self, row: int) -> int:
        row = int(row)
        if not -self.num_rows <= row < self.num_rows:
            raise IndexError(f"row {row} out of range for {self.num_rows} packed rows")
        return row % self.num_rows

    def pieces(self, row: int) -> list[tuple[int, int, int, int]]:
        """The pieces of ``row`` as ``(source_index, begin, end, row_offset)``: tokens
        ``[begin, end)`` of that sample sit at ``row_offset`` in the row."""
        row = self._check_row(row)
        start = row * self.packed_length
        end = start + self.packed_length
        offsets = self.sample_offsets
        # Kept samples are non-empty, so offsets strictly increase and each search is exact.
        first = int(np.searchsorted(offsets, start, side="right")) - 1
        last = int(np.searchsorted(offsets, end, side="left")) - 1
        out = []
        for j in range(first, last + 1):
            s0, s1 = int(offsets[j]), int(offsets[j + 1])
            a, b = max(start, s0), min(end, s1)
            out.append((int(self.kept_samples[j]), a - s0, b - s0, a - start))
        return out

    def __getitem__(self, row: int) -> dict[str, np.ndarray]:
        n = self.packed_length
        input_ids = np.empty(n, dtype=np.int64)
        labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
        position_ids = np.empty(n, dtype=np.int64)
        type_ids = np.empty(n, dtype=np.int64)
        signed = np.empty(n, dtype=np.int64)  # the tokens as stored: negative = input only
        for index, begin, end, at in self.pieces(row):
            tokens, type_id = self.source[index]
            tokens = np.asarray(tokens)
            expected = int(self._lengths[index])
            if len(tokens) != expected:
                raise ValueError(f"sample {index} has {len(tokens)} tokens but source.lengths says {expected}")
            piece = tokens[begin:end]
            stop = at + len(piece)
            signed[at:stop] = piece
            labels[at : stop - 1] = piece[1:]
            position_ids[at:stop] = np.arange(len(piece), dtype=np.int64)
            type_ids[at:stop] = int(type_id)
        if self.pack_sample_into_one:
            labels[:-1] = signed[1:]
            labels[-1] = IGNORE_INDEX
            position_ids = np.arange(n, dtype=np.int64)
        np.abs(signed, out=input_ids)
        labels[labels < 0] = IGNORE_INDEX  # a masked token is never a target (IGNORE_INDEX is negative too)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "type_ids": type_ids}


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative sequence boundaries (int32, as flash-attn's varlen kernels want) from positions.

    A sequence starts wherever the position is 0, and at the first token in any case (a chunk that
    begins mid-sequence is still a sequence of its own). For a tensor with more than one dimension
    the rows are taken one after another, which is the right answer for packed rows, since each of
    them starts a new sequence.
    """
    flat = position_ids.reshape(-1)
    n = flat.numel()
    is_start = flat == 0
    if n:
        is_start[0] = True
    starts = torch.nonzero(is_start).reshape(-1)
    end = torch.tensor([n], dtype=starts.dtype, device=starts.device)
    return torch.cat([starts, end]).to(torch.int32)
