"""Hugging Face weight files: reading a transformers folder, filling our model from it, and writing
safetensors shards.

Reading accepts model.safetensors, sharded safetensors with model.safetensors.index.json, or
pytorch_model*.bin, in the llama layout or InternLM2's published one (a fused `attention.wqkv` per
layer). Each parameter's full tensor is rebuilt from the files and the local shard is copied, so
`load_hf_into_parts` works under any parallel layout. Writing holds one shard in memory at a time.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from internlm.checkpoint.reader import is_dcp_dir
from internlm.errors import ConversionError
from internlm.hf.mapping import (
    INTERNLM2_TOP,
    LAYER_RE,
    check_args_match,
    from_hf_name,
    hf_layout,
    model_args_from_hf_config,
    to_hf_name,
)
from internlm.model.internlm import canonical_name

logger = logging.getLogger("internlm")

INDEX_FILE = "model.safetensors.index.json"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"


# ------------------------------------------------------------------------- reading a HF checkpoint

class HFWeights:
    """The tensors of a transformers model folder, read one at a time on CPU.

    Accepts model.safetensors, sharded safetensors with model.safetensors.index.json, or
    pytorch_model.bin (sharded or not; read with torch.load(weights_only=True, mmap=True))."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConversionError(f"Hugging Face model folder {str(self.folder)!r} does not exist.")
        cfg_path = self.folder / "config.json"
        if not cfg_path.is_file():
            raise ConversionError(f"{str(self.folder)!r} has no config.json; it is not a Hugging Face model folder.")
        self.config = json.loads(cfg_path.read_text())
        self.key_file: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        if (self.folder / INDEX_FILE).is_file():
            index = json.loads((self.folder / INDEX_FILE).read_text())
            self.key_file = {k: self.folder / f for k, f in index["weight_map"].items()}
        elif (self.folder / "model.safetensors").is_file():
            self._index_files([self.folder / "model.safetensors"])
        elif (self.folder / BIN_INDEX_FILE).is_file():
            index = json.loads((self.folder / BIN_INDEX_FILE).read_text())
            self.key_file = {k: self.folder / f for k, f in index["weight_map"].items()}
        elif (self.folder / "pytorch_model.bin").is_file():
            self._index_files([self.folder / "pytorch_model.bin"])
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise ConversionError(f"{str(self.folder)!r} holds no model.safetensors, {INDEX_FILE}, "
                                      f"pytorch_model.bin or {BIN_INDEX_FILE}.")
            self._index_files(files)

    def _index_files(self, files):
        for f in files:
            for key in self._handle(f).keys():
                self.key_file[key] = f

    def _handle(self, path: Path):
        if path not in self._open:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                self._open[path] = safe_open(str(path), framework="pt", device="cpu")
            else:
                self._open[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return self._open[path]

    def keys(self):
        return self.key_file.keys()

    def __contains__(self, key) -> bool:
        return key in self.key_file

    def get(self, key: str) -> torch.Tensor:
        if key not in self.key_file:
            raise ConversionError(f"tensor {key!r} is missing from the Hugging Face checkpoint in "
                                  f"{str(self.folder)!r}.")
        handle = self._handle(self.key_file[key])
        if isinstance(handle, dict):
            return handle[key]
        return handle.get_tensor(key)

    def close(self):
        self._open.clear()


class HFSource:
    """Full tensors of our parameters computed from a HF folder (llama or InternLM2 layout)."""

    def __init__(self, folder):
        self.weights = HFWeights(folder)
        self.layout = hf_layout(self.weights.config)
        self.args = model_args_from_hf_config(self.weights.config)
        self._fused: tuple[str, torch.Tensor] | None = None  # the last wqkv read (q, k and v share it)

    def unused_keys(self) -> list[str]:
        """Tensors of a llama-layout folder that map to none of our parameters (e.g. extra biases)."""
        if self.layout != "llama":
            return []
        return sorted(k for k in self.weights.keys() if from_hf_name(k) is None and "rotary_emb" not in k)

    def _hf_key(self, name: str) -> str:
        if self.layout == "llama":
            return to_hf_name(name)
        if name in INTERNLM2_TOP:
            return INTERNLM2_TOP[name]
        return "model." + name

    def _split_wqkv(self, layer: str, which: str, kind: str) -> torch.Tensor:
        key = f"model.layers.{layer}.attention.wqkv.{kind}"
        if self._fused is None or self._fused[0] != key:
            self._fused = (key, self.weights.get(key))
        fused = self._fused[1]
        a = self.args
        group = a.num_attention_heads // a.num_kv_attention_heads
        expected = (group + 2) * a.num_kv_attention_heads * a.head_dim
        if fused.shape[0] != expected:
            raise ConversionError(f"tensor {key!r} has shape {tuple(fused.shape)}; expected {expected} rows "
                                  f"({a.num_kv_attention_heads} kv groups x ({group} q + 1 k + 1 v) x {a.head_dim}).")
        # rows are grouped per kv head: [q_0 .. q_{group-1}, k, v] x head_dim
        grouped = fused.reshape(a.num_kv_attention_heads, group + 2, a.head_dim, *fused.shape[1:])
        if which == "wq":
            part = grouped[:, :group]
        elif which == "wk":
            part = grouped[:, group]
        else:
            part = grouped[:, group + 1]
        return part.reshape(-1, *fused.shape[1:]).contiguous()

    def full_tensor(self, name: str, shape=None) -> torch.Tensor:
        """The full tensor of our parameter `name`, checked against `shape` when given."""
        name = canonical_name(name)
        if name == "output.weight" and self.args.tie_word_embeddings and self._hf_key(name) not in self.weights:
            name = "tok_embeddings.weight"
        m = LAYER_RE.match(name)
        if self.layout == "internlm2" and m and m.group(2).startswith(("attention.wq.", "attention.wk.",
                                                                         "attention.wv.")):
            which, kind = m.group(2).split(".")[1:]
            tensor = self._split_wqkv(m.group(1), which, kind)
            key = f"model.layers.{m.group(1)}.attention.wqkv.{kind}"
        else:
            key = self._hf_key(name)
            tensor = self.weights.get(key)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ConversionError(f"tensor {key!r} (for our {name!r}) has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(shape)}.")
        return tensor


def is_hf_dir(path) -> bool:
    """A transformers model folder (config.json), not one of our DCP checkpoints."""
    return (Path(path) / "config.json").is_file() and not is_dcp_dir(Path(path))


# ------------------------------------------------------------------ filling model parts (any layout)

@torch.no_grad()
def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy `full` into `param`, which may be a DTensor shard (TP, FSDP, both) or a plain tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        full = full.to(device=param.device, dtype=param.dtype)
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


def unique_parameters(model_parts: Iterable[nn.Module]):
    """(our name, parameter) for each distinct parameter once: a tied head is not visited twice."""
    seen = set()
    for part in model_parts:
        for name, param in part.named_parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            yield canonical_name(name), param


@torch.no_grad()
def load_hf_into_parts(model_parts, hf_dir) -> list[str]:
    """Fill the parameters of our model parts (a model, or the stage modules this pipeline rank holds,
    parallelized or not) from a Hugging Face folder. Returns the names that were filled."""
    if isinstance(model_parts, nn.Module):
        model_parts = [model_parts]
    source = HFSource(hf_dir)
    try:
        check_args_match(model_parts[0].args, source.args, f"in {str(hf_dir)!r}")
        unused = source.unused_keys()
        if unused:
            logger.warning("%d tensor(s) of %s have no counterpart in the model and are ignored, e.g. %s",
                           len(unused), hf_dir, ", ".join(unused[:3]))
        filled = []
        for name, param in unique_parameters(model_parts):
            copy_full_into(param, source.full_tensor(name, param.shape))
            filled.append(name)
        return filled
    finally:
        source.weights.close()


# ------------------------------------------------------------------------ an in-memory model

class StateDictSource:
    """full_tensor() over an in-memory model or state dict with our names (plain tensors or DTensors)."""

    def __init__(self, state_dict: dict):
        self.sd = {canonical_name(k): v for k, v in state_dict.items()}

    def full_tensor(self, name, shape=None):
        from torch.distributed.tensor import DTensor

        t = self.sd.get(name)
        if t is None and name == "output.weight":
            t = self.sd.get("tok_embeddings.weight")
        if t is None:
            raise ConversionError(f"parameter {name!r} is missing from the state dict.")
        t = t.full_tensor() if isinstance(t, DTensor) else t
        return t.detach().cpu()


# --------------------------------------------------------------------------------- safetensors writer

_SIZE_RE = re.compile(r"^\s*([0-9.]+)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text) -> int:
    """'10GB' -> 10**9 * 10, '500MiB' -> 500 * 2**20, 1234 -> 1234 (bytes)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise ConversionError(f"cannot read the size {text!r}; write e.g. 10GB, 500MB or 2GiB.")
    return int(float(m.group(1)) * _UNITS[unit])


def plan_shards(items: list[tuple[str, int]], max_shard: int) -> list[list[str]]:
    """Group (key, nbytes) in order into shards of at most max_shard bytes (a larger tensor gets its own)."""
    shards, current, size = [], [], 0
    for key, nbytes in items:
        if current and size + nbytes > max_shard:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def remove_weight_files(folder: Path) -> None:
    for p in list(folder.glob("model*.safetensors")) + list(folder.glob("pytorch_model*.bin")):
        p.unlink()
    for name in (INDEX_FILE, BIN_INDEX_FILE):
        (folder / name).unlink(missing_ok=True)


def write_safetensors_shards(out_dir, entries: list[tuple[str, torch.Size]], load: Callable[[str], torch.Tensor],
                             dtype: torch.dtype, max_shard: int, progress: bool = True) -> dict:
    """Write `entries` (HF name, shape), each read with `load(HF name)` and cast to `dtype`, as
    model-0000x-of-0000N.safetensors plus model.safetensors.index.json. Only one shard is held in memory."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_weight_files(out_dir)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {key: int(torch.Size(shape).numel()) * itemsize for key, shape in entries}
    shards = plan_shards([(k, sizes[k]) for k, _ in entries], max_shard)
    total = sum(sizes.values())
    from internlm.progress import progress_bar

    weight_map = {}
    with progress_bar(total, "export", unit="B") if progress else contextlib.nullcontext() as bar:
        for i, keys in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for key in keys:
                tensors[key] = load(key).to(dtype).contiguous()
                weight_map[key] = fname
                if bar is not None:
                    bar.update(sizes[key])
            save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
            del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return {"shards": len(shards), "total_size": total}
