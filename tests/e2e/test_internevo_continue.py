"""Continuing an InternEvo run: `ckpt_type="internevo"` with content ("model", "sampler", "scheduler")
loads an InternEvo checkpoint folder's weights, its step and tokens (context.pt), its data position
(context.pt, sampler.pt's epoch) and its schedule position (schedulder.pt), through `python train.py`.

The folder is made from one of our own runs at step 3, as InternEvo's checkpoint manager would write it
(tp=2 model files, context.pt, sampler.pt with numpy's RNG state, schedulder.pt). The continued run's
first step then sees the same weights and the same rows as the uninterrupted run's step 4, under the
same LR: equal loss and gradient norm (its AdamW moments restart, so later steps differ)."""

import numpy as np
import pytest
import torch

from internlm.checkpoint.layout import CheckpointError
from tests import launcher
from tests.helpers import read_metrics, tiny_model_args, write_config
from tests.unit.test_checkpoint_internevo_folder import write_internevo_folder


def _internevo_folder(ours, folder, step: int, tokens: int, rows: int, lr: float):
    from internlm.checkpoint.reader import load_ckpt_into_parts
    from internlm.model.internlm import InternLM

    model = InternLM(tiny_model_args())
    load_ckpt_into_parts([model], ours)
    write_internevo_folder(model, folder, tp=2, pp=1)
    # InternEvo's TrainState.state_dict() and StaticBatchSampler.state_dict()
    torch.save({"batch_count": step - 1, "num_consumed_samples_in_epoch": rows, "num_consumed_tokens": tokens,
                "inf_nan_skip_batches": 0, "step_count": step, "tensorboard_folder": None}, folder / "context.pt")
    rng = np.random.RandomState(1024)
    torch.save({"batch_size": 8, "raw_rampup_batch_size": None, "rng_state": rng.get_state(), "epoch": 0,
                "seed": 1024, "data_world_size": 1, "num_consumed_samples_in_epoch": rows, "batch_count": step,
                "indices": rng.permutation(100)}, folder / "sampler.pt")
    torch.save({"base_lrs": [lr], "last_epoch": step, "_step_count": step + 1, "warmup_epochs": 2},
               folder / "schedulder.pt")
    return folder


def test_a_run_continues_an_internevo_folder_at_its_step_rows_and_lr(tmp_path):
    cfg = write_config(tmp_path, data=dict(total_steps=6),
                       ckpt=dict(save_ckpt_folder=str(tmp_path / "ckpt"), checkpoint_every=3))
    ref = launcher.run(1, [], tmp_path / "ref", config=cfg, timeout=180)
    assert ref.returncode == 0, ref.tail()
    by_step = {r["step"]: r for r in ref.records}
    rows_per_step = 4 * 2  # micro_num x micro_bsz (one data-parallel rank)
    tokens = sum(by_step[s]["tokens"] for s in (1, 2, 3)) if "tokens" in by_step[1] else 3 * rows_per_step * 64
    evo = _internevo_folder(tmp_path / "ckpt" / "3", tmp_path / "evo", 3, tokens, 3 * rows_per_step, 1e-3)

    info = dict(path=str(evo), content=("model", "sampler", "scheduler"), ckpt_type="internevo")
    run = launcher.run(1, [f"ckpt.load_ckpt_info={info!r}", "ckpt.auto_resume=False",
                           f"ckpt.save_ckpt_folder={str(tmp_path / 'ckpt2')!r}"], tmp_path / "cont", config=cfg,
                       timeout=180)
    assert run.returncode == 0, run.tail()
    records = read_metrics(tmp_path / "cont" / "run") or run.records
    assert [r["step"] for r in records] == [4, 5, 6]
    first, same = records[0], by_step[4]
    assert first["lr"] == same["lr"]
    assert first["loss"] == pytest.approx(same["loss"], rel=1e-6)
    assert first["grad_norm"] == pytest.approx(same["grad_norm"], rel=1e-5)
    assert "loaded from InternEvo folder" in run.out and "step 3" in run.out
    assert "optimizer moments start fresh" in run.out


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo unpickled",))


def test_internevo_progress_errors_name_the_file(tmp_path):
    from internlm.checkpoint import internevo_state

    with pytest.raises(CheckpointError, match=r"has no context\.pt .*content=\('model',\)"):
        internevo_state.read_progress(tmp_path)
    torch.save({"batch_count": 2}, tmp_path / "context.pt")
    with pytest.raises(CheckpointError, match=r"context\.pt has no 'num_consumed_samples_in_epoch'"):
        internevo_state.read_progress(tmp_path)
    torch.save({"step_count": 2, "num_consumed_samples_in_epoch": 4, "num_consumed_tokens": 9}, tmp_path / "context.pt")
    (tmp_path / "sampler.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"cannot read .*sampler\.pt \(read with torch\.load\(weights_only"):
        internevo_state.read_progress(tmp_path)
    torch.save({"epoch": 1, "hook": _Evil()}, tmp_path / "sampler.pt")  # numpy is allowed there, nothing else
    with pytest.raises(CheckpointError, match=r"sampler\.pt .*GLOBAL posix\.system"):
        internevo_state.read_progress(tmp_path)
    (tmp_path / "sampler.pt").unlink()
    assert internevo_state.read_progress(tmp_path).step == 2
    with pytest.raises(CheckpointError, match=r"its optimizer state .* does not: AdamW's moments restart"):
        internevo_state.check_content(tmp_path, ("model", "optimizer"))
