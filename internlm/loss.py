"""Packed-sequence language-model loss with per-type statistics.

The target tensor stacks labels and type ids along a last dimension of 2 so that one tensor
travels through the pipeline schedule's micro-batch split. Each micro-batch's loss is the mean
over its labelled tokens (InternEvo's definition); the step's loss is the mean over micro-batches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor


def make_target(labels: torch.Tensor, type_ids: torch.Tensor) -> torch.Tensor:
    return torch.stack([labels, type_ids], dim=-1)


class PackedLMLoss:
    def __init__(self, num_types: int, label_smoothing: float = 0.0, device=None):
        self.num_types = max(1, num_types)
        self.label_smoothing = label_smoothing
        self.device = device
        self.scale = 1.0  # fp16 loss scale, set by the trainer before each step
        self.reset()

    def reset(self):
        # one row per call: [micro-batch loss, 1, per-type loss sums..., per-type token counts...]
        self.records: list[torch.Tensor] = []

    def summed(self, last: int | None = None) -> torch.Tensor:
        """Sum of the last `last` records (the pipeline runs the loss once more on its first step to
        infer gradient shapes; those calls come first and are left out this way)."""
        rows = self.records if last is None else self.records[-last:]
        if not rows:
            return torch.zeros(2 + 2 * self.num_types, dtype=torch.float64, device=self.device)
        return torch.stack(rows).sum(0)

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        flat = logits.reshape(-1, logits.shape[-1])
        tok = F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100, reduction="none",
                              label_smoothing=self.label_smoothing)
        return tok

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, types = target[..., 0], target[..., 1]
        tok = self.token_losses(logits, labels)
        valid = (labels.reshape(-1) != -100)
        count = valid.sum().clamp(min=1)
        loss = tok.sum() / count
        if logits.device.type == "meta":  # the pipeline's shape inference: nothing to record
            return loss
        with torch.no_grad():
            local_tok = tok.to_local() if isinstance(tok, DTensor) else tok
            value = loss.to_local() if isinstance(loss, DTensor) else loss
            n = self.num_types
            row = torch.zeros(2 + 2 * n, dtype=torch.float64, device=local_tok.device)
            row[0] = value.detach().double()
            row[1] = 1.0
            t = types.reshape(-1)[valid].clamp(0, n - 1)
            row[2:2 + n].index_add_(0, t, local_tok.detach()[valid].double())
            row[2 + n:].index_add_(0, t, torch.ones_like(t, dtype=torch.float64))
            self.records.append(row)
        return loss * self.scale if self.scale != 1.0 else loss
