"""Checks across keys: what the config alone decides, and (with a world size) the parallel layout."""
from __future__ import annotations

import math
import os

from internlm.config.checks import ConfigError


def validate(cfg, world_size: int | None = None) -> None:
    """Raise ConfigError for anything wrong in `cfg`; with `world_size`, also check the parallel layout.
    Each key's own rules are checked again first, so a config changed with dataclasses.replace is safe."""
    from internlm.config.load import resolve, to_dict

    full = resolve(to_dict(cfg, all_keys=True))
    model, data, par = full.model, full.data, full.parallel

    if model.head_dim % 2:
        raise ConfigError(f"model.head_dim={model.head_dim} must be even for rotary position embeddings.")
    heads, kv = model.num_attention_heads, model.num_kv_attention_heads
    if heads % kv:
        raise ConfigError(f"model.num_attention_heads={heads} is not divisible by model.num_kv_attention_heads={kv}.")
    if full.model_type == "INTERNLM" and kv != heads:
        raise ConfigError(f"model_type 'INTERNLM' has no grouped-query attention: model.num_kv_attention_heads={kv} "
                          f"must equal model.num_attention_heads={heads}.")
    if data.seq_len > model.max_position_embeddings:
        raise ConfigError(f"data.seq_len={data.seq_len} is larger than model.max_position_embeddings="
                          f"{model.max_position_embeddings}; raise model.max_position_embeddings or shorten the "
                          f"sequences.")
    for key in ("train_folder", "valid_folder"):
        folder = getattr(data, key)
        if folder is not None and data.type == "streaming" and os.path.isfile(folder):
            continue  # streaming reads a single data file too
        if folder is not None and not os.path.isdir(folder):
            raise ConfigError(f"data.{key}={folder!r} is not an existing directory (looked in {os.getcwd()!r}); "
                              f"fix the path, or set data.{key}=None"
                              f"{' to train on dummy data' if key == 'train_folder' else ' to skip validation'}.")
    if data.type == "streaming":
        if data.train_folder is None:
            raise ConfigError("data.type='streaming' reads data.train_folder: set it to a data file or folder.")
        if not data.tokenizer_path:
            raise ConfigError("data.type='streaming' tokenizes on the fly: set data.tokenizer_path to a "
                              "sentencepiece .model file.")
        if not os.path.isfile(data.tokenizer_path):
            raise ConfigError(f"data.tokenizer_path={data.tokenizer_path!r} is not a file (looked in {os.getcwd()!r}).")
    if full.ckpt.enable_save_ckpt and not full.ckpt.save_ckpt_folder:
        raise ConfigError("ckpt.enable_save_ckpt=True needs ckpt.save_ckpt_folder to name a folder.")

    tp, pp, chunks = par.tensor.size, par.pipeline.size, model.num_chunks
    two_d = par.tensor.mode == "isp" and par.sequence_2D.enable  # heads split over head_size only
    split, split_key = ((par.sequence_2D.head_size, "parallel.sequence_2D.head_size") if two_d
                        else (tp, "parallel.tensor.size"))
    for name, value in (("model.num_attention_heads", heads), ("model.num_kv_attention_heads", kv)):
        if value % split:
            raise ConfigError(f"{name}={value} is not divisible by {split_key}={split}.")
    if model.vocab_size % tp and par.tensor.mode != "isp":  # isp splits tokens, not the vocabulary
        padded = math.ceil(model.vocab_size / tp) * tp
        raise ConfigError(f"model.vocab_size={model.vocab_size} is not divisible by parallel.tensor.size={tp}; pad "
                          f"the vocabulary to a multiple of {tp} (e.g. model.vocab_size={padded}).")
    wp = par.weight.size
    if par.tensor.mode == "isp":
        tokens = data.micro_bsz * data.seq_len
        if tokens % tp:
            raise ConfigError(f"parallel.tensor.mode='isp' splits each micro-batch's {tokens} tokens (data.micro_bsz * "
                              f"data.seq_len) over parallel.tensor.size={tp} ranks: make it a multiple of {tp}.")
        if tp % wp and wp % tp:
            raise ConfigError(f"parallel.weight.size={wp} must divide parallel.tensor.size={tp} or be a multiple of it "
                              f"(weight parallelism shards weights within the isp group, and beyond it over zero1).")
        s2d = par.sequence_2D
        if s2d.enable:
            heads_, ctx = s2d.head_size, s2d.context_size
            if heads_ * ctx != tp:
                raise ConfigError(f"parallel.sequence_2D: head_size({heads_}) * context_size({ctx}) = {heads_ * ctx} "
                                  f"must equal parallel.tensor.size={tp}.")
            win = s2d.window_size
            if ctx % win:
                raise ConfigError(f"parallel.sequence_2D.window_size={win} must divide context_size={ctx} (the "
                                  f"double ring's windows split the context ranks).")
            if s2d.device_placement_strategy.interleaved and 1 < win < ctx and ctx % (2 * win):
                raise ConfigError(f"parallel.sequence_2D.device_placement_strategy.interleaved=True takes every other "
                                  f"context rank into windows of window_size={win}: make context_size={ctx} a "
                                  f"multiple of {2 * win}, or set interleaved=False.")
            if ctx > 1 and tokens % (2 * tp):
                raise ConfigError(f"parallel.sequence_2D.context_size={ctx} cuts each micro-batch's {tokens} tokens "
                                  f"into 2 x {ctx} zigzag chunks, each split over head_size={heads_}: make "
                                  f"data.micro_bsz * data.seq_len a multiple of {2 * tp}.")
    elif par.sequence_2D.enable:
        raise ConfigError("parallel.sequence_2D.enable=True needs parallel.tensor.mode='isp' (its degree is "
                          "head_size x context_size).")
    elif wp > 1:
        raise ConfigError(f"parallel.weight.size={wp} works within InternEvo's isp mode: set "
                          f"parallel.tensor.mode='isp' (or use parallel.zero1.fsdp=True to shard weights).")
    if model.norm_head and model.tie_word_embeddings:
        raise ConfigError("model.norm_head=True normalises the output matrix's rows but the tied embedding would "
                          "still read the raw ones, which no Hugging Face model can express: set "
                          "model.tie_word_embeddings=False (InternEvo's InternLM2 configs do).")
    if chunks > 1 and pp == 1:
        raise ConfigError(f"model.num_chunks={chunks} needs pipeline parallelism (parallel.pipeline.size > 1); "
                          f"set model.num_chunks=1.")
    if pp > 1:
        if model.tie_word_embeddings:
            raise ConfigError(f"model.tie_word_embeddings=True is not supported with parallel.pipeline.size={pp}: the "
                              f"embedding (first stage) and the output head (last stage) would be two matrices that "
                              f"drift apart; untie them (model.tie_word_embeddings=False) or train without pipeline "
                              f"parallelism.")
        if model.num_layers % (pp * chunks):
            raise ConfigError(f"model.num_layers={model.num_layers} is not divisible by parallel.pipeline.size({pp}) "
                              f"* model.num_chunks({chunks}).")
        if par.pipeline.mode == "zbv" and chunks != 2:
            raise ConfigError(f"parallel.pipeline.mode='zbv' runs two stages per rank: set model.num_chunks=2 "
                              f"(got {chunks}).")
        _check_micro_num(full.data.micro_num, pp, chunks, par.pipeline.mode)

    _check_moe(full, tp, pp)

    if world_size is None:
        return
    if world_size < 1 or world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor.size({tp}) * "
                          f"parallel.pipeline.size({pp}).")
    from internlm.parallel_dims import expert_parallel_size, shard_group_size

    dp = world_size // (tp * pp)
    ep = expert_parallel_size(par.expert.size, dp, model.num_experts)
    if model.num_experts and ep > 1 and tp > 1 and par.tensor.mode == "isp":
        raise ConfigError(f"parallel.expert.size={par.expert.size} (expert parallelism over {ep} ranks) with "
                          f"parallel.tensor.mode='isp' is not built yet: under isp the experts are replicated over "
                          f"the isp group and sharded by zero1/weight.size; set parallel.expert.size=1, or use "
                          f"parallel.tensor.mode='msp' with expert parallelism (doc/moe.md).")
    if model.num_experts and ep > 1:
        if dp % ep:
            raise ConfigError(f"parallel.expert.size={par.expert.size} does not divide the data-parallel size {dp}: "
                              f"expert parallelism splits the data-parallel ranks into groups of that size.")
        if model.num_experts % ep:
            raise ConfigError(f"model.num_experts={model.num_experts} is not divisible by the expert-parallel size "
                              f"{ep} (parallel.expert.size={par.expert.size}): each rank holds the same number of "
                              f"experts.")
        edp, ez = dp // ep, par.expert_zero1.size
        if ez not in (1, edp) and ez > 0:
            raise ConfigError(f"parallel.expert_zero1.size={ez}: expert-parallel experts are sharded over all of "
                              f"their {edp} replica(s) (data-parallel size {dp} / expert.size {ep}; size=-1 or "
                              f"{edp}) or kept whole on each (size=1); smaller ZeRO groups for experts are not "
                              f"supported.")
    zero1 = par.zero1.size
    if dp % shard_group_size(zero1, dp):
        raise ConfigError(f"parallel.zero1.size={zero1} does not divide the data-parallel size {dp} (world size "
                          f"{world_size} / (tensor {tp} * pipeline {pp})); use a divisor of {dp}, or -1 to shard "
                          f"over all data-parallel ranks.")


def _check_micro_num(m: int, pp: int, chunks: int, mode: str) -> None:
    """The micro-batch counts PyTorch's pipeline schedules accept (else a bare ValueError at the first step)."""
    if mode in ("gpipe", "zbv"):
        return
    if mode != "zbh1" and chunks == 1:
        if m < pp:
            raise ConfigError(f"data.micro_num={m} is fewer than the {pp} pipeline stages: 1F1B needs at least one "
                              f"micro-batch per stage; set data.micro_num={pp} (or more), or "
                              f"parallel.pipeline.mode='gpipe'.")
        return
    rounds = max(1, m // pp)
    if m % rounds:
        name = "zero-bubble (zbh1)" if mode == "zbh1" else "interleaved 1F1B"
        raise ConfigError(f"data.micro_num={m} does not fit the {name} schedule over parallel.pipeline.size={pp}: "
                          f"PyTorch runs it in micro_num // {pp} = {rounds} rounds of equal size, so micro_num must "
                          f"be a multiple of {rounds} (any multiple of {pp} is); use data.micro_num={rounds * pp} "
                          f"or {(rounds + 1) * pp}.")


def _check_moe(full, tp: int, pp: int) -> None:
    model, moe = full.model, full.moe
    if full.model_type == "INTERNLM_MoE" and model.num_experts < 1:
        raise ConfigError("model_type 'INTERNLM_MoE' needs model.num_experts >= 1 (e.g. model.num_experts=4).")
    if model.num_experts and full.model_type != "INTERNLM_MoE":
        raise ConfigError(f"model.num_experts={model.num_experts} needs model_type='INTERNLM_MoE' (got "
                          f"{full.model_type!r}); set model.num_experts=0 for a dense model.")
    if not model.num_experts:
        return
    if moe.top_k > model.num_experts:
        raise ConfigError(f"moe.top_k={moe.top_k} is larger than model.num_experts={model.num_experts}.")
