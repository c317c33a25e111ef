"""Book summaries by sections: summarize each chapter (or group of chapters) as it is read, then
the whole book.

Sections follow the book's structure (`documents.chapters`: headings such as "Chapter 12", EPUB
chapters, PDF pages, subtitle cues). Consecutive chapters are grouped so that a book makes at most
`MAX_SECTIONS` sections: every section costs one generated summary, and the whole job must stay
within a small multiple of the time to read the book (docs/eval.md). A chapter longer than twice
the target is cut at paragraph breaks.

The cascade cache carries context across sections: sections are read into one continuing cache,
and each section summary is generated from a frozen copy of it, so summaries never enter the
document's cache. The summary of the whole book is then written as `--mode cache` writes it
(`ReadingSession.summarize`): in three parts, beginning, middle and end, each from the central
passages of its own third of the book. It used to be written from the labelled section summaries;
on ten stories that kept the book's order and reached its thirds less well, and carried on what a
section summary had made up (docs/eval.md, stop 36).
Repetition control is the session's own (`ReadingSession._processor`), the same as for answers, and
the decoder writes only names and numbers that the section (its third of the document, for a part
of the whole book's summary) has (`engine.grounding`).
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

from . import documents
from .copying import whole_sentences
from .errors import UserError
from .memory import freeze, memory_of
from .grounding import main_names, with_names
from .prompts import SECTION_LEAD, SECTION_QUESTION
from .recall import PassageIndex
from .runtime import ReadProgress
from .session import Answer, ReadingSession, ReadResult

MAX_SECTIONS = 8  # measured: 12 made the final summary worse (coverage, order) and slower
MIN_SECTION_CHARS = 2000  # ~500 tokens: shorter chapters are grouped with the next
SECTION_TOKENS = 120  # limit of one section summary


def _cuts(text: str, a: int, b: int, target: float) -> list[tuple[int, int]]:
    """Cut text[a:b] into pieces of about `target` chars at paragraph breaks (else line ends, spaces)."""
    n = max(2, round((b - a) / target))
    bounds = [a]
    for i in range(1, n):
        want = a + (b - a) * i // n
        lo = max(bounds[-1] + 1, want - int(target) // 3)
        for sep in ("\n\n", "\n", " "):  # the break nearest before `want`, else the nearest after it
            at = text.rfind(sep, lo, want)
            at = at if at > bounds[-1] else text.find(sep, want, want + int(target) // 3)
            if at > bounds[-1]:
                bounds.append(at + len(sep))
                break
    return list(zip(bounds, bounds[1:] + [b]))


def section_bounds(document: documents.Document, max_sections: int = MAX_SECTIONS,
                   min_chars: int = MIN_SECTION_CHARS) -> list[tuple[int, int, str]]:
    """(start_char, end_char, label) of each section: chapters grouped to about len/max_sections chars."""
    text = document.text
    target = max(min_chars, len(text) / max_sections)
    chapters = documents.chapters(document)
    named = chapters is not None or document.kind == "epub"  # labels worth keeping ("Chapter 3")
    if chapters is None:
        chapters = [(a, a + len(s.text), s.label) for a, s in zip(document.segment_starts(), document.segments)]
    units = []
    for a, b, label in chapters:
        pieces = _cuts(text, a, b, target) if b - a > 2 * target else [(a, b)]
        units += [(x, y, f"{label} ({i + 1}/{len(pieces)})" if len(pieces) > 1 and named else label)
                  for i, (x, y) in enumerate(pieces)]
    groups, first, size = [], 0, 0
    for k, (a, b, label) in enumerate(units):
        size += b - a
        after = size + units[k + 1][1] - units[k + 1][0] if k + 1 < len(units) else None
        # close at the target, or past half of it where the next chapter would overshoot it by more
        if after is None or size >= target or (size >= target / 2 and after - target > target - size):
            groups.append((first, k))
            first, size = k + 1, 0
    if len(groups) > 1 and units[groups[-1][1]][1] - units[groups[-1][0]][0] < target / 3:
        groups[-2:] = [(groups[-2][0], groups[-1][1])]  # a short tail joins the section before
    out = []
    for i, j in groups:
        a, b = units[i][0], units[j][1]
        if named and units[i][2]:
            label = units[i][2] if i == j else f"{units[i][2]} – {units[j][2]}"
        else:
            label = documents.span_label(document, a, b)
        out.append((a, b, label))
    return out


class Eta:
    """Seconds left for the whole job: reading at the measured rate, the remaining section summaries at
    the mean time of the finished ones, and the final summary at that rate per token."""

    def __init__(self, total_tokens: int, sections: int, section_tokens: int, final_tokens: int):
        self.total, self.sections = total_tokens, sections
        self.final_share = final_tokens / max(section_tokens, 1)
        self.read_tokens, self.read_seconds, self.summary_seconds, self.done = 0, 0.0, 0.0, 0

    def seconds_left(self) -> float | None:
        if not self.done or not self.read_tokens:
            return None
        per_summary = self.summary_seconds / self.done
        reading = (self.total - self.read_tokens) * self.read_seconds / self.read_tokens
        return reading + per_summary * (self.sections - self.done + self.final_share)


def summarize_sections(session: ReadingSession, document: documents.Document | None = None,
                       max_sections: int = MAX_SECTIONS, max_new_tokens: int = SECTION_TOKENS,
                       final_tokens: int = 300, should_stop: Callable[[], bool] | None = None,
                       progress: Callable[[ReadProgress], None] | None = None,
                       focus: bool = True) -> Iterator[dict]:
    """Events, in order:
    - {"type": "plan", "sections": [{"index", "label", "start_char", "end_char", "source"}]};
    - per section: {"type": "status", "index", "of", "label", "phase": "reading"|"summarizing",
      "eta_seconds"}, its text as {"type": "section_delta", ...}, then {"type": "section", "index",
      "label", "start_char", "end_char", "source", "summary", "cut", "names" (the main names its request
      gave), "seconds"};
    - {"type": "status", "phase": "final", ...}, {"type": "delta", "text"} ..., {"type": "done",
      "summary", "sections"};
    With `focus`, a section summary sees only the most recent slots, as many as the section has
    tokens (the newest cascade holds the latest tokens, so these are mostly the section's), and not
    the sketch of earlier sections that the cascades keep: measured, summaries otherwise named people
    of earlier chapters (docs/eval.md).
    Each request names its section's main names (`grounding.main_names`).
    Or, once should_stop() says so, {"type": "stopped", "sections": the finished ones} and nothing
    more (the session keeps the document it had). Done, the session holds the document as read."""
    document = document or session.document
    if document is None:
        raise UserError("summarize needs a document")
    tok = session.loaded.tokenizer
    bounds = section_bounds(document, max_sections)
    plan = [{"index": k, "label": label, "start_char": a, "end_char": b,
             "source": documents.span_label(document, a, b)} for k, (a, b, label) in enumerate(bounds)]
    yield {"type": "plan", "sections": plan}
    source_map = documents.SourceMap(document)
    prefix = session._ids(session.format.prefix)
    total = documents.count_tokens(document, tok)
    session.configure_for(total + len(prefix))
    engine = session.engine
    cache = engine.new_cache()
    engine.read([prefix], cache)
    sections: list[dict] = []
    buffer: list[int] = []
    eta = Eta(total, len(bounds), max_new_tokens, final_tokens)
    t0 = time.perf_counter()
    memory = None  # one frozen copy, refilled for every section (flat memory)
    stopped = should_stop or (lambda: False)

    def status(k: int, phase: str) -> dict:
        return {"type": "status", "index": k, "of": len(bounds), "label": bounds[k][2] if k < len(bounds) else "",
                "phase": phase, "eta_seconds": eta.seconds_left(), "elapsed": time.perf_counter() - t0}

    def flush(k: int):
        nonlocal memory
        section_tokens = len(buffer)
        if buffer:
            start = time.perf_counter()
            engine.read([buffer], cache, should_stop=should_stop)
            eta.read_seconds += time.perf_counter() - start
            eta.read_tokens += len(buffer)
            buffer.clear()
            if progress:
                progress(ReadProgress(eta.read_tokens, total, time.perf_counter() - t0))
        yield status(k, "summarizing")
        a, b, label = bounds[k]
        main = main_names(document.text[a:b], document.text)
        question, lead = with_names(SECTION_QUESTION.format(label=label), SECTION_LEAD.format(label=label), label, main)
        answer = Answer(question)
        start = time.perf_counter()
        memory = freeze(cache, max_new_tokens + 128, memory)
        if focus:  # the section's own slots only (and the sinks): earlier sections stay out of its summary
            memory_of(memory).hide_document(session.config.sinks, recent=max(section_tokens, 1))
        prompt = session.format.request_text(question, lead)
        for delta in session._generate(memory, session._ids(prompt), answer, max_new_tokens, 0.0, 1.0,
                                       should_stop, 0, 0, names=session.source_names(f"{document.title}\n{label}\n{document.text[a:b]}"),
                                       summary=True):
            yield {"type": "section_delta", "index": k, "label": label, "text": delta}
        if answer.stopped:
            return
        eta.summary_seconds += time.perf_counter() - start
        eta.done += 1
        text = whole_sentences(answer.text) if answer.cut else answer.text
        event = {**plan[k], "type": "section", "summary": text, "cut": answer.cut, "names": main,
                 "seconds": time.perf_counter() - start}
        sections.append(event)
        yield event

    k = 0
    yield status(0, "reading")
    for piece in documents.tokenize_stream(document, tok, source_map=source_map):
        offset0 = len(source_map) - len(piece)
        for j, token in enumerate(piece):
            while k < len(bounds) - 1 and source_map.char_offset(offset0 + j) >= bounds[k][1]:
                yield from flush(k)
                if stopped():
                    yield {"type": "stopped", "sections": sections}
                    return
                k += 1
                yield status(k, "reading")
            buffer.append(token)
    while k < len(bounds):
        yield from flush(k)
        if stopped():
            yield {"type": "stopped", "sections": sections}
            return
        k += 1
    # the session now holds the whole document, as if read with session.read
    session._set_document(document, source_map, cache, len(prefix),
                          ReadResult(eta.read_tokens, len(prefix), eta.read_seconds,
                                     eta.read_tokens / max(eta.read_seconds, 1e-9)),
                          PassageIndex.build(document, source_map.offsets))
    # The summary of the whole book is written as a cache-mode summary is (ReadingSession.summarize): in
    # parts, beginning, middle and end, each from the central passages of its own third of the book. Written
    # from the labelled section summaries instead, it kept the book's order worse and reached fewer thirds
    # (10 stories: docs/eval.md, stop 36), and it passed on what the section summaries had made up.
    started: list[dict] = []

    def on_part(k: int, parts: int, name: str, a: int, b: int):
        inside = [s["label"] for s in plan if a <= s["start_char"] < b] or [documents.span_label(document, a, b)]
        label = inside[0] if len(inside) == 1 else f"{inside[0]} – {inside[-1]}"
        started.append({**status(len(bounds), "final"), "part": k, "parts": parts, "label": label})

    for delta in session.summarize(final_tokens, should_stop, on_part=on_part):
        yield from started
        started.clear()
        yield {"type": "delta", "text": delta}
    yield from started
    answer = session.answers[-1]
    if answer.stopped:
        yield {"type": "stopped", "sections": sections}
        return
    yield {"type": "done", "summary": answer.text, "sections": sections, "seconds": time.perf_counter() - t0}
