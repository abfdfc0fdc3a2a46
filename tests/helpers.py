"""What the tests share that is not a fixture: the tiny training config, the environment and command
of a tool run as a subprocess, and the reader of a run's metrics.jsonl.

The fixtures (the sentencepiece tokenizer, the session's train.py runner, the parity table) are in
tests/conftest.py; the train.py / torchrun launcher is tests/launcher.py.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "train.py"

# ---------------------------------------------------------------------------------------------------
# The tiny config

# A small model that still has every structural feature the parallel layouts split: GQA (4 heads, 2 kv
# heads, both divisible by tp=2), 4 layers (pp=2 x num_chunks=2 stages of one layer), vocab 128
# (tp-divisible); deterministic dummy data (no data folders). The lr schedule is fixed at 10 steps, so
# a shorter run is a prefix of a longer one.
TINY = dict(
    JOB_NAME="tiny",
    model_type="INTERNLM2_PUBLIC",
    model=dict(num_attention_heads=4, num_kv_attention_heads=2, hidden_size=64, num_layers=4, vocab_size=128,
               mlp_ratio=8 / 3, multiple_of=32, dtype="torch.float32", max_position_embeddings=256,
               num_chunks=1, checkpoint=False),
    data=dict(seq_len=64, micro_num=4, micro_bsz=2, total_steps=10, train_folder=None, valid_folder=None,
              valid_every=0, dummy_num_samples=400),
    hybrid_zero_optimizer=dict(clip_grad_norm=1.0),
    adam=dict(lr=1e-3, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.01),
    lr_scheduler=dict(total_steps=10, warmup_ratio=0.2, eta_min=1e-4),
    parallel=dict(zero1=dict(size=-1), tensor=dict(size=1, mode="mtp"), pipeline=dict(size=1),
                  collective_timeout_s=120),
    monitor=dict(log_every=1, peak_tflops=1.0),
    seed=20240,
)

# The keys of TINY["model"] that ModelArgs takes under the same name.
_MODEL_ARGS_KEYS = ("num_attention_heads", "num_kv_attention_heads", "hidden_size", "num_layers", "vocab_size",
                    "mlp_ratio", "multiple_of", "max_position_embeddings")


def tiny_config(**sections) -> dict:
    """TINY with some sections changed: a dict value updates that section key by key (a section TINY
    lacks is added), any other value replaces the top-level key."""
    cfg = copy.deepcopy(TINY)
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(name), dict):
            cfg[name].update(copy.deepcopy(value))
        else:
            cfg[name] = copy.deepcopy(value)
    return cfg


def config_text(cfg: dict) -> str:
    """A raw config dict as the text of a .py config file (what users write)."""
    return "".join(f"{key} = {value!r}\n" for key, value in cfg.items())


def write_config(folder: Path, name: str = "tiny.py", **sections) -> Path:
    """Write tiny_config(**sections) to folder/name; returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(config_text(tiny_config(**sections)))
    return path


def tiny_model_args(**overrides):
    """internlm.model.internlm.ModelArgs of the tiny config's model (for in-process tests)."""
    from internlm.model.internlm import ModelArgs

    kw = {key: TINY["model"][key] for key in _MODEL_ARGS_KEYS}
    kw.update(overrides)
    return ModelArgs(**kw)


# ---------------------------------------------------------------------------------------------------
# Subprocesses

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra: str) -> dict:
    """os.environ for a tool or train.py started by a test: this checkout's `internlm` first on the
    path (a script outside the repository root, or tools/*.py, would otherwise import whichever copy
    is installed), one thread per process (2 cores run up to 8 ranks), unbuffered output, and none of
    a launcher's variables (the test itself may run under one). `extra` is added on top; a value of
    None removes that variable."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), *path]), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_python(args: list, cwd: Path | str = ROOT, timeout: float = 300, env: dict | None = None
               ) -> subprocess.CompletedProcess:
    """`python *args` (a script path and its arguments, or -c / -m ...) with clean_env() updated by
    `env`; output captured as text."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=clean_env(**(env or {})))


# ---------------------------------------------------------------------------------------------------
# metrics.jsonl

def read_metrics(run_folder: Path | str) -> list[dict]:
    """The records of run_folder/metrics.jsonl, in order; [] when there is no such file. A last line
    still being written (no newline yet) is left out, so a running training can be polled."""
    path = Path(run_folder) / "metrics.jsonl"
    if not path.is_file():
        return []
    *complete, _partial = path.read_text().split("\n")
    return [json.loads(line) for line in complete if line.strip()]


def random_hf_llama(vocab_size: int, std: float = 0.3, **config):
    """A small random transformers LlamaForCausalLM (eval mode, seed 0): norms near 1, other weights
    N(0, std), so that logits differ visibly between right and wrong mappings."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                tie_word_embeddings=False)
    conf.update(config)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**conf)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape))
            else:
                p.normal_(0, std)
    return model
