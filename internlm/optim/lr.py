"""Learning-rate and Adam-beta2 schedules with InternEvo's semantics.

Both schedulers are stepped once per *successful* optimizer update (InternEvo skips them when the
step was skipped for an fp16 overflow), so "step" below means number of updates done so far.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["lr_at", "WarmupCosineLR", "Beta2Scheduler"]


def lr_at(
    step: int,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    eta_min: float,
    init_steps: int = 0,
) -> float:
    """Learning rate for update number ``step`` (0-based), InternEvo's FineTuneCosineAnnealingWarmupLR.

    * ``step < init_steps``: 0;
    * then linear warmup that *ends* at base_lr: ``base_lr * (step + 1 - init_steps) / warmup_steps``,
      so the very first update already uses base_lr / warmup_steps (not 0) and update
      ``init_steps + warmup_steps - 1`` uses base_lr;
    * then cosine from base_lr at ``init_steps + warmup_steps`` down to ``eta_min`` at ``total_steps``;
    * ``eta_min`` from ``total_steps`` on (InternEvo's torch cosine would start rising again there).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    warmup_end = init_steps + warmup_steps
    if step < init_steps:
        return 0.0
    if step < warmup_end:
        return base_lr * (step + 1 - init_steps) / warmup_steps
    if step >= total_steps:
        return eta_min
    progress = (step - warmup_end) / (total_steps - warmup_end)
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * progress)) / 2


class WarmupCosineLR(LRScheduler):
    """Linear warmup then cosine decay, per param group (each group's own initial lr is its base).

    ``warmup_steps = int(warmup_ratio * total_steps)`` as InternEvo computes it; ``init_steps`` updates
    with lr 0 come before the warmup. Construction sets the lr of update 0, and each ``step()`` after an
    update moves to the next one. ``state_dict``/``load_state_dict`` save and restore the position.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_ratio: float = 0.0,
        eta_min: float = 0.0,
        init_steps: int = 0,
        last_epoch: int = -1,
    ):
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(total_steps * warmup_ratio)
        self.init_steps = int(init_steps)
        self.eta_min = float(eta_min)
        super().__init__(optimizer, last_epoch)

    def _lrs_at(self, step: int) -> list[float]:
        return [
            lr_at(step, base_lr, self.total_steps, self.warmup_steps, self.eta_min, self.init_steps)
            for base_lr in self.base_lrs
        ]

    def get_lr(self) -> list[float]:
        return self._lrs_at(self.last_epoch)

    def _get_closed_form_lr(self) -> list[float]:
        return self._lrs_at(self.last_epoch)

    SHAPE_KEYS = ("total_steps", "warmup_steps", "init_steps", "eta_min")

    def state_dict(self) -> dict:
        """The schedule's position and the shape it had, as plain numbers (a checkpoint's state.json)."""
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count,
                **{k: getattr(self, k) for k in self.SHAPE_KEYS}}

    def load_state_dict(self, state_dict: dict) -> list[str]:
        """Restore the position; the shape (total steps, warm-up, eta_min, base lr) follows this
        scheduler's own settings, so a resumed run may extend training. Returns the shape keys that
        differ from the saved ones."""
        changed = [k for k in self.SHAPE_KEYS if k in state_dict and state_dict[k] != getattr(self, k)]
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = list(lrs)
        return changed


class Beta2Scheduler:
    """InternEvo's Adam beta2 schedule: after update t (1-based), ``beta2 = max(init_beta2, 1 - t**-c)``.

    beta2 therefore starts at ``init_beta2`` and rises towards 1 once ``1 - t**-c`` passes it (for
    init_beta2=0.95, c=0.8 that is after t=43). ``c <= 0`` disables the schedule (InternEvo's configs
    use c=0). Construction leaves the optimizer untouched; ``step()`` sets every group's
    ``betas = (beta1, beta2)``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, init_beta2: float, c: float = 0.8, cur_iter: int = -1):
        self.optimizer = optimizer
        self.init_beta2 = float(init_beta2)
        self.c = float(c)
        self.cur_iter = 0 if cur_iter == -1 else int(cur_iter)

    def get_beta2(self) -> float:
        if self.c <= 0 or self.cur_iter <= 0:
            return self.init_beta2
        return max(self.init_beta2, 1.0 - self.cur_iter ** (-self.c))

    def _apply(self) -> None:
        beta2 = self.get_beta2()
        for group in self.optimizer.param_groups:
            beta1 = group["betas"][0]
            group["betas"] = (beta1, beta2)

    def step(self, cur_iter: int | None = None) -> None:
        self.cur_iter = self.cur_iter + 1 if cur_iter is None else int(cur_iter)
        self._apply()

    def state_dict(self) -> dict:
        return {"cur_iter": self.cur_iter, "init_beta2": self.init_beta2, "c": self.c}

    def load_state_dict(self, state_dict: dict) -> None:
        self.cur_iter = int(state_dict["cur_iter"])
        self.init_beta2 = float(state_dict["init_beta2"])
        self.c = float(state_dict["c"])
        if self.cur_iter > 0:
            self._apply()
