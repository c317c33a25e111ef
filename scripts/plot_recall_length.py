"""Accuracy vs document length for book QA runs (engine eval qa --set books) -> a PNG for docs/.

usage: python scripts/plot_recall_length.py OUT.png RUN_DIR [RUN_DIR ...]
Each RUN_DIR holds a books.jsonl; every document in it becomes one x position (its token count),
with one line per row kind (no document, oracle, recall off, recall on) and 95% Wilson intervals.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.eval_books import wilson  # noqa: E402
from engine.evaluate import _plt  # noqa: E402

KINDS = [("none", "off", "no document", "#999"), ("oracle", "off", "oracle (answer's passage only)", "#555"),
         ("cascade", "off", "cascade, recall off", "#d62728"), ("cascade", "on", "cascade, recall on", "#2ca02c")]


def main(out: str, runs: list[str]) -> None:
    rows = [json.loads(line) for run in runs for line in (Path(run) / "books.jsonl").read_text().splitlines()
            if line.strip()]
    length = {}
    for r in rows:
        if "doc_tokens" in r:
            length[r["case"]["doc"]] = r["doc_tokens"]
    docs = sorted(length, key=length.get)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for policy, recall, name, colour in KINDS:
        xs, ys, lo, hi = [], [], [], []
        for d in docs:
            rs = [r for r in rows if r["case"]["doc"] == d and r["case"]["policy"] == policy
                  and r["case"]["recall"] == recall]
            if not rs:
                continue
            k = sum(r["correct"] for r in rs)
            a, b = wilson(k, len(rs))
            xs.append(length[d])
            ys.append(k / len(rs))
            lo.append(k / len(rs) - a)
            hi.append(b - k / len(rs))
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=name, color=colour)
    for d in docs:
        ax.annotate(d, (length[d], 1.0), ha="center", va="bottom", fontsize=8)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("accuracy (95% CI)")
    ax.legend(fontsize=8, loc="center left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
