"""Evaluations: passkey retrieval, streaming perplexity, long-document QA (python -m engine eval ...).

Every case is appended to a JSONL file as soon as it finishes, keyed by its settings, so a long
grid can be stopped and resumed. Summaries are written as JSON, a PNG and a Markdown table.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .cache import CacheConfig
from .errors import UserError

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
DEPTH_BANDS = [(0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0)]


# ------------------------------------------------------------------ shared

def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="task", required=True)
    for name, helptext in (("passkey", "passkey retrieval by length x depth"),
                           ("ppl", "streaming perplexity on the KJV"),
                           ("qa", "questions about facts at known depths of the KJV")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", default=None)
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
        p.add_argument("--policies", nargs="+", default=["cascade", "sink", "full"])
        p.add_argument("--window", type=int, default=256)
        p.add_argument("--sinks", type=int, default=64)
        p.add_argument("--cascades", type=int, default=4)
        p.add_argument("--stride", type=int, default=256)
        p.add_argument("--prompt", choices=["chat", "plain"], default=None)
        p.add_argument("--out", default="results/eval")
        p.add_argument("--seed", type=int, default=0)
        if name == "passkey":
            p.add_argument("--lengths-x", type=float, nargs="+", default=[1, 2, 4, 8, 16],
                           help="prompt lengths as multiples of the cache size (sinks + window)")
            p.add_argument("--samples", type=int, default=1, help="samples per (length, depth band)")
        elif name == "ppl":
            p.add_argument("--tokens", type=int, default=16384)
            p.add_argument("--buckets", type=int, default=8)
        else:
            p.add_argument("--lengths-x", type=float, nargs="+", default=[4, 16])
            p.add_argument("--samples", type=int, default=1)


def _key(case: dict) -> str:
    return json.dumps(case, sort_keys=True)


class Results:
    """Append-only JSONL of finished cases, for resumable grids."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = []
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    self.rows.append(json.loads(line))
        self.done = {_key(r["case"]) for r in self.rows}

    def has(self, case: dict) -> bool:
        return _key(case) in self.done

    def add(self, case: dict, result: dict) -> None:
        row = {"case": case, **result}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        self.done.add(_key(case))


def _config(args, policy: str) -> CacheConfig:
    return CacheConfig(policy=policy, sinks=args.sinks, window=args.window, cascades=args.cascades)


def _base_case(args, loaded, policy: str, prompt: str) -> dict:
    return {"model": loaded.model_id, "policy": policy, "window": args.window, "sinks": args.sinks,
            "cascades": args.cascades if policy == "cascade" else 1, "stride": args.stride, "prompt": prompt}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ passkey

def passkey_prompt(tokenizer, n_tokens: int, depth: float, key: str) -> tuple[list[int], int]:
    """Filler haystack of about n_tokens with the needle at `depth`; returns ids and the needle index."""
    filler_ids = tokenizer(FILLER, add_special_tokens=False).input_ids
    needle = tokenizer(f"The pass key is {key}. Remember it. {key} is the pass key. ",
                       add_special_tokens=False).input_ids
    body = n_tokens - len(needle)
    hay = (filler_ids * (body // len(filler_ids) + 1))[:max(body, 0)]
    at = int(round(depth * len(hay) / len(filler_ids))) * len(filler_ids)  # at a sentence boundary
    at = min(at, len(hay))
    return hay[:at] + needle + hay[at:], at


def digits_score(answer: str, key: str) -> tuple[bool, float]:
    """Exact match of the first 5-digit group, and the share of digits right position by position."""
    m = re.search(r"\d{5}", answer) or re.search(r"\d+", answer)
    got = m.group(0) if m else ""
    per_digit = sum(a == b for a, b in zip(got[:len(key)].ljust(len(key)), key)) / len(key)
    return got == key, per_digit


def run_passkey(args) -> dict:
    from .models import load_model
    from .prompts import prompt_format
    from .runtime import Engine

    loaded = load_model(args.model, dtype=args.dtype, say=_say)
    tok = loaded.tokenizer
    prompt = args.prompt or "plain"
    fmt = prompt_format(tok, prompt, loaded.bos)
    prefix = tok(fmt.prefix, add_special_tokens=False).input_ids
    question = tok(fmt.question_text("What is the pass key?") + (" The pass key is" if prompt == "plain" else ""),
                   add_special_tokens=False).input_ids
    budget = args.sinks + args.window
    results = Results(Path(args.out) / "passkey.jsonl")
    rng = random.Random(args.seed)
    grid = []
    for x in args.lengths_x:
        for band, (lo, hi) in enumerate(DEPTH_BANDS):
            for s in range(args.samples):
                grid.append((x, band, rng.uniform(lo, hi), f"{rng.randrange(10000, 100000)}", s))
    for policy in args.policies:
        engine = Engine(loaded, _config(args, policy), stride=args.stride)
        for x, band, depth, key, s in grid:
            length = int(budget * x)
            case = {**_base_case(args, loaded, policy, prompt), "task": "passkey", "length": length,
                    "band": band, "sample": s, "seed": args.seed}
            if results.has(case):
                continue
            total = len(prefix) + length + len(question)
            if policy == "full" and loaded.max_positions and total > loaded.max_positions:
                continue  # beyond the model's positions full attention is not a meaningful reference
            hay, _ = passkey_prompt(tok, length, depth, key)
            cache = engine.new_cache()
            t0 = time.perf_counter()
            engine.read([prefix + hay], cache)
            out = list(engine.generate(cache, question, max_new_tokens=8))
            answer = tok.decode(out, skip_special_tokens=True)
            exact, per_digit = digits_score(answer, key)
            results.add(case, {"key": key, "depth": depth, "answer": answer, "exact": exact,
                               "per_digit": per_digit, "seconds": time.perf_counter() - t0})
            _say(f"passkey {policy} len {length} band {band}: {answer!r} ({'ok' if exact else 'miss'})")
    return summarize_passkey(results.rows, Path(args.out), loaded.model_id)


def summarize_passkey(rows: list[dict], out: Path, model_id: str) -> dict:
    rows = [r for r in rows if r["case"]["model"] == model_id]
    policies = sorted({r["case"]["policy"] for r in rows})
    lengths = sorted({r["case"]["length"] for r in rows})
    table = {}
    for p in policies:
        for n in lengths:
            for band in range(len(DEPTH_BANDS)):
                sel = [r for r in rows if r["case"]["policy"] == p and r["case"]["length"] == n
                       and r["case"]["band"] == band]
                if sel:
                    table[(p, n, band)] = (np.mean([r["exact"] for r in sel]), np.mean([r["per_digit"] for r in sel]),
                                           len(sel))
    summary = {"model": model_id, "cells": [{"policy": p, "length": n, "band": b, "exact": e, "per_digit": d, "n": c}
                                            for (p, n, b), (e, d, c) in table.items()]}
    (out / "passkey.json").write_text(json.dumps(summary, indent=1))
    md = [f"Passkey retrieval, {model_id} (exact match, mean over depth bands; per-digit accuracy in brackets)", "",
          "| policy | " + " | ".join(f"{n:,} tok" for n in lengths) + " |",
          "|---|" + "---|" * len(lengths)]
    for p in policies:
        cells = []
        for n in lengths:
            sel = [v for (pp, nn, _), v in table.items() if pp == p and nn == n]
            cells.append(f"{np.mean([v[0] for v in sel]):.2f} ({np.mean([v[1] for v in sel]):.2f})" if sel else "-")
        md.append(f"| {p} | " + " | ".join(cells) + " |")
    (out / "passkey.md").write_text("\n".join(md) + "\n")
    _heatmaps(table, policies, lengths, out / "passkey.png", model_id)
    return summary


def _heatmaps(table, policies, lengths, path, model_id):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(policies)), figsize=(4 * max(1, len(policies)), 3.4), squeeze=False)
    for ax, p in zip(axes[0], policies):
        grid = np.full((len(DEPTH_BANDS), len(lengths)), np.nan)
        for j, n in enumerate(lengths):
            for b in range(len(DEPTH_BANDS)):
                if (p, n, b) in table:
                    grid[b, j] = table[(p, n, b)][0]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [f"{n // 1000}k" if n >= 1000 else str(n) for n in lengths])
        ax.set_yticks(range(len(DEPTH_BANDS)), [f"{int(lo * 100)}-{int(hi * 100)}%" for lo, hi in DEPTH_BANDS])
        ax.set_title(p)
        ax.set_xlabel("prompt tokens")
    axes[0][0].set_ylabel("needle depth")
    fig.suptitle(f"passkey exact match, {model_id}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ perplexity

def run_ppl(args) -> dict:
    from .corpus import kjv_text
    from .models import load_model
    from .runtime import Engine

    loaded = load_model(args.model, dtype=args.dtype, say=_say)
    tok = loaded.tokenizer
    ids = tok(loaded.bos + kjv_text(max_chars=args.tokens * 6), add_special_tokens=False).input_ids[:args.tokens + 1]
    if len(ids) < args.tokens + 1:
        raise UserError(f"the KJV text gave only {len(ids)} tokens")
    results = Results(Path(args.out) / "ppl.jsonl")
    for policy in args.policies:
        n = args.tokens
        if policy == "full" and loaded.max_positions:
            n = min(n, loaded.max_positions)  # full attention only over the model's native window
        case = {**_base_case(args, loaded, policy, "none"), "task": "ppl", "tokens": n, "buckets": args.buckets}
        if results.has(case):
            continue
        engine = Engine(loaded, _config(args, policy), stride=args.stride)
        cache = engine.new_cache()
        nll = np.zeros(n, dtype=np.float64)  # nll[t]: predicting token t + 1
        t0 = time.perf_counter()
        for i in range(0, n, args.stride):
            chunk = ids[i:min(i + args.stride, n)]
            logits = engine.forward(torch.tensor([chunk]), cache, logits="all")[0]  # [L, vocab]
            target = torch.tensor(ids[i + 1:i + 1 + len(chunk)])
            nll[i:i + len(chunk)] = torch.nn.functional.cross_entropy(logits[:len(target)], target,
                                                                      reduction="none").double().numpy()
        edges = np.linspace(0, n, args.buckets + 1).astype(int)
        curve = [float(nll[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]
        results.add(case, {"nll": float(nll.mean()), "ppl": math.exp(nll.mean()), "curve": curve,
                           "edges": edges.tolist(), "seconds": time.perf_counter() - t0})
        _say(f"ppl {policy}: nll {nll.mean():.3f} ppl {math.exp(nll.mean()):.2f}")
    rows = [r for r in results.rows if r["case"]["model"] == loaded.model_id]
    out = Path(args.out)
    md = [f"Streaming perplexity on the KJV, {loaded.model_id}", "", "| policy | slots | tokens | NLL | ppl |",
          "|---|---|---|---|---|"]
    for r in rows:
        c = r["case"]
        slots = "all" if c["policy"] == "full" else c["sinks"] + c["window"]
        md.append(f"| {c['policy']} | {slots} | {c['tokens']:,} | {r['nll']:.3f} | {r['ppl']:.2f} |")
    (out / "ppl.md").write_text("\n".join(md) + "\n")
    (out / "ppl.json").write_text(json.dumps(rows, indent=1))
    _curves(rows, out / "ppl.png", loaded.model_id)
    return {"rows": rows}


def _curves(rows, path, model_id):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        e = r["edges"]
        ax.plot([(a + b) / 2 for a, b in zip(e[:-1], e[1:])], r["curve"], marker="o",
                label=f"{r['case']['policy']} ({r['ppl']:.1f})")
    ax.set_xlabel("position in stream (tokens)")
    ax.set_ylabel("mean NLL")
    ax.set_title(f"streaming NLL on the KJV, {model_id}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ long-document QA

def qa_items(verses, start: int, n_verses: int, depths: list[float], rng: random.Random):
    """Facts made from the text itself: a 'special word' for a verse, taken from that verse."""
    items = []
    for d in depths:
        v = verses[start + min(n_verses - 1, int(d * n_verses))]
        words = [w.strip(".,;:!?'\"()").lower() for w in v.text.split()]
        words = [w for w in words if w.isalpha() and len(w) >= 5] or ["light"]
        items.append({"depth": d, "ref": f"{v.book} {v.chapter}:{v.verse}", "word": rng.choice(words)})
    return items


def run_qa(args) -> dict:
    from . import documents
    from .corpus import kjv_verses
    from .models import load_model
    from .session import ReadingSession

    loaded = load_model(args.model, dtype=args.dtype, say=_say)
    prompt = args.prompt or loaded.prompt_format
    results = Results(Path(args.out) / "qa.jsonl")
    verses = kjv_verses()
    rng = random.Random(args.seed)
    budget = args.sinks + args.window
    for x in args.lengths_x:
        for s in range(args.samples):
            n_chars = int(budget * x * 4.2)  # ~4.2 characters per token for this text
            start = rng.randrange(0, len(verses) - 2000)
            lines, size = [], 0
            for v in verses[start:]:
                if size > n_chars:
                    break
                lines.append(v.text)
                size += len(v.text) + 1
            items = qa_items(verses, start, len(lines), [0.1, 0.5, 0.9], rng)
            for it in items:  # insert each fact right after its verse
                k = min(len(lines) - 1, int(it["depth"] * len(lines)))
                lines[k] += f"\nRemember: the special word for {it['ref']} is \"{it['word']}\"."
            doc = documents.document_from_text("\n".join(lines), title=f"KJV excerpt {start}")
            for policy in args.policies:
                case = {**_base_case(args, loaded, policy, prompt), "task": "qa", "x": x, "sample": s,
                        "seed": args.seed}
                if results.has(case):
                    continue
                session = ReadingSession(loaded, _config(args, policy), stride=args.stride, prompt=prompt)
                total = documents.count_tokens(doc, loaded.tokenizer)
                if policy == "full" and loaded.max_positions and total > loaded.max_positions - 64:
                    continue
                session.read(doc)
                answers = []
                for it in items:
                    text = "".join(session.ask(f"What is the special word for {it['ref']}?", max_new_tokens=16))
                    answers.append({**it, "answer": text, "correct": it["word"] in text.lower()})
                results.add(case, {"tokens": session.read_result.doc_tokens, "answers": answers,
                                   "accuracy": float(np.mean([a["correct"] for a in answers]))})
                _say(f"qa {policy} x{x}: {[a['correct'] for a in answers]}")
    rows = [r for r in results.rows if r["case"]["model"] == loaded.model_id]
    out = Path(args.out)
    xs = sorted({r["case"]["x"] for r in rows})
    policies = sorted({r["case"]["policy"] for r in rows})
    md = [f"Long-document QA on the KJV, {loaded.model_id} (accuracy over facts at depths 10/50/90%)", "",
          "| policy | " + " | ".join(f"{x:g}x cache" for x in xs) + " |", "|---|" + "---|" * len(xs)]
    for p in policies:
        cells = []
        for x in xs:
            sel = [r["accuracy"] for r in rows if r["case"]["policy"] == p and r["case"]["x"] == x]
            cells.append(f"{np.mean(sel):.2f}" if sel else "-")
        md.append(f"| {p} | " + " | ".join(cells) + " |")
    (out / "qa.md").write_text("\n".join(md) + "\n")
    (out / "qa.json").write_text(json.dumps(rows, indent=1))
    _bars({p: [float(np.mean([r["accuracy"] for r in rows if r["case"]["policy"] == p and r["case"]["x"] == x] or [0]))
               for x in xs] for p in policies}, [f"{x:g}x" for x in xs], out / "qa.png",
          f"long-document QA accuracy, {loaded.model_id}")
    return {"rows": rows}


def _bars(series: dict[str, list[float]], labels: list[str], path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(labels))], values, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_xlabel("document length (multiples of the cache size)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> int:
    run = {"passkey": run_passkey, "ppl": run_ppl, "qa": run_qa}[args.task]
    result = run(args)
    out = Path(args.out)
    for name in ("passkey.md", "ppl.md", "qa.md"):
        if (out / name).exists() and name.startswith(args.task):
            print((out / name).read_text())
    return 0 if result is not None else 1
