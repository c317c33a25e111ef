"""Recall: find the passages of the book that a question needs, so they can be re-read.

The cascade is a lossy working memory; the book on disk is the long-term one. After reading, the
document is cut into **passages** (about 100-300 tokens, never across a page or chapter, grouping
short subtitle cues, breaking plain text at headings and blank lines) and indexed with SQLite FTS5
(BM25 ranking, Porter stemming; the index lives in a file, is saved with a snapshot, and keeps
RAM flat whatever the book's length). A question ranks passages two ways:

- lexical: BM25 of the question's words over the passages;
- attention: how much attention the question gave the cache slots that still hold tokens of each
  passage (the model's own pointer into the book; it finds passages that share no words).

Both rankings are fused by reciprocal rank (RRF, k = 60). The best passage is re-read whole; the
next ones are **narrowed** to their best-matching lines (at most NARROW_TOKENS, grown around the line
that BM25 likes best), so the recall budget holds the best passage and the answer lines of two or
three more instead of just two whole passages. They are re-read in document order, right before
the question.
"""

from __future__ import annotations

import os
import re
import sqlite3
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .documents import HEADING, HEADING_CHARS
from .errors import UserError

INDEX_VERSION = 1
TARGET_TOKENS = 160  # a passage closes at the first line break past this many tokens
MAX_TOKENS = 300  # a longer line is cut at sentence ends, then at spaces
RRF_K = 60
# Recalled passages after the best one are cut to at most this many tokens around their best-matching
# line (the best stays whole: the reader needs its context). Chosen offline on the tuning questions
# (recall hit within the 384-token budget, BM25 order; docs/eval.md): all whole 66/69 books, 7/10
# Bible; all cut to 120: 65/69, 8/10 (and the reader got 18/69 right vs 26/69: snippets alone mislead
# it); best whole + others cut to 60: 66/69, 9/10. Held-out Bible questions (bib-11..35): all whole
# 19/25, best whole + 60: 23/25.
NARROW_TOKENS = 60
# Weight of each signal in the fusion. Measured on Exodus (docs/eval.md): BM25 alone put the answer's
# passage in the recall budget 16/16 times, the question's attention alone 0/16 (its top passages are
# the book's last pages: recency); equal-weight fusion 2/8, weight 0.3 9/12, 0.1 13/16, because a
# passage both signals like overtakes BM25's first. At 0.01 attention cannot reorder BM25's top ranks
# (1/61 - 1/62 > 0.01/61); it breaks ties deeper down and it alone ranks passages for a question that
# shares no word with the book (see `rank`; ReadingSession.locate skips the attention probes otherwise).
FUSION = {"bm25": 1.0, "attention": 0.01}
# A passage after the best is recalled only when its BM25 score is at least this share of the best's
# (0: fill the budget). Every extra passage is a distractor when the best holds the answer, and the
# small reader copies from distractors ("double" from the neighbouring verse for "five oxen").
# Measured on the book set (docs/eval.md, "Fewer distractors"): 0.7 recalls 1.8 passages a question
# instead of 4.1, hit 64/69 (was 66), SmolLM2 right 28/69 vs 22/69 (14 won, 8 lost); Bible hit unchanged.
MIN_SHARE = 0.7
# The order recalled passages are re-read in: "document" (as the book has them; the default) or
# "best-last" (by fused rank, the best passage right before the question, where a small reader might copy
# from it most). Measured (docs/eval.md, "The best passage last"): 31 vs 28 of the 69 tuning questions,
# but 17 vs 18 of the 30 held-out Judges ones: no effect that holds, so the book's order stays.
ORDERS = ("document", "best-last")
_WORD = re.compile(r"\w+", re.UNICODE)
STOPWORDS = frozenset("""a an and are as at be been but by did do does for from had has have he her him his how i in
into is it its me my not of on or our she so that the their them then there these they this those to was we were
what when where which who whom whose why will with would you your shall unto upon said also ye thee thou thy""".split())


@dataclass
class Passage:
    id: int
    label: str  # "p. 7", "ch. 3: The Storm", "00:01:41 Maya", "Chapter 12", "lines 40-52"
    char_start: int  # in Document.text
    char_end: int
    token_start: int  # document tokens [token_start, token_end)
    token_end: int

    @property
    def tokens(self) -> int:
        return self.token_end - self.token_start


@dataclass
class Recalled:
    """One passage chosen for a question, with the evidence for it."""

    passage: Passage
    text: str
    bm25_rank: int | None  # 1-based rank in each signal, None when that signal did not list it
    bm25: float | None  # FTS5 bm25 (lower is better)
    attention_rank: int | None
    attention: float | None  # share of the question's attention over the document's slots
    fused: float

    def to_dict(self) -> dict:
        p = self.passage
        return {"label": p.label, "token_start": p.token_start, "token_end": p.token_end, "passage": p.id,
                "char_start": p.char_start, "char_end": p.char_end,
                "bm25_rank": self.bm25_rank, "bm25": self.bm25, "attention_rank": self.attention_rank,
                "attention": self.attention, "fused": round(self.fused, 5), "text": self.text}


# ------------------------------------------------------------------ cutting a document into passages

def _lines(text: str, start: int, end: int):
    """(char_start, char_end) of each line of text[start:end], newline excluded."""
    at = start
    while at < end:
        nl = text.find("\n", at, end)
        stop = end if nl < 0 else nl
        yield at, stop
        at = stop + 1


def _split_long(text: str, a: int, b: int, offsets: np.ndarray) -> list[tuple[int, int]]:
    """Cut one over-long line at sentence ends (else spaces) into pieces of <= MAX_TOKENS."""
    out = []
    while _ntok(offsets, a, b) > MAX_TOKENS:
        # the char where MAX_TOKENS tokens end, then back to a sentence end or a space
        t0 = int(np.searchsorted(offsets, a))
        limit = int(offsets[min(t0 + MAX_TOKENS, len(offsets) - 1)])
        cut = max(text.rfind(". ", a, limit), text.rfind("? ", a, limit), text.rfind("! ", a, limit))
        cut = cut + 2 if cut > a + (limit - a) // 3 else max(text.rfind(" ", a, limit) + 1, a + 1)
        if cut <= a or cut >= b:
            break
        out.append((a, cut))
        a = cut
    out.append((a, b))
    return out


def _ntok(offsets: np.ndarray, a: int, b: int) -> int:
    return int(np.searchsorted(offsets, b) - np.searchsorted(offsets, a))


def cut_passages(document, offsets: np.ndarray) -> list[Passage]:
    """Passages aligned to the source map; `offsets` is SourceMap.offsets (char offset per doc token)."""
    text = document.text
    offsets = np.asarray(offsets, dtype=np.int64)
    starts = document.segment_starts()
    group_segments = document.transcript  # cues are short: several make one passage
    plain = document.kind in ("txt", "md", "text")
    passages: list[Passage] = []
    heading = ""
    line_no = 1  # plain text: 1-based line number of the line being placed
    cur: list = []  # [char_start, char_end, label, first_line, last_line]

    def close():
        if cur and cur[1] > cur[0]:
            label = cur[2] or (f"lines {cur[3]}-{cur[4]}" if cur[4] > cur[3] else f"line {cur[3]}")
            if plain and cur[2] and cur[4] > cur[3]:
                label = f"{cur[2]}, lines {cur[3]}-{cur[4]}"
            t0, t1 = int(np.searchsorted(offsets, cur[0])), int(np.searchsorted(offsets, cur[1]))
            if t1 > t0:
                passages.append(Passage(len(passages), label, cur[0], cur[1], t0, t1))
        cur.clear()

    for k, seg in enumerate(document.segments):
        s0, s1 = starts[k], starts[k] + len(seg.text)
        if not group_segments or (cur and _ntok(offsets, cur[0], s1) > TARGET_TOKENS):
            close()
        for a, b in _lines(text, s0, s1):
            if plain:
                if HEADING.match(text[a:b]) and b - a < HEADING_CHARS:
                    close()
                    heading = " ".join(text[a:b].lstrip("# ").split())
                first = line_no
                line_no += 1
            else:
                first = 0
            if not text[a:b].strip():
                if cur and _ntok(offsets, cur[0], cur[1]) >= TARGET_TOKENS // 2:
                    close()  # a blank line ends a passage that is already half full
                continue
            for pa, pb in _split_long(text, a, b, offsets):
                if cur and _ntok(offsets, cur[0], pb) > MAX_TOKENS:
                    close()
                if not cur:
                    cur.extend([pa, pb, seg.label if not plain else heading, first, first])
                cur[1], cur[4] = pb, first
                if _ntok(offsets, cur[0], cur[1]) >= TARGET_TOKENS and not group_segments:
                    close()
        if plain:
            line_no += 1  # the blank line between segments
    close()
    return passages


# ------------------------------------------------------------------ the index (SQLite FTS5)

def fts_query(question: str) -> str:
    """An FTS5 OR-query of the question's content words (quoted, so no word is FTS syntax)."""
    words = [w.lower() for w in _WORD.findall(question)]
    keep = list(dict.fromkeys(w for w in words if w not in STOPWORDS and (len(w) > 1 or w.isdigit())))
    return " OR ".join(f'"{w}"' for w in keep)


class PassageIndex:
    """Passages of one document with their BM25 index in an SQLite file (FTS5)."""

    def __init__(self, path: Path, passages: list[Passage], con: sqlite3.Connection, owns_file: bool):
        self.path, self.passages, self.con = Path(path), passages, con
        self._starts = np.asarray([p.token_start for p in passages], dtype=np.int64)
        self._ends = np.asarray([p.token_end for p in passages], dtype=np.int64)
        if owns_file:  # a temporary index goes away with the session
            weakref.finalize(self, _remove, self.con, str(path))

    # --- building ---
    @classmethod
    def build(cls, document, offsets: np.ndarray, folder: str | None = None) -> "PassageIndex":
        passages = cut_passages(document, offsets)
        fd, path = tempfile.mkstemp(prefix="cascade-index-", suffix=".sqlite", dir=folder)
        os.close(fd)
        con = sqlite3.connect(path, check_same_thread=False)
        index = cls(Path(path), passages, con, owns_file=True)
        text = document.text
        con.executescript("""
            CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT);
            CREATE TABLE passage(id INTEGER PRIMARY KEY, label TEXT, char_start INT, char_end INT,
                                 token_start INT, token_end INT);
            CREATE VIRTUAL TABLE passage_text USING fts5(text, tokenize='porter unicode61');""")
        con.executemany("INSERT INTO passage VALUES (?,?,?,?,?,?)",
                        [(p.id, p.label, p.char_start, p.char_end, p.token_start, p.token_end) for p in passages])
        con.executemany("INSERT INTO passage_text(rowid, text) VALUES (?,?)",
                        ((p.id, p.label + "\n" + text[p.char_start:p.char_end]) for p in passages))
        con.executemany("INSERT INTO meta VALUES (?,?)", [
            ("version", str(INDEX_VERSION)), ("document_sha256", document.sha256),
            ("doc_tokens", str(len(offsets))), ("passages", str(len(passages)))])
        con.commit()
        return index

    # --- snapshots ---
    def save(self, path: Path) -> None:
        dst = sqlite3.connect(str(path))
        with dst:
            self.con.backup(dst)
        dst.close()

    @classmethod
    def open(cls, path: Path, document, doc_tokens: int) -> "PassageIndex":
        """Open a saved index; a corrupt file or one made for another document is refused in one line."""
        con = None
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
            rows = con.execute("SELECT id, label, char_start, char_end, token_start, token_end FROM passage "
                               "ORDER BY id").fetchall()
            con.execute("SELECT count(*) FROM passage_text").fetchone()
            if meta.get("version") != str(INDEX_VERSION):
                raise UserError(f"{path}: passage index version {meta.get('version')} is not supported")
            passages = [Passage(*r) for r in rows]
            if (meta.get("document_sha256") != document.sha256 or meta.get("doc_tokens") != str(doc_tokens)
                    or meta.get("passages") != str(len(rows))
                    or any(p.token_end > doc_tokens or p.char_end > len(document.text) for p in passages)):
                raise UserError(f"{path}: the passage index does not match the document")
        except (sqlite3.Error, UserError) as e:
            if con is not None:
                con.close()
            if isinstance(e, UserError):
                raise
            raise UserError(f"{path}: corrupt passage index ({e})") from None
        return cls(path, passages, con, owns_file=False)

    def nbytes_on_disk(self) -> int:
        return self.path.stat().st_size

    # --- queries ---
    def passage_of_token(self, doc_tokens: np.ndarray) -> np.ndarray:
        """Passage id of each document token index (-1 for none). # same shape as doc_tokens"""
        doc_tokens = np.asarray(doc_tokens, dtype=np.int64)
        k = np.searchsorted(self._starts, doc_tokens, side="right") - 1
        ok = (k >= 0) & (doc_tokens >= 0)
        k = np.where(ok, k, 0)
        ends = self._ends[k] if self.passages else k
        return np.where(ok & (doc_tokens < ends), k, -1)

    def text(self, passage: Passage) -> str:
        row = self.con.execute("SELECT text FROM passage_text WHERE rowid = ?", (passage.id,)).fetchone()
        return row[0].split("\n", 1)[1] if row else ""

    def bm25(self, question: str, limit: int = 50) -> list[tuple[int, float]]:
        """(passage id, bm25) best first; [] when no word of the question is in the book."""
        query = fts_query(question)
        if not query:
            return []
        rows = self.con.execute("SELECT rowid, bm25(passage_text) AS s FROM passage_text WHERE passage_text "
                                "MATCH ? ORDER BY s LIMIT ?", (query, limit)).fetchall()
        return [(int(r), float(s)) for r, s in rows]


def _remove(con, path: str) -> None:
    try:
        con.close()
    finally:
        for p in (path, path + "-journal", path + "-wal"):
            if os.path.exists(p):
                os.remove(p)


def attention_by_passage(index: PassageIndex, doc_tokens: np.ndarray, weights: np.ndarray) -> dict[int, float]:
    """Sum the attention that slots holding document tokens got, per passage (shares summing to 1)."""
    pid = index.passage_of_token(doc_tokens)
    keep = pid >= 0
    if not keep.any():
        return {}
    total = np.bincount(pid[keep], weights=weights[keep], minlength=len(index.passages))
    norm = float(total.sum()) or 1.0
    return {int(i): float(total[i]) / norm for i in np.flatnonzero(total)}


def rank(index: PassageIndex, question: str, attention: dict[int, float] | None, budget: int,
         tokens_of=lambda p: p.tokens + 8, limit: int = 50, use_bm25: bool = True,
         offsets: np.ndarray | None = None, narrow_tokens: int = NARROW_TOKENS,
         best_tokens: int = 0, min_share: float = 0.0, order: str = "document") -> list[Recalled]:
    """Fuse the BM25 and attention rankings (RRF) and take the best passages that fit `budget` tokens.

    Passages whose BM25 score is below `min_share` of the best passage's are left out even when the
    budget has room (sqlite's bm25 is negative, lower is better: the share compares magnitudes).

    With `offsets` (SourceMap.offsets), the passages after the best are narrowed to their
    best-matching lines (`narrow`, at most narrow_tokens each). The best keeps its context: whole
    (best_tokens 0) or at most best_tokens, and always cut to fit the budget. tokens_of(passage) is
    what re-reading it costs (its text and its label). Returns them in `order` (ORDERS).
    """
    lexical = index.bm25(question, limit) if use_bm25 else []
    by_attention = sorted((attention or {}).items(), key=lambda kv: -kv[1])[:limit]
    fused: dict[int, float] = {}
    for ranking, weight in ((lexical, FUSION["bm25"]), (by_attention, FUSION["attention"])):
        for r, (pid, _) in enumerate(ranking, 1):
            fused[pid] = fused.get(pid, 0.0) + weight / (RRF_K + r)
    lex_rank = {pid: (r, s) for r, (pid, s) in enumerate(lexical, 1)}
    att_rank = {pid: (r, s) for r, (pid, s) in enumerate(by_attention, 1)}
    # Passages only attention likes are recalled only when no word of the question is in the book:
    # a small reader is misled by every extra passage (docs/eval.md), and attention alone rarely finds
    # the answer's passage.
    candidates = [pid for pid, s in lexical if abs(s) >= min_share * abs(lexical[0][1])] if lexical else list(fused)
    texts: dict[int, str] = {}  # each passage's text is read from the index once

    def text_of(pid: int) -> str:
        if pid not in texts:
            texts[pid] = index.text(index.passages[pid])
        return texts[pid]

    narrowing = offsets is not None and lexical and narrow_tokens
    best = best_lines(question, {pid: text_of(pid) for pid in candidates}) if narrowing else {}
    picked, used = [], 0
    for pid in sorted(candidates, key=lambda p: (-fused[p], p)):
        whole = p = index.passages[pid]
        if pid in best:  # the best passage keeps its context (the reader needs it), within the budget
            limit = narrow_tokens if picked else min(best_tokens or whole.tokens,
                                                     budget - (tokens_of(whole) - whole.tokens))
            p = narrow(whole, text_of(pid), best[pid], offsets, limit, question)
        cost = tokens_of(p)
        if used + cost > budget:
            continue
        used += cost
        lr, ar = lex_rank.get(pid), att_rank.get(pid)
        text = text_of(pid)[p.char_start - whole.char_start: p.char_end - whole.char_start]
        picked.append(Recalled(p, text, lr and lr[0], lr and round(lr[1], 4), ar and ar[0],
                               ar and round(ar[1], 5), fused[pid]))
    if order == "best-last":  # the best passage next to the question, the rest before it by fused rank
        return sorted(picked, key=lambda r: (r.fused, -r.passage.token_start))
    return sorted(picked, key=lambda r: r.passage.token_start)


def in_span(passages: list, text: str, span: tuple[int, int]) -> tuple[list, str]:
    """The passages that start in `span` (first, end document tokens), and the text from the first
    one's start to the last one's end ("" when none starts there): one part of a book."""
    inside = [p for p in passages if span[0] <= p.token_start < span[1]]
    return inside, text[inside[0].char_start:inside[-1].char_end] if inside else ""


def central(index: PassageIndex, text: str, budget: int, tokens_of=lambda p: p.tokens + 8,
            words: int = 20, span: tuple[int, int] | None = None) -> list[Recalled]:
    """The book's central passages, spread over all of it, within `budget` tokens (for a summary).

    Central: ranked by BM25 for the book's `words` most frequent content words (its main people,
    places and themes). Spread: the book is cut into as many equal parts (by tokens) as passages of
    average cost fit the budget, and each part gives its best passage, so a summary sees the
    beginning, the middle and the end, not only what the cache holds (mostly the end).
    `span`: (first, end) document tokens: only the passages that start there, ranked by that part's
    own most frequent words (a summary written part by part).
    """
    from collections import Counter

    passages = index.passages
    if span is not None:
        passages, text = in_span(passages, text, span)
    if not passages:
        return []
    pool = {p.id for p in passages}
    counts = Counter(w for w in (m.lower() for m in _WORD.findall(text)) if w not in STOPWORDS and len(w) > 2)
    ranked = index.bm25(" ".join(w for w, _ in counts.most_common(words)), limit=len(index.passages))
    mean_cost = sum(tokens_of(p) for p in passages) / len(passages)
    parts = max(1, min(len(passages), int(budget // mean_cost)))
    first, end = passages[0].token_start, passages[-1].token_end
    picked, used, taken = [], 0, set()
    for pid, score in ranked:  # best first: each part takes its best passage that still fits
        if pid not in pool:
            continue
        p = index.passages[pid]
        part = min(parts - 1, (p.token_start - first) * parts // max(end - first, 1))
        if part in taken or used + tokens_of(p) > budget:
            continue
        taken.add(part)
        used += tokens_of(p)
        picked.append(Recalled(p, index.text(p), len(picked) + 1, round(score, 4), None, None, 0.0))
    return sorted(picked, key=lambda r: r.passage.token_start)


# ------------------------------------------------------------------ narrowing a passage to its lines

def best_lines(question: str, texts: dict[int, str]) -> dict[int, int]:
    """Passage id -> char offset (in the passage's text) of its line that BM25 likes best.

    `texts`: the candidate passages' texts by id. Their lines go into a throwaway in-memory FTS5
    table, so a question's rare words weigh most among the lines it is choosing between; the saved
    index stays as it is.
    """
    return _best_spans(question, [(pid, a, b) for pid, text in texts.items()
                                  for a, b in _lines(text, 0, len(text))], texts)


def _best_spans(question: str, spans: list[tuple[int, int, int]], texts: dict[int, str]) -> dict[int, int]:
    """Key -> start of its span (key, char_start, char_end in texts[key]) that BM25 likes best."""
    query = fts_query(question)
    if not query or not texts:
        return {}
    con = sqlite3.connect(":memory:")
    try:
        con.execute("CREATE VIRTUAL TABLE line USING fts5(text, pid UNINDEXED, at UNINDEXED, "
                    "tokenize='porter unicode61')")
        rows = [(texts[k][a:b], k, a) for k, a, b in spans if texts[k][a:b].strip()]
        con.executemany("INSERT INTO line(text, pid, at) VALUES (?, ?, ?)", rows)
        best: dict[int, int] = {}
        for pid, at in con.execute("SELECT pid, at FROM line WHERE line MATCH ? ORDER BY bm25(line)", (query,)):
            best.setdefault(int(pid), int(at))
        return best
    finally:
        con.close()


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """(char_start, char_end) of each sentence of text[start:end] (one line), the spaces after it excluded."""
    out, at = [], start
    for m in _SENTENCE_END.finditer(text, start, end):
        out.append((at, m.start()))
        at = m.end()
    if at < end:
        out.append((at, end))
    return out


_LINES_LABEL = re.compile(r"^(?:(?P<head>.*), )?lines? (?P<first>\d+)(?:-\d+)?$")


def narrow(p: Passage, text: str, at: int, offsets: np.ndarray, max_tokens: int, question: str) -> Passage:
    """The passage (whose text is `text`) cut to whole lines around the line starting at `at`, grown
    one line after, then one before, while it stays within max_tokens. A passage already that short
    is kept whole. When that line alone is longer than max_tokens and than a whole passage's
    TARGET_TOKENS (prose written a paragraph a line, a text with no line breaks at all; never a verse
    or a page's line), its sentences take the lines' place, around the sentence BM25 likes best for
    the `question`: a passage cut out of such a line mid-fact ("... is 12963. | Remember it.
    12963 is the pass key.") then lends the reader the sentence that holds the other half. Plain-text
    labels name the narrowed lines ("Chapter 3, lines 12-14")."""
    if p.tokens <= max_tokens:
        return p
    units = list(_lines(text, 0, len(text)))
    i = next((k for k, (a, _) in enumerate(units) if a == at), None)
    if i is None:
        return p
    tokens = lambda lo, hi: _ntok(offsets, p.char_start + units[lo][0], p.char_start + units[hi][1])
    if tokens(i, i) > max(max_tokens, TARGET_TOKENS):
        units = _sentences(text, *units[i])
        best = _best_spans(question, [(0, a, b) for a, b in units], {0: text})
        i = next((k for k, (a, _) in enumerate(units) if a == best.get(0)), None)
        if i is None:
            return p
    elif len(units) == 1:
        return p
    lo = hi = i
    grown = True
    while grown:
        grown = False
        for j in (hi + 1, lo - 1):
            if 0 <= j < len(units) and tokens(min(lo, j), max(hi, j)) <= max_tokens:
                lo, hi, grown = min(lo, j), max(hi, j), True
    while lo < hi and not text[units[lo][0]:units[lo][1]].strip():
        lo += 1  # no blank line at either end
    while hi > lo and not text[units[hi][0]:units[hi][1]].strip():
        hi -= 1
    a, b = units[lo][0], units[hi][1]
    label = p.label
    m = _LINES_LABEL.match(p.label)
    if m:  # plain text: line numbers of the narrowed lines (the passage's lines are consecutive)
        first = int(m["first"]) + text.count("\n", 0, a)
        last = first + text.count("\n", a, b)
        span = f"lines {first}-{last}" if last > first else f"line {first}"
        label = f"{m['head']}, {span}" if m["head"] else span
    c0, c1 = p.char_start + a, p.char_start + b
    t0, t1 = int(np.searchsorted(offsets, c0)), int(np.searchsorted(offsets, c1))
    return Passage(p.id, label, c0, c1, t0, t1)


# A transcript's cue opens with its time ("[00:01:43] Maya: ..."; engine.documents._cue)
CUE_TIME = re.compile(r"(?m)^\[\d{1,2}:\d\d:\d\d(?:[.,]\d+)?\] ")


def without_cue_times(text: str) -> tuple[str, np.ndarray]:
    """`text` without the time at the start of each transcript cue, and for every character left its
    offset in `text` (so re-read tokens still point at their document tokens). A summary re-reads its
    passages so: with the times in view, SmolLM2 wrote the podcast's summary as timestamped transcript
    lines, copied or made up ("[00+18: 27: 37] Tomas: ..."); without them, in sentences (docs/eval.md).

    # (str, [len(result)] int64)
    """
    keep = np.ones(len(text), dtype=bool)
    for m in CUE_TIME.finditer(text):
        keep[m.start(): m.end()] = False
    return CUE_TIME.sub("", text), np.flatnonzero(keep)
