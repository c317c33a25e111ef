"""Book summaries by sections: summarize each chapter / page range as it is read, then summarize those.

The cascade cache carries context across sections: sections are read into one continuing cache,
and each section summary is generated from a copy of it, so summaries never enter the document's
cache. The final summary reads the section summaries as a new, short document.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import torch

from . import documents
from .memory import freeze
from .recall import PassageIndex
from .prompts import FINAL_SUMMARY_QUESTION, SECTION_QUESTION
from .runtime import ReadProgress
from .session import Answer, ReadingSession, ReadResult


def section_bounds(document: documents.Document, section_chars: int) -> list[tuple[int, int, str]]:
    """Group consecutive segments into sections of at least `section_chars`: (start, end, label)."""
    starts = document.segment_starts()
    out, first = [], 0
    size = 0
    for k, seg in enumerate(document.segments):
        size += len(seg.text)
        if size >= section_chars or k == len(document.segments) - 1:
            a, b = document.segments[first].label, seg.label
            label = a if first == k or not a else f"{a} - {b}"
            end = starts[k] + len(seg.text)
            out.append((starts[first], end, label or f"part {len(out) + 1}"))
            first, size = k + 1, 0
    if len(out) == 1 and len(document.text) > 2 * section_chars:  # one huge segment (plain text): split it
        text_len, out = len(document.text), []
        for i, a in enumerate(range(0, text_len, section_chars)):
            out.append((a, min(text_len, a + section_chars), f"part {i + 1}"))
    return out


def summarize_sections(session: ReadingSession, document: documents.Document | None = None,
                       section_chars: int = 8000, max_new_tokens: int = 160, final_tokens: int = 300,
                       should_stop: Callable[[], bool] | None = None, say: Callable[[str], None] | None = None,
                       progress: Callable[[ReadProgress], None] | None = None) -> Iterator[dict]:
    """Events: {"type": "section_delta"|"section"|"delta"|"progress", ...}. Leaves the session read."""
    document = document or session.document
    if document is None:
        from .errors import UserError

        raise UserError("summarize needs a document")
    tok = session.loaded.tokenizer
    bounds = section_bounds(document, section_chars)
    source_map = documents.SourceMap(document)
    prefix = session._ids(session.format.prefix)
    total = documents.count_tokens(document, tok)
    session.configure_for(total + len(prefix))
    engine = session.engine
    cache = engine.new_cache()
    engine.read([prefix], cache)
    sections: list[dict] = []
    buffer: list[int] = []
    read_tokens, read_seconds, t0 = 0, 0.0, time.perf_counter()

    def flush(k: int):
        nonlocal read_tokens, read_seconds
        if buffer:
            start = time.perf_counter()
            engine.read([buffer], cache, should_stop=should_stop)
            read_seconds += time.perf_counter() - start
            read_tokens += len(buffer)
            buffer.clear()
            if progress:
                progress(ReadProgress(read_tokens, total, time.perf_counter() - t0))
        a, b, label = bounds[k]
        if say:
            say(f"section {k + 1}/{len(bounds)}: {label}")
        answer = Answer(SECTION_QUESTION)
        for delta in session._generate(freeze(cache, max_new_tokens + 64),
                                       session._ids(session.format.question_text(SECTION_QUESTION)),
                                       answer, max_new_tokens, 0.0, 1.0, should_stop, 0, 0):
            yield {"type": "section_delta", "index": k, "label": label, "text": delta}
        event = {"type": "section", "index": k, "label": label, "start_char": a, "end_char": b,
                 "summary": answer.text, "cut": answer.cut}
        sections.append(event)
        yield event

    k = 0
    for piece in documents.tokenize_stream(document, tok, source_map=source_map):
        offset0 = len(source_map) - len(piece)
        for j, token in enumerate(piece):
            while k < len(bounds) - 1 and source_map.char_offset(offset0 + j) >= bounds[k][1]:
                yield from flush(k)
                k += 1
            buffer.append(token)
    while k < len(bounds):
        yield from flush(k)
        k += 1
    # the session now holds the whole document, as if read with session.read
    session._set_document(document, source_map, cache, len(prefix),
                          ReadResult(read_tokens, len(prefix), read_seconds, read_tokens / max(read_seconds, 1e-9)),
                          PassageIndex.build(document, source_map.offsets))
    # final: the section summaries, read as a short document of their own
    joined = "\n\n".join(f"[{s['label']}] {s['summary']}" for s in sections)
    final_cache = engine.new_cache()
    ids = session._ids(session.format.prefix + joined) + session._ids(session.format.question_text(FINAL_SUMMARY_QUESTION))
    answer = Answer(FINAL_SUMMARY_QUESTION)
    session.answers.append(answer)
    with torch.inference_mode():
        for delta in session._generate(final_cache, ids, answer, final_tokens, 0.0, 1.0, should_stop, 0, 0):
            yield {"type": "delta", "text": delta}
    yield {"type": "done", "summary": answer.text, "sections": sections}
