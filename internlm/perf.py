"""Process-level speed settings and the report of which kernel serves each operation.

`tune_cpu_malloc`: PyTorch's CPU allocator is the C library's malloc. glibc serves every block
larger than its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh `mmap` and gives it back
with `munmap` when freed, so the big tensors of a training step (logits, vocabulary-sized gradients,
optimizer temporaries, weight casts) are page-faulted in again on every step: on the 124M-parameter
benchmark about a quarter of the step went to first-touch page faults. With mmap off and the heap
kept (no trimming), freed blocks are reused by the next step. Peak memory does not grow (the same
blocks are reused); memory is not handed back to the OS while the process lives.
"""
from __future__ import annotations

import ctypes
import os
import sys

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_KEEP = 2**31 - 1  # the largest int mallopt takes: freed heap above 2 GiB is still returned

_malloc_state = "default"


def tune_cpu_malloc(enable: bool = True) -> str:
    """Keep freed memory in glibc's heap instead of returning it to the OS on every free.
    Returns a one-line description of the allocator now in use (also shown by `kernel_report`)."""
    global _malloc_state
    if not enable:
        return _malloc_state
    if _malloc_state.startswith("glibc tuned"):
        return _malloc_state
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "tcmalloc", "mimalloc"):
        if name in preload:
            _malloc_state = f"{name} (LD_PRELOAD; left as is)"
            return _malloc_state
    if not sys.platform.startswith("linux"):
        _malloc_state = "default (not Linux)"
        return _malloc_state
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _malloc_state = "default (no glibc)"
        return _malloc_state
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, _TRIM_KEEP):
        _malloc_state = "glibc tuned (no mmap, no trim)"
    else:
        _malloc_state = "default (mallopt refused)"
    return _malloc_state


def malloc_state() -> str:
    return _malloc_state


CPU_MATMUL = ("auto", "native", "fp32")


def cpu_has_lowp_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU's oneDNN has native `dtype` (bf16/fp16) GEMM kernels. Without them (AVX2-only
    CPUs) a bf16 matmul runs on a reference path some 30-60x slower than the fp32 GEMM."""
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return True  # cannot tell: keep torch's own GEMM


def resolve_cpu_matmul(requested: str, device: torch.device, dtype: torch.dtype) -> bool:
    """`model.cpu_matmul`: whether bf16/fp16 matmuls run as fp32 GEMMs on CPU (ops.Linear). `auto` does
    so only where the CPU has no native low-precision GEMM (cpu_has_lowp_gemm)."""
    if requested not in CPU_MATMUL:
        raise ValueError(f"model.cpu_matmul must be one of {CPU_MATMUL}, got {requested!r}")
    if requested == "native" or device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    return requested == "fp32" or not cpu_has_lowp_gemm(dtype)


def kernel_report(cfg, device: torch.device, dims, kernels, dtype: torch.dtype, *, loss_kernel: str,
                  adamw_kind: str) -> dict[str, str]:
    """Which implementation serves each operation of a run: `cfg` is its TrainConfig, `dims` its
    ParallelDims, `kernels` the model's resolved Kernels, `loss_kernel` the loss's kernel and
    `adamw_kind` the optimizer's AdamW implementation. Printed at start (rank 0) and returned by the
    benchmark tool, so that a figure always says what it measured."""
    from internlm.model.attention import flash_available
    from internlm.model.moe import grouped_mm_in_use
    from internlm.model.ops import rms_norm_impl
    from internlm.parallelize import fsdp_prefetch

    backend = kernels.attn_backend
    attention = {"flash": "flash-attn varlen (cu_seqlens)",
                 "varlen": "torch varlen flash attention (cu_seqlens)",
                 "sdpa": "torch SDPA (packed rows / block mask / length buckets)",
                 "sdpa_mask": "torch SDPA (one block-diagonal mask per window)",
                 "sdpa_loop": "torch SDPA (one call per sample)"}[backend]
    if backend not in ("flash", "varlen") and kernels.attn_upcast:
        attention += ", computed in fp32"
    if backend not in ("flash", "varlen") and device.type == "cuda" and not flash_available():
        attention += "; flash-attn not importable"
    compiled = cfg.model.compile
    norm = {"apex": "apex fused RMSNorm", "torch": "torch F.rms_norm (fp32)"}[rms_norm_impl(device)]
    ckpt = cfg.model.checkpoint
    if loss_kernel == "torch" or dims.tensor_parallel > 1:
        sharded = dims.tensor_parallel > 1
        loss = "torch cross_entropy" + (" (loss_parallel over the vocabulary shards)" if sharded else "")
    else:
        loss = f"chunked fp32 cross entropy ({loss_kernel})"
    adamw = {"fused": "torch AdamW (fused)", "foreach": "torch AdamW (foreach)", "apex": "apex FusedAdam"}[adamw_kind]
    gemm = ("fp32 GEMM on bf16/fp16-rounded operands" if kernels.cpu_fp32_gemm
            else "torch " + str(dtype).replace("torch.", "") + " GEMM")
    return {
        "linear": gemm,
        "attention": attention,
        "rms_norm": norm + (", in compiled blocks" if compiled else ""),
        "rope": "torch eager" + (" (fused by torch.compile)" if compiled else ""),
        "loss": loss,
        "adamw": adamw,
        "compile": "per transformer block" if compiled else "off",
        "activation_checkpointing": f"{cfg.model.checkpoint_policy} ({ckpt})" if ckpt else "off",
        "fsdp_prefetch": ("n/a (no data parallelism)" if not dims.fsdp
                          else "on" if fsdp_prefetch(cfg.hybrid_zero_optimizer) else "off"),
        "malloc": malloc_state() if device.type == "cpu" else "n/a (CUDA caching allocator)",
    } | ({"moe_experts": ("grouped GEMM (F.grouped_mm)" if grouped_mm_in_use(device, dtype)
                          else "grouped fp32 GEMM on bf16/fp16-rounded operands (F.grouped_mm)"
                          if kernels.cpu_fp32_gemm and grouped_mm_in_use(device, torch.float32)
                          else "one SwiGLU per expert (loop)")} if cfg.model.num_experts else {})
