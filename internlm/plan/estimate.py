"""Memory, FLOPs, communication and time of one training step of a layout, per rank.

Parameters, gradients and optimizer states come from `shapes.stage_shapes` (the real parallelized model).
Activations, traffic and time follow the formulas below, each stated where it is used; doc/plan.md
explains them and compares the predictions with measured and published runs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from internlm import builders
from internlm.config import torch_dtype
from internlm.metrics import active_ffn_width, step_throughput
from internlm.parallel_dims import ParallelDims
from internlm.plan.hardware import Hardware
from internlm.plan.schedule import schedule_bubble, schedule_fsdp_gathers, schedule_memory_states
from internlm.plan.shapes import StageShapes, stage_shapes

GiB = 2**30


@dataclass
class Plan:
    layout: str
    fits: bool
    memory_gib: dict  # the peak rank's breakdown, and "total"
    peak_stage: int
    flops_per_token: dict  # "model" (exact, causal, GQA-aware) and "internevo" (Megatron formula)
    comm_bytes: dict  # bytes each rank sends per step, by mesh dimension and collective
    time_s: dict  # per-step parts: compute, recompute, exposed comm, bubble, optimizer, "step"
    tgs: float
    tflops: float  # InternEvo's formula on the predicted step time
    mfu: float
    notes: list = field(default_factory=list)
    hbm_bytes: dict = field(default_factory=dict)  # per step on the peak rank: "fsdp_copy"

    def to_dict(self) -> dict:
        return asdict(self)


def describe_layout(dims: ParallelDims, cfg) -> str:
    ck = cfg.model.checkpoint
    ck = {True: "full", False: "off"}.get(ck, ck)
    if ck != "off" and cfg.model.checkpoint_policy != "full":
        ck = cfg.model.checkpoint_policy if ck == "full" else f"{cfg.model.checkpoint_policy}:{ck}"
    parts = [f"tp={dims.tp}" + (f"({dims.tp_mode})" if dims.tp > 1 else ""), f"pp={dims.pp}",
             f"dp={dims.dp}", f"zero1={dims.dp_shard}"]
    if dims.pp > 1:
        parts.append(f"pp_mode={dims.pp_mode}" + (f"x{dims.num_chunks}" if dims.num_chunks > 1 else ""))
    if dims.reshard_after_forward:
        parts.append("fsdp")
    if dims.wp > 1:
        parts.append(f"wp={dims.wp}")
    if dims.ep > 1:
        parts.append(f"ep={dims.ep}")
    parts += [f"ckpt={ck}", f"micro_bsz={cfg.data.micro_bsz}", f"micro_num={cfg.data.micro_num}"]
    return " ".join(parts)


def _ring(nbytes: float, n: int) -> float:
    """Bytes one rank sends in a ring all-gather or reduce-scatter of `nbytes` in all."""
    return nbytes * (n - 1) / n if n > 1 else 0.0


def activation_bytes_per_token_layer(args, dims: ParallelDims, policy: str, residual_bytes: int, act_bytes: int):
    """Bytes a transformer block keeps for backward per token (bf16/fp16 compute, flash-style attention
    that keeps q, k, v, its output and a row statistic). Counted from the block's ops:
      norms: the fp32 input copy (4h), the normalised value and the weighted output (2h each): 8h, twice;
      rotary: q, k and their rotated halves (2h + 2kv each); attention: q, k, v and output (2h+4kv+2h);
      SwiGLU: w1 out, silu out, w3 out, product (2f each): 8f.
    Selective checkpointing keeps the matmul and attention outputs (q, k, v, attention, wo, w1, w3, w2:
    8h + 4kv + 4f at 2 bytes) and the block input; selective_op every other matmul's (q, v, attention,
    w1, w2: 6h + 2kv + 2f); full checkpointing keeps the block input only.
    Tensor parallelism divides the head and FFN parts; sequence parallelism (msp, isp) divides all.
    MoE: the FFN part at the active width (top_k experts per token), plus the routed rows each expert
    keeps (its input rows and its output before weighting: 2 top_k h), twice under expert parallelism
    (the rows received and the outputs sent back), and the router's fp32 logits and probabilities."""
    h, kv, f = args.hidden_size, args.num_kv_attention_heads * args.head_dim, active_ffn_width(args)
    b = act_bytes / 2
    tp, seq_split = dims.tp, (dims.sequence_parallel or dims.isp > 1)
    moe = 0.0
    if args.num_experts:
        moe = b * 2 * 2 * args.top_k * h * (2 if dims.ep > 1 else 1) / tp + 3 * 4 * args.num_experts
    if policy == "full":
        return residual_bytes * h / (tp if seq_split else 1)
    if policy in ("selective", "selective_op"):
        inner = b * ((8 * h + 4 * kv + 4 * f) if policy == "selective" else (6 * h + 2 * kv + 2 * f)) / tp
        return inner + residual_bytes * h / (tp if seq_split else 1)
    norms = b * 16 * h / (tp if seq_split else 1)
    inner = b * (8 * h + 8 * kv + 8 * f) / tp
    return norms + inner + moe


def memory_states(dims: ParallelDims, pp_rank: int, micro_num: int) -> tuple[tuple[float, float, bool], ...]:
    """(micro-batches of activations in units of the rank's layers, fraction of its weight gradients that
    exist, start) as each backward of the rank starts and ends, read from the trainer's schedule object
    (schedule.schedule_memory_states). The most activations in flight: for 1F1B min(m, pp - rank), for
    GPipe m, for interleaved 1F1B (v chunks) ((pp - rank - 1) * 2 + (v - 1) * pp + 1) / v; ZB-H1 and ZBV
    hold pp on every rank (their papers' 1F1B-sized peak). Without pipelining: F0 B0 F1 B1 ..."""
    return schedule_memory_states(dims.pp, dims.num_chunks, dims.pp_mode, pp_rank, micro_num)


def bubble_fraction(dims: ParallelDims, micro_num: int) -> float:
    """Idle time of the slowest pipeline rank over its busy time, from replaying the trainer's schedule
    (schedule.schedule_bubble): (pp-1)/m for GPipe and 1F1B, divided by the chunks when interleaved;
    about a third of that for the zero-bubble schedules once micro_num >= 2 pp (weight-gradient work
    fills the rest), more below it."""
    return schedule_bubble(dims.pp, dims.num_chunks, dims.pp_mode, micro_num)


def _groups_bandwidth(dims: ParallelDims, hw: Hardware, gpus_per_node: int) -> dict:
    """Bytes/s of a ring over each mesh dimension: NVLink while the group stays inside a node (tp is
    innermost, then dp_shard, dp_replicate, pp), the network once it spans nodes."""
    intra, inter = hw.intra_gbps * 1e9 * hw.link_eff, hw.inter_gbps * 1e9 * hw.link_eff
    span = {"tp": dims.tp, "dp_shard": dims.tp * dims.dp_shard, "dp_replicate": dims.tp * dims.dp,
            "pp": dims.world_size}
    return {k: (intra if v <= gpus_per_node else inter) for k, v in span.items()}


def comm_by_kind(comm: dict) -> dict:
    """A plan's bytes by mesh dimension and collective ("tp/all_reduce") -> by collective kind, the keys
    `train.py --count-comm` writes: msp's all-gather + reduce-scatter pairs split evenly, send_recv ->
    send."""
    out: dict = {}
    for key, value in comm.items():
        kind = key.split("/", 1)[1]
        parts = {"all_gather+reduce_scatter": {"all_gather": 0.5, "reduce_scatter": 0.5},
                 "send_recv": {"send": 1.0}}.get(kind, {kind: 1.0})
        for k, share in parts.items():
            out[k] = out.get(k, 0.0) + share * value
    return out


def fsdp_group_sizes(dims: ParallelDims) -> tuple[int, int]:
    """(shard, replicate) sizes of FSDP's mesh: dp_shard x dp_replicate, or under isp dp_shard x wp and
    dp_replicate x tp / wp (ParallelDims.fsdp_mesh)."""
    if dims.isp > 1:
        return dims.dp_shard * dims.wp, dims.dp_replicate * dims.tp // dims.wp
    return dims.dp_shard, dims.dp_replicate


def pipeline_sends(dims: ParallelDims, stage_ids: list[int]) -> int:
    """Activations or gradients a pipeline rank sends per micro-batch: a stage's output to the next stage
    and its input's gradient to the previous one, where that stage is on another rank (ZBV keeps the
    turn of its V on one rank)."""
    num_stages = dims.pp * dims.num_chunks
    mine = set(stage_ids)
    return sum((sid + 1 < num_stages and sid + 1 not in mine) + (sid > 0 and sid - 1 not in mine)
               for sid in stage_ids)


def fsdp_numels(dims: ParallelDims, s: StageShapes, micro_num: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Elements FSDP gathers and reduces per step on a rank of stage `s`: (gathered, reduced) of the units
    over the data-parallel shard group, and of the expert-parallel experts over their replicas (zeros
    when FSDP does not shard them).

    Without pipelining each micro-batch is a forward and a backward of its own that reduce-scatters every
    unit: under zero1 the trainer gathers each unit once per step and keeps it to the step's last backward;
    with reshard after forward (fsdp) forward gathers every unit, backward gathers them again except each
    model part's last block, which FSDP keeps, and reshards them. Under pipelining PyTorch's
    schedule keeps the gradients unsharded (fp32) until the step's last backward and reduces them once;
    a unit is gathered as the schedule's order makes it (schedule_fsdp_gathers)."""
    if not dims.fsdp:
        return (0.0, 0.0), (0.0, 0.0)
    numel = s.compute_numel - s.expert_numel  # expert-parallel experts are not FSDP's
    experts = s.expert_numel if dims.expert_shard else 0.0
    if dims.pp > 1:
        again = schedule_fsdp_gathers(dims.pp, dims.num_chunks, dims.pp_mode, s.pp_rank, micro_num) \
            if dims.reshard_after_forward else 1.0
        gathered = s.last_blocks_numel + (numel - s.last_blocks_numel) * again
        return (gathered, numel), (experts * again, experts)
    if not dims.reshard_after_forward:  # zero1: the trainer keeps the gathered weights to the step's end
        return (numel, micro_num * numel), (experts, micro_num * experts)
    gathered = numel + numel - s.last_blocks_numel
    return (micro_num * gathered, micro_num * numel), (micro_num * experts * 2, micro_num * experts)


def fsdp_copy_bytes(dims: ParallelDims, s: StageShapes, act_bytes: int, micro_num: int) -> float:
    """HBM bytes of FSDP2's copies on the compute stream per step: after each all-gather the parameters
    are copied out of the gathered buffer (read and write, foreach_all_gather_copy_out), and before each
    reduce-scatter the gradients are copied into its fp32 input (foreach_reduce_scatter_copy_in): read
    in the compute dtype, or in fp32 where pipelining accumulated them."""
    (gathered, reduced), (experts, expert_reduced) = fsdp_numels(dims, s, micro_num)
    grad_bytes = 4 if dims.pp > 1 else act_bytes
    return 2 * act_bytes * (gathered + experts) + (grad_bytes + 4) * (reduced + expert_reduced)


def grad_accumulation_bytes(dims: ParallelDims, s: StageShapes, act_bytes: int, micro_num: int) -> float:
    """HBM bytes per step of accumulating unsharded gradients over micro-batches, which pipelining does
    (FSDP casts the first micro-batch's to fp32, then adds each later one in)."""
    if dims.pp == 1 or not dims.fsdp:
        return 0.0
    numel = s.compute_numel
    return numel * ((act_bytes + 4) + (micro_num - 1) * (act_bytes + 8))


# HBM bytes per token of an eager transformer block, forward and backward, by width (hidden h, query q,
# key/value kv, FFN f: the active width under MoE), in bf16 under FSDP with CUDA's fused RMSNorm: the norms and
# their fp32 casts, rotary (slices, negation, cat, two multiplies and an add, on q and k), the residual
# adds, SwiGLU's silu and product, and the gradients autograd adds up; counted from the block's ops in
# tests/unit/test_plan_traffic.py. A MoE layer adds its routing (the fp32 gate, softmax and top-k) and the
# routed rows' gather, weighting and index_add, per hidden unit: "layer" once, "routed" per top_k choice.
BLOCK_BYTES = {"hidden": 166, "q": 45, "kv": 49, "ffn": 29}
MOE_BYTES = {"layer": 35, "routed": 34}

# HBM bytes per logit element of the loss, forward and backward (eager kernels, every pass counted):
# the chunked kernel (internlm.loss) reads the bf16 logits into an fp32 block and takes its log-sum-exp
# (max, subtract, exp, sum: 30 bytes), and in backward casts them again, subtracts, exponentiates,
# scales and writes the bf16 gradient (36); F.cross_entropy on logits.float() (the vocabulary-sharded
# path) casts, log-softmaxes, and in backward fills the NLL gradient, runs the log-softmax backward and
# casts back (48).
LOSS_BYTES = {"chunked": 66, "torch": 48}
# flash attention's FLOPs over the model's: its backward recomputes QK^T (five matmuls to the forward's
# two), 3.5 forwards in all where the model counts 3; its published efficiencies count the same way
ATTN_KERNEL_FLOPS = 3.5 / 3


def communication(cfg, dims: ParallelDims, args, s0: StageShapes, act_bytes: int) -> dict:
    """Bytes one rank of pipeline stage `s0` sends per step, by mesh dimension and collective, under the
    ring model (an all-gather sends (n-1) shards, a reduce-scatter (n-1)/n of its input, an all-reduce
    twice that); `train.py --count-comm` counts the same quantity on a real run, and
    tests/parallel/test_plan_comm.py holds the two together. Collectives of a few numbers (loss and
    gradient-norm reductions) are left out."""
    data = cfg.data
    tokens, micro_num = data.micro_bsz * data.seq_len, data.micro_num
    h = args.hidden_size
    q = args.num_attention_heads * args.head_dim
    kv = args.num_kv_attention_heads * args.head_dim
    comm: dict = {}
    if dims.fsdp:
        shard, replicate = fsdp_group_sizes(dims)
        (gathered, reduced), (experts, expert_reduced) = fsdp_numels(dims, s0, micro_num)
        comm["dp_shard/all_gather"] = _ring(act_bytes * gathered, shard)
        comm["dp_shard/reduce_scatter"] = _ring(4 * reduced, shard)
        if replicate > 1:  # once per reduction: per micro-batch, or once per step under pipelining
            reductions = 1 if dims.pp > 1 else micro_num
            comm["dp_replicate/all_reduce"] = reductions * 2 * _ring(
                4 * (s0.stored_numel - s0.expert_stored_numel), replicate)
        if dims.expert_shard:  # expert-parallel experts: an FSDP unit per layer over their replicas
            comm["edp/all_gather"] = _ring(act_bytes * experts, dims.edp)
            comm["edp/reduce_scatter"] = _ring(4 * expert_reduced, dims.edp)
    if dims.tensor_parallel > 1:
        x = tokens * h * act_bytes
        # per block: two all-reduces forward and two backward (msp: all-gather + reduce-scatter pairs, the
        # same bytes); the embedding's output (forward) and the head's input (backward) once each
        n = 4 * s0.num_layers + s0.first + s0.last
        main = "tp/all_reduce" if not dims.sequence_parallel else "tp/all_gather+reduce_scatter"
        comm[main] = micro_num * n * 2 * _ring(x, dims.tp)
        if s0.moe_layers:  # MoE: the routing weights' (and mixing coefficients') gradients summed over tp
            moe = micro_num * s0.moe_layers * 2 * _ring(tokens * 4 * (args.top_k + 2 * args.moe_use_residual),
                                                              dims.tp)
            comm["tp/all_reduce"] = comm.get("tp/all_reduce", 0.0) + moe
    if dims.isp > 1:
        local = tokens / dims.isp
        head, context = dims.head, dims.context
        gathers = micro_num * local * s0.moe_layers * args.num_experts * 4 * (dims.isp - 1)  # MoE router logits
        if head > 1:
            # Ulysses over the head group: q, k, v to head-parallel and the output back, forward and backward;
            # the whole sequence's positions (int64) for the attention plan once per micro-batch
            per_layer = 2 * (local * (q + 2 * kv) + local * q) * act_bytes
            comm["tp/all_to_all"] = micro_num * s0.num_layers * per_layer * (head - 1) / head
            gathers += micro_num * (head - 1) * local * 8
        if context > 1:
            # ring attention over the context group on this rank's context chunk and head share: forward
            # passes k and v (its kv heads) round the ring; backward passes them with their fp32 gradients
            # round it again and home (double ring: inner rounds and outer hops)
            nw, w = context // dims.window, dims.window
            block = tokens / context * kv / head  # elements of k (or v) a rank holds
            hops_f = nw * (w - 1) + (nw - 1)
            hops_b = nw * (w if w > 1 else 0) + (nw if nw > 1 else 0)
            comm["context/send_recv"] = micro_num * s0.num_layers * block * (
                hops_f * 2 * act_bytes + hops_b * 2 * (act_bytes + 4))
            gathers += micro_num * (context - 1) * tokens / context * 8  # positions for the ring's pieces
        comm["tp/all_gather"] = gathers
    if dims.ep > 1 and s0.moe_layers:
        # each routed token (top_k per token) to its expert's rank and back, forward and backward, with
        # routing spread evenly ((ep-1)/ep leave the rank) and nothing dropped; plus the expert ids (int64)
        leave = tokens * args.top_k * (dims.ep - 1) / dims.ep
        comm["ep/all_to_all"] = micro_num * s0.moe_layers * leave * (4 * h * act_bytes + 8)
    if dims.pp > 1:
        comm["pp/send_recv"] = micro_num * pipeline_sends(dims, s0.stage_ids) * tokens * h * act_bytes / (
            dims.tp if (dims.sequence_parallel or dims.isp > 1) else 1)
    return comm


def plan(cfg, gpus: int, hw: Hardware, gpus_per_node: int = 8, shapes: list[StageShapes] | None = None) -> Plan:
    """Predict one step of `cfg` (its layout keys applied) on `gpus` accelerators of kind `hw`."""
    from internlm.config import validate

    validate(cfg, world_size=gpus)
    dims = ParallelDims.from_config(cfg, gpus)
    args = builders.model_args(cfg)
    shapes = shapes or stage_shapes(cfg, dims)
    data, m = cfg.data, cfg.model
    dtype = torch_dtype(m.dtype)
    act_bytes = 4 if dtype == torch.float32 else 2
    tokens = data.micro_bsz * data.seq_len  # packed tokens of one micro-batch
    micro_num = data.micro_num
    ck = m.checkpoint
    frac = 1.0 if ck is True else float(ck or 0.0)
    policy = m.checkpoint_policy if frac > 0 else "none"

    def checkpointed(n_layers: int) -> int:  # as apply_activation_checkpointing counts them
        return min(n_layers, math.ceil(frac * n_layers - 1e-9)) if frac > 0 else 0
    residual = act_bytes if dims.fsdp else 4  # autocast keeps the residual stream in fp32
    h, V = args.hidden_size, args.vocab_size
    kv = args.num_kv_attention_heads * args.head_dim
    q = args.num_attention_heads * args.head_dim
    f = active_ffn_width(args)  # MoE: the width one token goes through
    layer_weights = 2 * h * q + 2 * h * kv + 3 * h * f
    notes = []
    if args.num_experts > 1:
        notes.append("MoE layers are timed as dense FFNs of the active width plus their routing traffic, with "
                     "tokens spread evenly over the experts (no imbalance, nothing dropped)")

    # ---- memory per pipeline rank -----------------------------------------------------------------
    per_stage = []
    for s in shapes:
        n_layers = s.num_layers
        n_ck = checkpointed(n_layers)
        a_plain = activation_bytes_per_token_layer(args, dims, "none", residual, act_bytes)
        a_ck = activation_bytes_per_token_layer(args, dims, policy, residual, act_bytes) if n_ck else 0.0
        per_mb = tokens * ((n_layers - n_ck) * a_plain + n_ck * a_ck)
        recompute = tokens * a_plain if n_ck and policy == "full" else 0.0  # one block, throughout backward
        # logits (kept for the loss backward) and their gradient, sharded over tp, as a backward starts
        logits = 2 * tokens * V * act_bytes / dims.tp if s.last else 0.0
        # fp32, reduced (and sharded) by FSDP; under pipelining accumulated unsharded until the step's end
        grads = 4 * (s.compute_numel if dims.pp > 1 and dims.fsdp else s.stored_numel)
        # Activations and gradients do not peak together: a step starts without gradients (the optimizer
        # set them to None), a stage's appear during its first backward, and that backward frees the
        # activations. So the peak is the largest of the states as each backward starts (activations of
        # the micro-batches in flight, gradients of the backwards done) and as it ends (the backward's
        # last layer: its gradients, less one layer's, and the recomputed block under full checkpointing).
        # micro_num=1 without pipelining: max(activations, gradients + recompute), not their sum; with
        # more micro-batches a later one's forward and backward run over the earlier ones' gradients.
        acts, grads_held = max(((per_mb * a + recompute + (logits if start else 0.0), grads * g)
                                for a, g, start in memory_states(dims, s.pp_rank, micro_num)), key=sum)
        mem = {
            "parameters": 4 * s.stored_numel,  # fp32 master weights
            "gradients": grads_held,
            "optimizer_states": 8 * s.stored_numel,  # AdamW exp_avg and exp_avg_sq
            "compute_weights": 0.0, "gradient_buffers": 0.0,
            "activations": acts,
        }
        if dims.fsdp:
            if dims.reshard_after_forward:  # the gathered block and the prefetched one
                mem["compute_weights"] = act_bytes * 2 * s.largest_block_numel
            else:  # FSDP keeps every gathered weight from forward to backward (also when it shards 1 way)
                # (and the experts, when FSDP shards them over their replicas)
                mem["compute_weights"] = act_bytes * (s.compute_numel - (0 if dims.expert_shard else s.expert_numel))
            # a block's unsharded gradient (and its fp32 copy for the reduce-scatter under bf16 compute)
            mem["gradient_buffers"] = (act_bytes + (4 if act_bytes != 4 else 0)) * s.largest_block_numel
        elif act_bytes == 2:  # autocast caches its bf16 casts of the weights for the step
            mem["compute_weights"] = 2 * s.compute_numel
        mem["total"] = sum(mem.values())
        per_stage.append(mem)
    peak_stage = max(range(len(per_stage)), key=lambda i: per_stage[i]["total"])
    memory = {k: v / GiB for k, v in per_stage[peak_stage].items()}

    # ---- FLOPs ------------------------------------------------------------------------------------
    keys = (data.seq_len + 1) / 2  # causal attention span per query (samples up to seq_len long)
    attn_per_token_layer = 3 * 2 * 2 * keys * q  # model FLOPs: forward QK^T and PV, backward twice that
    attn_kernel_per_token_layer = ATTN_KERNEL_FLOPS * attn_per_token_layer
    global_tokens = tokens * micro_num * dims.dp

    # ---- communication per step (bytes sent by one rank) ----------------------------------------------
    s0 = shapes[peak_stage]
    comm = communication(cfg, dims, args, s0, act_bytes)

    # ---- time -----------------------------------------------------------------------------------------
    bw = _groups_bandwidth(dims, hw, gpus_per_node)
    gemm_rate, attn_rate = hw.peak_flops * hw.gemm_eff, hw.peak_flops * hw.attn_eff
    hbm = hw.hbm_tbps * 1e12 * hw.hbm_eff
    split = dims.tp  # tp and isp both divide a micro-batch's work over the tp group
    worst = 0.0
    parts = {}
    loss_kernel = "torch" if cfg.loss.kernel == "torch" or dims.tensor_parallel > 1 else "chunked"
    block_bytes = BLOCK_BYTES["hidden"] * h + BLOCK_BYTES["q"] * q + BLOCK_BYTES["kv"] * kv + BLOCK_BYTES["ffn"] * f
    moe_bytes = (MOE_BYTES["layer"] + MOE_BYTES["routed"] * args.top_k) * h if args.num_experts > 1 else 0.0
    for s in shapes:
        n_ck = checkpointed(s.num_layers)
        gemm = 6 * tokens * (s.num_layers * layer_weights + (h * V if s.last else 0)) / split
        attn = tokens * s.num_layers * attn_kernel_per_token_layer / split
        # elementwise traffic of the eager blocks (BLOCK_BYTES, MOE_BYTES) and the last stage's loss over
        # its logits (its vocabulary shard, or its tokens under isp)
        elem = tokens * (s.num_layers * block_bytes + s.moe_layers * moe_bytes) / split
        loss = tokens * V * LOSS_BYTES[loss_kernel] / split if s.last else 0.0
        t_gemm, t_attn, t_elem = gemm / gemm_rate, attn / attn_rate, elem / hbm
        t_copy = (fsdp_copy_bytes(dims, s, act_bytes, micro_num)
                  + grad_accumulation_bytes(dims, s, act_bytes, micro_num)) / micro_num / hbm
        recompute = 0.0  # a block's forward again (the head and the loss are not checkpointed)
        if n_ck and policy == "full":
            blocks_gemm = 6 * tokens * s.num_layers * layer_weights / split / gemm_rate
            recompute = n_ck / s.num_layers * (blocks_gemm + t_attn + t_elem) / 3
        elif n_ck:
            recompute = n_ck / s.num_layers * t_elem / 3
            if policy == "selective_op":  # the forward of wk, wo and w3 again
                again = (h * kv + q * h + h * f) / layer_weights
                recompute += n_ck * 2 * tokens * layer_weights * again / split / gemm_rate
        t_elem += loss / hbm
        t = t_gemm + t_attn + t_elem + t_copy
        if t + recompute > worst:
            worst = t + recompute
            parts = {"gemm": t_gemm, "attention": t_attn, "elementwise": t_elem, "fsdp_copy": t_copy,
                     "recompute": recompute}
    compute = micro_num * (parts["gemm"] + parts["attention"] + parts["elementwise"] + parts["fsdp_copy"])
    recompute = micro_num * parts["recompute"]
    busy = compute + recompute
    exposed = 0.0
    tp_bytes = sum(v for k, v in comm.items() if k.startswith(("tp/", "context/")))
    # on the critical path: each block waits for its collectives (tensor/sequence parallel within the tp
    # group, expert dispatch across data-parallel ranks)
    critical = tp_bytes / bw["tp"] + comm.get("ep/all_to_all", 0.0) / bw["dp_shard"]
    exposed += critical
    fsdp_time = sum(v / bw[k.split("/")[0]] for k, v in comm.items() if k.startswith("dp_"))
    if fsdp_time:
        blocks = max(s0.num_layers, 1)
        # prefetching overlaps FSDP with compute, except the first gather and the last reduce
        exposed += max(0.0, fsdp_time - busy) + fsdp_time / blocks
    pp_time = comm.get("pp/send_recv", 0.0) / bw["pp"]
    bubble = bubble_fraction(dims, micro_num) * busy
    optimizer = 40 * s0.stored_numel / hbm  # AdamW reads/writes weights, grads and two states in fp32
    step = busy + exposed + pp_time + bubble + optimizer
    time_s = {"compute": compute, "recompute": recompute, "exposed_comm": exposed + pp_time, "bubble": bubble,
              "optimizer": optimizer, "step": step, "comm_total": critical + fsdp_time + pp_time,
              "gemm": micro_num * parts["gemm"], "attention": micro_num * parts["attention"],
              "elementwise": micro_num * parts["elementwise"], "fsdp_copy": micro_num * parts["fsdp_copy"]}
    rates = step_throughput(args, m, tokens=global_tokens, step_time_s=step, world_size=gpus, seq_len=data.seq_len,
                            peak_flops=hw.peak_flops)
    internevo_fpt = rates["tflops"] * 1e12 * step * gpus / global_tokens
    # headroom for what is not counted: the CUDA context and kernels' workspaces (~1 GiB) and the
    # caching allocator's fragmentation (~5% of what it holds)
    fits = memory["total"] * 1.05 + 1.0 <= hw.memory_gib
    return Plan(describe_layout(dims, cfg), fits, memory, peak_stage,
                {"model": rates["model_flops_per_token"], "internevo": internevo_fpt}, comm, time_s,
                rates["tgs"], rates["tflops"], rates["mfu"], notes,
                {"fsdp_copy": fsdp_copy_bytes(dims, s0, act_bytes, micro_num)})
