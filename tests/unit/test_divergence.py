"""A diverging run stops with a clear error instead of training on, or saving, NaN (internlm/divergence.py),
and non-finite settings are config errors."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from internlm.config import ConfigError, config_from_dict
from internlm.divergence import DivergenceError, DivergenceGuard, check_finite, first_non_finite
from tests.helpers import TRAIN, read_metrics, run_python, tiny_config, tiny_model_args, write_config


@pytest.fixture
def warnings_of_internlm(caplog):
    """caplog, also when the internlm logger does not propagate (setup_logging ran in this process)."""
    logger = logging.getLogger("internlm")
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def test_skips_are_reported_and_the_run_stops_after_the_limit(warnings_of_internlm):
    caplog = warnings_of_internlm
    guard = DivergenceGuard(max_skipped_steps=3, spike_factor=0, spike_window=5)
    guard.observe(1, 5.0, 1.0, stepped=True)
    guard.observe(2, float("nan"), float("nan"), stepped=False)
    guard.observe(3, 5.0, 1.0, stepped=True)  # a good step resets the count
    guard.observe(4, float("nan"), float("inf"), stepped=False)
    guard.observe(5, float("nan"), float("nan"), stepped=False, loss_scale=512.0)
    assert guard.consecutive_skips == 2
    assert "step 5 skipped: gradient norm nan (loss nan), loss scale now 512; 2 consecutive skip(s)" in caplog.text
    with pytest.raises(DivergenceError, match=r"3 consecutive steps \(up to step 6\) had non-finite gradients"):
        guard.observe(6, float("nan"), float("nan"), stepped=False)


def test_loss_spikes_are_flagged_against_the_recent_mean(warnings_of_internlm):
    caplog = warnings_of_internlm
    guard = DivergenceGuard(max_skipped_steps=3, spike_factor=2.0, spike_window=4)
    for step, loss in enumerate([4.0, 4.2, 3.8, 4.0], start=1):
        assert guard.observe(step, loss, 1.0, stepped=True) == {}
    assert guard.observe(5, 8.5, 1.0, stepped=True) == {"loss_spike": True}
    assert "loss spike at step 5: 8.5000 is 2.1x the mean of the last 4 steps (4.0000)" in caplog.text
    assert guard.observe(6, 7.0, 1.0, stepped=True) == {}  # 7.0 < 2 x mean(4.2, 3.8, 4.0, 8.5)
    off = DivergenceGuard(max_skipped_steps=3, spike_factor=0, spike_window=1)
    assert off.observe(1, 1.0, 1.0, True) == {} and off.observe(2, 100.0, 1.0, True) == {}


def test_non_finite_parameters_are_found_by_name():
    from internlm.model.internlm import InternLM

    model = InternLM(tiny_model_args(num_layers=2))
    assert first_non_finite([model]) is None
    check_finite([model], torch.device("cpu"), "save step 1")
    with torch.no_grad():
        model.layers["1"].feed_forward.w2.weight[3, 4] = math.inf
    assert first_non_finite([model]) == "layers.1.feed_forward.w2.weight"
    with pytest.raises(DivergenceError, match="refusing to save step 7: parameter layers.1.feed_forward.w2.weight "
                                              "holds NaN or inf"):
        check_finite([model], torch.device("cpu"), "save step 7")


@pytest.mark.parametrize("section, key, value", [("adam", "lr", 1e309), ("adam", "adam_eps", float("nan")),
                                                 ("loss", "label_smoothing", -float("inf"))])
def test_non_finite_settings_are_config_errors(section, key, value):
    with pytest.raises(ConfigError, match=f"config key '{section}.{key}' must be a finite number"):
        config_from_dict(tiny_config(**{section: {key: value}}))
    with pytest.raises(ConfigError, match="'adam.lr' must be a finite number, got inf"):
        config_from_dict(tiny_config(), ["adam.lr=1e309"])  # the command-line spelling


def test_a_diverging_run_stops_with_exit_2_and_never_saves_nan(tmp_path):
    cfg = write_config(tmp_path, adam=dict(lr=1e6), hybrid_zero_optimizer=dict(max_skipped_steps=3),
                       data=dict(total_steps=10), lr_scheduler=dict(warmup_ratio=0.0),
                       ckpt=dict(enable_save_ckpt=True, save_ckpt_folder=str(tmp_path / "ckpt"), checkpoint_every=1),
                       monitor=dict(run_folder=str(tmp_path / "run"), log_every=1))
    proc = run_python([TRAIN, "--config", cfg], cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out
    assert "training diverged: 3 consecutive steps" in proc.stderr
    assert "skipped: gradient norm" in proc.stdout
    records = read_metrics(tmp_path / "run")
    skipped = [r["step"] for r in records if not r["stepped"]]
    assert len(skipped) >= 2 and records[-1]["stepped"] is False
    # every checkpoint written holds finite weights only
    from internlm import load_model

    saved = sorted((tmp_path / "ckpt").glob("[0-9]*"), key=lambda p: int(p.name))
    assert saved, "the steps before the divergence were saved"
    for folder in saved:
        model = load_model(folder)
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), folder


def test_convert2hf_refuses_non_finite_weights(tmp_path):
    from internlm.errors import ConversionError
    from internlm.hf.export import export_model_to_hf
    from internlm.model.internlm import InternLM

    model = InternLM(tiny_model_args(num_layers=2))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        model.layers["0"].attention.wq.weight[0, 0] = float("nan")
    with pytest.raises(ConversionError, match="tensor 'layers.0.attention.wq.weight' holds NaN or inf values"):
        export_model_to_hf(model, tmp_path / "hf", progress=False)
    assert not list((tmp_path / "hf").glob("*.safetensors"))
