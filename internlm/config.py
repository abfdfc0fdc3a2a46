"""Config files: load, apply overrides, fill defaults, validate, dump.

A config is an InternEvo-style Python module (or a YAML file with the same keys). Top-level names in
UPPER_CASE are the user's own variables (SEQ_LEN, HIDDEN_SIZE, ...) and are kept as they are; every
lower-case name must be a known section or key, and every key inside a section must be known, so a typo
fails at load time with a message naming the key and the closest valid one instead of being silently
ignored. The result of `load_config` is fully resolved: every key is present with its default, shorthands
are normalised (`parallel.tensor=2` -> `dict(size=2, mode="mtp")`), and values derived from other keys
(`data.seq_len` from SEQ_LEN, `model.head_dim`, `model.intermediate_size`, `model.no_bias`,
`lr_scheduler.total_steps`, `monitor.run_folder`, ...) are filled in, so the rest of the code reads plain
values and `dump_yaml` records exactly what a run used.

`validate(cfg)` checks what the config alone decides; `validate(cfg, world_size)` adds the checks that
need the number of processes (tp * pp divides the world, zero1 fits the data-parallel size).
"""

from __future__ import annotations

import ast
import copy
import difflib
import math
import os
import runpy
import tempfile
import traceback
import types
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

__all__ = [
    "Config", "ConfigError", "load_config", "config_from_dict", "validate", "dump_yaml", "config_to_yaml_str",
    "torch_dtype", "canonical_dtype", "resolved_zero1_size", "derived_no_bias", "derived_head_dim",
    "derived_intermediate_size", "MODEL_TYPES",
]


class ConfigError(ValueError):
    """A config problem, worded as a complete sentence for the user (no traceback needed)."""


class Config(dict):
    """A dict whose nested dicts are Configs too, with attribute access: `cfg.model.hidden_size`."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name: str, value) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, _wrap(value))

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args, **kwargs) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def copy(self) -> "Config":
        """A deep copy (a shallow one would share the nested sections)."""
        return copy.deepcopy(self)

    def to_dict(self) -> dict:
        """Plain nested dicts and lists, e.g. for serialisation."""
        return _unwrap(self)

    def __reduce__(self):
        return (self.__class__, (dict(self),))


def _wrap(value):
    if isinstance(value, Config):
        return value
    if isinstance(value, dict):
        return Config(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    return value


def _unwrap(value):
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_unwrap(v) for v in value)
    return value


# ----------------------------------------------------------------------------------------------- dtypes

_DTYPE_ALIASES = {
    "torch.bfloat16": "torch.bfloat16", "bfloat16": "torch.bfloat16", "bf16": "torch.bfloat16",
    "torch.float16": "torch.float16", "float16": "torch.float16", "fp16": "torch.float16",
    "torch.half": "torch.float16", "half": "torch.float16",
    "torch.float32": "torch.float32", "float32": "torch.float32", "fp32": "torch.float32",
    "torch.float": "torch.float32", "float": "torch.float32",
}


def canonical_dtype(name) -> str:
    """'bf16', 'bfloat16', torch.bfloat16, ... -> 'torch.bfloat16' (the spelling kept in configs)."""
    key = str(name).strip().lower()  # str(torch.bfloat16) == "torch.bfloat16"
    if key not in _DTYPE_ALIASES:
        valid = ", ".join(repr(k) for k in ("torch.bfloat16", "torch.float16", "torch.float32", "bf16", "fp16", "fp32"))
        raise ConfigError(f"unknown dtype {name!r}; use one of {valid}.")
    return _DTYPE_ALIASES[key]


def torch_dtype(name):
    """Map a dtype name from a config to a torch.dtype."""
    import torch  # imported here so that reading a config stays fast

    return getattr(torch, canonical_dtype(name).split(".", 1)[1])


# ----------------------------------------------------------------------------------------------- schema

_REQUIRED = object()  # no default: the user must set it
_DERIVED = object()  # default computed from other keys after every section is read
_ABSENT = object()  # an InternEvo key accepted when given but without effect here, so not filled in


class _Field:
    """One config key: its kind, default and range. `check` may normalise or reject the value."""

    def __init__(self, kind: str, default: Any = None, *, optional: bool = False, choices: Iterable[str] = (),
                 ge=None, gt=None, le=None, lt=None, check: Callable[[str, Any], Any] | None = None):
        self.kind, self.default, self.optional = kind, default, optional
        self.choices = tuple(choices)
        self.ge, self.gt, self.le, self.lt, self.check = ge, gt, le, lt, check


class _Section:
    """A dict of known keys. `shorthand` names the key that a bare value fills (`tensor=2` -> size=2)."""

    def __init__(self, fields: dict, shorthand: str | None = None):
        self.fields, self.shorthand = fields, shorthand


def _f(kind, default=None, **kw):
    return _Field(kind, default, **kw)


def _opt(kind, default=None, **kw):
    return _Field(kind, default, optional=True, **kw)


def _accepted(kind="any"):
    """A key some InternEvo configs set that has no effect here: allowed, type-checked, not filled in."""
    return _Field(kind, _ABSENT, optional=True)


_KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string",
               "dict": "a dict", "list": "a list"}


def _show(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _check_value(path: str, field: _Field, value):
    if value is None:
        if field.optional or field.kind == "any":
            return None if field.check is None else field.check(path, None)
        raise ConfigError(f"config key '{path}' must not be None; it must be {_KIND_WORDS[field.kind]}.")
    kind = field.kind
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{path}' must be an integer, got {_show(value)}.")
    elif kind == "float":
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{path}' must be a number, got {_show(value)}.")
        value = float(value)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{path}' must be True or False, got {_show(value)}.")
    elif kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"config key '{path}' must be a string, got {_show(value)}.")
    elif kind == "dict":
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' must be a dict, got {_show(value)}.")
        value = dict(value)
    if field.choices:
        by_lower = {c.lower(): c for c in field.choices}
        if not isinstance(value, str) or value.lower() not in by_lower:
            valid = ", ".join(repr(c) for c in field.choices)
            raise ConfigError(f"config key '{path}' must be one of {valid}, got {value!r}.")
        value = by_lower[value.lower()]
    for bound, ok, word in ((field.ge, lambda v, b: v >= b, ">="), (field.gt, lambda v, b: v > b, ">"),
                            (field.le, lambda v, b: v <= b, "<="), (field.lt, lambda v, b: v < b, "<")):
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"config key '{path}' must be {word} {bound}, got {value!r}.")
    if field.check is not None:
        value = field.check(path, value)
    return value


# Checks for keys whose rule is more than a kind and a range.

def _bool_or_fraction(path, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and 0.0 <= value <= 1.0:
        return float(value)
    raise ConfigError(f"config key '{path}' must be True, False or a fraction of layers in [0, 1], got {value!r}.")


def _dtype_name(path, value):
    try:
        return canonical_dtype(value)
    except ConfigError as exc:
        raise ConfigError(f"config key '{path}' has an {str(exc)[0].lower()}{str(exc)[1:]}") from None


def _dtype_field():
    return _Field("any", "torch.bfloat16", check=_dtype_name)


def _must_be_false(what):
    def check(path, value):
        if value:
            raise ConfigError(f"config key '{path}'={value!r} is not supported: {what}.")
        return value
    return check


def _empty_string(path, value):
    if value is None:
        return ""
    if str(value).strip():
        raise ConfigError(f"config key '{path}'={value!r} is not supported: batch-size ramp-up is not "
                          f"implemented; leave it as \"\".")
    return ""


def _rope_scaling(path, value):
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{path}' must be None or dict(type=\"dynamic\", factor=...), "
                          f"got {_show(value)}.")
    value = dict(value)
    if "rope_type" in value and "type" not in value:  # Hugging Face spelling
        value["type"] = value.pop("rope_type")
    unknown = sorted(set(value) - {"type", "factor"})
    if unknown:
        raise ConfigError(f"config key '{path}' has unknown entry {unknown[0]!r}; it takes 'type' and 'factor'.")
    if value.get("type") != "dynamic":
        raise ConfigError(f"config key '{path}.type' must be 'dynamic' (dynamic NTK scaling), "
                          f"got {value.get('type')!r}.")
    factor = value.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1.0:
        raise ConfigError(f"config key '{path}.factor' must be a number >= 1.0, got {factor!r}.")
    return {"type": "dynamic", "factor": float(factor)}


_OBJECT_STORE_PREFIXES = ("boto3:", "oss:", "s3:", "volc:")


def _local_path(path, value):
    """Accept a plain path or InternEvo's 'local:' prefix (which is dropped); refuse object stores."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"config key '{path}' must be a path string or None, got {_show(value)}.")
    if value.lower().startswith(_OBJECT_STORE_PREFIXES):
        raise ConfigError(f"config key '{path}'={value!r}: object-store checkpoints are not supported yet; "
                          f"use a local path.")
    if value.startswith("local:"):
        value = value[len("local:"):]
    return value


_CKPT_CONTENT = ("model", "optimizer", "scheduler", "sampler", "all")
_CKPT_TYPES = {"internlm": "internlm", "internevo": "internlm", "hf": "hf"}


def _load_ckpt_info(path, value):
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{path}' must be None or dict(path=..., content=(...), ckpt_type=...), "
                          f"got {_show(value)}.")
    unknown = sorted(set(value) - {"path", "content", "ckpt_type"})
    if unknown:
        suggestion = _closest(unknown[0], ["path", "content", "ckpt_type"])
        raise ConfigError(f"unknown config key '{path}.{unknown[0]}'{_did_you_mean(suggestion, path)}")
    if not value.get("path"):
        raise ConfigError(f"config key '{path}.path' must name the checkpoint to load.")
    ckpt_path = _local_path(f"{path}.path", value["path"])
    content = value.get("content", ("model",))
    if isinstance(content, str):
        content = [content]
    if not isinstance(content, (list, tuple)) or not content:
        valid = ", ".join(map(repr, _CKPT_CONTENT))
        raise ConfigError(f"config key '{path}.content' must be a non-empty list of {valid}, got {content!r}.")
    for item in content:
        if item not in _CKPT_CONTENT:
            raise ConfigError(f"config key '{path}.content' has {item!r}; the valid entries are "
                              f"{', '.join(map(repr, _CKPT_CONTENT))}.")
    ckpt_type = str(value.get("ckpt_type", "internlm"))
    if ckpt_type.lower() not in _CKPT_TYPES:
        raise ConfigError(f"config key '{path}.ckpt_type' must be 'internlm' (this framework's checkpoints) or "
                          f"'hf' (a Hugging Face model folder), got {ckpt_type!r}.")
    return {"path": ckpt_path, "content": list(content), "ckpt_type": _CKPT_TYPES[ckpt_type.lower()]}


def _tensor_mode(path, value):
    value = value.lower()
    if value == "fsp":
        raise ConfigError(f"{path}='fsp' is not supported: use 'msp' (TP with sequence parallel), "
                          f"which shards the same activations.")
    if value == "isp":
        raise ConfigError(f"{path}='isp' (InternEvo's intern sequence parallel) is not supported: use "
                          f"parallel.zero1.fsdp=True with parallel.tensor.mode='msp' instead.")
    if value not in ("mtp", "msp"):
        raise ConfigError(f"config key '{path}' must be 'mtp' (tensor parallel) or 'msp' (tensor + sequence "
                          f"parallel), got {value!r}.")
    return value


def _weight_size(path, value):
    if value != 1:
        raise ConfigError(f"{path}={value}: weight parallel (wp) is not supported; use parallel.zero1 with fsdp=True.")
    return value


def _zero1_size(path, value):
    if value < -1:
        raise ConfigError(f"config key '{path}' must be -1 or 0 (shard over all data-parallel ranks) or a "
                          f"positive group size, got {value}.")
    return value


MODEL_TYPES = ("INTERNLM", "INTERNLM2_PUBLIC", "INTERNLM3", "LLAMA2")
_MODEL_TYPE_ALIASES = {t.lower(): t for t in MODEL_TYPES} | {"internlm2": "INTERNLM2_PUBLIC"}


def _model_type(path, value):
    if isinstance(value, str) and value.lower() in _MODEL_TYPE_ALIASES:
        return _MODEL_TYPE_ALIASES[value.lower()]
    valid = ", ".join(repr(t) for t in MODEL_TYPES)
    raise ConfigError(f"config key '{path}' must be one of {valid}, got {value!r}.")


_MODEL = _Section({
    "checkpoint": _Field("any", False, check=_bool_or_fraction),
    "num_attention_heads": _f("int", _REQUIRED, ge=1),
    "num_kv_attention_heads": _f("int", _DERIVED, ge=1),
    "head_dim": _opt("int", _DERIVED, ge=1),
    "embed_split_hidden": _f("bool", True),
    "vocab_size": _f("int", _REQUIRED, ge=1),
    "embed_grad_scale": _f("float", 1.0, gt=0),
    "parallel_output": _f("bool", True),
    "hidden_size": _f("int", _REQUIRED, ge=1),
    "num_layers": _f("int", _REQUIRED, ge=1),
    "mlp_ratio": _f("float", 8 / 3, gt=0),
    "multiple_of": _f("int", 256, ge=1),
    "intermediate_size": _opt("int", _DERIVED, ge=1),
    "apply_post_layer_norm": _f("bool", False, check=_must_be_false("only pre-norm transformers are implemented")),
    "no_bias": _opt("bool", _DERIVED),
    "dtype": _dtype_field(),
    "norm_type": _f("str", "rmsnorm", choices=("rmsnorm",)),
    "layer_norm_epsilon": _f("float", 1e-5, gt=0),
    "use_flash_attn": _f("bool", True),
    "num_chunks": _f("int", 1, ge=1),
    "rope_base": _f("float", 10000.0, gt=0),
    "rope_scaling": _Field("any", None, check=_rope_scaling),
    "max_position_embeddings": _f("int", _DERIVED, ge=1),
    "tie_word_embeddings": _f("bool", False),
    "init_std": _f("float", 0.02, gt=0),
    "mlp_layer_fusion": _f("bool", False),  # accepted for InternEvo configs; no effect
    "qk_interleaved": _f("bool", False),  # accepted for InternEvo configs; no effect
    "enable_qkv_fusion": _accepted("bool"),
    "checkpoint_policy": _f("str", "full", choices=("full", "selective")),
    "compile": _f("bool", False),
    "attn_backend": _f("str", "auto", choices=("auto", "flash", "varlen", "sdpa", "sdpa_mask", "sdpa_loop")),
    "attn_compute": _f("str", "auto", choices=("auto", "input", "float32")),
    "cpu_matmul": _f("str", "native", choices=("native", "fp32")),
})

_DATA = _Section({
    "seq_len": _f("int", _DERIVED, ge=1),
    "micro_num": _f("int", 4, ge=1),
    "micro_bsz": _f("int", 1, ge=1),
    "valid_micro_num": _f("int", 4, ge=1),
    "valid_every": _f("int", 0, ge=0),
    "pack_sample_into_one": _f("bool", False),
    "total_steps": _f("int", 1000, ge=1),
    "skip_batches": _opt("str", ""),  # accepted; no effect
    "rampup_batch_size": _Field("any", "", check=_empty_string),
    "min_length": _f("int", 0, ge=0),
    "train_folder": _opt("str", None),
    "valid_folder": _opt("str", None),
    "tokenizer_path": _opt("str", None),
    "empty_cache_and_diag_interval": _opt("int", None),  # accepted; no effect
    "diag_outlier_ratio": _opt("float", None),  # accepted; no effect
    "num_worker": _f("int", 0, ge=0),
    "fixed_random_dataset_seqlen": _f("bool", True),
    "dummy_num_samples": _f("int", 10000, ge=1),
    "shuffle": _f("bool", True),
})

_GRAD_SCALER = _Section({
    "fp16": _Section({
        "initial_scale": _f("float", float(2**16), gt=0),
        "min_scale": _f("float", 1.0, gt=0),
        "growth_interval": _f("int", 1000, ge=1),
    }),
    "growth_factor": _f("float", 2.0, gt=1),
    "backoff_factor": _f("float", 0.5, gt=0, lt=1),
    "max_scale": _f("float", float(2**24), gt=0),
    "hysteresis": _f("int", 2, ge=1),
})

_HYBRID_ZERO = _Section({
    "overlap_sync_grad": _f("bool", True),
    "overlap_sync_param": _f("bool", False),
    "reduce_bucket_size": _f("int", 512 * 1024 * 1024, ge=1),
    "clip_grad_norm": _opt("float", 1.0, ge=0),
})

_LOSS = _Section({
    "label_smoothing": _f("float", 0.0, ge=0, lt=1),
    "op_type": _accepted("str"),  # InternEvo's loss kernel name; ours is `kernel`
    "kernel": _f("str", "auto", choices=("auto", "chunked", "torch")),
})

_ADAM = _Section({
    "lr": _f("float", 1e-4, gt=0),
    "adam_beta1": _f("float", 0.9, ge=0, lt=1),
    "adam_beta2": _f("float", 0.95, ge=0, lt=1),
    "adam_beta2_c": _f("float", 0.0, ge=0),
    "adam_eps": _f("float", 1e-8, gt=0),
    "weight_decay": _f("float", 0.01, ge=0),
    "impl": _f("str", "auto", choices=("auto", "fused", "foreach", "apex")),
})

_LR_SCHEDULER = _Section({
    "total_steps": _f("int", _DERIVED, ge=1),
    "init_steps": _f("int", 0, ge=0),
    "warmup_ratio": _f("float", 0.01, ge=0, le=1),
    "eta_min": _f("float", 1e-5, ge=0),
    "last_epoch": _f("int", -1, ge=-1),
})

_BETA2_SCHEDULER = _Section({
    "init_beta2": _f("float", _DERIVED, ge=0, lt=1),
    "c": _f("float", _DERIVED, ge=0),
    "cur_iter": _f("int", -1, ge=-1),
})

_PARALLEL = _Section({
    "zero1": _Section({"size": _f("int", -1, check=_zero1_size), "fsdp": _f("bool", False)}, shorthand="size"),
    "tensor": _Section({"size": _f("int", 1, ge=1), "mode": _f("str", "mtp", check=_tensor_mode)}, shorthand="size"),
    "pipeline": _Section({
        "size": _f("int", 1, ge=1),
        "interleaved_overlap": _f("bool", True),
        "mode": _f("str", "1f1b", choices=("1f1b", "zbh1", "zbv", "gpipe")),
    }, shorthand="size"),
    "weight": _Section({
        "size": _f("int", 1, check=_weight_size),
        "overlap": _f("bool", True),
        "memory_pool": _f("bool", True),
        "launch_allgather_before": _accepted(),  # weight parallel is always size 1
        "forward_overlap_per": _accepted(),
    }, shorthand="size"),
    "sequence_parallel": _f("bool", False),
    "expert": _f("dict", {}),  # accepted; no MoE models here
    "collective_timeout_s": _f("int", 1800, ge=1),
})

_CKPT = _Section({
    "enable_save_ckpt": _f("bool", False),
    "save_ckpt_folder": _Field("any", None, check=_local_path),
    "checkpoint_every": _f("int", 50, ge=1),
    "auto_resume": _f("bool", True),
    "load_ckpt_info": _Field("any", None, check=_load_ckpt_info),
    "load_ckpt_folder": _Field("any", None),  # legacy InternEvo key; accepted, use load_ckpt_info
    "load_given_ckpt": _Field("any", False),  # legacy InternEvo key; accepted
    "oss_snapshot_freq": _f("int", 0, ge=0),
    "async_upload": _f("bool", False),
    "async_upload_tmp_folder": _opt("str", None),  # accepted; no effect
    "stop_file_path": _opt("str", None),
    "keep_last": _f("int", 0, ge=0),
})

_MONITOR = _Section({
    "run_folder": _opt("str", _DERIVED),
    "alert": _f("dict", {}),
    "tensorboard": _f("dict", {"queue_max_length": 10}),
    "log_every": _f("int", 1, ge=1),
    "peak_tflops": _opt("float", None, gt=0),
})

# Top level, in the order a resolved config is written out (after the user's UPPER_CASE variables).
_TOP = _Section({
    "JOB_NAME": _f("str", "internlm"),
    "model_type": _Field("str", "INTERNLM2_PUBLIC", check=_model_type),
    "model": _MODEL,
    "data": _DATA,
    "grad_scaler": _GRAD_SCALER,
    "hybrid_zero_optimizer": _HYBRID_ZERO,
    "loss": _LOSS,
    "adam": _ADAM,
    "lr_scheduler": _LR_SCHEDULER,
    "beta2_scheduler": _BETA2_SCHEDULER,
    "parallel": _PARALLEL,
    "ckpt": _CKPT,
    "monitor": _MONITOR,
    "cudnn_deterministic": _f("bool", False),
    "cudnn_benchmark": _f("bool", False),
    "cpu_malloc_tuning": _f("bool", True),
    "seed": _f("int", 1024, ge=0),
    "device": _f("str", "auto", choices=("auto", "cpu", "cuda")),
    "use_fp32_norm": _accepted("bool"),  # norms always compute in fp32
    "generation": _accepted("dict"),  # InternEvo's inference settings; no effect on training
})


def _is_user_variable(name: str) -> bool:
    """UPPER_CASE top-level names are the user's own variables (SEQ_LEN, HIDDEN_SIZE, ...)."""
    return name not in _TOP.fields and name.upper() == name and any(c.isalpha() for c in name)


def _closest(name: str, candidates: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _did_you_mean(suggestion: str | None, prefix: str, candidates: Iterable[str] = ()) -> str:
    if suggestion:
        return f"; did you mean '{prefix + '.' if prefix else ''}{suggestion}'?"
    names = sorted(candidates)
    if names:
        where = f"'{prefix}'" if prefix else "the top level"
        return f"; the valid keys of {where} are {', '.join(names)}."
    return "."


def _unknown_key(prefix: str, key, section: _Section, context: str = "") -> ConfigError:
    path = f"{prefix}.{key}" if prefix else str(key)
    suggestion = _closest(str(key), section.fields)
    hint = _did_you_mean(suggestion, prefix, section.fields)
    if not prefix and not suggestion:
        homes = [name for name, sub in section.fields.items() if isinstance(sub, _Section) and key in sub.fields]
        if homes:  # e.g. a top-level `seq_len` that belongs in `data`
            hint = f"; did you mean '{homes[0]}.{key}'?"
        else:
            hint = hint[:-1] + " (names in UPPER_CASE are free user variables)."
    return ConfigError(f"unknown config key '{path}'{context}{hint}")


# -------------------------------------------------------------------------------------------- resolving

def _normalise_shorthand(section: _Section, value):
    if section.shorthand is not None and not isinstance(value, dict) and value is not None:
        return {section.shorthand: value}
    return value


def _resolve_section(prefix: str, section: _Section, raw) -> dict:
    raw = _normalise_shorthand(section, raw)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix}' must be a dict, got {_show(raw)}.")
    for key in raw:
        if key not in section.fields:
            raise _unknown_key(prefix, key, section)
    out = {}
    for key, field in section.fields.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(field, _Section):
            out[key] = _resolve_section(path, field, raw.get(key))
        elif key in raw and not (raw[key] is None and field.default is _DERIVED):
            out[key] = _check_value(path, field, raw[key])
        elif field.default is _ABSENT:
            continue
        elif field.default is _REQUIRED:
            raise ConfigError(f"missing required config key '{path}'.")
        elif field.default is _DERIVED:
            out[key] = _DERIVED  # filled by _fill_derived
        else:
            out[key] = copy.deepcopy(field.default)
    return out


def _fill_derived(cfg: dict, user_vars: dict) -> None:
    model, data = cfg["model"], cfg["data"]
    if data["seq_len"] is _DERIVED:
        seq_len = user_vars.get("SEQ_LEN", 2048)
        data["seq_len"] = _check_value("SEQ_LEN", _Field("int", ge=1), seq_len)
    if model["num_kv_attention_heads"] is _DERIVED:
        model["num_kv_attention_heads"] = model["num_attention_heads"]
    if model["max_position_embeddings"] is _DERIVED:
        model["max_position_embeddings"] = max(2048, data["seq_len"])
    if model["head_dim"] is _DERIVED:
        _check_heads_divide_hidden(model)
        model["head_dim"] = derived_head_dim(cfg)
    if model["intermediate_size"] is _DERIVED:
        model["intermediate_size"] = derived_intermediate_size(cfg)
    if model["no_bias"] is _DERIVED:
        model["no_bias"] = derived_no_bias(cfg)
    if cfg["lr_scheduler"]["total_steps"] is _DERIVED:
        cfg["lr_scheduler"]["total_steps"] = data["total_steps"]
    beta2 = cfg["beta2_scheduler"]
    if beta2["init_beta2"] is _DERIVED:
        beta2["init_beta2"] = cfg["adam"]["adam_beta2"]
    if beta2["c"] is _DERIVED:
        beta2["c"] = cfg["adam"]["adam_beta2_c"]
    if cfg["monitor"]["run_folder"] is _DERIVED:
        cfg["monitor"]["run_folder"] = os.path.join("runs", cfg["JOB_NAME"])
    # sequence_parallel=True on plain TP means Megatron TP+SP; keep the two spellings in step.
    par = cfg["parallel"]
    if par["sequence_parallel"] and par["tensor"]["mode"] == "mtp":
        par["tensor"]["mode"] = "msp"
    par["sequence_parallel"] = par["tensor"]["mode"] == "msp"


def _lists_not_tuples(value):
    if isinstance(value, dict):
        return {k: _lists_not_tuples(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists_not_tuples(v) for v in value]
    return value


def _resolve(raw: dict) -> Config:
    """Raw top-level names -> a complete Config with defaults and normalised values (no cross-key checks)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of names to values, got {_show(raw)}.")
    user_vars = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"config keys must be strings, got {key!r}.")
        if _is_user_variable(key):
            user_vars[key] = value
        elif key not in _TOP.fields:
            raise _unknown_key("", key, _TOP)
    if "SEQ_LEN" in user_vars:
        _check_value("SEQ_LEN", _Field("int", ge=1), user_vars["SEQ_LEN"])
    resolved = _resolve_section("", _TOP, {k: v for k, v in raw.items() if k not in user_vars})
    _fill_derived(resolved, user_vars)
    return Config(_lists_not_tuples({**user_vars, **resolved}))


def _check_heads_divide_hidden(model: dict) -> None:
    h, n = model["hidden_size"], model["num_attention_heads"]
    if h % n:
        raise ConfigError(f"model.hidden_size={h} is not divisible by model.num_attention_heads={n}; change one "
                          f"of them or set model.head_dim explicitly.")


# ----------------------------------------------------------------------------------------- derived values

def _model_type_of(cfg) -> str:
    return _model_type("model_type", cfg.get("model_type") or "INTERNLM2_PUBLIC")


def derived_no_bias(cfg) -> bool:
    """model.no_bias, or when unset: InternLM (v1) has q/k/v and output-projection biases, the others none."""
    value = cfg["model"].get("no_bias")
    if value is not None and value is not _DERIVED:
        return bool(value)
    return _model_type_of(cfg) != "INTERNLM"


def derived_head_dim(cfg) -> int:
    value = cfg["model"].get("head_dim")
    if value is not None and value is not _DERIVED:
        return int(value)
    return cfg["model"]["hidden_size"] // cfg["model"]["num_attention_heads"]


def derived_intermediate_size(cfg) -> int:
    """model.intermediate_size, or InternEvo's SwiGLU width: int(hidden * mlp_ratio) rounded up to multiple_of."""
    model = cfg["model"]
    value = model.get("intermediate_size")
    if value is not None and value is not _DERIVED:
        return int(value)
    multiple_of = model.get("multiple_of", 256)
    width = int(model["hidden_size"] * model.get("mlp_ratio", 8 / 3))
    return multiple_of * math.ceil(width / multiple_of)


def resolved_zero1_size(cfg, dp: int) -> int:
    """Ranks that shard params/grads/optimizer state: -1 or 0 -> all of dp; a size above dp is capped at dp."""
    size = cfg["parallel"]["zero1"]["size"]
    if size <= 0 or size > dp:
        return dp
    return size


# ------------------------------------------------------------------------------------------- validation

def validate(cfg, world_size: int | None = None) -> None:
    """Raise ConfigError for anything wrong in `cfg`; with `world_size`, also check the parallel layout."""
    full = _resolve(_unwrap(cfg))  # per-key checks; also makes a hand-edited config safe to check
    model, data, par = full.model, full.data, full.parallel

    if model.head_dim % 2:
        raise ConfigError(f"model.head_dim={model.head_dim} must be even for rotary position embeddings.")
    heads, kv = model.num_attention_heads, model.num_kv_attention_heads
    if heads % kv:
        raise ConfigError(f"model.num_attention_heads={heads} is not divisible by model.num_kv_attention_heads={kv}.")
    if full.model_type == "INTERNLM" and kv != heads:
        raise ConfigError(f"model_type 'INTERNLM' has no grouped-query attention: model.num_kv_attention_heads={kv} "
                          f"must equal model.num_attention_heads={heads}.")
    if data.seq_len > model.max_position_embeddings:
        raise ConfigError(f"data.seq_len={data.seq_len} is larger than model.max_position_embeddings="
                          f"{model.max_position_embeddings}; raise model.max_position_embeddings or shorten the "
                          f"sequences.")
    for key in ("train_folder", "valid_folder"):
        folder = data[key]
        if folder is not None and not os.path.isdir(folder):
            raise ConfigError(f"data.{key}={folder!r} is not an existing directory (looked in {os.getcwd()!r}); "
                              f"fix the path, or set data.{key}=None"
                              f"{' to train on dummy data' if key == 'train_folder' else ' to skip validation'}.")
    if full.ckpt.enable_save_ckpt and not full.ckpt.save_ckpt_folder:
        raise ConfigError("ckpt.enable_save_ckpt=True needs ckpt.save_ckpt_folder to name a folder.")

    tp, pp, chunks = par.tensor.size, par.pipeline.size, model.num_chunks
    for name, value in (("model.num_attention_heads", heads), ("model.num_kv_attention_heads", kv)):
        if value % tp:
            raise ConfigError(f"{name}={value} is not divisible by parallel.tensor.size={tp}.")
    if model.vocab_size % tp:
        padded = math.ceil(model.vocab_size / tp) * tp
        raise ConfigError(f"model.vocab_size={model.vocab_size} is not divisible by parallel.tensor.size={tp}; pad "
                          f"the vocabulary to a multiple of {tp} (e.g. model.vocab_size={padded}).")
    if chunks > 1 and pp == 1:
        raise ConfigError(f"model.num_chunks={chunks} needs pipeline parallelism (parallel.pipeline.size > 1); "
                          f"set model.num_chunks=1.")
    if pp > 1:
        if model.num_layers % (pp * chunks):
            raise ConfigError(f"model.num_layers={model.num_layers} is not divisible by parallel.pipeline.size({pp}) "
                              f"* model.num_chunks({chunks}).")
        if par.pipeline.mode == "zbv" and chunks != 2:
            raise ConfigError(f"parallel.pipeline.mode='zbv' runs two stages per rank: set model.num_chunks=2 "
                              f"(got {chunks}).")

    if world_size is None:
        return
    if world_size < 1 or world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor.size({tp}) * "
                          f"parallel.pipeline.size({pp}).")
    dp = world_size // (tp * pp)
    zero1 = par.zero1.size
    if 0 < zero1 <= dp and dp % zero1:
        raise ConfigError(f"parallel.zero1.size={zero1} does not divide the data-parallel size {dp} (world size "
                          f"{world_size} / (tensor {tp} * pipeline {pp})); use a divisor of {dp}, or -1 to shard "
                          f"over all data-parallel ranks.")


# -------------------------------------------------------------------------------------------- overrides

def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    return text


def _apply_override(raw: dict, override: str) -> None:
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(f"override {override!r} must look like dotted.key=VALUE (e.g. model.num_layers=4).")
    dotted, text = override.split("=", 1)
    parts = [part.strip() for part in dotted.split(".")]
    if not all(parts):
        raise ConfigError(f"override {override!r} has an empty key; it must look like dotted.key=VALUE.")
    value = _parse_value(text)

    node, section = raw, _TOP
    for depth, key in enumerate(parts):
        last = depth == len(parts) - 1
        path = ".".join(parts[: depth + 1])
        prefix = ".".join(parts[:depth])
        field = None  # stays None below a user variable or inside a free-form dict
        if section is not None:
            if depth == 0 and _is_user_variable(key):
                section = None  # a user variable: anything goes below it
            elif key not in section.fields:
                raise _unknown_key(prefix, key, section, context=f" in override {override!r}")
            else:
                field = section.fields[key]
        if last:
            if isinstance(field, _Field) and field.kind == "str" and value is not None and not isinstance(value, str):
                value = text.strip()  # JOB_NAME=2024 means the string "2024"
            node[key] = value
            return
        child = node.get(key)
        if isinstance(field, _Section):
            child = _normalise_shorthand(field, child)
            section = field
        elif section is None or (isinstance(field, _Field) and field.kind in ("dict", "any")):
            section = None  # a free-form dict (monitor.alert, model.rope_scaling, ...)
        else:
            raise ConfigError(f"override {override!r}: config key '{path}' is a single value, not a section.")
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: config key '{path}' holds {_show(child)}, not a dict.")
        child = dict(child)
        node[key] = child
        node = child


# ------------------------------------------------------------------------------------------------ files

def _exec_python(path: Path) -> dict:
    try:
        namespace = runpy.run_path(str(path), run_name="__internlm_config__")
    except SyntaxError as exc:
        raise ConfigError(f"syntax error in config file {path} at line {exc.lineno}: {exc.msg}.") from None
    except Exception as exc:  # trusted user code; report where it failed, not a traceback
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path.resolve()]
        where = f" at line {frames[-1].lineno}" if frames else ""
        raise ConfigError(f"config file {path} failed{where}: {type(exc).__name__}: {exc}.") from None
    return {
        name: value for name, value in namespace.items()
        if not name.startswith("_")
        and not isinstance(value, (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type))
    }


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"YAML error in config file {path}{where}: {problem}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of names to values, got {_show(data)}.")
    return data


def _read_raw(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".py":
        return _exec_python(path)
    if suffix in (".yaml", ".yml"):
        return _read_yaml(path)
    raise ConfigError(f"config file {str(path)!r} must be a .py, .yaml or .yml file.")


def config_from_dict(raw: dict, overrides: Iterable[str] = ()) -> Config:
    """Like load_config, for a config given as a dict (tests, tools)."""
    raw = copy.deepcopy(_unwrap(raw))
    if isinstance(overrides, str):
        overrides = [overrides]
    for override in overrides:
        _apply_override(raw, override)
    cfg = _resolve(raw)
    validate(cfg)
    return cfg


def load_config(path, overrides: Iterable[str] = ()) -> Config:
    """Read a .py or .yaml config, apply `dotted.key=VALUE` overrides, fill defaults and validate.

    Overrides act on the file's values, before defaults are derived, so `data.seq_len=512` changes the
    default of model.max_position_embeddings too. Overriding an UPPER_CASE variable (SEQ_LEN=...) only
    changes keys that default to it; keys the file already computed from it keep their value.
    """
    return config_from_dict(_read_raw(path), overrides)


# --------------------------------------------------------------------------------------------- dumping

def _yaml_ready(value):
    if isinstance(value, dict):
        return {str(k): _yaml_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yaml_ready(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # e.g. a torch.dtype held by a user variable


def config_to_yaml_str(cfg) -> str:
    return yaml.safe_dump(_yaml_ready(_unwrap(cfg)), sort_keys=False, default_flow_style=False, width=120)


def dump_yaml(cfg, path) -> None:
    """Write the config as YAML atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = config_to_yaml_str(cfg)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
