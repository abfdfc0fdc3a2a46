"""InternEvo's own checkpoint folders (ckpt.load_ckpt_info ckpt_type="internevo"): the model weights of
a folder written by InternEvo's checkpoint manager, merged and loaded into our model under any layout.

What such a folder holds (InternEvo's internlm/checkpoint/components.py, save_model_checkpoint): one
file `model_tp{t}_pp{p}.pt` per tensor-parallel rank t and pipeline stage p, each the state dict of
that rank's model chunk (the context, sampler and scheduler files beside them: internevo_state.py). Inside:

- InternLM2 (model_type INTERNLM2_PUBLIC, modeling_internlm2.py): `tok_embeddings.weight`,
  `layers.{i}.attention.wqkv.weight`, `layers.{i}.attention.wo.weight`,
  `layers.{i}.feed_forward.w1/w2/w3.weight`, `layers.{i}.attention_norm.weight`, `layers.{i}.ffn_norm.weight`,
  `norm.weight`, `output.weight` (our own names, but q, k and v fused in wqkv).
- InternLM v1 (model_type INTERNLM, modeling_internlm.py): `embedding.weight`, `blocks.{i}.mixer.Wqkv.weight/
  bias`, `blocks.{i}.mixer.out_proj.weight/bias`, `blocks.{i}.mlp.w1/w2/w3.weight`, `blocks.{i}.norm1/norm2.weight`,
  `norm.weight`, `head.weight`.

Sharding over tp ranks: column-parallel weights (wqkv, w1, w3, the head) are split along dim 0, row-parallel
ones (wo / out_proj, w2) along dim 1 (their bias is whole on every rank), the embedding along dim 1
(embed_split_hidden, `Embedding1D`) or, as `...word_embeddings.weight`, along dim 0; norms are whole.
The fused projection: InternLM2's wqkv rows are grouped per kv head, [q_0 .. q_{g-1}, k, v] x head_dim, and a
tp rank holds whole kv groups, so the shards concatenate into the full grouped matrix (the layout of
Hugging Face's InternLM2 too). InternLM v1's Wqkv is read per rank as (three, heads, head_dim): each shard is
[q, k, v] of its own heads, so every shard is split in three and the parts are concatenated per part.
Pipeline stages number their layers from 0 (`layers.0` of stage 1 is the first layer after the last one of
stage 0); the stages are put end to end. A `model.` prefix (a wrapper's) is dropped.

isp folders (tensor mode "isp", `model_tp{t}_wp{w}_pp{p}.pt`, save_model_checkpoint's isp branch): every
linear layer of the blocks is an ISPLinear, split along dim 0 (its output features, bias included) over
the weight-parallel ranks w, whatever it is in mtp (wo and w2 too), and whole across the sequence-parallel
ranks t; the embedding (dim 1) and the head (dim 0) are split over t as in mtp, and norms are whole.
So a block tensor is the concatenation over w (of any t that has them all), a top-level one over t (of
any w). InternLM v1's Wqkv, split by plain rows, concatenates to the full (3, heads, head_dim) matrix.
Only the pairs (t, w) InternEvo saved need to be there.

Interleaved pipelines (num_chunks > 1): each stage's file holds a ModuleList of chunks ("0.blocks...",
"1.blocks..."); chunk c of pipeline rank p is virtual stage c * pp + p (partition_uniform), so the layers
are put end to end in that order.

fsdp folders (parallel.zero1.fsdp=True, `model_tp{t}_pp{p}_dp{d}.pt`): each data-parallel rank's FSDP
SHARDED_STATE_DICT, whose ShardedTensors are read by stand-ins (internevo_fsdp.py) and put together into
the tp rank's state dict; from there as an mtp folder.

InternLM2 folders trained with adapt_hf=False (the folder's model_config.pt says so): InternEvo's attention
reorders each head's q and k dims (evens, then odds) before the rotate-half rotary, so wq's and wk's rows
are put in that order here (and AdamW's moments with them). Every file is read with
torch.load(weights_only=True).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from internlm.checkpoint.internevo_fsdp import merge_fsdp_files
from internlm.checkpoint.layout import DCP_METADATA, MARKER, META, CheckpointError
from internlm.log import logger

MODEL_FILE_RE = re.compile(r"^model_tp(\d+)(_wp\d+)?_pp(\d+)(_dp\d+)?\.pt$")
MODEL_CONFIG = "model_config.pt"
_LAYER_RE = re.compile(r"^(layers|blocks)\.(\d+)\.(.+)$")
_IGNORED = (".inv_freq", "._cos_cached", "._sin_cached", "._cos_k_cached", "._sin_k_cached")

# their name (InternLM v1) -> ours, within a layer and at the top
_V1_LAYER = {"mixer.out_proj.weight": "attention.wo.weight", "mixer.out_proj.bias": "attention.wo.bias",
             "mlp.w1.weight": "feed_forward.w1.weight", "mlp.w2.weight": "feed_forward.w2.weight",
             "mlp.w3.weight": "feed_forward.w3.weight", "norm1.weight": "attention_norm.weight",
             "norm2.weight": "ffn_norm.weight",
             # INTERNLM_MoE (modeling_moe.py's MoE): the router, a residual MoE's dense FFN and mixing weights
             "mlp.moe_layer.gate.wg.weight": "feed_forward.gate.weight",
             "mlp.residual_mlp.w1.weight": "feed_forward.residual_mlp.w1.weight",
             "mlp.residual_mlp.w2.weight": "feed_forward.residual_mlp.w2.weight",
             "mlp.residual_mlp.w3.weight": "feed_forward.residual_mlp.w3.weight",
             "mlp.coefficient.weight": "feed_forward.coefficient.weight",
             "mlp.coefficient.bias": "feed_forward.coefficient.bias"}
_V1_TOP = {"embedding.weight": "tok_embeddings.weight",
           "embedding.word_embeddings.weight": "tok_embeddings.word_embeddings.weight",
           "head.weight": "output.weight", "norm.weight": "norm.weight"}
_DIM0 = ("feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight", "tok_embeddings.word_embeddings.weight",
         "feed_forward.residual_mlp.w1.weight", "feed_forward.residual_mlp.w3.weight")
_DIM1 = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight",
         "feed_forward.residual_mlp.w2.weight")
# INTERNLM_MoE experts: one file per (MoE layer, expert, tp rank), try_save_moe_checkpoint
EXPERT_FILE_RE = re.compile(r"^model_moe_layer(\d+)_expert(\d+)_tp(\d+)\.pt$")
_EXPERT_DIM = {"w1": 0, "w3": 0, "w2": 1}  # each expert a FeedForward split over tp as the dense one


def is_own_format(path) -> bool:
    """One of our checkpoints (or a half-written one): what verify.check reads."""
    p = Path(path)
    return any((p / name).exists() for name in (MARKER, META, DCP_METADATA))


def is_internevo_dir(path) -> bool:
    """A folder with InternEvo's per-rank model files (model_tp0_pp0.pt ...) and none of our markers."""
    p = Path(path)
    return p.is_dir() and not is_own_format(p) and any(MODEL_FILE_RE.match(f.name) for f in p.iterdir())


def load_error(path: Path, exc: Exception) -> CheckpointError:
    """A failed torch.load(weights_only=True) of `path`, worded with the line of torch's message that says
    what was refused (its first line is the same advice for every refusal)."""
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    marks = ("GLOBAL", "Unsupported", "Can only build", "WeightsUnpickler")
    why = next((x for x in lines if any(m in x for m in marks)), lines[0] if lines else type(exc).__name__)
    return CheckpointError(f"cannot read {path} (read with torch.load(weights_only=True)): {why}")


def _load(path: Path, what: str = "a dict of tensors"):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a refused pickle, a truncated file ...: name the file
        raise load_error(path, exc) from None
    if what == "a dict of tensors" and (not isinstance(obj, dict)
                                        or not all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise CheckpointError(f"{path} does not hold a dict of tensors (InternEvo's model_tp*_pp*.pt do).")
    return obj


def model_files(folder: Path) -> tuple[dict[tuple[int, int, int], Path], bool, dict]:
    """((tp rank, wp rank, pp rank) -> model file, whether the folder is isp's, and for an fsdp folder
    (tp rank, 0, pp rank) -> its data-parallel ranks' files): mtp folders checked to be a full tp x pp
    grid, isp ones to cover every tp and every wp rank of each stage, fsdp ones every dp rank."""
    if not folder.is_dir():
        raise CheckpointError(f"InternEvo checkpoint folder {folder} does not exist.")
    found, kinds, fsdp = {}, set(), {}
    for f in sorted(folder.iterdir()):
        m = MODEL_FILE_RE.match(f.name)
        if not m:
            continue
        kinds.add("isp" if m.group(2) else "fsdp" if m.group(4) else "mtp")
        w = int(m.group(2)[3:]) if m.group(2) else 0
        key = (int(m.group(1)), w, int(m.group(3)))
        if m.group(4):
            fsdp.setdefault(key, {})[int(m.group(4)[3:])] = f
            found.setdefault(key, f)
        else:
            found[key] = f
    if len(kinds) > 1:
        raise CheckpointError(f"{folder} mixes {' and '.join(sorted(kinds))} model files (model_tp*_pp*.pt, isp's "
                              f"model_tp*_wp*_pp*.pt, fsdp's model_tp*_pp*_dp*.pt): two checkpoints in one folder.")
    top = max((max(by_dp) for by_dp in fsdp.values()), default=0)
    for (t, _, p), by_dp in sorted(fsdp.items()):
        missing = [d for d in range(top + 1) if d not in by_dp]
        if missing:
            raise CheckpointError(f"{folder / f'model_tp{t}_pp{p}_dp{missing[0]}.pt'} is missing (the folder has fsdp "
                                  f"files up to dp rank {top}).")
    fsdp = {key: [by_dp[d] for d in sorted(by_dp)] for key, by_dp in fsdp.items()}
    if not found:
        raise CheckpointError(f"{folder} holds no model_tp{{t}}_pp{{p}}.pt file: it is neither one of our "
                              f"checkpoints ({MARKER}, {META}, {DCP_METADATA}) nor an InternEvo checkpoint folder.")
    isp = kinds.pop() == "isp"
    tp = max(t for t, _, _ in found) + 1
    wp = max(w for _, w, _ in found) + 1
    pp = max(p for _, _, p in found) + 1
    for p in range(pp):
        if not isp:
            for t in range(tp):
                if (t, 0, p) not in found:
                    raise CheckpointError(f"{folder / f'model_tp{t}_pp{p}.pt'} is missing (the folder has files up "
                                          f"to tp rank {tp - 1} and pp rank {pp - 1}).")
            continue
        have = [(t, w) for t, w, q in found if q == p]
        for rank, size, what in ((0, tp, "tp"), (1, wp, "wp")):
            for r in range(size):
                if not any(pair[rank] == r for pair in have):
                    name = f"model_tp{r}_wp0_pp{p}.pt" if what == "tp" else f"model_tp0_wp{r}_pp{p}.pt"
                    raise CheckpointError(f"{folder / name} is missing: no file of pipeline stage {p} holds {what} "
                                          f"rank {r} (the folder has files up to tp rank {tp - 1}, wp rank "
                                          f"{wp - 1} and pp rank {pp - 1}).")
    return found, isp, fsdp


class InternEvoSource:
    """full_tensor(our name, shape) over an InternEvo folder: tp shards and pp stages merged."""

    def __init__(self, folder, args):
        self.folder = Path(folder)
        self.args = args
        self.v1 = args.model_type in ("INTERNLM", "INTERNLM_MoE")
        if args.model_type not in ("INTERNLM", "INTERNLM2_PUBLIC", "INTERNLM_MoE"):
            raise CheckpointError(f"ckpt_type='internevo' reads InternEvo folders of model_type INTERNLM2_PUBLIC, "
                                  f"INTERNLM or INTERNLM_MoE; this run's model_type is {args.model_type}.")
        files, self.isp, self.fsdp = model_files(self.folder)
        self.expert_files = {tuple(int(g) for g in m.groups()): f for f in sorted(self.folder.iterdir())
                             if (m := EXPERT_FILE_RE.match(f.name))}
        if args.num_experts and self.isp:
            raise CheckpointError(f"{self.folder} is an isp folder of a MoE model, which cannot be loaded so far "
                                  f"(mtp/msp MoE folders can).")
        self.tp = max(t for t, _, _ in files) + 1
        self.wp = max(w for _, w, _ in files) + 1
        self.pp = max(p for _, _, p in files) + 1
        self._check_model_config()
        self.files = files
        # (t, w, p) -> that file's tensors (an fsdp folder: its dp ranks' shards put together)
        self.state_dicts = {key: merge_fsdp_files(self.fsdp[key]) if key in self.fsdp else _load(path)
                            for key, path in files.items()}
        self._index({key: (path, self.state_dicts[key]) for key, path in files.items()})

    def over(self, tensors: dict, experts: dict | None = None) -> "InternEvoSource":
        """The same folder's layout over other tensors of the same names and shapes, one dict per model
        file ((tp rank, wp rank, pp rank) -> {their key: tensor}) and per expert file ((MoE layer, expert,
        tp rank) -> {their key: tensor}): e.g. an optimizer's moments."""
        other = object.__new__(InternEvoSource)
        other.__dict__.update({k: v for k, v in self.__dict__.items()
                               if k not in ("pieces", "_fused", "state_dicts", "expert_sds")})
        other._index({key: (self.files[key], sd) for key, sd in tensors.items()})
        if experts is not None:
            other.expert_sds = dict(experts)
            other.expert_files = {k: v for k, v in self.expert_files.items() if k in experts}
        return other

    def expert_state_dict(self, key: tuple[int, int, int]) -> dict:
        """The tensors of model_moe_layer{layer}_expert{e}_tp{t}.pt, key (layer, e, t), read once."""
        sds = self.__dict__.setdefault("expert_sds", {})
        if key not in sds:
            path = self.expert_files.get(key)
            if path is None:
                layer, e, t = key
                raise CheckpointError(f"{self.folder / f'model_moe_layer{layer}_expert{e}_tp{t}.pt'} is missing "
                                      f"(InternEvo writes each MoE layer's experts one file per expert and tp "
                                      f"rank).")
            sds[key] = _load(path)
        return sds[key]

    def _index(self, loaded: dict) -> None:
        """Their global names -> shards, from {(tp rank, wp rank, pp rank): (file, state dict)}."""
        # their global name -> {(tp rank, wp rank): (file, tensor)}
        self.pieces: dict[str, dict[tuple[int, int], tuple[Path, torch.Tensor]]] = {}
        # (pp rank, chunk) -> [(tp/wp ranks, file, their name within the chunk, tensor)]: with num_chunks > 1
        # a stage's file holds a ModuleList of chunks ("0.blocks.0...", "1.blocks.0...")
        chunks: dict[tuple[int, int], list] = {}
        for (t, w, p), (path, sd) in sorted(loaded.items()):
            for key, tensor in sd.items():
                name = key[len("model."):] if key.startswith("model.") else key
                if name.endswith(_IGNORED):
                    continue
                c = 0
                if name[:1].isdigit():
                    c, name = name.split(".", 1)
                    c = int(c)
                chunks.setdefault((p, c), []).append(((t, w), path, name, tensor))
        self.num_chunks = max(c for _, c in chunks) + 1
        # InternEvo's partition_uniform: chunk c of pipeline rank p is virtual stage c * pp + p, in layer order
        offset = 0
        for c in range(self.num_chunks):
            for p in range(self.pp):
                local_layers = set()
                for tw, path, name, tensor in chunks.get((p, c), []):
                    m = _LAYER_RE.match(name)
                    if m:
                        local_layers.add(int(m.group(2)))
                        name = f"{m.group(1)}.{int(m.group(2)) + offset}.{m.group(3)}"
                    self.pieces.setdefault(name, {})[tw] = (path, tensor)
                offset += max(local_layers) + 1 if local_layers else 0
        self._fused: tuple[str, dict] | None = None

    def _check_model_config(self) -> None:
        path = self.folder / MODEL_CONFIG
        self.interleaved_rotary = False
        if not path.is_file():
            return
        cfg = _load(path, what="config")
        # adapt_hf=False: InternEvo's InternLM2 attention takes each head's even dims of q and k, then the
        # odd ones, before the rotate-half rotary: so the same model here has those rows of wq and wk in
        # that order (q.k is the same under one permutation of both), the permutation of Meta's layout
        self.interleaved_rotary = isinstance(cfg, dict) and not self.v1 and cfg.get("adapt_hf", True) is False

    def _shards(self, name: str) -> tuple[list[Path], list[torch.Tensor], str]:
        """The pieces of their `name` (global layer index) in concatenation order: one per tp rank, or, for
        an isp block tensor, one per wp rank (a shard depends on that rank only: any file of it will do,
        the first is taken). Also which ranks."""
        entry = self.pieces.get(name)
        if entry is None:
            raise CheckpointError(f"tensor {name!r} is missing from the InternEvo checkpoint {self.folder} "
                                  f"(layers counted across pipeline stages).")
        by_wp = self.isp and _LAYER_RE.match(name) is not None
        what = "wp" if by_wp else "tp"
        got = []
        for r in range(self.wp if by_wp else self.tp):
            found = [entry[tw] for tw in sorted(entry) if tw[1 if by_wp else 0] == r]
            if not found:
                present = entry[min(entry)][0]
                raise CheckpointError(f"tensor {name!r} is in {present.name} but missing from the {what} rank {r} "
                                      f"files of the InternEvo checkpoint {self.folder}.")
            got.append(found[0])
        return [g[0] for g in got], [g[1] for g in got], what

    def _merged(self, name: str, dim: int | None) -> tuple[torch.Tensor, str]:
        """The full tensor of their `name` (global layer index): shards concatenated along `dim`
        (None: whole on every rank, the first taken). In an isp folder a block tensor is split along dim 0
        over the wp ranks (norms whole), whatever `dim` says for tp."""
        paths, tensors, what = self._shards(name)
        if what == "wp":
            dim = None if "norm" in name.rsplit(".", 2)[-2] else 0
        if dim is None or len(tensors) == 1:
            return tensors[0], paths[0].name
        if any(t.dim() <= dim for t in tensors):
            raise CheckpointError(f"tensor {name!r} in {paths[0]} has shape {tuple(tensors[0].shape)}; it cannot be "
                                  f"a shard split along dim {dim}.")
        return torch.cat(tensors, dim=dim), paths[0].name

    def _qkv(self, layer: str, kind: str) -> dict[str, torch.Tensor]:
        a = self.args
        kv, hd = a.num_kv_attention_heads, a.head_dim
        if self.v1:
            name = f"blocks.{layer}.mixer.Wqkv.{kind}"
            if self.isp:  # plain rows over wp: the shards concatenate to the full (3, heads, head_dim) matrix
                q, k, v = self._merged(name, 0)[0].reshape(3, -1, *self._shards(name)[1][0].shape[1:])
                return {"wq": q, "wk": k, "wv": v, "_name": name}
            parts = [t.reshape(3, -1, *t.shape[1:]) for t in self._shards(name)[1]]
            q, k, v = (torch.cat([p[i] for p in parts], dim=0) for i in range(3))
            return {"wq": q, "wk": k, "wv": v, "_name": name}
        name = f"layers.{layer}.attention.wqkv.{kind}"
        fused, _ = self._merged(name, 0)
        group = a.num_attention_heads // kv
        expected = (group + 2) * kv * hd
        if fused.shape[0] != expected:
            _, shards, what = self._shards(name)
            raise CheckpointError(f"tensor {name!r} of {self.folder} has {fused.shape[0]} rows merged from "
                                  f"{len(shards)} {what} shard(s); the model expects {expected} ({kv} kv groups x "
                                  f"({group} q + 1 k + 1 v) x {hd}).")
        grouped = fused.reshape(kv, group + 2, hd, *fused.shape[1:])
        rest = fused.shape[1:]
        wq, wk = grouped[:, :group].reshape(-1, *rest), grouped[:, group].reshape(-1, *rest)
        if self.interleaved_rotary:
            from internlm.hf.meta_llama import meta_to_rotate_half

            wq, wk = meta_to_rotate_half(wq, a.num_attention_heads), meta_to_rotate_half(wk, kv)
        return {"wq": wq, "wk": wk, "wv": grouped[:, group + 1].reshape(-1, *rest), "_name": name}

    def _their_name(self, name: str) -> str:
        if not self.v1:
            return name
        m = _LAYER_RE.match(name)
        if m:
            return f"blocks.{m.group(2)}." + {v: k for k, v in _V1_LAYER.items()}.get(m.group(3), m.group(3))
        return {v: k for k, v in _V1_TOP.items()}.get(name, name)

    def _experts(self, layer: int, which: str) -> tuple[torch.Tensor, str]:
        """Our stacked experts.{which} [E, ...] of MoE layer `layer`: each expert's tp shards concatenated,
        read from model_moe_layer{layer}_expert{e}_tp{t}.pt."""
        out = []
        for e in range(self.args.num_experts):
            shards = []
            for t in range(self.tp):
                sd = self.expert_state_dict((layer, e, t))
                key = next((k for k in sd if k.endswith(f".wrapped_experts.{e}.{which}.weight")), None)
                if key is None:
                    raise CheckpointError(f"{self.expert_files[(layer, e, t)]} holds no '...wrapped_experts.{e}."
                                          f"{which}.weight' (keys: {sorted(sd)[:4]}).")
                shards.append(sd[key])
            out.append(torch.cat(shards, dim=_EXPERT_DIM[which]))
        return torch.stack(out), f"model_moe_layer{layer}_expert*_tp*.pt:{which}"

    def full_tensor(self, name: str, shape) -> torch.Tensor:
        m = _LAYER_RE.match(name)
        suffix = m.group(3) if m else name
        if m and suffix.startswith("feed_forward.experts."):
            full, theirs = self._experts(int(m.group(2)), suffix.rsplit(".", 1)[1])
            if tuple(full.shape) != tuple(shape):
                raise CheckpointError(f"{theirs} of {self.folder} merges to shape {tuple(full.shape)}; our {name!r} "
                                      f"has shape {tuple(shape)}.")
            return full
        if m and suffix.split(".")[0] == "attention" and suffix.split(".")[1] in ("wq", "wk", "wv"):
            which, kind = suffix.split(".")[1:]
            key = f"{m.group(2)}.{kind}"
            if self._fused is None or self._fused[0] != key:
                self._fused = (key, self._qkv(m.group(2), kind))
            full, theirs = self._fused[1][which], self._fused[1]["_name"]
        elif name == "tok_embeddings.weight":
            their = self._their_name(name)
            word = self._their_name("tok_embeddings.word_embeddings.weight")
            if their not in self.pieces and word in self.pieces:  # vocab-parallel (embed_split_hidden=False)
                full, _ = self._merged(word, 0)
                theirs = word
            else:
                full, _ = self._merged(their, 1)
                theirs = their
        else:
            theirs = self._their_name(name)
            dim = 0 if suffix in _DIM0 else 1 if suffix in _DIM1 else None
            full, _ = self._merged(theirs, dim)
        if tuple(full.shape) != tuple(shape):
            n, what = len(self._shards(theirs)[1]), self._shards(theirs)[2]
            raise CheckpointError(f"tensor {theirs!r} of {self.folder} has shape {tuple(full.shape)} merged from "
                                  f"{n} {what} shard(s); our {name!r} has shape {tuple(shape)}.")
        return full


@torch.no_grad()
def load_internevo_into_parts(model_parts, folder) -> list[str]:
    """Fill our model parts (a model, or the stages this pipeline rank holds; parallelized or not) from an
    InternEvo checkpoint folder. Returns our names that were filled."""
    from internlm.hf.weights import copy_full_into, unique_parameters

    if isinstance(model_parts, nn.Module):
        model_parts = [model_parts]
    source = InternEvoSource(folder, model_parts[0].args)
    filled = []
    for name, param in unique_parameters(model_parts):
        copy_full_into(param, source.full_tensor(name, param.shape))
        filled.append(name)
    wp = f", isp with wp={source.wp}" if source.isp else ""
    logger.info(f"read InternEvo checkpoint {folder} (tp={source.tp}{wp}, pp={source.pp})")
    return filled
