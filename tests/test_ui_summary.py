"""Section-by-section summary in the app (headless Chromium): which section, n of N, time left, stop
keeps the finished sections, each section under its chapter label and expandable to its source."""

import re

import pytest

from engine.eval_books import book_text
from ui_app import open_app, shot

pytestmark = pytest.mark.real_model


def test_section_summary_progress_stop_and_sources(app_url, browser):
    page = open_app(browser, app_url)
    text, _ = book_text("Ruth")
    page.fill("#pasted textarea", text[:text.index("Chapter 4")])  # chapters 1-3, ~2,600 tokens
    page.click("#read")
    page.wait_for_selector("#progress [data-state=done]", timeout=300_000)
    page.get_by_role("tab", name="Summary").click()
    page.get_by_label("Section by section (re-reads the document)").check()
    page.evaluate("""() => { window.__notes = [];
        new MutationObserver(() => { const n = document.querySelector('#summary .note');
            if (n) window.__notes.push(n.innerText); })
            .observe(document.querySelector('#summary'), {subtree: true, childList: true, characterData: true}); }""")
    page.click("#summarize")
    page.wait_for_selector("#summary .section[data-index='0'] h4", timeout=450_000)  # the first finished section
    assert page.inner_text("#summary .section[data-index='0'] h4") == "Chapter 1"
    about = page.inner_text("#summary .section[data-index='0'] .names")  # who the section is about
    assert about.startswith("about ") and "Naomi" in about, about
    # stop once section 2 has begun (on a busy computer the click could overtake its progress note)
    page.wait_for_function("() => /Section 2 of 3/.test((document.querySelector('#summary .note') || {}).innerText || '')",
                           timeout=150_000)
    page.click("#sum-stop")
    page.wait_for_selector("#summary :text('Stopped. Kept the')", timeout=150_000)
    note = page.inner_text("#summary .note")
    kept = int(re.search(r"Kept the (\d+) finished", note).group(1))
    assert 1 <= kept <= 2 and "of 3" in note and "no summary of the whole document" in note, note
    assert len(page.locator("#summary .section").all()) == kept and not page.locator("#summary .summary-final").count()
    notes = page.evaluate("window.__notes")
    assert any(n.startswith("Section 1 of 3 (Chapter 1)") for n in notes), notes
    assert any(re.search(r"Section 2 of 3 \(Chapter 2\).*about \d+ s left", n) for n in notes), notes  # ETA once timed
    page.locator("#summary .section[data-index='0'] details.source summary").click()  # expand to the source text
    source = page.inner_text("#summary .section[data-index='0'] details.source")
    assert "source: lines 1-" in source and "Elimelech" in source and "Chapter 2" not in source, source
    shot(page, "7-summary-stopped")

    page.click("#summarize")  # run to the end: three sections and the summary of the whole document
    page.wait_for_selector("#summary :text('Done: 3 section summaries')", timeout=600_000)
    labels = [h.inner_text() for h in page.locator("#summary .section h4").all()]
    assert labels == ["Chapter 1", "Chapter 2", "Chapter 3"]
    assert page.inner_text("#summary .summary-final p").strip()
    shot(page, "8-summary-done")
