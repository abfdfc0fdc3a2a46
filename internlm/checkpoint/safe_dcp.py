"""Reading DCP checkpoints without running anything a checkpoint folder holds.

DCP keeps its `.metadata` as a Python pickle, and its default reader unpickles it with `pickle.load`:
a planted `.metadata` runs arbitrary code on every rank that merely lists or resumes checkpoints.
Here the metadata goes through an unpickler that builds only the classes DCP metadata is made of
(its dataclasses and enums, torch.Size, dtypes, layouts, paths); anything else is refused with an
error naming the file. Tensor shards are read by DCP with `torch.load(weights_only=True)`, and the
load planner refuses pickled (non-tensor) entries, which our checkpoints never hold.

    metadata = read_metadata(path)                     # instead of FileSystemReader(path).read_metadata()
    dcp.load(state, storage_reader=SafeReader(path), planner=TensorOnlyPlanner())
"""
from __future__ import annotations

import dataclasses
import enum
import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from internlm.checkpoint.layout import CheckpointError

METADATA_FILE = ".metadata"

_PATH_CLASSES = {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"}


def _allowed(module: str, name: str):
    """The object a DCP metadata pickle may name, or None."""
    if module == "torch.distributed.checkpoint.metadata":
        obj = getattr(dcp_metadata, name, None)
        if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
            return obj
        return None
    if module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo":
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        return _StorageInfo
    if module == "torch":
        obj = getattr(torch, name, None)
        if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            return obj
        return None
    if module == "torch.serialization" and name == "_get_layout":  # layout by name, from a fixed table
        from torch.serialization import _get_layout

        return _get_layout
    if module in ("pathlib", "pathlib._local") and name in _PATH_CLASSES:
        import pathlib

        return getattr(pathlib, name)
    if module == "collections" and name == "OrderedDict":
        import collections

        return collections.OrderedDict
    return None


class _Refused(pickle.UnpicklingError):
    """A pickle naming a global outside the allowlist."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        obj = _allowed(module, name)
        if obj is None:
            raise _Refused(f"{module}.{name}")
        return obj


def read_metadata(checkpoint) -> Metadata:
    """The DCP metadata of a checkpoint folder, built only from DCP's own classes. Raises
    CheckpointError naming the file when it is missing, unreadable or holds anything else."""
    path = Path(checkpoint) / METADATA_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {checkpoint} is corrupt: its DCP metadata {path} cannot be read "
                              f"({exc.strerror or type(exc).__name__})") from None
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except _Refused as exc:
        raise CheckpointError(f"checkpoint {checkpoint}: {path} names '{exc}', which DCP metadata never "
                              f"holds; refusing to load it (the file may have been tampered with)") from None
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"checkpoint {checkpoint} is corrupt: its DCP metadata {path} is not a valid "
                              f"pickle ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - truncated or garbage bytes fail in many ways
        raise CheckpointError(f"checkpoint {checkpoint} is corrupt: its DCP metadata {path} cannot be decoded "
                              f"({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"checkpoint {checkpoint} is corrupt: {path} holds a {type(metadata).__name__}, "
                              f"not DCP metadata")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's filesystem reader with the metadata read by `read_metadata`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        if rank is not None:  # per-rank metadata files are not written by our saves
            raise CheckpointError(f"checkpoint {self.path} asks for per-rank metadata, which this framework "
                                  f"never writes")
        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorOnlyPlanner(DefaultLoadPlanner):
    """DCP's load planner without its one pickle: a checkpoint entry stored as bytes (a pickled
    object) is refused instead of being unpickled."""

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn!r} is a pickled object, which this "
                              f"framework never saves; refusing to unpickle it")
