"""CheckpointManager: when to save, how a save becomes complete, resuming, and stopping cleanly.

The trainer hands it what a checkpoint holds (model parts, optimizer, schedulers, data loader and
a `TrainState`), calls `resume()` once after building everything, `after_step(step, total)` after
each step (it returns True when the run must stop) and `finish()` when the loop ends. Only rank 0
renames, marks and deletes folders; every rank writes its own shards and RNG file.
"""
from __future__ import annotations

import errno
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from internlm.checkpoint import internevo_format, layout, verify
from internlm.checkpoint import state as tensors
from internlm.checkpoint.layout import CheckpointError
from internlm.checkpoint.train_state import TrainState
from internlm.config import dump_yaml
from internlm.divergence import check_finite
from internlm.errors import ConversionError, phase
from internlm.log import logger

ALL_CONTENT = frozenset({"model", "optimizer", "scheduler", "sampler", "all"})
# test hook: "STEP:SECONDS" makes rank 0 sleep between writing step STEP and publishing it
SLOW_SAVE_ENV = "INTERNLM_CKPT_TEST_SLOW_SAVE"
STOP_NOW = "now"


def read_stop_file(path) -> int | str | None:
    """What the stop file asks, by InternEvo's convention that it holds a step number:

    - None: there is no file, or it holds 0 (InternEvo writes 0 into it at start: nothing asked);
    - N > 0: save a checkpoint at the end of step N and stop (a step already passed: at the end of
      the current step; InternEvo would never stop);
    - -N: save a checkpoint at the end of step N and train on;
    - STOP_NOW: the file is empty or holds no integer (`touch STOP`): save and stop at the end of the
      current step.
    """
    try:
        text = Path(path).read_text(errors="replace").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:  # a directory, no permission ...: not a request
        logger.warning(f"cannot read the stop file {path}: {exc.strerror or exc}")
        return None
    if not text:
        return STOP_NOW
    try:
        value = int(text)
    except ValueError:
        return STOP_NOW
    return value or None


def storage_problem(exc: BaseException, folder) -> str | None:
    """'no space left on the device' or 'read-only file system' ... when `exc` (or an exception DCP
    wrapped) comes from the storage, else None. torch.save on a full disk says only "unexpected pos"."""
    inner = [exc]
    for f in getattr(exc, "failures", {}).values():
        inner.append(f[0] if isinstance(f, tuple) else f)
    for e in inner:
        code = getattr(e, "errno", None)
        if code == errno.ENOSPC or (isinstance(e, RuntimeError) and "unexpected pos" in str(e)):
            free = shutil.disk_usage(folder).free if folder is not None and Path(folder).exists() else 0
            return f"no space left on the device ({free / 2**20:.0f} MiB free)"
        if code in (errno.EROFS, errno.EACCES, errno.EPERM):
            return f"{os.strerror(code).lower()} ({getattr(e, 'filename', None) or folder})"
    return None


class CheckpointManager:
    """`cfg` is the run's TrainConfig (its `ckpt` section drives saving; the whole config is written into
    each checkpoint as config.yaml); `run_meta` holds the facts meta.json records about the run (model
    type, dtype, layout, parameter count)."""

    def __init__(self, cfg, *, model_parts, optimizer, lr_scheduler, beta2_scheduler, train_loader,
                 train_state: TrainState, device: torch.device, rank: int, world_size: int, run_meta: dict):
        self.cfg = cfg
        self.model_parts, self.optimizer, self.train_loader = model_parts, optimizer, train_loader
        self.lr_scheduler, self.beta2_scheduler = lr_scheduler, beta2_scheduler
        self.train_state, self.device, self.run_meta = train_state, device, run_meta
        ck = cfg.ckpt
        self.rank, self.world_size = rank, world_size
        self.enabled = ck.enable_save_ckpt
        self.folder = Path(ck.save_ckpt_folder) if ck.save_ckpt_folder else None
        self.every = ck.checkpoint_every
        self.snapshot_every = ck.oss_snapshot_freq
        self.async_save = ck.async_upload
        self.stop_file = ck.stop_file_path
        self._stop_file_seen = None  # the last request read from the stop file (logged once per new request)
        # called (rank 0) with one line on each saved checkpoint and stop-file request; the train
        # command points it at the Feishu alerts (internlm.alert)
        self.notify = lambda text: None
        self.keep_last = ck.keep_last
        self.last_saved_step = None
        self.last_complete = None  # the newest step this run saved completely
        self._pending = None  # (future, tmp, final, step, what) of an async save in flight
        self._signal = None
        self._old_handlers = None  # installed by begin (the loop starts), restored by finish
        self._pg = dist.new_group(backend="gloo") if self.async_save and self.world_size > 1 else None
        self.token, self._next_slot = self._agree_on_token_and_slot()
        if self.enabled and self.folder is not None:
            problem = self._broadcast(self._check_storage() if self.rank == 0 else None)
            if problem:
                raise CheckpointError(problem)

    # ---- helpers that every rank runs together ---------------------------------------------------------
    def _broadcast(self, obj):
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _agree_on_token_and_slot(self):
        """A name for this process lifetime's tmp folders and the first snapshot slot, from rank 0.
        Rank 0 also clears the remains of interrupted saves before anyone writes."""
        token, slot = None, 0
        if self.rank == 0:
            token = f"{os.getpid()}-{secrets.token_hex(3)}"
            if self.folder is not None and self.folder.is_dir():
                for path in layout.stale_folders(self.folder):
                    logger.info(f"removing {path}: left by an interrupted save, never used")
                    layout.remove_checkpoint(path)
                steps = []
                for s in layout.SNAPSHOT_SLOTS:
                    try:
                        steps.append(layout.check_checkpoint(self.folder / layout.SNAPSHOT_DIR / s).step)
                    except CheckpointError:
                        steps.append(-1)
                slot = 0 if steps[0] <= steps[1] else 1  # overwrite the older (or unusable) slot first
        return self._broadcast((token, slot))

    def _check_storage(self) -> str | None:
        """Rank 0, at start: the save folder can be written, and holds a checkpoint (fp32 weights and two
        AdamW states per parameter) with room to spare. Found now, not at the first save."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".write-test-{self.token}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            return f"ckpt.save_ckpt_folder={str(self.folder)!r} cannot be written: {exc.strerror or exc}"
        need = 12 * int(self.run_meta.get("num_params") or 0)
        free = shutil.disk_usage(self.folder).free
        if free < need:
            return (f"ckpt.save_ckpt_folder={str(self.folder)!r} has {free / 2**30:.1f} GiB free, less than one "
                    f"checkpoint (about {need / 2**30:.1f} GiB); free space or choose another folder")
        if free < 2 * need:
            logger.warning(f"{self.folder} has {free / 2**30:.1f} GiB free: room for one checkpoint of about "
                           f"{need / 2**30:.1f} GiB but not two")
        return None

    # ---- resume ----------------------------------------------------------------------------------------
    def resume(self) -> None:
        """What a run starts from (doc/checkpoint.md, "Resuming"):

        - auto_resume and a usable checkpoint in save_ckpt_folder: that one, everything in it;
        - auto_resume and nothing to resume: load_ckpt_info when its path exists (an extension: InternEvo
          ignores load_ckpt_info under auto_resume), else a fresh start with a warning naming the path;
        - no auto_resume: load_ckpt_info (a missing path stops the run naming it);
        - load_ckpt_info None, or its path None: a fresh start.
        """
        ck = self.cfg.ckpt
        info = ck.load_ckpt_info
        wanted = info["path"] if info else None
        if ck.auto_resume:
            latest = None
            if self.folder is not None:
                latest = self._broadcast(self._find_latest() if self.rank == 0 else None)
            if latest is not None:
                self.load(layout.check_checkpoint(latest), set(ALL_CONTENT))
                return
            where = f"in {self.folder}" if self.folder is not None else "(ckpt.save_ckpt_folder is not set)"
            if wanted is None:
                if self.rank == 0:
                    logger.info(f"auto_resume: no checkpoint to resume {where}; training from scratch")
                return
            exists = self._broadcast(Path(wanted).exists() if self.rank == 0 else None)
            if not exists:
                if self.rank == 0:
                    logger.warning(f"auto_resume: no checkpoint to resume {where}, and ckpt.load_ckpt_info.path="
                                   f"{wanted!r} does not exist: training from scratch (as InternEvo, which ignores "
                                   f"load_ckpt_info when auto_resume=True; set ckpt.auto_resume=False to make a "
                                   f"missing path an error)")
                return
            if self.rank == 0:
                logger.info(f"auto_resume: no checkpoint to resume {where}; loading ckpt.load_ckpt_info.path="
                            f"{wanted!r} instead (InternEvo would ignore it and train from scratch)")
        if wanted is None:
            if self.rank == 0 and info:
                logger.info("ckpt.load_ckpt_info.path is None: training from scratch")
            return
        if info["ckpt_type"] == "hf":
            self._load_hf(wanted)
            return
        if info["ckpt_type"] == "llama":
            self._load_meta_llama(wanted)
            return
        if internevo_format.is_internevo_dir(wanted):  # InternEvo's own folder (model_tp*_pp*.pt), not ours
            self._load_internevo(wanted, info["content"])
            return
        # rank 0 reads every byte against the manifest; every rank raises the same error naming the file
        problem = None
        if self.rank == 0:
            try:
                verify.check(wanted, allow_model_only=True, deep=True)
            except CheckpointError as exc:
                problem = str(exc)
        problem = self._broadcast(problem)
        if problem:
            raise CheckpointError(problem)
        found = verify.check(wanted, allow_model_only=True)
        content = set(info["content"])
        if found.model_only and content != {"model"}:
            raise CheckpointError(f"checkpoint {found.path} holds model weights only (no train state): load it "
                                  f"with ckpt.load_ckpt_info content=('model',)")
        self.load(found, content)

    def _find_latest(self) -> str | None:
        """Rank 0: the newest checkpoint that passes every check (sizes, checksums, safe metadata). A
        complete checkpoint that fails is moved aside, so that its step can be saved again."""
        best, skipped = verify.find_latest(self.folder, deep=True)
        for p, why in skipped:
            if (p / layout.MARKER).is_file():
                moved = verify.move_aside(p, why)
                logger.warning(f"auto_resume skips {p}: {why}; moved it to {moved}")
            else:
                logger.warning(f"auto_resume skips {p}: {why}")
        return str(best.path) if best else None

    def _load_hf(self, path) -> None:
        # imported at first use (internlm.checkpoint never imports internlm.hf when it is loaded), from
        # the package itself, which is what the check below names
        try:
            from internlm.hf import load_hf_into_parts
        except ModuleNotFoundError as exc:
            if exc.name in ("internlm.hf",):
                raise CheckpointError("ckpt_type='hf' needs internlm/hf/ (the Hugging Face mapping), which "
                                      "this installation does not have") from None
            raise
        try:
            load_hf_into_parts(self.model_parts, path)
        except ConversionError as exc:  # a mismatch worded for the user
            raise CheckpointError(f"cannot load the Hugging Face checkpoint {path}: {exc}") from None
        if self.rank == 0:
            logger.info(f"loaded Hugging Face weights from {path}")

    def _load_meta_llama(self, path) -> None:
        from internlm.hf.meta_llama import load_meta_llama_into_parts

        try:
            load_meta_llama_into_parts(self.model_parts, path)
        except ConversionError as exc:
            raise CheckpointError(f"cannot load the Meta Llama checkpoint {path}: {exc}") from None
        if self.rank == 0:
            logger.info(f"loaded Meta Llama weights from {path}")

    def _load_internevo(self, path, content) -> None:
        """InternEvo's own folder: the model, with "sampler"/"scheduler" its progress (internevo_state.py:
        the step, tokens and data position), with "optimizer" AdamW's state (internevo_optim.py)."""
        from internlm.checkpoint import internevo_state

        internevo_state.check_content(path, content)
        if "all" in content:
            content = ("model", "sampler", "scheduler", "optimizer")
        progress = internevo_state.read_progress(path) if set(content) - {"model"} else None
        loaded = []
        if "model" in content:
            internevo_format.load_internevo_into_parts(self.model_parts, path)
            loaded.append("model weights")
        if "optimizer" in content:
            from internlm.checkpoint import internevo_optim

            step, scaler = internevo_optim.load_internevo_optimizer(
                self.model_parts, self.optimizer.part_optimizers, path, self.model_parts[0].args)
            if scaler and self.optimizer.grad_scaler is not None:
                self.optimizer.grad_scaler.load_state_dict(scaler)
            loaded.append(f"AdamW state at its step {step:g}")
        if progress is not None:  # as InternEvo: any content beyond the model loads the train state (context.pt)
            self.train_state.step, self.train_state.consumed_tokens = progress.step, progress.consumed_tokens
            loaded.append(f"step {progress.step}, {progress.consumed_tokens} tokens")
        if progress is not None and "sampler" in content:
            self._continue_internevo_data(path, progress)
            loaded.append(f"data at epoch {progress.epoch} row {progress.samples_in_epoch}")
        if progress is not None and "scheduler" in content:
            step = progress.step
            self.lr_scheduler.load_state_dict({"last_epoch": step, "_step_count": step + 1})
            beta2 = self.beta2_scheduler
            beta2.load_state_dict({"cur_iter": step, "init_beta2": beta2.init_beta2, "c": beta2.c})
            loaded.append(f"the LR schedule at step {step}")
            config_lr = self.optimizer.param_groups[0].get("initial_lr")
            if progress.base_lr is not None and config_lr is not None and progress.base_lr != config_lr \
                    and self.rank == 0:
                logger.warning(f"InternEvo's scheduler had base lr {progress.base_lr}; following the config's "
                               f"adam.lr={config_lr} (as InternEvo's own load_scheduler does)")
        if self.rank == 0:
            logger.info(f"loaded from InternEvo folder {path}: {'; '.join(loaded)}"
                        + ("; optimizer moments start fresh" if progress is not None and "optimizer" not in content
                           else ""))

    def _continue_internevo_data(self, path, progress) -> None:
        state = dict(self.train_loader.state_dict())
        if state.get("kind") == "streaming":
            raise CheckpointError(f"{path}: InternEvo's data position counts packed samples of .bin data; it cannot "
                                  f"place a streaming run (data.type='streaming'): load content=('model', "
                                  f"'scheduler') instead")
        if progress.samples_in_epoch > state["num_rows"]:
            raise CheckpointError(f"{path}: InternEvo had consumed {progress.samples_in_epoch} packed rows of epoch "
                                  f"{progress.epoch}, but this dataset has {state['num_rows']} (is it the same data, "
                                  f"seq_len and packing?)")
        state.update(epoch=progress.epoch, rows_consumed_in_epoch=progress.samples_in_epoch)
        self.train_loader.load_state_dict(state)

    def load(self, info: layout.CheckpointInfo, content) -> None:
        """Load `content` (model, optimizer, scheduler, sampler or all) from a checkpoint checked by
        `check_checkpoint`. It may come from any layout: DCP reshards model and optimizer state."""
        path, meta = info.path, info.meta
        everything = "all" in content
        t0 = time.perf_counter()
        train = {} if info.model_only else layout.read_json(path / layout.STATE, "train state")
        loaded = []
        if everything or "model" in content:
            tensors.load_model(self.model_parts, path)
            loaded.append("model")
        if everything or "optimizer" in content:
            tensors.load_optimizer(self.model_parts, self.optimizer.part_optimizers, path)
            self.optimizer.load_state_dict(train["optimizer"])
            loaded.append("optimizer")
        if everything or "scheduler" in content:
            self._load_schedulers(train)
            loaded.append("scheduler")
        if everything or "sampler" in content:
            self.train_loader.load_state_dict(train["sampler"])
            self.train_state.load_state_dict(train)
            loaded.append("sampler")
        if everything:
            rng = path / layout.rng_file(self.rank)
            if meta.get("world_size") == self.world_size and rng.is_file():
                tensors.set_rng_state(tensors.load_rng_file(rng), self.device)
                loaded.append("rng")
        if self.rank == 0:
            lay = meta.get("layout", {})
            saved = " ".join(f"{k}={lay[k]}" for k in ("tp", "pp", "dp", "zero1", "num_chunks") if k in lay)
            if lay.get("tp_mode") == "isp":
                saved += f" (isp{', wp=' + str(lay['wp']) if lay.get('wp', 1) > 1 else ''})"
            if lay.get("ep", 1) > 1:
                saved += f" ep={lay['ep']}"
            logger.info(f"{'resumed' if 'sampler' in loaded else 'loaded'} from {path} "
                 f"(step {info.step}{', saved under ' + saved if saved else ''}): {', '.join(loaded)} "
                 f"in {time.perf_counter() - t0:.1f}s")

    def _load_schedulers(self, train: dict) -> None:
        """Restore the schedules' position; their shape (total steps, warmup, base lr) follows the
        current config, so a resumed run may extend training."""
        saved = train["lr_scheduler"]
        for key in self.lr_scheduler.load_state_dict(saved):
            if self.rank == 0:
                logger.warning(f"lr schedule {key} changed from {saved[key]} to {getattr(self.lr_scheduler, key)} "
                               f"since the checkpoint; following the config")
        self.beta2_scheduler.load_state_dict(train["beta2_scheduler"])

    # ---- stop requests ---------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        self._old_handlers = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        self._old_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)

    def _on_signal(self, signum, frame) -> None:
        self._signal = signal.Signals(signum).name  # only a flag: the loop acts at the end of the step

    def _on_interrupt(self, signum, frame) -> None:
        """Ctrl-C: the first press saves and stops like SIGTERM; the second stops at once."""
        if self._signal == "SIGINT":
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self._signal = "SIGINT"
        logger.warning("interrupted: " + ("saving and stopping" if self.enabled else "stopping")
                       + " at the end of this step (Ctrl-C again to stop now, without saving)")

    def _restore_signal_handlers(self) -> None:
        for sig, old in (self._old_handlers or {}).items():
            signal.signal(sig, old)
        self._old_handlers = None

    def _stop_file_request(self, step: int) -> tuple[bool, bool]:
        """Rank 0: what the stop file asks of this step, as (stop, save). See read_stop_file."""
        request = read_stop_file(self.stop_file) if self.stop_file else None
        if request != self._stop_file_seen and request is not None:
            if request == STOP_NOW:
                what = "a stop at the end of this step"
            elif request > 0:
                what = f"a checkpoint and a stop at step {request}" + (", already reached: stopping at the end of "
                                                                        "this step" if step >= request else "")
            else:
                what = f"a checkpoint at step {-request}, then training on" + (
                    " (a step already passed: nothing to do)" if step > -request else "")
            line = f"stop file {self.stop_file} asks for {what} (now at step {step})"
            logger.info(line)
            self.notify(line)
        self._stop_file_seen = request
        if request is None:
            return False, False
        if request == STOP_NOW or step >= request > 0:
            return True, False
        return False, request < 0 and step == -request

    def _stop_request(self, step: int) -> tuple[str | None, bool]:
        """(why every rank must stop now, or None; whether the stop file asks for a checkpoint now). All
        ranks agree: rank 0 reads the stop file, every rank its signal flag, one tiny all_reduce per step."""
        stop_file, save_file = self._stop_file_request(step) if self.rank == 0 else (False, False)
        flags = torch.tensor([self._signal is not None, stop_file, save_file], dtype=torch.int32)
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0]:
            return (f"signal {self._signal}" if self._signal else "a signal on another rank"), False
        if flags[1]:
            return f"stop file {self.stop_file}", False
        return None, bool(flags[2])

    def _consume_stop_file(self) -> None:
        """Rank 0, once the stop file's request is done: remove the file, so that a restarted job trains on."""
        try:
            os.remove(self.stop_file)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning(f"cannot remove the stop file {self.stop_file} after acting on it: {exc.strerror or exc}")
        self._stop_file_seen = None

    # ---- saving ----------------------------------------------------------------------------------------
    def begin(self) -> None:
        """The loop starts: from here a signal or Ctrl-C only asks for a stop at the end of a step (installed
        before the first step, so a press while step 1 is being logged is not a bare KeyboardInterrupt)."""
        if self._old_handlers is None:  # only while the loop runs: a Trainer used otherwise keeps defaults
            self._install_signal_handlers()

    def after_step(self, step: int, total: int) -> bool:
        """Save, snapshot or stop after `step`. Returns True when training must stop now."""
        self.begin()
        self._poll_async()
        with phase(f"step {step} stop check"):
            reason, save_asked = self._stop_request(step)
        if save_asked and not self.enabled and self.rank == 0:
            logger.warning(f"stop file {self.stop_file} asks for a checkpoint at step {step}, but "
                           f"ckpt.enable_save_ckpt is False")
        if self.enabled and self.folder is not None:
            if reason or save_asked or step >= total or step % self.every == 0:
                with phase(f"step {step} save"):
                    self.save(step, "checkpoint")
            elif self.snapshot_every and step % self.snapshot_every == 0:
                with phase(f"step {step} snapshot"):
                    self.save(step, "snapshot")
        if save_asked and self.rank == 0:
            self._consume_stop_file()
        if reason is None:
            return False
        self.wait()
        if self.rank == 0:
            if not self.enabled:
                logger.warning(f"stopping on {reason} without a checkpoint: ckpt.enable_save_ckpt is False")
            logger.info(f"stopped after step {step} on {reason}"
                 + (f"; checkpoint {self.folder / str(step)}" if self.enabled else ""))
            if reason.startswith("stop file"):
                self._consume_stop_file()
        return True

    def save(self, step: int, what: str = "checkpoint") -> Path | None:
        """Write a checkpoint ("checkpoint": `<folder>/<step>/`, "snapshot": the older snapshot slot).
        A full or read-only disk is a CheckpointError naming the path; the previous checkpoint is intact."""
        try:
            return self._save(step, what)
        except (OSError, RuntimeError, CheckpointException) as exc:
            problem = storage_problem(exc, self.folder)
            if problem is None:
                raise
            last = f"; the last complete checkpoint, {self.folder / str(self.last_complete)}, is intact" \
                if self.last_complete is not None else ""
            raise CheckpointError(f"cannot save step {step} in {self.folder}: {problem}{last}") from None

    def _save(self, step: int, what: str) -> Path | None:
        if self.last_saved_step == step:
            return None
        self.wait()  # one save at a time: the previous async save completes (and is published) first
        if what == "snapshot":
            final = self.folder / layout.SNAPSHOT_DIR / str(self._next_slot)
            self._next_slot = 1 - self._next_slot
        else:
            final = self.folder / str(step)
            exists = self._broadcast((final / layout.MARKER).is_file() if self.rank == 0 else None)
            if exists:
                if self.rank == 0:
                    logger.warning("checkpoint %s already exists and is complete; not overwriting it", final)
                self.last_saved_step = step
                return None
        check_finite(self.model_parts, self.device, f"save step {step}")  # never a checkpoint of NaN weights
        tmp = layout.tmp_path(final, self.token)
        t0 = time.perf_counter()
        (tmp / layout.RNG_DIR).mkdir(parents=True, exist_ok=True)
        torch.save(tensors.rng_state(self.device), tmp / layout.rng_file(self.rank))
        if self.rank == 0:
            self._write_small_files(tmp, step, what)
        state = tensors.save_state_dict(self.model_parts, self.optimizer.part_optimizers)
        self.last_saved_step = step
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._pg)
            self._pending = (future, tmp, final, step, what, t0)
            return final
        dcp.save(state, checkpoint_id=str(tmp))
        # every rank hashes the files it wrote, at once; rank 0 writes the manifest before the marker
        h0 = time.perf_counter()
        entries = verify.hash_files(tmp, verify.rank_files(tmp, self.rank))
        if self.world_size > 1:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, entries)
            entries = {k: v for part in gathered for k, v in part.items()}
        self._publish(tmp, final, step, what, t0, entries, time.perf_counter() - h0)
        if what == "checkpoint":
            self.last_complete = step
        if self.world_size > 1:
            dist.barrier()  # every rank returns with the checkpoint complete
        return final

    def _write_small_files(self, tmp: Path, step: int, what: str) -> None:
        ts = self.train_state
        train = {
            **ts.state_dict(),
            "step": step,
            "inf_nan_skip_batches": self.optimizer.skipped_steps,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "beta2_scheduler": self.beta2_scheduler.state_dict(),
            "sampler": self.train_loader.state_dict(),
        }
        layout.write_json(tmp / layout.STATE, train)
        dump_yaml(self.cfg, tmp / layout.CONFIG)
        tokenizer = self.cfg.data.tokenizer_path
        if tokenizer and Path(tokenizer).is_file():  # the checkpoint carries its tokenizer (generate, export)
            shutil.copyfile(tokenizer, tmp / layout.TOKENIZER)
            hf_config = Path(tokenizer).parent / layout.TOKENIZER_CONFIG
            if hf_config.is_file():  # an HF tokenizer's added tokens (e.g. InternLM2's chat tokens)
                shutil.copyfile(hf_config, tmp / layout.TOKENIZER_CONFIG)
        layout.write_json(tmp / layout.META, {
            "format": layout.FORMAT, "format_version": layout.FORMAT_VERSION, "kind": what, "step": step,
            "tokens_seen": ts.consumed_tokens, **self.run_meta, "world_size": self.world_size,
            "torch_version": torch.__version__, "python_version": sys.version.split()[0],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "job_name": self.cfg.JOB_NAME,
        })

    def _publish(self, tmp: Path, final: Path, step: int, what: str, t0: float, entries: dict | None = None,
                 hash_seconds: float = 0.0) -> None:
        """Rank 0 only acts: write the manifest (hashing what no rank hashed), rename the fully written
        tmp folder, write the marker, prune."""
        if self.rank != 0:
            return
        hook = os.environ.get(SLOW_SAVE_ENV, "")
        if hook and int(hook.split(":")[0]) == step:
            time.sleep(float(hook.split(":")[1]))
        h0 = time.perf_counter()
        verify.write_manifest(tmp, entries or {}, hash_seconds)
        hash_seconds += time.perf_counter() - h0
        layout.commit(tmp, final, self.token, step)
        pruned = layout.prune(self.folder, self.keep_last, protect=final) if what == "checkpoint" else []
        logger.info(f"saved {what} of step {step} to {final} in {time.perf_counter() - t0:.2f}s "
                    f"(checksums {hash_seconds:.2f}s)"
                    + (f" (removed {', '.join(p.name for p in pruned)}: keep_last={self.keep_last})" if pruned else ""))
        if what == "checkpoint":
            self.notify(f"Saved the checkpoint of step {step} to {final}.")
            if self.cfg.ckpt.enable_internevo2hf_ckpt:
                self._export_hf(final, step)

    def _export_hf(self, final: Path, step: int) -> None:
        """InternEvo's enable_internevo2hf_ckpt: the complete checkpoint, exported by rank 0 as
        tools/convert2hf.py would. A failed export is logged; the checkpoint itself is already safe."""
        from internlm.config import torch_dtype
        from internlm.errors import UserError
        from internlm.hf.export import export_ckpt_to_hf

        out = self.folder / layout.HF_EXPORT_DIR / str(step)
        t0 = time.perf_counter()
        try:
            report = export_ckpt_to_hf(final, out, dtype=torch_dtype(self.cfg.model.dtype), progress=False)
        except (UserError, OSError) as exc:
            logger.warning(f"Hugging Face export of step {step} to {out} failed: {exc}")
            return
        logger.info(f"exported step {step} to {out} as transformers '{report.target}' ({report.dtype}) "
                    f"in {time.perf_counter() - t0:.2f}s")

    def _poll_async(self) -> None:
        if self._pending is not None and self._future(self._pending[0]).done():
            self.wait()

    @staticmethod
    def _future(f):
        return getattr(f, "upload_completion", f)  # async_save returns a Future or an AsyncSaveResponse

    def wait(self) -> None:
        """Block until the async save in flight (if any) is written on this rank, then publish it."""
        if self._pending is None:
            return
        future, tmp, final, step, what, t0 = self._pending
        self._pending = None
        self._future(future).result()
        # DCP's final step gathers every rank's write results before rank 0's future completes, so
        # when rank 0 gets here every rank has written its shards and its RNG file.
        self._publish(tmp, final, step, what, t0)

    def abort(self) -> None:
        """The loop failed: restore the signal handlers; an async save in flight stays unpublished (its
        tmp folder is removed at the next start)."""
        self._restore_signal_handlers()

    def finish(self) -> None:
        self.wait()
        if self.world_size > 1:
            dist.barrier()
        self._restore_signal_handlers()
