"""Load test: several browser sessions at once, each reading its own document and asking questions.

    .venv/bin/python scripts/load_test.py [--sessions 4] [--questions 3] [--out docs/load_test.md]

Runs the real app (launch.py's main, real default model) in this process, so that it can also read
what the model thread measured (engine.worker.start_waits: how long each job waited for its first
step and how many steps of other sessions ran meanwhile), and drives headless Chromium (Debian's
chromium via Playwright's async API) with one browser context per person. Each document is made of
filler lines about its own topic with three facts about that topic at different depths; documents
differ in length (a short read and long ones at once). Checks, per session: every question is
answered, every recalled passage comes from that session's own document (no cross-talk), and no
job waited for more than one step of each other session before its first step. Writes a Markdown
report with the measured waits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
SETTINGS = {"window": "256", "cascades": "4", "sinks": "64", "stride": "256"}
TOPICS = [  # topic word (unique per document), filler lines, then three (role, name) facts
    ("lighthouse", 60, [("keeper", "Oswin Tull"), ("painter", "Greta Holm"), ("cook", "Abel Marsh")]),
    ("orchard", 220, [("gardener", "Pia Lund"), ("beekeeper", "Tomas Reed"), ("carter", "Ilse Crane")]),
    ("quarry", 450, [("foreman", "Bruno Kell"), ("blaster", "Vera Stone"), ("clerk", "Otto Fenn")]),
    ("observatory", 700, [("astronomer", "Lena Voss"), ("mechanic", "Karl Dunn"), ("archivist", "Mira Sol")]),
]


def document(topic: str, lines: int, facts: list[tuple[str, str]]) -> str:
    out = [f"Line {i} of the {topic} log notes the weather, the light and the work of the day." for i in range(lines)]
    for k, (role, name) in enumerate(facts):  # at about 20%, 50% and 80% of the document
        out.insert(int(len(out) * (0.2 + 0.3 * k)), f"The {role} of the {topic} is named {name}.")
    return "\n".join(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the text after the last copy of the question in the chat: the answer as it streams
REMAINDER_JS = """(q) => { const t = document.querySelector('#chat').textContent; const i = t.lastIndexOf(q);
    return i < 0 ? null : t.slice(i + q.length); }"""


async def person(browser, url: str, k: int, questions: int, answer_tokens: int, t_start: float) -> dict:
    topic, lines, facts = TOPICS[k]
    page = await (await browser.new_context(viewport={"width": 1400, "height": 1000})).new_page()
    await page.goto(url)
    await page.wait_for_selector("#read", timeout=60_000)
    await page.click("#settings > button")
    for elem_id, value in {**SETTINGS, "max-new": str(answer_tokens)}.items():
        box = page.locator(f"#{elem_id} input[type=number], #{elem_id} textarea, #{elem_id} input[type=text]").first
        await box.fill(value)
        await box.press("Tab")
    await page.fill("#pasted textarea", document(topic, lines, facts))
    record = {"topic": topic, "questions": []}
    try:  # the page's load event gave the browser its session id (kept for reloads)
        await page.wait_for_function("localStorage.getItem('cascade-reader-session')", timeout=30_000)
        record["session_id_kept"] = True
    except Exception:  # noqa: BLE001 - reported, not fatal: the session still works, a reload would lose it
        record["session_id_kept"] = False
    t0 = time.monotonic()
    await page.click("#read")
    await page.wait_for_function("/reading: [1-9]/.test(document.querySelector('#progress .label').innerText)",
                                 timeout=600_000, polling=50)
    record["read_first_progress_s"] = time.monotonic() - t0
    await page.wait_for_selector("#progress [data-state=done]", timeout=1_200_000)
    record["read_s"] = time.monotonic() - t0
    record["tokens"] = int((await page.inner_text("#progress .label")).split("/")[1].split("tokens")[0]
                           .replace(",", "").strip())
    for role, name in facts[:questions]:
        q = f"Who is the {role} of the {topic}?"
        await page.fill("#question textarea", q)
        t0 = time.monotonic()
        await page.click("#ask")
        await page.wait_for_function(f"""() => {{ const r = ({REMAINDER_JS})({json.dumps(q)});
            return r !== null && r.trim() && !r.trim().startsWith('…') && !r.includes('The model is busy')
                && !r.includes('Waiting for'); }}""", timeout=1_200_000, polling=50)
        first = time.monotonic() - t0
        await page.wait_for_function(f"""() => {{ const r = ({REMAINDER_JS})({json.dumps(q)});
            return r !== null && r.includes('Recalled passages'); }}""", timeout=1_200_000, polling=100)
        answer = (await page.evaluate(REMAINDER_JS, q)).split("Recalled passages")[0].strip()
        record["questions"].append({"question": q, "expected": name, "answer": answer, "first_token_s": first,
                                    "answer_s": time.monotonic() - t0, "finished_at_s": time.monotonic() - t_start})
    return record


def own_document_check(records: list[dict]) -> dict[str, dict]:
    """From the server's own session objects: which topic each session read, and whether every
    passage recalled for its answers came from that document (no other topic's word in it)."""
    from app import sessions

    topics = [t for t, _, _ in TOPICS]
    out = {}
    for st in list(sessions._SESSIONS.values()):
        if st.session is None or st.session.document is None:
            continue
        text = st.session.document.segments[0].text if st.session.document.segments else ""
        mine = [t for t in topics if f"of the {t} log" in text]
        if len(mine) != 1:
            continue
        others = [t for t in topics if t != mine[0]]
        passages = [p["text"] for a in st.session.answers for p in a.recalled]
        out[mine[0]] = {"answers": len(st.session.answers),
                        "questions_own": all(mine[0] in a.question for a in st.session.answers),
                        "passages": len(passages),
                        "passages_from_other_documents": sum(any(o in p for o in others) for p in passages)}
    return out


def report(records, owners, checks, starts, args, wall_s) -> str:
    lines = [f"# Load test: {args.sessions} sessions at once, {args.questions} questions each",
             "",
             f"`python scripts/load_test.py --sessions {args.sessions} --questions {args.questions} "
             f"--answer-tokens {args.answer_tokens}`, run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
             f"on this machine ({os.cpu_count()} CPU cores, shared), SmolLM2-135M, window 256, 4 cascades, "
             f"stride 256. The browsers (headless Chromium) run on the same cores as the model. Total wall "
             f"time {wall_s:.0f} s.",
             "",
             "## What each person saw (browser clocks)",
             "",
             "| document | tokens | read: first progress | read: done | question | first token | answer done | answer (expected) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        for i, q in enumerate(r["questions"]):
            head = (f"| {r['topic']} | {r['tokens']:,} | {r['read_first_progress_s']:.1f} s | {r['read_s']:.1f} s"
                    if i == 0 else "| | | | ")
            ans = " ".join(q["answer"].split())[:70].replace("|", "/")
            lines.append(f"{head} | {q['question']} | {q['first_token_s']:.1f} s | {q['answer_s']:.1f} s | "
                         f"{ans} ({q['expected']}) |")
    lines += ["", "## Waits for the first step (the model thread's clock, engine.worker.start_waits)", "",
              "A job is a read, a question or a model load; its wait runs from submission to its first step. "
              "`others' steps` counts the steps of other sessions that ran meanwhile; fair turns allow at most "
              "one per other session with work.", "",
              "| document | job | wait | others' steps | other sessions busy | longest of those steps |",
              "|---|---|---|---|---|---|"]
    for s in starts:
        lines.append(f"| {owners.get(s['owner'], '?')} | {s['label']} | {s['wait_s'] * 1000:.0f} ms | "
                     f"{s['other_steps']} | {s['other_owners']} | {s['longest_other_step_s'] * 1000:.0f} ms |")
    waits = [s["wait_s"] for s in starts]
    over = [s for s in starts if s["other_steps"] > s["other_owners"]]
    lines += ["", f"Waits: median {statistics.median(waits) * 1000:.0f} ms, max {max(waits) * 1000:.0f} ms over "
              f"{len(waits)} jobs; jobs that waited for more than one step of each other session: {len(over)}.",
              "", "## Every answer from its own document (the server's session objects)", "",
              "| document | answers | questions its own | recalled passages | passages from other documents |",
              "|---|---|---|---|---|"]
    for topic, c in checks.items():
        lines.append(f"| {topic} | {c['answers']} | {'yes' if c['questions_own'] else 'NO'} | {c['passages']} | "
                     f"{c['passages_from_other_documents']} |")
    names = sum(q["expected"].split()[0].lower() in q["answer"].lower() for r in records for q in r["questions"])
    total = sum(len(r["questions"]) for r in records)
    kept = sum(r.get("session_id_kept", False) for r in records)
    lines += ["", f"Browsers that kept their session id (for reloads) within 30 s of opening: {kept} of {len(records)}."]
    lines += ["", f"Answers that name the expected person: {names} of {total} (the 135M model's reading, not the "
              "sharing, decides this; every passage it was given came from its own document)."]
    return "\n".join(lines) + "\n"


async def run(args) -> int:
    from playwright.async_api import async_playwright

    from app import main as app_main
    from engine import worker

    os.environ.setdefault("CASCADE_READER_SNAPSHOTS", tempfile.mkdtemp(prefix="cascade-load-"))
    port = free_port()
    app_main.main(["--port", str(port), "--max-busy", str(args.sessions)], block=False)
    url = f"http://127.0.0.1:{port}/"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        seen = len(worker.start_waits())
        t0 = time.monotonic()
        records = await asyncio.gather(*[person(browser, url, k, args.questions, args.answer_tokens, t0)
                                         for k in range(args.sessions)])
        wall = time.monotonic() - t0
        await browser.close()
    from app import sessions

    owners = {}
    for st in list(sessions._SESSIONS.values()):
        if st.session is not None and st.session.document is not None:
            text = st.session.document.segments[0].text
            owners[st.sid] = next((t for t, _, _ in TOPICS if f"of the {t} log" in text), "?")
    owners[None] = "(shared: model load)"
    starts = worker.start_waits()[seen:]
    checks = own_document_check(records)
    text = report(records, owners, checks, starts, args, wall)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    ok = (len(checks) == args.sessions and all(c["answers"] == args.questions and c["questions_own"]
                                               and not c["passages_from_other_documents"] for c in checks.values())
          and all(s["other_steps"] <= s["other_owners"] for s in starts))
    print("load test:", "passed" if ok else "FAILED")
    return 0 if ok else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=4, choices=range(1, len(TOPICS) + 1))
    p.add_argument("--questions", type=int, default=3, choices=(1, 2, 3))
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "docs" / "load_test.md"))
    args = p.parse_args()
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
