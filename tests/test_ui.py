"""The app in headless Chromium: settings, bad files, read/ask/cite/retention/export/snapshot, cancel
and two tabs taking turns. About a minute on 2 CPU cores (the app and browser are shared with the
other UI tests: tests/ui_app.py)."""

import re
import time

import pytest

from ui_app import ANSWER_TOKENS, open_app, progress_tokens, pymupdf, set_number, shot, start_long_answer

pytestmark = pytest.mark.real_model


def make_pdf(path):
    doc = pymupdf.open()
    pages = ["The harbour town woke slowly under a grey sky. Boats rocked in the bay and gulls cried.",
             "On the second day the mayor said that the lighthouse keeper is named Oswin Tull.",
             "The story ends with a storm and a long quiet morning."]
    for text in pages:
        doc.new_page().insert_textbox(pymupdf.Rect(50, 50, 550, 800), text, fontsize=11)
    doc.save(str(path))


def test_settings_are_validated(app_url, browser):
    page = open_app(browser, app_url)
    set_number(page, "window", "3")  # too few slots for 4 cascades
    page.wait_for_selector("#settings-msg :text('too small')", timeout=10_000)
    page.fill("#pasted textarea", "A short note about nothing much.")
    page.click("#read")
    page.wait_for_selector("#progress [data-state=error]", timeout=30_000)
    assert "is too small for 4 cascades" in page.inner_text("#status")
    shot(page, "1-settings-error")
    set_number(page, "window", "256")
    page.wait_for_selector("#settings-msg :text('320 slots')", timeout=10_000)


def test_bad_files_show_an_error(app_url, browser, tmp_path):
    page = open_app(browser, app_url, settings=False)
    png_as_pdf = tmp_path / "scan.pdf"
    png_as_pdf.write_bytes(bytes.fromhex("89504e470d0a1a0a0000000d49484452") + b"\x00" * 100)
    page.set_input_files("#upload input[type=file]", str(png_as_pdf))
    page.wait_for_selector("#upload [aria-label='scan.pdf']", timeout=20_000)  # the listed upload
    page.click("#read")
    page.wait_for_selector("#progress [data-state=error]", timeout=30_000)
    status = page.inner_text("#status")
    assert "scan.pdf" in status and "not a PDF" in status, status
    assert "/tmp" not in status  # the message names the file, not the server's temp path
    shot(page, "2-bad-file")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    page.locator("#upload button[aria-label='Clear']").first.click()
    page.set_input_files("#upload input[type=file]", str(empty))
    page.wait_for_selector("#upload [aria-label='empty.txt']", timeout=20_000)  # the listed upload
    page.click("#read")
    page.wait_for_selector("#status :text('empty.txt: is empty')", timeout=30_000)


def test_read_ask_cite_retention_export_snapshot(app_url, browser, tmp_path):
    page = open_app(browser, app_url)
    make_pdf(tmp_path / "harbour.pdf")
    page.set_input_files("#upload input[type=file]", str(tmp_path / "harbour.pdf"))
    page.wait_for_selector("#upload [aria-label='harbour.pdf']", timeout=20_000)  # the listed upload
    page.click("#read")
    page.wait_for_selector("#progress [data-state=done]", timeout=300_000)
    facts = page.inner_text("#facts").replace(",", "")
    assert "3 pages" in facts and "320 slots" in facts and "MB" in facts and "cascade" in facts, facts
    assert "nothing truncated" in facts
    page.wait_for_selector("#live-map svg", timeout=10_000)
    shot(page, "3-read")

    # a streamed answer: record the chat's text length on every DOM change while it is generated
    page.evaluate("""() => { window.__lens = [];
        new MutationObserver(() => window.__lens.push(document.querySelector('#chat').innerText.length))
            .observe(document.querySelector('#chat'), {subtree: true, childList: true, characterData: true}); }""")
    page.fill("#question textarea", "What is the name of the lighthouse keeper?")
    page.click("#ask")
    page.wait_for_selector("#chat :text('Source: p.')", timeout=450_000)
    lens = page.evaluate("window.__lens")
    assert len(set(lens)) >= 4, f"the answer did not stream: {lens}"
    chat = page.inner_text("#chat")
    answer = chat.split("What is the name of the lighthouse keeper?", 1)[1].split("Recalled passages", 1)[0].strip()
    assert answer, chat
    assert re.search(r"Recalled passages: p\. [123]", chat), chat  # the re-read passages, by page
    page.wait_for_selector("#live-map :text('orange: passages re-read')", timeout=10_000)  # marked on the map
    assert re.search(r"Source: p\. [123] ·", chat), chat
    page.locator("#chat :text('Source: p.')").first.click()  # expand: the passage shows
    page.wait_for_selector("#chat :text('document token')", timeout=10_000)
    page.wait_for_timeout(600)  # let the expand animation finish before the screenshot
    shot(page, "4-answer")

    # Stop really stops a long answer
    start_long_answer(page, "Tell me a very long and detailed story about the harbour town and its people.")
    page.click("#stop")
    page.wait_for_selector("#chat :text('(stopped)')", timeout=30_000)
    set_number(page, "max-new", ANSWER_TOKENS)

    page.click("#export")
    page.wait_for_selector("#export-files :text('.json')", timeout=20_000)
    assert ".md" in page.inner_text("#export-files")

    page.get_by_role("tab", name="Retention").click()
    page.wait_for_selector("#retention-map svg", timeout=20_000)
    page.wait_for_selector("#retained-text mark", timeout=20_000)
    assert "cascade 0" in page.inner_text("#occupancy")
    page.get_by_label("cascades of one layer").check()
    page.wait_for_selector("#retention-map :text('parts of layer 0')", timeout=20_000)
    shot(page, "5-retention")

    page.get_by_role("tab", name="Summary").click()
    page.click("#summarize")
    page.wait_for_selector("#summary :text('From the cache after reading')", timeout=450_000)
    assert page.inner_text("#summary .summary-final").strip() != "Summary"
    shot(page, "6-summary")

    page.get_by_role("tab", name="Snapshots").click()
    page.fill("#snap-name textarea", "harbour test")
    page.click("#snap-save")
    page.wait_for_selector("#snap-status :text('Saved harbour test')", timeout=30_000)
    assert "/" not in page.inner_text("#snap-status")  # no server folder in the message
    page.click("#snap-load")
    page.wait_for_selector("#snap-status :text('Loaded harbour test')", timeout=150_000)


def test_cancel_a_long_read_and_tabs_are_independent(app_url, browser):
    a = open_app(browser, app_url)
    b = open_app(browser, app_url, settings=False)
    long_text = " ".join(f"Sentence number {i} tells of ships and harbours and the weather." for i in range(1800))
    a.fill("#pasted textarea", long_text)
    a.click("#read")
    a.wait_for_function("/reading: [1-9]/.test(document.querySelector('#progress .label').innerText)",
                        timeout=300_000)
    assert progress_tokens(a) < 25_000
    total = int(re.search(r"/ ([\d,]+) tokens", a.inner_text("#progress .label")).group(1).replace(",", ""))
    assert total > 25_000, "the long text should be ~30k tokens"

    # another tab's Cancel does not touch this read
    b.click("#cancel")
    before = progress_tokens(a)
    a.wait_for_function(f"parseInt(document.querySelector('#progress .label').innerText.split(': ')[1]"
                        f".replace(/,/g, '')) > {before}", timeout=150_000)

    # fair turns: b's short read takes turns with a's long one instead of waiting for all of it, and
    # b is told in words that the model is busy with another reader
    b.fill("#pasted textarea", "A short memo: the boat leaves at noon from pier four.")
    b.click("#read")
    b.wait_for_selector("#status :text('The model is busy with 1 other reader')", timeout=30_000)
    shot(b, "8-sharing-tab")
    b.wait_for_selector("#progress [data-state=done]", timeout=150_000)
    still_reading = progress_tokens(a)
    assert a.inner_text("#progress [data-state]") and 0 < still_reading < total  # a is not done yet
    assert a.locator("#progress [data-state=reading]").count() == 1

    a.wait_for_selector("#live-map svg", timeout=30_000)
    a.click("#cancel")
    t0 = time.time()
    a.wait_for_selector("#progress [data-state=cancelled]", timeout=150_000)
    stopped_after = time.time() - t0
    read = progress_tokens(a)
    assert "Cancelled after" in a.inner_text("#status")
    assert 0 < read < total
    assert stopped_after < 30, stopped_after
    shot(a, "7-cancelled")
    time.sleep(1.5)
    assert progress_tokens(a) == read  # nothing moves after a cancel
