"""Training metrics: throughput formulas, peak FLOPS, memory, and the metrics writers.

Formulas (see doc/metrics.md for the full derivation):

* TGS    = tokens of the global batch / (world size * seconds of the whole step)   (InternEvo's "tgs")
* TFLOPS = InternEvo's ``get_megatron_flops``: an estimate that counts activation recompute,
           so it is the hardware throughput reported by InternEvo, comparable with its published numbers.
* MFU    = useful model FLOPs per token (no recompute) * tokens/s per device / peak FLOPS of the device.

Everything here is plain Python or plain torch and knows nothing about distribution: callers pass
world sizes and token counts that they have already reduced.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from typing import Any, Mapping

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "tgs",
    "megatron_tflops",
    "model_flops_per_token",
    "mfu",
    "internevo_mlp_ratio",
    "step_throughput",
    "measure_peak_tflops",
    "known_peak_tflops",
    "device_peak_tflops",
    "peak_memory_bytes",
    "MetricsWriter",
    "format_log_line",
    "format_duration",
    "EtaClock",
]


# --------------------------------------------------------------------------------------------
# throughput formulas
# --------------------------------------------------------------------------------------------


def tgs(global_tokens_per_step: float, step_time_s: float, world_size: int) -> float:
    """Tokens per GPU per second, InternEvo's TGS.

    InternEvo computes it as tokens of one data-parallel rank's batch * dp size / world size / step
    time, i.e. the global batch's tokens spread over every device (tp and pp ranks included) and over
    the wall time of the whole step (forward, backward, optimizer).
    """
    if step_time_s <= 0 or world_size <= 0:
        raise ValueError(f"step_time_s and world_size must be positive, got {step_time_s}, {world_size}")
    return float(global_tokens_per_step) / (world_size * step_time_s)


def megatron_tflops(
    step_time_s: float,
    *,
    checkpoint: bool | float,
    seq_len: int,
    hidden_size: int,
    num_layers: int,
    vocab_size: int,
    global_batch_size: float,
    world_size: int,
    mlp_ratio: float,
    use_swiglu: bool = True,
    selective_checkpoint: bool = False,
) -> float:
    """Achieved TFLOPS per device exactly as InternEvo's ``get_megatron_flops`` computes it.

    ``global_batch_size`` counts sequences of ``seq_len`` tokens (global tokens / seq_len; InternEvo
    passes micro_bsz * micro_num * dp_size). ``checkpoint`` is InternEvo's ``model.checkpoint``: any
    truthy value (True or a non-zero fraction of layers) selects the recompute factor 4, as InternEvo
    does. ``selective_checkpoint`` follows newer InternEvo releases: with checkpointing on, only the
    attention score term drops back to factor 3.
    """
    if step_time_s <= 0 or world_size <= 0:
        raise ValueError(f"step_time_s and world_size must be positive, got {step_time_s}, {world_size}")
    factor = 4 if checkpoint else 3
    attn_factor = 3 if (not checkpoint or selective_checkpoint) else 4
    if use_swiglu:
        # SwiGLU has three h x (mlp_ratio*h) matrices instead of two.
        mlp_ratio = mlp_ratio * 3 / 2
    b, s, h = global_batch_size, seq_len, hidden_size
    dense = factor * (8 + 4 * mlp_ratio) * b * s * h**2  # wqkv, wo, mlp
    attention = attn_factor * 4 * b * s**2 * h  # scores and weighted sum, no causal discount
    head = 6 * b * s * h * vocab_size
    flops_per_step = (dense + attention) * num_layers + head
    return flops_per_step / (step_time_s * world_size * 1e12)


def model_flops_per_token(
    *,
    hidden_size: int,
    num_layers: int,
    vocab_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    intermediate_size: int,
    seq_len: int,
    causal: bool = True,
) -> float:
    """Useful training FLOPs (forward + backward) per token, for MFU.

    Counts matrix multiplications only (norms, softmax, activations, rotary and the loss are a few
    percent at most and are left out, as is customary). A matmul with a k x n weight costs 2*k*n FLOPs
    per token forward and twice that backward (input and weight gradients), so 6 per weight element.

    * per layer: q and o are h x (heads*head_dim), k and v are h x (kv_heads*head_dim) (GQA-aware),
      SwiGLU has three h x intermediate matrices;
    * LM head: h x vocab (the embedding lookup costs no FLOPs);
    * attention: per token per layer, q.k^T and p.v cost 2 * 2 * L_kv * heads * head_dim forward,
      x3 for forward + backward. L_kv = seq_len for full attention. With ``causal`` a query at position
      i sees i+1 keys, so on average (seq_len + 1) / 2 -- only that useful part is counted, whatever
      the kernel actually computes. ``seq_len`` is the attention span (the packed length); with varlen
      attention over short packed documents the true attention work is smaller still.

    Activation recompute is not counted: MFU measures useful work.
    """
    h = hidden_size
    q_dim = num_heads * head_dim
    kv_dim = num_kv_heads * head_dim
    layer_weights = h * q_dim + 2 * h * kv_dim + q_dim * h + 3 * h * intermediate_size
    matmul_weights = num_layers * layer_weights + h * vocab_size
    keys_per_query = (seq_len + 1) / 2 if causal else seq_len
    attention = num_layers * 3 * (2 * 2 * keys_per_query * num_heads * head_dim)
    return float(6 * matmul_weights + attention)


def mfu(model_flops_per_token: float, tokens_per_second_per_device: float, peak_flops_per_device: float) -> float:
    """Model FLOPs utilisation as a fraction in [0, 1] (peak given in FLOPS, not TFLOPS)."""
    if peak_flops_per_device <= 0:
        raise ValueError(f"peak_flops_per_device must be positive, got {peak_flops_per_device}")
    return model_flops_per_token * tokens_per_second_per_device / peak_flops_per_device


def internevo_mlp_ratio(mlp_ratio: float, multiple_of: int, hidden_size: int, intermediate_size: int) -> float:
    """The mlp_ratio InternEvo's TFLOPS formula takes: the config's, unless an explicit FFN width differs
    from the one it gives (then the real ratio)."""
    from internlm.model.shape import swiglu_hidden_dim

    if swiglu_hidden_dim(hidden_size, mlp_ratio, multiple_of) == intermediate_size:
        return mlp_ratio
    return intermediate_size / hidden_size


def active_ffn_width(args) -> float:
    """The FFN width one token goes through: intermediate_size for a dense model; for a MoE model top_k
    experts (+ the residual FFN), plus the router (h x num_experts, + h x 2 for the residual mix) as the
    width of a SwiGLU of the same FLOPs (3 matrices of h x width). Dropped tokens are counted as routed:
    these are the FLOPs of the active parameters."""
    f = args.intermediate_size
    if not getattr(args, "num_experts", 0):
        return f
    residual = bool(args.moe_use_residual)
    return args.top_k * f + (f if residual else 0) + (args.num_experts + (2 if residual else 0)) / 3


def step_throughput(args, model_cfg, *, tokens: float, step_time_s: float, world_size: int, seq_len: int,
                    peak_flops: float) -> dict:
    """TGS, TFLOPS (InternEvo's formula) and MFU of one step of `tokens` global tokens. `args` is the
    model's ModelArgs, `model_cfg` the config's `model` section (mlp_ratio, multiple_of, checkpoint)."""
    t = tgs(tokens, step_time_s, world_size)
    ffn = active_ffn_width(args)
    ratio = (internevo_mlp_ratio(model_cfg.mlp_ratio, model_cfg.multiple_of, args.hidden_size, args.intermediate_size)
             if ffn == args.intermediate_size else ffn / args.hidden_size)
    tf = megatron_tflops(step_time_s, checkpoint=bool(model_cfg.checkpoint), seq_len=seq_len,
                         hidden_size=args.hidden_size, num_layers=args.num_layers, vocab_size=args.vocab_size,
                         global_batch_size=tokens / seq_len, world_size=world_size, mlp_ratio=ratio)
    fpt = model_flops_per_token(hidden_size=args.hidden_size, num_layers=args.num_layers, vocab_size=args.vocab_size,
                                num_heads=args.num_attention_heads, num_kv_heads=args.num_kv_attention_heads,
                                head_dim=args.head_dim, intermediate_size=ffn, seq_len=seq_len)
    return dict(tgs=t, tflops=tf, mfu=mfu(fpt, t, peak_flops), model_flops_per_token=fpt)


# --------------------------------------------------------------------------------------------
# peak FLOPS of the device
# --------------------------------------------------------------------------------------------

# Dense (no structured sparsity) 16-bit tensor-core peaks in TFLOPS, by device name fragment. The more
# specific fragment comes first: "H100 PCIe" must win over "H100".
_KNOWN_16BIT_PEAKS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.0),
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800 PCIE", 756.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("V100", 125.0),  # fp16 only; V100 has no bf16 tensor cores
)

_peak_cache: dict[tuple[str, str], float] = {}


def known_peak_tflops(device_name: str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak TFLOPS from the table for a CUDA device name, or None when unknown (or not 16-bit)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    name = device_name.upper()
    for fragment, peak in _KNOWN_16BIT_PEAKS:
        if fragment in name:
            return peak
    return None


def measure_peak_tflops(
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    size: int | None = None,
    seconds: float = 0.5,
) -> float:
    """Best matmul throughput (TFLOPS) of square ``size`` x ``size`` matmuls on ``device``.

    Runs a warm-up, then several timed batches for about ``seconds`` in total and returns the best
    batch, which is what a well-shaped matmul can reach here (a practical peak, below the data sheet).
    """
    device = torch.device(device)
    is_cuda = device.type == "cuda"
    if size is None:
        size = 8192 if is_cuda else 1024
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    flops_per_matmul = 2.0 * size**3

    def sync() -> None:
        if is_cuda:
            torch.cuda.synchronize(device)

    # warm-up, and a first timing to choose how many matmuls make one timed batch
    torch.mm(a, b, out=out)
    sync()
    t0 = time.perf_counter()
    torch.mm(a, b, out=out)
    sync()
    one = max(time.perf_counter() - t0, 1e-9)
    num_batches = 5
    reps = max(1, int(seconds / num_batches / one))

    best = flops_per_matmul / one
    for _ in range(num_batches):
        if is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                torch.mm(a, b, out=out)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=out)
            elapsed = time.perf_counter() - t0
        best = max(best, flops_per_matmul * reps / max(elapsed, 1e-9))
    return best / 1e12


def device_peak_tflops(
    device: str | torch.device,
    dtype: torch.dtype = torch.bfloat16,
    configured: float | None = None,
) -> float:
    """Peak TFLOPS used for MFU: ``configured`` if given, else the known-GPU table, else a measured
    matmul peak. The table lookup and the probe are cached per (device, dtype) for the process."""
    if configured is not None:
        if configured <= 0:
            raise ValueError(f"configured peak must be positive, got {configured}")
        return float(configured)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), str(dtype))
    if key in _peak_cache:
        return _peak_cache[key]
    peak = None
    if device.type == "cuda":
        peak = known_peak_tflops(torch.cuda.get_device_name(device), dtype)
    if peak is None:
        peak = measure_peak_tflops(dtype=dtype, device=device)
        logger.info("measured matmul peak on %s (%s): %.3f TFLOPS", device, dtype, peak)
    _peak_cache[key] = peak
    return peak


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------


def peak_memory_bytes(device: str | torch.device) -> int:
    """Peak memory of this process: CUDA max allocated on GPUs, max resident set size on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS reports bytes.
    return int(max_rss if sys.platform == "darwin" else max_rss * 1024)


# --------------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------------

_tensorboard_warned = False


def _plain(value: Any) -> Any:
    """Turn tensors / numpy scalars into Python numbers and non-finite floats into None (strict JSON)."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    elif type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        value = value.tolist()  # numpy scalar or array
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _scalars(metrics: Mapping[str, Any], prefix: str = ""):
    """Yield (tag, number) for every numeric leaf; nested dicts give tags like ``type_loss/en``."""
    for key, value in metrics.items():
        tag = f"{prefix}{key}"
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, Mapping):
            yield from _scalars(value, prefix=f"{tag}/")
        elif isinstance(value, (int, float)):  # bool is an int: logged as 0/1
            yield tag, float(value)
        elif hasattr(value, "item") and not isinstance(value, (str, bytes)):
            try:
                number = value.item()
            except (TypeError, ValueError):
                continue
            if isinstance(number, (int, float)):
                yield tag, float(number)


class MetricsWriter:
    """Appends one JSON object per step to ``run_folder/metrics.jsonl`` and mirrors the numeric values
    to TensorBoard in ``tensorboard_folder`` (default ``run_folder/tensorboard``; the config's
    ``enable_tb`` and ``tensorboard_folder``). Create it on the logging rank only.

    Non-finite floats (a NaN loss, an inf grad norm) are written to JSON as null so that the file
    stays strict JSON; TensorBoard receives the raw value.
    """

    def __init__(self, run_folder: str | os.PathLike, enable_tensorboard: bool = True,
                 tensorboard_folder: str | os.PathLike | None = None):
        global _tensorboard_warned
        self.run_folder = os.fspath(run_folder)
        self.tensorboard_folder = os.fspath(tensorboard_folder or os.path.join(self.run_folder, "tensorboard"))
        os.makedirs(self.run_folder, exist_ok=True)
        self.jsonl_path = os.path.join(self.run_folder, "metrics.jsonl")
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._tb = None
        if enable_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as exc:  # tensorboard missing or broken: metrics.jsonl still works
                if not _tensorboard_warned:
                    logger.warning("TensorBoard unavailable (%s); writing metrics.jsonl only", exc)
                    _tensorboard_warned = True
            else:
                self._tb = SummaryWriter(log_dir=self.tensorboard_folder, flush_secs=30)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        record = {"step": int(step)}
        record.update(_plain(dict(metrics)))
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for tag, number in _scalars(metrics):
                if tag != "step":
                    self._tb.add_scalar(tag, number, global_step=int(step))

    def flush(self) -> None:
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self._jsonl.closed:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_duration(seconds: float) -> str:
    """42s, 3m05s, 2h07m, 3d04h."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class EtaClock:
    """Time left: the mean of the last `window` step times times the steps left (the first step, which
    compiles and warms up, is left out once there are others)."""

    def __init__(self, window: int = 20):
        self.times: list[float] = []
        self.window = window

    def update(self, step_time: float, steps_left: int) -> float:
        self.times.append(step_time)
        recent = self.times[1:] if len(self.times) > 1 else self.times
        recent = recent[-self.window:]
        return sum(recent) / len(recent) * max(0, steps_left)


# key -> (name shown, formatter); the order here is the order in the log line
_LOG_FORMAT: tuple[tuple[str, str, Any], ...] = (
    ("eta_s", "eta", format_duration),
    ("loss", "loss", lambda v: f"{v:.4f}"),
    ("lr", "lr", lambda v: f"{v:.1e}"),
    ("grad_norm", "grad_norm", lambda v: f"{v:.3f}"),
    ("loss_scale", "loss_scale", lambda v: f"{v:g}"),
    ("tgs", "tgs", lambda v: f"{v:.1f}"),
    ("tflops", "tflops", lambda v: f"{v:.2f}"),
    ("mfu", "mfu", lambda v: f"{100 * v:.1f}%"),
    ("step_time", "step_time", lambda v: f"{v:.3f}s"),
    ("num_consumed_tokens", "tokens", lambda v: f"{v}"),
    ("num_loss_tokens", "loss_tokens", lambda v: f"{v}"),
    ("inf_nan_skip_batches", "skipped", lambda v: f"{v}"),
    ("peak_memory_bytes", "mem", lambda v: f"{v / 2**30:.2f}GiB"),
    ("valid_loss", "valid_loss", lambda v: f"{v:.4f}"),
    ("valid_ppl", "valid_ppl", lambda v: f"{v:.2f}"),
)


def _format_value(value: Any) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# in metrics.jsonl and TensorBoard, not in the log line: the per-step count of tokens with loss (the
# line shows the running total), whether the step applied (the line shows skipped steps), and the
# per-layer expert load of a MoE model (the line shows moe_imbalance and moe_dropped)
_NOT_LOGGED = ("loss_tokens", "stepped", "moe_load")


def format_log_line(step: int, metrics: Mapping[str, Any]) -> str:
    """One compact human-readable line: ``step=12/300 eta=1m12s loss=3.2100 lr=1.0e-04 ... mfu=12.3% ...``.

    ``step/total`` when the metrics hold ``total_steps``; known keys come first in a fixed order, then
    ``type_loss`` entries as ``loss/<type>``, then any other key in insertion order. None values are
    skipped.
    """
    total = metrics.get("total_steps")
    parts = [f"step={step}/{total}" if total else f"step={step}"]
    known = {"total_steps", *_NOT_LOGGED}
    for key, shown, fmt in _LOG_FORMAT:
        known.add(key)
        value = metrics.get(key)
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            value = value.item()
        try:
            parts.append(f"{shown}={fmt(value)}")
        except (TypeError, ValueError):
            parts.append(f"{shown}={value}")
    type_loss = metrics.get("type_loss")
    known.add("type_loss")
    if isinstance(type_loss, Mapping):
        for name, value in type_loss.items():
            if value is not None:
                parts.append(f"loss/{name}={_format_value(value)}")
    for key, value in metrics.items():
        if key in known or key == "step" or value is None:
            continue
        if isinstance(value, Mapping):
            parts.extend(f"{key}/{k}={_format_value(v)}" for k, v in value.items() if v is not None)
        else:
            parts.append(f"{key}={_format_value(value)}")
    return " ".join(parts)
