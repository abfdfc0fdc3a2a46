"""Runs end with a sentence: storage problems found at start or named at save time, Ctrl-C saves then
stops, a lost peer and an exiting config are named, and MFU never exceeds 100%."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from internlm.checkpoint.manager import CheckpointManager, storage_problem
from internlm.config import ConfigError, load_config
from internlm.errors import _collective_line, phase
from tests.helpers import TRAIN, clean_env, read_metrics, run_python, write_config


def test_an_unwritable_save_folder_stops_the_run_at_start(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = write_config(tmp_path, ckpt=dict(enable_save_ckpt=True, save_ckpt_folder=str(blocker / "ckpt")),
                       monitor=dict(run_folder=str(tmp_path / "run")))
    proc = run_python([TRAIN, "--config", cfg], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"ckpt.save_ckpt_folder='{blocker / 'ckpt'}' cannot be written" in proc.stderr
    assert read_metrics(tmp_path / "run") == []  # found before the first step, not at the first save


def test_too_little_free_space_is_found_at_start(tmp_path):
    m = CheckpointManager.__new__(CheckpointManager)
    m.folder, m.token, m.run_meta = tmp_path / "ckpt", "t", {"num_params": 10**15}  # 12 PB per checkpoint
    msg = m._check_storage()
    assert msg.startswith(f"ckpt.save_ckpt_folder='{tmp_path / 'ckpt'}' has ") and "less than one checkpoint" in msg
    m.run_meta = {"num_params": 1000}
    assert m._check_storage() is None


def test_storage_errors_are_named():
    from torch.distributed.checkpoint.api import CheckpointException

    assert storage_problem(OSError(errno.ENOSPC, "No space left on device"), None).startswith(
        "no space left on the device")
    assert storage_problem(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
                           None).startswith("no space left on the device")
    wrapped = CheckpointException("save failed", {1: (OSError(errno.EROFS, "Read-only", "/ckpt/x"), None)})
    assert storage_problem(wrapped, None) == "read-only file system (/ckpt/x)"
    assert storage_problem(RuntimeError("something else"), None) is None


def test_a_lost_peer_is_named_with_the_phase():
    with pytest.raises(RuntimeError) as info:
        with phase("step 3 save"):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:598] Connection reset by peer")
    assert _collective_line(info.value).startswith("another rank left (connection lost) during step 3 save: ")
    with pytest.raises(RuntimeError) as info:
        with phase("step 1 loss all-reduce"):
            raise RuntimeError("Timed out waiting 3000ms")
    assert _collective_line(info.value).startswith("collective failed or timed out during step 1 loss all-reduce")


def test_a_config_that_exits_or_raises_is_a_config_error(tmp_path):
    path = tmp_path / "exits.py"
    path.write_text("import sys\nmodel = dict(num_attention_heads=4)\nsys.exit(0)\n")
    with pytest.raises(ConfigError, match=r"exits.py called sys.exit\(0\) while being read"):
        load_config(path)
    path.write_text("x = 1 / 0\n")
    with pytest.raises(ConfigError, match="failed at line 1: ZeroDivisionError"):
        load_config(path)


def test_ctrl_c_saves_then_stops_and_twice_stops_at_once(tmp_path):
    cfg = write_config(tmp_path, data=dict(total_steps=400, dummy_num_samples=20000),
                       ckpt=dict(enable_save_ckpt=True, save_ckpt_folder=str(tmp_path / "ckpt"), checkpoint_every=1000),
                       monitor=dict(run_folder=str(tmp_path / "run")), lr_scheduler=dict(total_steps=400))
    out = (tmp_path / "out.txt").open("w")
    proc = subprocess.Popen([sys.executable, str(TRAIN), "--config", str(cfg)], cwd=tmp_path, env=clean_env(),
                            stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not read_metrics(tmp_path / "run") and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0
    text = (tmp_path / "out.txt").read_text()
    assert "interrupted: saving and stopping at the end of this step" in text and "stopped after step" in text
    steps = [r["step"] for r in read_metrics(tmp_path / "run")]
    assert (tmp_path / "ckpt" / str(steps[-1]) / "COMPLETE").is_file() and steps[-1] < 400

    out = (tmp_path / "out2.txt").open("w")
    cfg2 = write_config(tmp_path, name="again.py", data=dict(total_steps=400, dummy_num_samples=20000),
                        monitor=dict(run_folder=str(tmp_path / "run2")), lr_scheduler=dict(total_steps=400))
    proc = subprocess.Popen([sys.executable, str(TRAIN), "--config", str(cfg2)], cwd=tmp_path, env=clean_env(),
                            stdout=out, stderr=subprocess.STDOUT)
    while not read_metrics(tmp_path / "run2") and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) in (0, 130)  # the second press may land after the step already ended
    text = (tmp_path / "out2.txt").read_text()
    assert "Traceback" not in text


def test_ctrl_c_while_the_first_step_runs_asks_for_a_stop():
    """The handlers are in place before step 1: a press while it runs (or is being logged) is a stop request,
    not a KeyboardInterrupt (the CI once caught one between the first metrics line and the first save check)."""
    from internlm.trainer import Trainer

    manager = CheckpointManager.__new__(CheckpointManager)
    manager._old_handlers, manager._signal, manager.enabled = None, None, True
    t = Trainer.__new__(Trainer)
    t.cfg = SimpleNamespace(data=SimpleNamespace(total_steps=5, valid_every=0), monitor=SimpleNamespace(log_every=1))
    t.checkpoints, t.train_loader, t.state = manager, [{}], SimpleNamespace(step=0)
    seen = []

    def train_step(batch):
        try:
            os.kill(os.getpid(), signal.SIGINT)  # delivered before the next bytecode: to our handler, not as an error
            seen.append(manager._signal)
        except KeyboardInterrupt:  # no handler yet: the bare interrupt the CI saw
            seen.append("KeyboardInterrupt")
        raise LookupError("leave the loop")

    t.train_step = train_step
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when started in the background
    with pytest.raises(LookupError):
        t.fit()
    assert seen == ["SIGINT"]
    assert signal.getsignal(signal.SIGINT) is before  # the loop gone, Ctrl-C does what it did before


def test_mfu_never_exceeds_100_percent(monkeypatch):
    from internlm import metrics
    from internlm.trainer import Trainer

    t = Trainer.__new__(Trainer)
    t.cfg = SimpleNamespace(monitor=SimpleNamespace(peak_tflops=None))
    t.model_kernels = SimpleNamespace(cpu_fp32_gemm=False)
    t.dtype, t.device, t.peak_flops = torch.bfloat16, torch.device("cpu"), 1e11  # probed while busy
    monkeypatch.setattr(metrics, "measure_peak_tflops", lambda *a, **k: 0.12)  # still busy
    speed = t._honest_peak({"mfu": 1.35, "tgs": 1.0})
    assert speed["mfu"] == pytest.approx(1.0) and t.peak_flops == pytest.approx(1.35e11)
    monkeypatch.setattr(metrics, "measure_peak_tflops", lambda *a, **k: 0.27)  # the machine is free again
    t.peak_flops = 1e11
    speed = t._honest_peak({"mfu": 1.35, "tgs": 1.0})
    assert speed["mfu"] == pytest.approx(0.5) and t.peak_flops == pytest.approx(2.7e11)
    assert t._honest_peak({"mfu": 0.4})["mfu"] == 0.4
