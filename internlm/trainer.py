"""The training loop: config in, trained model, metrics and checkpoints out."""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import loss_parallel

from internlm import builders, metrics, pipeline
from internlm.checkpoint.train_state import TrainState
from internlm.config import dump_yaml, torch_dtype, validate
from internlm.divergence import DivergenceGuard
from internlm.errors import phase
from internlm.launch import launch, seed_everything
from internlm.log import LOG_LINE, logger, setup_logging
from internlm.loss import PackedLMLoss, make_target
from internlm.model.internlm import InternLM
from internlm.moe_stats import MoEStats
from internlm.parallel_dims import ParallelDims
from internlm.parallelize import init_parameters, parallelize
from internlm.perf import kernel_report, tune_cpu_malloc


def _local_numel(p: torch.Tensor) -> int:
    """Elements of a parameter this rank stores (its shard of a sharded DTensor)."""
    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


class Trainer:
    def __init__(self, cfg, launcher: str = "torch", port: int | None = None):
        setup_logging()
        self.cfg = cfg
        self.launch_info = launch(launcher, port, cfg.device, cfg.parallel.collective_timeout_s)
        self.rank = self.launch_info.rank
        self.world_size = self.launch_info.world_size
        self.device = self.launch_info.device
        validate(cfg, world_size=self.world_size)
        if self.device.type == "cpu":
            tune_cpu_malloc(cfg.cpu_malloc_tuning)
        else:
            torch.backends.cudnn.deterministic = cfg.cudnn_deterministic
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        self.seed = cfg.seed
        seed_everything(self.seed)
        self.dims = ParallelDims.from_config(cfg, self.world_size)
        self.mesh = self.dims.build_mesh(self.device.type)
        self.coords = self.dims.coords(self.rank)
        self.dtype = torch_dtype(cfg.model.dtype)
        self.run_folder = Path(cfg.monitor.run_folder)
        if self.rank == 0:
            self.run_folder.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.run_folder / "config.yaml")
        logger.info(f"run folder: {self.run_folder}  layout: {self.dims.describe()}  device: {self.device}")
        for notice in cfg.notices:  # InternEvo keys this engine accepts without effect
            logger.info(f"notice: {notice}")
        if self.dims.fsdp_kept_for_zero_bubble:
            logger.info(f"notice: parallel.pipeline.mode={self.dims.pp_mode!r} computes weight gradients after later "
                        "forwards, so FSDP keeps each stage's weights gathered for the whole step instead of "
                        "resharding them after forward (parallel.zero1.fsdp / weight.size); modes '1f1b' and "
                        "'gpipe' reshard them")
        self._build_model()
        self.optimizer, self.lr_scheduler, self.beta2_scheduler = builders.optimizer(
            self.model_parts, cfg, self.device, stage_world_size=self.dims.dp * self.dims.tp)
        self._build_data()
        self.kernels = kernel_report(cfg, self.device, self.dims, self.model_kernels, self.dtype,
                                     loss_kernel=self.loss_fn.kernel, adamw_kind=self.optimizer.adamw_kind)
        logger.info("kernels: " + ", ".join(f"{k}={v}" for k, v in self.kernels.items()))
        self.writer = metrics.MetricsWriter(self.run_folder, cfg.enable_tb, cfg.tensorboard_folder) \
            if self.is_logging_rank else None
        self.step_hooks = []  # hook(step, metrics) after every step on every rank (alerts, --profiling)
        self.state = TrainState()
        self.eta = metrics.EtaClock()
        self.guard = DivergenceGuard(cfg.hybrid_zero_optimizer.max_skipped_steps, cfg.monitor.loss_spike_factor,
                                     cfg.monitor.loss_spike_window)
        # MFU against the peak of the GEMM the model runs (fp32 under model.cpu_matmul="fp32")
        gemm_dtype = torch.float32 if self.model_kernels.cpu_fp32_gemm else self.dtype
        self.peak_flops = metrics.device_peak_tflops(self.device, gemm_dtype, cfg.monitor.peak_tflops) * 1e12
        from internlm.checkpoint import CheckpointManager

        d = self.dims
        run_meta = {"model_type": cfg.model_type, "dtype": str(self.dtype), "num_params": self.model_args.num_params(),
                    "layout": {"tp": d.tp, "pp": d.pp, "dp": d.dp, "zero1": d.dp_shard, "dp_replicate": d.dp_replicate,
                               "num_chunks": d.num_chunks, "pp_mode": d.pp_mode, "tp_mode": d.tp_mode,
                               "wp": d.wp, "fsdp": d.reshard_after_forward, "ep": d.ep}}
        # saves, snapshots, stop signals (see doc/checkpoint.md)
        self.checkpoints = CheckpointManager(
            cfg, model_parts=self.model_parts, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
            beta2_scheduler=self.beta2_scheduler, train_loader=self.train_loader, train_state=self.state,
            device=self.device, rank=self.rank, world_size=self.world_size, run_meta=run_meta)
        self.checkpoints.resume()  # auto_resume / load_ckpt_info: model, optimizer, schedulers, data position

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def consumed_tokens(self) -> int:
        return self.state.consumed_tokens

    # ---- construction -----------------------------------------------------------------------------
    @property
    def is_logging_rank(self) -> bool:
        """The first rank of the last pipeline stage: it holds the loss."""
        c = self.coords
        return c["pp"] == self.dims.pp - 1 and c["dp"] == 0 and c["tp"] == 0

    def _build_model(self):
        cfg = self.cfg
        self.model_args = args = builders.model_args(cfg)
        self.model_kernels = builders.kernels(cfg, self.device)
        with torch.device("meta"):
            full = InternLM(args, self.model_kernels)
        if self.dims.pp > 1:
            num_stages = self.dims.pp * self.dims.num_chunks
            self.stage_ids = pipeline.stage_ids_of_rank(self.coords["pp"], self.dims.pp, self.dims.num_chunks,
                                                   self.dims.pp_mode)
            self.model_parts = [pipeline.build_stage_module(full, sid, num_stages) for sid in self.stage_ids]
        else:
            num_stages = 1
            self.stage_ids = [0]
            self.model_parts = [full]
        self.num_stages = num_stages
        self.moe = MoEStats(self.model_parts, cfg.loss.moe_loss_coeff, self.device, num_layers=args.num_layers)
        fsdp = False
        for part in self.model_parts:
            fsdp = parallelize(part, self.dims, self.mesh, cfg.model, self.dtype, cfg.hybrid_zero_optimizer)
            init_parameters(part, self.device, self.seed)
            part.train()
            if self.dims.pp > 1 and self.moe:  # the load-balancing loss joins each stage's backward
                self.moe.attach(part)
        # without FSDP's mixed precision the fp32 weights are kept and compute runs under autocast
        self.autocast_dtype = None if (fsdp or self.dtype == torch.float32) else self.dtype
        stored = sum(_local_numel(p) for part in self.model_parts for p in part.parameters())
        logger.info(f"model {cfg.model_type}: {args.num_params() / 1e6:.2f}M parameters "
                    f"({stored / 1e6:.2f}M stored on rank {self.rank}), "
                    f"attention={self.model_kernels.attn_backend}, dtype={self.dtype}, "
                    f"autocast={'on' if self.autocast_dtype else 'off'}")

    def _build_data(self):
        cfg = self.cfg
        self.dp_rank, self.dp_size = self.coords["dp"], self.dims.dp
        train_src, valid_src = builders.sources(cfg, self.seed)
        self._check_data(train_src, valid_src)
        self.type_names = builders.type_names(train_src, valid_src)
        self.train_loader = builders.train_loader(cfg, train_src, self.seed, self.dp_rank, self.dp_size)
        self.valid_batches = builders.valid_batches(cfg, valid_src, self.dp_rank, self.dp_size)
        isp = self.dims.isp
        self.loss_fn = PackedLMLoss(len(self.type_names), cfg.loss.label_smoothing, self.device, kernel=cfg.loss.kernel,
                                    sp_group=self.mesh["tp"].get_group() if isp > 1 else None, sp_size=isp)
        self.global_tokens_per_step = self.train_loader.tokens_per_step_global
        if self.dims.pp > 1:
            self.schedule, self.stages = pipeline.build_schedule(
                self.model_parts, self.stage_ids, self.num_stages, self.device, self.mesh["pp"].get_group(),
                cfg.data.micro_num, self.loss_fn, self.dims.pp_mode, self.dims.num_chunks)

    def _check_data(self, *sources) -> None:
        """data.check_data: rank 0 verifies every file of the data folders; every rank gets its verdict."""
        from internlm.data.check import check_folder
        from internlm.data.tokenized import DataFormatError, TokenizedFolder

        folders = [s for s in sources if isinstance(s, TokenizedFolder)]
        if not (self.cfg.data.check_data and folders):
            return
        verdict = None
        if self.rank == 0:
            try:
                for folder in folders:
                    logger.info(check_folder(folder, self.cfg.model.vocab_size).line())
            except DataFormatError as exc:
                verdict = str(exc)
        if self.world_size > 1:
            box = [verdict]
            dist.broadcast_object_list(box, src=0)
            verdict = box[0]
        if verdict:
            raise DataFormatError(verdict)

    # ---- one step ---------------------------------------------------------------------------------
    def _context(self):
        stack = contextlib.ExitStack()
        if self.dims.tensor_parallel > 1:
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
        if self.dims.isp > 1:  # sequence parallel: this rank's tokens of every micro-batch
            from internlm.sequence_parallel import token_indices

            index = token_indices(inputs.shape[1], self.coords["tp"], self.dims).to(dev)
            inputs, positions, target = (t[:, index] for t in (inputs, positions, target))
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
        # zero1 keeps the gathered weights from forward to backward; keep them on to the next micro-batch
        # too, instead of resharding after each backward and gathering them again (no higher peak: they
        # are held through every backward anyway); the step's last backward reshards them
        keep = train and n_micro > 1 and self.dims.fsdp and not self.dims.reshard_after_forward
        # one autocast region for all micro-batches: the bf16 copies of the weights are cached
        # and made once per step instead of once per micro-batch
        with self._context():
            for i in range(n_micro):
                if keep:
                    model.set_reshard_after_backward(i == n_micro - 1)
                logits = model(inputs[i:i + 1], position_ids=positions[i:i + 1])
                loss = self.loss_fn(logits, target[i:i + 1])
                if self.moe:  # the load-balancing loss, logged apart (moe_loss), under the same loss scale
                    aux = self.moe.after_forward() * self.loss_fn.scale
                    if isinstance(loss, DTensor):  # tensor parallelism: the same on every rank of the group
                        aux = DTensor.from_local(aux, loss.device_mesh, [Replicate()] * loss.device_mesh.ndim)
                    loss = loss + aux
                if train:
                    (loss / n_micro).backward()

    def _reduce_losses(self, micro_batches: int) -> tuple[float, dict, int]:
        """Mean micro-batch loss of the global batch, the per-type token-mean losses and the number of
        tokens that carried loss, on every rank."""
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
        # every tensor-parallel rank of the last stage records the same tokens (isp ranks: their own)
        return loss, type_loss, round(stats[2 + n:].sum().item() / self.dims.tensor_parallel)

    def train_step(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        self.loss_fn.reset()
        self.loss_fn.scale = self.moe.scale = self.optimizer.loss_scale
        self.moe.reset()
        with phase(f"step {self.step + 1} forward/backward"
                   + (" (pipeline schedule)" if self.dims.pp > 1 else "")):
            self._forward_backward(batch, train=True)
            if self.dims.ep > 1:  # expert-parallel experts: averaged over dp as FSDP averages the rest
                from internlm.expert_parallel import reduce_expert_grads

                reduce_expert_grads(self.model_parts, self.dims.expert_mesh(self.device.type), self.dims.dp)
        with phase(f"step {self.step + 1} optimizer (grad-norm all-reduce)"):
            stepped, grad_norm = self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        if stepped:  # as InternEvo: a skipped (overflowed) step does not advance the schedules
            self.lr_scheduler.step()
            self.beta2_scheduler.step()
        with phase(f"step {self.step + 1} loss all-reduce"):
            loss, type_loss, loss_tokens = self._reduce_losses(batch["input_ids"].shape[0])
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        step_time = time.perf_counter() - t0
        self.state.step += 1
        self.state.consumed_tokens += self.global_tokens_per_step
        self.state.loss_tokens += loss_tokens
        m = self._step_metrics(loss, type_loss, grad_norm, lr, step_time, stepped)
        m.update(loss_tokens=loss_tokens, num_loss_tokens=self.state.loss_tokens)
        if self.moe:
            pipelined = self.dims.pp > 1  # (each stage records its own layers)
            m.update(self.moe.reduce(self.world_size, batch["input_ids"].shape[0] if pipelined else None,
                                     self.dims.dp, duplicates=self.dims.tp))
        m.update(self.guard.observe(self.step, loss, grad_norm, stepped, self.optimizer.loss_scale))
        return m

    def _honest_peak(self, speed: dict) -> dict:
        """A measured peak is a best case that contention at start can spoil: when a step beats it, probe
        again and never keep a peak below what a step achieved (MFU stays at most 100%)."""
        if speed["mfu"] <= 1.0 or self.cfg.monitor.peak_tflops is not None:
            return speed
        achieved = speed["mfu"] * self.peak_flops
        gemm_dtype = torch.float32 if self.model_kernels.cpu_fp32_gemm else self.dtype
        probe = metrics.measure_peak_tflops(gemm_dtype, self.device) * 1e12
        old, self.peak_flops = self.peak_flops, max(probe, achieved)
        logger.warning(f"a step reached {achieved / 1e12:.3f} TFLOPS, above the matmul peak measured at start "
                       f"({old / 1e12:.3f}, a busy machine?); MFU now uses {self.peak_flops / 1e12:.3f}")
        return {**speed, "mfu": speed["mfu"] * old / self.peak_flops}

    def _step_metrics(self, loss, type_loss, grad_norm, lr, step_time, stepped) -> dict:
        speed = self._honest_peak(metrics.step_throughput(
            self.model_args, self.cfg.model, tokens=self.global_tokens_per_step, step_time_s=step_time,
            world_size=self.world_size, seq_len=self.cfg.data.seq_len, peak_flops=self.peak_flops))
        return dict(step=self.step, loss=loss, lr=lr, grad_norm=grad_norm, tgs=speed["tgs"], tflops=speed["tflops"],
                    mfu=speed["mfu"], num_consumed_tokens=self.consumed_tokens, loss_scale=self.optimizer.loss_scale,
                    inf_nan_skip_batches=self.optimizer.skipped_steps, type_loss=type_loss,
                    step_time=step_time, peak_memory_bytes=self._peak_memory(), stepped=stepped)

    def _peak_memory(self) -> int:
        mem = torch.tensor([metrics.peak_memory_bytes(self.device)], dtype=torch.float64, device=self.device)
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
        loss, type_loss, _ = self._reduce_losses(usable)
        for part in self.model_parts:
            part.train()
        return dict(valid_loss=loss, valid_ppl=math.exp(min(loss, 50.0)), valid_type_loss=type_loss)

    # ---- the loop ---------------------------------------------------------------------------------
    def fit(self, total_steps: int | None = None) -> list[dict]:
        try:
            return self._fit(total_steps)
        except BaseException:
            # the loop's signal handlers only set a flag: once the loop is gone, a SIGTERM from the
            # launcher (after another rank failed) must end this process again
            self.checkpoints.abort()
            raise

    def _fit(self, total_steps: int | None = None) -> list[dict]:
        cfg = self.cfg
        total = total_steps or cfg.data.total_steps
        valid_every = cfg.data.valid_every
        log_every = cfg.monitor.log_every
        history = []
        it = iter(self.train_loader)
        self.checkpoints.begin()
        while self.step < total:
            batch = next(it)
            m = self.train_step(batch)
            m.update(total_steps=total, eta_s=self.eta.update(m["step_time"], total - self.step))
            if self.valid_batches and valid_every and (self.step % valid_every == 0 or self.step == total):
                m.update(self.evaluate())
            history.append(m)
            if self.writer is not None:
                self.writer.write(self.step, m)
                if self.step % log_every == 0 or self.step == total or "valid_loss" in m:
                    logger.info(metrics.format_log_line(self.step, m), extra=LOG_LINE)
            for hook in self.step_hooks:
                hook(self.step, m)
            if self.checkpoints.after_step(self.step, total):  # saved; a stop file or signal asked to stop
                break
        self.checkpoints.finish()
        if self.writer is not None:
            self.writer.close()
        return history
