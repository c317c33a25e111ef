"""What the web UI costs: python -m app.bench [--tokens N] [--repeats R] | --questions N.

Reading speed (default):

Reads the same text (the KJV, N tokens) alternately through the UI's own read handler
(`ui.read_document`: progress bar, live retention map computed and rendered as PNG) and through
the engine alone (`ReadingSession.read`, no callbacks), and through the UI with the live map off, and writes
tokens/s and the overheads to results/app_bench.json. The issue's goal: the live retention view slows reading by
at most 5%.

Memory while chatting (`--questions N`, issue 13): one app session reads Exodus through the UI's read
handler with the app's default settings, then asks N long questions through the UI's chat handler
(`ui.ask`: the model thread, the chat history, recalled passages and citations), and writes the
process's RSS after the read and after each answer to results/app_memory.json. The target: RSS after
the last answer within 2% of RSS after the read.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from engine import documents, worker
from engine.bench import bench_tokens
from engine.session import ReadingSession

from . import ui


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m app.bench", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=2, help="runs of each path, interleaved")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", default="results")
    p.add_argument("--questions", type=int, default=0, help="memory while chatting: N questions in one session")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--doc-chars", type=int, default=40000, help="characters of Exodus read before the questions")
    args = p.parse_args(argv)
    if args.questions > 0:
        return chat_memory(args)

    loaded = ui.get_model(args.model)
    text = loaded.tokenizer.decode(bench_tokens(loaded.tokenizer, args.tokens))
    settings = dict(policy="cascade", window=2048, cascades=4, sinks=64, stride=512)
    config = ui.make_config(settings["policy"], settings["window"], settings["cascades"], settings["sinks"])

    def engine_only() -> float:
        def read() -> float:
            session = ReadingSession(loaded, config, stride=settings["stride"])
            t = time.perf_counter()
            session.read(documents.document_from_text(text, title="kjv"))
            return time.perf_counter() - t

        return worker.call(read)  # the thread the UI reads on: a second OpenMP pool would slow both

    def through_ui(live_map: bool = True) -> tuple[float, int]:
        """Seconds of one read through the UI's handler, and how many live maps it drew."""
        state, live_maps = ui.new_state(), 0
        interval = ui.RETENTION_MIN_INTERVAL_S
        ui.RETENTION_MIN_INTERVAL_S = interval if live_map else float("inf")
        try:
            t = time.perf_counter()
            for update in ui.read_document(state, None, text, args.model, *settings.values()):
                live_maps += "<img" in str(update[1])
            seconds = time.perf_counter() - t
        finally:
            ui.RETENTION_MIN_INTERVAL_S = interval
        if state.session is None:
            raise RuntimeError("the UI read did not finish")
        return seconds, live_maps

    engine_only()  # warm-up: first-call allocations and the tokenizer
    runs = {"engine": [], "ui": [], "ui_without_live_map": []}
    for _ in range(args.repeats):  # interleaved, and the best of each kept: this machine is noisy
        runs["engine"].append(engine_only())
        seconds, maps = through_ui()
        runs["ui"].append(seconds)
        runs["ui_without_live_map"].append(through_ui(live_map=False)[0])
    tokens = documents.count_tokens(documents.document_from_text(text), loaded.tokenizer)
    best = {k: min(v) for k, v in runs.items()}
    result = {"tokens": tokens, "settings": settings, "seconds": runs,
              "engine_tokens_per_second": tokens / best["engine"], "ui_tokens_per_second": tokens / best["ui"],
              "ui_overhead": best["ui"] / best["engine"] - 1,
              "live_map_overhead": best["ui"] / best["ui_without_live_map"] - 1, "live_maps_drawn": maps}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "app_bench.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


def chat_memory(args) -> dict:
    """RSS after reading and after each of `args.questions` answers, all through the UI's handlers."""
    import psutil

    from engine.bench_answers import QUESTIONS, exodus_document, rss_growth
    from engine.cache import CacheConfig

    proc = psutil.Process()
    rss = lambda: round(proc.memory_info().rss / 2 ** 20, 1)  # noqa: E731
    document = exodus_document(args.doc_chars)
    state = ui.new_state()
    d = CacheConfig()  # the app's defaults, as its settings panel shows them (ui.build_app)
    settings = dict(policy=d.policy, window=d.window, cascades="auto", sinks=d.sinks, stride=512)
    start = time.perf_counter()
    for _ in ui.read_document(state, None, document.text, args.model, *settings.values()):
        pass
    if state.session is None:
        raise RuntimeError("the UI read did not finish")
    result = {"settings": settings, "doc_tokens": state.session.read_result.doc_tokens,
              "read_seconds": round(time.perf_counter() - start, 1), "max_new_tokens": args.max_new_tokens,
              "rss_after_read_mb": rss(), "answers": []}
    print(f"read {result['doc_tokens']} tokens, RSS {result['rss_after_read_mb']} MB", flush=True)
    history = []
    for i in range(args.questions):
        q = QUESTIONS[i % len(QUESTIONS)]
        t = time.perf_counter()
        for history, _ in ui.ask(state, q, history, "new", args.max_new_tokens, 0.0):
            pass
        answer = state.session.answers[-1]
        row = {"question": q, "tokens": answer.tokens, "seconds": round(time.perf_counter() - t, 1),
               "recalled": len(answer.recalled or []), "citations": len(answer.citations or []),
               "chat_messages": len(history), "rss_mb": rss()}
        result["answers"].append(row)
        print(f"answer {i + 1}: {row}", flush=True)
    result.update(rss_growth(result["rss_after_read_mb"], [a["rss_mb"] for a in result["answers"]]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "app_memory.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("doc_tokens", "rss_after_read_mb", "growth", "max_growth")}))
    return result


if __name__ == "__main__":
    main()
