"""MoE layers under InternEvo's isp (sequence parallelism, 1D or 2D), applied from outside the model.

Under isp each rank of a tensor group holds every weight (FSDP gathers them) and 1/S of every
micro-batch's tokens. Experts run on the rank's own tokens, as every other layer does; only the routing
needs the whole micro-batch, because capacity and drops (first choices before second choices, each in
token order) and the load-balancing loss are functions of all its tokens. So each rank computes its
tokens' router logits, the group all-gathers them ([tokens, num_experts] fp32, small beside the hidden
states) and puts them in sequence order (2D: each rank's zigzag chunks), and every rank routes the whole
micro-batch exactly as one process does, then keeps its own tokens' weights and choices.

Gradients without a collective in backward: a token's routing weights depend on its own logits only,
so each rank recomputes its tokens' weights from its local logits (the choices and drops come from the
whole micro-batch's routing). The load-balancing loss, num_experts * sum_e(mean prob of e * share of
first choices of e), has for a rank's tokens the gradient of num_experts * sum_e(their summed prob of e /
all tokens * share of e): each rank adds the whole micro-batch's loss value with that term's gradient
S times, since each rank's loss is scaled by S (internlm.loss: FSDP averages over the group). (Summing
the ranks' gradients with a reduce-scatter in backward instead put a collective on the same process
group as FSDP's gradient reductions in an order that varied between ranks under 2D, and hung.) The
expert loads every rank records are the whole micro-batch's, counted once (MoEStats.reduce's
`duplicates`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from internlm.model.moe import MoEFeedForward, gate_weights, moe_layers, route
from internlm.moe_tensor_parallel import _all_gather_seq


class SequenceParallelMoE:
    def __init__(self, layer: MoEFeedForward, group, size: int, dims):
        self.layer, self.group, self.size, self.dims = layer, group, size, dims
        self.rank = dist.get_rank(group)
        self._orders: dict[int, tuple] = {}

    def _order(self, n: int, device) -> tuple:
        """(gathered position -> sequence order permutation or None, this rank's positions) for a
        micro-batch of n tokens."""
        if n not in self._orders:
            from internlm.sequence_parallel import token_indices

            held = [token_indices(n, r, self.dims) for r in range(self.size)]
            order = torch.cat(held)
            contiguous = torch.equal(order, torch.arange(n))
            self._orders[n] = (None if contiguous else torch.argsort(order).to(device), held[self.rank].to(device))
        return self._orders[n]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        b, t, h = x.shape
        n = t * self.size
        flat = x.reshape(-1, h)
        with record_function("moe_routing"):
            local_logits = F.linear(x.float(), layer.gate.weight.float())  # [b, t, E]
            to_seq, mine = self._order(n, x.device)
            with torch.no_grad():  # the whole micro-batch's routing, as one process
                logits = _all_gather_seq(local_logits.detach(), self.group, self.size)  # ranks' shards in order
                if to_seq is not None:
                    logits = logits.index_select(1, to_seq)
                _, experts, kept, aux, load = route(logits.reshape(b * n, -1), layer.top_k, layer.capacity(b * n))
                num_experts = logits.shape[-1]
                first_share = F.one_hot(experts[:, 0], num_experts).float().mean(dim=0)
                dropped = (~kept).sum()
                experts = experts.reshape(b, n, -1).index_select(1, mine).reshape(b * t, -1)
                kept = kept.reshape(b, n, -1).index_select(1, mine).reshape(b * t, -1)
            # this rank's tokens, differentiably: their weights (a row's depend on its own logits only), and
            # a term whose gradient is the load-balancing loss's for these rows, S times (see above)
            probs = local_logits.reshape(b * t, -1).softmax(dim=-1)
            weights = gate_weights(probs.gather(-1, experts)) * kept
            own = num_experts * (probs.sum(dim=0) / (b * n) * first_share).sum()
            aux = aux + self.size * (own - own.detach())
            chosen = experts.masked_fill(~kept, -1)
        out = layer.run_experts(flat, weights, chosen)
        layer.aux_loss = aux
        layer.stats = dict(load=load, dropped=dropped)
        return out.reshape(x.shape)


def route_over_sequence(model: nn.Module, group, size: int, dims) -> None:
    """Give every MoE layer of `model` the isp forward (see the module's docstring)."""
    for _, layer in moe_layers(model):
        layer.forward = SequenceParallelMoE(layer, group, size, dims)
