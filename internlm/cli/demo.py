"""The end-to-end demo: build an offline corpus, train a tokenizer, tokenize, train a small model.

    python tools/demo.py [--data_dir demo_data] [KEY=VALUE ...]

The corpus is the Python standard library already on this machine: its docstrings (English, type
`en`) and its source code (type `code`). Nothing is downloaded. A second run reuses demo_data/.
Trailing KEY=VALUE pairs override configs/demo.py as in train.py (e.g. data.total_steps=50).
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
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_intermixed_args(argv)

    from internlm.data.demo import prepare_demo_data

    t0 = time.time()
    kwargs = {"vocab_size": 4000}
    if args.max_mb is not None:
        kwargs["max_mb"] = args.max_mb
    data = prepare_demo_data(args.data_dir, **kwargs)
    print(f"[demo] data ready in {time.time() - t0:.1f}s: {data['train_folder']}, {data['valid_folder']}",
          flush=True)
    overrides = [f"data.train_folder={data['train_folder']!r}", f"data.valid_folder={data['valid_folder']!r}",
                 f"data.tokenizer_path={data['tokenizer_path']!r}"] + list(args.overrides)
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
        return rc
    trained = metrics_file.is_file() and metrics_file.stat().st_size > before
    from internlm.checkpoint import verify

    if not trained:
        print(f"[demo] already trained: {cfg.ckpt.save_ckpt_folder} holds the final checkpoint (remove "
              f"{run_folder} to train again); its run:", flush=True)
    rows = ([json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
            if metrics_file.is_file() else [])
    starts = [i for i, r in enumerate(rows) if r["step"] == 1]
    rows = rows[starts[-1]:] if starts else rows  # this run only (metrics.jsonl appends across runs)
    if not rows:  # resumed a finished checkpoint into a new run folder: nothing trained, nothing logged
        print(f"[demo] no metrics in {run_folder}: the checkpoint in {cfg.ckpt.save_ckpt_folder} had already "
              f"reached data.total_steps", flush=True)
        return 0
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
    ckpt = verify.find_latest(cfg.ckpt.save_ckpt_folder, deep=False)[0] if cfg.ckpt.enable_save_ckpt else None
    if ckpt is None:
        print("[demo] no checkpoint saved (ckpt.enable_save_ckpt=False)", flush=True)
        return 0
    print(f"[demo] checkpoint: {ckpt.path} (step {ckpt.step}, with its tokenizer)", flush=True)
    print("[demo] next:\n" + "\n".join(f"  {c}" for c in next_commands(ckpt.path, run_folder, plot)), flush=True)
    return 0


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
             ("export to HF", f"python tools/convert2hf.py --src {ckpt} --tgt hf_demo")]
    if plot is None:
        steps.append(("curves", f"python tools/plot_metrics.py {run_folder}"))
    return [f"{label + ':':<14}{cmd}" for label, cmd in steps]


if __name__ == "__main__":
    sys.exit(main())
