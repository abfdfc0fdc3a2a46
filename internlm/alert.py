"""Feishu webhook alerts: InternEvo's `monitor.alert` (enable_feishu_alert, feishu_alert_address,
alert_file_path).

Rank 0 posts one message to the webhook when the run starts, when it ends (finished, or failed: the
exception and the last lines of its traceback), at the first of consecutive steps skipped for a
non-finite gradient norm or loss, at the first of consecutive loss spikes (`monitor.loss_spike_factor`),
when a checkpoint is saved, and when the stop file asks for a stop or a save. The body is the Feishu
bot "post" message InternEvo sends: `{"timestamp", "msg_type": "post", "content": {"post": {"zh_cn":
{"title", "content": [[{"tag": "text", "text"}]]}}}}`, titled `<job id>_<JOB_NAME>` (the job id is
$SLURM_JOB_ID, or the first part of $KUBERNETES_POD_NAME, else "none").

Training never waits for the webhook: messages go through a queue to one background thread that
posts each with a 5 s timeout. A post that fails (or that Feishu answers with a non-zero code) is
logged once; later failures are not. At the end of the run the queue gets up to 10 s to empty, so
that the last message (finished or failed) goes out before the process exits.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import socket
import threading
import time
import traceback
import urllib.parse
import urllib.request
from pathlib import Path

from internlm.log import logger

POST_TIMEOUT_S = 5.0
FLUSH_TIMEOUT_S = 10.0


def job_key(job_name: str) -> str:
    """`<job id>_<JOB_NAME>`: the title of every message, as InternEvo titles them."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id and os.environ.get("KUBERNETES_POD_NAME"):
        job_id = os.environ["KUBERNETES_POD_NAME"].split("-")[0]
    return f"{job_id or 'none'}_{job_name}"


def feishu_body(title: str, text: str) -> dict:
    """A Feishu bot "post" message with one paragraph of text."""
    return {"timestamp": int(time.time()), "msg_type": "post",
            "content": {"post": {"zh_cn": {"title": title, "content": [[{"tag": "text", "text": text}]]}}}}


def rank_from_env(launcher: str) -> int:
    """This process's global rank before the process group exists (what internlm.launch will read)."""
    name = "SLURM_PROCID" if launcher == "slurm" else "RANK"
    try:
        return int(os.environ.get(name, "0"))
    except ValueError:
        return 0


class Alerts:
    """The alerts of one run. Inactive (every method returns at once) unless alerts are enabled, a
    webhook is set and this is rank 0."""

    def __init__(self, address: str | None, job_name: str, *, enabled: bool = True, rank: int = 0,
                 alert_file: str | None = None):
        self.address = address
        self.title = job_key(job_name)
        self.active = bool(enabled and address and rank == 0)
        self.alert_file = Path(alert_file) if alert_file and self.active else None
        self.host = socket.gethostname()
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._failed = False
        self._last_skipped = self._last_spike = False

    @classmethod
    def from_config(cls, cfg, rank: int) -> "Alerts":
        a = cfg.monitor.alert
        if a.enable_feishu_alert and not a.feishu_alert_address and rank == 0:
            logger.warning("monitor.alert.enable_feishu_alert=True but monitor.alert.feishu_alert_address is not set: "
                           "no alerts are sent")
        return cls(a.feishu_alert_address, cfg.JOB_NAME, enabled=a.enable_feishu_alert, rank=rank,
                   alert_file=a.alert_file_path)

    # ---- sending -------------------------------------------------------------------------------
    def send(self, text: str) -> None:
        """Queue one message (never blocks, never raises)."""
        if not self.active:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="feishu-alerts", daemon=True)
            self._thread.start()
        self._queue.put(text)

    def _work(self) -> None:
        while True:
            text = self._queue.get()
            try:
                if text is None:
                    return
                self._write_file(text)
                self._post(text)
            except Exception as exc:  # noqa: BLE001 - an alert must never break training
                self._report(f"{type(exc).__name__}: {exc}")
            finally:
                self._queue.task_done()

    def _write_file(self, text: str) -> None:
        if self.alert_file is None:
            return
        try:
            self.alert_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.alert_file, "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {self.title}: {text}\n")
        except OSError as exc:
            self._report(f"cannot append to monitor.alert.alert_file_path={str(self.alert_file)!r}: {exc}")

    def _post(self, text: str) -> None:
        data = json.dumps(feishu_body(self.title, text)).encode("utf-8")
        request = urllib.request.Request(self.address, data=data, method="POST",
                                         headers={"Content-Type": "application/json;charset=utf-8"})
        try:
            with urllib.request.urlopen(request, timeout=POST_TIMEOUT_S) as response:
                answer = response.read()
        except Exception as exc:  # noqa: BLE001 - an alert must never break training
            self._report(f"{type(exc).__name__}: {exc}")
            return
        try:
            reply = json.loads(answer or b"{}")
        except ValueError:
            return
        code = reply.get("code", reply.get("StatusCode", 0)) if isinstance(reply, dict) else 0
        if code:
            self._report(f"Feishu answered code {code}: {reply.get('msg', reply.get('StatusMessage', ''))}")

    def _report(self, problem: str) -> None:
        if self._failed:
            return
        self._failed = True
        host = urllib.parse.urlsplit(self.address or "").netloc or self.address
        logger.warning(f"a Feishu alert to {host} failed ({problem}); training goes on, and further failures are "
                       f"not reported")

    def close(self, seconds: float = FLUSH_TIMEOUT_S) -> None:
        """Give the queued messages up to `seconds` to go out, then stop the sender."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout=seconds)
        self._thread = None

    # ---- the events of a run -------------------------------------------------------------------
    @contextlib.contextmanager
    def watch(self):
        """Around the whole run: the start message, the failure message if it raises, then a flush."""
        self.send(f"Training in {self.host} is starting.")
        flush = FLUSH_TIMEOUT_S
        try:
            yield self
        except BaseException as exc:
            self.send(self.failure_text(exc))
            if isinstance(exc, KeyboardInterrupt):
                flush = 2.0  # a second Ctrl-C asks to stop now
            raise
        finally:
            self.close(flush)

    def finished(self, step: int, total: int) -> None:
        self.send(f"Training in {self.host} finished at step {step}" + (f" of {total}" if step < total else "") + ".")

    def failure_text(self, exc: BaseException) -> str:
        if isinstance(exc, KeyboardInterrupt):
            return f"Training in {self.host} was interrupted (Ctrl-C)."
        from internlm.errors import UserError

        text = f"Training in {self.host} failed on rank 0: {type(exc).__name__}: {exc}"
        if not isinstance(exc, UserError):
            lines = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip().splitlines()
            text += "\n" + "\n".join(lines[-10:])
        return text

    def after_step(self, step: int, metrics: dict) -> None:
        """A trainer step hook: alert at the first of consecutive skipped steps or loss spikes."""
        if not self.active:
            return
        skipped = not metrics.get("stepped", True)
        loss, grad_norm = metrics.get("loss"), metrics.get("grad_norm")
        if skipped and not self._last_skipped:
            what = "loss" if loss is not None and not math.isfinite(loss) else "gradient norm"
            self.send(f"Step {step} was skipped: non-finite {what} (loss {loss}, gradient norm {grad_norm}); "
                      f"{metrics.get('inf_nan_skip_batches', '?')} step(s) skipped so far.")
        spike = bool(metrics.get("loss_spike"))
        if spike and not self._last_spike:
            self.send(f"Loss spike at step {step}: loss {loss} is above monitor.loss_spike_factor times the mean of "
                      f"the recent steps.")
        self._last_skipped, self._last_spike = skipped, spike
