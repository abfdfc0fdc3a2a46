"""Layouts as the planner names them ("tp=2 pp=2 zero1=8 ckpt=selective micro_bsz=2"), their config
overrides, the valid layouts of a cluster (for --search) and the nearest valid one to a mistake."""
from __future__ import annotations

import math

from internlm.config import load_config
from internlm.errors import UserError

# layout word -> config key
KEYS = {
    "tp": "parallel.tensor.size", "mode": "parallel.tensor.mode", "pp": "parallel.pipeline.size",
    "pp_mode": "parallel.pipeline.mode", "chunks": "model.num_chunks", "zero1": "parallel.zero1.size",
    "fsdp": "parallel.zero1.fsdp", "wp": "parallel.weight.size", "ep": "parallel.expert.size",
    "micro_bsz": "data.micro_bsz", "micro_num": "data.micro_num",
}
CKPT = {"off": ("False", None), "full": ("True", "full"), "selective": ("True", "selective"),
        "selective_op": ("True", "selective_op")}
# the planner never reads data: a config naming folders of another machine still plans
NO_DATA = ["data.train_folder=None", "data.valid_folder=None", "data.type=tokenized"]


class LayoutError(UserError, ValueError):
    """A layout the planner cannot use, said in one sentence."""


def parse_layout(text: str) -> dict:
    """'tp=2 pp=2 zero1=8 ckpt=full' -> {'tp': '2', 'pp': '2', 'zero1': '8', 'ckpt': 'full'}."""
    out = {}
    for word in text.replace(",", " ").split():
        key, sep, value = word.partition("=")
        if not sep or not value:
            raise LayoutError(f"--layout: {word!r} is not KEY=VALUE (keys: {', '.join([*KEYS, 'ckpt'])})")
        if key not in KEYS and key != "ckpt":
            import difflib

            close = difflib.get_close_matches(key, [*KEYS, "ckpt"], n=1)
            raise LayoutError(f"--layout: unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                              + f" (keys: {', '.join([*KEYS, 'ckpt'])})")
        if key == "fsdp":
            flag = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False,
                    "no": False}.get(value.lower())
            if flag is None:
                raise LayoutError(f"--layout: fsdp={value!r} must be on or off (1/0, true/false)")
            value = flag
        out[key] = value
    return out


def layout_overrides(layout: dict) -> list[str]:
    """Config overrides (KEY=VALUE) for a parsed layout."""
    out = [f"{KEYS[k]}={v}" for k, v in layout.items() if k in KEYS]
    if "ckpt" in layout:
        value = str(layout["ckpt"])
        if value in CKPT:
            flag, policy = CKPT[value]
            out.append(f"model.checkpoint={flag}")
            if policy:
                out.append(f"model.checkpoint_policy={policy}")
        else:
            try:
                frac = float(value)
            except ValueError:
                raise LayoutError(f"--layout: ckpt={value!r} must be off, full, selective, selective_op or a "
                                  f"fraction of layers") from None
            out.append(f"model.checkpoint={frac}")
    return out


def planned_config(config: str, overrides: list[str], layout: dict | None = None):
    return load_config(config, [*NO_DATA, *overrides, *layout_overrides(layout or {})])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg, gpus: int, gpus_per_node: int, tp_modes=("msp", "isp")) -> list[dict]:
    """Layouts worth planning for `gpus`, each keeping the config's global batch (tokens per step):
    tp within a node (`tp_modes`: msp moves the same bytes as mtp and keeps less, so the search leaves
    mtp out), pp up to 8 with at least 4 layers a stage (1F1B, and interleaved x2), zero1 over all of dp
    or within a node, ZeRO-3 on or off, activation checkpointing off/selective/selective_op/full, and
    every micro_bsz up to 8 that keeps the batch whole."""
    m, d = cfg.model, cfg.data
    current_dp = max(1, gpus // (cfg.parallel.tensor.size * cfg.parallel.pipeline.size))
    global_rows = d.micro_bsz * d.micro_num * current_dp  # packed rows per step, kept constant
    out = []
    for tp in _divisors(gpus):
        if tp > gpus_per_node or m.num_attention_heads % tp or m.num_kv_attention_heads % tp:
            continue
        for pp in _divisors(gpus // tp):
            if m.num_layers % pp or pp > 8 or m.num_layers // pp < 4 <= m.num_layers:
                continue
            dp = gpus // (tp * pp)
            modes = ["mtp"] if tp == 1 else list(tp_modes)
            zero1s = sorted({dp} | ({gpus_per_node // tp} if tp < gpus_per_node and dp % (gpus_per_node // tp) == 0
                                    and gpus_per_node // tp < dp else set()))
            chunk_opts = [1] + ([2] if pp > 1 and m.num_layers % (2 * pp) == 0 else [])
            for mode in modes:
                for zero1 in zero1s:
                    for fsdp in ([False, True] if dp > 1 or mode == "isp" else [False]):
                        for chunks in chunk_opts:
                            for ckpt in ("off", "selective", "selective_op", "full"):
                                for mbsz in (1, 2, 4, 8):
                                    if global_rows % (dp * mbsz):
                                        continue
                                    mnum = global_rows // (dp * mbsz)
                                    if pp > 1 and mnum < pp:
                                        continue
                                    out.append(dict(tp=tp, mode=mode, pp=pp, chunks=chunks, zero1=zero1,
                                                    fsdp=fsdp, ckpt=ckpt, micro_bsz=mbsz, micro_num=mnum))
    return out


def shape_key(layout: dict) -> tuple:
    """What the per-rank parameter shapes depend on (not checkpointing, ZeRO-3 or the micro-batch)."""
    return tuple(layout.get(k) for k in ("tp", "mode", "pp", "chunks", "zero1", "wp", "ep", "pp_mode"))


def config_layout(cfg, gpus: int) -> dict:
    """The layout words of a config as it stands (zero1 as the shard size it resolves to)."""
    from internlm.parallel_dims import shard_group_size

    par, m = cfg.parallel, cfg.model
    dp = max(1, gpus // (par.tensor.size * par.pipeline.size))
    ck = m.checkpoint
    ckpt = ("off" if not ck else m.checkpoint_policy if ck is True else str(ck))
    return dict(tp=par.tensor.size, mode=par.tensor.mode, pp=par.pipeline.size, chunks=m.num_chunks,
                zero1=shard_group_size(par.zero1.size, dp), fsdp=par.zero1.fsdp, ckpt=ckpt,
                micro_bsz=cfg.data.micro_bsz, micro_num=cfg.data.micro_num)


def layout_distance(want: dict, cand: dict) -> float:
    """How far apart two layouts are: log2 steps in tp, pp, zero1 (and half steps in micro_bsz), half a
    step for each other word that differs."""
    dist = 0.0
    for k, w in (("tp", 1.0), ("pp", 1.0), ("zero1", 1.0), ("micro_bsz", 0.5)):
        if k in want and k in cand:
            a, b = max(float(want[k]), 1.0), max(float(cand[k]), 1.0)
            dist += w * abs(math.log2(a) - math.log2(b))
    for k in ("mode", "ckpt", "fsdp", "chunks"):
        if k in want and k in cand and str(want[k]).lower() != str(cand[k]).lower():
            dist += 0.5
    return dist


def format_layout(layout: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in layout.items())
