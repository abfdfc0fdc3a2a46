"""Whether a checkpoint folder can be trusted: the one check auto-resume, load_ckpt_info and
tools/ckpt_info.py all run, so the tool reports exactly what a run would take.

A save ends with `manifest.json` (written before the COMPLETE marker): the size and CRC-32 of every
file of the checkpoint. Each rank hashes the files it wrote while the others do the same, so hashing
costs one read of a rank's own shards. `check(path)` then verifies, in order:

1. the folder is complete (`layout.check_checkpoint`: meta.json, COMPLETE marker, state.json);
2. every file the manifest lists exists with its recorded size (cheap: `stat` only);
3. the DCP metadata reads through the safe unpickler (`safe_dcp.read_metadata`: nothing runs);
4. with `deep=True`, every file's CRC-32 matches (a flipped byte anywhere is found before it is loaded).

Checkpoints written before manifests existed pass 2 and 4 with nothing to compare.
"""
from __future__ import annotations

import os
import time
import zlib
from pathlib import Path

from internlm.checkpoint import layout, safe_dcp
from internlm.checkpoint.layout import CheckpointError

MANIFEST = "manifest.json"
_CHUNK = 16 << 20


def file_entry(path: Path) -> dict:
    """{"size", "crc32"} of one file, read in 16 MiB chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": f"{crc:08x}"}


def hash_files(folder: Path, names) -> dict[str, dict]:
    return {name: file_entry(Path(folder) / name) for name in sorted(names)}


def rank_files(folder: Path, rank: int) -> list[str]:
    """The files rank `rank` wrote into a checkpoint folder: its DCP shards and its RNG file."""
    folder = Path(folder)
    names = [p.name for p in folder.glob(f"__{rank}_*.distcp")]
    if (folder / layout.rng_file(rank)).is_file():
        names.append(layout.rng_file(rank))
    return names


def all_files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder (relative names), except the manifest and the marker."""
    folder = Path(folder)
    skip = {MANIFEST, layout.MARKER}
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
                  and str(p.relative_to(folder)) not in skip and not p.name.startswith("."+MANIFEST))


def write_manifest(folder: Path, entries: dict[str, dict], seconds: float) -> None:
    """Rank 0, before the marker: `entries` from every rank plus the files no rank listed."""
    folder = Path(folder)
    missing = [n for n in all_files(folder) if n not in entries]
    entries = {**entries, **hash_files(folder, missing)}
    layout.write_json(folder / MANIFEST, {"algorithm": "crc32", "files": dict(sorted(entries.items())),
                                          "hash_seconds": round(seconds, 3),
                                          "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    files = layout.read_json(path, "manifest").get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST} lists no files")
    return files


def check_sizes(folder: Path, files: dict) -> None:
    for name, entry in files.items():
        path = Path(folder) / name
        try:
            size = os.stat(path).st_size
        except OSError:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {path} is missing") from None
        if size != entry.get("size"):
            raise CheckpointError(f"checkpoint {folder} is corrupt: {path} has {size} bytes, its manifest "
                                  f"says {entry.get('size')} (truncated or overwritten)")


def check_checksums(folder: Path, files: dict, names=None) -> None:
    """Verify the CRC-32 of `names` (default: every listed file)."""
    for name in sorted(files if names is None else names):
        entry = files[name]
        got = file_entry(Path(folder) / name)["crc32"]
        if got != entry.get("crc32"):
            raise CheckpointError(f"checkpoint {folder} is corrupt: {Path(folder) / name} fails its checksum "
                                  f"(crc32 {got}, manifest {entry.get('crc32')}): its bytes changed after the save")


def check(path, allow_model_only: bool = False, deep: bool = False) -> layout.CheckpointInfo:
    """The checkpoint's info, or CheckpointError naming the file that makes it unusable."""
    info = layout.check_checkpoint(path, allow_model_only=allow_model_only)
    files = read_manifest(info.path)
    if files is not None:
        check_sizes(info.path, files)
    safe_dcp.read_metadata(info.path)
    if deep and files is not None:
        check_checksums(info.path, files)
    return info


def find_latest(folder, deep: bool = True):
    """(newest usable checkpoint or None, [(skipped folder, reason)]), as auto-resume sees them."""
    return layout.find_latest(folder, lambda p: check(p, deep=deep))


def move_aside(path: Path, reason: str) -> Path:
    """Rename an unusable checkpoint to `<name>.corrupt-<time>` (never deleted: it may hold data worth
    rescuing); its step can then be saved again. Returns the new path."""
    path = Path(path)
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, target)
    layout.write_json(target / "CORRUPT.json", {"reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return target
