"""The curves of a run as one PNG, from its metrics.jsonl: for machines without TensorBoard.

    python tools/plot_metrics.py runs/demo                 # writes runs/demo/curves.png
    python tools/plot_metrics.py runs/demo --out demo.png

Four panels: the training loss (overall and per data type) with the validation loss, the learning
rate, TGS (tokens per GPU per second) and MFU. A step logged twice (a run resumed from a checkpoint
logs the steps after it again) is drawn with its last value. Needs matplotlib (`pip install
matplotlib`, part of the `test` and `plot` extras).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_steps(run_folder: Path) -> list[dict]:
    """metrics.jsonl as one record per step (the last one written for a step), in step order."""
    path = Path(run_folder) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: RUN_FOLDER must be a run folder (monitor.run_folder)")
    by_step: dict[int, dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}: line {n} is not JSON") from None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step[record["step"]] = record
    if not by_step:
        raise ValueError(f"{path} holds no step records")
    return [by_step[s] for s in sorted(by_step)]


def plot(records: list[dict], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    ax.plot(steps, [r.get("loss") for r in records], label="train", linewidth=1.5)
    types = sorted({t for r in records for t in (r.get("type_loss") or {})})
    for t in types:
        ax.plot(steps, [(r.get("type_loss") or {}).get(t) for r in records], label=f"train/{t}", linewidth=0.8,
                alpha=0.7)
    valid = [r for r in records if r.get("valid_loss") is not None]
    if valid:
        ax.plot([r["step"] for r in valid], [r["valid_loss"] for r in valid], "o-", label="validation")
        for t in sorted({t for r in valid for t in (r.get("valid_type_loss") or {})}):
            ax.plot([r["step"] for r in valid], [(r.get("valid_type_loss") or {}).get(t) for r in valid], "x--",
                    label=f"validation/{t}")
    ax.set_title("loss")
    ax.legend(fontsize=8)
    panels = ((axes[0][1], "lr", "learning rate", 1.0), (axes[1][0], "tgs", "TGS (tokens/GPU/s)", 1.0),
              (axes[1][1], "mfu", "MFU (%)", 100.0))
    for ax, key, name, scale in panels:
        ax.plot(steps, [r[key] * scale if r.get(key) is not None else None for r in records], linewidth=1.0)
        ax.set_title(name)
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    from internlm.log import setup_logging

    setup_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_folder", help="a run folder holding metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN_FOLDER/curves.png)")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: plot_metrics needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    try:
        records = read_steps(Path(args.run_folder))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.run_folder) / "curves.png"
    plot(records, out, f"{args.run_folder}: steps {records[0]['step']}-{records[-1]['step']}")
    print(f"wrote {out} ({len(records)} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
