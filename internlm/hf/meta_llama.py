"""Meta's consolidated Llama checkpoints (ckpt_type="llama"): a folder with params.json and
consolidated.00.pth, consolidated.01.pth, ... (one file per model-parallel rank of Meta's fairscale
layers), loaded into our model under any layout.

Meta's parameter names are ours (tok_embeddings, layers.N.attention.wq, ..., feed_forward.w1/w2/w3,
attention_norm, ffn_norm, norm, output). What differs:

- the shards: column-parallel weights (wq, wk, wv, w1, w3, output) are split along dim 0, row-parallel
  ones (wo, w2) along dim 1, the embedding along dim 1 (Llama 1/2: ParallelEmbedding) or dim 0 (Llama 3:
  VocabParallelEmbedding; told apart by the shapes); norms are replicated;
- rotary embeddings: Meta rotates interleaved pairs (x0, x1), (x2, x3), ... of each head, we (and HF)
  rotate halves (x_i, x_{i+d/2}); the rows of wq and wk are permuted per head to match, as transformers'
  convert_llama_weights_to_hf does.

Every file is read with torch.load(weights_only=True): a shard can hold tensors only.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from internlm.errors import ConversionError
from internlm.hf.mapping import expected_parameters
from internlm.hf.weights import copy_full_into, unique_parameters

logger = logging.getLogger("internlm")

PARAMS_FILE = "params.json"
_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")
_DIM0 = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
         "feed_forward.w3.weight")
_DIM1 = ("attention.wo.weight", "feed_forward.w2.weight")
_IGNORED = re.compile(r"^(rope\.freqs|layers\.\d+\.attention\.inner_attention\.rope\.freqs)$")


def is_meta_llama_dir(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / PARAMS_FILE).is_file() and any(_SHARD_RE.match(f.name) for f in p.iterdir())


def shard_files(folder: Path) -> list[Path]:
    """consolidated.00.pth ... in rank order; a gap in the numbering is an error naming the folder."""
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a folder (ckpt_type='llama' reads a folder of consolidated.NN.pth "
                              f"files with params.json).")
    found = sorted((int(m.group(1)), f) for f in folder.iterdir() if (m := _SHARD_RE.match(f.name)))
    if not found:
        raise ConversionError(f"{folder} has no consolidated.NN.pth file (ckpt_type='llama' reads Meta's "
                              f"consolidated checkpoint folders).")
    ranks = [r for r, _ in found]
    if ranks != list(range(len(ranks))):
        raise ConversionError(f"{folder} has consolidated files of ranks {ranks}; expected 0..{len(ranks) - 1} "
                              f"without gaps.")
    return [f for _, f in found]


def read_params(folder: Path) -> dict:
    path = folder / PARAMS_FILE
    try:
        params = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing (Meta's checkpoint folders hold the model shape in it).") from None
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(params, dict):
        raise ConversionError(f"{path} must hold a JSON object, got {type(params).__name__}.")
    return params


def _load_shard(path: Path) -> dict:
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # an old (non-zip) serialization cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a refused pickle, a truncated file ...: name the file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"cannot read {path} as a tensor file (read with weights_only=True): {first}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConversionError(f"{path} does not hold a dict of tensors.")
    return sd


def meta_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of Meta's wq / wk (interleaved rotary pairs per head) in the rotate-half order."""
    out_dim = w.shape[0]
    head = out_dim // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, head // 2, 2, *rest).transpose(1, 2).reshape(out_dim, *rest)


def rotate_half_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of meta_to_rotate_half (writing Meta's layout, e.g. for tests)."""
    out_dim = w.shape[0]
    head = out_dim // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, head // 2, *rest).transpose(1, 2).reshape(out_dim, *rest)


class MetaLlamaSource:
    """full_tensor(our name) over a Meta consolidated folder: shards merged, rotary rows permuted."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.files = shard_files(self.folder)
        self.params = read_params(self.folder)
        self.shards = [_load_shard(f) for f in self.files]

    def check_shape(self, args) -> None:
        """params.json against the model: the head counts decide the rotary permutation."""
        p = self.params
        kv = p.get("n_kv_heads") or p.get("n_heads")
        for ours, mine, theirs in (("hidden_size", args.hidden_size, p.get("dim")),
                                   ("num_layers", args.num_layers, p.get("n_layers")),
                                   ("num_attention_heads", args.num_attention_heads, p.get("n_heads")),
                                   ("num_kv_attention_heads", args.num_kv_attention_heads, kv)):
            if theirs is None:
                raise ConversionError(f"{self.folder / PARAMS_FILE} has no entry for the model's {ours}.")
            if int(theirs) != mine:
                raise ConversionError(f"the model has {ours}={mine} but {self.folder / PARAMS_FILE} says {theirs}.")
        eps, theta = p.get("norm_eps"), p.get("rope_theta", 10000.0)
        if eps is not None and float(eps) != args.norm_eps:
            logger.warning("the model has layer_norm_epsilon=%s but %s has norm_eps=%s; loading the weights anyway",
                           args.norm_eps, self.folder / PARAMS_FILE, eps)
        if float(theta) != float(args.rope_base):
            logger.warning("the model has rope_base=%s but %s has rope_theta=%s; loading the weights anyway",
                           args.rope_base, self.folder / PARAMS_FILE, theta)

    def unused_keys(self, names) -> list[str]:
        return sorted(k for k in self.shards[0] if k not in names and not _IGNORED.match(k))

    def _pieces(self, name: str) -> list[torch.Tensor]:
        pieces = [sd.get(name) for sd in self.shards]
        missing = [str(f.name) for f, t in zip(self.files, pieces) if t is None]
        if missing:
            raise ConversionError(f"tensor {name!r} is missing from {self.folder / missing[0]}.")
        return pieces

    def full_tensor(self, name: str, shape) -> torch.Tensor:
        pieces = self._pieces(name)
        suffix = name.split(".", 2)[-1] if name.startswith("layers.") else name
        n = len(pieces)
        if n == 1:
            full = pieces[0]
        elif suffix in _DIM0 or name == "output.weight":
            full = torch.cat(pieces, dim=0)
        elif suffix in _DIM1:
            full = torch.cat(pieces, dim=1)
        elif name == "tok_embeddings.weight":
            p0 = pieces[0].shape
            dim = 1 if shape is not None and p0[0] == shape[0] and p0[1] * n == shape[1] else 0
            full = torch.cat(pieces, dim=dim)
        else:  # norms: every rank holds the whole tensor
            full = pieces[0]
        if shape is not None and tuple(full.shape) != tuple(shape):
            raise ConversionError(f"tensor {name!r} of {self.folder} has shape {tuple(full.shape)} merged from {n} "
                                  f"shard(s); the model expects {tuple(shape)}.")
        if suffix == "attention.wq.weight":
            full = meta_to_rotate_half(full, int(self.params["n_heads"]))
        elif suffix == "attention.wk.weight":
            full = meta_to_rotate_half(full, int(self.params.get("n_kv_heads") or self.params["n_heads"]))
        return full


@torch.no_grad()
def load_meta_llama_into_parts(model_parts, folder) -> list[str]:
    """Fill our model parts (any layout) from Meta's consolidated folder. Returns the names filled."""
    if isinstance(model_parts, nn.Module):
        model_parts = [model_parts]
    source = MetaLlamaSource(folder)
    source.check_shape(model_parts[0].args)
    unused = source.unused_keys(set(expected_parameters(model_parts[0].args)))
    filled = []
    for name, param in unique_parameters(model_parts):
        copy_full_into(param, source.full_tensor(name, param.shape))
        filled.append(name)
    if unused:
        logger.warning("%d tensor(s) of %s have no counterpart in the model and are ignored, e.g. %s",
                       len(unused), folder, ", ".join(unused[:3]))
    return filled
