"""The chat page in a real browser: `streamlit run tools/web_demo.py` as a server, headless Chromium
(driven by selenium through /usr/bin/chromedriver) types a message and reads the streamed answer from
the page, which must be the greedy answer of internlm.inference.generate.

Skipped when Chromium, chromedriver or selenium are missing, except under CI=true, where .ci/run
installs them and a missing one fails the test."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from internlm.chat_session import load_session
from tests.helpers import ROOT, clean_env
from tests.unit.test_web_demo import greedy_reply, tiny_chat_ckpt  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1200,900"]


def _require(ok: bool, why: str) -> None:
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why} (CI must run this test: .ci/run installs chromium and chromium-driver)")
        pytest.skip(why)


def _require_tools() -> None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        _require(False, "selenium is not installed (pip install -e .[test])")
    for path in (CHROMIUM, CHROMEDRIVER):
        _require(bool(shutil.which(path)), f"{path} is not installed (apt-get install chromium chromium-driver)")


def _browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'chromium'}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(ckpt, port: int, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "streamlit", "run", "tools/web_demo.py", "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none", "--global.developmentMode", "false", "--", "--ckpt", str(ckpt),
           "--temperature", "0", "--max_new_tokens", "16"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=clean_env(INTERNLM_WEB_DEMO_ARGS=None))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.read() == b"ok":
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"streamlit did not start: {' '.join(cmd)}")


def test_chat_in_a_browser(tmp_path_factory, spm_model, tmp_path):
    _require_tools()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    ckpt = tiny_chat_ckpt(tmp_path_factory, spm_model)
    driver = _browser(tmp_path)
    port = _free_port()
    log = open(tmp_path / "streamlit.log", "w")
    try:
        server = _serve(ckpt, port, log)
    except BaseException:
        driver.quit()
        log.close()
        raise
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 60)
        box = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "textarea[data-testid='stChatInputTextArea']"))
        box[0].send_keys("Hello there" + Keys.ENTER)

        def finished_reply(d):  # the caption (markdown) under the answer comes after its last token
            for m in d.find_elements(By.CSS_SELECTOR, "[aria-label='Chat message from assistant']"):
                if m.find_elements(By.CSS_SELECTOR, "[data-testid='stMarkdown']"):
                    return m
            return None

        message = wait.until(finished_reply)
        shown = message.find_element(By.CSS_SELECTOR, "[data-testid='stText']").get_attribute("textContent")
        assert "Traceback" not in driver.page_source
        driver.save_screenshot(str(tmp_path / "web_demo.png"))
    finally:
        driver.quit()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    expected = greedy_reply(load_session(ckpt), [{"role": "user", "content": "Hello there"}], max_new_tokens=16)
    assert shown == expected and shown != "", (tmp_path / "streamlit.log").read_text()[-3000:]
    assert (tmp_path / "web_demo.png").stat().st_size > 10_000
