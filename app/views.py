"""Pure rendering: engine results -> HTML, Markdown and images for the UI. No model logic here."""

from __future__ import annotations

import html

import numpy as np
from PIL import Image

# a small sequential colour map (light -> deep blue), index 0 = nothing held
_RAMP = np.array([[246, 247, 251], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]], dtype=np.float32)


def _colour(values: np.ndarray) -> np.ndarray:
    """values in [0, 1] -> RGB uint8, 0 mapped to the background colour."""
    x = np.clip(values, 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, len(_RAMP) - 1)
    frac = (x - lo)[..., None]
    rgb = _RAMP[lo] * (1 - frac) + _RAMP[hi] * frac
    rgb[values <= 0] = _RAMP[0]
    return rgb.astype(np.uint8)


def retention_image(retention: dict, rows: str = "layer", layer: int = 0, bins: int = 240,
                    width: int = 960, row_height: int = 8) -> Image.Image:
    """Map over the document: x = position in the document, y = layer (or cascade of one layer).

    A cell's colour is the share of that stretch of document tokens that the cache still holds.
    """
    pos = retention["positions"]  # [layers, kv_heads, slots], -1 empty
    seen = max(int(retention["seen"]), 1)
    bins = min(bins, seen)  # short documents: one column per token
    edges = np.linspace(0, seen, bins + 1)
    width_tokens = np.maximum(np.diff(edges), 1)
    if rows == "cascade":
        cascade = retention.get("cascade")
        p = pos[min(layer, len(pos) - 1)]
        labels = sorted(set(cascade.tolist())) if cascade is not None else [0]
        grid = []
        for c in labels:
            held = p[:, cascade == c] if cascade is not None else p
            held = np.unique(held[held >= 0])
            grid.append(np.histogram(held, bins=edges)[0] / width_tokens)
    else:
        grid = []
        for p in pos:
            held = np.unique(p[p >= 0])  # a token counts once even if several heads hold it
            grid.append(np.histogram(held, bins=edges)[0] / width_tokens)
    grid = np.asarray(grid)
    img = _colour(np.sqrt(grid))  # sqrt: sparse old cascades stay visible
    img = np.repeat(np.repeat(img, row_height, axis=0), max(1, width // bins), axis=1)
    return Image.fromarray(img)


def occupancy_table(retention: dict, layer: int, cascade_slots: int, sinks: int) -> list[list]:
    """Rows: part, slots filled, oldest and newest document token held, span covered."""
    p = retention["positions"][min(layer, len(retention["positions"]) - 1)]
    cascade = retention.get("cascade")
    rows = []
    parts = [(-1, "sinks", sinks)] + [(c, f"cascade {c}", cascade_slots) for c in range(int(cascade.max()) + 1)] \
        if cascade is not None else [(None, "all", p.shape[-1])]
    for c, name, cap in parts:
        held = p[:, cascade == c] if c is not None else p
        filled = int((held >= 0).sum(axis=-1).max()) if held.size else 0
        valid = held[held >= 0]
        if valid.size:
            rows.append([name, f"{filled}/{cap}", int(valid.min()), int(valid.max()), int(valid.max() - valid.min() + 1)])
        else:
            rows.append([name, f"{filled}/{cap}", "-", "-", "-"])
    return rows


def highlighted_text(text: str, offsets: np.ndarray, held: set[int], start: int, count: int) -> str:
    """Document tokens [start, start + count) as HTML; tokens the cache holds are highlighted."""
    n = len(offsets)
    start = max(0, min(start, max(n - 1, 0)))
    end = min(n, start + count)
    out = []
    for t in range(start, end):
        a = int(offsets[t])
        b = int(offsets[t + 1]) if t + 1 < n else len(text)
        if a < 0:
            continue
        piece = html.escape(text[a:max(a, b)])
        out.append(f"<mark>{piece}</mark>" if t in held else piece)
    body = "".join(out).replace("\n", "<br>")
    return f"<div class='retained-text'>{body}</div>"


def progress_html(tokens: int, total: int | None, tps: float, eta: float | None, state: str = "reading") -> str:
    pct = 100.0 * tokens / total if total else 0.0
    eta_txt = "" if eta is None else f" · ETA {eta:,.0f} s"
    total_txt = f"{total:,}" if total else "?"
    return (f"<div class='read-progress' data-state='{state}'>"
            f"<div class='bar'><div class='fill' style='width:{pct:.1f}%'></div></div>"
            f"<div class='label'>{html.escape(state)}: {tokens:,} / {total_txt} tokens · {tps:,.0f} tok/s{eta_txt}</div>"
            "</div>")


def citations_markdown(citations) -> str:
    if not citations:
        return ""
    items = []
    for c in citations:
        label = c.label or f"token {c.token}"
        items.append(f"<details><summary>{html.escape(label)} ({100 * c.weight:.0f}%)</summary>"
                     f"<blockquote>{html.escape(c.excerpt)}</blockquote></details>")
    return "\n\n**Sources**\n\n" + "\n".join(items)


def chat_export(title: str, history: list[dict]) -> str:
    lines = [f"# Conversation about {title}", ""]
    for m in history:
        who = "**You**" if m["role"] == "user" else "**Cascade Reader**"
        lines += [f"{who}:", "", str(m["content"]), ""]
    return "\n".join(lines)
