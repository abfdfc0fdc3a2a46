"""Train an InternLM-family model from a config file.

    python train.py --config configs/demo.py [--launcher torch|slurm] [--seed N] [--profiling] [--count-comm]
                    [--track-memory] [KEY=VALUE ...]
    torchrun --nproc_per_node 8 train.py --config configs/7B_sft.py parallel.tensor.size=2
    srun -N 2 --ntasks-per-node 8 python train.py --config configs/7B_sft.py --launcher slurm --port 29500

Each trailing KEY=VALUE overrides a dotted config path; VALUE is parsed as a Python literal.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a .py (InternEvo style) or .yaml config file")
    p.add_argument("--config-keys", action="store_true", help="print every config key (type, default, meaning)")
    p.add_argument("--launcher", default="torch", choices=["torch", "slurm"])
    p.add_argument("--port", type=int, default=None, help="master port (slurm; overrides torchrun's)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--profiling", action="store_true",
                   help="write a torch profiler trace of a few steps (and a CUDA memory snapshot) to "
                        "<run folder>/profile")
    p.add_argument("--count-comm", action="store_true",
                   help="count the bytes each rank sends in the run's second step, by collective kind, into "
                        "<run folder>/comm/rank<R>.json (tools/plan.py --explain compares them with the plan)")
    p.add_argument("--track-memory", action="store_true",
                   help="record the tensor memory each rank holds at its peak in the run's second step, by kind, "
                        "into <run folder>/memory/rank<R>.json (tools/plan.py --explain compares it with the plan)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config and the layout for --world-size processes, print them, exit")
    p.add_argument("--world-size", type=int, default=None,
                   help="with --dry-run: the number of processes to check the layout for (default: $WORLD_SIZE or 1)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    args = p.parse_intermixed_args(argv)
    if not args.config and not args.config_keys:
        p.error("the following arguments are required: --config")
    return args


def main(argv=None) -> int:
    from internlm.log import setup_logging

    setup_logging()
    args = parse_args(argv)
    if args.config_keys:
        from internlm.config.docs import plain

        print(plain(), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from internlm.config import ConfigError, load_config

    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        return dry_run(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", "1")))
    from internlm.errors import run_guarded

    return run_guarded(lambda: train(cfg, args.launcher, args.port, args.profiling, args.count_comm,
                                     args.track_memory))


def train(cfg, launcher: str = "torch", port: int | None = None, profiling: bool = False,
          count_comm: bool = False, track_memory: bool = False) -> None:
    """Build the trainer and run it, with the Feishu alerts of `monitor.alert` around the whole run
    (start, failure, end) and on its events, and the step profiler of --profiling."""
    from internlm.alert import Alerts, rank_from_env
    from internlm.trainer import Trainer

    alerts = Alerts.from_config(cfg, rank_from_env(launcher))
    with alerts.watch():
        trainer = Trainer(cfg, launcher=launcher, port=port)
        trainer.step_hooks.append(alerts.after_step)
        trainer.checkpoints.notify = alerts.send
        profiler = None
        if profiling:
            from internlm.profiling import StepProfiler

            profiler = StepProfiler(trainer.run_folder, trainer.rank, trainer.device, first_step=trainer.step)
            trainer.step_hooks.append(profiler.after_step)
            profiler.start()
        counter = None
        if count_comm:
            from internlm.comm_count import StepCommCounter

            counter = StepCommCounter(trainer.run_folder, trainer.rank, first_step=trainer.step)
            trainer.step_hooks.append(counter.after_step)
        if track_memory and trainer.dims.pp > 1 and trainer.dims.pp_mode in ("zbh1", "zbv"):
            logger_notice(f"--track-memory is off for parallel.pipeline.mode={trainer.dims.pp_mode!r}: PyTorch's "
                          f"MemTracker cannot follow the zero-bubble schedules' split backward (autograd.grad)")
            track_memory = False
        if track_memory:
            from internlm.memory_probe import StepMemoryTracker

            memory = StepMemoryTracker(trainer.run_folder, trainer.rank, trainer.model_parts,
                                       trainer.optimizer.part_optimizers, first_step=trainer.step,
                                       later=1 if count_comm else 0)
            trainer.step_hooks.append(memory.after_step)
        try:
            trainer.fit()
        finally:
            if profiler is not None:
                profiler.stop()
            if counter is not None:
                counter.stop()
            if track_memory:
                memory.stop()
        alerts.finished(trainer.step, cfg.data.total_steps)


def logger_notice(text: str) -> None:
    from internlm.log import logger

    logger.warning(f"notice: {text}")


def dry_run(cfg, world_size: int) -> int:
    """Validate `cfg` for `world_size` processes without starting anything; one line per fact."""
    from internlm import builders
    from internlm.config import ConfigError, validate
    from internlm.parallel_dims import ParallelDims

    try:
        validate(cfg, world_size=world_size)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    dims = ParallelDims.from_config(cfg, world_size)
    args = builders.model_args(cfg)
    print(f"config OK: {cfg.model_type}, {args.num_params() / 1e6:.2f}M parameters, layout {dims.describe()}, "
          f"{cfg.data.total_steps} steps of {cfg.data.micro_num} x {cfg.data.micro_bsz} x {cfg.data.seq_len} "
          f"tokens per data-parallel rank")
    for notice in cfg.notices:
        print(f"notice: {notice}")
    return 0


def entry(argv=None) -> int:
    """The command (train.py, `internlm-train`): main(), then in a multi-process run an immediate exit.
    Once the run is over (process groups destroyed, checkpoints complete, logs flushed) there is
    nothing left to do, but CPython's teardown still destroys torch's C++ objects in an arbitrary
    order, and in a few of the hundreds of 2-process runs of the test suite that aborted a rank at exit
    ("terminate called without an active exception", SIGABRT) after all its work was done."""
    rc = main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(entry())
