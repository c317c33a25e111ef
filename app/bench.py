"""What the web UI's reading costs over the engine's: python -m app.bench [--tokens N] [--repeats R].

Reads the same text (the KJV, N tokens) alternately through the UI's own read handler
(`ui.read_document`: progress bar, live retention map computed and rendered as PNG) and through
the engine alone (`ReadingSession.read`, no callbacks), and through the UI with the live map off, and writes
tokens/s and the overheads to results/app_bench.json. The issue's goal: the live retention view slows reading by
at most 5%.
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
    args = p.parse_args(argv)

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


if __name__ == "__main__":
    main()
