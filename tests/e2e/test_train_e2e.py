"""End to end through the commands a user types: train.py and tools/demo.py."""
import math

import pytest

from tests import launcher
from tests.helpers import ROOT, read_metrics, run_python, write_config

# the tiny config with 2 layers, trained long enough for the loss to fall, validated twice
E2E = dict(
    JOB_NAME="e2e",
    model=dict(num_layers=2, multiple_of=16),
    data=dict(micro_num=2, total_steps=40, valid_every=20, valid_micro_num=2, dummy_num_samples=10000),
    adam=dict(lr=3e-3),
    lr_scheduler=dict(total_steps=40, warmup_ratio=0.1, eta_min=3e-4),
    monitor=dict(peak_tflops=None),  # as a user's config: MFU against the measured matmul peak
    seed=1024,
)


def test_train_py_loss_falls_and_writes_run_folder(tmp_path):
    proc = launcher.run(1, ["--seed", "7"], tmp_path, config=write_config(tmp_path, **E2E))
    run_folder = tmp_path / "run"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run folder: {run_folder}" in proc.stdout
    rows = proc.records
    assert [r["step"] for r in rows] == list(range(1, 41))
    required = {"step", "loss", "lr", "grad_norm", "tgs", "tflops", "mfu", "num_consumed_tokens", "loss_scale",
                "inf_nan_skip_batches", "type_loss", "step_time", "peak_memory_bytes"}
    assert required <= set(rows[0])
    assert set(rows[0]["type_loss"]) == {"dummy_a", "dummy_b"}
    assert rows[-1]["num_consumed_tokens"] == 40 * 2 * 2 * 64
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert first > math.log(128) * 0.9  # starts near uniform
    assert last < first - 0.5, (first, last)
    valid = [r for r in rows if "valid_loss" in r]
    assert [r["step"] for r in valid] == [20, 40]
    assert valid[-1]["valid_ppl"] == pytest.approx(math.exp(valid[-1]["valid_loss"]))
    # the resolved config is written and loads back
    from internlm.config import load_config

    resolved = load_config(run_folder / "config.yaml")
    assert resolved.seed == 7 and resolved.model.hidden_size == 64
    assert (run_folder / "tensorboard").is_dir() and any((run_folder / "tensorboard").iterdir())


def test_train_py_same_seed_same_losses(tmp_path):
    cfg = write_config(tmp_path, **E2E)
    losses = []
    for name in ("a", "b"):
        proc = launcher.run(1, ["data.total_steps=5", "lr_scheduler.total_steps=5", "data.valid_every=0"],
                            tmp_path / name, config=cfg)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses.append([r["loss"] for r in proc.records])
    assert len(losses[0]) == 5 and losses[0] == losses[1]


def test_bad_config_is_one_clear_line(tmp_path):
    proc = run_python([ROOT / "train.py", "--config", ROOT / "configs" / "demo.py", "adam.lrr=1"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "adam.lrr" in proc.stderr and "adam.lr" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_end_to_end_small(tmp_path):
    """The README's demo command on a small corpus: data, tokenizer, .bin files, training, validation."""
    proc = run_python([ROOT / "tools" / "demo.py", "--data_dir", tmp_path / "data", "--max_mb", "0.4",
                       "data.total_steps=30", "data.valid_every=15", "data.valid_micro_num=2", "data.micro_bsz=2",
                       "data.seq_len=128", f"monitor.run_folder={str(tmp_path / 'run')!r}", "monitor.log_every=5"],
                      cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "validation perplexity" in proc.stdout
    for sub in ("train/en", "train/code", "valid/en", "valid/code"):
        assert list((tmp_path / "data" / sub).glob("*.bin")), sub
    rows = read_metrics(tmp_path / "run")
    assert set(rows[0]["type_loss"]) == {"en", "code"}
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    # a second run reuses the prepared data
    model_file = next((tmp_path / "data").rglob("*.model"))
    mtime = model_file.stat().st_mtime
    proc2 = run_python([ROOT / "tools" / "demo.py", "--data_dir", tmp_path / "data", "--max_mb", "0.4",
                        "data.total_steps=2", "data.valid_every=0", "data.seq_len=128", "data.micro_bsz=2",
                        f"monitor.run_folder={str(tmp_path / 'run2')!r}"], cwd=tmp_path, timeout=400)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert model_file.stat().st_mtime == mtime
    # it resumed the first run's final checkpoint (step 30 >= 2 steps): nothing to train, said plainly
    assert "had already reached data.total_steps" in proc2.stdout
