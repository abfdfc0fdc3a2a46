"""Under torchrun --max-restarts, a SIGKILLed rank makes the job restart and auto-resume, and the losses
after the restart are those of an uninterrupted run; finished 2-process runs exit 0 every time, also on
a loaded machine (no abort at exit)."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time

from tests import launcher
from tests.helpers import TRAIN, clean_env, read_metrics, write_config

STEPS = 24
ELASTIC = dict(data=dict(total_steps=STEPS, micro_num=2, dummy_num_samples=4000),
               lr_scheduler=dict(total_steps=STEPS), parallel=dict(zero1=dict(size=2)),
               ckpt=dict(enable_save_ckpt=True, checkpoint_every=4))


def _burn(seconds: float):
    end = time.time() + seconds
    x = 0
    while time.time() < end:
        x += 1


def test_sigkilled_rank_restarts_and_resumes_like_an_uninterrupted_run(tmp_path):
    ref_dir = tmp_path / "ref"
    cfg = write_config(ref_dir, **ELASTIC)
    ref = launcher.run(2, [f"ckpt.save_ckpt_folder={str(ref_dir / 'ckpt')!r}"], ref_dir, config=cfg, timeout=240)
    assert ref.returncode == 0, ref.tail()
    want = {r["step"]: r["loss"] for r in ref.records}

    work = tmp_path / "elastic"
    work.mkdir()
    cfg = write_config(work, **ELASTIC)
    args = ["--config", str(cfg), f"ckpt.save_ckpt_folder={str(work / 'ckpt')!r}",
            f"monitor.run_folder={str(work / 'run')!r}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max_restarts", "2", "--monitor_interval", "0.2", str(TRAIN), *args]
    started = launcher.Started(cmd, work, work / "run", clean_env())
    deadline = time.time() + 200
    while time.time() < deadline and not any(r["step"] >= 6 for r in started.records()):
        time.sleep(0.1)
    workers = started.children()
    assert len(workers) == 2 and started.poll() is None
    os.kill(workers[1], signal.SIGKILL)
    result = started.wait(300)
    agent = [line for line in result.stderr.splitlines() if "restart" in line.lower() or "worker group" in line.lower()]
    assert result.returncode == 0, result.tail() + "\n" + "\n".join(agent)
    assert "resumed from" in result.out
    got: dict[int, float] = {}
    for record in read_metrics(work / "run"):  # after the restart the resumed steps are logged again
        got[record["step"]] = record["loss"]
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), (step, got[step], want[step])


def test_two_process_runs_exit_0_every_time_under_load(tmp_path):
    ctx = mp.get_context("spawn")
    burners = [ctx.Process(target=_burn, args=(90,), daemon=True) for _ in range(2)]
    for b in burners:
        b.start()
    try:
        for i, layout in enumerate([["parallel.tensor.size=2", "parallel.tensor.mode='msp'"],
                                    ["parallel.zero1.size=2", "data.micro_num=2"],
                                    ["parallel.pipeline.size=2"]]):
            run = launcher.run(2, [*layout, "data.total_steps=3"], tmp_path / f"run{i}", timeout=240)
            assert run.returncode == 0, run.tail()
            assert "terminate called" not in run.out and "Traceback" not in launcher.worker_output(run)
    finally:
        for b in burners:
            b.terminate()
