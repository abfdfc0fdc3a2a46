"""The loop's own counters, saved with every checkpoint (state.json) and restored on resume."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped fp16 steps included)
    consumed_tokens: int = 0  # global tokens trained on

    def state_dict(self) -> dict:
        return {"step": self.step, "consumed_tokens": self.consumed_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.consumed_tokens = int(state["consumed_tokens"])
