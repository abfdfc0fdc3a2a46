"""Mixture of Experts feed-forward layer (InternEvo's `INTERNLM_MoE`), plain PyTorch.

Routing, per micro-batch, in fp32:
- a linear gate gives each token a probability over `num_experts` experts (softmax), and it goes to its
  `top_k` most likely ones. With top_k = 1 the expert output is weighted by that probability (GShard /
  Switch); with top_k >= 2 by the top-k probabilities renormalised to sum to one (GShard's top-2,
  Mixtral's routing).
- GShard (`moe_type="GShard"`, InternEvo's default): each expert takes at most
  `capacity = max(ceil(top_k * tokens / num_experts * capacity_factor), min_capacity)` tokens; a token
  beyond it is dropped for that expert (its weight there is zero, the residual stream carries it).
  First choices are placed before second choices, each in token order, so the same tokens are dropped
  in every layout (InternEvo's random token selection, `use_rts`, is not used: it depends on the RNG).
  `Dropless` keeps every token.
- the load-balancing loss (GShard/Switch): `num_experts * sum_e(mean gate prob of e * share of tokens
  whose first choice is e)`, 1.0 for a perfectly balanced router; the trainer adds
  `loss.moe_loss_coeff` times the sum over layers to the LM loss.
- `moe_use_residual` (residual MoE, DeepSpeed's PR-MoE): a dense SwiGLU beside the experts, mixed with
  them per token by a softmax over a 2-way linear coefficient.

Experts are stacked weights (`experts.w1` [E, ffn, h], `w3` [E, ffn, h], `w2` [E, h, ffn]). The tokens
routed to them, sorted by expert, go through `expert_ffn`: PyTorch's grouped GEMM
(`torch.nn.functional.grouped_mm`, one kernel per projection for all experts) where it runs (CUDA bf16
on sm80+, and fp32 on CPU), otherwise one SwiGLU per expert in a loop; the same arithmetic either way.
Each layer keeps the statistics of its last forward (`stats`: tokens per expert before dropping,
dropped assignments) and its auxiliary loss (`aux_loss`) for the trainer to read.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from internlm.model.shape import drops_tokens


def route(logits: torch.Tensor, top_k: int, capacity: int | None):
    """logits [N, E] (fp32) -> (weights [N, k], experts [N, k], kept [N, k] bool, aux loss, load [E]).
    `capacity` None: nothing dropped."""
    n, num_experts = logits.shape
    probs = logits.softmax(dim=-1)
    top_p, experts = probs.topk(top_k, dim=-1)
    weights = gate_weights(top_p)
    with torch.no_grad():
        onehot = F.one_hot(experts, num_experts)  # [N, k, E]
        load = onehot.sum(dim=(0, 1))
        if capacity is None:
            kept = torch.ones_like(experts, dtype=torch.bool)
        else:
            # slot of each assignment in its expert's queue: all first choices (in token order), then all
            # second choices, ...
            order = onehot.transpose(0, 1).reshape(top_k * n, num_experts)
            slot = (order.cumsum(dim=0) - 1).reshape(top_k, n, num_experts).transpose(0, 1)
            kept = (slot.gather(-1, experts.unsqueeze(-1)).squeeze(-1) < capacity)
    first_share = F.one_hot(experts[:, 0], num_experts).float().mean(dim=0)
    aux = num_experts * (probs.mean(dim=0) * first_share).sum()
    return weights * kept, experts, kept, aux, load


def gate_weights(top_p: torch.Tensor) -> torch.Tensor:
    """The chosen experts' probabilities [N, k] -> their weights: as they are for top-1, renormalised to
    sum to one for top-k >= 2."""
    if top_p.shape[-1] == 1:
        return top_p
    return top_p / top_p.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(top_p.dtype).eps)


USE_GROUPED_MM = True  # (tests switch it off to compare with the loop)


def _grouped_mm_runs(x: torch.Tensor, w1: torch.Tensor) -> bool:
    """Whether F.grouped_mm takes these operands: bf16 on CUDA sm80+ (its fused kernel), fp32 on CPU,
    rows of a multiple of 16 bytes (its stride rule), and some rows at all."""
    if not (USE_GROUPED_MM and hasattr(F, "grouped_mm")) or x.shape[0] == 0:
        return False
    if x.device.type == "cuda":
        ok = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    else:
        ok = x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    return ok and all(d * x.element_size() % 16 == 0 for d in w1.shape[1:])


def expert_ffn(x: torch.Tensor, counts: list[int], w1: torch.Tensor, w3: torch.Tensor,
               w2: torch.Tensor, fp32_gemm: bool = False) -> torch.Tensor:
    """x [N, h] rows sorted by expert, counts[e] of them for expert e -> each row through its expert's
    SwiGLU [N, h]; w1/w3 [E, ffn, h], w2 [E, h, ffn]. `fp32_gemm` (model.cpu_matmul, as ops.Linear):
    on CPU, a bf16/fp16 computation runs as fp32 GEMMs (the grouped one) on operands rounded to that
    dtype, with the result rounded back, for CPUs whose low-precision GEMM is far slower (AVX2-only);
    the SwiGLU between the GEMMs is then computed in fp32."""
    if fp32_gemm and x.device.type == "cpu":
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", enabled=False):
                ws = [w.to(dtype).float() for w in (w1, w3, w2)]
                return _expert_ffn(x.to(dtype).float(), counts, *ws).to(dtype)
    return _expert_ffn(x, counts, w1, w3, w2)


def _expert_ffn(x, counts, w1, w3, w2):
    if _grouped_mm_runs(x, w1):
        offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        w1, w3, w2 = (w.to(x.dtype).transpose(1, 2) for w in (w1, w3, w2))  # [E, in, out], column-major
        h = F.silu(F.grouped_mm(x, w1, offs=offs)) * F.grouped_mm(x, w3, offs=offs)
        return F.grouped_mm(h, w2, offs=offs)
    # unbind once: its backward stacks the experts' gradients in one pass, where indexing w1[e] per
    # expert would write (and then add up) a whole [E, ...] gradient for each expert
    w1s, w3s, w2s = w1.unbind(0), w3.unbind(0), w2.unbind(0)
    parts = [F.linear(F.silu(F.linear(rows, w1s[e])) * F.linear(rows, w3s[e]), w2s[e])
             for e, rows in enumerate(torch.split(x, counts)) if counts[e]]
    if not parts:
        # no rows (every assignment of this rank's tokens dropped): the weights still join the graph with
        # zero gradients, so that FSDP reduces the same gradients on every rank
        return x[:0] + 0.0 * (w1.sum() + w3.sum() + w2.sum()).to(x.dtype)
    return torch.cat(parts)


def grouped_mm_in_use(device: torch.device, dtype: torch.dtype) -> bool:
    """For the kernels line: whether experts computed in `dtype` on `device` run as a grouped GEMM (when
    their widths are multiples of 16 bytes)."""
    if not (USE_GROUPED_MM and hasattr(F, "grouped_mm")):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.is_available() and \
            torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and dtype == torch.float32


class Experts(nn.Module):
    """`num_experts` SwiGLU FFNs as stacked weights."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, fp32_gemm: bool = False):
        super().__init__()
        self.fp32_gemm = fp32_gemm  # (expert_ffn)
        self.w1 = nn.Parameter(torch.empty(num_experts, ffn, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, ffn, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, ffn))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        return combine_experts(x, weights, experts, self.w1, self.w3, self.w2, self.fp32_gemm)


def combine_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w1: torch.Tensor,
                    w3: torch.Tensor, w2: torch.Tensor, fp32_gemm: bool = False) -> torch.Tensor:
    """x [N, h]; weights/experts [N, k] (expert -1: dropped) -> sum_k weights * expert_k(x) [N, h], the
    experts given by their stacked weights (under tensor parallelism, this rank's slice of their width)."""
    flat_expert = experts.reshape(-1)
    flat_weight = weights.reshape(-1)
    token = torch.arange(x.shape[0], device=x.device).repeat_interleave(experts.shape[1])
    picked = (flat_expert >= 0).nonzero().squeeze(-1)
    picked = picked[torch.argsort(flat_expert[picked], stable=True)]  # by expert, then token order
    counts = torch.bincount(flat_expert[picked], minlength=w1.shape[0]).tolist()
    rows = token[picked]
    y = expert_ffn(x[rows], counts, w1, w3, w2, fp32_gemm)
    return torch.zeros_like(x).index_add_(0, rows, y * flat_weight[picked].unsqueeze(-1).to(y.dtype))


class MoEFeedForward(nn.Module):
    def __init__(self, args, dense_ffn_cls, kernels):
        super().__init__()
        h, f = args.hidden_size, args.intermediate_size
        self.num_experts, self.top_k = args.num_experts, args.top_k
        self.drop = drops_tokens(args.moe_type, args.drop_tokens)
        self.capacity_factor, self.eval_capacity_factor = args.capacity_factor, args.eval_capacity_factor
        self.min_capacity = args.min_capacity
        self.gate = nn.Linear(h, args.num_experts, bias=False)
        self.experts = Experts(args.num_experts, h, f, fp32_gemm=kernels.cpu_fp32_gemm)
        self.residual_mlp = dense_ffn_cls(args, kernels) if args.moe_use_residual else None
        # (with a bias, as InternEvo's torch.nn.Linear(hidden, 2))
        self.coefficient = nn.Linear(h, 2) if args.moe_use_residual else None
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict | None = None
        # the experts' runner: None runs them here; expert parallelism (internlm.expert_parallel) sets a
        # callable (experts, x, weights, chosen) -> output that sends the tokens to the experts' ranks
        self.dispatch = None

    def capacity(self, tokens: int) -> int | None:
        if not self.drop:
            return None
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return max(math.ceil(self.top_k * tokens / self.num_experts * factor), self.min_capacity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        with record_function("moe_routing"):  # named for the profiler (routing overhead share)
            logits = F.linear(flat.float(), self.gate.weight.float())
            weights, experts, kept, aux, load = route(logits, self.top_k, self.capacity(flat.shape[0]))
            chosen = experts.masked_fill(~kept, -1)
        out = self.run_experts(flat, weights, chosen)
        self.aux_loss = aux
        self.stats = dict(load=load.detach(), dropped=(~kept).sum().detach())
        return out.reshape(shape)

    def run_experts(self, flat: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """The routed tokens [N, h] through their experts (here, or through the expert-parallel dispatch),
        weighted and summed, mixed with the residual MoE's dense FFN."""
        if self.dispatch is None:
            with record_function("moe_experts"):
                out = self.experts(flat, weights, chosen)
        else:
            out = self.dispatch(self.experts, flat, weights, chosen)
        if self.residual_mlp is not None:
            coef = mixing_coefficients(flat, self.coefficient.weight, self.coefficient.bias).to(out.dtype)
            out = out * coef[:, :1] + self.residual_mlp(flat) * coef[:, 1:]
        return out


def mixing_coefficients(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A residual MoE's per-token weights of (experts, dense FFN): softmax of a 2-way linear map, in fp32."""
    return F.linear(x.float(), weight.float(), bias.float()).softmax(dim=-1)


def moe_layers(model: nn.Module) -> list[tuple[str, MoEFeedForward]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEFeedForward)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of the load-balancing losses of the model's MoE layers in their last forward."""
    losses = [m.aux_loss for _, m in moe_layers(model) if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None
