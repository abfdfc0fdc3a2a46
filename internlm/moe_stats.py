"""The trainer's side of a MoE model: the load-balancing loss added to each micro-batch's loss, and the
per-layer expert load of a step (tokens routed to each expert, imbalance, dropped assignments),
summed over micro-batches and data-parallel ranks for metrics.jsonl, TensorBoard and the log line."""
from __future__ import annotations

import torch
import torch.distributed as dist

from internlm.model.moe import moe_layers


class MoEStats:
    def __init__(self, model_parts, coeff: float, device: torch.device):
        self.layers = [(name.split(".")[1] if name.startswith("layers.") else name, m)
                       for part in model_parts for name, m in moe_layers(part)]
        self.coeff = coeff
        self.device = device
        self.reset()

    def __bool__(self) -> bool:
        return bool(self.layers)

    def reset(self) -> None:
        n_exp = self.layers[0][1].num_experts if self.layers else 0
        self.load = torch.zeros(len(self.layers), n_exp, dtype=torch.float64, device=self.device)
        self.dropped = torch.zeros(len(self.layers), dtype=torch.float64, device=self.device)
        self.aux_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.micro_batches = 0

    def after_forward(self) -> torch.Tensor:
        """Record the layers' last forward; return coeff * (sum of their load-balancing losses), the term
        the micro-batch's loss gets (before its loss scale)."""
        aux = torch.stack([m.aux_loss for _, m in self.layers]).sum()
        with torch.no_grad():
            for i, (_, m) in enumerate(self.layers):
                self.load[i] += m.stats["load"].to(self.load)
                self.dropped[i] += m.stats["dropped"].to(self.dropped)
            self.aux_sum += aux.detach().double()
            self.micro_batches += 1
        return self.coeff * aux

    def reduce(self, world_size: int) -> dict:
        """Metrics of the step on every rank: moe_loss (mean per micro-batch of the summed layer losses,
        unweighted), moe_imbalance (largest max/mean expert load of any layer), moe_dropped (token-expert
        assignments dropped), and moe_load: per layer its tokens per expert, imbalance and drops."""
        flat = torch.cat([self.load.flatten(), self.dropped, self.aux_sum.reshape(1),
                          torch.tensor([float(self.micro_batches)], dtype=torch.float64, device=self.device)])
        if world_size > 1:
            dist.all_reduce(flat)
        n_layers, n_exp = self.load.shape
        load = flat[:n_layers * n_exp].reshape(n_layers, n_exp)
        dropped = flat[n_layers * n_exp:n_layers * n_exp + n_layers]
        aux, micro = flat[-2].item(), max(flat[-1].item(), 1.0)
        imbalance = (load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9))
        per_layer = {f"layer{name}": {"imbalance": imbalance[i].item(), "dropped": int(dropped[i].item()),
                                      "tokens": {f"e{e}": int(load[i, e].item()) for e in range(n_exp)}}
                     for i, (name, _) in enumerate(self.layers)}
        return dict(moe_loss=aux / micro, moe_imbalance=imbalance.max().item(), moe_dropped=int(dropped.sum().item()),
                    moe_load=per_layer)
