"""Checkpoint pieces without training: on-disk layout rules, the per-part optimizer, the DCP state
dict round trip (single process, no process group), RNG, schedulers, errors and tools/ckpt_info.py."""
from __future__ import annotations

import importlib
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from internlm.checkpoint import layout
from internlm.checkpoint import state as ckpt_tensors
from internlm.checkpoint.layout import CheckpointError
from internlm.checkpoint.manager import CheckpointManager
from internlm.config import AdamConfig
from internlm.optim.hybrid_zero import HybridZeroOptimizer
from internlm.optim.lr import Beta2Scheduler, WarmupCosineLR

pytestmark = pytest.mark.filterwarnings("ignore")  # DCP warns when used without a process group



def fake_ckpt(path: Path, step: int, marker: bool = True, kind: str = "checkpoint") -> Path:
    """A checkpoint folder with every file a check reads (a real one-tensor DCP checkpoint)."""
    import torch.distributed.checkpoint as dcp

    path.mkdir(parents=True)
    dcp.save({"model.w": torch.zeros(2)}, checkpoint_id=str(path), no_dist=True)
    (path / "meta.json").write_text(json.dumps({
        "format": layout.FORMAT, "step": step, "kind": kind, "tokens_seen": step * 10, "world_size": 2,
        "model_type": "INTERNLM2_PUBLIC", "layout": {"tp": 2, "pp": 1, "dp": 1, "zero1": 1, "num_chunks": 1}}))
    (path / "state.json").write_text(json.dumps({"step": step, "optimizer": {}, "lr_scheduler": {}, "sampler": {}}))
    (path / "config.yaml").write_text("JOB_NAME: fake\nmodel:\n  hidden_size: 64\n  num_layers: 2\n")
    if marker:
        (path / "COMPLETE").write_text("{}")
    return path


# ---- layout ----------------------------------------------------------------------------------------

def test_find_latest_takes_newest_complete_and_names_the_skipped(tmp_path):
    fake_ckpt(tmp_path / "3", 3)
    fake_ckpt(tmp_path / "6", 6)
    fake_ckpt(tmp_path / "9", 9, marker=False)  # save never finished
    bad_meta = fake_ckpt(tmp_path / "12", 12)
    (bad_meta / "meta.json").write_text("{")
    empty_md = fake_ckpt(tmp_path / "15", 15)
    (empty_md / ".metadata").write_bytes(b"")
    fake_ckpt(tmp_path / "18.tmp-abc", 18)  # tmp folders are never candidates
    best, skipped = layout.find_latest(tmp_path)
    assert best.path == tmp_path / "6" and best.step == 6
    reasons = {p.name: why for p, why in skipped}
    assert set(reasons) == {"9", "12", "15"}
    assert "incomplete" in reasons["9"] and str(tmp_path / "9") in reasons["9"]
    assert "unreadable" in reasons["12"]
    assert "corrupt" in reasons["15"]


def test_find_latest_orders_by_meta_step_with_snapshots(tmp_path):
    fake_ckpt(tmp_path / "6", 6)
    fake_ckpt(tmp_path / "snapshot" / "0", 8, kind="snapshot")
    fake_ckpt(tmp_path / "snapshot" / "1", 4, kind="snapshot")
    assert layout.find_latest(tmp_path)[0].path == tmp_path / "snapshot" / "0"
    fake_ckpt(tmp_path / "8", 8)  # a step folder wins a tie with a snapshot
    assert layout.find_latest(tmp_path)[0].path == tmp_path / "8"
    assert layout.find_latest(tmp_path / "missing") == (None, [])


def test_check_checkpoint_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        layout.check_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=f"{tmp_path} is not a complete checkpoint"):
        layout.check_checkpoint(tmp_path)
    half = fake_ckpt(tmp_path / "5", 5, marker=False)
    with pytest.raises(CheckpointError, match=f"checkpoint {half} is incomplete"):
        layout.check_checkpoint(half, allow_model_only=True)  # a training save without marker never loads
    # weights written by another tool (e.g. an HF import: DCP + its own meta.json, no marker)
    imported = tmp_path / "imported"
    imported.mkdir()
    (imported / ".metadata").write_bytes(b"dcp")
    (imported / "meta.json").write_text(json.dumps({"step": 0, "source": "huggingface"}))
    with pytest.raises(CheckpointError):
        layout.check_checkpoint(imported)
    info = layout.check_checkpoint(imported, allow_model_only=True)
    assert info.model_only and info.step == 0
    # a complete folder whose state.json has no training state (tools/convert_hf2internlm.py writes
    # these) loads model weights but is never auto-resumed
    weights = fake_ckpt(tmp_path / "save" / "0", 0)
    (weights / "state.json").write_text(json.dumps({"step": 0}))
    assert layout.check_checkpoint(weights).model_only
    best, skipped = layout.find_latest(tmp_path / "save")
    assert best is None and "model weights only" in skipped[0][1]


def test_commit_renames_then_marks_and_rotates_a_snapshot_slot(tmp_path):
    slot = fake_ckpt(tmp_path / "snapshot" / "0", 2, kind="snapshot")
    tmp = fake_ckpt(layout.tmp_path(slot, "tok"), 6, marker=False, kind="snapshot")
    assert tmp.name == "0.tmp-tok"
    layout.commit(tmp, slot, "tok", 6)
    assert not tmp.exists() and layout.check_checkpoint(slot).step == 6
    assert json.loads((slot / "COMPLETE").read_text())["step"] == 6
    assert layout.stale_folders(tmp_path) == []  # the old slot content is gone
    step = fake_ckpt(tmp_path / "9.tmp-tok", 9, marker=False)
    layout.commit(step, tmp_path / "9", "tok", 9)
    assert layout.check_checkpoint(tmp_path / "9").step == 9


def test_prune_keeps_newest_complete_and_never_the_protected(tmp_path):
    for s in (3, 6, 9, 12):
        fake_ckpt(tmp_path / str(s), s)
    fake_ckpt(tmp_path / "15", 15, marker=False)
    fake_ckpt(tmp_path / "snapshot" / "0", 1, kind="snapshot")
    assert layout.prune(tmp_path, 0, protect=tmp_path / "12") == []
    removed = layout.prune(tmp_path, 2, protect=tmp_path / "12")
    assert sorted(p.name for p in removed) == ["3", "6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["12", "15", "9", "snapshot"]
    assert layout.prune(tmp_path, 1, protect=tmp_path / "9") == []  # the protected one stays


def test_stale_folders_are_tmp_and_old_leftovers(tmp_path):
    fake_ckpt(tmp_path / "3", 3)
    (tmp_path / "6.tmp-1-aa").mkdir()
    (tmp_path / "snapshot" / "1.old-2-bb").mkdir(parents=True)
    assert [p.name for p in layout.stale_folders(tmp_path)] == ["6.tmp-1-aa", "1.old-2-bb"]


# ---- optimizer per model part and the DCP state dict -----------------------------------------------

class Part(nn.Module):
    """A stand-in for a pipeline stage: layers keep their global index as name; only the last
    stage has the final norm."""

    def __init__(self, names, last):
        super().__init__()
        self.layers = nn.ModuleDict({n: nn.Linear(4, 4) for n in names})
        self.norm = nn.LayerNorm(4) if last else None

    def forward(self, x):
        for layer in self.layers.values():
            x = torch.tanh(layer(x))
        return self.norm(x) if self.norm is not None else x


ADAM = AdamConfig(lr=1e-2, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.1)


def build(seed=0, names=(("0",), ("1",)), clip=1.0):
    torch.manual_seed(seed)
    parts = [Part(n, last=i == len(names) - 1) for i, n in enumerate(names)]
    opt = HybridZeroOptimizer(parts, ADAM, clip, 1, torch.device("cpu"))
    sched = WarmupCosineLR(opt.torch_optimizer, total_steps=10, warmup_ratio=0.3, eta_min=1e-3)
    beta2 = Beta2Scheduler(opt.torch_optimizer, init_beta2=0.95, c=0.8)
    return parts, opt, sched, beta2


def train_steps(parts, opt, sched, beta2, n, x):
    for _ in range(n):
        y = x
        for part in parts:
            y = part(y)
        y.pow(2).sum().backward()
        opt.step()
        sched.step()
        beta2.step()


def test_part_optimizers_step_exactly_like_one_adamw():
    x = torch.randn(5, 4)
    parts, opt, sched, beta2 = build(clip=None)
    assert len(opt.part_optimizers) == 2 and len(opt.param_groups) == 4  # decay + no_decay per part
    torch.manual_seed(0)
    ref_parts = [Part(("0",), last=False), Part(("1",), last=True)]
    ref_params = [p for m in ref_parts for p in m.parameters()]
    ref = torch.optim.AdamW([{"params": [p for p in ref_params if p.ndim >= 2], "weight_decay": 0.1},
                             {"params": [p for p in ref_params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)  # adam.impl="auto"
    ref_sched = WarmupCosineLR(ref, total_steps=10, warmup_ratio=0.3, eta_min=1e-3)
    for _ in range(4):
        train_steps(parts, opt, sched, beta2, 1, x)
        y = x
        for part in ref_parts:
            y = part(y)
        y.pow(2).sum().backward()
        ref.step()
        ref.zero_grad()
        ref_sched.step()
        for g in ref.param_groups:
            g["betas"] = (0.9, beta2.get_beta2())
    for a, b in zip([p for m in parts for p in m.parameters()], ref_params):
        assert torch.equal(a, b)
    # the LR scheduler drives every part's groups
    assert {g["lr"] for g in opt.param_groups} == {ref.param_groups[0]["lr"]}


@pytest.mark.parametrize("load_names", [(("0",), ("1",)), (("0", "1"),)], ids=["same-parts", "one-part"])
def test_dcp_round_trip_continues_bitwise_and_reshards_across_parts(tmp_path, load_names):
    """Saved from two stage modules, loaded into two (or one holding both layers): training goes on
    exactly as without the interruption. Keys are the canonical parameter names."""
    x = torch.randn(5, 4)
    parts, opt, sched, beta2 = build()
    train_steps(parts, opt, sched, beta2, 3, x)
    state = ckpt_tensors.save_state_dict(parts, opt.part_optimizers)
    assert {"model.layers.0.weight", "model.layers.1.bias", "optim.state.layers.0.weight.exp_avg",
            "optim.state.layers.1.weight.step"} <= set(state)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # nothing to unpickle on load
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(tmp_path))
    parts2, opt2, sched2, beta22 = build(seed=1, names=load_names)
    if len(load_names) == 1:
        parts, opt, sched, beta2 = build(seed=2, names=load_names)  # reference: the same model as one part
        ckpt_tensors.load_model(parts, tmp_path)
        ckpt_tensors.load_optimizer(parts, opt.part_optimizers, tmp_path)
    ckpt_tensors.load_model(parts2, tmp_path)
    ckpt_tensors.load_optimizer(parts2, opt2.part_optimizers, tmp_path)
    for a, b in zip([p for m in parts for p in m.parameters()], [p for m in parts2 for p in m.parameters()]):
        assert torch.equal(a, b)
    m = CheckpointManager.__new__(CheckpointManager)
    m.lr_scheduler, m.beta2_scheduler, m.optimizer, m.rank = sched2, beta22, opt2, 0
    m._load_schedulers({"lr_scheduler": sched.state_dict(), "beta2_scheduler": beta2.state_dict()})
    assert [g["lr"] for g in opt2.param_groups] == [opt.param_groups[0]["lr"]] * len(opt2.param_groups)
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
    train_steps(parts, opt, sched, beta2, 3, x)
    train_steps(parts2, opt2, sched2, beta22, 3, x)
    for a, b in zip([p for m in parts for p in m.parameters()], [p for m in parts2 for p in m.parameters()]):
        assert torch.equal(a, b)


def test_check_keys_names_missing_and_mismatched_keys_and_corrupt_metadata(tmp_path):
    import torch.distributed.checkpoint as dcp

    dcp.save({"model.a": torch.zeros(2, 3), "model.b": torch.zeros(4)}, checkpoint_id=str(tmp_path / "c"))
    ckpt_tensors.check_keys(tmp_path / "c", {"model.a": torch.zeros(2, 3)})
    with pytest.raises(CheckpointError, match=r"does not fit this model: 1 missing key\(s\), e.g. model.z; "
                                              r"1 shape mismatch\(es\), e.g. model.b: saved \[4\], model \[5\]"):
        ckpt_tensors.check_keys(tmp_path / "c", {"model.z": torch.zeros(1), "model.b": torch.zeros(5)})
    (tmp_path / "c" / ".metadata").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'c'} is corrupt"):
        ckpt_tensors.check_keys(tmp_path / "c", {"model.a": torch.zeros(2, 3)})


def test_rng_state_round_trip_loads_with_weights_only(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    torch.save(ckpt_tensors.rng_state(torch.device("cpu")), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    ckpt_tensors.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), torch.device("cpu"))
    got = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2:] == got[2:]


def test_checkpoint_package_does_not_import_internlm_hf():
    code = ("import sys, internlm.checkpoint.manager, internlm.checkpoint.reader; "
            "print(sorted(m for m in sys.modules if m.startswith('internlm.hf')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


def test_hf_ckpt_type_without_internlm_hf_is_a_checkpoint_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "internlm.hf", None)
    m = CheckpointManager.__new__(CheckpointManager)
    m.model_parts, m.rank = [], 0
    with pytest.raises(CheckpointError, match=r"ckpt_type='hf' needs internlm/hf/"):
        m._load_hf("/some/hf/folder")


# ---- tools/ckpt_info.py ----------------------------------------------------------------------------

def ckpt_info():
    return importlib.import_module("internlm.cli.ckpt_info")


def test_ckpt_info_prints_a_checkpoint_and_lists_a_save_folder(tmp_path, capsys):
    tool = ckpt_info()
    fake_ckpt(tmp_path / "4", 4)
    fake_ckpt(tmp_path / "8", 8, marker=False)
    assert tool.main([str(tmp_path / "4")]) == 0
    out = capsys.readouterr().out
    for text in ("step: 4", "tokens seen: 40", "world_size=2 tp=2 pp=1 dp=1 zero1=1 num_chunks=1",
                 "model_type: INTERNLM2_PUBLIC", "hidden_size=64 num_layers=2"):
        assert text in out
    assert tool.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "<- newest" in out and "8            unusable" in out


def test_ckpt_info_exits_2_on_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    tool = ckpt_info()
    (tmp_path / "notes.txt").write_text("hi")
    assert tool.main([str(tmp_path)]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err
    fake_ckpt(tmp_path / "2", 2, marker=False)
    assert tool.main([str(tmp_path)]) == 2


def test_an_interrupted_prune_leaves_no_step_folder_and_is_cleaned_at_start(tmp_path, monkeypatch):
    for step in (2, 4, 6):
        fake_ckpt(tmp_path / str(step), step)

    def crash(path, ignore_errors=False):
        raise KeyboardInterrupt  # the process dies while deleting

    monkeypatch.setattr(layout.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        layout.prune(tmp_path, keep_last=2, protect=tmp_path / "6")
    monkeypatch.undo()
    assert not (tmp_path / "2").exists()  # never an incomplete step folder
    assert layout.stale_folders(tmp_path) == [tmp_path / "2.old-prune"]  # removed by the next start
    assert [i.step for i in layout.complete_step_folders(tmp_path)] == [4, 6]
