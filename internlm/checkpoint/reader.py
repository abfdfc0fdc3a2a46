"""Reading our own training checkpoints outside a training run: on CPU, without a process group, one
tensor at a time (the HF export, `load_model`, tools/generate.py).

A checkpoint folder is the one layout.py describes; its model tensors are the DCP keys
`model.<our name>` (state.MODEL_PREFIX), full logical tensors whatever layout saved them. Reading one
key at a time keeps the memory needed to about the largest tensor, never the whole model twice.
Problems are raised as ConversionError, worded for the user.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from internlm.checkpoint import layout, safe_dcp
from internlm.checkpoint.state import MODEL_PREFIX, load_tensors
from internlm.errors import ConversionError
from internlm.model.internlm import canonical_name


@contextlib.contextmanager
def quiet_dcp():
    """DCP warns that it runs in one process; that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*")
        yield


def is_dcp_dir(path: Path) -> bool:
    return (path / layout.DCP_METADATA).is_file()


def _step_of_folder(path: Path) -> int:
    try:
        return int(json.loads((path / layout.META).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return int(path.name) if path.name.isdigit() else -1


def resolve_ckpt_dir(path) -> Path:
    """A checkpoint folder (step folder or snapshot slot), or the newest complete checkpoint inside a
    save folder (the one auto_resume would pick)."""
    path = Path(path)
    if is_dcp_dir(path):
        return path
    if path.is_dir():
        best, _ = layout.find_latest(path)
        if best is not None:
            return best.path
        # model-only checkpoints (convert_hf2internlm, other tools) are fine to export: still only
        # folders whose save completed (COMPLETE marker)
        done = [p for p in layout.candidate_folders(path) if (p / layout.MARKER).is_file() and is_dcp_dir(p)]
        if done:
            return max(done, key=_step_of_folder)
    raise ConversionError(f"{str(path)!r} is not a training checkpoint: no {layout.DCP_METADATA} (DCP) file in it and "
                          f"no complete checkpoint (step folder or snapshot with its {layout.MARKER} marker) below it.")


def read_ckpt_config(ckpt_dir):
    """The resolved config saved with a checkpoint (data folders need not exist anymore)."""
    from internlm.config import ConfigError, load_config

    path = Path(ckpt_dir) / layout.CONFIG
    if not path.is_file():
        raise ConversionError(f"checkpoint {str(ckpt_dir)!r} has no {layout.CONFIG}.")
    try:
        return load_config(path, ["data.train_folder=None", "data.valid_folder=None", "data.type='tokenized'"])
    except ConfigError as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from None


class DCPSource:
    """Full tensors of our parameters from a DCP checkpoint, read one key at a time, no process group."""

    def __init__(self, ckpt_dir):
        self.path = resolve_ckpt_dir(ckpt_dir)
        self.cfg = read_ckpt_config(self.path)
        from internlm.builders import model_args

        self.args = model_args(self.cfg)
        metadata = safe_dcp.read_metadata(self.path)
        self.entries = {k[len(MODEL_PREFIX):]: v for k, v in metadata.state_dict_metadata.items()
                        if k.startswith(MODEL_PREFIX) and isinstance(v, TensorStorageMetadata)}
        if not self.entries:
            raise ConversionError(f"checkpoint {str(self.path)!r} holds no model tensors (keys "
                                  f"'{MODEL_PREFIX}<name>').")

    def check(self, expected: dict) -> None:
        for name, shape in expected.items():
            if name not in self.entries:
                raise ConversionError(f"tensor '{MODEL_PREFIX}{name}' is missing from checkpoint {str(self.path)!r}.")
            if tuple(self.entries[name].size) != tuple(shape):
                raise ConversionError(f"tensor '{MODEL_PREFIX}{name}' in checkpoint {str(self.path)!r} has shape "
                                      f"{tuple(self.entries[name].size)}, expected {tuple(shape)}.")

    def full_tensor(self, name: str, shape=None) -> torch.Tensor:
        name = canonical_name(name)
        if name == "output.weight" and name not in self.entries and self.args.tie_word_embeddings:
            name = "tok_embeddings.weight"
        if name not in self.entries:
            raise ConversionError(f"tensor '{MODEL_PREFIX}{name}' is missing from checkpoint {str(self.path)!r}.")
        meta = self.entries[name]
        if shape is not None and tuple(meta.size) != tuple(shape):
            raise ConversionError(f"tensor '{MODEL_PREFIX}{name}' in checkpoint {str(self.path)!r} has shape "
                                  f"{tuple(meta.size)}, expected {tuple(shape)}.")
        out = {MODEL_PREFIX + name: torch.empty(meta.size, dtype=meta.properties.dtype)}
        with quiet_dcp():
            load_tensors(out, self.path, no_dist=True)
        return out[MODEL_PREFIX + name]


@torch.no_grad()
def load_ckpt_into_parts(model_parts, ckpt_dir) -> list[str]:
    """Fill our model parts from a training checkpoint (one tensor at a time)."""
    # internlm.hf imports this module, so its helpers are imported here, at first use
    from internlm.hf.mapping import check_args_match
    from internlm.hf.weights import copy_full_into, unique_parameters

    if isinstance(model_parts, nn.Module):
        model_parts = [model_parts]
    source = DCPSource(ckpt_dir)
    check_args_match(model_parts[0].args, source.args, f"in {str(source.path)!r}")
    filled = []
    for name, param in unique_parameters(model_parts):
        copy_full_into(param, source.full_tensor(name, param.shape))
        filled.append(name)
    return filled
