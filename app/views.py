"""Pure rendering: engine results -> HTML, Markdown and images for the UI. No model logic here.

Everything here is cheap on purpose: the retention map's cells are drawn with numpy + Pillow (a few ms
for a 30-layer model) into a small PNG, and its labels are SVG text around it, inline in the page: the
map scales to its column with sharp, selectable labels, and live updates while reading write no files.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time

import numpy as np
from PIL import Image, ImageFont

# a sequential colour ramp (paper white -> deep blue); index 0 = nothing held
_RAMP = np.array([[250, 250, 252], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]],
                 dtype=np.float32)
_UNREAD = np.array([236, 236, 240], dtype=np.uint8)
_FONTS: dict = {}


def _font(size: int = 12):
    if size not in _FONTS:
        try:
            _FONTS[size] = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: bitmap font, no size
            _FONTS[size] = ImageFont.load_default()
    return _FONTS[size]


def _colour(values: np.ndarray) -> np.ndarray:
    """values in [0, 1] -> RGB uint8; exactly 0 maps to the background colour."""
    x = np.clip(values, 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, len(_RAMP) - 1)
    frac = (x - lo)[..., None]
    rgb = _RAMP[lo] * (1 - frac) + _RAMP[hi] * frac
    rgb[values <= 0] = _RAMP[0]
    return rgb.astype(np.uint8)


def retention_grid(retention: dict, rows: str = "layer", layer: int = 0, bins: int = 240,
                   total: int | None = None) -> tuple[np.ndarray, list[str]]:
    """[rows, bins] share of each stretch of the document that the cache holds (mean over KV heads).

    x spans `total` document tokens (defaults to the tokens seen so far), so a map drawn while
    reading fills from left to right. rows="layer": one row per layer; rows="cascade": one row per
    part (sinks, cascade 0, 1, ...) of one layer.
    """
    pos = np.asarray(retention["positions"])  # [layers, kv_heads, slots], -1 empty / prompt
    seen = max(int(retention["seen"]), 1)
    total = max(int(total or seen), seen, 1)
    heads = pos.shape[1]
    per_bin = total / bins
    if rows == "cascade":
        layer = int(min(max(layer, 0), len(pos) - 1))
        cascade = retention.get("cascade")
        p = pos[layer]
        if cascade is None:
            parts, names = [p], ["all slots"]
        else:
            ids = sorted(set(np.asarray(cascade).tolist()))
            parts = [p[:, cascade == c] for c in ids]
            names = ["sinks" if c < 0 else f"cascade {c}" for c in ids]
        grid = []
        for q in parts:
            q = q[q >= 0]
            grid.append(np.bincount(np.minimum((q / per_bin).astype(np.int64), bins - 1), minlength=bins)[:bins])
        grid = np.asarray(grid, dtype=np.float64)
    else:
        valid = pos >= 0
        row = np.broadcast_to(np.arange(len(pos))[:, None, None], pos.shape)[valid]
        col = np.minimum((pos[valid] / per_bin).astype(np.int64), bins - 1)
        grid = np.bincount(row * bins + col, minlength=len(pos) * bins)[: len(pos) * bins]
        grid = grid.reshape(len(pos), bins).astype(np.float64)
        layers = retention.get("layers") or list(range(len(pos)))
        names = [f"layer {l}" for l in layers]
    grid /= heads * max(per_bin, 1.0)
    return np.clip(grid, 0, 1), names


_RECALLED = np.array([230, 120, 20], dtype=np.uint8)  # orange: not one of the ramp's blues


def retention_svg(retention: dict, rows: str = "layer", layer: int = 0, total: int | None = None,
                  tick_labels: list[str] | None = None, width: int = 820, ticks: int = 5,
                  recalled: list[tuple[int, int]] | None = None) -> str:
    """The retention map as inline SVG: a pixel grid (one PNG, one pixel per row and bin) stretched
    over the plot, row labels on the left and document positions below as vector text.

    `recalled`: document token ranges re-read for the last answer, drawn as an orange row below."""
    seen = max(int(retention["seen"]), 1)
    total = max(int(total or seen), seen, 1)
    bins = int(min(240, total))  # a bin never covers less than one token
    grid, names = retention_grid(retention, rows, layer, bins, total)
    names = [*names, "recalled"] if recalled else names
    n = len(names)
    row_h = max(4, min(30, 210 // max(n, 1)))
    size = 15 if width < 600 else 17  # the map is scaled to its column: labels must stay legible
    font = _font(size)  # Pillow's measure of the text, close to the browser's sans-serif
    label_w = max(int(font.getlength(name)) for name in names) if names else 40
    left, right, top, bottom = label_w + 12, 10, 6, size + 10
    plot_w = width - left - right
    img = _colour(np.sqrt(grid))  # sqrt keeps sparse old cascades visible
    unread = int(np.ceil(bins * seen / total))
    img[:, unread:] = _UNREAD
    if recalled:
        strip = np.full((1, bins, 3), 255, dtype=np.uint8)
        for a, b in recalled:
            strip[0, int(a * bins / total): max(int(a * bins / total) + 1, int(np.ceil(b * bins / total)))] = _RECALLED
        img = np.concatenate((img, strip))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    cells = base64.b64encode(buf.getvalue()).decode()
    y0, height = top + n * row_h, top + n * row_h + bottom
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' class='rmap-svg' viewBox='0 0 {width} {height}' "
           f"width='100%' role='img' aria-label='retention map' font-family='sans-serif' font-size='{size}' "
           f"fill='#3c3c46'>",
           f"<image x='{left}' y='{top}' width='{plot_w}' height='{n * row_h}' preserveAspectRatio='none' "
           f"style='image-rendering:pixelated' href='data:image/png;base64,{cells}'/>",
           f"<rect x='{left}' y='{top}' width='{plot_w}' height='{n * row_h}' fill='none' stroke='#c8c8d2'/>"]
    step = max(1, int(np.ceil(size * 1.2 / row_h)))
    for i, name in enumerate(names):
        if (i % step == 0 and n - 1 - i >= step) or i == n - 1:
            out.append(f"<text x='{left - 6}' y='{top + i * row_h + row_h / 2:.1f}' text-anchor='end' "
                       f"dominant-baseline='middle'>{html.escape(name)}</text>")
    # each tick label gets its share of the width (ends get half): long source labels (SRT cues,
    # chapter titles) are cut with an ellipsis rather than printed over their neighbours
    room = plot_w / max(ticks - 1, 1) - 8
    for k in range(ticks):
        frac = k / (ticks - 1)
        x = left + frac * (plot_w - 1)
        label = number = f"{round(frac * total):,}"
        fits = 0.9 * (room if 0 < k < ticks - 1 else room / 2)  # 10% for the browser's font
        if tick_labels and k < len(tick_labels) and tick_labels[k]:
            label = fit_text(f"{number} · {tick_labels[k]}", font, fits)
            label = label if len(label) > len(number) + 4 else number  # the position always shows
        anchor = "start" if k == 0 else ("end" if k == ticks - 1 else "middle")
        out.append(f"<line x1='{x:.1f}' y1='{y0}' x2='{x:.1f}' y2='{y0 + 4}' stroke='#787882'/>"
                   f"<text x='{x:.1f}' y='{y0 + 6}' text-anchor='{anchor}' dominant-baseline='hanging'>"
                   f"{html.escape(label)}</text>")
    if seen < total:
        x = left + plot_w * seen / total
        out.append(f"<line x1='{x:.1f}' y1='{top}' x2='{x:.1f}' y2='{y0 - 1}' stroke='#d62728' stroke-width='2'/>")
    return "".join(out) + "</svg>"


def fit_text(text: str, font, width: float) -> str:
    """text, cut with "…" so that it is at most `width` pixels wide in `font`."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text.rstrip(" ·") + "…"


def retention_map_html(retention: dict | None, rows: str = "layer", layer: int = 0, total: int | None = None,
                       tick_labels: list[str] | None = None, caption: str = "", width: int = 820,
                       ticks: int = 5, recalled: list[tuple[int, int]] | None = None) -> str:
    if retention is None:
        return ("<div class='rmap empty'>The map of what the cache holds appears here while a document is "
                "read.</div>")
    what = "layers" if rows != "cascade" else f"parts of layer {layer}"
    cap = caption or (f"x: position in the document (tokens) · y: {what} · darker = more of that stretch still "
                      "held (mean over KV heads)" + (" · grey: not read yet" if total and total > retention["seen"]
                                                     else "")
                      + (" · orange: passages re-read for the last answer" if recalled else ""))
    svg = retention_svg(retention, rows, layer, total, tick_labels, width, ticks, recalled)
    return (f"<div class='rmap'>{svg}"
            f"<div class='rmap-caption'>{html.escape(cap)}</div></div>")


def occupancy_table(retention: dict, layer: int, cascade_sizes: list[int], sinks: int,
                    prompt_tokens: int = 0) -> list[list]:
    """Per part of one layer: slots filled (max over KV heads) / capacity, oldest and newest document
    token held, the span covered, and how sparse it is (one kept token per N). Sink slots that hold
    the prompt (the chat template's prefix, not the document) are said to, so "22/64" is not a puzzle."""
    pos = retention["positions"]
    p = pos[min(max(int(layer), 0), len(pos) - 1)]
    cascade = retention.get("cascade")
    if cascade is None:
        parts = [(None, "all slots", p.shape[-1])]
    else:
        parts = [(-1, "sinks", sinks)] + [(c, f"cascade {c}", cascade_sizes[c] if c < len(cascade_sizes) else 0)
                                          for c in range(int(cascade.max()) + 1)]
    rows = []
    for c, name, cap in parts:
        held = p[:, cascade == c] if c is not None else p
        filled = int((held >= 0).sum(axis=-1).max()) if held.size else 0
        valid = held[held >= 0]
        cap_txt = f"{filled:,}/{cap:,}" if cap else f"{filled:,}"
        prompt = min(prompt_tokens, cap - filled) if c == -1 and cap else 0
        if prompt > 0:
            cap_txt += f" document tokens; the other {prompt:,} hold the prompt"
        if valid.size:
            span = int(valid.max() - valid.min() + 1)
            rows.append([name, cap_txt, int(valid.min()), int(valid.max()), span,
                         f"1 per {span / max(filled, 1):.1f}"])
        else:
            rows.append([name, cap_txt, "-", "-", "-", "-"])
    return rows


def highlighted_text(text: str, offsets: np.ndarray, slot_positions: np.ndarray, slot_parts: np.ndarray | None,
                     start: int, count: int) -> str:
    """Document tokens [start, start + count) as HTML; tokens the chosen layer/head holds are marked,
    coloured by the part holding them (sink, cascade 0, 1, ...)."""
    n = len(offsets)
    start = max(0, min(int(start), max(n - 1, 0)))
    end = min(n, start + int(count))
    part = np.full(max(end - start, 0), -9, dtype=np.int64)
    m = (slot_positions >= start) & (slot_positions < end)
    part[slot_positions[m] - start] = slot_parts[m] if slot_parts is not None else 0
    out = []
    for t in range(start, end):
        a = int(offsets[t])
        b = int(offsets[t + 1]) if t + 1 < n else len(text)
        if a < 0:
            continue
        piece = html.escape(text[a:max(a, b)])
        k = int(part[t - start])
        if k == -9:
            out.append(piece)
        else:
            cls = "s" if k < 0 else f"c{min(k, 7)}"
            out.append(f"<mark class='{cls}' title='token {t:,} · {'sink' if k < 0 else f'cascade {k}'}'>"
                       f"{piece}</mark>")
    body = "".join(out).replace("\n", "<br>")
    return f"<div class='retained-text'>{body or '<i>(nothing here)</i>'}</div>"


def legend_html(parts: int | None, policy: str = "cascade") -> str:
    if parts is None:  # no per-slot part information (hybrid caches)
        items = ["<mark class='c0'>held</mark>"]
    elif policy == "sink":
        items = ["<mark class='s'>sink</mark>", "<mark class='c0'>window</mark>"]
    else:
        items = ["<mark class='s'>sink</mark>"] + [f"<mark class='c{min(c, 7)}'>cascade {c}</mark>"
                                                   for c in range(parts)]
    return ("<div class='legend'>held by this layer/head: " + " ".join(items) +
            " · plain grey text: forgotten</div>")


def progress_html(tokens: int, total: int | None, tps: float, eta: float | None, state: str = "reading",
                  note: str = "") -> str:
    pct = min(100.0, 100.0 * tokens / total) if total else (100.0 if state == "done" else 0.0)
    total_txt = f"{total:,}" if total else "?"
    parts = [f"{html.escape(state)}: {tokens:,} / {total_txt} tokens"]
    if total:
        parts[0] += f" ({pct:.0f}%)"
    if tps:
        parts.append(f"{tps:,.0f} tokens/s")
    if eta is not None and state == "reading":
        parts.append(f"ETA {_duration(eta)}")
    if note:
        parts.append(html.escape(note))
    return (f"<div class='read-progress' data-state='{html.escape(state)}'>"
            f"<div class='bar'><div class='fill' style='width:{pct:.1f}%'></div></div>"
            f"<div class='label'>{' · '.join(parts)}</div></div>")


def _duration(s: float) -> str:
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def facts_markdown(session, watched_s: float | None = None, snapshot: str | None = None) -> str:
    """watched_s: the read (or snapshot load) as the user waited for it, turns with others included;
    snapshot: the snapshot's name when the document was loaded from one."""
    d, r, b, cfg = session.document, session.read_result, session.budget(), session.config
    n = len(d.segments)
    if snapshot:
        timing = (f"- loaded from snapshot **{html.escape(snapshot)}** in {_duration(watched_s or 0)} "
                  f"(it was read in {_duration(r.seconds)} at {r.tokens_per_second:,.0f} tokens/s)")
    elif watched_s is not None and watched_s > r.seconds + 1:
        timing = (f"- read in {_duration(watched_s)} ({_duration(r.seconds)} of it on the model, at "
                  f"{r.tokens_per_second:,.0f} tokens/s; the rest was waiting for turns)")
    else:
        timing = f"- read in {_duration(watched_s or r.seconds)} ({r.tokens_per_second:,.0f} tokens/s)"
    lines = [f"**{d.title}** · {d.kind} · {n:,} {d.units if n != 1 else d.units.rstrip('s')}",
             f"- **{r.doc_tokens:,} tokens**, all read (nothing truncated); prompt prefix {r.prompt_tokens} tokens",
             timing]
    if b["slots"]:
        split = (f"{cfg.sinks} sinks + {cfg.window:,} window in {cfg.effective_cascades} cascade"
                 f"{'s' if cfg.effective_cascades != 1 else ''} of {sizes_text(cfg.sizes)}")
        lines.append(f"- cache budget: **{b['slots']:,} slots** per layer ({split}), **{b['cache_mb']:.1f} MB**, "
                     f"policy **{b['policy']}**")
        fits = r.doc_tokens + r.prompt_tokens <= b["slots"]
        lines.append(f"- spans about {b['span']:,} tokens: " + (
            "the whole document fits in the cache" if fits else
            "older parts are kept sparsely (each cascade keeps the most-attended token of longer and longer blocks)"
            if b["policy"] == "cascade" else "older parts beyond the window are forgotten"))
    else:
        lines.append(f"- cache: **every token** ({b['cache_mb']:.1f} MB, grows with the document), policy **full**")
    run = session.device_report()
    peaks = " · ".join(f"{name} {mb:,.0f} MB" for name, mb in run["peak_memory_mb"].items())
    lines.append(f"- on **{run['device']}** ({run['dtype']}); peak memory: {peaks}")
    return "\n".join(lines)


def turn_note(others: list[tuple[str, float]]) -> str:
    """What the model is busy with, for a session that shares it: engine.worker takes one step (a read
    chunk or a token) per session in turn, so a waiting session starts within one round of the
    others' steps, and runs at about 1 / (sessions) of its own speed while they work."""
    if not others:
        return ""
    n = len(others)
    doing = sorted({label for label, _ in others if label})
    round_s = sum(step for _, step in others)
    start = f"within about {round_s:.1f} s" if round_s else "after their current step"
    return (f"The model is busy with {n} other reader{'s' if n != 1 else ''} ({', '.join(doing) or 'starting'}); "
            f"you take turns: your next step comes {start}, and your work runs at about 1/{n + 1} speed "
            f"while theirs lasts.")


def sizes_text(sizes: list[int]) -> str:
    """"32" when every cascade has 32 slots, "56-57" when the window does not split evenly."""
    lo, hi = min(sizes), max(sizes)
    return f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"


def settings_note(config, stride: int) -> str:
    if config.slots is None:
        return f"✓ full cache: keeps every token (memory grows with the document) · stride {stride}"
    if config.cascades == "auto":
        return (f"✓ {config.slots:,} slots per layer ({config.sinks} sinks + {config.window:,} window); cascades: "
                f"the fewest whose span covers the document, chosen when it is read · stride {stride}")
    return (f"✓ {config.slots:,} slots per layer ({config.sinks} sinks + {config.window:,} window"
            f"{f', {config.effective_cascades} cascades of {sizes_text(config.sizes)}' if config.policy == 'cascade' else ''}"
            f") · spans about {config.span:,} tokens · stride {stride}")


def citation_messages(citations) -> list[dict]:
    """One collapsible chat message per citation: the label as title, the passage inside."""
    out = []
    for c in citations or []:
        label = c.label or f"token {c.token:,}"
        out.append({"role": "assistant", "content": f"> {c.excerpt}\n\n*document token {c.token:,}*",
                    "metadata": {"title": f"Source: {label} · {100 * c.weight:.0f}% of the answer's attention",
                                 "status": "done"}})
    return out


def recall_messages(answer) -> list[dict]:
    """One collapsible message listing the passages re-read for the answer (or why none were)."""
    dropped = (f"\n\n*{answer.dropped_turns} earlier turn(s) no longer fit the conversation budget and were "
               "left out (the oldest leave first).*" if answer.dropped_turns else "")
    if not answer.recalled:
        note = answer.recall_note or "no passage was recalled"
        return [{"role": "assistant", "content": f"*{note}; the answer comes from the cache's memory alone.*"
                 + dropped, "metadata": {"title": "Recalled passages: none", "status": "done"}}]
    parts = [f"**[{p['label']}]** ({p['token_end'] - p['token_start']} tokens)\n\n> "
             + html.escape(" ".join(p["text"].split()))[:600] for p in answer.recalled]
    labels = ", ".join(p["label"] for p in answer.recalled)
    return [{"role": "assistant", "content": "\n\n".join(parts) + dropped,
             "metadata": {"title": f"Recalled passages: {labels}", "status": "done"}}]


def answer_record(answer, mode: str) -> dict:
    return {"question": answer.question, "answer": answer.text, "mode": mode, "tokens": answer.tokens,
            "seconds": round(answer.seconds, 3), "stopped": answer.stopped,
            "recalled": [{k: p[k] for k in ("label", "token_start", "token_end")} for p in answer.recalled],
            "citations": [{"label": c.label, "excerpt": c.excerpt, "token": c.token, "weight": round(c.weight, 4)}
                          for c in answer.citations]}


def chat_export_markdown(title: str, turns: list[dict], settings: dict) -> str:
    lines = [f"# Conversation about {title}", "",
             f"*Cascade Reader, {time.strftime('%Y-%m-%d %H:%M')} · " +
             ", ".join(f"{k} {v}" for k, v in settings.items()) + "*", ""]
    for t in turns:
        lines += [f"**You** ({'continuing' if t['mode'] == 'continue' else 'new question'}): {t['question']}", "",
                  f"**Cascade Reader**: {t['answer']}" + (" *(stopped)*" if t["stopped"] else ""), ""]
        for c in t["citations"]:
            lines += [f"> **{c['label'] or 'token ' + str(c['token'])}**: {c['excerpt']}", ">"]
        if t["citations"]:
            lines[-1] = ""
    return "\n".join(lines)


def chat_export_json(title: str, turns: list[dict], settings: dict) -> str:
    return json.dumps({"document": title, "settings": settings, "turns": turns}, indent=1, ensure_ascii=False)


SOURCE_CHARS = 3000  # of a section's source text shown when it is expanded


def sections_html(sections: list[dict], current_label: str, current: str, final: str, note: str = "",
                  document=None, planned: int | None = None) -> str:
    """The final summary, then each finished section summary under its label, expandable to its source
    (the section's pages, chapters or cues: the text itself when `document` is given)."""
    parts = []
    if final:
        parts.append(f"<div class='summary-final'><h3>Summary</h3><p>{html.escape(final)}</p></div>")
    if sections or current:
        of = f" of {planned}" if planned else ""
        parts.append(f"<div class='summary-sections-head'>Section summaries ({len(sections)}{of})</div>")
    for s in sections:
        source = ""
        if document is not None:
            text = document.text[s["start_char"]:s["end_char"]].strip()
            more = "…" if len(text) > SOURCE_CHARS else ""
            source = f"<blockquote>{html.escape(text[:SOURCE_CHARS])}{more}</blockquote>"
        cut = " <i>(cut at the length limit)</i>" if s.get("cut") else ""
        # the main names its request gave: who the section is about, whatever the model made of it
        about = f"<div class='names'>about {html.escape(', '.join(s['names']))}</div>" if s.get("names") else ""
        parts.append(f"<div class='section' data-index='{s['index']}'><h4>{html.escape(s['label'])}</h4>{about}"
                     f"<p>{html.escape(s['summary'])}{cut}</p><details class='source'><summary>source: "
                     f"{html.escape(s.get('source') or s['label'])}</summary>{source}</details></div>")
    if current:
        parts.append(f"<div class='section current'><h4>{html.escape(current_label)} <i>(summarizing…)</i></h4>"
                     f"<p>{html.escape(current)}</p></div>")
    if note:
        parts.append(f"<div class='note'>{html.escape(note)}</div>")
    return "<div class='summary'>" + "".join(parts) + "</div>"


def section_summaries(n: int, finished: bool = False) -> str:
    return f"{n} {'finished ' if finished else ''}section summar{'y' if n == 1 else 'ies'}"


def sections_done(sections: int, seconds: float) -> str:
    return f"Done: {section_summaries(sections)} and the summary of the whole document in {_duration(seconds)}."


def summary_progress(status: dict | None, sections_done: int) -> str:
    """Where a section-by-section summary is: "Section 3 of 8 (Chapter 3): summarizing · about 1 min 05 s left"."""
    if status is None:
        return "Starting…"
    if status["phase"] == "final":
        said = f"{section_summaries(sections_done, finished=True).capitalize()}; writing the summary of the whole document"
        if "part" in status:
            said += f": part {status['part'] + 1} of {status['parts']} ({status['label']})"
    else:
        what = "reading" if status["phase"] == "reading" else "summarizing"
        said = f"Section {status['index'] + 1} of {status['of']} ({status['label']}): {what}"
    eta = status.get("eta_seconds")
    left = f"about {_duration(eta)} left" if eta is not None else "time left: known after the first section"
    return f"{said} · {left}"


def plain_summary_html(text: str, note: str = "") -> str:
    body = f"<div class='summary-final'><h3>Summary</h3><p>{html.escape(text)}</p></div>" if text else ""
    return "<div class='summary'>" + body + (f"<div class='note'>{html.escape(note)}</div>" if note else "") + "</div>"


def compare_html(policy: str, state: str, session=None, answer: str = "", citations=(), note: str = "") -> str:
    head = f"<h3>{html.escape(policy)}</h3>"
    facts = ""
    if session is not None and session.read_result is not None:
        b, r = session.budget(), session.read_result
        slots = f"{b['slots']:,} slots/layer" if b["slots"] else "every token"
        facts = (f"<div class='facts'>{slots} · {b['cache_mb']:.1f} MB · read {r.doc_tokens:,} tokens in "
                 f"{_duration(r.seconds)} ({r.tokens_per_second:,.0f} tokens/s)</div>")
    cites = "".join(f"<details><summary>{html.escape(c.label or f'token {c.token}')}</summary>"
                    f"<blockquote>{html.escape(c.excerpt)}</blockquote></details>" for c in citations)
    body = f"<p class='answer'>{html.escape(answer)}</p>" if answer else ""
    return (f"<div class='compare' data-state='{html.escape(state)}'>{head}{facts}"
            f"<div class='note'>{html.escape(note)}</div>{body}{cites}</div>")
