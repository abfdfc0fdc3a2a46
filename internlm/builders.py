"""From a config to the objects of a run: model arguments and kernels, optimizer and schedulers, data.

One builder for each, used by the trainer, the benchmark's HF side and the tools, so that what a
config means is decided in one place (`internlm.config` holds the keys and their defaults).
"""
from __future__ import annotations

import torch

from internlm.config import TrainConfig, torch_dtype
from internlm.model.attention import resolve_backend, resolve_upcast
from internlm.model.internlm import Kernels, ModelArgs
from internlm.optim.lr import Beta2Scheduler, WarmupCosineLR
from internlm.perf import resolve_cpu_matmul


def model_args(cfg: TrainConfig) -> ModelArgs:
    """The model's shape from the `model` section and `model_type` (every derived key already filled)."""
    m = cfg.model
    return ModelArgs(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_kv_attention_heads=m.num_kv_attention_heads,
        head_dim=m.head_dim, intermediate_size=m.intermediate_size, mlp_ratio=m.mlp_ratio, multiple_of=m.multiple_of,
        norm_eps=m.layer_norm_epsilon, rope_base=float(m.rope_base),
        rope_scaling=dict(m.rope_scaling) if m.rope_scaling else None,
        max_position_embeddings=m.max_position_embeddings, qkv_bias=not m.no_bias, o_bias=not m.no_bias,
        tie_word_embeddings=m.tie_word_embeddings, norm_head=m.norm_head, init_std=m.init_std,
        model_type=cfg.model_type,
        num_experts=m.num_experts, top_k=cfg.moe.top_k, moe_type=m.moe_type, capacity_factor=cfg.moe.capacity_factor,
        eval_capacity_factor=cfg.moe.eval_capacity_factor, min_capacity=cfg.moe.min_capacity,
        drop_tokens=cfg.moe.drop_tokens, moe_use_residual=m.moe_use_residual,
    )


def kernels(cfg: TrainConfig, device: torch.device) -> Kernels:
    """The kernels this run uses on `device`, from model.attn_backend / attn_compute / cpu_matmul."""
    m, dtype = cfg.model, torch_dtype(cfg.model.dtype)
    return Kernels(attn_backend=resolve_backend(m.attn_backend, device, m.use_flash_attn, dtype),
                   attn_upcast=resolve_upcast(m.attn_compute, device),
                   cpu_fp32_gemm=resolve_cpu_matmul(m.cpu_matmul, device, dtype))


def schedulers(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> tuple[WarmupCosineLR, Beta2Scheduler]:
    """The warm-up + cosine LR schedule and the beta2 schedule driving `optimizer`."""
    lr, b2 = cfg.lr_scheduler, cfg.beta2_scheduler
    return (WarmupCosineLR(optimizer, total_steps=lr.total_steps, warmup_ratio=lr.warmup_ratio, eta_min=lr.eta_min,
                           init_steps=lr.init_steps),
            Beta2Scheduler(optimizer, init_beta2=b2.init_beta2, c=b2.c, cur_iter=b2.cur_iter))


def optimizer(model_parts, cfg: TrainConfig, device: torch.device, stage_world_size: int):
    """(HybridZeroOptimizer, LR scheduler, beta2 scheduler) for the model parts of this rank."""
    from internlm.optim.hybrid_zero import HybridZeroOptimizer

    fp16 = torch_dtype(cfg.model.dtype) == torch.float16
    opt = HybridZeroOptimizer(model_parts, cfg.adam, cfg.hybrid_zero_optimizer.clip_grad_norm,
                              stage_world_size=stage_world_size, device=device,
                              grad_scaler=cfg.grad_scaler if fp16 else None)
    return (opt, *schedulers(opt.torch_optimizer, cfg))


def sources(cfg: TrainConfig, seed: int):
    """(train source, valid source or None): the data folders, or generated dummy data."""
    from internlm.data.packed import DummySource

    data = cfg.data
    if data.train_folder is None:
        train = DummySource(cfg.model.vocab_size, data.dummy_num_samples, seed, max_len=max(16, data.seq_len * 2))
        valid = DummySource(cfg.model.vocab_size, 512, seed + 1, max_len=max(16, data.seq_len * 2))
        return train, (valid if data.valid_every else None)
    if data.type == "streaming":
        return _streaming_sources(cfg)
    from internlm.data.tokenized import TokenizedFolder

    train = TokenizedFolder(data.train_folder)
    if not data.valid_folder:
        return train, None
    # validation types use the training folder's ids; types only the validation folder has come after
    valid_types = TokenizedFolder(data.valid_folder).type_names
    names = list(train.type_names) + [t for t in valid_types if t not in train.type_names]
    return train, TokenizedFolder(data.valid_folder, type_names=names)


def _streaming_sources(cfg: TrainConfig):
    """(StreamingCorpus, valid source or None): validation data is .bin files or raw files read at start."""
    from internlm.data.stream_loader import check_tokenizer, read_corpus
    from internlm.data.streaming import StreamingCorpus, is_streaming_folder
    from internlm.data.tokenized import TokenizedFolder

    data = cfg.data
    check_tokenizer(data.tokenizer_path, cfg.model.vocab_size)
    train = StreamingCorpus(data.train_folder, fmt=data.format)
    if not data.valid_folder:
        return train, None
    if is_streaming_folder(data.valid_folder):
        types = StreamingCorpus(data.valid_folder).type_names
        names = list(train.type_names) + [t for t in types if t not in train.type_names]
        return train, read_corpus(StreamingCorpus(data.valid_folder, names, fmt=data.format), data.tokenizer_path)
    types = TokenizedFolder(data.valid_folder).type_names
    names = list(train.type_names) + [t for t in types if t not in train.type_names]
    return train, TokenizedFolder(data.valid_folder, type_names=names)


def type_names(train_source, valid_source) -> list[str]:
    """The data types the loss keeps statistics for: the training source's, then any only validation has."""
    names = list(train_source.type_names)
    return names + [t for t in (valid_source.type_names if valid_source is not None else []) if t not in names]


def train_loader(cfg: TrainConfig, source, seed: int, dp_rank: int = 0, dp_size: int = 1):
    from internlm.data.loader import build_train_loader
    from internlm.data.streaming import StreamingCorpus

    data = cfg.data
    if isinstance(source, StreamingCorpus):
        from internlm.data.stream_loader import StreamingLoader

        return StreamingLoader(source, data.tokenizer_path, packed_length=data.seq_len, micro_num=data.micro_num,
                               micro_bsz=data.micro_bsz, dp_rank=dp_rank, dp_size=dp_size,
                               min_length=data.min_length, pack_sample_into_one=data.pack_sample_into_one,
                               workers=data.num_worker)
    return build_train_loader(source, packed_length=data.seq_len, micro_num=data.micro_num, micro_bsz=data.micro_bsz,
                              dp_rank=dp_rank, dp_size=dp_size, seed=seed, min_length=data.min_length,
                              pack_sample_into_one=data.pack_sample_into_one, shuffle=data.shuffle)


def valid_batches(cfg: TrainConfig, source, dp_rank: int = 0, dp_size: int = 1):
    """The validation micro-batches of this dp rank, or None without validation."""
    from internlm.data.loader import build_valid_loader

    data = cfg.data
    if source is None or not data.valid_every:
        return None
    return build_valid_loader(source, packed_length=data.seq_len, micro_bsz=data.micro_bsz,
                              valid_micro_num=data.valid_micro_num, dp_rank=dp_rank, dp_size=dp_size)
