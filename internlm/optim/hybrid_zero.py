"""HybridZeroOptimizer: what FSDP2 does not do for us.

FSDP2 (applied in parallelize.py) already keeps parameters, gradients and optimizer state sharded
within each zero1 group and reduces gradients in fp32. This class owns the rest of InternEvo's
optimizer: param groups, AdamW on the fp32 (sharded) master weights, the global gradient norm over
every rank (dp, tp and pp), clipping, fp16 dynamic loss scaling with skip-on-overflow (all ranks
decide together because they all see the same global norm) and the count of skipped steps.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from internlm.optim.grad_scaler import DynamicGradScaler


def _shard_factor(param) -> int:
    """How many ranks of a pipeline stage split this tensor's elements between them."""
    if not isinstance(param, DTensor):
        return 1
    factor = 1
    for dim_size, placement in zip(param.device_mesh.shape, param.placements):
        # Shard and _StridedShard (FSDP on top of a TP-sharded dim; not a Shard subclass) both split
        if not (placement.is_replicate() or placement.is_partial()):
            factor *= dim_size
    return factor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def param_groups(models: list[nn.Module], weight_decay: float) -> list[dict]:
    """Decayed matrices and undecayed norms/biases; DTensors and plain tensors in separate groups
    (under plain TP the norms stay plain tensors, and foreach kernels cannot mix the two)."""
    buckets: dict[tuple[bool, bool, bool], list] = {}
    for model in models:
        for p in model.parameters():
            if not p.requires_grad:
                continue
            is_dtensor = isinstance(p, DTensor)
            # expert-parallel experts live on a mesh of their own: a group of their own for foreach kernels
            expert = is_dtensor and "ep" in (p.device_mesh.mesh_dim_names or ())
            buckets.setdefault((p.ndim >= 2, is_dtensor, expert), []).append(p)
    groups = []
    for (decay, is_dtensor, expert), params in sorted(buckets.items(), key=lambda kv: (not kv[0][0], *kv[0][1:])):
        groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                       "name": ("decay" if decay else "no_decay") + ("_dtensor" if is_dtensor else "")
                       + ("_experts" if expert else "")})
    return groups


ADAMW_IMPLS = ("auto", "fused", "foreach", "apex")


def apex_fused_adam():
    """apex's FusedAdam class, or None when apex (NVIDIA's, not the PyPI web toolkit) is not importable."""
    try:
        from apex.optimizers import FusedAdam  # type: ignore
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return FusedAdam


def resolve_adamw_impl(requested: str, device: torch.device, has_dtensors: bool) -> str:
    """`adam.impl`: "fused" (torch's single-kernel AdamW, CPU and CUDA), "foreach" (torch's multi-tensor
    AdamW), "apex" (apex FusedAdam: CUDA, plain tensors only) or "auto": torch fused everywhere
    (measured faster than foreach on CPU too; see doc/train_performance.md)."""
    if requested not in ADAMW_IMPLS:
        raise ValueError(f"adam.impl must be one of {ADAMW_IMPLS}, got {requested!r}")
    if requested == "apex":
        if apex_fused_adam() is None or device.type != "cuda":
            raise RuntimeError("adam.impl='apex' needs NVIDIA apex (built with --cuda_ext) and a CUDA device; "
                               "use adam.impl='fused' (torch's fused AdamW) otherwise")
        if has_dtensors:
            raise RuntimeError("adam.impl='apex' cannot step sharded (DTensor) parameters of FSDP/tensor "
                               "parallelism; use adam.impl='fused'")
        return "apex"
    if requested == "auto":
        return "fused"
    return requested


def make_adamw(groups, kwargs, impl: str) -> torch.optim.Optimizer:
    if impl == "apex":
        return apex_fused_adam()(groups, adam_w_mode=True, **kwargs)
    if impl == "fused":
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


class PartOptimizers(torch.optim.Optimizer):
    """One AdamW per model part (pipeline stage module) behind a single Optimizer face.

    A pipeline rank may hold several stage modules; giving each its own optimizer lets
    `torch.distributed.checkpoint.state_dict.get_optimizer_state_dict(part, optim)` key the state by
    the part's parameter names, which are the canonical, layout-independent names, so optimizer
    state reshards across pp/tp/dp layouts. AdamW's per-tensor math does not depend on how the
    tensors are grouped, so this steps exactly like one AdamW over all parameters.

    `param_groups` is recomputed from the parts on every access: `load_state_dict` of a part
    replaces its group dicts, and an LR scheduler holding this object must see the new ones.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        # Optimizer.__init__ is deliberately not called: the state and groups live in the parts.
        self.optimizers = list(optimizers)
        self.defaults = dict(self.optimizers[0].defaults)
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    def step(self, closure=None):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        raise NotImplementedError("checkpoint each part with get_optimizer_state_dict(part, optimizer)")

    def load_state_dict(self, state_dict):
        raise NotImplementedError("load each part with set_optimizer_state_dict(part, optimizer, ...)")

    def __repr__(self) -> str:
        return f"PartOptimizers({len(self.optimizers)} x {type(self.optimizers[0]).__name__})"


class HybridZeroOptimizer:
    """`adam` is the config's `adam` section (`internlm.config.AdamConfig`); `grad_scaler` its
    `grad_scaler` section, given for fp16 training (dynamic loss scaling) and None otherwise."""

    def __init__(self, models: list[nn.Module], adam, clip_grad_norm: float | None, stage_world_size: int,
                 device: torch.device, grad_scaler=None):
        self.models = models
        self.params = [p for m in models for p in m.parameters() if p.requires_grad]
        self.clip_grad_norm = clip_grad_norm or 0.0
        self.stage_world_size = stage_world_size  # ranks that hold one pipeline stage: dp * tp
        self.device = device
        kwargs = dict(lr=adam.lr, betas=(adam.adam_beta1, adam.adam_beta2), eps=adam.adam_eps)
        self.adamw_kind = resolve_adamw_impl(adam.impl, device, any(isinstance(p, DTensor) for p in self.params))
        # one AdamW per model part (see PartOptimizers); `torch_optimizer` is what the schedulers drive
        self.part_optimizers = [make_adamw(param_groups([m], adam.weight_decay), kwargs, self.adamw_kind)
                                for m in models]
        self.torch_optimizer = PartOptimizers(self.part_optimizers)
        self.grad_scaler = None
        if grad_scaler is not None:
            sc = grad_scaler
            self.grad_scaler = DynamicGradScaler(
                initial_scale=sc.fp16.initial_scale, min_scale=sc.fp16.min_scale,
                growth_interval=sc.fp16.growth_interval, growth_factor=sc.growth_factor,
                backoff_factor=sc.backoff_factor, hysteresis=sc.hysteresis, max_scale=sc.max_scale)
        self.skipped_steps = 0

    @property
    def param_groups(self):
        return self.torch_optimizer.param_groups

    @property
    def loss_scale(self) -> float:
        return float(self.grad_scaler.scale) if self.grad_scaler else 1.0

    def zero_grad(self):
        self.torch_optimizer.zero_grad(set_to_none=True)

    def _align_grad_placements(self):
        # DTensor autograd may hand back a gradient laid out unlike its parameter (a vocab-sharded
        # embedding gets a replicated gradient); give every gradient its parameter's layout.
        for p in self.params:
            g = p.grad
            if isinstance(g, DTensor) and tuple(g.placements) != tuple(p.placements):
                p.grad = g.redistribute(p.device_mesh, p.placements)

    @torch.no_grad()
    def global_grad_norm(self) -> float:
        """L2 norm of all gradients of the whole model. Each rank sums the squares of its local
        gradient pieces, weighted by 1/(number of ranks holding a copy of that piece), and one
        all-reduce over the world adds them up: sharded (FSDP, TP) and replicated parameters,
        and every pipeline stage, each count exactly once."""
        self._align_grad_placements()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        by_factor: dict[int, list[torch.Tensor]] = {}
        for p in self.params:
            if p.grad is not None:
                by_factor.setdefault(_shard_factor(p), []).append(_local(p.grad))
        for factor, grads in by_factor.items():
            norms = torch._foreach_norm([g.float() for g in grads], 2.0)
            sq = torch.stack(norms).double().pow(2).sum()
            total = total + sq * (factor / self.stage_world_size)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
        return math.sqrt(total.item()) if math.isfinite(total.item()) and total.item() >= 0 else float("nan")

    @torch.no_grad()
    def step(self) -> tuple[bool, float]:
        """Unscale, measure, clip and step. Returns (stepped, grad_norm) with grad_norm unscaled."""
        norm = self.global_grad_norm()
        scale = self.loss_scale
        overflow = not math.isfinite(norm)
        if self.grad_scaler is not None:
            self.grad_scaler.update(overflow)
        if overflow:
            self.skipped_steps += 1
            self.zero_grad()
            return False, norm
        norm = norm / scale
        coef = 1.0 / scale
        if self.clip_grad_norm > 0 and norm > self.clip_grad_norm:
            coef *= self.clip_grad_norm / (norm + 1e-6)
        if coef != 1.0:
            grads = [_local(p.grad) for p in self.params if p.grad is not None]
            torch._foreach_mul_(grads, coef)
        self.torch_optimizer.step()
        self.zero_grad()
        return True, norm

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps,
                "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler else None}

    def load_state_dict(self, sd: dict):
        self.skipped_steps = int(sd.get("skipped_steps", 0))
        if self.grad_scaler is not None and sd.get("grad_scaler"):
            self.grad_scaler.load_state_dict(sd["grad_scaler"])
