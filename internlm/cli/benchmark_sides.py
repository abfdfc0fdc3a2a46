"""Throughput benchmark pieces: our trainer and a Hugging Face baseline behind one small interface.

`tools/benchmark.py` is the command line; this module holds what it (and its tests) reuse:

* `OursSide` wraps the real `internlm.trainer.Trainer`; `HFSide` trains the same model shape as a
  Hugging Face transformers model (`LlamaForCausalLM`, built from an InternLM3 config for INTERNLM3)
  with the usual mixed-precision recipe: fp32 weights, `torch.autocast` for bf16/fp16, torch AdamW
  (with the trainer's LR and beta2 schedules), gradient clipping, the same micro-batches and gradient
  accumulation.
* Both sides read the same generated tokens: the HF side builds the trainer's own packed loader from
  the same config and seed, and feeds each packed row of a micro-batch as one sequence
  (`[micro_bsz, seq_len]`, labels as ours, -100 where ours are ignored). HF has no varlen attention,
  so its attention spans the whole row where ours stops at each packed document.
* `serve_side` runs one side in its own process, stepping when told to: the comparison alternates the
  two sides k steps at a time while each process's peak memory (max RSS on CPU) stays its own.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
import traceback
import zlib

import torch
import torch.nn.functional as F

from internlm import metrics
from internlm.model.internlm import InternLM, ModelArgs, init_full_tensor

__all__ = ["hf_config", "build_hf_model", "hf_param_name", "copy_initial_weights_to_hf", "copy_weights_to_hf",
           "hf_micro_batches", "hf_loss", "OursSide", "HFSide", "profile_step", "dispatch", "serve_side",
           "step_stats", "cpu_stats", "median_low_index", "batch_digest", "optimizer_impl", "make_adamw",
           "rss_bytes", "top_ops"]


# ---- the Hugging Face model of the same shape ------------------------------------------------------

def hf_config(args: ModelArgs):
    """A transformers config describing exactly the model `args` describes."""
    from transformers import LlamaConfig

    if args.qkv_bias != args.o_bias:
        raise ValueError("HF Llama has one bias switch for q/k/v and the output projection; "
                         f"qkv_bias={args.qkv_bias} and o_bias={args.o_bias} differ")
    rope = {"rope_type": "default", "rope_theta": float(args.rope_base)}
    if args.rope_scaling:
        rope = {"rope_type": "dynamic", "rope_theta": float(args.rope_base),
                "factor": float(args.rope_scaling["factor"])}
    kwargs = dict(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_kv_attention_heads, head_dim=args.head_dim, hidden_act="silu",
        max_position_embeddings=args.max_position_embeddings, rms_norm_eps=args.norm_eps,
        rope_parameters=rope, attention_bias=args.qkv_bias, mlp_bias=False, attention_dropout=0.0,
        tie_word_embeddings=args.tie_word_embeddings, initializer_range=args.init_std, use_cache=False,
        pad_token_id=None,  # a padding_idx would zero that embedding row's gradient; ours has none
    )
    if args.model_type == "INTERNLM3":
        from transformers import InternLM3Config  # transformers 5.2x; older releases lack it

        return InternLM3Config(**kwargs)
    return LlamaConfig(**kwargs)


def build_hf_model(args: ModelArgs, device: torch.device | str = "cpu", attn_implementation: str = "sdpa"):
    """The HF causal LM of the same shape as `InternLM(args)`, fp32 weights (randomly initialised)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_config(args), attn_implementation=attn_implementation,
                                             dtype=torch.float32)
    return model.to(device).train()


def hf_param_name(name: str) -> str:
    """Our parameter name -> the HF Llama name (the export's mapping, `internlm.hf.mapping.to_hf_name`)."""
    from internlm.hf.mapping import to_hf_name

    return to_hf_name(name)


@torch.no_grad()
def copy_weights_to_hf(named_tensors, hf_model) -> int:
    """Copy (our name, full tensor) pairs into the HF model; every HF parameter must be covered."""
    hf_params = dict(hf_model.named_parameters())
    done = set()
    for name, tensor in named_tensors:
        target = hf_param_name(name)
        if target not in hf_params:
            if target == "lm_head.weight" and hf_model.config.tie_word_embeddings:
                continue  # tied: the embedding already holds it
            raise KeyError(f"{name} -> {target} is not a parameter of the HF model")
        hf_params[target].copy_(tensor)
        done.add(target)
    missing = set(hf_params) - done
    if missing:
        raise KeyError(f"HF parameters without a source: {sorted(missing)[:5]}")
    return len(done)


def copy_initial_weights_to_hf(args: ModelArgs, seed: int, hf_model) -> int:
    """Give the HF model the trainer's initial weights (a function of seed and name), one tensor at a
    time, so that no second copy of the model is ever held."""
    with torch.device("meta"):
        ours = InternLM(args)

    def tensors():
        for name, p in ours.named_parameters():
            yield name, init_full_tensor(name, p.shape, args, seed)

    return copy_weights_to_hf(tensors(), hf_model)


def hf_micro_batches(batch: dict, micro_bsz: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Our step batch ([micro_num, micro_bsz * seq_len]) -> per micro-batch (input_ids, labels), each
    [micro_bsz, seq_len]: one packed row per sequence, labels as ours (-100 where ours are ignored)."""
    ids, labels = batch["input_ids"], batch["labels"]
    return [(ids[i].view(micro_bsz, seq_len), labels[i].view(micro_bsz, seq_len)) for i in range(ids.shape[0])]


def hf_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the labelled tokens of a micro-batch, in fp32, as our loss computes it.
    Our labels are already the next token, so there is no shift (HF's `labels=` would shift again)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


# ---- small helpers ---------------------------------------------------------------------------------

def optimizer_impl(opt: torch.optim.Optimizer) -> str:
    """'AdamW (foreach)', looking through a wrapper that holds several optimizers (`.optimizers`)."""
    inner = getattr(opt, "optimizers", None) or [opt]
    d = inner[0].defaults
    kind = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop"
    count = f" x{len(inner)}" if len(inner) > 1 else ""
    return f"{type(inner[0]).__name__} ({kind}){count}"


def make_adamw(groups, kwargs, device: torch.device, impl: str = "auto") -> torch.optim.Optimizer:
    """The AdamW implementation our HybridZeroOptimizer picks for `adam.impl` (torch's fused one by
    default), so that both sides of a comparison step the same optimizer."""
    from internlm.optim.hybrid_zero import make_adamw as _make
    from internlm.optim.hybrid_zero import resolve_adamw_impl

    return _make(groups, kwargs, resolve_adamw_impl(impl, device, has_dtensors=False))


def batch_digest(batch: dict) -> int:
    """A checksum of a step's tokens and labels, to check that both sides train on the same data."""
    crc = zlib.crc32(batch["input_ids"].numpy().tobytes())
    return zlib.crc32(batch["labels"].numpy().tobytes(), crc)


def rss_bytes() -> int:
    """Current resident set size of this process (Linux), 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def median_low_index(values: list[float]) -> int:
    """Index of the median value (the lower middle one for an even count: a value that really occurred)."""
    target = statistics.median_low(values)
    return values.index(target)


def step_stats(times: list[float]) -> dict:
    return dict(step_time_min=min(times), step_time_median=statistics.median_low(times), step_time_max=max(times))


def cpu_stats(records: list[dict]) -> dict:
    """CPU seconds (all threads of the process) per step. It counts threads that spin while waiting,
    so on a loaded machine it grows too: a cross-check of the wall time, not a replacement."""
    cpu = [r["cpu_time"] for r in records]
    return dict(cpu_time_median=statistics.median_low(cpu), cpu_times=cpu)


def top_ops(prof, limit: int = 15, device: str = "cpu") -> list[dict]:
    """The operators of a torch.profiler run with the most self time (CPU, or device time on GPU), then
    the MoE layer's named ranges (moe_routing, moe_dispatch, moe_experts, moe_combine) whatever their
    rank, with their inclusive times (`cpu_ms`, `device_ms`: forward only, backward is not inside them)."""
    rows = []
    for e in prof.key_averages():
        self_cpu = e.self_cpu_time_total
        self_dev = getattr(e, "self_device_time_total", 0) or 0
        rows.append(dict(name=e.key, calls=e.count, self_cpu_ms=self_cpu / 1e3, self_device_ms=self_dev / 1e3,
                         cpu_ms=e.cpu_time_total / 1e3, device_ms=(getattr(e, "device_time_total", 0) or 0) / 1e3))
    key = "self_device_ms" if device == "cuda" else "self_cpu_ms"
    total = sum(r[key] for r in rows) or 1.0
    for r in rows:
        r["share"] = r[key] / total
    rows.sort(key=lambda r: r[key], reverse=True)
    return rows[:limit] + [r for r in rows[limit:] if r["name"].startswith("moe_")]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the two sides ---------------------------------------------------------------------------------

class OursSide:
    """The real trainer, stepping on its own loader."""

    name = "ours"

    def __init__(self, cfg):
        from internlm.trainer import Trainer

        self.baseline_rss = rss_bytes()
        self.trainer = Trainer(cfg)
        self.device = self.trainer.device
        self.iterator = iter(self.trainer.train_loader)
        self.last_peak_memory = metrics.peak_memory_bytes(self.device)

    def describe(self) -> dict:
        t = self.trainer
        return dict(params=t.model_args.num_params(), layout=t.dims.describe(),
                    attention=t.model_kernels.attn_backend, optimizer=optimizer_impl(t.optimizer.torch_optimizer),
                    device=str(self.device), dtype=str(t.dtype),
                    autocast=str(t.autocast_dtype) if t.autocast_dtype else "off", threads=torch.get_num_threads(),
                    world_size=t.world_size, tokens_per_step=t.global_tokens_per_step,
                    compile=t.cfg.model.compile,
                    torch_version=torch.__version__, device_name=_device_name(self.device), kernels=dict(t.kernels),
                    datasheet_peak_tflops=(metrics.known_peak_tflops(_device_name(self.device), t.dtype)
                                           if self.device.type == "cuda" else None))

    def step(self) -> dict:
        batch = next(self.iterator)
        c0 = time.process_time()
        m = self.trainer.train_step(batch)
        cpu_time = time.process_time() - c0
        self.last_peak_memory = m["peak_memory_bytes"]  # the step's figure: max over ranks
        return dict(step_time=m["step_time"], cpu_time=cpu_time, loss=m["loss"], tgs=m["tgs"], tflops=m["tflops"],
                    digest=batch_digest(batch))

    def run(self, n: int) -> list[dict]:
        return [self.step() for _ in range(n)]

    def measure_peaks(self, seconds: float = 0.5) -> dict:
        peaks = {str(dt).replace("torch.", ""): metrics.measure_peak_tflops(dt, self.device, seconds=seconds)
                 for dt in (torch.bfloat16, torch.float32)}
        if self.device.type == "cuda":  # the probe's buffers are no part of training memory
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return peaks

    def peak_memory(self) -> int:
        """Peak memory as of the last training step (the peak probes that follow are not counted)."""
        return self.last_peak_memory

    def close(self):
        if self.trainer.writer is not None:
            self.trainer.writer.close()


class HFSide:
    """The same model as a Hugging Face transformers model, trained the usual way on the same batches."""

    name = "hf"

    def __init__(self, cfg, copy_weights: bool = True):
        import transformers  # noqa: F401  (imported before the baseline so its RSS counts as baseline)

        from internlm import builders
        from internlm.config import torch_dtype
        from internlm.launch import pick_device, seed_everything
        from internlm.optim.hybrid_zero import param_groups

        self.baseline_rss = rss_bytes()
        self.cfg = cfg
        self.seed = cfg.seed
        seed_everything(self.seed)
        self.device = pick_device(cfg.device, 0)
        self.dtype = torch_dtype(cfg.model.dtype)
        self.args = builders.model_args(cfg)
        self.model = build_hf_model(self.args, self.device)
        if copy_weights:
            copy_initial_weights_to_hf(self.args, self.seed, self.model)
        adam = cfg.adam
        kwargs = dict(lr=adam.lr, betas=(adam.adam_beta1, adam.adam_beta2), eps=adam.adam_eps)
        # the same AdamW implementation our optimizer picks (adam.impl)
        self.optimizer = make_adamw(param_groups([self.model], adam.weight_decay), kwargs, self.device, adam.impl)
        # the trainer's learning-rate and beta2 schedules, so that the two loss curves can be compared
        self.lr_scheduler, self.beta2_scheduler = builders.schedulers(self.optimizer, cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.clip = cfg.hybrid_zero_optimizer.clip_grad_norm or 0.0
        self.autocast_dtype = None if self.dtype == torch.float32 else self.dtype
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        train_src, _ = builders.sources(cfg, self.seed)
        self.loader = builders.train_loader(cfg, train_src, self.seed)
        self.iterator = iter(self.loader)
        self.tokens_per_step = self.loader.tokens_per_step_global
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def describe(self) -> dict:
        return dict(params=sum(p.numel() for p in self.model.parameters()), model=type(self.model).__name__,
                    attention=self.model.config._attn_implementation, optimizer=optimizer_impl(self.optimizer),
                    device=str(self.device), dtype="torch.float32 weights",
                    autocast=str(self.autocast_dtype) if self.autocast_dtype else "off",
                    threads=torch.get_num_threads(), tokens_per_step=self.tokens_per_step)

    def _context(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, batch: dict) -> dict:
        data = self.cfg.data
        c0 = time.process_time()
        t0 = time.perf_counter()
        micro = hf_micro_batches(batch, data.micro_bsz, data.seq_len)
        total = torch.zeros((), device=self.device)
        for ids, labels in micro:
            ids, labels = ids.to(self.device), labels.to(self.device)
            with self._context():
                logits = self.model(input_ids=ids, use_cache=False).logits
                loss = hf_loss(logits, labels)
            scaled = loss / len(micro)
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.beta2_scheduler.step()
        loss_value = (total / len(micro)).item()
        _sync(self.device)
        step_time = time.perf_counter() - t0
        return dict(step_time=step_time, cpu_time=time.process_time() - c0, loss=loss_value)

    def step(self) -> dict:
        batch = next(self.iterator)
        out = self.train_step(batch)
        out.update(tgs=metrics.tgs(self.tokens_per_step, out["step_time"], 1), digest=batch_digest(batch))
        return out

    def run(self, n: int) -> list[dict]:
        return [self.step() for _ in range(n)]

    def peak_memory(self) -> int:
        return metrics.peak_memory_bytes(self.device)

    def close(self):
        pass


def profile_step(side, limit: int = 15, trace_path: str | None = None) -> list[dict]:
    """One more training step under torch.profiler; its operators with the most self time. With
    `trace_path`, the step's Chrome trace is written there too (gzipped when the name ends in .gz)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if side.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        side.step()
    if trace_path:
        write_trace(prof, trace_path)
    return top_ops(prof, limit, side.device.type)


def write_trace(prof, path: str) -> None:
    """The profiler's Chrome trace at `path` (gzip-compressed when it ends in .gz)."""
    import gzip
    import shutil
    import tempfile
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix != ".gz":
        prof.export_chrome_trace(str(path))
        return
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(path, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)


# ---- one side in its own process ---------------------------------------------------------------------

def dispatch(side, cmd: tuple):
    """Answer one command to a side: ("describe",), ("run", n), ("peaks", seconds), ("memory",),
    ("profile", limit[, trace path])."""
    op = cmd[0]
    if op == "describe":
        return side.describe()
    if op == "run":
        return side.run(cmd[1])
    if op == "peaks":
        return side.measure_peaks(*cmd[1:])
    if op == "memory":
        return dict(peak_memory_bytes=side.peak_memory(), baseline_rss=side.baseline_rss)
    if op == "profile":
        return profile_step(side, *cmd[1:])
    raise ValueError(f"unknown command {cmd!r}")


def serve_side(side_name: str, config_path: str, overrides: list[str], conn) -> None:
    """Entry point of a worker process: build one side, then answer `dispatch` commands until
    ("stop",). Every answer is ("ok", value) or ("error", traceback text)."""
    side = None
    try:
        from internlm.config import load_config

        cfg = load_config(config_path, overrides)
        side = OursSide(cfg) if side_name == "ours" else HFSide(cfg)
        conn.send(("ok", "ready"))
        while True:
            cmd = conn.recv()
            if cmd[0] == "stop":
                conn.send(("ok", None))
                break
            conn.send(("ok", dispatch(side, cmd)))
    except BaseException:  # report anything to the parent instead of dying silently
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:  # noqa: BLE001 - the parent is gone
            pass
    finally:
        if side is not None:
            side.close()
        from internlm.launch import shutdown

        shutdown()
        conn.close()
