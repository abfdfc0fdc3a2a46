"""Loss scaling for fp16 training (dynamic, with hysteresis) and a constant scaler for bf16/fp32.

The optimizer multiplies the loss by ``scale`` before backward, divides the gradients by it, and calls
``update(found_inf)`` once per step; a step with an inf/nan gradient is skipped by the optimizer.
The scale is a Python float: it is identical on every rank because ``found_inf`` is all-reduced.
"""

from __future__ import annotations

__all__ = ["DynamicGradScaler", "ConstantGradScaler"]


class ConstantGradScaler:
    """A fixed scale (1.0 by default): what bf16 and fp32 training use. ``update`` does nothing."""

    def __init__(self, scale: float = 1.0):
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self._scale = float(scale)

    @property
    def scale(self) -> float:
        return self._scale

    @property
    def inv_scale(self) -> float:
        return 1.0 / self._scale

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class DynamicGradScaler:
    """Dynamic loss scale with hysteresis, as in InternEvo (and Megatron-LM).

    * overflow: the growth counter restarts; the overflow counter goes up, and once it has reached
      ``hysteresis`` the scale is multiplied by ``backoff_factor`` (not below ``min_scale``). The
      overflow counter is *not* reset by clean steps, so after ``hysteresis`` overflows every further
      overflow backs off, until the next growth.
    * clean step: the growth counter goes up; at ``growth_interval`` consecutive clean steps the scale is
      multiplied by ``growth_factor`` (not above ``max_scale``) and both counters restart.

    ``min_scale`` / ``max_scale`` of None mean no bound. The state dict uses InternEvo's key names
    (``_scale``, ``_growth_step``, ``_hysteresis_step``).
    """

    def __init__(
        self,
        initial_scale: float = 2**16,
        min_scale: float | None = 1,
        growth_factor: float = 2,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        hysteresis: int = 2,
        max_scale: float | None = 2**24,
    ):
        if initial_scale <= 0:
            raise ValueError(f"initial_scale must be positive, got {initial_scale}")
        if min_scale is not None and min_scale <= 0:
            raise ValueError(f"min_scale must be positive, got {min_scale}")
        if max_scale is not None and max_scale <= 0:
            raise ValueError(f"max_scale must be positive, got {max_scale}")
        if min_scale is not None and max_scale is not None and min_scale > max_scale:
            raise ValueError(f"min_scale {min_scale} > max_scale {max_scale}")
        if growth_factor <= 1:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0 < backoff_factor < 1:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        if hysteresis < 0:
            raise ValueError(f"hysteresis must be >= 0, got {hysteresis}")
        self._scale = float(initial_scale)
        self.min_scale = None if min_scale is None else float(min_scale)
        self.max_scale = None if max_scale is None else float(max_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self._growth_step = 0
        self._hysteresis_step = 0

    @property
    def scale(self) -> float:
        return self._scale

    @property
    def inv_scale(self) -> float:
        return 1.0 / self._scale

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._growth_step = 0
            self._hysteresis_step += 1
            if self._hysteresis_step >= self.hysteresis:
                self._scale *= self.backoff_factor
                if self.min_scale is not None:
                    self._scale = max(self._scale, self.min_scale)
        else:
            self._growth_step += 1
            if self._growth_step == self.growth_interval:
                self._growth_step = 0
                self._hysteresis_step = 0
                self._scale *= self.growth_factor
                if self.max_scale is not None:
                    self._scale = min(self._scale, self.max_scale)

    def state_dict(self) -> dict:
        return {
            "_scale": self._scale,
            "_growth_step": self._growth_step,
            "_hysteresis_step": self._hysteresis_step,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        scale = state_dict["_scale"]
        self._scale = float(scale.item() if hasattr(scale, "item") else scale)
        self._growth_step = int(state_dict["_growth_step"])
        self._hysteresis_step = int(state_dict["_hysteresis_step"])
