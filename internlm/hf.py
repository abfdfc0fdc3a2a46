"""Hugging Face interoperability: our weights and config to and from transformers' formats.

Export writes a folder that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`
load with no remote code, in one of two transformers model types:
- "llama" (LlamaForCausalLM): INTERNLM v1 (its q/k/v and output biases are exactly Llama's
  `attention_bias=True`), INTERNLM2_PUBLIC, LLAMA2, and INTERNLM3 too (Llama has `head_dim`);
- "internlm3" (transformers maps it to its Llama implementation): every shape without biases.

Import reads a transformers llama / internlm3 folder (safetensors, sharded or not, or pytorch_model*.bin)
or InternLM2's published layout (a fused `attention.wqkv` per layer) and fills our parameters under any
parallel layout: each parameter's full tensor is rebuilt from the files and the local shard is copied.

Parameter names, ours -> HF llama -> InternLM2 published (N = layer index, prefix `model.` on HF names
except the head):
    tok_embeddings.weight            embed_tokens.weight                 tok_embeddings.weight
    layers.N.attention_norm.weight   layers.N.input_layernorm.weight     layers.N.attention_norm.weight
    layers.N.attention.wq/wk/wv      layers.N.self_attn.q/k/v_proj       layers.N.attention.wqkv (fused)
    layers.N.attention.wo            layers.N.self_attn.o_proj           layers.N.attention.wo
    layers.N.ffn_norm.weight         layers.N.post_attention_layernorm   layers.N.ffn_norm.weight
    layers.N.feed_forward.w1/w3/w2   layers.N.mlp.gate/up/down_proj      layers.N.feed_forward.w1/w3/w2
    norm.weight                      norm.weight                         norm.weight
    output.weight                    lm_head.weight (no prefix)          output.weight (no prefix)
Both sides use the rotate-half RoPE convention, so q and k need no permutation.

A training checkpoint is a folder `<root>/<step>/` with a torch.distributed.checkpoint (DCP) checkpoint
whose model tensors are stored under `model.<our name>`, plus config.yaml and meta.json. It is read here
on CPU without a process group, one tensor at a time, so exporting needs about one safetensors shard of
memory (plus the largest single tensor), never the whole model twice.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from internlm.model.internlm import InternLM, ModelArgs, canonical_name

logger = logging.getLogger("internlm")

HF_TARGETS = ("llama", "internlm3")
CKPT_MODEL_PREFIX = "model."
INDEX_FILE = "model.safetensors.index.json"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"


class ConversionError(ValueError):
    """A conversion that cannot be done, worded for the user (the tools exit with status 2)."""


# ------------------------------------------------------------------------------------------- names

# per-layer names: ours -> HF llama (under "model.layers.N.")
_LLAMA_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.wo.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_LLAMA_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LLAMA_LAYER_INV = {v: k for k, v in _LLAMA_LAYER.items()}
_LLAMA_TOP_INV = {v: k for k, v in _LLAMA_TOP.items()}

# InternLM2's published layout keeps our names (under "model.") except the fused q/k/v projection.
_INTERNLM2_TOP = {
    "tok_embeddings.weight": "model.tok_embeddings.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "output.weight",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def to_hf_name(name: str) -> str:
    """Our parameter name -> the transformers Llama name."""
    name = canonical_name(name)
    if name in _LLAMA_TOP:
        return _LLAMA_TOP[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LLAMA_LAYER:
        return f"model.layers.{m.group(1)}.{_LLAMA_LAYER[m.group(2)]}"
    raise KeyError(f"parameter {name!r} has no Hugging Face Llama name")


def from_hf_name(hf_name: str) -> str | None:
    """A transformers Llama name -> ours (None for names we have no parameter for, e.g. rotary buffers)."""
    if hf_name in _LLAMA_TOP_INV:
        return _LLAMA_TOP_INV[hf_name]
    m = _HF_LAYER_RE.match(hf_name)
    if m and m.group(2) in _LLAMA_LAYER_INV:
        return f"layers.{m.group(1)}.{_LLAMA_LAYER_INV[m.group(2)]}"
    return None


def expected_parameters(args: ModelArgs) -> dict[str, torch.Size]:
    """Name -> shape of every parameter of the full model (the head left out when it is tied)."""
    with torch.device("meta"):
        model = InternLM(args)
    return {name: p.shape for name, p in model.named_parameters()}


def _layer_sort_key(name: str):
    m = _LAYER_RE.match(name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if name.startswith("tok_embeddings") else 2, 0, name)


# ------------------------------------------------------------------------------------------ config

def check_expressible(args: ModelArgs, target: str) -> None:
    """Raise ConversionError when transformers' `target` model type cannot hold this model exactly."""
    if target not in HF_TARGETS:
        raise ConversionError(f"unknown Hugging Face model type {target!r}; choose one of {', '.join(HF_TARGETS)}.")
    if args.hidden_size % args.num_attention_heads:
        raise ConversionError(
            f"hidden_size={args.hidden_size} is not a multiple of num_attention_heads={args.num_attention_heads}: "
            f"transformers' {target} config refuses such a model even with an explicit head_dim.")
    if args.num_attention_heads % args.num_kv_attention_heads:
        raise ConversionError("num_attention_heads must be a multiple of num_kv_attention_heads.")
    if args.qkv_bias != args.o_bias:
        raise ConversionError(
            f"the model has {'q/k/v' if args.qkv_bias else 'output-projection'} biases only; transformers' {target} "
            f"puts a bias on q, k, v and o together (attention_bias) or on none of them.")
    if target == "internlm3" and args.qkv_bias:
        raise ConversionError(
            f"model_type {args.model_type} has attention biases, which transformers' internlm3 config refuses "
            f"(it ties attention_bias to mlp_bias); export with --model_type llama, whose attention_bias=True "
            f"is exactly these biases.")
    scaling = args.rope_scaling
    if scaling and scaling.get("type", scaling.get("rope_type")) != "dynamic":
        raise ConversionError(f"rope_scaling {scaling!r} is not expressible; only dynamic NTK scaling is.")


def default_target(args: ModelArgs) -> str:
    return "internlm3" if args.model_type == "INTERNLM3" else "llama"


def hf_config_dict(args: ModelArgs, target: str, dtype: torch.dtype = torch.bfloat16, bos_token_id: int | None = 1,
                   eos_token_id: int | None = 2, pad_token_id: int | None = None) -> dict:
    """config.json for transformers' `target` ("llama" or "internlm3") holding `args`."""
    check_expressible(args, target)
    scaling = None
    if args.rope_scaling:
        scaling = {"rope_type": "dynamic", "factor": float(args.rope_scaling["factor"])}
    rope_parameters = {"rope_type": "dynamic" if scaling else "default", "rope_theta": float(args.rope_base)}
    if scaling:
        rope_parameters["factor"] = scaling["factor"]
    dtype_name = str(dtype).replace("torch.", "")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": target,
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_kv_attention_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_position_embeddings,
        "rms_norm_eps": float(args.norm_eps),
        # both spellings: rope_theta/rope_scaling for older readers (transformers 4.x, vLLM, LMDeploy),
        # rope_parameters for transformers 5
        "rope_theta": float(args.rope_base),
        "rope_scaling": scaling,
        "rope_parameters": rope_parameters,
        "attention_bias": bool(args.qkv_bias),
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": bool(args.tie_word_embeddings),
        "initializer_range": float(args.init_std),
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": dtype_name,
    }


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    params = hf.get("rope_parameters") or {}
    if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
        raise ConversionError("per-layer-type rope_parameters are not supported.")
    rotary = hf.get("rotary")  # InternLM v1's own spelling: {"base": ..., "type": "origin"|"dynamic"}
    if isinstance(rotary, dict) and not hf.get("rope_theta"):
        theta = float(rotary.get("base", 10000.0))
        if rotary.get("type", "origin") == "dynamic":
            return theta, {"type": "dynamic", "factor": float(rotary.get("scaling_factor", 1.0))}
        return theta, None
    scaling = hf.get("rope_scaling") or None
    theta = hf.get("rope_theta") or params.get("rope_theta") or 10000.0
    if scaling is None and params.get("rope_type", params.get("type", "default")) not in ("default", None):
        scaling = params
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return float(theta), None
    if kind != "dynamic":
        raise ConversionError(f"rope scaling type {kind!r} is not supported (only 'dynamic' NTK scaling is).")
    if hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)) not in (None, 1, 1.0):
        raise ConversionError("partial rotary embeddings (partial_rotary_factor < 1) are not supported.")
    return float(theta), {"type": "dynamic", "factor": float(scaling["factor"])}


def hf_layout(hf: dict) -> str:
    """'internlm2' (fused wqkv, our names) or 'llama' (q/k/v_proj, gate/up/down_proj)."""
    model_type = hf.get("model_type")
    if model_type == "internlm2":
        return "internlm2"
    if model_type in ("llama", "internlm3", "internlm"):
        return "llama"
    raise ConversionError(f"Hugging Face model_type {model_type!r} is not supported; this converter reads "
                          f"llama, internlm3, internlm and internlm2 checkpoints.")


def model_args_from_hf_config(hf: dict) -> ModelArgs:
    """Our ModelArgs for a transformers config.json (llama, internlm3, internlm v1, internlm2)."""
    hf_layout(hf)  # refuses unknown model types
    model_type = hf["model_type"]
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ConversionError(f"hidden_act={hf.get('hidden_act')!r} is not supported (SwiGLU with silu only).")
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    kv = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or hidden // heads)
    if model_type in ("internlm2", "internlm"):  # their `bias` is the attention biases
        bias, mlp_bias = bool(hf.get("bias", model_type == "internlm")), False
    else:  # internlm3's published config spells them qkv_bias / bias
        bias = bool(hf.get("attention_bias", hf.get("qkv_bias", False)))
        mlp_bias = bool(hf.get("mlp_bias", hf.get("bias", False) if model_type == "internlm3" else False))
    if mlp_bias:
        raise ConversionError("mlp_bias=True (biases in the feed-forward projections) is not supported.")
    theta, scaling = _rope_from_hf(hf)
    if model_type == "internlm2":
        ours = "INTERNLM2_PUBLIC"
    elif model_type == "internlm3":
        ours = "INTERNLM3"
    elif model_type == "internlm" or (bias and kv == heads):
        ours = "INTERNLM"
    else:
        ours = "LLAMA2"
    return ModelArgs(
        vocab_size=int(hf["vocab_size"]), hidden_size=hidden, num_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads, num_kv_attention_heads=kv, head_dim=head_dim,
        intermediate_size=int(hf["intermediate_size"]), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_base=theta, rope_scaling=scaling, max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        qkv_bias=bias, o_bias=bias, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)), model_type=ours)


def hf_dtype(hf: dict) -> str:
    name = hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"
    return f"torch.{name}" if not str(name).startswith("torch.") else str(name)


def training_config_from_args(args: ModelArgs, dtype: str = "torch.bfloat16", job_name: str = "from_hf",
                              load_path: str | None = None) -> dict:
    """A raw training config (internlm.config keys) for a model of shape `args`."""
    model = dict(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads, num_kv_attention_heads=args.num_kv_attention_heads,
        head_dim=args.head_dim, intermediate_size=args.intermediate_size, no_bias=not args.qkv_bias,
        layer_norm_epsilon=float(args.norm_eps), rope_base=float(args.rope_base),
        rope_scaling=dict(args.rope_scaling) if args.rope_scaling else None,
        max_position_embeddings=args.max_position_embeddings, tie_word_embeddings=bool(args.tie_word_embeddings),
        init_std=float(args.init_std), dtype=dtype)
    raw = {"JOB_NAME": job_name, "model_type": args.model_type, "model": model,
           "data": dict(seq_len=min(2048, args.max_position_embeddings), train_folder=None, valid_folder=None)}
    if load_path is not None:
        raw["ckpt"] = dict(load_ckpt_info=dict(path=str(load_path), content=["model"], ckpt_type="internlm"),
                           auto_resume=False)
    return raw


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
        if name in _INTERNLM2_TOP:
            return _INTERNLM2_TOP[name]
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
        m = _LAYER_RE.match(name)
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


# ------------------------------------------------------------------ filling model parts (any layout)

_STRUCTURAL = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_attention_heads",
               "head_dim", "intermediate_size", "qkv_bias", "o_bias", "tie_word_embeddings")
_NUMERICAL = ("norm_eps", "rope_base", "rope_scaling", "max_position_embeddings")


def check_args_match(ours: ModelArgs, theirs: ModelArgs, where: str) -> None:
    for key in _STRUCTURAL:
        a, b = getattr(ours, key), getattr(theirs, key)
        if a != b:
            raise ConversionError(f"the model has {key}={a} but the checkpoint {where} has {key}={b}.")
    for key in _NUMERICAL:
        a, b = getattr(ours, key), getattr(theirs, key)
        if a != b:
            logger.warning("the model has %s=%s but the checkpoint %s has %s=%s; loading the weights anyway",
                           key, a, where, key, b)


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


def _unique_parameters(model_parts: Iterable[nn.Module]):
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
        for name, param in _unique_parameters(model_parts):
            copy_full_into(param, source.full_tensor(name, param.shape))
            filled.append(name)
        return filled
    finally:
        source.weights.close()


# ---------------------------------------------------------------------- our (DCP) training checkpoints

@contextlib.contextmanager
def _quiet():
    """DCP warns that it runs in one process; that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*")
        yield


def _is_dcp_dir(path: Path) -> bool:
    return (path / ".metadata").is_file()


def _step_of_folder(path: Path) -> int:
    try:
        return int(json.loads((path / "meta.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return int(path.name) if path.name.isdigit() else -1


def resolve_ckpt_dir(path) -> Path:
    """A checkpoint folder (step folder or snapshot slot), or the newest complete checkpoint inside a
    save folder (the one auto_resume would pick)."""
    path = Path(path)
    if _is_dcp_dir(path):
        return path
    if path.is_dir():
        from internlm.checkpoint import layout as L

        best, _ = L.find_latest(path)
        if best is not None:
            return best.path
        # model-only checkpoints (convert_hf2internlm, other tools) are fine to export: still only
        # folders whose save completed (COMPLETE marker)
        done = [p for p in L.candidate_folders(path) if (p / L.MARKER).is_file() and _is_dcp_dir(p)]
        if done:
            return max(done, key=_step_of_folder)
    raise ConversionError(f"{str(path)!r} is not a training checkpoint: no .metadata (DCP) file in it and no "
                          f"complete checkpoint (step folder or snapshot with its COMPLETE marker) below it.")


def is_hf_dir(path) -> bool:
    return (Path(path) / "config.json").is_file() and not _is_dcp_dir(Path(path))


def model_args_from_config(cfg) -> ModelArgs:
    from internlm.builders import model_args

    return model_args(cfg)


def read_ckpt_config(ckpt_dir):
    """The resolved config saved with a checkpoint (data folders need not exist anymore)."""
    from internlm.config import ConfigError, load_config

    path = Path(ckpt_dir) / "config.yaml"
    if not path.is_file():
        raise ConversionError(f"checkpoint {str(ckpt_dir)!r} has no config.yaml.")
    try:
        return load_config(path, ["data.train_folder=None", "data.valid_folder=None"])
    except ConfigError as exc:
        raise ConversionError(f"cannot read {path}: {exc}") from None


class DCPSource:
    """Full tensors of our parameters from a DCP checkpoint, read one key at a time, no process group."""

    def __init__(self, ckpt_dir):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = resolve_ckpt_dir(ckpt_dir)
        self.cfg = read_ckpt_config(self.path)
        self.args = model_args_from_config(self.cfg)
        metadata = FileSystemReader(str(self.path)).read_metadata()
        self.entries = {k[len(CKPT_MODEL_PREFIX):]: v for k, v in metadata.state_dict_metadata.items()
                        if k.startswith(CKPT_MODEL_PREFIX) and isinstance(v, TensorStorageMetadata)}
        if not self.entries:
            raise ConversionError(f"checkpoint {str(self.path)!r} holds no model tensors (keys 'model.<name>').")

    def check(self, expected: dict) -> None:
        for name, shape in expected.items():
            if name not in self.entries:
                raise ConversionError(f"tensor 'model.{name}' is missing from checkpoint {str(self.path)!r}.")
            if tuple(self.entries[name].size) != tuple(shape):
                raise ConversionError(f"tensor 'model.{name}' in checkpoint {str(self.path)!r} has shape "
                                      f"{tuple(self.entries[name].size)}, expected {tuple(shape)}.")

    def full_tensor(self, name: str, shape=None) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        name = canonical_name(name)
        if name == "output.weight" and name not in self.entries and self.args.tie_word_embeddings:
            name = "tok_embeddings.weight"
        if name not in self.entries:
            raise ConversionError(f"tensor 'model.{name}' is missing from checkpoint {str(self.path)!r}.")
        meta = self.entries[name]
        if shape is not None and tuple(meta.size) != tuple(shape):
            raise ConversionError(f"tensor 'model.{name}' in checkpoint {str(self.path)!r} has shape "
                                  f"{tuple(meta.size)}, expected {tuple(shape)}.")
        out = {CKPT_MODEL_PREFIX + name: torch.empty(meta.size, dtype=meta.properties.dtype)}
        with _quiet():
            dcp.load(out, checkpoint_id=str(self.path), no_dist=True)
        return out[CKPT_MODEL_PREFIX + name]


@torch.no_grad()
def load_ckpt_into_parts(model_parts, ckpt_dir) -> list[str]:
    """Fill our model parts from a training checkpoint (one tensor at a time)."""
    if isinstance(model_parts, nn.Module):
        model_parts = [model_parts]
    source = DCPSource(ckpt_dir)
    check_args_match(model_parts[0].args, source.args, f"in {str(source.path)!r}")
    filled = []
    for name, param in _unique_parameters(model_parts):
        copy_full_into(param, source.full_tensor(name, param.shape))
        filled.append(name)
    return filled


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


def _remove_stale_weights(folder: Path) -> None:
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
    _remove_stale_weights(out_dir)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {key: int(torch.Size(shape).numel()) * itemsize for key, shape in entries}
    shards = plan_shards([(k, sizes[k]) for k, _ in entries], max_shard)
    total = sum(sizes.values())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="export", mininterval=0.5)
    weight_map = {}
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
    if bar is not None:
        bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return {"shards": len(shards), "total_size": total}


# --------------------------------------------------------------------------------------- tokenizer

def write_tokenizer_files(spm_model, out_dir, model_max_length: int = 2048) -> dict:
    """tokenizer.model + tokenizer_config.json + special_tokens_map.json for transformers' LlamaTokenizer.

    Our sentencepiece models are trained without a dummy prefix (add_dummy_prefix=False) and with
    whitespace kept, so transformers must not add a prefix space either (add_prefix_space=False,
    legacy=False), and special-token strings in a text stay text (split_special_tokens=True): then it
    gives sentencepiece's ids exactly, also for texts starting with spaces or quoting "<unk>".
    Returns the bos/eos/pad/unk ids."""
    import sentencepiece as spm

    spm_model = Path(spm_model)
    if not spm_model.is_file():
        raise ConversionError(f"tokenizer model {str(spm_model)!r} does not exist.")
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spm_model, out_dir / "tokenizer.model")

    def piece(i):
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    special = {f"{k}_token": piece(v) for k, v in ids.items() if piece(v) is not None}
    tok_cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": ids["bos"] >= 0,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "bos_token": special.get("bos_token"),
        "eos_token": special.get("eos_token"),
        "unk_token": special.get("unk_token"),
        "pad_token": special.get("pad_token"),
        # text is text, as when the training data was tokenized: a literal "</s>" is not the eos token
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "sp_model_kwargs": {},
        "model_max_length": model_max_length,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    _write_tokenizer_json(out_dir, sp)
    return {k: (v if v >= 0 else None) for k, v in ids.items()}


_PROBE_TEXTS = ("hello world", "  two leading spaces", "    def f(x):\n        return x\n", "\n\nx\ty  z ",
                "caf\u00e9 \u4e2d\u6587 \U0001f600")


def _write_tokenizer_json(out_dir: Path, sp) -> bool:
    """Also write tokenizer.json (fast tokenizers, vLLM, LMDeploy) when transformers can build it, and
    only if it reproduces sentencepiece's ids on a few probe texts."""
    path = out_dir / "tokenizer.json"
    path.unlink(missing_ok=True)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(out_dir))
        backend = tok.backend_tokenizer
    except Exception as exc:  # noqa: BLE001 - optional file; tokenizer.model alone is enough
        logger.info("tokenizer.json not written (%s)", exc)
        return False
    bos = [sp.bos_id()] if sp.bos_id() >= 0 else []
    if any(backend.encode(t).ids != bos + sp.encode(t) for t in _PROBE_TEXTS):
        logger.warning("tokenizer.json not written: transformers' conversion does not reproduce the ids")
        return False
    backend.save(str(path))
    return True


def find_tokenizer(cfg) -> str | None:
    path = cfg.data.tokenizer_path if cfg is not None else None
    return path if path and Path(path).is_file() else None


# ------------------------------------------------------------------------------------------- export

@dataclass
class ExportReport:
    out_dir: str
    target: str
    model_type: str
    dtype: str
    shards: int
    total_size: int
    tokenizer: str | None
    seconds: float = 0.0
    notes: list = field(default_factory=list)


def export_source_to_hf(source, args: ModelArgs, out_dir, target: str | None = None,
                        dtype: torch.dtype = torch.bfloat16, max_shard="10GB", tokenizer=None,
                        progress: bool = True) -> ExportReport:
    """Write a transformers folder from any object with `full_tensor(our name, shape)`."""
    t0 = time.time()
    target = target or default_target(args)
    check_expressible(args, target)
    expected = expected_parameters(args)
    entries, hf_to_ours = [], {}
    for name in sorted(expected, key=_layer_sort_key):
        hf_name = to_hf_name(name)
        entries.append((hf_name, expected[name]))
        hf_to_ours[hf_name] = name
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = {"bos": 1, "eos": 2, "pad": None}
    if tokenizer:
        ids = write_tokenizer_files(tokenizer, out_dir, args.max_position_embeddings)
    written = write_safetensors_shards(
        out_dir, entries, lambda key: source.full_tensor(hf_to_ours[key], expected[hf_to_ours[key]]),
        dtype, parse_size(max_shard), progress)
    config = hf_config_dict(args, target, dtype, ids.get("bos"), ids.get("eos"), ids.get("pad"))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos")}
    if ids.get("pad") is not None:
        gen["pad_token_id"] = ids["pad"]
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return ExportReport(out_dir=str(out_dir), target=target, model_type=args.model_type,
                        dtype=str(dtype).replace("torch.", ""), shards=written["shards"],
                        total_size=written["total_size"], tokenizer=str(tokenizer) if tokenizer else None,
                        seconds=time.time() - t0)


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


def export_model_to_hf(model: InternLM, out_dir, **kwargs) -> ExportReport:
    """Export an in-memory (single-device) model of ours."""
    return export_source_to_hf(StateDictSource(model.state_dict()), model.args, out_dir, **kwargs)


def export_ckpt_to_hf(ckpt_dir, out_dir, target: str | None = None, dtype: torch.dtype = torch.bfloat16,
                      max_shard="10GB", tokenizer=None, progress: bool = True) -> ExportReport:
    """Training checkpoint (DCP + config.yaml) -> transformers folder."""
    source = DCPSource(ckpt_dir)
    source.check(expected_parameters(source.args))
    notes = []
    if source.args.tie_word_embeddings and "output.weight" in source.entries:
        # a tied model split over pipeline stages holds two copies; the export keeps the embedding's
        diff = (source.full_tensor("output.weight") - source.full_tensor("tok_embeddings.weight")).abs().max()
        if diff > 0:
            notes.append(f"tied embeddings: output.weight differs from tok_embeddings.weight by up to "
                         f"{diff.item():.3g}; the export uses tok_embeddings.weight for both")
    if tokenizer is None:
        tokenizer = find_tokenizer(source.cfg)
        if tokenizer:
            notes.append(f"tokenizer from the config's data.tokenizer_path: {tokenizer}")
    report = export_source_to_hf(source, source.args, out_dir, target, dtype, max_shard, tokenizer, progress)
    report.notes += notes
    if not report.tokenizer:
        report.notes.append("no tokenizer written (pass --tokenizer PATH/tokenizer.model)")
    return report


# ------------------------------------------------------------------------------------------- import

def hf_state_dict_ours(hf_dir) -> tuple[ModelArgs, dict, dict]:
    """(our ModelArgs, {our name: full tensor}, the HF config) of a HF folder."""
    source = HFSource(hf_dir)
    try:
        expected = expected_parameters(source.args)
        tensors = {name: source.full_tensor(name, shape).clone()
                   for name, shape in sorted(expected.items(), key=lambda kv: _layer_sort_key(kv[0]))}
        return source.args, tensors, source.weights.config
    finally:
        source.weights.close()


def import_hf_to_ckpt(hf_dir, ckpt_dir, config_out=None, dtype: torch.dtype = torch.float32,
                      progress: bool = True) -> dict:
    """HF folder -> a complete training checkpoint of this framework (see internlm/checkpoint/layout.py):
    DCP with keys `model.<name>`, config.yaml derived from config.json, meta.json, state.json (step 0)
    and the COMPLETE marker, loadable with load_ckpt_info=dict(path=ckpt_dir, content=("model",)).
    `config_out` also gets a training config that starts from it."""
    import torch.distributed.checkpoint as dcp

    from internlm.checkpoint import layout as L
    from internlm.config import config_from_dict, dump_yaml

    args, tensors, hf_cfg = hf_state_dict_ours(hf_dir)
    if args.tie_word_embeddings:  # the trainer's state dict names the tied head too
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
    names = list(tensors)
    if progress:
        from tqdm import tqdm

        names = tqdm(names, desc="import", unit=" tensors", mininterval=0.5)
    for name in names:
        tensors[name] = tensors[name].to(dtype)
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / L.MARKER).exists():
        raise ConversionError(f"{str(ckpt_dir)!r} already holds a complete checkpoint; choose another folder.")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with _quiet():
        dcp.save({CKPT_MODEL_PREFIX + k: v for k, v in tensors.items()}, checkpoint_id=str(ckpt_dir), no_dist=True)
    model_dtype = hf_dtype(hf_cfg)
    if model_dtype not in ("torch.bfloat16", "torch.float16", "torch.float32"):
        model_dtype = "torch.bfloat16"
    cfg = config_from_dict(training_config_from_args(args, model_dtype, job_name=ckpt_dir.name or "from_hf"))
    dump_yaml(cfg, ckpt_dir / L.CONFIG)
    L.write_json(ckpt_dir / L.STATE, {"step": 0, "note": "imported from Hugging Face: model weights only"})
    L.write_json(ckpt_dir / L.META, {
        "format": L.FORMAT, "format_version": L.FORMAT_VERSION, "kind": "import", "step": 0, "tokens_seen": 0,
        "model_type": args.model_type, "dtype": str(dtype), "num_params": args.num_params(),
        "source": "huggingface", "hf_dir": str(Path(hf_dir).resolve()), "hf_model_type": hf_cfg.get("model_type"),
        "torch_version": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    L.write_json(ckpt_dir / L.MARKER, {"step": 0, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    if config_out:
        train_cfg = config_from_dict(training_config_from_args(args, model_dtype, job_name="finetune",
                                                               load_path=str(ckpt_dir)))
        dump_yaml(train_cfg, config_out)
    return {"ckpt_dir": str(ckpt_dir), "model_type": args.model_type, "num_params": args.num_params(),
            "tensors": len(tensors)}
