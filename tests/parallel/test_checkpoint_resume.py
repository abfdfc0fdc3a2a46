"""Checkpoints end to end: `python train.py` / torchrun subprocesses on a tiny fp32 model (CPU, gloo).

Every run trains the same model on the same dummy data; the lr schedule is fixed at 12 steps, so a
run with `data.total_steps=6` is the first half of the 12-step reference, saves at step 6 and stops,
and a second run auto-resumes from that checkpoint to step 12. The global batch is 2 micro-batches
in every layout (micro_num=2 with dp=1, micro_num=1 with dp=2).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests import launcher
from tests.helpers import ROOT, run_python, write_config

# the tiny config with a 12-step schedule, a smaller batch (seq_len 32, one sample per micro-batch)
# and checkpoints every 6 steps
CKPT = dict(
    JOB_NAME="ckpt_test",
    model=dict(vocab_size=256, multiple_of=16),
    data=dict(seq_len=32, micro_num=2, micro_bsz=1, total_steps=12),
    adam=dict(lr=2e-3),
    lr_scheduler=dict(total_steps=12, warmup_ratio=0.25, eta_min=2e-4),
    beta2_scheduler=dict(init_beta2=0.95, c=0.8, cur_iter=-1),
    ckpt=dict(enable_save_ckpt=True, checkpoint_every=6, auto_resume=True),
    seed=7,
)
DP2 = ("parallel.zero1.size=2", "data.micro_num=1")


class Workspace:
    """The module's runs: one config file, a numbered work folder per run, checkpoints where told."""

    def __init__(self, root: Path):
        self.root = root
        self.config = write_config(root, "ckpt_test.py", **CKPT)
        self.n = 0

    def start(self, nproc: int, ckpt: Path, *overrides, env=None) -> launcher.Started:
        self.n += 1
        return launcher.start(nproc, [f"ckpt.save_ckpt_folder={ckpt}", *overrides], self.root / f"run{self.n}",
                              config=self.config, env=env)

    def train(self, nproc: int, ckpt: Path, *overrides, env=None, timeout=150) -> launcher.RunResult:
        return self.start(nproc, ckpt, *overrides, env=env).wait(timeout)


def _ok(run: launcher.RunResult) -> launcher.RunResult:
    assert run.returncode == 0, run.out[-4000:]
    return run


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def reference(ws):
    """The uninterrupted 12-step single-process run; it saves at steps 6 and 12."""
    return _ok(ws.train(1, ws.root / "ref_ckpt"))


def _tensors(path: Path) -> dict:
    """Every tensor of a DCP checkpoint, read without a process group."""
    import warnings

    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _load_state_dict_from_keys(checkpoint_id=str(path))


def _assert_same_metrics(reference: launcher.RunResult, runs: list[launcher.RunResult], rtol: float,
                         steps=range(1, 13)):
    got = {}
    for run in runs:
        got.update(run.by_step())
    ref = reference.by_step()
    assert sorted(got) == list(steps), sorted(got)
    for step in steps:
        for key in ("loss", "grad_norm"):
            a, b = ref[step][key], got[step][key]
            if rtol == 0:
                assert a == b, f"step {step} {key}: {a!r} != {b!r}"
            else:
                assert abs(a - b) <= rtol * abs(a), f"step {step} {key}: {a} vs {b}"
        assert ref[step]["lr"] == got[step]["lr"]
        assert ref[step]["num_consumed_tokens"] == got[step]["num_consumed_tokens"]


# ---- resume --------------------------------------------------------------------------------------

def test_resume_single_process_is_bitwise(ws, reference):
    ckpt = ws.root / "single"
    first = _ok(ws.train(1, ckpt, "data.total_steps=6"))
    assert sorted(p.name for p in ckpt.iterdir()) == ["6"]
    second = _ok(ws.train(1, ckpt))
    assert f"resumed from {ckpt / '6'} (step 6" in second.out
    _assert_same_metrics(reference, [first, second], rtol=0)
    # the weights and the optimizer state after step 12 are bitwise those of the uninterrupted run
    ref, got = _tensors(ws.root / "ref_ckpt" / "12"), _tensors(ckpt / "12")
    assert sorted(ref) == sorted(got)
    assert any(k.startswith("optim.state.") and k.endswith(".exp_avg_sq") for k in got)
    for key in ref:
        assert ref[key].equal(got[key]), key


def test_resume_dp2_zero1_async(ws, reference):
    ckpt = ws.root / "dp2"
    first = _ok(ws.train(2, ckpt, *DP2, "data.total_steps=6", "ckpt.checkpoint_every=3", "ckpt.async_upload=True"))
    assert sorted(p.name for p in ckpt.iterdir()) == ["3", "6"]
    second = _ok(ws.train(2, ckpt, *DP2))
    assert "resumed from" in second.out and "(step 6" in second.out
    _assert_same_metrics(reference, [first, second], rtol=1e-5)


# ---- resharding ----------------------------------------------------------------------------------

def test_reshard_tp2_to_dp2_zero1(ws, reference):
    ckpt = ws.root / "tp2"
    first = _ok(ws.train(2, ckpt, "parallel.tensor.size=2", "data.total_steps=6"))
    meta = json.loads((ckpt / "6" / "meta.json").read_text())
    assert meta["layout"]["tp"] == 2 and meta["world_size"] == 2
    second = _ok(ws.train(2, ckpt, *DP2))
    assert "saved under tp=2 pp=1 dp=1" in second.out
    _assert_same_metrics(reference, [first, second], rtol=1e-4)


def test_reshard_pp2_interleaved_to_one_process(ws, reference):
    """pp=2 x num_chunks=2: each rank holds two stage modules (two optimizers); resume on one process."""
    ckpt = ws.root / "pp2"
    first = _ok(ws.train(2, ckpt, "parallel.pipeline.size=2", "model.num_chunks=2", "data.total_steps=6"))
    second = _ok(ws.train(1, ckpt))
    assert "saved under tp=1 pp=2 dp=1 zero1=1 num_chunks=2" in second.out
    _assert_same_metrics(reference, [first, second], rtol=1e-4)


def test_reshard_isp2_wp2_to_tp2_and_to_one_process(ws, reference):
    """A checkpoint saved under isp (sequence parallel) with weight parallelism (FSDP over the isp
    group) resumes under tensor parallelism and under one process."""
    ckpt = ws.root / "isp2_wp2"
    first = _ok(ws.train(2, ckpt, "parallel.tensor.size=2", "parallel.tensor.mode='isp'", "parallel.weight.size=2",
                         "data.total_steps=6"))
    assert json.loads((ckpt / "6" / "meta.json").read_text())["layout"]["tp"] == 2
    for nproc, extra, name in ((2, ["parallel.tensor.size=2", "parallel.tensor.mode='msp'"], "tp2"), (1, [], "one")):
        folder = ws.root / f"isp2_wp2_to_{name}"
        shutil.copytree(ckpt, folder)
        second = _ok(ws.train(nproc, folder, *extra))
        assert "resumed from" in second.out and "(step 6" in second.out
        _assert_same_metrics(reference, [first, second], rtol=1e-5)


MOE = ("model_type='INTERNLM_MoE'", "model.num_experts=4", "loss.moe_loss_coeff=0.1")


@pytest.fixture(scope="module")
def moe_reference(ws):
    """The uninterrupted 12-step single-process run of a MoE model (4 experts, top-2 GShard)."""
    return _ok(ws.train(1, ws.root / "moe_ref_ckpt", *MOE))


def test_reshard_moe_ep2_to_one_process(ws, moe_reference):
    """Expert-parallel experts (DTensors over the expert dimension) saved under ep2 resume in one
    process: the same losses, gradient norms and expert loads as the uninterrupted run."""
    ckpt = ws.root / "moe_ep2"
    first = _ok(ws.train(2, ckpt, *MOE, *DP2, "parallel.expert.size=2", "data.total_steps=6"))
    assert json.loads((ckpt / "6" / "meta.json").read_text())["layout"]["ep"] == 2
    second = _ok(ws.train(1, ckpt, *MOE))
    assert "resumed from" in second.out and "(step 6" in second.out
    _assert_same_metrics(moe_reference, [first, second], rtol=1e-4)
    got = {**first.by_step(), **second.by_step()}
    ref = moe_reference.by_step()
    assert [got[s]["moe_load"] for s in range(1, 13)] == [ref[s]["moe_load"] for s in range(1, 13)]


def _stored_on_rank0(run: launcher.RunResult) -> float:
    return float(re.search(r"\(([\d.]+)M stored on rank 0\)", run.out).group(1))


def test_moe_experts_sharded_over_their_replicas_resume_whole(ws):
    """ep2 on 4 ranks: each expert has two replicas (edp=2), which shard its weights, gradients and AdamW
    state (InternEvo's expert ZeRO group, the default). Saved at step 6, the run continues on 2 ranks
    with whole experts (expert_zero1.size=1): the losses, gradient norms and expert loads of the
    uninterrupted single-process run."""
    reference = _ok(ws.train(1, ws.root / "moe_ref4_ckpt", *MOE, "data.micro_num=4"))  # 4 sequences a step
    ckpt = ws.root / "moe_ep2_edp2"
    first = _ok(ws.train(4, ckpt, *MOE, "data.micro_num=1", "parallel.expert.size=2", "data.total_steps=6"))
    assert "ep=2 (experts sharded over edp=2)" in first.out
    second = _ok(ws.train(2, ckpt, *MOE, "parallel.zero1.size=2", "parallel.expert.size=2",
                          "parallel.expert_zero1.size=1"))
    assert "resumed from" in second.out and "(step 6" in second.out
    _assert_same_metrics(reference, [first, second], rtol=1e-4)
    got = {**first.by_step(), **second.by_step()}
    ref = reference.by_step()
    assert [got[s]["moe_load"] for s in range(1, 13)] == [ref[s]["moe_load"] for s in range(1, 13)]
    # the sharded run's rank 0 stores half of its experts' weights: less than a whole copy on 4 ranks
    whole = _ok(ws.train(4, ws.root / "moe_ep2_edp2_whole", *MOE, "data.micro_num=1", "parallel.expert.size=2",
                         "parallel.expert_zero1.size=1", "data.total_steps=1"))
    assert "ep=2 (experts whole on edp=2)" in whole.out
    assert _stored_on_rank0(first) < _stored_on_rank0(whole)


# ---- crash safety --------------------------------------------------------------------------------

def _hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sigkill_during_save_resumes_from_previous_checkpoint(ws, reference):
    ckpt = ws.root / "crash"
    run = ws.start(1, ckpt, "ckpt.checkpoint_every=3", "ckpt.keep_last=1",
                   env={"INTERNLM_CKPT_TEST_SLOW_SAVE": "6:60"})
    deadline = time.time() + 120
    tmp = []
    while time.time() < deadline and run.poll() is None:
        tmp = [p for p in ckpt.glob("6.tmp-*") if (p / ".metadata").is_file() and (p / "meta.json").is_file()]
        if tmp:
            break
        time.sleep(0.05)
    assert tmp, "the step-6 save never reached its tmp folder"
    before = _hashes(ckpt / "3")
    run.kill()  # SIGKILL: all data of step 6 is written, but it was never published
    assert (ckpt / "3" / "COMPLETE").is_file()
    assert not (ckpt / "6").exists()
    assert _hashes(ckpt / "3") == before

    resumed = _ok(ws.train(1, ckpt, "ckpt.checkpoint_every=3", "ckpt.keep_last=1"))
    assert f"resumed from {ckpt / '3'} (step 3" in resumed.out
    assert "left by an interrupted save" in resumed.out
    first = launcher.RunResult(0, "", "", 0, records=run.records()[:3])
    _assert_same_metrics(reference, [first, resumed], rtol=0)
    assert sorted(p.name for p in ckpt.iterdir()) == ["12"]  # keep_last=1, the tmp folder cleared


# ---- stopping ------------------------------------------------------------------------------------

def _wait_for_step(run: launcher.Started, step: int, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(run.records()) >= step:
            return
        if run.poll() is not None:
            pytest.fail(f"training ended early:\n{run.output()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"training did not reach step {step}")


def _stopped_run(ws, ckpt, nproc, trigger, *overrides):
    """Start a long run, call trigger(run) after step 2, expect exit 0 and a checkpoint of the last step."""
    run = ws.start(nproc, ckpt, "data.total_steps=100000", "ckpt.checkpoint_every=1000", *overrides)
    _wait_for_step(run, 2)
    trigger(run)
    result = run.wait(timeout=120)
    out = result.out
    assert result.returncode == 0, out[-3000:]
    last = result.records[-1]["step"]
    assert last < 1000
    assert (ckpt / str(last) / "COMPLETE").is_file(), out[-2000:]
    assert f"stopped after step {last} on" in out
    return out, last


def test_stop_file_saves_and_exits_0(ws, tmp_path):
    stop = tmp_path / "STOP"
    out, last = _stopped_run(ws, ws.root / "stopfile", 1, lambda run: stop.write_text(""),
                             f"ckpt.stop_file_path={stop}")
    assert f"on stop file {stop}" in out
    assert not stop.exists()  # consumed, so a restarted job trains on


def test_sigterm_saves_and_exits_0(ws):
    out, _ = _stopped_run(ws, ws.root / "sigterm", 1, lambda run: run.send_signal(signal.SIGTERM))
    assert "on signal SIGTERM" in out


def test_sigusr1_on_one_rank_stops_every_rank(ws):
    """Only rank 1 gets the signal; the per-step all_reduce makes both ranks save the same step."""
    def signal_one_worker(run):
        workers = run.children()  # torchrun's
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGUSR1)

    ckpt = ws.root / "sigusr1"
    out, last = _stopped_run(ws, ckpt, 2, signal_one_worker, *DP2)
    assert len(list((ckpt / str(last)).glob("*.distcp"))) == 2


# ---- retention, snapshots, corrupt checkpoints, ckpt_info ---------------------------------------

def _ckpt_info(path: Path):
    return run_python([ROOT / "tools" / "ckpt_info.py", path], timeout=60)


def test_keep_last_snapshots_and_ckpt_info(ws):
    ckpt = ws.root / "retention"
    _ok(ws.train(1, ckpt, "ckpt.checkpoint_every=3", "ckpt.oss_snapshot_freq=2", "ckpt.keep_last=2"))
    assert sorted(p.name for p in ckpt.iterdir()) == ["12", "9", "snapshot"]
    # snapshots at steps 2, 4, 8, 10 (6 and 12 are checkpoint steps) alternate between the two slots
    slots = {s: json.loads((ckpt / "snapshot" / s / "meta.json").read_text())["step"] for s in ("0", "1")}
    assert slots == {"0": 8, "1": 10}
    assert all((ckpt / "snapshot" / s / "COMPLETE").is_file() for s in ("0", "1"))

    info = _ckpt_info(ckpt / "12")
    assert info.returncode == 0, info.stderr
    for text in ("step: 12", "tokens seen: 768", "tp=1 pp=1 dp=1 zero1=1", "model_type: INTERNLM2_PUBLIC",
                 "hidden_size=64 num_layers=4"):
        assert text in info.stdout, info.stdout
    listing = _ckpt_info(ckpt)
    assert listing.returncode == 0 and "12           step 12" in listing.stdout and "<- newest" in listing.stdout
    not_ckpt = _ckpt_info(ws.root)
    assert not_ckpt.returncode == 2 and "not a complete checkpoint" in not_ckpt.stderr


def test_corrupt_checkpoints_are_skipped_and_an_explicit_one_is_an_error(ws, reference):
    ckpt = ws.root / "corrupt"
    shutil.copytree(ws.root / "ref_ckpt", ckpt)  # complete checkpoints of steps 6 and 12
    # newer but unusable candidates: no marker, unreadable DCP metadata, unreadable meta.json
    shutil.copytree(ckpt / "12", ckpt / "15")
    (ckpt / "15" / "COMPLETE").unlink()
    shutil.copytree(ckpt / "12", ckpt / "14")
    meta = json.loads((ckpt / "14" / "meta.json").read_text())
    (ckpt / "14" / "meta.json").write_text(json.dumps(dict(meta, step=14)))
    (ckpt / "14" / ".metadata").write_bytes(b"not a pickle")
    shutil.copytree(ckpt / "12", ckpt / "snapshot" / "1")
    (ckpt / "snapshot" / "1" / "meta.json").write_text("{")
    listing = _ckpt_info(ckpt)
    assert listing.returncode == 0 and "15           unusable" in listing.stdout

    resumed = _ok(ws.train(1, ckpt, "data.total_steps=13", "lr_scheduler.total_steps=13"))
    assert f"resumed from {ckpt / '12'} (step 12" in resumed.out
    for bad in (ckpt / "14", ckpt / "15", ckpt / "snapshot" / "1"):
        assert f"auto_resume skips {bad}" in resumed.out
    assert [r["step"] for r in resumed.records] == [13]
    assert (ckpt / "13" / "COMPLETE").is_file() and (ckpt / "15").is_dir()  # unusable ones are left alone

    # an explicit path to an unusable checkpoint is a one-line error naming it (the corrupt-metadata
    # case is covered in tests/unit/test_checkpoint.py)
    bad = ckpt / "15"
    run = ws.train(1, ws.root / "unused", "ckpt.auto_resume=False",
                   f"ckpt.load_ckpt_info={{'path': '{bad}', 'content': ['all']}}")
    assert run.returncode == 2, run.out[-3000:]
    errors = [line for line in run.out.splitlines() if "error:" in line]
    assert errors and str(bad) in errors[0] and "incomplete" in errors[0], run.out[-3000:]
    assert "Traceback" not in run.out
