"""Batches for the trainer: packed rows, picked by the stateful sampler, laid out for the model.

A micro-batch is ``micro_bsz`` packed rows of ``packed_length`` (= ``seq_len``) tokens. The loader
puts those rows end to end as ONE row of ``micro_bsz * packed_length`` tokens: that is InternEvo's
``micro_bsz * seq_len`` layout, and it lets the model see a single varlen sequence batch whatever
``micro_bsz`` is. Nothing leaks across the joins, because positions restart and labels are
``IGNORE_INDEX`` at every piece end (see ``PackedDataset``), and every packed row starts a new piece.

A step's batch stacks the ``micro_num`` micro-batches, so every tensor is ``[micro_num, micro_bsz *
packed_length]``; the trainer feeds ``batch[key][i : i + 1]`` as micro-batch ``i``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from internlm.data.packed import PackedDataset
from internlm.data.sampler import StatefulBatchSampler

__all__ = ["BATCH_KEYS", "TrainLoader", "build_train_loader", "build_valid_loader"]

BATCH_KEYS = ("input_ids", "labels", "position_ids", "type_ids")


def _gather_micro_batches(dataset: PackedDataset, micro_batches) -> dict[str, torch.Tensor]:
    """``micro_batches`` is a list of lists of row indices; returns int64 tensors of shape
    ``[len(micro_batches), rows_per_micro_batch * packed_length]``."""
    n = dataset.packed_length
    rows_per_micro = len(micro_batches[0])
    out = {key: np.empty((len(micro_batches), rows_per_micro * n), dtype=np.int64) for key in BATCH_KEYS}
    for i, rows in enumerate(micro_batches):
        if len(rows) != rows_per_micro:
            raise ValueError("all micro-batches of a step must hold the same number of rows")
        for j, row in enumerate(rows):
            sample = dataset[row]
            for key in BATCH_KEYS:
                out[key][i, j * n : (j + 1) * n] = sample[key]
    return {key: torch.from_numpy(value) for key, value in out.items()}


class TrainLoader:
    """Infinite iterator of step batches for one dp rank. Its state is the sampler's, which is
    layout-independent, so a checkpoint resumes under another dp size with the same global batch."""

    def __init__(self, dataset: PackedDataset, sampler: StatefulBatchSampler):
        self.dataset = dataset
        self.sampler = sampler
        self.type_names = dataset.type_names
        self.packed_length = dataset.packed_length
        self.micro_num = sampler.micro_num
        self.micro_bsz = sampler.micro_bsz
        self.tokens_per_step_global = sampler.global_rows_per_step * dataset.packed_length

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return _gather_micro_batches(self.dataset, next(self.sampler))

    def next(self) -> dict[str, torch.Tensor]:
        return self.__next__()

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def build_train_loader(
    source,
    packed_length: int,
    micro_num: int,
    micro_bsz: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    min_length: int = 0,
    pack_sample_into_one: bool = False,
    shuffle: bool = True,
) -> TrainLoader:
    dataset = PackedDataset(source, packed_length, min_length=min_length, pack_sample_into_one=pack_sample_into_one)
    sampler = StatefulBatchSampler(
        len(dataset), micro_num, micro_bsz, dp_rank=dp_rank, dp_size=dp_size, seed=seed, shuffle=shuffle
    )
    return TrainLoader(dataset, sampler)


def build_valid_loader(
    source,
    packed_length: int,
    micro_bsz: int,
    valid_micro_num: int,
    dp_rank: int,
    dp_size: int,
) -> list[dict[str, torch.Tensor]]:
    """One unshuffled pass over the validation rows for this rank, as a list of micro-batches
    shaped ``[1, micro_bsz * packed_length]`` per key.

    Rows are grouped into micro-batches in order; the pass takes ``dp_size * valid_micro_num`` of them
    spread evenly over the set (all of them when there are no more) and, like one training step, rank
    ``r`` takes a contiguous block of those. Every rank gets the same number of micro-batches, so evaluation
    collectives line up: the remainder that does not divide evenly over ranks is left out.
    ``valid_micro_num <= 0`` means no per-rank cap.
    """
    if micro_bsz <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"invalid micro_bsz={micro_bsz}, dp_rank={dp_rank}, dp_size={dp_size}")
    dataset = PackedDataset(source, packed_length)
    per_rank = (len(dataset) // micro_bsz) // dp_size
    if valid_micro_num > 0:
        per_rank = min(per_rank, valid_micro_num)
    if per_rank == 0:
        warnings.warn(
            f"validation data gives {len(dataset)} rows of {packed_length} tokens: too few for one micro-batch "
            f"of {micro_bsz} rows on each of {dp_size} ranks; validation is skipped", stacklevel=2
        )
        return []
    # the micro-batches are spread evenly over the whole validation set (a capped pass would otherwise
    # see only its first files, e.g. one type of a folder holding several)
    total = (len(dataset) // micro_bsz)
    picked = (np.arange(per_rank * dp_size) * total) // (per_rank * dp_size)
    batches = []
    for m in picked[dp_rank * per_rank:(dp_rank + 1) * per_rank].tolist():
        rows = list(range(m * micro_bsz, (m + 1) * micro_bsz))
        batches.append(_gather_micro_batches(dataset, [rows]))
    return batches
