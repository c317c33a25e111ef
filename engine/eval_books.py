"""Book QA: natural questions over whole KJV books, asked through `ReadingSession.ask`.

`python -m engine eval qa --set books` reads each book of assets/eval/books_qa.json once per
policy (a snapshot in <out>/snapshots makes reruns skip the read), then asks every question with
recall on and off. Two references come with every table:
- none: the same model asked the question with no document at all (what it knows already);
- oracle: full attention over only the passages that hold the answer (the ceiling of any recall
  with this reader).
A question is right when an accepted answer occurs in the answer as whole words; recall hits when
a recalled passage overlaps a verse that holds the answer. Resumable like every evaluation here.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np

from .bench import ReadTrace
from .errors import UserError
from .evaluate import Results, _check_args, _plt, _say, _settings, qa_defaults, resolve_stride, sign_test, wilson

QUESTIONS = Path(__file__).resolve().parent.parent / "assets" / "eval" / "books_qa.json"


def load_set(path: Path = QUESTIONS) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: the book question set is missing") from None


def book_text(book: str, bible: bool = False) -> tuple[str, dict]:
    """A book as a reader sees it ("Chapter 3" headings, numbered verses), or the whole KJV with
    "# Exodus 3" headings; and the char span of every verse, keyed (book, chapter, verse)."""
    from .corpus import kjv_verses

    parts, spans, at, last = [], {}, 0, None

    def put(s: str):
        nonlocal at
        parts.append(s)
        at += len(s)

    for v in kjv_verses():
        if not bible and v.book != book:
            continue
        if v.book == "Genesis" and bible:
            continue  # Genesis is kept for an independent check
        if (v.book, v.chapter) != last:
            put(("\n" if at else "") + (f"# {v.book} {v.chapter}\n" if bible else f"Chapter {v.chapter}\n"))
            last = (v.book, v.chapter)
        line = f"{v.verse} {v.text}\n"
        spans[(v.book, v.chapter, v.verse)] = (at, at + len(line))
        put(line)
    if not parts:
        raise UserError(f"no KJV book named {book!r}")
    return "".join(parts), spans


def correct(answer: str, aliases: list[str]) -> bool:
    low = answer.lower()
    return any(re.search(rf"\b{re.escape(a.lower())}\b", low) for a in aliases)


def gold_spans(item: dict, spans: dict) -> list[tuple[int, int]]:
    return [spans[(item["book"], c, v)] for c, v in item["refs"] if (item["book"], c, v) in spans]


def hits(ranges, gold: list[tuple[int, int]]) -> bool:
    """Whether any (char_start, char_end) span of the recalled text overlaps a verse holding the answer."""
    return any(s0 < b and a < s1 for s0, s1 in ranges for a, b in gold)


def char_ranges(passages) -> list[tuple[int, int]]:
    return [(p.char_start, p.char_end) for p in passages]


def no_document_answer(session, question: str, max_new_tokens: int) -> str:
    """What the model says to the question alone, in the session's prompt format."""
    from .session import Answer

    ids = session._ids(session.format.bare_text(question))
    answer = Answer(question)
    cache = session.engine.new_cache()
    "".join(session._generate(cache, ids, answer, max_new_tokens, 0.0, 1.0, None, 0, 0))
    return answer.text


def run_books(args) -> dict:
    from . import documents, models
    from .cache import CacheConfig
    from .memory import freeze
    from .session import AnswerSettings, ReadingSession

    from . import recall as rc

    qa_defaults(args)
    _check_args(args)  # sizes and strides, in one line, before the model loads
    # built (and so checked) before the model loads
    if args.recall_best is None:
        args.recall_best = AnswerSettings.recall_best
    if args.repetition_penalty is None:
        args.repetition_penalty = AnswerSettings.repetition_penalty
    if args.recall_share is None:
        args.recall_share = AnswerSettings.recall_share
    if args.recall_order is None:
        args.recall_order = AnswerSettings.recall_order
    answering = AnswerSettings(recall_tokens=args.recall_tokens, recall_narrow=args.recall_narrow,
                               recall_best=args.recall_best, names=args.names, recall_share=args.recall_share,
                               recall_order=args.recall_order, repetition_penalty=args.repetition_penalty)
    penalty_from = answering.repetition_penalty_from if answering.repetition_penalty > 1.0 else 0
    data = load_set()
    loaded = models.load_model(args.model, dtype=args.dtype, say=_say, device=getattr(args, "device", None))
    resolve_stride(args, loaded)
    prompt = args.prompt or loaded.prompt_format
    out = Path(args.out)
    results = Results(out / "books.jsonl")
    settings = _settings(args, loaded, "books", prompt=prompt, new_tokens=args.new_tokens,
                         cascades=args.cascades, recall_tokens=args.recall_tokens, recall_narrow=args.recall_narrow,
                         attention_weight=rc.FUSION["attention"],
                         **({"recall_best": args.recall_best} if args.recall_best else {}),  # old rows: whole
                         **({"names": "source"} if args.names == "source" else {}),  # old rows: free names
                         # old rows: 1.1, the engine's default when they were run
                         **({"repetition_penalty": args.repetition_penalty} if args.repetition_penalty != 1.1 else {}),
                         **({"recall_share": args.recall_share} if args.recall_share else {}),  # old rows: 0
                         # old rows: document order
                         **({"recall_order": args.recall_order} if args.recall_order != "document" else {}),
                         # old rows: the penalty from the first token (answers <= 48 tokens never meet a later one)
                         **({"repetition_penalty_from": penalty_from} if penalty_from else {}))
    if args.bible:
        groups = {"Bible": [dict(q, doc="Bible") for q in data["bible"]]}
    else:
        names = args.books or list(data["books"])
        groups = {}
        for name in names:
            book = data["books"].get(name, {}).get("book", name)
            qs = [dict(q, doc=book) for q in data["questions"] if q["book"] == book]
            if not qs:
                raise UserError(f"no questions for book {name!r} in {QUESTIONS}")
            groups[book] = qs[: args.limit] if args.limit else qs
    for doc_name, items in groups.items():
        text, spans = book_text(doc_name, bible=doc_name == "Bible")
        doc = documents.document_from_text(text, title=doc_name)
        for policy in args.policies:
            if policy == "full":
                continue  # whole books exceed the models' positions; the oracle row is full attention
            config = CacheConfig(policy=policy, sinks=args.sinks, window=args.window, cascades=args.cascades)
            todo = [(it, r) for it in items for r in args.recall
                    if not results.has({**settings, "doc": doc_name, "id": it["id"], "policy": policy, "recall": r})]
            if not todo:
                continue
            session = ReadingSession(loaded, config, stride=args.stride, prompt=prompt,
                                     answering=answering)
            snap = out / "snapshots" / f"{doc_name.replace(' ', '_')}-{policy}-w{args.window}-c{args.cascades}-s{args.stride}"
            try:
                session.load(snap)
                _say(f"{doc_name} {policy}: loaded {snap}")
            except UserError:
                t0 = time.perf_counter()
                trace = ReadTrace()
                read = session.read(doc, progress=trace)
                seconds = time.perf_counter() - t0  # reading + cutting and indexing the passages
                trace.write(out / "reads.jsonl", doc=doc_name, policy=policy, cascades=session.config.cascades,
                            seconds_with_index=seconds, passages=len(session.index.passages),
                            index_mb=session.index.nbytes_on_disk() / 2 ** 20)
                _say(f"{doc_name} {policy}: read {read.doc_tokens} tokens in {seconds:.0f} s "
                     f"({read.tokens_per_second:.0f} tok/s), cascades {session.config.cascades}, "
                     f"{len(session.index.passages)} passages, index {session.index.nbytes_on_disk() / 2**20:.2f} MB")
                session.save(snap)
            for it, r in todo:
                case = {**settings, "doc": doc_name, "id": it["id"], "policy": policy, "recall": r}
                gold = gold_spans(it, spans)
                row = {"question": it["question"], "answers": it["answers"],
                       "doc_tokens": session.read_result.doc_tokens, "cascades_used": session.config.cascades,
                       "index_mb": session.index.nbytes_on_disk() / 2 ** 20}
                if r == "on":  # how each signal alone would have done, for the ablation table
                    cache = freeze(session.doc_cache, session.answering.question_tokens + 96)
                    for name in ("bm25", "attention"):
                        picked = session.locate(it["question"], cache, signals=name)
                        row[f"hit_{name}"] = hits(char_ranges(x.passage for x in picked), gold)
                t0 = time.perf_counter()
                "".join(session.ask(it["question"], max_new_tokens=args.new_tokens, recall_on=r == "on"))
                a = session.answers[-1]
                recalled = a.recalled
                row.update(answer=a.text, correct=correct(a.text, it["answers"]), seconds=time.perf_counter() - t0,
                           first_token_seconds=a.first_token_seconds, answer_tokens=a.tokens, cut=a.cut,
                           recalled=[d["label"] for d in recalled],
                           citations=[c.label for c in a.citations])
                if r == "on":
                    row["hit"] = hits([(d["char_start"], d["char_end"]) for d in recalled], gold)
                    row["cited_gold"] = hits(char_ranges(session.index.passages[c.passage] for c in a.citations
                                                          if c.passage is not None), gold)
                results.add(case, row)
                _say(f"{doc_name} {policy} recall {r} {it['id']}: {a.text[:70]!r} "
                     f"{'ok' if row['correct'] else 'miss'}" + (f" hit {row['hit']}" if r == "on" else ""))
        run_references(args, loaded, prompt, settings, results, doc_name, doc, items, spans)
    # each row's own recall setting (on / off) is in the table
    rows = [r for r in results.matching(settings, ignore=frozenset({"recall"})) if r["case"]["policy"] not in REFERENCES]
    rows += [r for r in results.matching(reference_settings(settings), ignore=frozenset({"recall"}))
             if r["case"]["policy"] in REFERENCES]
    return summarize_books(rows, out, loaded.model_id, settings)


REFERENCES = {"none", "oracle"}


def reference_settings(settings: dict) -> dict:
    """A reference row's case: the run's settings less those that only change what is recalled."""
    return {k: v for k, v in settings.items() if k not in ("recall_share", "recall_order")}


def run_references(args, loaded, prompt, settings, results, doc_name, doc, items, spans) -> None:
    """The 'none' (no document) and 'oracle' (only the answer's passages, full attention) rows."""
    from . import documents, recall
    from .cache import CacheConfig
    from .session import AnswerSettings, ReadingSession

    settings = reference_settings(settings)
    todo = [(it, ref) for it in items for ref in args.references
            if not results.has({**settings, "doc": doc_name, "id": it["id"], "policy": ref, "recall": "off"})]
    if not todo:
        return
    session = ReadingSession(loaded, CacheConfig(policy="full"), stride=args.stride, prompt=prompt,
                             answering=AnswerSettings(recall=False, names=getattr(args, "names", "source"),
                                                      repetition_penalty=args.repetition_penalty,
                                                      repetition_penalty_from=settings.get("repetition_penalty_from", 0)))
    offsets = _doc_offsets(doc, loaded.tokenizer)
    passages = recall.cut_passages(doc, offsets)
    for it, ref in todo:
        case = {**settings, "doc": doc_name, "id": it["id"], "policy": ref, "recall": "off"}
        if ref == "none":
            text = no_document_answer(session, it["question"], args.new_tokens)
        else:  # the passages holding the gold verses, framed as recall frames them
            gold = gold_spans(it, spans)
            held = [p for p in passages if hits(char_ranges([p]), gold)]
            body = "\n\n".join(f"[{p.label}]\n{doc.text[p.char_start:p.char_end]}" for p in held)
            session.read(documents.document_from_text(body, title=f"{doc_name} oracle"))
            "".join(session.ask(it["question"], max_new_tokens=args.new_tokens, n_citations=0))
            text = session.answers[-1].text
        results.add(case, {"question": it["question"], "answers": it["answers"], "answer": text,
                           "correct": correct(text, it["answers"])})
        _say(f"{doc_name} {ref} {it['id']}: {text[:70]!r} {'ok' if correct(text, it['answers']) else 'miss'}")


def _doc_offsets(doc, tokenizer) -> np.ndarray:
    from . import documents

    sm = documents.SourceMap(doc)
    for _ in documents.tokenize_stream(doc, tokenizer, source_map=sm):
        pass
    return sm.offsets


def paired_rows(cells: dict[tuple, list[dict]]) -> list[dict]:
    """Per document (and "all"), the cascade's recall-on answers against each other row on the same
    questions: how many each alone got right, and the sign test of that split. cells: the report's
    rows by (document, policy, recall)."""
    out = []
    for (doc, policy, rec), rs in sorted(cells.items(), key=lambda kv: (kv[0][0] == "all", kv[0])):
        base = cells.get((doc, "cascade", "on"))
        if base is None or (policy, rec) == ("cascade", "on"):
            continue
        right = {(r["case"]["doc"], r["case"]["id"]): bool(r["correct"]) for r in base}
        mine = {(r["case"]["doc"], r["case"]["id"]): bool(r["correct"]) for r in rs}
        both = sorted(set(right) & set(mine))
        won = sum(right[q] and not mine[q] for q in both)
        lost = sum(mine[q] and not right[q] for q in both)
        out.append({"doc": doc, "against": policy if policy in REFERENCES else f"{policy}, recall {rec}",
                    "n": len(both), "won": won, "lost": lost, "p": sign_test(won, lost)})
    return out


def summarize_books(rows: list[dict], out: Path, model_id: str, settings: dict) -> dict:
    """Accuracy (95% Wilson interval) and recall hit rate per document, policy and recall setting."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        c = r["case"]
        for doc in (c["doc"], "all"):
            cells.setdefault((doc, c["policy"], c["recall"]), []).append(r)
    order = {"none": 0, "oracle": 1, "sink": 2, "cascade": 3}
    table = []
    for (doc, policy, rec), rs in sorted(cells.items(), key=lambda kv: (kv[0][0] == "all", kv[0][0],
                                                                         order.get(kv[0][1], 9), kv[0][2])):
        k, n = sum(r["correct"] for r in rs), len(rs)
        lo, hi = wilson(k, n)
        entry = {"doc": doc, "policy": policy, "recall": rec, "n": n, "accuracy": k / n, "ci95": [lo, hi]}
        for field in ("hit", "hit_bm25", "hit_attention", "cited_gold"):
            vals = [r[field] for r in rs if r.get(field) is not None]
            if vals:
                entry[field] = sum(vals) / len(vals)
        secs = [r["first_token_seconds"] for r in rs if r.get("first_token_seconds") is not None]
        if secs:
            entry["first_token_seconds"] = float(np.median(secs))
        entry["cut"] = sum(bool(r.get("cut")) for r in rs)
        table.append(entry)
    summary = {"model": model_id, "settings": settings, "table": table, "paired": paired_rows(cells)}
    (out / "books.json").write_text(json.dumps(summary, indent=1))
    lines = [f"Book QA, {model_id}; window {settings['window']}, cascades {settings['cascades']}, stride "
             f"{settings['stride']}, recall budget {settings['recall_tokens']}, answers <= {settings['new_tokens']} "
             "tokens, greedy", "",
             "| document | policy | recall | n | accuracy (95% CI) | recall hit | BM25-only hit | attention-only hit "
             "| cited the answer's verse | median s to first token | cut by limit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def pct(e, f):
        return f"{e[f]:.2f}" if f in e else "-"

    for e in table:
        lines.append(f"| {e['doc']} | {e['policy']} | {e['recall']} | {e['n']} | {e['accuracy']:.2f} "
                     f"({e['ci95'][0]:.2f}-{e['ci95'][1]:.2f}) | {pct(e, 'hit')} | {pct(e, 'hit_bm25')} | "
                     f"{pct(e, 'hit_attention')} | {pct(e, 'cited_gold')} | "
                     f"{e.get('first_token_seconds', float('nan')):.2f} | {e['cut']} |")
    if summary["paired"]:
        lines += ["", "Paired on the same questions (a row's accuracy alone cannot tell a real gain from the noise "
                  "of a few dozen questions):", "",
                  "| document | recall on vs | n | recall on alone right | the other alone right | sign test p |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['doc']} | {p['against']} | {p['n']} | {p['won']} | {p['lost']} | {p['p']:.2g} |"
                  for p in summary["paired"]]
    (out / "books.md").write_text("\n".join(lines) + "\n")
    plt = _plt()
    alls = [e for e in table if e["doc"] == "all"]
    if alls:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = [f"{e['policy']}\nrecall {e['recall']}" if e["policy"] in ("cascade", "sink") else e["policy"]
                 for e in alls]
        acc = [e["accuracy"] for e in alls]
        err = [[a - e["ci95"][0] for a, e in zip(acc, alls)], [e["ci95"][1] - a for a, e in zip(acc, alls)]]
        ax.bar(names, acc, yerr=err, color=["#999" if e["policy"] in ("none", "oracle") else "#3a6" for e in alls])
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (95% CI)")
        ax.set_title(f"Book QA ({model_id}, n={alls[0]['n']} per bar)")
        fig.tight_layout()
        fig.savefig(out / "books.png", dpi=110)
        plt.close(fig)
    return summary
