"""Describe a training checkpoint without a process group (reads meta.json, state.json, config.yaml, and
checks the DCP metadata as a resuming run does: what it lists as usable is what auto-resume would take).

    python tools/ckpt_info.py runs/demo/ckpt/300        # one checkpoint
    python tools/ckpt_info.py runs/demo/ckpt            # a save folder: every checkpoint, newest usable marked
    python tools/ckpt_info.py runs/demo/ckpt/300 --json # meta.json as JSON

Exit status: 0, or 2 when DIR is not a usable checkpoint (the reason is printed).
"""
import argparse
import json
import sys
from pathlib import Path

import yaml

from internlm.checkpoint import layout, verify


def _config(path: Path) -> dict:
    try:
        cfg = yaml.safe_load((path / layout.CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def config_summary(cfg: dict) -> str:
    m, d = cfg.get("model", {}) or {}, cfg.get("data", {}) or {}
    adam, lr = cfg.get("adam", {}) or {}, cfg.get("lr_scheduler", {}) or {}
    items = [("hidden_size", m.get("hidden_size")), ("num_layers", m.get("num_layers")),
             ("heads", f"{m.get('num_attention_heads')}/{m.get('num_kv_attention_heads')}"
              if m.get("num_attention_heads") else None),
             ("vocab_size", m.get("vocab_size")), ("dtype", m.get("dtype")), ("seq_len", d.get("seq_len")),
             ("micro_num", d.get("micro_num")), ("micro_bsz", d.get("micro_bsz")), ("lr", adam.get("lr")),
             ("total_steps", lr.get("total_steps", d.get("total_steps")))]
    return " ".join(f"{k}={v}" for k, v in items if v is not None)


def describe(info: layout.CheckpointInfo) -> list[str]:
    meta, cfg = info.meta, _config(info.path)
    if info.model_only:
        lines = [f"checkpoint: {info.path}  (model weights only, written by another tool; no train state)",
                 f"step: {info.step}"]
    else:
        lay = meta.get("layout", {})
        lines = [
            f"checkpoint: {info.path}  ({meta.get('kind', 'checkpoint')}, complete)",
            f"step: {info.step}   tokens seen: {meta.get('tokens_seen')}   saved: {meta.get('time')}",
            "layout: world_size={} ".format(meta.get("world_size"))
            + " ".join(f"{k}={lay[k]}" for k in ("tp", "pp", "dp", "zero1", "num_chunks", "pp_mode", "tp_mode", "fsdp")
                       if k in lay),
        ]
    model_type = meta.get("model_type") or cfg.get("model_type")
    params = meta.get("num_params")
    lines.append(f"model_type: {model_type}" + (f"   parameters: {params / 1e6:.2f}M" if params else ""))
    if cfg:
        lines.append(f"config: {cfg.get('JOB_NAME', '?')}: {config_summary(cfg)}")
    if meta.get("torch_version"):
        lines.append(f"saved with torch {meta['torch_version']}")
    return lines


def main(argv=None) -> int:
    from internlm.log import setup_logging

    setup_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="a checkpoint folder (<step>/ or snapshot/<slot>) or a save folder")
    p.add_argument("--json", action="store_true", help="print meta.json (one checkpoint) as JSON")
    args = p.parse_args(argv)
    path = Path(args.dir)
    try:
        info = verify.check(path, allow_model_only=True, deep=True)
    except layout.CheckpointError as exc:
        candidates = layout.candidate_folders(path) if not (path / layout.META).is_file() else []
        if not candidates:
            print(f"ckpt_info: {exc}", file=sys.stderr)
            return 2
        return list_folder(path)
    if args.json:
        print(json.dumps(info.meta, indent=1))
    else:
        print("\n".join(describe(info)))
    return 0


def list_folder(folder: Path) -> int:
    best, skipped = verify.find_latest(folder, deep=True)
    usable = []
    for path in layout.candidate_folders(folder):
        try:
            usable.append(verify.check(path, deep=True))
        except layout.CheckpointError:
            pass
    print(f"save folder: {folder}")
    for info in sorted(usable, key=lambda i: (i.step, not i.is_snapshot)):
        mark = "  <- newest (auto_resume takes this)" if best and info.path == best.path else ""
        name = str(info.path.relative_to(folder))
        print(f"  {name:<12} step {info.step:<8} tokens {info.meta.get('tokens_seen')}{mark}")
    for path, why in skipped:
        print(f"  {str(path.relative_to(folder)):<12} unusable: {why}")
    for path in layout.stale_folders(folder):
        print(f"  {str(path.relative_to(folder)):<12} leftover of an interrupted save (removed at the next start)")
    if best is None:
        print(f"ckpt_info: no usable checkpoint in {folder}", file=sys.stderr)
        return 2
    print()
    print("\n".join(describe(best)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
