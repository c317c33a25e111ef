"""The real app in headless Chromium (Debian's chromium, driven by Playwright; no browser download).

Screenshots go to artifacts/ui/ so a person can look at what the test saw.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pymupdf
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed")]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "ui"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(tmp_path_factory.mktemp("log") / "app.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"app exited: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("app did not start in 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"])
        yield b
        b.close()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#read", timeout=60_000)
    page.get_by_text("Cache settings", exact=True).click()
    for elem, value in (("#window", "256"),):
        box = page.locator(f"{elem} input")
        box.fill(value)
        box.press("Tab")
    return page


def make_pdf(path):
    doc = pymupdf.open()
    pages = ["The harbour town woke slowly under a grey sky. Boats rocked in the bay.",
             "On the second day the mayor said that the lighthouse keeper is named Oswin Tull.",
             "The story ends with a storm and a long quiet morning."]
    for text in pages:
        doc.new_page().insert_textbox(pymupdf.Rect(50, 50, 550, 800), text, fontsize=11)
    doc.save(str(path))


def test_upload_read_ask_cite_and_retention(app_url, browser, tmp_path):
    page = open_page(browser, app_url)
    make_pdf(tmp_path / "harbour.pdf")
    page.set_input_files("#upload input[type=file]", str(tmp_path / "harbour.pdf"))
    page.wait_for_timeout(1000)
    page.click("#read")
    page.wait_for_selector("#progress [data-state=done]", timeout=180_000)
    page.screenshot(path=str(ARTIFACTS / "1-read.png"), full_page=True)
    facts = page.inner_text("#facts")
    assert "tokens" in facts and "3 pages" in facts and "320 slots" in facts, facts
    page.fill("#question textarea", "What is the name of the lighthouse keeper?")
    page.click("#ask")
    page.wait_for_selector("#chat :text('Sources')", timeout=180_000)
    chat = page.inner_text("#chat")
    page.screenshot(path=str(ARTIFACTS / "2-answer.png"), full_page=True)
    assert "Oswin" in chat or "Tull" in chat, chat
    assert "p. 2" in chat, chat
    page.get_by_role("tab", name="Retention").click()
    page.click("#retention-refresh")
    page.wait_for_selector("#retention-map img", timeout=60_000)
    page.wait_for_selector("#retained-text mark", timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "3-retention.png"), full_page=True)


def test_cancel_a_long_read(app_url, browser):
    page = open_page(browser, app_url)
    long_text = " ".join(f"Sentence number {i} tells of ships and harbours and the weather." for i in range(4000))
    page.fill("#pasted textarea", long_text)
    page.click("#read")
    page.wait_for_selector("#progress [data-state=reading]", timeout=120_000)
    page.wait_for_function("document.querySelector('#progress .label').innerText.match(/reading: [1-9]/)",
                           timeout=120_000)
    page.click("#cancel")
    page.wait_for_selector("#progress [data-state=cancelled]", timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "4-cancelled.png"), full_page=True)
    assert "Cancelled" in page.inner_text("#status")


def test_bad_file_shows_error(app_url, browser, tmp_path):
    page = open_page(browser, app_url)
    (tmp_path / "scan.pdf").write_bytes(bytes.fromhex("89504e470d0a1a0a") + b"\x00" * 100)
    page.set_input_files("#upload input[type=file]", str(tmp_path / "scan.pdf"))
    page.wait_for_timeout(1000)
    page.click("#read")
    page.wait_for_selector("#progress [data-state=error]", timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "5-bad-file.png"), full_page=True)
    assert "not a PDF" in page.inner_text("#status")
