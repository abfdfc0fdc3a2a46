"""InternEvo's fsdp checkpoint files (parallel.zero1.fsdp=True): `model_tp{t}_pp{p}_dp{d}.pt`, read safely.

What InternEvo writes there (internlm/checkpoint/components.py save_model_checkpoint, utils.py
get_shard_state_dict): every data-parallel rank d saves `torch.save(model.state_dict())` taken under
FSDP's SHARDED_STATE_DICT, so each value is a torch.distributed ShardedTensor: the rank's rows of the
parameter (FSDP chunks each original parameter along dim 0 over its sharding group) with metadata
giving every shard's offsets and sizes and the global shape.

A ShardedTensor unpickles only with its classes and an initialised process group of the same size
(its __setstate__ checks the ranks). Here the file is read with torch.load(weights_only=True) and
stand-ins registered for exactly the classes such a pickle names (ShardedTensor, Shard, ShardMetadata,
ShardedTensorMetadata, TensorProperties, ChunkShardingSpec, _remote_device, ShardedTensor's
ProcessGroupState through a getattr limited to that one attribute, MEM_FORMAT_ENCODING): each keeps the
values the pickle gives it and runs no code of torch.distributed, so no process group is needed and
nothing else can be built. The shards of all d files are then put at their offsets into the full
tensor of each name; a tensor not covered by the files' shards is an error naming the files.
"""
from __future__ import annotations

from pathlib import Path

import torch

from internlm.checkpoint.layout import CheckpointError


class _Record:
    """Stands in for a plain class of torch.distributed._shard in the pickle: keeps its fields."""

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict) \
                and (state[0] is None or isinstance(state[0], dict)):  # (dict, slots), as dataclasses pickle
            self.__dict__.update(state[0] or {})
            self.__dict__.update(state[1])
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.fields = state


class _ShardedTensor(torch.Tensor):
    """Stands in for ShardedTensor: a data-less wrapper keeping the rank's shards and the metadata."""

    def __setstate__(self, state):
        self.shards, self.sharded_metadata = state[0], state[1]

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # a wrapper subclass must have one
        raise CheckpointError(f"a ShardedTensor read from an InternEvo fsdp file cannot run {func}")


def _getattr(obj, name):
    """The one getattr a ShardedTensor pickle makes: ShardedTensor.ProcessGroupState."""
    if obj is _ShardedTensor and name == "ProcessGroupState":
        return _Record
    raise CheckpointError(f"a getattr({getattr(obj, '__name__', type(obj).__name__)}, {name!r}) in the pickle, "
                          f"which is not a ShardedTensor's")


def _mem_format(value):
    return int(value)


_SHARD = "torch.distributed._shard"
_STAND_INS = [
    (_ShardedTensor, f"{_SHARD}.sharded_tensor.api.ShardedTensor"),
    (_Record, f"{_SHARD}.sharded_tensor.shard.Shard"),
    (_Record, f"{_SHARD}.metadata.ShardMetadata"),
    (_Record, f"{_SHARD}.sharded_tensor.metadata.ShardedTensorMetadata"),
    (_Record, f"{_SHARD}.sharded_tensor.metadata.TensorProperties"),
    (_Record, f"{_SHARD}.sharding_spec.chunk_sharding_spec.ChunkShardingSpec"),
    (_Record, "torch.distributed.remote_device._remote_device"),
    (_mem_format, f"{_SHARD}.sharded_tensor.metadata.MEM_FORMAT_ENCODING"),
    (_getattr, "builtins.getattr"),
]


def load_sharded_file(path: Path) -> dict:
    """{name: _ShardedTensor or tensor} of one fsdp file, read with weights_only=True and the stand-ins."""
    from internlm.checkpoint.internevo_format import load_error

    try:
        with torch.serialization.safe_globals(_STAND_INS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a refused pickle, a truncated file ...: name the file
        raise load_error(path, exc) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict (InternEvo's fsdp model files do).")
    return obj


def merge_fsdp_files(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The full tensors of one tp rank and stage from its data-parallel ranks' fsdp files."""
    full: dict[str, torch.Tensor] = {}
    covered: dict[str, torch.Tensor] = {}
    for path in paths:
        for name, value in load_sharded_file(path).items():
            if not isinstance(value, _ShardedTensor):
                if not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"{path}: {name!r} is a {type(value).__name__}, not a tensor.")
                full.setdefault(name, value)  # a buffer or an unsharded tensor, whole in every file
                continue
            meta = value.sharded_metadata
            size = tuple(getattr(meta, "size", value.shape))
            if name not in full:
                full[name] = torch.zeros(size, dtype=value.dtype)
                covered[name] = torch.zeros(size, dtype=torch.bool)
            for shard in value.shards:
                offsets, sizes = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                index = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
                if tuple(shard.tensor.shape) != tuple(sizes) or any(o + s > d for o, s, d in zip(offsets, sizes, size)):
                    raise CheckpointError(f"{path}: a shard of {name!r} of shape {tuple(shard.tensor.shape)} at "
                                          f"{list(offsets)} does not fit its metadata (size {list(sizes)}) or the "
                                          f"tensor's shape {list(size)}.")
                full[name][index] = shard.tensor
                covered[name][index] = True
    for name, mask in covered.items():
        if not bool(mask.all()):
            raise CheckpointError(f"{paths[0].parent}: the shards of {name!r} in {', '.join(p.name for p in paths)} "
                                  f"cover {int(mask.sum())} of its {mask.numel()} elements: a data-parallel rank's "
                                  f"file is missing.")
    return full
