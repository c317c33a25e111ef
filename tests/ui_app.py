"""The real app (launch.py, real default model, small cache settings) and headless Chromium, shared
by the browser tests: one app process and one browser for the whole test run (the session fixtures
app_url and browser in conftest.py wrap serve_app and chromium), so each UI test file costs only
its own clicks.

Debian's chromium is driven by Playwright's sync API (no browser download). Screenshots go to
artifacts/ui/ so a person can look at what the tests saw.
"""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    reason = "Debian chromium is not installed (apt-get install chromium)"
    if os.environ.get("CI") == "true":  # CI must never pass without its browser tests
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
pymupdf = pytest.importorskip("pymupdf")

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts" / "ui"
SETTINGS = {"window": "256", "cascades": "4", "sinks": "64", "stride": "256"}
ANSWER_TOKENS = "24"
MAX_BUSY = 3  # small, so the capacity message can be reached with a few tabs
MAX_UPLOAD_MB = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_app(tmp_path_factory, *extra_args: str):
    """python launch.py on a free port, with snapshots in a temporary folder (and any extra flags)."""
    tmp = tmp_path_factory.mktemp("app")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False",
           "CASCADE_READER_SNAPSHOTS": str(tmp / "snapshots")}
    log_path = tmp / "app.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--host", "127.0.0.1", "--port", str(port),
                                 "--max-busy", str(MAX_BUSY), "--max-upload-mb", str(MAX_UPLOAD_MB), *extra_args],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"the app did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def chromium():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


def shot(page, name):
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def set_number(page, elem_id, value):
    box = page.locator(f"#{elem_id} input[type=number], #{elem_id} textarea, #{elem_id} input[type=text]").first
    box.fill(value)
    box.press("Tab")


def open_app(browser, url, settings=True, context=None):
    """A new tab with small, fast settings; in its own browser context (so its own Gradio session)
    unless `context` is given (a tab of the same person, as after closing and reopening the page)."""
    page = (context or browser.new_context(viewport={"width": 1400, "height": 1000})).new_page()
    page.goto(url)
    page.wait_for_selector("#read", timeout=60_000)
    if settings:
        page.click("#settings > button")
        for elem_id, value in SETTINGS.items():
            set_number(page, elem_id, value)
        set_number(page, "max-new", ANSWER_TOKENS)
        page.wait_for_selector("#settings-msg :text('320 slots per layer')", timeout=10_000)
        page.wait_for_selector("#settings-msg :text('stride 256')", timeout=10_000)
    return page




def start_long_answer(page, question):
    """Ask for a 512-token answer and return once it has its first words on screen."""
    set_number(page, "max-new", "512")
    page.fill("#question textarea", question)
    page.click("#ask")
    page.wait_for_function("""() => { const bots = document.querySelectorAll('#chat .bot');
        return bots.length > 0 && bots[bots.length - 1].innerText.trim().split(/\\s+/).length >= 3; }""",
                           timeout=120_000)


def progress_tokens(page) -> int:
    m = re.search(r"(\d[\d,]*) /", page.inner_text("#progress .label"))
    return int(m.group(1).replace(",", "")) if m else 0
