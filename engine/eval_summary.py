"""Summary quality: grounded, complete, no loops, in order (`python -m engine eval summary`).

Every document of the set is summarized in each mode (`sections`: chapter by chapter, then a summary
of the labelled section summaries; `cache`: the summary from the cache after reading, in three parts
with recall, `ReadingSession.summarize`). Rows keep the
raw summaries, so the metrics below are recomputed from them at every run:

- grounding: share of a summary's named entities (capitalised names, numbers) that occur in the
  source section it is attributed to, and in the document at all;
- coverage: share of each section's top 3 proper names (by count) its summary mentions, and of the
  document's top 10 in the final summary;
- repetition: sentences repeated (near-)verbatim, 4-gram repeat rate, loops, cut by the token limit;
- order: Spearman correlation of the final summary's first mentions of names with their first
  occurrence in the document; its reference, "section order", is the same correlation for the
  section summaries read one after another in the book's order (what a final summary that only
  kept their order would score): a name the book has from its first page and a section summary
  names late (a podcast's host, "Israel") lowers both;
- thirds: whether the final summary names one of the top 5 names of each third of the document;
- copied: share of a summary's words inside runs of `COPIED_WORDS`+ words copied from the document
  (a summary that copies its transcript line by line is not a summary, whatever its grounding).

Documents: KJV books other than Genesis (Genesis is the issue's own example) and a podcast
transcript written for this set (assets/eval/summary_podcast.srt). Resumable like every evaluation.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np

PODCAST = Path(__file__).resolve().parent.parent / "assets" / "eval" / "summary_podcast.srt"
DOCS = ("Ruth", "Jonah", "Esther", "Exodus 1-12", "podcast")
# a second set of stories, not in the default run, for more cases per cell (stop 36)
MORE_DOCS = ("Daniel 1-6", "Judges 13-16", "Joshua 1-6", "1 Samuel 17-20", "Acts 27-28")
TOP_SECTION, TOP_BOOK, TOP_THIRD = 3, 10, 5

# capitalised words that are not names: function words and what a summary says about itself
COMMON = frozenset("""a an and are as at be been but by did do does for from had has have he her him his how i in
into is it its me my not of on or our she so that the their them then there these they this those to was we were
what when where which who whom whose why will with would you your shall unto upon said also ye thee thou thy
however overall additionally finally meanwhile after before later eventually although despite during while since
because if once now here one two three four five first second third last next another other some many all each
both every no yes book chapter chapters section sections part parts story summary document text passage passages
narrative verse verses lines line overview furthermore moreover through throughout following according thus
therefore together instead subsequently ultimately initially lastly let behold yea nay o oh thus go come see
they're we're i'm it's that's let's today welcome hello thanks okay well yes""".split())
# letters of any script after the capital: an ASCII-only pattern skipped "Shallām" altogether
_CAP = re.compile(r"\b[A-Z][^\W\d_]+(?:'[^\W\d_]+)?\b")
_INSIDE = re.compile(r"(?<=[a-z,;] )[A-Z][^\W\d_]+(?:'[^\W\d_]+)?\b")  # after a lower-case word or a comma
# a number with its groups ("00:01:54", "3:16", "1,000") is one entity; the decoder checks it so too
NUMBER = re.compile(r"\b\d+(?:[.,:]\d+)*\b")
_WORDS = re.compile(r"[a-z0-9']+")


def _word(w: str) -> str:
    return w[:-2] if w.endswith(("'s", "’s")) else w


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}(?:'s)?\b", text, flags=re.IGNORECASE) is not None


# ------------------------------------------------------------------ metrics

@lru_cache(maxsize=2)
def _document_words(document_text: str) -> tuple[Counter, frozenset, Counter]:
    """The whole document's side of `proper_names`: lower-case words by count, words capitalised inside
    a sentence, capitalised words by count. Counted once per document: a summary asks for the names of
    every section and part, and a 1M-token book takes ~0.4 s to count."""
    return (Counter(re.findall(r"\b[a-z][a-z]+\b", document_text)),
            frozenset(_word(w) for w in _INSIDE.findall(document_text)),
            Counter(_word(w) for w in _CAP.findall(document_text)))


def proper_names(text: str, document_text: str | None = None) -> Counter:
    """Capitalised words that are names, by count. A word counts when it is not a common word and, in
    the whole document, it is rarely written in lower case and is capitalised inside a sentence at
    least once (so "Behold", "Wherefore" or "Hearest", capitalised only where a verse starts, drop out)."""
    lower, inside, doc_caps = _document_words(document_text if document_text is not None else text)
    caps = doc_caps if document_text is None else Counter(_word(w) for w in _CAP.findall(text))
    return Counter({w: n for w, n in caps.items() if w.lower() not in COMMON and len(w) > 1 and w in inside
                    and lower[w.lower()] <= 0.1 * doc_caps[w]})


def entities(summary: str) -> list[str]:
    """Named entities of a summary: capitalised words that are not common words, and numbers."""
    names = [_word(w) for w in _CAP.findall(summary)]
    return [w for w in names if w.lower() not in COMMON and len(w) > 1] + NUMBER.findall(summary)


DEMONYM = ("ites", "ite", "ians", "ian", "ish", "s")  # Israelites, Egyptian, Jewish: of Israel, Egypt, Jew


def grounded(entity: str, source: str) -> bool:
    """Whether the source has the entity, or the name it is formed from ("Israelites": "Israel";
    the KJV says "children of Israel" and never "Israelites")."""
    forms = [entity] + [entity[:-len(s)] for s in DEMONYM if entity.endswith(s) and len(entity) - len(s) >= 3]
    return any(_mentions(source, f) for f in forms)


def grounding(summary: str, source: str, title: str = "") -> tuple[int, int]:
    """(entities found in the source or the document's title, entities): whole words, case-insensitive."""
    ents = entities(summary)
    return sum(grounded(e, title + "\n" + source) for e in ents), len(ents)


def coverage(summary: str, names: list[str]) -> tuple[int, int]:
    return sum(_mentions(summary, n) for n in names), len(names)


def _sentences(text: str) -> list[list[str]]:
    return [_WORDS.findall(s.lower()) for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def repetition(summary: str) -> dict:
    """Near-verbatim repeated sentences (word Jaccard >= 0.8, 3+ words), the 4-gram repeat rate
    (share of 4-grams that occurred before in the summary), the most frequent 4-gram's count, and
    `loop`: a repeated sentence or a 4-gram three times."""
    seen, repeated = [], 0
    for s in _sentences(summary):
        if len(s) < 3:
            continue
        ws = set(s)
        if any(len(ws & p) / len(ws | p) >= 0.8 for p in seen):
            repeated += 1
        seen.append(ws)
    words = _WORDS.findall(summary.lower())
    grams = Counter(tuple(words[i:i + 4]) for i in range(len(words) - 3))
    total = max(len(words) - 3, 0)
    rate = (total - len(grams)) / total if total else 0.0
    top = max(grams.values(), default=0)
    return {"repeated_sentences": repeated, "ngram4_repeat_rate": rate, "max_ngram4": top,
            "loop": repeated > 0 or top >= 3}


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for v in np.unique(x):  # ties share their mean rank
        r[x == v] = r[x == v].mean()
    return r


def order_correlation(summary: str, document_text: str, names: list[str]) -> float | None:
    """Spearman correlation between where the summary first mentions each name and where the document
    first has it; None with fewer than 3 names mentioned."""
    pairs = []
    for n in names:
        s = re.search(rf"\b{re.escape(n)}(?:'s)?\b", summary, flags=re.IGNORECASE)
        d = re.search(rf"\b{re.escape(n)}\b", document_text, flags=re.IGNORECASE)
        if s and d:
            pairs.append((s.start(), d.start()))
    if len(pairs) < 3:
        return None
    a, b = (_ranks(np.asarray(v, dtype=np.float64)) for v in zip(*pairs))
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def third_names(document_text: str) -> list[list[str]]:
    """Per third of the document, its top 5 distinctive names: names that occur there at least twice
    and have at least 60% of their occurrences there (a book's hero, named all through, is no
    evidence that a summary reached its end), by count in the third; a third with none takes the
    names that occur there more than in any other third."""
    n = len(document_text)
    whole = proper_names(document_text)
    parts = [proper_names(document_text[k * n // 3:(k + 1) * n // 3], document_text) for k in range(3)]
    out = []
    for k, part in enumerate(parts):
        names = [w for w, c in part.most_common() if c >= 2 and c >= 0.6 * whole[w]]
        if not names:
            names = [w for w, c in part.most_common() if c >= 2 and all(c > p[w] for j, p in enumerate(parts) if j != k)]
        out.append(names[:TOP_THIRD])
    return out


def thirds(summary: str, document_text: str) -> list[bool | None]:
    """Per third of the document: does the summary name one of that third's distinctive names?
    (None: that third has none.)"""
    return [any(_mentions(summary, w) for w in names) if names else None for names in third_names(document_text)]


COPIED_WORDS = 8


@lru_cache(maxsize=2)
def _document_runs(document_text: str) -> frozenset:
    words = re.findall(r"[a-z0-9']+", document_text.lower())
    return frozenset(hash(tuple(words[i: i + COPIED_WORDS])) for i in range(len(words) - COPIED_WORDS + 1))


def copied(summary: str, document_text: str) -> tuple[int, int]:
    """(words inside runs of COPIED_WORDS+ words that the document has word for word, words)."""
    words = re.findall(r"[a-z0-9']+", summary.lower())
    runs, inside = _document_runs(document_text), [False] * len(words)
    for i in range(len(words) - COPIED_WORDS + 1):
        if hash(tuple(words[i: i + COPIED_WORDS])) in runs:
            inside[i: i + COPIED_WORDS] = [True] * COPIED_WORDS
    return sum(inside), len(words)


def score_row(row: dict, document_text: str, title: str = "") -> dict:
    """All metrics of one summarized document, from its stored texts."""
    book_names = proper_names(document_text)
    final = row["summary"]
    top10 = [w for w, _ in book_names.most_common(TOP_BOOK)]
    g_doc = grounding(final, document_text, title)
    out = {"final_grounded": g_doc, "final_coverage": coverage(final, top10),
           "order": order_correlation(final, document_text, list(book_names)),
           "thirds": thirds(final, document_text), "final_repetition": repetition(final),
           "section_order": order_correlation(" ".join(s["summary"] for s in row.get("sections", [])),
                                              document_text, list(book_names)),
           "final_cut": bool(row.get("cut")), "final_copied": copied(final, document_text), "sections": []}
    for s in row.get("sections", []):
        source = document_text[s["start_char"]:s["end_char"]]
        top = [w for w, _ in proper_names(source, document_text).most_common(TOP_SECTION)]
        out["sections"].append({"label": s["label"], "grounded_section": grounding(s["summary"], source, title),
                                "grounded_document": grounding(s["summary"], document_text, title),
                                "coverage": coverage(s["summary"], top), "repetition": repetition(s["summary"]),
                                "copied": copied(s["summary"], document_text),
                                "cut": bool(s.get("cut"))})
    return out


# ------------------------------------------------------------------ the document set

def load_doc(name: str):
    from . import documents
    from .eval_books import book_text

    if name == "podcast":
        return documents.load_document(PODCAST)
    m = re.fullmatch(r"(.+?) (\d+)-(\d+)", name)  # "Exodus 1-12", "1 Samuel 17-20": chapters of a book
    text, _ = book_text(m.group(1) if m else name)
    if m:
        first, last = int(m.group(2)), int(m.group(3))
        start = 0 if first == 1 else text.find(f"\nChapter {first}\n") + 1
        cut = text.find(f"\nChapter {last + 1}\n")
        if start == 0 and first != 1:
            raise ValueError(f"{name}: the book has no chapter {first}")
        text = text[start:] if cut < 0 else text[start:cut + 1]
    return documents.document_from_text(text, title=name)


# ------------------------------------------------------------------ running

def add_parser(sub) -> None:
    from .cache import CacheConfig  # the CLI has it loaded already (its own defaults come from it)
    from .session import AnswerSettings

    product = CacheConfig()
    p = sub.add_parser("summary", help="summary grounding, coverage, repetition and order on books")
    p.add_argument("--model", default=None, help="model spec (default: smollm2)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--docs", nargs="+", default=list(DOCS), help=f"documents of the set (default: {' '.join(DOCS)})")
    p.add_argument("--modes", nargs="+", choices=["sections", "cache"], default=["sections", "cache"])
    p.add_argument("--window", type=int, default=product.window,
                   help="non-sink slots per layer (default: the product's; rows before stop 22 used 2,048)")
    p.add_argument("--sinks", type=int, default=product.sinks)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=300, help="final summary length limit")
    p.add_argument("--prompt", choices=["chat", "plain"], default=None, help="prompt format (default: the model's)")
    p.add_argument("--variant", default="current",
                   help="name of the code version measured (rows of each variant are kept apart)")
    p.add_argument("--copy-tokens", type=int, default=AnswerSettings.summary_copy_tokens,
                   help="a summary may not copy this many tokens in a row from its passages (0: no limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/eval", help="folder for summary.jsonl/.json/.md")


def run_summary(args) -> dict:
    from . import models
    from .cache import CacheConfig
    from .evaluate import Results, _say, _settings
    from .session import AnswerSettings, ReadingSession
    from .summaries import summarize_sections

    loaded = models.load_model(args.model, dtype=args.dtype, say=_say, device=getattr(args, "device", None))
    prompt = args.prompt or loaded.prompt_format
    out = Path(args.out)
    results = Results(out / "summary.jsonl")
    args.cascades = "auto"
    settings = _settings(args, loaded, "summary", prompt=prompt, new_tokens=args.new_tokens, cascades="auto",
                         variant=args.variant)
    for name in args.docs:
        doc = load_doc(name)
        for mode in args.modes:
            case = {**settings, "doc": name, "mode": mode}
            if results.has(case):
                continue
            session = ReadingSession(loaded, CacheConfig(window=args.window, sinks=args.sinks, cascades="auto"),
                                     stride=args.stride, prompt=prompt,
                                     answering=AnswerSettings(summary_copy_tokens=args.copy_tokens))
            t0 = time.perf_counter()
            row: dict = {"sections": []}
            if mode == "sections":
                for ev in summarize_sections(session, doc, final_tokens=args.new_tokens):
                    if ev["type"] == "section":
                        row["sections"].append({k: ev.get(k) for k in ("label", "start_char", "end_char",
                                                                       "summary", "cut")})
            else:
                session.read(doc)
                "".join(session.summarize(max_new_tokens=args.new_tokens))
            answer = session.answers[-1]
            row.update(summary=answer.text, cut=answer.cut, seconds=time.perf_counter() - t0,
                       read_seconds=session.read_result.seconds, doc_tokens=session.read_result.doc_tokens,
                       cascades_used=session.config.cascades, final_seconds=answer.seconds)
            results.add(case, row)
            _say(f"{name} {mode}: {len(row['sections'])} sections, {row['seconds']:.0f} s: {answer.text[:100]!r}")
    rows = [r for r in results.rows if all(r["case"].get(k) == v for k, v in settings.items()
                                           if k != "variant")]
    return report(rows, out, loaded.model_id)


def _ratio(pairs) -> tuple[int, int]:
    pairs = list(pairs)
    return sum(a for a, _ in pairs), sum(b for _, b in pairs)


def _share(k: int, n: int) -> str:
    return f"{k / n:.2f}" if n else "-"


def _cell(k: int, n: int) -> str:
    from .evaluate import wilson

    if not n:
        return "-"
    lo, hi = wilson(k, n)
    return f"{k / n:.2f} ({lo:.2f}-{hi:.2f}, n={n})"


def report(rows: list[dict], out: Path, model_id: str) -> dict:
    """One line per (variant, model, mode, document) and per (variant, model, mode) over all documents."""
    texts: dict[str, str] = {}
    cells: dict[tuple, list[tuple[dict, dict]]] = {}
    for r in rows:
        c = r["case"]
        if c["doc"] not in texts:
            texts[c["doc"]] = load_doc(c["doc"]).text
        m = score_row(r, texts[c["doc"]], c["doc"])
        for doc in (c["doc"], "all"):
            cells.setdefault((c["variant"], c["model"], c["mode"], doc), []).append((r, m))
    table = []
    for (variant, model, mode, doc), items in sorted(cells.items(), key=lambda kv: (kv[0][:3], kv[0][3] == "all",
                                                                                   kv[0][3])):
        secs = [s for _, m in items for s in m["sections"]]
        orders = [m["order"] for _, m in items if m["order"] is not None]
        section_orders = [m["section_order"] for _, m in items if m["section_order"] is not None]
        finals = [m for _, m in items]
        e = {"variant": variant, "model": model, "mode": mode, "doc": doc, "documents": len(items),
             "sections": len(secs),
             "grounded_section": _ratio(s["grounded_section"] for s in secs),
             "grounded_document": _ratio(s["grounded_document"] for s in secs),
             "section_coverage": _ratio(s["coverage"] for s in secs),
             "final_grounded": _ratio(m["final_grounded"] for m in finals),
             "final_coverage": _ratio(m["final_coverage"] for m in finals),
             "loops": sum(s["repetition"]["loop"] for s in secs) + sum(m["final_repetition"]["loop"] for m in finals),
             "summaries": len(secs) + len(finals),
             "ngram4_repeat_rate": float(np.mean([s["repetition"]["ngram4_repeat_rate"] for s in secs] +
                                                 [m["final_repetition"]["ngram4_repeat_rate"] for m in finals])),
             "cut": sum(s["cut"] for s in secs) + sum(m["final_cut"] for m in finals),
             "copied": _ratio([s["copied"] for s in secs] + [m["final_copied"] for m in finals]),
             "final_copied": _ratio(m["final_copied"] for m in finals),
             "order": float(np.mean(orders)) if orders else None, "order_n": len(orders),
             "section_order": float(np.mean(section_orders)) if section_orders else None,
             "section_order_n": len(section_orders),
             "thirds": [(sum(bool(m["thirds"][k]) for m in finals), sum(m["thirds"][k] is not None for m in finals))
                        for k in range(3)],
             "seconds": sum(r["seconds"] for r, _ in items), "read_seconds": sum(r["read_seconds"] for r, _ in items),
             "doc_tokens": sum(r["doc_tokens"] for r, _ in items)}
        table.append(e)
    summary = {"model": model_id, "table": table}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = ["Summaries: grounding and coverage as share (95% Wilson interval, n = entities or names); "
             "order = mean Spearman over final summaries with >= 3 names (n); section order = the same for the "
             "section summaries read in the book's order (reference); thirds = final summaries naming a "
             "top-5 name of the first / middle / last third; copied = share of words in runs of "
             f"{COPIED_WORDS}+ words copied from the document (every summary; final only); "
             "seconds = whole job (read + summaries)", "",
             "| variant | model | mode | doc | sections | grounded in section | grounded in document | section top-3 "
             "coverage | final: grounded | final: top-10 coverage | order (n) | section order (n) | thirds | "
             "loops / summaries | 4-gram repeat | cut | copied (all; final) | tokens | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        order, section_order = (f"{e[k]:.2f} ({e[k + '_n']})" if e[k] is not None else "-"
                                for k in ("order", "section_order"))
        lines.append(f"| {e['variant']} | {e['model'].split('/')[-1]} | {e['mode']} | {e['doc']} | {e['sections']} | "
                     f"{_cell(*e['grounded_section'])} | {_cell(*e['grounded_document'])} | "
                     f"{_cell(*e['section_coverage'])} | {_cell(*e['final_grounded'])} | {_cell(*e['final_coverage'])} "
                     f"| {order} | {section_order} | {' '.join(f'{k}/{n}' for k, n in e['thirds'])} | {e['loops']} / "
                     f"{e['summaries']} | {e['ngram4_repeat_rate']:.3f} | {e['cut']} | "
                     f"{_share(*e['copied'])}; {_share(*e['final_copied'])} | {e['doc_tokens']} | "
                     f"{e['seconds']:.0f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return summary
