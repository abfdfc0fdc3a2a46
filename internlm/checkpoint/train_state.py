"""The loop's own counters, saved with every checkpoint (state.json) and restored on resume."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped fp16 steps included)
    consumed_tokens: int = 0  # global tokens trained on (all tokens processed, as TGS counts them)
    loss_tokens: int = 0  # of those, the tokens that were a target (not masked, not a sample's last)

    def state_dict(self) -> dict:
        return {"step": self.step, "consumed_tokens": self.consumed_tokens, "loss_tokens": self.loss_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.consumed_tokens = int(state["consumed_tokens"])
        self.loss_tokens = int(state.get("loss_tokens", 0))  # checkpoints from before it was counted
