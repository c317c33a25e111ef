"""Memory while answering: RSS after reading, then after each of several long answers.

A fixed memory budget must stay fixed while the user asks: every answer starts from the same frozen
document memory and writes into the same preallocated tail, so RSS after the fifth answer should
equal RSS after reading (target: growth <= 2%). Each policy runs in its own process.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

# Questions about Exodus that invite long answers (the benchmark is about memory, not accuracy).
QUESTIONS = [
    "Tell in detail everything the document says about Moses and Aaron.",
    "Describe every plague the Lord sent upon Egypt, one by one.",
    "List all the laws given on the mountain, with their details.",
    "Describe the tabernacle and everything in it, piece by piece.",
    "Tell the whole journey of the children of Israel, place by place.",
    "What did the people do while Moses was on the mountain? Tell it all.",
]


def exodus_document(chars: int):
    from . import documents
    from .corpus import kjv_verses

    text = "".join(v.text + "\n" for v in kjv_verses() if v.book == "Exodus")
    return documents.document_from_text(text[:chars], "Exodus")


def worker(job: dict) -> dict:
    """One policy in this process: read, then ask `answers` questions; RSS after each step."""
    import psutil
    import torch

    from .cache import CacheConfig
    from .models import load_model
    from .session import ReadingSession

    torch.manual_seed(0)
    proc = psutil.Process()
    rss = lambda: proc.memory_info().rss / 2 ** 20  # noqa: E731
    loaded = load_model(job["model"], dtype=job["dtype"], say=lambda s: None)
    session = ReadingSession(loaded, CacheConfig(policy=job["policy"], window=job["window"],
                                                 cascades=job["cascades"], sinks=job["sinks"]), stride=job["stride"])
    start = time.perf_counter()
    session.read(exodus_document(job["chars"]))
    row = {"policy": job["policy"], "doc_tokens": session.read_result.doc_tokens,
           "read_seconds": round(time.perf_counter() - start, 1),
           "rss_after_read_mb": round(rss(), 1), "answers": []}
    for i in range(job["answers"]):
        q = QUESTIONS[i % len(QUESTIONS)]
        for _ in session.ask(q, max_new_tokens=job["max_new_tokens"], n_citations=3):
            pass
        a = session.answers[-1]
        row["answers"].append({"question": q, "tokens": a.tokens, "seconds": round(a.seconds, 1),
                               "rss_mb": round(rss(), 1)})
    row.update(rss_growth(row["rss_after_read_mb"], [a["rss_mb"] for a in row["answers"]]))
    return row


def rss_growth(after_read_mb: float, after_answers_mb: list[float]) -> dict:
    """Growth of RSS over the read's, after the last answer and at its highest (the target: <= 2%)."""
    last = after_answers_mb[-1] if after_answers_mb else after_read_mb
    return {"growth": round(last / after_read_mb - 1, 4),
            "max_growth": round(max(after_answers_mb or [last]) / after_read_mb - 1, 4)}


def run_answer_bench(args) -> dict:
    """`python -m engine bench --answers N`: one process per policy; JSON in --out."""
    from .bench import run_worker, vars_of
    from .cache import CacheConfig
    from .errors import UserError

    if args.answers < 1 or args.max_new_tokens < 1 or args.doc_chars < 1:
        raise UserError("bench: --answers, --max-new-tokens and --doc-chars must be >= 1")
    for policy in args.policies:
        CacheConfig(policy=policy, sinks=args.sinks, window=args.window, cascades=args.cascades)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for policy in args.policies:
        job = {"model": args.model, "dtype": args.dtype, "policy": policy, "window": args.window,
               "cascades": args.cascades, "sinks": args.sinks, "stride": args.stride, "chars": args.doc_chars,
               "answers": args.answers, "max_new_tokens": args.max_new_tokens}
        print(f"bench: {policy}: read {args.doc_chars} chars of Exodus, then {args.answers} answers...",
              file=sys.stderr, flush=True)
        row = run_worker("engine.bench_answers", job, f"the {policy} answer run")
        rows.append(row)
        print(f"  RSS {row['rss_after_read_mb']:.0f} MB after reading -> "
              + ", ".join(f"{a['rss_mb']:.0f}" for a in row["answers"]) + f" MB (growth {row['growth']:+.1%})",
              file=sys.stderr)
    summary = {r["policy"]: {"growth": r["growth"], "max_growth": r["max_growth"],
                             "target_met": r["max_growth"] <= 0.02} for r in rows}
    path = out / "answer_memory.json"
    path.write_text(json.dumps({"settings": vars_of(args), "rows": rows, "summary": summary}, indent=1))
    return {"rows": rows, "summary": summary, "json": str(path)}


if __name__ == "__main__":
    from .errors import UserError

    try:
        print(json.dumps(worker(json.loads(sys.argv[1]))))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
