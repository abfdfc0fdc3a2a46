"""The training loop: config in, trained model, metrics and checkpoints out."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel

from internlm import metrics as M
from internlm import pipeline as PP
from internlm.config import dump_yaml, torch_dtype, validate
from internlm.errors import phase
from internlm.launch import launch, seed_everything
from internlm.loss import PackedLMLoss, make_target
from internlm.model.attention import resolve_backend, resolve_upcast
from internlm.model.internlm import InternLM, ModelArgs
from internlm.model.ops import swiglu_hidden_dim
from internlm.optim.hybrid_zero import HybridZeroOptimizer
from internlm.optim.lr import Beta2Scheduler, WarmupCosineLR
from internlm.parallel import ParallelDims
from internlm.parallelize import init_parameters, parallelize
from internlm.perf import kernel_report, resolve_cpu_matmul, tune_cpu_malloc

logger = logging.getLogger("internlm")


def build_sources(cfg, seed: int):
    """(train source, valid source or None) from the config's data folders, or dummy data."""
    from internlm.data.packed import DummySource

    data = cfg.data
    if data.train_folder is None:
        train = DummySource(cfg.model.vocab_size, data.get("dummy_num_samples", 10000), seed,
                            max_len=max(16, data.seq_len * 2))
        valid = DummySource(cfg.model.vocab_size, 512, seed + 1, max_len=max(16, data.seq_len * 2))
        return train, (valid if data.valid_every else None)
    from internlm.data.tokenized import TokenizedFolder

    train = TokenizedFolder(data.train_folder)
    valid = TokenizedFolder(data.valid_folder) if data.valid_folder else None
    return train, valid


class Trainer:
    def __init__(self, cfg, launcher: str = "torch", port: int | None = None):
        self.cfg = cfg
        self.launch_info = launch(launcher, port, cfg.get("device", "auto"),
                                  cfg.parallel.get("collective_timeout_s", 1800))
        self.rank = self.launch_info.rank
        self.world_size = self.launch_info.world_size
        self.device = self.launch_info.device
        validate(cfg, world_size=self.world_size)
        if self.device.type == "cpu":
            tune_cpu_malloc(bool(cfg.get("cpu_malloc_tuning", True)))
        self.seed = int(cfg.get("seed", 1024))
        seed_everything(self.seed)
        self.dims = ParallelDims.from_config(cfg, self.world_size)
        self.mesh = self.dims.build_mesh(self.device.type)
        self.coords = self.dims.coords(self.rank)
        self.dtype = torch_dtype(cfg.model.dtype)
        self.run_folder = Path(cfg.monitor.get("run_folder") or f"runs/{cfg.JOB_NAME}")
        if self.rank == 0:
            self.run_folder.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.run_folder / "config.yaml")
            print(f"[internlm] run folder: {self.run_folder}  layout: {self.dims.describe()}  "
                  f"device: {self.device}", flush=True)
        self._build_model()
        self._build_optimizer()
        self._build_data()
        self.kernels = kernel_report(self)
        if self.rank == 0:
            print("[internlm] kernels: " + ", ".join(f"{k}={v}" for k, v in self.kernels.items()), flush=True)
        self.writer = M.MetricsWriter(self.run_folder) if self.is_logging_rank else None
        self.step = 0
        self.consumed_tokens = 0
        # MFU against the peak of the GEMM the model runs (fp32 under model.cpu_matmul="fp32")
        gemm_dtype = torch.float32 if self.model_args.cpu_fp32_gemm else self.dtype
        self.peak_flops = M.device_peak_tflops(self.device, gemm_dtype, cfg.monitor.get("peak_tflops")) * 1e12
        from internlm.checkpoint import CheckpointManager

        self.checkpoints = CheckpointManager(self)  # saves, snapshots, stop signals (see doc/checkpoint.md)
        self.checkpoints.resume()  # auto_resume / load_ckpt_info: model, optimizer, schedulers, data position

    # ---- construction -----------------------------------------------------------------------------
    @property
    def is_logging_rank(self) -> bool:
        """The first rank of the last pipeline stage: it holds the loss."""
        c = self.coords
        return c["pp"] == self.dims.pp - 1 and c["dp"] == 0 and c["tp"] == 0

    def _build_model(self):
        cfg = self.cfg
        args = ModelArgs.from_config(cfg)
        args.attn_backend = resolve_backend(cfg.model.get("attn_backend", "auto"), self.device,
                                            cfg.model.get("use_flash_attn", True), torch_dtype(cfg.model.dtype))
        args.attn_upcast = resolve_upcast(cfg.model.get("attn_compute", "auto"), self.device)
        args.cpu_fp32_gemm = resolve_cpu_matmul(cfg.model.get("cpu_matmul", "native"), self.device, self.dtype)
        self.model_args = args
        with torch.device("meta"):
            full = InternLM(args)
        if self.dims.pp > 1:
            num_stages = self.dims.pp * self.dims.num_chunks
            self.stage_ids = PP.stage_ids_of_rank(self.coords["pp"], self.dims.pp, self.dims.num_chunks,
                                                   self.dims.pp_mode)
            self.model_parts = [PP.build_stage_module(full, sid, num_stages) for sid in self.stage_ids]
        else:
            num_stages = 1
            self.stage_ids = [0]
            self.model_parts = [full]
        self.num_stages = num_stages
        fsdp = False
        for part in self.model_parts:
            fsdp = parallelize(part, self.dims, self.mesh, cfg, self.dtype)
            init_parameters(part, self.device, self.seed)
            part.train()
        # without FSDP's mixed precision the fp32 weights are kept and compute runs under autocast
        self.autocast_dtype = None if (fsdp or self.dtype == torch.float32) else self.dtype
        self.loss_fn = None  # built with the data (needs the number of types)
        if self.rank == 0:
            print(f"[internlm] model {cfg.model_type}: {args.num_params() / 1e6:.2f}M parameters, "
                  f"attention={args.attn_backend}, dtype={self.dtype}, "
                  f"autocast={'on' if self.autocast_dtype else 'off'}", flush=True)

    def _build_optimizer(self):
        cfg = self.cfg
        fp16 = self.dtype == torch.float16
        self.optimizer = HybridZeroOptimizer(
            self.model_parts, cfg.adam, cfg.hybrid_zero_optimizer.get("clip_grad_norm"),
            stage_world_size=self.dims.dp * self.dims.tp, device=self.device, fp16=fp16,
            scaler_cfg=cfg.get("grad_scaler"))
        lr = cfg.lr_scheduler
        self.lr_scheduler = WarmupCosineLR(self.optimizer.impl, total_steps=lr.total_steps,
                                           warmup_ratio=lr.warmup_ratio, eta_min=lr.eta_min,
                                           init_steps=lr.get("init_steps", 0))
        b2 = cfg.beta2_scheduler
        self.beta2_scheduler = Beta2Scheduler(self.optimizer.impl, init_beta2=b2.init_beta2, c=b2.c,
                                              cur_iter=b2.get("cur_iter", -1))

    def _build_data(self):
        from internlm.data.loader import build_train_loader, build_valid_loader

        cfg, data = self.cfg, self.cfg.data
        self.dp_rank, self.dp_size = self.coords["dp"], self.dims.dp
        train_src, valid_src = build_sources(cfg, self.seed)
        self.type_names = list(train_src.type_names)
        self.train_loader = build_train_loader(
            train_src, packed_length=data.seq_len, micro_num=data.micro_num, micro_bsz=data.micro_bsz,
            dp_rank=self.dp_rank, dp_size=self.dp_size, seed=self.seed, min_length=data.get("min_length", 0),
            pack_sample_into_one=data.get("pack_sample_into_one", False), shuffle=data.get("shuffle", True))
        self.valid_batches = None
        if valid_src is not None and data.get("valid_every", 0):
            self.valid_batches = build_valid_loader(valid_src, packed_length=data.seq_len,
                                                    micro_bsz=data.micro_bsz, valid_micro_num=data.valid_micro_num,
                                                    dp_rank=self.dp_rank, dp_size=self.dp_size)
        self.loss_fn = PackedLMLoss(len(self.type_names), cfg.loss.get("label_smoothing", 0.0), self.device,
                                    kernel=cfg.loss.get("kernel", "auto"))
        self.global_tokens_per_step = self.train_loader.tokens_per_step_global
        if self.dims.pp > 1:
            self.schedule, self.stages = PP.build_schedule(
                self.model_parts, self.stage_ids, self.num_stages, self.device, self.mesh["pp"].get_group(),
                data.micro_num, self.loss_fn, self.dims.pp_mode, self.dims.num_chunks)

    # ---- one step ---------------------------------------------------------------------------------
    def _context(self):
        stack = contextlib.ExitStack()
        if self.dims.tp > 1:
            stack.enter_context(loss_parallel())
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
        return stack

    def _forward_backward(self, batch: dict, train: bool = True):
        """Runs all micro-batches of `batch` ([micro_num, T] tensors); losses land in self.loss_fn."""
        dev = self.device
        inputs = batch["input_ids"].to(dev)
        positions = batch["position_ids"].to(dev)
        target = make_target(batch["labels"], batch["type_ids"]).to(dev)
        n_micro = inputs.shape[0]
        if self.dims.pp > 1:
            with self._context():
                first = self.stage_ids[0] == 0 or 0 in self.stage_ids
                last = (self.num_stages - 1) in self.stage_ids
                args = (inputs,) if first else ()
                kwargs = dict(position_ids=positions)
                if train:
                    self.schedule.step(*args, target=target if last else None, **kwargs)
                else:
                    self.schedule.eval(*args, target=target if last else None, **kwargs)
            return
        model = self.model_parts[0]
        # one autocast region for all micro-batches: the bf16 copies of the weights are cached
        # and made once per step instead of once per micro-batch
        with self._context():
            for i in range(n_micro):
                logits = model(inputs[i:i + 1], position_ids=positions[i:i + 1])
                loss = self.loss_fn(logits, target[i:i + 1])
                if train:
                    (loss / n_micro).backward()

    def _reduce_losses(self, micro_batches: int) -> tuple[float, dict]:
        """Mean micro-batch loss of the global batch, and the per-type token-mean losses, on every rank."""
        lf = self.loss_fn
        holds_loss = (self.num_stages - 1) in self.stage_ids
        stats = (lf.summed(micro_batches) if holds_loss
                 else torch.zeros(2 + 2 * lf.num_types, dtype=torch.float64, device=self.device))
        if self.world_size > 1:
            dist.all_reduce(stats)
        loss = (stats[0] / stats[1].clamp(min=1)).item()
        n = lf.num_types
        type_loss = {name: (stats[2 + i] / stats[2 + n + i]).item()
                     for i, name in enumerate(self.type_names) if stats[2 + n + i] > 0}
        return loss, type_loss

    def train_step(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        self.loss_fn.reset()
        self.loss_fn.scale = self.optimizer.loss_scale
        with phase(f"step {self.step + 1} forward/backward"
                   + (" (pipeline schedule)" if self.dims.pp > 1 else "")):
            self._forward_backward(batch, train=True)
        with phase(f"step {self.step + 1} optimizer (grad-norm all-reduce)"):
            stepped, grad_norm = self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        if stepped:  # as InternEvo: a skipped (overflowed) step does not advance the schedules
            self.lr_scheduler.step()
            self.beta2_scheduler.step()
        with phase(f"step {self.step + 1} loss all-reduce"):
            loss, type_loss = self._reduce_losses(batch["input_ids"].shape[0])
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        step_time = time.perf_counter() - t0
        self.step += 1
        self.consumed_tokens += self.global_tokens_per_step
        return self._step_metrics(loss, type_loss, grad_norm, lr, step_time, stepped)

    def _step_metrics(self, loss, type_loss, grad_norm, lr, step_time, stepped) -> dict:
        cfg, a = self.cfg, self.model_args
        seq_len = cfg.data.seq_len
        tgs = M.tgs(self.global_tokens_per_step, step_time, self.world_size)
        tflops = M.megatron_tflops(
            step_time, checkpoint=bool(cfg.model.checkpoint), seq_len=seq_len, hidden_size=a.hidden_size,
            num_layers=a.num_layers, vocab_size=a.vocab_size,
            global_batch_size=self.global_tokens_per_step / seq_len, world_size=self.world_size,
            mlp_ratio=self._mlp_ratio())
        fpt = M.model_flops_per_token(hidden_size=a.hidden_size, num_layers=a.num_layers, vocab_size=a.vocab_size,
                                      num_heads=a.num_attention_heads, num_kv_heads=a.num_kv_attention_heads,
                                      head_dim=a.head_dim, intermediate_size=a.intermediate_size, seq_len=seq_len)
        mfu = M.mfu(fpt, self.global_tokens_per_step / step_time / self.world_size, self.peak_flops)
        return dict(step=self.step, loss=loss, lr=lr, grad_norm=grad_norm, tgs=tgs, tflops=tflops, mfu=mfu,
                    num_consumed_tokens=self.consumed_tokens, loss_scale=self.optimizer.loss_scale,
                    inf_nan_skip_batches=self.optimizer.skipped_steps, type_loss=type_loss,
                    step_time=step_time, peak_memory_bytes=self._peak_memory(), stepped=stepped)

    def _mlp_ratio(self) -> float:
        # InternEvo's formula takes the config's mlp_ratio; an explicit FFN width takes its real ratio
        m, a = self.cfg.model, self.model_args
        if swiglu_hidden_dim(a.hidden_size, m.mlp_ratio, m.multiple_of) == a.intermediate_size:
            return m.mlp_ratio
        return a.intermediate_size / a.hidden_size

    def _peak_memory(self) -> int:
        mem = torch.tensor([M.peak_memory_bytes(self.device)], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        return int(mem.item())

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss and perplexity over `valid_micro_num` micro-batches per dp rank."""
        for part in self.model_parts:
            part.eval()
        self.loss_fn.reset()
        self.loss_fn.scale = 1.0
        batches = self.valid_batches
        group = self.cfg.data.micro_num if self.dims.pp > 1 else 1  # the schedule runs micro_num at a time
        usable = len(batches) // group * group
        for i in range(0, usable, group):
            chunk = {k: torch.cat([b[k] for b in batches[i:i + group]]) for k in batches[i]}
            self._forward_backward(chunk, train=False)
        loss, type_loss = self._reduce_losses(usable)
        for part in self.model_parts:
            part.train()
        return dict(valid_loss=loss, valid_ppl=math.exp(min(loss, 50.0)), valid_type_loss=type_loss)

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self, total_steps: int | None = None) -> list[dict]:
        cfg = self.cfg
        total = total_steps or cfg.data.total_steps
        valid_every = cfg.data.get("valid_every", 0)
        log_every = cfg.monitor.get("log_every", 1)
        history = []
        it = iter(self.train_loader)
        while self.step < total:
            batch = next(it)
            m = self.train_step(batch)
            if self.valid_batches and valid_every and (self.step % valid_every == 0 or self.step == total):
                m.update(self.evaluate())
            history.append(m)
            if self.writer is not None:
                self.writer.write(self.step, m)
                if self.step % log_every == 0 or self.step == total or "valid_loss" in m:
                    print(M.format_log_line(self.step, m), flush=True)
            if self.checkpoints.after_step(self.step, total):  # saved; a stop file or signal asked to stop
                break
        self.checkpoints.finish()
        if self.writer is not None:
            self.writer.close()
        return history
