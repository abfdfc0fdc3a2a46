"""The trainer's side of a MoE model: the load-balancing loss added to each micro-batch's loss, and the
per-layer expert load of a step (tokens routed to each expert, imbalance, dropped assignments),
summed over micro-batches and data-parallel ranks for metrics.jsonl, TensorBoard and the log line.

Without pipeline parallelism the trainer adds ``after_forward()`` to each micro-batch's loss. Under a
pipeline schedule a stage's MoE layers are far from the loss (on the last stage), so ``attach(stage)``
hooks every stage module instead: after the stage's forward it records its layers and returns the
stage's output through ``_AddAuxGrad``, which passes the gradient through unchanged and gives the
stage's summed load-balancing loss the gradient coeff * loss scale, as if that term had been added to
the micro-batch's loss (the schedule's ``scale_grads`` divides by the number of micro-batches for both).
The schedule's first step also runs each stage once on placeholder inputs to learn the shapes it sends;
so a stage's forwards are kept in order and only the step's last `micro_batches` are counted.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from internlm.model.moe import moe_layers


class _AddAuxGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output, aux, weight: float):
        ctx.weight, ctx.aux_shape, ctx.aux_dtype = weight, aux.shape, aux.dtype
        # a copy, not a view: the V schedule detaches a stage's output in place to feed the next stage
        # on the same rank (the original is freed once the stage returns)
        return output.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full(ctx.aux_shape, ctx.weight, dtype=ctx.aux_dtype, device=grad.device), None


class MoEStats:
    def __init__(self, model_parts, coeff: float, device: torch.device, num_layers: int | None = None):
        # layers by their global index (a pipeline rank holds some of them; the others stay zero)
        self.layers = [(name.split(".")[1] if name.startswith("layers.") else name, m)
                       for part in model_parts for name, m in moe_layers(part)]
        self.num_layers = num_layers or len(self.layers)
        self.index = {id(m): (int(name) if name.isdigit() else i) for i, (name, m) in enumerate(self.layers)}
        self.coeff = coeff
        self.device = device
        self.scale = 1.0  # the loss scale of the step (set by the trainer)
        self.reset()

    def __bool__(self) -> bool:
        return bool(self.layers)

    def reset(self) -> None:
        n_exp = self.layers[0][1].num_experts if self.layers else 0
        self.load = torch.zeros(self.num_layers, n_exp, dtype=torch.float64, device=self.device)
        self.dropped = torch.zeros(self.num_layers, dtype=torch.float64, device=self.device)
        self.aux_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.micro_batches = 0
        self.stage_forwards: dict[int, list] = {}  # pipeline: each stage's forwards of the step, in order

    def _record(self, layers, into=None) -> torch.Tensor:
        aux = torch.stack([m.aux_loss for m in layers]).sum()
        with torch.no_grad():
            load, dropped, aux_sum = into if into is not None else (self.load, self.dropped, self.aux_sum)
            for m in layers:
                i = self.index[id(m)]
                load[i] += m.stats["load"].to(load)
                dropped[i] += m.stats["dropped"].to(dropped)
            aux_sum += aux.detach().double()
        return aux

    def after_forward(self) -> torch.Tensor:
        """Record the layers' last forward; return coeff * (sum of their load-balancing losses), the term
        the micro-batch's loss gets (before its loss scale)."""
        aux = self._record([m for _, m in self.layers])
        self.micro_batches += 1
        return self.coeff * aux

    def attach(self, stage: torch.nn.Module) -> None:
        """Pipeline parallelism: record and inject the load-balancing loss of `stage`'s layers after each
        of its forwards (see the module's docstring)."""
        layers = [m for _, m in moe_layers(stage)]
        if not layers:
            return

        def hook(module, args, output):
            into = (torch.zeros_like(self.load), torch.zeros_like(self.dropped), torch.zeros_like(self.aux_sum))
            aux = self._record(layers, into)
            self.stage_forwards.setdefault(id(module), []).append(into)
            if not (torch.is_grad_enabled() and aux.requires_grad and self.coeff):
                return output
            return _AddAuxGrad.apply(output, aux, float(self.coeff * self.scale))

        stage.register_forward_hook(hook)

    def reduce(self, world_size: int, micro_batches: int | None = None, replicas: int = 1,
               duplicates: int = 1) -> dict:
        """Metrics of the step on every rank: moe_loss (mean per micro-batch of the summed layer losses,
        unweighted), moe_imbalance (largest max/mean expert load of any layer), moe_dropped (token-expert
        assignments dropped), and moe_load: per layer its tokens per expert, imbalance and drops. Under
        pipeline parallelism pass the step's `micro_batches` and the data-parallel `replicas` (each stage
        records only its own layers). `duplicates`: ranks that route the same tokens (tensor parallelism)."""
        if micro_batches is not None:  # pipeline: the step's real forwards of each stage
            for forwards in self.stage_forwards.values():
                for load, dropped, aux_sum in forwards[-micro_batches:]:
                    self.load += load
                    self.dropped += dropped
                    self.aux_sum += aux_sum
            self.stage_forwards = {}
        flat = torch.cat([self.load.flatten(), self.dropped, self.aux_sum.reshape(1),
                          torch.tensor([float(self.micro_batches)], dtype=torch.float64, device=self.device)])
        if world_size > 1:
            dist.all_reduce(flat)
        if duplicates > 1:
            flat /= duplicates  # (each count appears duplicates times: exact)
        n_layers, n_exp = self.load.shape
        load = flat[:n_layers * n_exp].reshape(n_layers, n_exp)
        dropped = flat[n_layers * n_exp:n_layers * n_exp + n_layers]
        aux = flat[-2].item()
        micro = micro_batches * replicas if micro_batches is not None else max(flat[-1].item(), 1.0)
        imbalance = (load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9))
        names = sorted({self.index[id(m)] for _, m in self.layers}) if micro_batches is None \
            else list(range(n_layers))
        per_layer = {f"layer{i}": {"imbalance": imbalance[i].item(), "dropped": int(dropped[i].item()),
                                   "tokens": {f"e{e}": int(load[i, e].item()) for e in range(n_exp)}}
                     for i in names}
        return dict(moe_loss=aux / micro, moe_imbalance=imbalance.max().item(), moe_dropped=int(dropped.sum().item()),
                    moe_load=per_layer)
