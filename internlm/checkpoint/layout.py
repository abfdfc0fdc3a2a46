"""What a checkpoint is on disk, which folders may be used, and the rank-0 file operations that
make a save atomic. Plain Python: no torch and no process group, so tools can use it anywhere.

    <save_ckpt_folder>/
      6/                        a complete checkpoint of step 6
        .metadata __0_0.distcp  one torch.distributed.checkpoint (DCP) checkpoint:
                                model.<fqn> (full logical tensors) and optim.state.<fqn>.<name>
        state.json              train state, schedulers, grad scaler, sampler position
        rng/rank_00000.pt       each rank's RNG states
        config.yaml             the resolved config of the run that saved it
        tokenizer.model         a copy of data.tokenizer_path (when the run has one)
        meta.json               step, layout, tokens seen, model_type, versions, time
        COMPLETE                written last: a folder without it is never used
      12.tmp-<token>/           a save in progress, or the remains of a crashed one
      snapshot/0  snapshot/1    two alternating slots, each holding the same files as a step folder

A save writes into `<name>.tmp-<token>/`; rank 0 renames it to `<name>/` once every rank has
written and then writes `COMPLETE`. A complete checkpoint is never overwritten: pruning and
snapshot rotation remove the marker first, so an interrupted delete leaves an incomplete folder.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from internlm.errors import UserError

MARKER = "COMPLETE"
META = "meta.json"
STATE = "state.json"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.model"  # a copy of the run's data.tokenizer_path, when it has one
TOKENIZER_CONFIG = "tokenizer_config.json"  # and of the HF tokenizer_config.json beside it (its added tokens)
RNG_DIR = "rng"
DCP_METADATA = ".metadata"
SNAPSHOT_DIR = "snapshot"
SNAPSHOT_SLOTS = ("0", "1")
HF_EXPORT_DIR = "hf"  # enable_internevo2hf_ckpt: <save_ckpt_folder>/hf/<step>
FORMAT = "internlm-dcp"
FORMAT_VERSION = 1


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used, worded for the user (train.py prints it as one line)."""


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    meta: dict
    model_only: bool = False  # weights written by another tool (e.g. an HF import): no train state

    @property
    def is_snapshot(self) -> bool:
        return self.path.parent.name == SNAPSHOT_DIR


def rng_file(rank: int) -> str:
    return f"{RNG_DIR}/rank_{rank:05d}.pt"


def tmp_path(final: Path, token: str) -> Path:
    return final.with_name(f"{final.name}.tmp-{token}")


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path.parent} has no {path.name}") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} is unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} does not hold a {what} object")
    return data


def read_meta(path) -> dict:
    path = Path(path)
    meta = read_json(path / META, "metadata")
    if meta.get("format") != FORMAT or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"checkpoint {path}: {META} is not an {FORMAT} metadata file")
    return meta


def _is_training_save(path: Path) -> bool:
    try:
        return json.loads((path / META).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_checkpoint(path, allow_model_only: bool = False) -> CheckpointInfo:
    """The checkpoint at `path`, or CheckpointError saying why it must not be used.

    `allow_model_only` also accepts a folder holding only a DCP checkpoint of `model.<fqn>` tensors
    written by another tool (no marker; its meta.json, if any, is not a training save's)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a folder")
    dcp_md = path / DCP_METADATA
    dcp_ok = dcp_md.is_file() and dcp_md.stat().st_size > 0
    if not (path / MARKER).is_file():
        if _is_training_save(path):
            raise CheckpointError(f"checkpoint {path} is incomplete: it has no {MARKER} marker (its save did "
                                  f"not finish)")
        if allow_model_only and dcp_ok:
            try:
                meta = json.loads((path / META).read_text()) if (path / META).is_file() else {}
            except (OSError, ValueError):
                meta = {}
            step = meta.get("step", 0) if isinstance(meta, dict) else 0
            return CheckpointInfo(path=path, step=step if isinstance(step, int) else 0,
                                  meta=meta if isinstance(meta, dict) else {}, model_only=True)
        raise CheckpointError(f"{path} is not a complete checkpoint of this framework (no {MARKER} marker"
                              + (")" if dcp_md.is_file() else f", no DCP {DCP_METADATA})"))
    meta = read_meta(path)
    if not dcp_ok:
        raise CheckpointError(f"checkpoint {path} is corrupt: its DCP {DCP_METADATA} file is missing or empty")
    train = read_json(path / STATE, "train state")
    model_only = not {"optimizer", "lr_scheduler", "sampler"} <= set(train)  # e.g. an HF import
    return CheckpointInfo(path=path, step=int(meta["step"]), meta=meta, model_only=model_only)


def candidate_folders(folder) -> list[Path]:
    """Step folders and snapshot slots under a save folder (complete or not; no tmp folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
    found += [folder / SNAPSHOT_DIR / s for s in SNAPSHOT_SLOTS if (folder / SNAPSHOT_DIR / s).is_dir()]
    return found


def find_latest(folder, check=check_checkpoint) -> tuple[CheckpointInfo | None, list[tuple[Path, str]]]:
    """The newest checkpoint under `folder` that a run can resume from (by the step in meta.json; a
    step folder wins a tie with a snapshot), and the (folder, reason) of every candidate skipped."""
    best, skipped = None, []
    for path in candidate_folders(folder):
        try:
            info = check(path)
        except CheckpointError as exc:
            skipped.append((path, str(exc)))
            continue
        if info.model_only:
            skipped.append((path, f"checkpoint {path} holds model weights only (no training state to resume)"))
            continue
        key = (info.step, not info.is_snapshot)
        if best is None or key > (best.step, not best.is_snapshot):
            best = info
    return best, sorted(skipped)


def complete_step_folders(folder) -> list[CheckpointInfo]:
    out = []
    for path in candidate_folders(folder):
        if path.parent == Path(folder) and (path / MARKER).is_file():
            try:
                out.append(CheckpointInfo(path, int(read_meta(path)["step"]), {}))
            except CheckpointError:
                out.append(CheckpointInfo(path, int(path.name), {}))
    return sorted(out, key=lambda i: i.step)


# ---- rank-0 file operations -----------------------------------------------------------------------

def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    write_file_atomic(path, json.dumps(data, indent=1, sort_keys=False) + "\n")


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder: marker first, then renamed to `<name>.old-prune` (one atomic step
    out of the candidates) and deleted; a crash half way leaves a leftover that the next start removes
    (`stale_folders`), never an incomplete step folder."""
    marker = path / MARKER
    if marker.exists():
        marker.unlink()
        fsync_dir(path)
    doomed = path.with_name(f"{path.name}.old-prune")
    try:
        os.replace(path, doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def commit(tmp: Path, final: Path, token: str, step: int) -> None:
    """Publish a fully written `tmp` folder as `final`: rename, then the marker. An existing `final`
    (a snapshot slot being rotated, or an incomplete leftover) is first moved aside and removed only
    after the new folder is complete."""
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{token}")
        marker = final / MARKER
        if marker.exists():
            marker.unlink()
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    write_json(final / MARKER, {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    fsync_dir(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune(folder, keep_last: int, protect: Path) -> list[Path]:
    """Remove all but the newest `keep_last` complete step folders (never `protect`)."""
    if keep_last <= 0:
        return []
    complete = complete_step_folders(folder)
    doomed = [i.path for i in complete[:-keep_last] if i.path != protect]
    for path in doomed:
        remove_checkpoint(path)
    return doomed


def stale_folders(folder) -> list[Path]:
    """Leftovers of interrupted saves: `<name>.tmp-<token>` and `<name>.old-<token>` folders."""
    folder = Path(folder)
    out = []
    for parent in (folder, folder / SNAPSHOT_DIR):
        if parent.is_dir():
            out += [p for p in parent.iterdir() if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name)]
    return sorted(out)
