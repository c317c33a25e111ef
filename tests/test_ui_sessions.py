"""Several people at once, in headless Chromium (issue 11): private sessions that survive a reload,
private snapshots with a confirmed delete, a question asked during one's own read, and Stop in the
section summary and in Compare saying what really happened, fair turns (a short read is not stuck
behind another session's long answer), the retention map's and the chat's fixes, and the limits
(busy sessions, upload size). Shares the app and browser with
test_ui.py (tests/ui_app.py)."""

import time

import pytest

from ui_app import (MAX_BUSY, MAX_UPLOAD_MB, open_app, progress_tokens, serve_app, set_number, shot,
                    start_long_answer)

pytestmark = pytest.mark.real_model

MEMO = ("Minutes of the lighthouse committee. The new lamp was ordered from Bergen. "
        "The keeper of the lighthouse is named Oswin Tull, and he rings the bell at dusk. ") * 6


def long_text(n: int, topic: str) -> str:
    return " ".join(f"Line {i} of the {topic} log notes the wind, the tide and the boats in harbour." for i in range(n))


def read_text(page, text, timeout=300_000):
    # mark the progress shown now, so that a "done" left from an earlier read does not count
    page.evaluate("document.querySelector('#progress .read-progress').dataset.old = '1'")
    page.fill("#pasted textarea", text)
    page.click("#read")
    page.wait_for_selector("#progress .read-progress[data-state=done]:not([data-old])", timeout=timeout)


def pick_snapshot(page, label):
    page.locator("#snaps input").click()
    page.locator("ul[role=listbox] li", has_text=label).first.click()


def test_sessions_are_private_survive_reload_and_snapshots_need_confirming(app_url, browser):
    a = open_app(browser, app_url)
    read_text(a, MEMO)
    a.fill("#question textarea", "Who is the keeper of the lighthouse?")
    a.click("#ask")
    a.wait_for_selector("#chat :text('Recalled passages')", timeout=300_000)
    answer_before = a.inner_text("#chat").split("lighthouse?", 1)[1].split("Recalled passages", 1)[0].strip()
    assert answer_before

    a.get_by_role("tab", name="Snapshots").click()
    a.fill("#snap-name textarea", "committee minutes")
    a.click("#snap-save")
    a.wait_for_selector("#snap-status :text('Saved committee minutes')", timeout=30_000)
    assert "/" not in a.inner_text("#snap-status")  # fix 3: no server folder

    # fix 3: another person's session neither lists nor can pick a's snapshot
    b = open_app(browser, app_url, settings=False)
    b.get_by_role("tab", name="Snapshots").click()
    b.click("#snap-refresh")  # a list built afresh, not the one from when b's page opened
    b.wait_for_timeout(500)
    b.locator("#snaps input").click()
    b.wait_for_timeout(500)
    assert b.locator("ul[role=listbox] li", has_text="committee minutes").count() == 0
    b.keyboard.press("Escape")

    # fix 4: a reload keeps the session: chat, document facts, progress and the snapshot list come back
    a.reload()
    a.wait_for_selector("#facts :text('pasted text')", timeout=30_000)
    a.wait_for_selector("#chat :text('Who is the keeper of the lighthouse?')", timeout=10_000)
    assert "Recalled passages" in a.inner_text("#chat") and answer_before in a.inner_text("#chat")
    assert a.locator("#progress [data-state=done]").count() == 1
    a.get_by_role("tab", name="Snapshots").click()
    pick_snapshot(a, "committee minutes")  # listed without "Refresh list"
    shot(a, "10-after-reload")

    # fix 6: a cancelled read keeps the loaded document's facts on screen
    a.click("#settings > button")
    for elem_id, value in {"window": "256", "cascades": "4", "stride": "256"}.items():
        set_number(a, elem_id, value)
    a.fill("#pasted textarea", long_text(1500, "harbour"))
    a.click("#read")
    a.wait_for_function("/reading: [1-9]/.test(document.querySelector('#progress .label').innerText)",
                        timeout=150_000)
    a.click("#cancel")
    a.wait_for_selector("#progress [data-state=cancelled]", timeout=150_000)
    assert "previous document is still loaded" in a.inner_text("#status")
    assert "pasted text" in a.inner_text("#facts") and "tokens" in a.inner_text("#facts")

    # fix 6: loading a snapshot fills the document panel and says how long the load took
    a.get_by_role("tab", name="Snapshots").click()
    pick_snapshot(a, "committee minutes")
    a.click("#snap-load")
    a.wait_for_selector("#snap-status :text('Loaded committee minutes')", timeout=150_000)
    assert a.locator("#progress [data-state=loaded]").count() == 1
    assert "idle" not in a.inner_text("#progress") and progress_tokens(a) > 0
    assert "loaded from snapshot committee minutes in" in a.inner_text("#facts")

    # fix 3: delete asks first; "Keep it" keeps it, "Yes, delete it" deletes it
    a.click("#snap-delete")
    a.wait_for_selector("#snap-status :text('Delete committee minutes for good?')", timeout=10_000)
    a.click("#snap-delete-no")
    a.wait_for_selector("#snap-status :text('Kept.')", timeout=10_000)
    pick_snapshot(a, "committee minutes")
    a.click("#snap-delete")
    a.click("#snap-delete-yes")
    a.wait_for_selector("#snap-status :text('Deleted committee minutes')", timeout=10_000)
    a.locator("#snaps input").click()
    a.wait_for_timeout(500)
    assert a.locator("ul[role=listbox] li", has_text="committee minutes").count() == 0


def test_ask_during_own_read_and_stop_compare_and_summary(app_url, browser):
    page = open_app(browser, app_url)
    # fix 1: a question asked while one's own document is still being read waits for it and is answered
    page.fill("#pasted textarea", long_text(250, "ferry") + " " + MEMO)
    page.click("#read")
    page.wait_for_function("/reading: [1-9]/.test(document.querySelector('#progress .label').innerText)",
                           timeout=150_000)
    # fix 9: record the chat on every change: no pending bubble may show above the new question
    page.evaluate("""() => { window.__chat = [];
        new MutationObserver(() => { const c = document.querySelector('#chat');
            window.__chat.push({text: c.innerText, pending: c.querySelectorAll('.pending').length}); })
            .observe(document.querySelector('#chat'), {subtree: true, childList: true, characterData: true}); }""")
    page.fill("#question textarea", "Who is the keeper of the lighthouse?")
    page.click("#ask")
    page.wait_for_selector("#progress [data-state=done]", timeout=300_000)
    page.wait_for_selector("#chat :text('Recalled passages')", timeout=300_000)
    chat = page.inner_text("#chat")
    assert "(no answer)" not in chat and "(stopped)" not in chat, chat
    answer = chat.split("Who is the keeper of the lighthouse?", 1)[1].split("Recalled passages", 1)[0].strip()
    assert answer, chat
    for seen in page.evaluate("window.__chat"):
        assert seen["pending"] == 0, seen
        if "…" in seen["text"] and "Who is the keeper" in seen["text"]:
            assert seen["text"].index("Who is the keeper") < seen["text"].index("…"), seen
    # fix 9: no floating "Conversation" label over the messages, no trash icon over the copy icons
    assert not page.locator("#chat :text-is('Conversation')").is_visible()
    assert not page.locator("#chat button[aria-label='Clear']").is_visible()

    # fix 8: the sinks row says what its other slots hold; the cascades' colours are far apart
    page.get_by_role("tab", name="Retention").click()
    page.wait_for_selector("#retained-text mark", timeout=30_000)
    assert "hold the prompt" in page.inner_text("#occupancy")
    colours = page.evaluate("""() => [...document.querySelectorAll('#retained-text .legend mark')]
        .map(m => getComputedStyle(m).backgroundColor.match(/\\d+/g).map(Number))""")
    assert len(colours) >= 5  # sink + 4 cascades
    for i in range(len(colours)):
        for j in range(i):
            assert sum(abs(x - y) for x, y in zip(colours[i], colours[j])) > 60, colours
    page.get_by_role("tab", name="Chat").click()

    # fix 7: Stop in Compare ends both columns; the one that never started says so, and reading shows an ETA
    page.get_by_role("tab", name="Compare").click()
    page.fill("#compare-question textarea", "Who is the keeper?")
    page.click("#compare")
    page.wait_for_selector("#compare-a :text('ETA')", timeout=150_000)
    page.click("#compare-stop")
    page.wait_for_selector("#compare-b :text('Stopped before it started')", timeout=30_000)
    assert "waiting" not in page.inner_text("#compare-b")
    shot(page, "11-compare-stopped")

    # fix 5: stopping a section summary says it stopped, not "Done" (a one-section document: the stop
    # lands in its section's answer, after which the engine still hands back a final summary)
    page.get_by_role("tab", name="Chat").click()
    read_text(page, MEMO)
    page.get_by_role("tab", name="Summary").click()
    page.get_by_label("Section by section (re-reads the document)").check()
    set_number(page, "max-new", "64")
    page.click("#summarize")
    page.wait_for_selector("#summary :text('summarizing…')", timeout=150_000)  # in the section's answer
    page.click("#sum-stop")
    page.wait_for_selector("#summary :text('Stopped')", timeout=150_000)
    assert "Done:" not in page.inner_text("#summary")

    # fix 5: once every section is summarized, the note says the final summary is being written
    page.evaluate("""() => { window.__notes = [];
        new MutationObserver(() => { const n = document.querySelector('#summary .note');
            if (n) window.__notes.push(n.innerText); })
            .observe(document.querySelector('#summary'), {subtree: true, childList: true, characterData: true}); }""")
    page.click("#summarize")
    page.wait_for_selector("#summary :text('Done: 1 section')", timeout=300_000)
    notes = page.evaluate("window.__notes")
    assert any("1 finished section summary; writing the summary of the whole document" in n for n in notes), notes
    shot(page, "12-summary-stopped")


def test_a_short_read_takes_turns_with_another_sessions_long_answer(app_url, browser):
    # fix 2: fair turns between sessions: b's short read is done while a's long answer is still being
    # written (the old app ran one model job at a time, so b waited for all of a's answer)
    b = open_app(browser, app_url)
    a = open_app(browser, app_url)
    read_text(a, MEMO)
    start_long_answer(a, "Tell me a very long and detailed story about the lighthouse keeper and his bell.")
    read_text(b, "A short memo: the boat leaves at noon from pier four.", timeout=600_000)
    chat = a.inner_text("#chat")
    assert "Recalled passages" not in chat and "(stopped)" not in chat, chat  # a's answer still going
    a.click("#stop")
    a.wait_for_selector("#chat :text('Recalled passages')", timeout=30_000)


def test_retention_map_labels_are_text_that_fits(app_url, browser, tmp_path):
    # fix 8: on the retention map an SRT's long cue labels are cut to their share of the axis instead of
    # printed over each other, and the row and tick labels are text at a readable size (they were
    # small raster text inside a PNG)
    srt = tmp_path / "meeting.srt"
    srt.write_text("\n".join(f"{i}\n00:{i // 60:02d}:{i % 60:02d},000 --> 00:{i // 60:02d}:{i % 60:02d},900\n"
                             f"{('Harbour Master Oswald', 'Chairwoman Ingrid Hale', 'Treasurer Bram Okafor')[i % 3]}: "
                             f"the committee discussed the harbour lamp and the bell.\n"
                             for i in range(1, 41)))
    page = open_app(browser, app_url)
    page.set_input_files("#upload input[type=file]", str(srt))
    page.wait_for_selector("#upload [aria-label='meeting.srt']", timeout=20_000)
    page.click("#read")
    page.wait_for_selector("#progress [data-state=done]", timeout=300_000)
    page.get_by_role("tab", name="Retention").click()
    # the map itself, not the placeholder (also class rmap) that a slow computer shows first
    page.wait_for_selector("#retention-map .rmap svg text", timeout=60_000)
    boxes = page.evaluate("""() => [...document.querySelectorAll('#retention-map text')].map(t => {
        const r = t.getBoundingClientRect(); return {text: t.textContent, x0: r.left, x1: r.right, h: r.height}; })""")
    ticks = [b for b in boxes if b["text"][:1].isdigit()]
    assert len(ticks) == 5 and any(b["text"].startswith("layer") for b in boxes), boxes
    for left, right in zip(ticks, ticks[1:]):
        assert left["x1"] <= right["x0"], (left, right)  # not printed over each other
    assert any("…" in b["text"] for b in ticks), ticks  # the long cue labels were cut to fit
    assert min(b["h"] for b in boxes) >= 12, boxes  # legible, not small print
    shot(page, "15-srt-retention-labels")


def test_limits_busy_sessions_and_upload_size(app_url, browser, tmp_path):
    # MAX_BUSY (3) sessions with long reads in flight: the next one is told so, in words, and nothing starts
    readers = [open_app(browser, app_url) for _ in range(MAX_BUSY)]
    for k, page in enumerate(readers):
        page.fill("#pasted textarea", long_text(1500, f"busy{k}"))
        page.click("#read")
    for page in readers:
        page.wait_for_function("/reading|waiting/.test(document.querySelector('#progress .label').innerText)",
                               timeout=150_000)
    late = open_app(browser, app_url, settings=False)
    late.fill("#pasted textarea", MEMO)
    late.click("#read")
    late.wait_for_selector("#status :text('at capacity')", timeout=30_000)
    assert "try again" in late.inner_text("#status")
    assert late.locator("#progress [data-state='not started']").count() == 1
    shot(late, "13-at-capacity")
    for page in readers:
        page.click("#cancel")
    for page in readers:
        page.wait_for_selector("#progress [data-state=cancelled]", timeout=150_000)

    # an upload over --max-upload-mb is refused before it reaches the reader
    big = tmp_path / "big.txt"
    big.write_text("word " * (MAX_UPLOAD_MB * 1024 * 1024 // 5 + 1000))
    late.set_input_files("#upload input[type=file]", str(big))
    late.wait_for_selector(":text-matches('exceeds|too large|maximum', 'i')", timeout=20_000)
    assert late.locator("#upload [aria-label='big.txt']").count() == 0


@pytest.fixture(scope="module")
def idle_app_url(tmp_path_factory):
    """A second app that frees a session after 6 idle seconds (--idle-timeout-min 0.1)."""
    yield from serve_app(tmp_path_factory, "--idle-timeout-min", "0.1")


def test_an_idle_session_is_freed_and_its_snapshot_stays(idle_app_url, browser):
    a = open_app(browser, idle_app_url)
    read_text(a, MEMO)
    a.get_by_role("tab", name="Snapshots").click()
    a.fill("#snap-name textarea", "idle minutes")
    a.click("#snap-save")
    a.wait_for_selector("#snap-status :text('Saved idle minutes')", timeout=30_000)
    context = a.context
    a.close()  # the person leaves; nothing touches the session any more
    time.sleep(12)  # 6 s idle, and the freeing loop runs every 1.5 s
    back = open_app(browser, idle_app_url, settings=False, context=context)  # same person, later
    back.wait_for_selector(":text('freed after being idle')", timeout=30_000)
    assert back.locator("#progress [data-state=idle]").count() == 1  # the reading cache is gone...
    assert "pasted text" not in back.inner_text("#facts")
    back.get_by_role("tab", name="Snapshots").click()
    pick_snapshot(back, "idle minutes")  # ...and the snapshot stayed, loadable
    back.click("#snap-load")
    back.wait_for_selector("#snap-status :text('Loaded idle minutes')", timeout=150_000)
    assert "pasted text" in back.inner_text("#facts")
    shot(back, "14-idle-freed")
