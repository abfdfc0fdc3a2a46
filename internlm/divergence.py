"""A run that diverges stops instead of training on (and saving) garbage.

Every rank sees the same global loss and gradient norm, so every rank takes the same decision:

- a step whose gradient norm (or loss) is not finite is skipped by the optimizer; here it is also
  reported, and after `hybrid_zero_optimizer.max_skipped_steps` consecutive skips the run stops with
  DivergenceError (exit status 2) naming the last good checkpoint to go back to;
- a loss above `monitor.loss_spike_factor` times the mean of the last `monitor.loss_spike_window`
  steps is reported as a spike (a warning line and `loss_spike: true` in metrics.jsonl);
- `check_finite` refuses to checkpoint parameters that hold NaN or inf (all ranks agree).
"""
from __future__ import annotations

import math
from collections import deque

import torch
import torch.distributed as dist

from internlm.errors import UserError
from internlm.log import logger


class DivergenceError(UserError):
    """Training diverged: non-finite gradients for too many consecutive steps, or non-finite weights."""


class DivergenceGuard:
    def __init__(self, max_skipped_steps: int, spike_factor: float, spike_window: int):
        self.max_skipped = max_skipped_steps
        self.spike_factor = spike_factor
        self.recent: deque[float] = deque(maxlen=spike_window)
        self.consecutive_skips = 0

    def observe(self, step: int, loss: float, grad_norm: float, stepped: bool, loss_scale: float = 1.0) -> dict:
        """Check one finished step; returns extra metrics (`loss_spike`). Raises DivergenceError."""
        extra = {}
        if not stepped:
            self.consecutive_skips += 1
            scale = f", loss scale now {loss_scale:g}" if loss_scale != 1.0 else ""
            logger.warning(f"step {step} skipped: gradient norm {grad_norm} (loss {loss}){scale}; "
                           f"{self.consecutive_skips} consecutive skip(s), the run stops at {self.max_skipped}")
            if self.consecutive_skips >= self.max_skipped:
                raise DivergenceError(
                    f"training diverged: {self.consecutive_skips} consecutive steps (up to step {step}) had "
                    f"non-finite gradients (last loss {loss}, gradient norm {grad_norm}); stopping without "
                    f"saving. Resume from the last checkpoint with a lower adam.lr (or more warm-up), or raise "
                    f"hybrid_zero_optimizer.max_skipped_steps.")
            return extra
        self.consecutive_skips = 0
        if not math.isfinite(loss):
            return extra
        if self.spike_factor > 0 and len(self.recent) == self.recent.maxlen:
            mean = sum(self.recent) / len(self.recent)
            if mean > 0 and loss > self.spike_factor * mean:
                logger.warning(f"loss spike at step {step}: {loss:.4f} is {loss / mean:.1f}x the mean of the last "
                               f"{len(self.recent)} steps ({mean:.4f})")
                extra["loss_spike"] = True
        self.recent.append(loss)
        return extra


def first_non_finite(modules) -> str | None:
    """The name of the first parameter of `modules` (local shards) holding NaN or inf, or None."""
    for module in modules:
        for name, p in module.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if not bool(torch.isfinite(local.detach()).all()):
                return name
    return None


def check_finite(modules, device: torch.device, what: str) -> None:
    """Raise DivergenceError on every rank when any rank holds a non-finite parameter."""
    bad = first_non_finite(modules)
    flag = torch.tensor([1.0 if bad else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        where = f"parameter {bad}" if bad else "a parameter on another rank"
        raise DivergenceError(f"refusing to {what}: {where} holds NaN or inf values (training diverged)")
