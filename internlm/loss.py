"""Packed-sequence language-model loss with per-type statistics.

The target tensor stacks labels and type ids along a last dimension of 2 so that one tensor
travels through the pipeline schedule's micro-batch split. Each micro-batch's loss is the mean
over its labelled tokens (InternEvo's definition); the step's loss is the mean over micro-batches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

LOSS_KERNELS = ("auto", "chunked", "torch")
CHUNK_ELEMENTS = 8 * 1024 * 1024  # logits per chunk of the chunked loss (32 MiB of fp32)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy of [N, V] logits of any float dtype, computed in fp32 a block of rows
    at a time. Saves the logits as they are (bf16 under autocast) and one log-sum-exp per row, and
    recomputes the softmax block by block in backward: no [N, V] fp32 copy, log-softmax or gradient
    is ever materialised (F.cross_entropy on `logits.float()` keeps two and allocates a third)."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int, smoothing: float, rows: int):
        n = logits.shape[0]
        valid = labels != ignore_index
        safe = torch.where(valid, labels, 0)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        loss = torch.empty(n, dtype=torch.float32, device=logits.device)
        for s in range(0, n, rows):
            x = logits[s:s + rows].float()
            lse[s:s + rows] = torch.logsumexp(x, dim=-1)
            nll = lse[s:s + rows] - x.gather(1, safe[s:s + rows, None]).squeeze(1)
            if smoothing:
                nll = (1 - smoothing) * nll + smoothing * (lse[s:s + rows] - x.mean(dim=-1))
            loss[s:s + rows] = nll
        loss = loss.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.smoothing, ctx.rows = smoothing, rows
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, safe, valid, lse = ctx.saved_tensors
        smoothing, rows = ctx.smoothing, ctx.rows
        vocab = logits.shape[1]
        g = torch.where(valid, grad_loss.float(), 0.0)
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], rows):
            p = (logits[s:s + rows].float() - lse[s:s + rows, None]).exp_()  # softmax of the block
            if smoothing:
                p.sub_(smoothing / vocab)
            p.scatter_add_(1, safe[s:s + rows, None],
                           torch.full((p.shape[0], 1), smoothing - 1.0, device=p.device))
            grad[s:s + rows] = p.mul_(g[s:s + rows, None])
        return grad, None, None, None, None


def chunked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                          label_smoothing: float = 0.0, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Per-token losses (fp32, 0 at ignored labels) of logits [N, V] against labels [N]."""
    rows = max(1, chunk_elements // logits.shape[-1])
    return ChunkedCrossEntropy.apply(logits, labels, ignore_index, float(label_smoothing), rows)


def make_target(labels: torch.Tensor, type_ids: torch.Tensor) -> torch.Tensor:
    return torch.stack([labels, type_ids], dim=-1)


class PackedLMLoss:
    def __init__(self, num_types: int, label_smoothing: float = 0.0, device=None, kernel: str = "auto",
                 sp_group=None, sp_size: int = 1):
        """`sp_group`/`sp_size`: the sequence-parallel ("isp") group that splits each micro-batch's tokens:
        each rank divides its local loss sum by the group's total count, records 1/sp_size of a
        micro-batch, and scales its backward by sp_size (FSDP averages the gradients over the group,
        which must add up)."""
        if kernel not in LOSS_KERNELS:
            raise ValueError(f"loss kernel must be one of {LOSS_KERNELS}, got {kernel!r}")
        self.sp_group, self.sp_size = sp_group, sp_size
        self.num_types = max(1, num_types)
        self.label_smoothing = label_smoothing
        self.kernel = kernel
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

    def uses_chunked(self, logits: torch.Tensor) -> bool:
        """The chunked kernel serves plain tensors; vocabulary-sharded (DTensor) logits and the
        pipeline's meta-device shape inference go through F.cross_entropy (under loss_parallel)."""
        return self.kernel != "torch" and not isinstance(logits, DTensor) and logits.device.type != "meta"

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.uses_chunked(logits):
            return chunked_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                         label_smoothing=self.label_smoothing)
        flat = logits.float().reshape(-1, logits.shape[-1])
        return F.cross_entropy(flat, labels.reshape(-1), ignore_index=-100, reduction="none",
                               label_smoothing=self.label_smoothing)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, types = target[..., 0], target[..., 1]
        tok = self.token_losses(logits, labels)
        valid = (labels.reshape(-1) != -100)
        count = valid.sum()
        if self.sp_size > 1 and logits.device.type != "meta":
            import torch.distributed as dist

            dist.all_reduce(count, group=self.sp_group)  # the micro-batch's count, over its sequence shards
        loss = tok.sum() / count.clamp(min=1)
        if logits.device.type == "meta":  # the pipeline's shape inference: nothing to record
            return loss
        with torch.no_grad():
            local_tok = tok.to_local() if isinstance(tok, DTensor) else tok
            value = loss.to_local() if isinstance(loss, DTensor) else loss
            n = self.num_types
            row = torch.zeros(2 + 2 * n, dtype=torch.float64, device=local_tok.device)
            row[0] = value.detach().double()
            row[1] = 1.0 / self.sp_size  # the group's shards add up to one micro-batch
            t = types.reshape(-1)[valid].clamp(0, n - 1)
            row[2:2 + n].index_add_(0, t, local_tok.detach()[valid].double())
            row[2 + n:].index_add_(0, t, torch.ones_like(t, dtype=torch.float64))
            self.records.append(row)
        scale = self.scale * self.sp_size
        return loss * scale if scale != 1.0 else loss
