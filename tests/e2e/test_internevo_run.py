"""InternEvo's run-time features through `python train.py` on the tiny config with dummy data: Feishu
alerts posted to a local webhook, the stop file holding a step, `--profiling`, `enable_tb` and
`tensorboard_folder`."""

import json

from tests import launcher
from tests.alert_server import Webhook
from tests.helpers import write_config

NO_PROXY = {"no_proxy": "127.0.0.1,localhost"}  # the local webhook, even where a proxy is set


def _ok(run: launcher.RunResult) -> launcher.RunResult:
    assert run.returncode == 0, run.tail()
    return run


def _steps(ckpt) -> list[int]:
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit() and (p / "COMPLETE").is_file())


def test_feishu_alerts_of_a_run_that_saves_spikes_and_finishes(tmp_path):
    """Start, the first of a run of loss spikes (every step is one with loss_spike_factor=0.5 over a window
    of 1), each checkpoint, the end. enable_tb=False: no TensorBoard events."""
    ckpt = tmp_path / "ckpt"
    with Webhook() as hook:
        cfg = write_config(tmp_path, JOB_NAME="alerting", data=dict(total_steps=4),
                           ckpt=dict(save_ckpt_folder=str(ckpt), checkpoint_every=2),
                           monitor=dict(loss_spike_factor=0.5, loss_spike_window=1,
                                        alert=dict(enable_feishu_alert=True, feishu_alert_address=hook.url,
                                                   light_monitor_address="10.1.1.1:8080",
                                                   alert_file_path=str(tmp_path / "llm_alter" / "alerting.log"))),
                           enable_tb=False)
        run = _ok(launcher.run(1, [], tmp_path, config=cfg, env=NO_PROXY, timeout=120))
        texts = hook.texts()
    assert len(texts) == 5, texts
    assert texts[0].startswith("Training in ") and texts[0].endswith(" is starting.")
    assert texts[1].startswith("Loss spike at step 2: loss ")
    assert texts[2:4] == [f"Saved the checkpoint of step 2 to {ckpt / '2'}.", f"Saved the checkpoint of step 4 to "
                                                                                f"{ckpt / '4'}."]
    assert texts[4].endswith(" finished at step 4.")
    assert {b["content"]["post"]["zh_cn"]["title"] for b in hook.bodies} == {"none_alerting"}
    assert all(b["msg_type"] == "post" and isinstance(b["timestamp"], int) for b in hook.bodies)
    assert len((tmp_path / "llm_alter" / "alerting.log").read_text().splitlines()) == 5
    notice = "notice: monitor.alert.light_monitor_address has no effect here: no heartbeats are sent"
    assert run.stdout.count(notice) == 1
    assert not (tmp_path / "run" / "tensorboard").exists() and len(run.records) == 4


def test_feishu_alerts_of_a_diverging_run(tmp_path):
    """The first skipped (non-finite) step, then the failure with its one-line reason; exit status 2."""
    with Webhook() as hook:
        cfg = write_config(tmp_path, adam=dict(lr=1e6), hybrid_zero_optimizer=dict(max_skipped_steps=2),
                           lr_scheduler=dict(warmup_ratio=0.0),
                           monitor=dict(alert=dict(enable_feishu_alert=True, feishu_alert_address=hook.url)))
        run = launcher.run(1, [], tmp_path, config=cfg, env=NO_PROXY, timeout=120)
        texts = hook.texts()
    assert run.returncode == 2, run.tail()
    assert texts[0].endswith(" is starting.") and len(texts) >= 3, texts
    assert all(t.startswith("Step ") and " was skipped: non-finite " in t for t in texts[1:-1])
    assert "failed on rank 0: DivergenceError: training diverged: 2 consecutive steps" in texts[-1]


def test_stop_file_holding_0_trains_on_and_one_holding_a_step_stops_there(tmp_path):
    stop = tmp_path / "llm_alter" / "stop.log"
    stop.parent.mkdir()
    stop.write_text("0")  # what InternEvo writes at start: no request
    cfg = write_config(tmp_path, ckpt=dict(save_ckpt_folder=str(tmp_path / "ckpt0"), checkpoint_every=100,
                                           stop_file_path=str(stop)), data=dict(total_steps=3))
    run = _ok(launcher.run(1, [], tmp_path / "zero", config=cfg, timeout=120))
    assert [r["step"] for r in run.records] == [1, 2, 3] and "stopped after" not in run.out
    assert stop.read_text() == "0"  # untouched

    stop.write_text("2\n")  # save and stop at step 2
    run = _ok(launcher.run(1, ["data.total_steps=6", f"ckpt.save_ckpt_folder={str(tmp_path / 'ckpt2')!r}"],
                           tmp_path / "two", config=cfg, timeout=120))
    assert [r["step"] for r in run.records] == [1, 2]
    assert f"stop file {stop} asks for a checkpoint and a stop at step 2 (now at step 1)" in run.out
    assert f"stopped after step 2 on stop file {stop}" in run.out
    assert _steps(tmp_path / "ckpt2") == [2] and not stop.exists()  # consumed: a restarted job trains on


def test_stop_file_holding_a_negative_step_saves_there_and_trains_on(tmp_path):
    stop = tmp_path / "stop"
    stop.write_text("-2")
    ckpt = tmp_path / "ckpt"
    cfg = write_config(tmp_path, ckpt=dict(save_ckpt_folder=str(ckpt), checkpoint_every=100, stop_file_path=str(stop)),
                       data=dict(total_steps=3))
    run = _ok(launcher.run(1, [], tmp_path, config=cfg, timeout=120))
    assert [r["step"] for r in run.records] == [1, 2, 3] and "stopped after" not in run.out
    assert f"stop file {stop} asks for a checkpoint at step 2, then training on" in run.out
    assert _steps(ckpt) == [2, 3] and not stop.exists()


def test_profiling_writes_a_chrome_trace_and_tensorboard_folder_moves_the_events(tmp_path):
    tb = tmp_path / "tb_elsewhere"
    cfg = write_config(tmp_path, data=dict(total_steps=6), tensorboard_folder=str(tb))
    run = launcher.run(1, ["--profiling"], tmp_path, config=cfg, timeout=120)
    _ok(run)
    traces = list((tmp_path / "run" / "profile").glob("*.json"))
    assert [p.name for p in traces] == ["trace_rank0_steps3-5.json"], run.tail()
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert sum(str(e.get("name", "")).startswith("aten::") for e in events) > 100  # the recorded operators
    assert "--profiling: trace of steps 3-5 written to" in run.stdout
    assert list(tb.glob("events.out.tfevents.*")) and not (tmp_path / "run" / "tensorboard").exists()
    assert len(run.records) == 6


def test_enable_internevo2hf_ckpt_exports_every_checkpoint(tmp_path):
    """ckpt.enable_internevo2hf_ckpt: each complete checkpoint also lands as a transformers folder in
    <save_ckpt_folder>/hf/<step>, whose logits equal the checkpoint's own model."""
    import torch
    from transformers import AutoModelForCausalLM

    from internlm.inference import load_model

    ckpt = tmp_path / "ckpt"
    cfg = write_config(tmp_path, data=dict(total_steps=4), model=dict(dtype="torch.float32"),
                       ckpt=dict(save_ckpt_folder=str(ckpt), checkpoint_every=2, enable_internevo2hf_ckpt=True))
    run = _ok(launcher.run(2, [], tmp_path, config=cfg, timeout=180))
    assert sorted(p.name for p in (ckpt / "hf").iterdir()) == ["2", "4"], run.tail()
    assert _steps(ckpt) == [2, 4]  # the exports are not taken for checkpoints
    assert f"exported step 4 to {ckpt / 'hf' / '4'}" in run.stdout
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = load_model(ckpt / "4")(ids)
    theirs = AutoModelForCausalLM.from_pretrained(str(ckpt / "hf" / "4"), dtype=torch.float32)(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    first = load_model(ckpt / "2")(ids)
    assert (first - ours).abs().max() > 1e-3  # two different exports, not one copied
