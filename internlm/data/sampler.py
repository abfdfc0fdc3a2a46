"""Which packed rows each data-parallel rank trains on, step by step, resumably.

The order is defined globally, never per rank, so that it does not depend on the parallel layout:

- every epoch is a permutation of ``range(num_rows)`` (numpy generator seeded with ``seed + epoch``;
  the identity without shuffling);
- the permutation is cut into global steps of ``G = dp_size * micro_num * micro_bsz`` rows; when the
  rows left in an epoch do not fill a step, the next epoch begins;
- inside a step the rows form ``dp_size * micro_num`` micro-batches of ``micro_bsz`` consecutive rows,
  and dp rank ``r`` takes micro-batches ``[r * micro_num, (r + 1) * micro_num)``.

So two layouts with the same ``dp_size * micro_num`` (and ``micro_bsz``) see the same micro-batches in
the same order, only spread differently over ranks, and the state that needs saving is just a
position in the global order: (epoch, rows consumed in that epoch).
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["StatefulBatchSampler"]


class StatefulBatchSampler:
    """Infinite iterator over steps; each step is ``micro_num`` lists of ``micro_bsz`` row indices
    for this rank. ``state_dict()`` after ``k`` steps were taken resumes at step ``k + 1``."""

    def __init__(
        self,
        num_rows: int,
        micro_num: int,
        micro_bsz: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if min(micro_num, micro_bsz, dp_size) <= 0:
            raise ValueError(f"micro_num, micro_bsz and dp_size must be positive, got {micro_num}, {micro_bsz}, "
                             f"{dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.num_rows = int(num_rows)
        self.micro_num = int(micro_num)
        self.micro_bsz = int(micro_bsz)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        # drop_last=False completes an epoch's last, partial step with rows from the start of the same
        # epoch's order, so every row is seen each epoch and every step keeps its shape.
        self.drop_last = bool(drop_last)
        self.global_rows_per_step = self.dp_size * self.micro_num * self.micro_bsz
        if self.num_rows < self.global_rows_per_step:
            raise ValueError(
                f"{self.num_rows} packed rows cannot fill one global step of {self.global_rows_per_step} rows "
                f"(dp_size={dp_size} x micro_num={micro_num} x micro_bsz={micro_bsz}); use more data or a smaller batch"
            )
        self.epoch = 0
        self.rows_consumed_in_epoch = 0
        self._order_epoch = None
        self._order = None

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.num_rows, self.global_rows_per_step)
        return full if self.drop_last or rest == 0 else full + 1

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global row order of ``epoch`` (cached for the current one)."""
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng(self.seed + epoch).permutation(self.num_rows)
            else:
                self._order = np.arange(self.num_rows, dtype=np.int64)
            self._order_epoch = epoch
        return self._order

    def _start_new_epoch_if_done(self) -> None:
        left = self.num_rows - self.rows_consumed_in_epoch
        if left <= 0 or (self.drop_last and left < self.global_rows_per_step):
            self.epoch += 1
            self.rows_consumed_in_epoch = 0

    def next_global_step(self) -> np.ndarray:
        """Rows of the next global step, shaped ``[dp_size * micro_num, micro_bsz]``; advances the state."""
        self._start_new_epoch_if_done()
        order = self.epoch_order(self.epoch)
        begin = self.rows_consumed_in_epoch
        rows = order[begin : begin + self.global_rows_per_step]
        if len(rows) < self.global_rows_per_step:  # only with drop_last=False: wrap within this epoch
            rows = np.concatenate([rows, order[: self.global_rows_per_step - len(rows)]])
        self.rows_consumed_in_epoch = min(begin + self.global_rows_per_step, self.num_rows)
        self._start_new_epoch_if_done()
        return rows.reshape(self.dp_size * self.micro_num, self.micro_bsz)

    def __iter__(self):
        return self

    def __next__(self) -> list[list[int]]:
        step = self.next_global_step()
        mine = step[self.dp_rank * self.micro_num : (self.dp_rank + 1) * self.micro_num]
        return mine.tolist()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "rows_consumed_in_epoch": self.rows_consumed_in_epoch,
            "seed": self.seed,
            "num_rows": self.num_rows,
            "global_rows_per_step": self.global_rows_per_step,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") == "streaming":
            from internlm.data.tokenized import DataFormatError

            raise DataFormatError("the checkpoint's data position is in streaming data (data.type='streaming'); "
                                  "it cannot resume a run on .bin data: load the model only "
                                  "(load_ckpt_info content=('model',)) to switch data types")
        num_rows = int(state["num_rows"])
        if num_rows != self.num_rows:
            raise ValueError(
                f"cannot resume the data order: the checkpoint was taken over {num_rows} packed rows but this "
                f"dataset has {self.num_rows} (did the data, packed_length or min_length change?)"
            )
        seed = int(state["seed"])
        if seed != self.seed:
            warnings.warn(f"resuming the data order with the checkpoint's seed {seed} instead of the configured "
                          f"{self.seed}", stacklevel=2)
        saved_rows_per_step = int(state["global_rows_per_step"])
        if saved_rows_per_step != self.global_rows_per_step:
            warnings.warn(
                f"global batch changed from {saved_rows_per_step} to {self.global_rows_per_step} rows per step; "
                "continuing from the same row of the epoch, but the batches will not match the original run",
                stacklevel=2,
            )
        epoch, consumed = int(state["epoch"]), int(state["rows_consumed_in_epoch"])
        if epoch < 0 or not 0 <= consumed <= self.num_rows:
            raise ValueError(f"invalid sampler state: epoch={epoch}, rows_consumed_in_epoch={consumed}")
        self.seed = seed
        self.epoch = epoch
        self.rows_consumed_in_epoch = consumed
        self._order_epoch = None
        self._start_new_epoch_if_done()
