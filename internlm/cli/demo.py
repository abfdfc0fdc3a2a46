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

    t1 = time.time()
    rc = train.main(cmd)
    if rc != 0:
        return rc
    from internlm.config import load_config

    cfg = load_config(args.config, overrides)
    run_folder = Path(cfg.monitor.run_folder)
    rows = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    starts = [i for i, r in enumerate(rows) if r["step"] == 1]
    rows = rows[starts[-1]:] if starts else rows  # this run only (metrics.jsonl appends across runs)
    first, last = rows[0], rows[-1]
    valid = [r for r in rows if r.get("valid_loss") is not None]
    print(f"[demo] trained {last['step']} steps in {time.time() - t1:.1f}s: "
          f"loss {first['loss']:.3f} -> {last['loss']:.3f}", flush=True)
    if valid:
        v0, v1 = valid[0], valid[-1]
        print(f"[demo] validation perplexity {math.exp(v0['valid_loss']):.1f} (step {v0['step']}) -> "
              f"{math.exp(v1['valid_loss']):.1f} (step {v1['step']})", flush=True)
    print(f"[demo] metrics: {run_folder / 'metrics.jsonl'}  tensorboard: {run_folder / 'tensorboard'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
