"""A checkpoint folder never runs code: payloads planted in every file a load reads (DCP metadata,
tensor shards, RNG states) are refused on every path that reads one (auto-resume, load_ckpt_info,
convert2hf, load_model, ckpt_info), with an error that names the file, and the payload never runs."""
from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from internlm.checkpoint import layout, safe_dcp, verify
from internlm.checkpoint.layout import CheckpointError
from tests.helpers import ROOT, TRAIN, read_metrics, run_python, write_config


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A save folder with complete checkpoints of steps 2 and 4 of the tiny model."""
    folder = tmp_path_factory.mktemp("saved")
    cfg = write_config(folder, ckpt=dict(enable_save_ckpt=True, save_ckpt_folder=str(folder / "ckpt"),
                                         checkpoint_every=2),
                       data=dict(total_steps=4), monitor=dict(run_folder=str(folder / "run"), log_every=1))
    proc = run_python([TRAIN, "--config", cfg], cwd=folder)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (folder / "ckpt" / "4" / layout.MARKER).is_file()
    return folder


def copy_of(saved: Path, tmp_path: Path) -> Path:
    target = tmp_path / "case"
    shutil.copytree(saved, target)
    return target


def test_planted_metadata_is_refused_by_the_reader(saved, tmp_path):
    """(A pickle of os.system names 'posix.system' on Linux.)"""
    case, marker = copy_of(saved, tmp_path), tmp_path / "pwned"
    ckpt = case / "ckpt" / "4"
    assert safe_dcp.read_metadata(ckpt).state_dict_metadata  # the real one reads
    (ckpt / ".metadata").write_bytes(evil_pickle(marker))
    with pytest.raises(CheckpointError, match=r"\.metadata names 'posix.system', which DCP metadata never holds"):
        safe_dcp.read_metadata(ckpt)
    (ckpt / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match=r"is corrupt: its DCP metadata .*\.metadata"):
        safe_dcp.read_metadata(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("with_manifest", [True, False])
def test_auto_resume_skips_a_planted_checkpoint_without_running_it(saved, tmp_path, with_manifest):
    """With its manifest the planted file is caught by its size; without (a crafted or pre-manifest
    checkpoint) by the unpickler. Either way it never runs, the run falls back to step 2, and the bad
    folder is moved aside so that step 4 is saved again."""
    case, marker = copy_of(saved, tmp_path), tmp_path / "pwned"
    bad = case / "ckpt" / "4"
    (bad / ".metadata").write_bytes(evil_pickle(marker))
    if not with_manifest:
        (bad / "manifest.json").unlink()
    cfg = write_config(case, name="resume.py",
                       ckpt=dict(enable_save_ckpt=True, save_ckpt_folder=str(case / "ckpt"), checkpoint_every=2),
                       data=dict(total_steps=6), monitor=dict(run_folder=str(case / "run2"), log_every=1))
    proc = run_python([TRAIN, "--config", cfg], cwd=case)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert not marker.exists()
    assert f"auto_resume skips {bad}" in out
    if with_manifest:
        assert re.search(rf"{re.escape(str(bad / '.metadata'))} has \d+ bytes, its manifest says \d+", out)
    else:
        assert "names 'posix.system', which DCP metadata never holds" in out
    assert "resumed from" in out and str(case / "ckpt" / "2") in out
    assert [r["step"] for r in read_metrics(case / "run2")] == [3, 4, 5, 6]
    moved = list((case / "ckpt").glob("4.corrupt-*"))
    assert len(moved) == 1 and (moved[0] / "CORRUPT.json").is_file()
    assert (bad / layout.MARKER).is_file() and safe_dcp.read_metadata(bad)  # step 4 saved again, cleanly


def test_load_ckpt_info_with_a_planted_checkpoint_is_a_clear_error(saved, tmp_path):
    case, marker = copy_of(saved, tmp_path), tmp_path / "pwned"
    (case / "ckpt" / "2" / ".metadata").write_bytes(evil_pickle(marker))
    (case / "ckpt" / "2" / "manifest.json").unlink()  # else its size mismatch is what stops it
    cfg = write_config(case, name="load.py", ckpt=dict(auto_resume=False, load_ckpt_info=dict(
        path=str(case / "ckpt" / "2"), content=("model",))), monitor=dict(run_folder=str(case / "run3")))
    proc = run_python([TRAIN, "--config", cfg], cwd=case)
    assert proc.returncode == 2 and not marker.exists()
    assert "Traceback" not in proc.stderr
    assert f"{case / 'ckpt' / '2' / '.metadata'} names 'posix.system'" in proc.stderr


def test_tools_and_load_model_refuse_a_planted_checkpoint(saved, tmp_path):
    case, marker = copy_of(saved, tmp_path), tmp_path / "pwned"
    ckpt = case / "ckpt" / "4"
    (ckpt / ".metadata").write_bytes(evil_pickle(marker))
    (ckpt / "manifest.json").unlink()
    proc = run_python([ROOT / "tools" / "convert2hf.py", "--src", ckpt, "--tgt", tmp_path / "hf"], cwd=case)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "posix.system" in proc.stderr
    proc = run_python([ROOT / "tools" / "ckpt_info.py", case / "ckpt"], cwd=case)
    assert "posix.system" in proc.stdout + proc.stderr
    from internlm import load_model

    with pytest.raises(CheckpointError, match="posix.system"):
        load_model(ckpt)
    assert not marker.exists()


def test_planted_tensor_shard_and_rng_file_are_refused(saved, tmp_path):
    case, marker = copy_of(saved, tmp_path), tmp_path / "pwned"
    ckpt = case / "ckpt" / "4"
    from internlm.checkpoint import state

    with pytest.raises(CheckpointError, match=f"cannot read the RNG state {ckpt / layout.rng_file(0)}"):
        (ckpt / layout.rng_file(0)).write_bytes(evil_pickle(marker))
        state.load_rng_file(ckpt / layout.rng_file(0))
    shard = next(ckpt.glob("*.distcp"))
    shard.write_bytes(evil_pickle(marker))
    wanted = {"model.tok_embeddings.weight": torch.empty(128, 64)}
    with pytest.raises(CheckpointError, match=f"checkpoint {ckpt} is corrupt: reading its tensors failed"):
        state.load_tensors(wanted, ckpt, no_dist=True)
    assert not marker.exists()


def test_an_entry_stored_as_a_pickled_object_is_refused(tmp_path):
    """A crafted checkpoint whose metadata says an entry is bytes (DCP would torch.load it with
    weights_only=False) is refused before any read."""
    import torch.distributed.checkpoint as dcp

    from internlm.checkpoint import state

    dcp.save({"model.a": torch.zeros(2), "model.b": "not a tensor"}, checkpoint_id=str(tmp_path / "c"),
             no_dist=True)
    with pytest.raises(CheckpointError, match="stores 'model.b' as a pickled object, not a tensor"):
        state.check_keys(tmp_path / "c", {"model.a": torch.zeros(2), "model.b": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="'model.b' is a pickled object"):
        state.load_tensors({"model.b": torch.zeros(1)}, tmp_path / "c", no_dist=True)


def test_flipped_bytes_are_found_by_the_manifest_and_ckpt_info_agrees_with_resume(saved, tmp_path):
    """4 KiB of flipped bytes inside a tensor shard (same size) loaded silently before manifests."""
    case = copy_of(saved, tmp_path)
    bad = case / "ckpt" / "4"
    shard = next(bad.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard} fails its checksum"):
        verify.check(bad, deep=True)
    verify.check(bad)  # sizes still match: only the deep check reads the bytes
    info = run_python([ROOT / "tools" / "ckpt_info.py", case / "ckpt"], cwd=case)
    assert info.returncode == 0
    assert "4            unusable:" in info.stdout and "fails its checksum" in info.stdout
    assert "2            step 2" in info.stdout and "<- newest (auto_resume takes this)" in info.stdout
    cfg = write_config(case, name="resume.py",
                       ckpt=dict(enable_save_ckpt=True, save_ckpt_folder=str(case / "ckpt"), checkpoint_every=2),
                       data=dict(total_steps=4), monitor=dict(run_folder=str(case / "run2"), log_every=1))
    proc = run_python([TRAIN, "--config", cfg], cwd=case)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "fails its checksum" in proc.stdout and f"resumed from {case / 'ckpt' / '2'}" in proc.stdout
    assert [r["step"] for r in read_metrics(case / "run2")] == [3, 4]


def test_manifest_lists_every_file_with_its_checksum(saved):
    ckpt = saved / "ckpt" / "4"
    files = verify.read_manifest(ckpt)
    assert set(files) == set(verify.all_files(ckpt))
    assert {".metadata", "state.json", "meta.json", "config.yaml", layout.rng_file(0)} <= set(files)
    for name, entry in files.items():
        assert entry == verify.file_entry(ckpt / name)
