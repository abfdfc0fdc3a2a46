"""Sharded, reshardable checkpoints with torch.distributed.checkpoint (see doc/checkpoint.md).

`layout` (on-disk format, which folders are usable; no torch) is light enough for tools;
`CheckpointManager` (saving, resuming, stopping) is imported on first use.
"""
from internlm.checkpoint.layout import CheckpointError, CheckpointInfo, check_checkpoint, find_latest, read_meta

__all__ = ["CheckpointError", "CheckpointInfo", "CheckpointManager", "check_checkpoint", "find_latest", "read_meta"]


def __getattr__(name):
    if name == "CheckpointManager":
        from internlm.checkpoint.manager import CheckpointManager

        return CheckpointManager
    raise AttributeError(f"module 'internlm.checkpoint' has no attribute {name!r}")
