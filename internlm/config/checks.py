"""Per-key value checks of the config schema: kinds, ranges, choices and the rules of single keys.

Each check takes the dotted path (for the message) and the value, and returns the value normalised
(`"bf16"` -> `"torch.bfloat16"`, `tensor=2` -> ...) or raises ConfigError worded for the user.
"""
from __future__ import annotations

import math
import re
from typing import Any

from internlm.errors import UserError
from internlm.model.shape import MODEL_TYPES


class ConfigError(UserError, ValueError):
    """A config problem, worded as a complete sentence for the user (no traceback needed)."""


KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string",
              "dict": "a dict", "list": "a list", "any": "a value"}


def show(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_kind(path: str, kind: str, value, optional: bool = False):
    """`value` as `kind` ("int", "float", "bool", "str", "dict", "any"); None only when optional."""
    if value is None:
        if optional or kind == "any":
            return None
        raise ConfigError(f"config key '{path}' must not be None; it must be {KIND_WORDS[kind]}.")
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{path}' must be an integer, got {show(value)}.")
    elif kind == "float":
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{path}' must be a number, got {show(value)}.")
        value = float(value)
        if not math.isfinite(value):  # 1e309 reads as inf: a run with it trains NaN
            raise ConfigError(f"config key '{path}' must be a finite number, got {value!r}.")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{path}' must be True or False, got {show(value)}.")
    elif kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"config key '{path}' must be a string, got {show(value)}.")
    elif kind == "dict":
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' must be a dict, got {show(value)}.")
        value = dict(value)
    return value


def check_bounds(path: str, value, *, choices=(), ge=None, gt=None, le=None, lt=None):
    if value is None:
        return value
    if choices:
        by_lower = {c.lower(): c for c in choices}
        if not isinstance(value, str) or value.lower() not in by_lower:
            valid = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"config key '{path}' must be one of {valid}, got {value!r}.")
        value = by_lower[value.lower()]
    for bound, ok, word in ((ge, lambda v, b: v >= b, ">="), (gt, lambda v, b: v > b, ">"),
                            (le, lambda v, b: v <= b, "<="), (lt, lambda v, b: v < b, "<")):
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"config key '{path}' must be {word} {bound}, got {value!r}.")
    return value


# ---- dtypes ---------------------------------------------------------------------------------------

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


def dtype_name(path, value):
    try:
        return canonical_dtype(value)
    except ConfigError as exc:
        raise ConfigError(f"config key '{path}' has an {str(exc)[0].lower()}{str(exc)[1:]}") from None


# ---- rules of single keys ------------------------------------------------------------------------

def bool_or_fraction(path, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and 0.0 <= value <= 1.0:
        return float(value)
    raise ConfigError(f"config key '{path}' must be True, False or a fraction of layers in [0, 1], got {value!r}.")


def must_be_false(what):
    def check(path, value):
        if value:
            raise ConfigError(f"config key '{path}'={value!r} is not supported: {what}.")
        return value
    return check


def must_be_none(what):
    def check(path, value):
        if value is not None and value != "None":
            raise ConfigError(f"config key '{path}'={value!r} is not supported: {what}.")
        return None
    return check


def empty_string(path, value):
    if value is None:
        return ""
    if str(value).strip():
        raise ConfigError(f"config key '{path}'={value!r} is not supported: batch-size ramp-up is not "
                          f"implemented; leave it as \"\".")
    return ""


def rope_scaling(path, value):
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{path}' must be None or dict(type=\"dynamic\", factor=...), "
                          f"got {show(value)}.")
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


# InternEvo's storage prefixes for object stores (boto3/volc: S3 APIs, oss2: Aliyun OSS) and the URL
# schemes of other remote stores: none is a folder on this machine
_OBJECT_STORE_PREFIXES = ("boto3:", "oss2:", "oss:", "volc:", "s3:", "s3a:", "gs:", "hdfs:", "http:", "https:")


def local_path(path, value):
    """A plain path, or InternEvo's 'local:' prefix (dropped). An object-store path is refused here, at
    load time: written as a local path it would become a folder named 'oss2:...' in the working directory."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"config key '{path}' must be a path string or None, got {show(value)}.")
    lowered = value.strip().lower()
    store = next((p for p in _OBJECT_STORE_PREFIXES if lowered.startswith(p)), None)
    url = re.match(r"[a-z][a-z0-9+.-]*://", lowered)
    if store is None and url:
        store = url.group(0)
    if store is not None:
        raise ConfigError(f"config key '{path}'={value!r} names remote storage ({store}), which this trainer does "
                          f"not read or write; use a local or shared-filesystem path (optionally 'local:/path').")
    if value.startswith("local:"):
        value = value[len("local:"):]
    return value


def http_url(path, value):
    """A webhook address: an http(s) URL, or None."""
    if value is None:
        return None
    if not re.match(r"https?://[^/\s]+", value.strip()):
        raise ConfigError(f"config key '{path}' must be an http:// or https:// URL (a Feishu bot webhook), "
                          f"got {value!r}.")
    return value.strip()


CKPT_CONTENT = ("model", "optimizer", "scheduler", "sampler", "all")
# ckpt_type as written -> what it loads: "internlm" (this trainer's checkpoints; "internevo" is InternEvo's
# name of the same role), "hf" (a Hugging Face folder; "hf_llama" is InternEvo's name of it), "llama"
# (Meta's consolidated.NN.pth shards with params.json)
_CKPT_TYPES = {"internlm": "internlm", "internevo": "internlm", "hf": "hf", "hf_llama": "hf", "llama": "llama"}


def load_ckpt_info(path, value):
    """dict(path=..., content=(...), ckpt_type=...) normalised; path=None is InternEvo's "train from
    scratch" and is kept (the run loads nothing)."""
    from internlm.config.load import closest, did_you_mean

    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{path}' must be None or dict(path=..., content=(...), ckpt_type=...), "
                          f"got {show(value)}.")
    unknown = sorted(set(value) - {"path", "content", "ckpt_type"})
    if unknown:
        suggestion = closest(unknown[0], ["path", "content", "ckpt_type"])
        raise ConfigError(f"unknown config key '{path}.{unknown[0]}'{did_you_mean(suggestion, path)}")
    if "path" not in value:
        raise ConfigError(f"config key '{path}.path' must name the checkpoint to load (or be None: train from "
                          f"scratch).")
    if value["path"] is not None and (not isinstance(value["path"], str) or not value["path"].strip()):
        raise ConfigError(f"config key '{path}.path' must be a path string or None (train from scratch), "
                          f"got {show(value['path'])}.")
    ckpt_path = local_path(f"{path}.path", value["path"])
    content = value.get("content", ("model",))
    if isinstance(content, str):
        content = [content]
    if not isinstance(content, (list, tuple)) or not content:
        valid = ", ".join(map(repr, CKPT_CONTENT))
        raise ConfigError(f"config key '{path}.content' must be a non-empty list of {valid}, got {content!r}.")
    for item in content:
        if item not in CKPT_CONTENT:
            raise ConfigError(f"config key '{path}.content' has {item!r}; the valid entries are "
                              f"{', '.join(map(repr, CKPT_CONTENT))}.")
    ckpt_type = str(value.get("ckpt_type", "internlm"))
    if ckpt_type.lower() not in _CKPT_TYPES:
        raise ConfigError(f"config key '{path}.ckpt_type' must be 'internlm' or 'internevo' (a training "
                          f"checkpoint), 'hf' or 'hf_llama' (a Hugging Face model folder) or 'llama' (Meta's "
                          f"consolidated.*.pth shards), got {ckpt_type!r}.")
    ckpt_type = _CKPT_TYPES[ckpt_type.lower()]
    if ckpt_type in ("hf", "llama") and set(content) != {"model"}:
        raise ConfigError(f"config key '{path}.content' must be ('model',) with ckpt_type={value['ckpt_type']!r}: "
                          f"such a folder holds weights only, got {list(content)!r}.")
    return {"path": ckpt_path, "content": list(content), "ckpt_type": ckpt_type}


def tensor_mode(path, value):
    value = value.lower()
    if value == "fsp":
        raise ConfigError(f"{path}='fsp' is not supported: use 'msp' (TP with sequence parallel), "
                          f"which shards the same activations.")
    if value not in ("mtp", "msp", "isp"):
        raise ConfigError(f"config key '{path}' must be 'mtp' (tensor parallel), 'msp' (tensor + sequence "
                          f"parallel) or 'isp' (sequence + head parallel), got {value!r}.")
    return value


def weight_size(path, value):
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"config key '{path}' must be a positive integer, got {show(value)}.")
    return value


def zero1_size(path, value):
    if value < -1:
        raise ConfigError(f"config key '{path}' must be -1 or 0 (shard over all data-parallel ranks) or a "
                          f"positive group size, got {value}.")
    return value


_MODEL_TYPE_ALIASES = {t.lower(): t for t in MODEL_TYPES} | {"internlm2": "INTERNLM2_PUBLIC"}


def model_type(path, value: Any):
    if isinstance(value, str) and value.lower() in _MODEL_TYPE_ALIASES:
        return _MODEL_TYPE_ALIASES[value.lower()]
    valid = ", ".join(repr(t) for t in MODEL_TYPES)
    raise ConfigError(f"config key '{path}' must be one of {valid}, got {value!r}.")
