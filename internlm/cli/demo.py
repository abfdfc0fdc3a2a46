"""The end-to-end demo: build an offline corpus, train a tokenizer, tokenize, train a small model.

    python tools/demo.py [--data_dir demo_data] [KEY=VALUE ...]
    python tools/demo.py --sft [--no_mask] [--eval 200] [--base_ckpt DIR] [KEY=VALUE ...]

The corpus is the Python standard library already on this machine: its docstrings (English, type
`en`) and its source code (type `code`). Nothing is downloaded. A second run reuses demo_data/.
Trailing KEY=VALUE pairs override configs/demo.py as in train.py (e.g. data.total_steps=50).

--sft then finetunes the demo's newest checkpoint (pretraining it first if there is none; or
--base_ckpt) on a chat task built from the same stdlib (configs/demo_sft.py; KEY=VALUE pairs override
it instead) and reports exact-match accuracy on held-out prompts (internlm/cli/demo_sft.py).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the source checkout (configs/) of an editable install


def main(argv=None) -> int:
    from internlm.log import setup_logging

    setup_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="demo_data")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.py"))
    p.add_argument("--max_mb", type=float, default=None, help="corpus size (default: the data module's)")
    p.add_argument("--sft", action="store_true", help="then finetune on a chat task and measure it")
    p.add_argument("--no_mask", action="store_true", help="with --sft: loss on the prompts too")
    p.add_argument("--eval", type=int, default=200, help="with --sft: held-out prompts to answer")
    p.add_argument("--base_ckpt", default=None, help="with --sft: finetune this checkpoint (no pretraining)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_intermixed_args(argv)
    if not args.sft and (args.no_mask or args.base_ckpt):
        p.error("--no_mask and --base_ckpt go with --sft")

    from internlm.data.demo import prepare_demo_data

    t0 = time.time()
    kwargs = {"vocab_size": 4000}
    if args.max_mb is not None:
        kwargs["max_mb"] = args.max_mb
    data = prepare_demo_data(args.data_dir, **kwargs)
    print(f"[demo] data ready in {time.time() - t0:.1f}s: {data['train_folder']}, {data['valid_folder']}",
          flush=True)
    if args.sft:
        from internlm.cli.demo_sft import run_sft

        base = Path(args.base_ckpt) if args.base_ckpt else _demo_checkpoint(args, data)
        if base is None:  # nothing pretrained yet: the demo first
            rc, base = pretrain(args, data, [])
            if rc != 0 or base is None:
                return rc or 1
        return run_sft(args, data, base, ROOT)
    return pretrain(args, data, list(args.overrides))[0]


def _demo_checkpoint(args, data: dict) -> Path | None:
    """The newest checkpoint of the demo's run, if it has one (any step)."""
    from internlm.checkpoint import verify
    from internlm.config import load_config

    cfg = load_config(args.config, [f"data.train_folder={data['train_folder']!r}",
                                    f"data.valid_folder={data['valid_folder']!r}"])
    found = verify.find_latest(cfg.ckpt.save_ckpt_folder, deep=False)[0] if cfg.ckpt.save_ckpt_folder else None
    if found is not None:
        print(f"[demo-sft] the demo's checkpoint: {found.path} (step {found.step})", flush=True)
    return found.path if found is not None else None


def pretrain(args, data: dict, user_overrides: list[str]) -> tuple[int, Path | None]:
    """Train (or find trained) the demo model; (exit code, its final checkpoint or None)."""
    overrides = [f"data.train_folder={data['train_folder']!r}", f"data.valid_folder={data['valid_folder']!r}",
                 f"data.tokenizer_path={data['tokenizer_path']!r}"] + user_overrides
    cmd = ["--config", args.config] + overrides
    from internlm.cli import train
    from internlm.config import load_config

    cfg = load_config(args.config, overrides)
    run_folder = Path(cfg.monitor.run_folder)
    metrics_file = run_folder / "metrics.jsonl"
    before = metrics_file.stat().st_size if metrics_file.is_file() else 0
    t1 = time.time()
    rc = train.main(cmd)
    if rc != 0:
        return rc, None
    trained = metrics_file.is_file() and metrics_file.stat().st_size > before
    from internlm.checkpoint import verify

    if not trained:
        print(f"[demo] already trained: {cfg.ckpt.save_ckpt_folder} holds the final checkpoint (remove "
              f"{run_folder} to train again); its run:", flush=True)
    rows = ([json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
            if metrics_file.is_file() else [])
    starts = [i for i, r in enumerate(rows) if r["step"] == 1]
    rows = rows[starts[-1]:] if starts else rows  # this run only (metrics.jsonl appends across runs)
    ckpt = verify.find_latest(cfg.ckpt.save_ckpt_folder, deep=False)[0] if cfg.ckpt.enable_save_ckpt else None
    if not rows:  # resumed a finished checkpoint into a new run folder: nothing trained, nothing logged
        print(f"[demo] no metrics in {run_folder}: the checkpoint in {cfg.ckpt.save_ckpt_folder} had already "
              f"reached data.total_steps", flush=True)
        return 0, ckpt.path if ckpt else None
    first, last = rows[0], rows[-1]
    valid = [r for r in rows if r.get("valid_loss") is not None]
    print(f"[demo] trained {last['step']} steps in {time.time() - t1:.1f}s: "
          f"loss {first['loss']:.3f} -> {last['loss']:.3f}", flush=True)
    if len(valid) == 1:
        print(f"[demo] validation perplexity {math.exp(valid[0]['valid_loss']):.1f} (step {valid[0]['step']})",
              flush=True)
    elif valid:
        v0, v1 = valid[0], valid[-1]
        print(f"[demo] validation perplexity {math.exp(v0['valid_loss']):.1f} (step {v0['step']}) -> "
              f"{math.exp(v1['valid_loss']):.1f} (step {v1['step']})", flush=True)
    print(f"[demo] metrics: {run_folder / 'metrics.jsonl'}  tensorboard: {run_folder / 'tensorboard'}", flush=True)
    plot = _plot(run_folder)
    if ckpt is None:
        print("[demo] no checkpoint saved (ckpt.enable_save_ckpt=False)", flush=True)
        return 0, None
    print(f"[demo] checkpoint: {ckpt.path} (step {ckpt.step}, with its tokenizer)", flush=True)
    if not args.sft:
        print("[demo] next:\n" + "\n".join(f"  {c}" for c in next_commands(ckpt.path, run_folder, plot)),
              flush=True)
    return 0, ckpt.path


def _plot(run_folder: Path) -> Path | None:
    """The run's curves (tools/plot_metrics.py) when matplotlib is installed."""
    try:
        from internlm.cli.plot_metrics import plot, read_steps
    except ImportError:
        return None
    try:
        out = plot(read_steps(run_folder), run_folder / "curves.png", f"{run_folder}")
    except ImportError:
        print("[demo] curves: pip install matplotlib, then python tools/plot_metrics.py " + str(run_folder))
        return None
    print(f"[demo] curves: {out}", flush=True)
    return out


def next_commands(ckpt: Path, run_folder: Path, plot: Path | None) -> list[str]:
    """The README tour's next steps, with the real paths of this run."""
    steps = [("look inside", f"python tools/ckpt_info.py {ckpt}"),
             ("sample", f'python tools/generate.py --ckpt {ckpt} --prompt "def parse(" --greedy'),
             ("chat page", f"streamlit run tools/web_demo.py -- --ckpt {ckpt}"),
             ("export to HF", f"python tools/convert2hf.py --src {ckpt} --tgt hf_demo"),
             ("finetune", "python tools/demo.py --sft")]
    if plot is None:
        steps.append(("curves", f"python tools/plot_metrics.py {run_folder}"))
    return [f"{label + ':':<14}{cmd}" for label, cmd in steps]


if __name__ == "__main__":
    sys.exit(main())
