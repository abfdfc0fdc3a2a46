"""Apply parallelism to a plain InternLM module (or one pipeline stage of it), from the outside.

Order, as torchtitan does it: tensor parallel plan -> activation checkpointing -> torch.compile ->
Hybrid ZeRO (FSDP2 over the dp_replicate x dp_shard mesh). Then `init_parameters` fills the weights
so that every layout holds the same full tensors.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from internlm.log import logger
from internlm.model.internlm import InternLM, init_full_tensor
from internlm.model.moe import MoEFeedForward
from internlm.moe_tensor_parallel import shard_experts_over_tp
from internlm.parallel_dims import ParallelDims


def apply_tensor_parallel(model: InternLM, tp_mesh: DeviceMesh, sequence_parallel: bool):
    """Megatron-style TP: q/k/v, w1, w3 column-parallel, wo and w2 row-parallel, the embedding
    sharded over the vocabulary and the head column-parallel with its logits left sharded over the
    vocabulary (the loss runs under `loss_parallel`). With sequence parallel ("msp") the norms and
    residual stream are sharded over the sequence dimension between the TP regions. MoE layers: see
    internlm/moe_tensor_parallel.py."""
    seq = Shard(1) if sequence_parallel else Replicate()
    root_plan = {}
    if model.tok_embeddings is not None:
        root_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if model.norm is not None:
        root_plan["norm"] = SequenceParallel() if sequence_parallel else None
    if model.output is not None:
        root_plan["output"] = ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, tp_mesh, {k: v for k, v in root_plan.items() if v is not None})
    for block in model.layers.values():
        plan = {
            "attention": PrepareModuleInput(input_layouts=(seq, None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=seq),
        }
        moe = isinstance(block.feed_forward, MoEFeedForward)
        if not moe:
            plan.update({
                "feed_forward": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w3": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=seq),
            })
        if sequence_parallel:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)
        if moe:  # experts split over their FFN width, tokens gathered for the router (moe_tensor_parallel.py)
            shard_experts_over_tp(block, tp_mesh, sequence_parallel)


def _compute_heavy_ops() -> set:
    """Operators whose outputs selective checkpointing keeps: matmuls and attention kernels."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    for n in ("_flash_attention_forward", "_cudnn_attention_forward"):  # under torch's varlen attention
        if hasattr(aten, n):
            ops.add(getattr(aten, n).default)
    try:
        ops.add(torch.ops.torch_attn._varlen_attn.default)  # torch varlen's custom op (registered on import)
    except (AttributeError, RuntimeError):
        pass
    flash = getattr(torch.ops, "flash_attn", None)
    for n in ("_flash_attn_varlen_forward", "_flash_attn_forward"):
        try:
            ops.add(getattr(flash, n).default)
        except (AttributeError, RuntimeError):
            pass
    return ops


def selective_checkpoint_context():
    """`model.checkpoint_policy='selective'`: keep the outputs of matmuls and attention, recompute the
    rest (norms, rotary, SiLU, casts) in backward: most of full checkpointing's saving of small
    activations at a fraction of its recompute cost."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    keep = _compute_heavy_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def alternate_matmul_checkpoint_context():
    """`model.checkpoint_policy='selective_op'`: torchtitan's op-level selective checkpointing. As
    'selective', but only every other matmul's output is kept (in a Llama/InternLM block wq, wv, w1, w2;
    wk, wo and w3 run again in backward): less memory than 'selective' for about a third of the forward
    GEMMs again. Matmuls are counted in forward and in the recompute apart, so both pick the same ones."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    keep = _compute_heavy_ops()
    matmuls = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
    count = {True: 0, False: 0}  # this block's matmuls so far, in the recompute and in forward

    def policy(ctx, op, *args, **kwargs):
        if op in matmuls:
            count[ctx.is_recompute] += 1
            if count[ctx.is_recompute] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


CHECKPOINT_POLICIES = ("full", "selective", "selective_op")


def apply_activation_checkpointing(model: InternLM, setting, policy: str = "full") -> int:
    """`model.checkpoint`: True/False or the fraction of this stage's layers to recompute;
    `model.checkpoint_policy`: "full" (recompute the whole block), "selective" or "selective_op" (see
    above)."""
    from torch.distributed._composable import checkpoint

    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"model.checkpoint_policy must be one of {CHECKPOINT_POLICIES}, got {policy!r}")
    frac = 1.0 if setting is True else float(setting or 0.0)
    blocks = list(model.layers.values())
    count = min(len(blocks), math.ceil(frac * len(blocks) - 1e-9)) if frac > 0 else 0
    for block in blocks[:count]:
        if policy == "selective":
            _checkpoint_forward(block, selective_checkpoint_context)
        elif policy == "selective_op":
            _checkpoint_forward(block, alternate_matmul_checkpoint_context)
        else:
            checkpoint(block)  # composable: parameter names stay unchanged
    return count


def _checkpoint_forward(block, context_fn) -> None:
    """Checkpoint `block.forward` itself rather than the module call (as torchtitan's wrapper does, but
    keeping parameter names): FSDP's pre-forward hook then stays outside the recomputed region. The
    composable `checkpoint(block)` recomputes through the module call, so under selective checkpointing
    FSDP's input cast (a profiler range) ran in the recompute but not in the forward, and SAC's cache
    refused it: every data-parallel or isp run with the selective policy stopped in its first backward."""
    from torch.utils.checkpoint import checkpoint as checkpoint_fn

    inner = block.forward

    def forward(*args, **kwargs):
        return checkpoint_fn(inner, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    block.forward = forward


def apply_compile(model: InternLM):
    for block in model.layers.values():
        block.compile()


def apply_hybrid_zero(model: InternLM, dp_mesh: DeviceMesh, param_dtype: torch.dtype, reshard_after_forward: bool,
                      prefetch: bool = True, ignored_params: set | None = None,
                      expert_mesh: DeviceMesh | None = None):
    """FSDP2/HSDP: shard within dp_shard (zero1 size), replicate across dp_replicate. Master weights
    stay fp32; compute runs in `param_dtype`; gradients are reduced in fp32. `ignored_params` (expert-
    parallel experts kept whole on each replica) are left to their own layout; `expert_mesh` (edp, ep)
    shards expert-parallel experts over their replicas first (internlm.expert_parallel)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if expert_mesh is not None:
        from internlm.expert_parallel import shard_experts_over_edp

        shard_experts_over_edp(model, expert_mesh, mp, reshard_after_forward)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # the last block is resharded by the root right away; skipping it avoids a re-gather
        fully_shard(block, mesh=dp_mesh, mp_policy=mp,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, ignored_params=ignored_params)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                ignored_params=ignored_params)
    if prefetch and len(blocks) > 1:
        # overlap_sync_param / overlap_sync_grad: prefetch the next block's all-gather in forward
        # and the previous block's in backward while this one computes.
        for prev, nxt in zip(blocks[:-1], blocks[1:]):
            prev.set_modules_to_forward_prefetch([nxt])
            nxt.set_modules_to_backward_prefetch([prev])


def fsdp_prefetch(hybrid_zero) -> bool:
    """InternEvo's overlap_sync_param / overlap_sync_grad (the `hybrid_zero_optimizer` section) map to
    FSDP2's all-gather prefetch."""
    return hybrid_zero.overlap_sync_param or hybrid_zero.overlap_sync_grad


def parallelize(model: InternLM, dims: ParallelDims, mesh: DeviceMesh | None, model_cfg, compute_dtype: torch.dtype,
                hybrid_zero) -> bool:
    """Apply the layout to one model part; `model_cfg` is the config's `model` section (checkpointing,
    compile), `hybrid_zero` its `hybrid_zero_optimizer` section. Returns True when FSDP manages the
    compute dtype (else the trainer uses autocast)."""
    if dims.tensor_parallel > 1:
        apply_tensor_parallel(model, mesh["tp"], dims.sequence_parallel)
    if dims.isp > 1:
        from internlm.sequence_parallel import apply_sequence_parallel

        if dims.context > 1:
            head_group, context_group = dims.sp_groups(mesh)
            apply_sequence_parallel(model, head_group, dims.head, context_group, dims.context,
                                    window=dims.window, interleaved=dims.interleaved)
        else:
            apply_sequence_parallel(model, mesh["tp"].get_group(), dims.isp)
        from internlm.moe_sequence_parallel import route_over_sequence

        route_over_sequence(model, mesh["tp"].get_group(), dims.isp, dims)  # MoE layers route whole micro-batches
    experts = expert_fsdp = None
    if dims.ep > 1:
        from internlm.expert_parallel import apply_expert_parallel

        emesh = dims.expert_mesh(mesh.device_type)
        expert_params = set(apply_expert_parallel(model, emesh, dims.ep, dims.expert_shard))
        if dims.expert_shard:  # an FSDP module of their own over edp
            expert_fsdp = emesh
        else:  # whole on each replica: FSDP leaves them alone
            experts = expert_params
    policy = model_cfg.checkpoint_policy
    n_ckpt = apply_activation_checkpointing(model, model_cfg.checkpoint, policy)
    if n_ckpt:
        logger.info(f"activation checkpointing ({policy}) on {n_ckpt} of {len(model.layers)} layers of this stage")
    if model_cfg.compile:
        apply_compile(model)
    if dims.fsdp:
        apply_hybrid_zero(model, dims.fsdp_mesh(mesh), compute_dtype,
                          reshard_after_forward=dims.reshard_after_forward, prefetch=fsdp_prefetch(hybrid_zero),
                          ignored_params=experts, expert_mesh=expert_fsdp)
        return True
    return False


@torch.no_grad()
def init_parameters(model: nn.Module, device: torch.device, seed: int):
    """Materialise a meta-device model on `device` and fill each parameter with its layout-independent
    initial value (a function of seed and name only). Sharded parameters take their local slice."""
    model.to_empty(device=device)
    args = model.args
    if args.tie_word_embeddings and model.tok_embeddings is not None and model.output is not None:
        model.output.weight = model.tok_embeddings.weight  # to_empty unties shared parameters
    for name, param in model.named_parameters():
        full = init_full_tensor(name, param.shape, args, seed)
        if isinstance(param, DTensor):
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full)
    for buf in model.buffers():
        buf.zero_()
