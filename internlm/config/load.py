"""Reading a config: a .py (InternEvo style) or .yaml file (files.py: reading, `read_base` / `_base_`
inheritance), dotted KEY=VALUE overrides, defaults, checks.

Top-level names in UPPER_CASE are the user's own variables (SEQ_LEN, HIDDEN_SIZE, ...) and are kept as
they are; every lower-case name must be a key of the schema (schema.py), so a typo fails at load time
with a message naming the key and the closest valid one. The result is a frozen `TrainConfig` in which
every key holds a value: shorthands are normalised (`parallel.tensor=2` -> size 2), values derived
from other keys are filled in (`fill_derived`), and `validate` has checked what the config alone
decides.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import os
from typing import Iterable

from internlm.config import checks
from internlm.config.checks import ConfigError
from internlm.config.files import read_raw
from internlm.config.schema import DERIVED, REQUIRED, KeyInfo, TrainConfig, is_section, keys_of, shorthand_of
from internlm.model.shape import default_head_dim, has_bias, swiglu_hidden_dim

# ---- key names -----------------------------------------------------------------------------------


def is_user_variable(name: str) -> bool:
    """UPPER_CASE top-level names are the user's own variables (SEQ_LEN, HIDDEN_SIZE, ...)."""
    return name not in keys_of(TrainConfig) and name.upper() == name and any(c.isalpha() for c in name)


def closest(name: str, candidates: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(suggestion: str | None, prefix: str, candidates: Iterable[str] = ()) -> str:
    if suggestion:
        return f"; did you mean '{prefix + '.' if prefix else ''}{suggestion}'?"
    names = sorted(candidates)
    if names:
        where = f"'{prefix}'" if prefix else "the top level"
        return f"; the valid keys of {where} are {', '.join(names)}."
    return "."


def unknown_key(prefix: str, name, section_cls, context: str = "") -> ConfigError:
    keys = keys_of(section_cls)
    path = f"{prefix}.{name}" if prefix else str(name)
    suggestion = closest(str(name), keys)
    hint = did_you_mean(suggestion, prefix, keys)
    if not prefix and not suggestion:
        homes = [k for k, sub in keys.items() if is_section(sub) and name in keys_of(sub)]
        if homes:  # e.g. a top-level `seq_len` that belongs in `data`
            hint = f"; did you mean '{homes[0]}.{name}'?"
        else:
            hint = hint[:-1] + " (names in UPPER_CASE are free user variables)."
    return ConfigError(f"unknown config key '{path}'{context}{hint}")


# ---- checking and building -----------------------------------------------------------------------

def check_value(path: str, info: KeyInfo, value):
    value = checks.check_kind(path, info.kind, value, optional=info.optional)
    if value is None:
        return None if info.check is None else info.check(path, None)
    value = checks.check_bounds(path, value, choices=info.choices, ge=info.ge, gt=info.gt, le=info.le, lt=info.lt)
    if info.check is not None:
        value = info.check(path, value)
    return value


def _shorthand(section_cls, value):
    name = shorthand_of(section_cls)
    if name is not None and not isinstance(value, dict) and value is not None:
        return {name: value}
    return value


def resolve_section(prefix: str, section_cls, raw, notices: list) -> dict:
    """Raw values of one section -> every key with a checked value, its default, or DERIVED."""
    raw = _shorthand(section_cls, raw)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix}' must be a dict, got {checks.show(raw)}.")
    keys = keys_of(section_cls)
    for name in raw:
        if name not in keys:
            raise unknown_key(prefix, name, section_cls)
    out = {}
    for name, entry in keys.items():
        path = f"{prefix}.{name}" if prefix else name
        if is_section(entry):
            out[name] = resolve_section(path, entry, raw.get(name), notices)
        elif name in raw and not (raw[name] is None and entry.default is DERIVED):
            out[name] = check_value(path, entry, raw[name])
            if entry.inert and not (out[name] is None and entry.default_value() is None):  # None: nothing set
                notices.append(path)
        elif entry.default is REQUIRED:
            raise ConfigError(f"missing required config key '{path}'.")
        else:
            out[name] = copy.deepcopy(entry.default_value())
    return out


def map_legacy_ckpt_keys(ckpt: dict, notes: list) -> None:
    """InternEvo's older checkpoint keys onto the current ones, as its legacy launch code reads them:
    `load_model_only_folder` -> load_ckpt_info content ("model",); `load_ckpt_folder` -> content ("model",
    "sampler", "optimizer") ("optimizer" left out with load_optimizer=False); both only when load_ckpt_info
    is not set. `load_given_ckpt=True` -> auto_resume=False, only when auto_resume is not set. The legacy
    keys are None afterwards (the resolved config, dumped and read back, gives the same run)."""
    folder, model_only = ckpt["load_ckpt_folder"], ckpt["load_model_only_folder"]
    legacy_set = [k for k in ("load_ckpt_folder", "load_model_only_folder", "load_optimizer") if ckpt[k] is not None]
    if ckpt["load_ckpt_info"] is None and (folder is not None or model_only is not None):
        if folder is not None and model_only is not None:
            raise ConfigError("config keys 'ckpt.load_ckpt_folder' and 'ckpt.load_model_only_folder' are both set; "
                              "keep one (better: replace both with ckpt.load_ckpt_info).")
        if model_only is not None:
            info = {"path": model_only, "content": ["model"], "ckpt_type": "internlm"}
        else:
            content = ["model", "sampler"] + (["optimizer"] if ckpt["load_optimizer"] is not False else [])
            info = {"path": folder, "content": content, "ckpt_type": "internlm"}
        ckpt["load_ckpt_info"] = info
        notes.append(f"ckpt.{legacy_set[0]} is deprecated (InternEvo's legacy key): read as ckpt.load_ckpt_info="
                     f"dict(path={info['path']!r}, content={tuple(info['content'])!r}, ckpt_type='internlm')")
    elif legacy_set:
        why = "ckpt.load_ckpt_info is set" if ckpt["load_ckpt_info"] is not None else "no load folder is set"
        notes.append(f"ckpt.{legacy_set[0]} is deprecated (InternEvo's legacy key) and ignored: {why}")
    given = ckpt["load_given_ckpt"]
    if ckpt["auto_resume"] is DERIVED:
        ckpt["auto_resume"] = True if given is None else not given
        if given is not None:
            notes.append(f"ckpt.load_given_ckpt is deprecated (InternEvo's legacy key): read as "
                         f"ckpt.auto_resume={not given}")
    elif given is not None:
        notes.append("ckpt.load_given_ckpt is deprecated (InternEvo's legacy key) and ignored: ckpt.auto_resume "
                     "is set")
    for k in ("load_ckpt_folder", "load_model_only_folder", "load_optimizer", "load_given_ckpt"):
        ckpt[k] = None


def fill_derived(cfg: dict, user_vars: dict, notes: list | None = None) -> None:
    """Defaults that depend on other keys (the DERIVED keys of the schema). `notes` collects the
    deprecation notices of the legacy keys mapped here."""
    model, data = cfg["model"], cfg["data"]
    if data["seq_len"] is DERIVED:
        data["seq_len"] = check_value("SEQ_LEN", KeyInfo("SEQ_LEN", "int", False, None, "", (), 1, None, None, None,
                                                         None, None), user_vars.get("SEQ_LEN", 2048))
    if model["num_kv_attention_heads"] is DERIVED:
        model["num_kv_attention_heads"] = model["num_attention_heads"]
    if model["max_position_embeddings"] is DERIVED:
        model["max_position_embeddings"] = max(2048, data["seq_len"])
    if model["head_dim"] is DERIVED:
        h, n = model["hidden_size"], model["num_attention_heads"]
        if h % n:
            raise ConfigError(f"model.hidden_size={h} is not divisible by model.num_attention_heads={n}; change "
                              f"one of them or set model.head_dim explicitly.")
        model["head_dim"] = default_head_dim(h, n)
    if model["intermediate_size"] is DERIVED:
        model["intermediate_size"] = swiglu_hidden_dim(model["hidden_size"], model["mlp_ratio"], model["multiple_of"])
    if model["no_bias"] is DERIVED:
        model["no_bias"] = not has_bias(cfg["model_type"])
    if data["valid_micro_num"] is DERIVED:
        data["valid_micro_num"] = data["micro_num"]
    ckpt = cfg["ckpt"]
    map_legacy_ckpt_keys(ckpt, notes if notes is not None else [])
    if ckpt["enable_save_ckpt"] is DERIVED:  # InternEvo's default is True, and then it needs a folder
        ckpt["enable_save_ckpt"] = bool(ckpt["save_ckpt_folder"])
    if cfg["lr_scheduler"]["total_steps"] is DERIVED:
        cfg["lr_scheduler"]["total_steps"] = data["total_steps"]
    beta2 = cfg["beta2_scheduler"]
    if beta2["init_beta2"] is DERIVED:
        beta2["init_beta2"] = cfg["adam"]["adam_beta2"]
    if beta2["c"] is DERIVED:
        beta2["c"] = cfg["adam"]["adam_beta2_c"]
    if cfg["monitor"]["run_folder"] is DERIVED:
        cfg["monitor"]["run_folder"] = os.path.join("runs", cfg["JOB_NAME"])
    # sequence_parallel=True on plain TP means Megatron TP+SP; keep the two spellings in step
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


def _build(cls, values: dict):
    kwargs = {}
    for name, entry in keys_of(cls).items():
        kwargs[name] = _build(entry, values[name]) if is_section(entry) else values[name]
    return cls(**kwargs)


def resolve(raw: dict) -> TrainConfig:
    """Raw top-level names -> a TrainConfig with defaults, derived and normalised values."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of names to values, got {checks.show(raw)}.")
    top = keys_of(TrainConfig)
    user_vars = {}
    for name, value in raw.items():
        if not isinstance(name, str):
            raise ConfigError(f"config keys must be strings, got {name!r}.")
        if is_user_variable(name):
            user_vars[name] = value
        elif name not in top:
            raise unknown_key("", name, TrainConfig)
    if "SEQ_LEN" in user_vars:
        checks.check_kind("SEQ_LEN", "int", user_vars["SEQ_LEN"])
    notices: list[str] = []
    values = resolve_section("", TrainConfig, {k: v for k, v in raw.items() if k not in user_vars}, notices)
    legacy: list[str] = []
    fill_derived(values, user_vars, legacy)
    values = _lists_not_tuples(values)
    cfg = _build(TrainConfig, values)
    return dataclasses.replace(cfg, user_vars=_lists_not_tuples(user_vars), inert_keys=tuple(notices),
                               legacy_notes=tuple(legacy))


# ---- overrides -----------------------------------------------------------------------------------

def parse_value(text: str):
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


def apply_override(raw: dict, override: str) -> None:
    """Set one dotted.key=VALUE in the raw (file) values, checking the path against the schema."""
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(f"override {override!r} must look like dotted.key=VALUE (e.g. model.num_layers=4).")
    dotted, text = override.split("=", 1)
    parts = [part.strip() for part in dotted.split(".")]
    if not all(parts):
        raise ConfigError(f"override {override!r} has an empty key; it must look like dotted.key=VALUE.")
    value = parse_value(text)

    node, section_cls = raw, TrainConfig
    for depth, name in enumerate(parts):
        last = depth == len(parts) - 1
        path = ".".join(parts[: depth + 1])
        prefix = ".".join(parts[:depth])
        entry = None  # stays None below a user variable or inside a free-form dict
        if section_cls is not None:
            if depth == 0 and is_user_variable(name):
                section_cls = None  # a user variable: anything goes below it
            elif name not in keys_of(section_cls):
                raise unknown_key(prefix, name, section_cls, context=f" in override {override!r}")
            else:
                entry = keys_of(section_cls)[name]
        if last:
            if isinstance(entry, KeyInfo) and entry.kind == "str" and value is not None and not isinstance(value, str):
                value = text.strip()  # JOB_NAME=2024 means the string "2024"
            node[name] = value
            return
        child = node.get(name)
        if is_section(entry):
            child = _shorthand(entry, child)
            section_cls = entry
        elif section_cls is None or (isinstance(entry, KeyInfo) and entry.kind in ("dict", "any")):
            section_cls = None  # a free-form dict (monitor.tensorboard, model.rope_scaling, ...)
        else:
            raise ConfigError(f"override {override!r}: config key '{path}' is a single value, not a section.")
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: config key '{path}' holds {checks.show(child)}, not a dict.")
        child = dict(child)
        node[name] = child
        node = child


# ---- the resolved config as a dict ------------------------------------------------------------

def to_dict(cfg, all_keys: bool = False, _prefix: str = "", _set: tuple = ()) -> dict:
    """A TrainConfig (or any section) as plain nested dicts: user variables first, then the keys.
    InternEvo keys without effect here (`inert`) are left out unless the config set them (or
    `all_keys`): read back, the dict gives the same config, with the same notices."""
    if isinstance(cfg, dict):
        return copy.deepcopy(cfg)
    out = {}
    if isinstance(cfg, TrainConfig):
        out, _set = dict(copy.deepcopy(cfg.user_vars)), cfg.inert_keys
    for name, entry in keys_of(type(cfg)).items():
        value, path = getattr(cfg, name), f"{_prefix}{name}"
        if is_section(entry):
            out[name] = to_dict(value, all_keys, path + ".", _set)
        elif entry.legacy and value is None and not all_keys:
            continue  # mapped onto the current key at load time
        elif all_keys or not entry.inert or path in _set:
            out[name] = copy.deepcopy(value)
    return out


def config_from_dict(raw, overrides: Iterable[str] = ()) -> TrainConfig:
    """Like load_config, for a config given as a dict (or a TrainConfig to modify with overrides)."""
    from internlm.config.validate import validate

    raw = to_dict(raw)
    if isinstance(overrides, str):
        overrides = [overrides]
    for override in overrides:
        apply_override(raw, override)
    cfg = resolve(raw)
    validate(cfg)
    return cfg


def load_config(path, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read a .py or .yaml config, apply `dotted.key=VALUE` overrides, fill defaults and validate.

    Overrides act on the file's values, before defaults are derived, so `data.seq_len=512` changes the
    default of model.max_position_embeddings too. Overriding an UPPER_CASE variable (SEQ_LEN=...) only
    changes keys that default to it; keys the file already computed from it keep their value.
    """
    return config_from_dict(read_raw(path), overrides)
