"""Feishu alerts (internlm/alert.py) against a local webhook: the message shape, rank 0 only, the events,
and failures that are logged once and never raise."""

import time

import pytest

from internlm import alert as alert_module
from internlm.alert import Alerts, feishu_body, job_key
from internlm.config import config_from_dict
from internlm.errors import UserError
from tests.alert_server import Webhook


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")  # the local webhook, even where a proxy is set


def test_feishu_body_shape():
    body = feishu_body("123_job", "hello")
    assert set(body) == {"timestamp", "msg_type", "content"} and abs(body["timestamp"] - time.time()) < 5
    assert body["msg_type"] == "post"
    assert body["content"] == {"post": {"zh_cn": {"title": "123_job", "content": [[{"tag": "text",
                                                                                    "text": "hello"}]]}}}


def test_job_key(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("KUBERNETES_POD_NAME", raising=False)
    assert job_key("7b") == "none_7b"
    monkeypatch.setenv("KUBERNETES_POD_NAME", "abc123-worker-0")
    assert job_key("7b") == "abc123_7b"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert job_key("7b") == "4242_7b"


def test_events_are_posted_in_order_from_rank_0_only(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("KUBERNETES_POD_NAME", raising=False)
    with Webhook() as hook:
        other = Alerts(hook.url, "job", rank=1)
        with other.watch():
            other.send("not from rank 1")
        log = tmp_path / "alerts" / "job.log"
        alerts = Alerts(hook.url, "job", rank=0, alert_file=str(log))
        with pytest.raises(RuntimeError), alerts.watch():
            alerts.after_step(1, dict(stepped=True, loss=5.0, grad_norm=1.0))
            alerts.after_step(2, dict(stepped=False, loss=float("nan"), grad_norm=float("nan"),
                                      inf_nan_skip_batches=1))
            alerts.after_step(3, dict(stepped=False, loss=float("nan"), grad_norm=float("nan")))  # same run: quiet
            alerts.after_step(4, dict(stepped=True, loss=9.0, grad_norm=1.0, loss_spike=True))
            alerts.after_step(5, dict(stepped=True, loss=9.5, grad_norm=1.0, loss_spike=True))  # same run: quiet
            raise RuntimeError("boom")
        texts = hook.texts()  # watch() waited for the queue before re-raising
    assert len(texts) == 4, texts
    assert texts[0].startswith("Training in ") and texts[0].endswith(" is starting.")
    assert texts[1] == ("Step 2 was skipped: non-finite loss (loss nan, gradient norm nan); 1 step(s) skipped so "
                        "far.")
    assert texts[2].startswith("Loss spike at step 4: loss 9.0")
    assert "failed on rank 0: RuntimeError: boom" in texts[3] and "Traceback" in texts[3]
    assert all(b["content"]["post"]["zh_cn"]["title"] == "none_job" for b in hook.bodies)
    assert all(h["Content-Type"] == "application/json;charset=utf-8" for h in hook.headers)
    assert len(log.read_text().splitlines()) >= 4 and "none_job: Step 2 was skipped" in log.read_text()


def test_user_errors_are_one_line_and_disabled_alerts_send_nothing():
    with Webhook() as hook:
        alerts = Alerts(hook.url, "job")
        with pytest.raises(UserError), alerts.watch():
            raise UserError("data.train_folder='x' is not an existing directory")
        disabled = Alerts(hook.url, "job", enabled=False)
        with disabled.watch():
            disabled.send("never")
        texts = hook.texts()
    assert len(texts) == 2 and texts[1].endswith("failed on rank 0: UserError: data.train_folder='x' is not an "
                                                 "existing directory")


def test_from_config():
    cfg = config_from_dict({"JOB_NAME": "j", "model": dict(num_attention_heads=4, hidden_size=64, num_layers=2,
                                                             vocab_size=128),
                            "monitor": dict(alert=dict(enable_feishu_alert=True, feishu_alert_address="http://h/x"))})
    assert Alerts.from_config(cfg, rank=0).active and not Alerts.from_config(cfg, rank=3).active


@pytest.mark.parametrize("server", ["refused", "not_a_url", "code"])
def test_failures_are_logged_once_and_never_raise(server, monkeypatch):
    warnings = []
    monkeypatch.setattr(alert_module.logger, "warning", lambda msg, *a: warnings.append(msg))
    if server != "code":  # nothing listens on the discard port; a URL without a scheme cannot be posted to
        address = "http://127.0.0.1:9/hook" if server == "refused" else "127.0.0.1:9/hook"
        alerts = Alerts(address, "job")
        t0 = time.perf_counter()
        with alerts.watch():
            for i in range(3):
                alerts.send(f"message {i}")
            assert time.perf_counter() - t0 < 1.0  # sending never waits for the network
        assert len(warnings) == 1 and "a Feishu alert to 127.0.0.1:9" in warnings[0] and "failed" in warnings[0]
        return
    with Webhook(answer={"code": 19021, "msg": "sign match fail or timestamp is not within one hour from current "
                                               "time"}) as hook:
        alerts = Alerts(hook.url, "job")
        with alerts.watch():
            alerts.send("one")
        assert len(hook.bodies) == 2
    assert len(warnings) == 1 and "Feishu answered code 19021: sign match fail" in warnings[0]
    assert "test-token" not in warnings[0]  # the webhook's secret path is not printed
