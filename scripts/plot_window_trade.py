"""Book-QA accuracy against reading speed, one point per window: where the default window sits.

    python scripts/plot_window_trade.py docs/window_trade.png results/books_win/books.jsonl \
        results/q1/new_w256/read_bench.json results/q1/new_w512/read_bench.json ...

Accuracy: the cascade rows of `engine eval qa --set books` (recall on and off), per window, with
95% Wilson intervals. Speed: the cascade's tok/s and its ratio to the ceiling measured in the same
`engine bench` run, per window. Prints the Markdown table it plots.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.eval_books import wilson  # noqa: E402


def main(out: str, books: str, benches: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = {}
    for path in benches:
        data = json.loads(Path(path).read_text())
        rows = {r["policy"]: r for r in data["rows"]}
        speed[data["settings"]["window"]] = (rows["cascade"]["tokens_per_second"],
                                             rows["cascade"]["tokens_per_second"] / rows["ceiling"]["tokens_per_second"])
    cells: dict[tuple[int, str], list[bool]] = {}
    for line in Path(books).read_text().splitlines():
        row = json.loads(line)
        c = row["case"]
        if c["policy"] == "cascade":
            cells.setdefault((c["window"], c["recall"]), []).append(row["correct"])
    fig, ax = plt.subplots(figsize=(7, 4))
    print("| window | tok/s (of the ceiling) | recall on: right / n (95% CI) | recall off: right / n (95% CI) |")
    print("|---|---|---|---|")
    for window in sorted(speed):
        tps, ratio = speed[window]
        cols = []
        for recall, marker in (("on", "o"), ("off", "s")):
            got = cells.get((window, recall), [])
            if not got:
                cols.append("-")
                continue
            k, n = sum(got), len(got)
            lo, hi = wilson(k, n)
            cols.append(f"{k}/{n} = {k / n:.2f} ({lo:.2f}-{hi:.2f})")
            ax.errorbar([tps], [k / n], yerr=[[k / n - lo], [hi - k / n]], fmt=marker, capsize=3,
                        color="#3a6" if recall == "on" else "#999",
                        label=f"recall {recall}" if window == min(speed) else None)
            if recall == "on":
                ax.annotate(f"window {window}", (tps, k / n), textcoords="offset points", xytext=(6, 6), fontsize=8)
        print(f"| {window} | {tps:.0f} ({ratio:.2f}) | {cols[0]} | {cols[1]} |")
    ax.set_xlabel("reading speed, tok/s (quiet, 2 threads, bfloat16, 16k tokens)")
    ax.set_ylabel("book QA accuracy (Exodus)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
