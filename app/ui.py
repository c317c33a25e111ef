"""The Gradio app: upload, read with progress, chat, summarize, retention view, compare, snapshots.

UI code only: every model action goes through the engine's public API (engine.models,
engine.documents, engine.session, engine.summaries). Each browser tab has its own UserState in a
gr.State (its reading session, conversation log and stop flag). Model work is queued one event
at a time across all tabs (concurrency_id "model", limit 1: Gradio shows the queue position);
Cancel/Stop bypass the queue and only set their own tab's flag, which the engine checks before
every chunk (reading) and every token (generation).
"""

from __future__ import annotations

import json
import os
import queue
import re
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import gradio as gr
import numpy as np
import torch

from engine import documents, worker
from engine.cache import CacheConfig
from engine.devices import parse_device
from engine.errors import Cancelled, UserError
from engine.models import PACKAGED, cache_dir, load_model
from engine.session import ReadingSession, retention_of
from engine.summaries import summarize_sections

from . import views

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MODEL_CHOICES = ["smollm2", "gemma3"]
POLICIES = ["cascade", "sink", "full"]
RETENTION_MIN_INTERVAL_S = 1.0  # live retention map while reading: at most once a second ...
RETENTION_MAX_SHARE = 0.04  # ... and never more than ~4% of the reading time
MAX_JUMP_CHOICES = 400
PROGRESS_EVERY_S = 0.1
LIVE_WIDTH = 400  # px of the small live map in the document column
DEVICE: torch.device | None = None  # where models load; None: auto (CUDA when available); see use_device


# ------------------------------------------------------------------ per-tab state and shared models

@dataclass
class UserState:
    """One browser tab: its reading session, conversation log and stop flag."""

    session: ReadingSession | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    turns: list = field(default_factory=list)  # answer records, for export
    retention: dict | None = None

    def __deepcopy__(self, memo):  # gr.State deep-copies its value; a fresh state is already private
        return self


_LIVE: weakref.WeakValueDictionary[str, UserState] = weakref.WeakValueDictionary()
_MODELS: dict[str, object] = {}
_MODELS_LOCK = threading.Lock()


def new_state() -> UserState:
    return UserState()


def cache_retention(cache, prefix_tokens: int) -> dict:
    """engine.session.retention_of for every layer. Hybrid caches (Gemma-3: sliding-window layers hold
    a different number of slots than global ones) cannot be stacked in one call, so their layers are
    taken one at a time and padded with -1 (empty)."""
    try:
        return retention_of(cache, prefix_tokens)
    except RuntimeError:
        per = [retention_of(cache, prefix_tokens, layer=l) for l in range(cache.n_layers)]
        width = max(r["positions"].shape[-1] for r in per)
        pos = np.full((len(per), per[0]["positions"].shape[1], width), -1, dtype=np.int64)
        for l, r in enumerate(per):
            pos[l, :, : r["positions"].shape[-1]] = r["positions"][0]
        return {"positions": pos, "seen": per[0]["seen"], "layers": list(range(len(per)))}


def session_retention(session: ReadingSession) -> dict:
    return cache_retention(session.doc_cache, session.prefix_tokens)


def _register(st: UserState, request: gr.Request | None) -> None:
    key = getattr(request, "session_hash", None)
    if key:
        _LIVE[key] = st


def on_unload(request: gr.Request):
    """The tab closed: stop whatever it was running and drop its session (frees its cache)."""
    st = _LIVE.pop(getattr(request, "session_hash", None) or "", None)
    if st is not None:
        st.stop.set()
        st.session, st.retention = None, None


def _model_key(spec: str) -> str:
    spec = (spec or "smollm2").strip()
    return PACKAGED[spec].name if spec in PACKAGED else spec


def use_device(spec: str | None) -> torch.device:
    """Set the device every model of this app loads on (launch.py --device); refuses a bad one in one line."""
    global DEVICE
    DEVICE = parse_device(spec)
    return DEVICE


def get_model(spec: str):
    """Each model loads once and is shared by every tab; reading caches stay per session."""
    key = _model_key(spec)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = worker.call(load_model, spec.strip() or None, say=lambda s: None, device=DEVICE)
        return _MODELS[key]


def snapshot_dir() -> Path:
    """Saved documents: <user cache>/snapshots (CASCADE_READER_SNAPSHOTS overrides, e.g. for tests)."""
    d = Path(os.environ.get("CASCADE_READER_SNAPSHOTS") or cache_dir() / "snapshots")
    d.mkdir(parents=True, exist_ok=True)
    return d


def snapshot_choices() -> list[tuple[str, str]]:
    out = []
    for p in sorted(snapshot_dir().glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            man = json.loads(p.read_text())
            info = (f"{p.stem} — {man['document']['title']} ({man['read']['doc_tokens']:,} tokens, "
                    f"{man['config']['policy']}, {man['model_id']})")
        except (OSError, KeyError, TypeError, json.JSONDecodeError):
            info = f"{p.stem} (unreadable manifest)"
        out.append((info, p.stem))
    return out


def make_config(policy, window, cascades, sinks) -> CacheConfig:
    def whole(x, name):
        if x is None or x == "":
            raise UserError(f"{name} is empty")
        if float(x) != int(float(x)):
            raise UserError(f"{name} must be a whole number, not {x}")
        return int(float(x))

    auto = str(cascades).strip().lower() == "auto"
    return CacheConfig(policy=policy, window=whole(window, "window"),
                       cascades="auto" if auto else whole(cascades, "cascades"), sinks=whole(sinks, "sinks"))


def check_stride(stride) -> int:
    if stride is None or stride == "" or float(stride) != int(float(stride)) or int(float(stride)) < 1:
        raise UserError(f"stride must be a whole number >= 1, not {stride}")
    return int(float(stride))


def validate_settings(policy, window, cascades, sinks, stride) -> str:
    try:
        return views.settings_note(make_config(policy, window, cascades, sinks), check_stride(stride))
    except UserError as e:
        return f"⚠ {e}"


def _nice_error(e: Exception, path: str | None) -> str:
    msg = str(e)
    if path:
        msg = msg.replace(str(path), Path(path).name)
    return msg


def _upload_path(file) -> str | None:
    if not file:
        return None
    return file if isinstance(file, str) else getattr(file, "name", None) or str(file)


# ------------------------------------------------------------------ reading

def _run_read(session: ReadingSession, document, total: int, stop: threading.Event, live_retention: bool):
    """Read on the model thread (engine.worker); yield ("progress", p) / ("retention", r) / ("done", result) /
    ("cancelled", msg) / ("error", msg) as they happen. Closing this generator stops the reading."""
    events: queue.Queue = queue.Queue()
    timing = {"last": 0.0, "spent": 0.0, "start": time.monotonic()}

    def on_chunk(sess, cache):
        now = time.monotonic()
        interval = max(RETENTION_MIN_INTERVAL_S, timing["spent"] / RETENTION_MAX_SHARE)
        if timing.get("broken") or now - timing["last"] < interval:
            return
        t0 = time.perf_counter()
        try:
            events.put(("retention", cache_retention(cache, sess.prefix_tokens)))
        except Exception:  # noqa: BLE001 - the live map is a nicety; never let it break reading
            timing["broken"] = True
        timing["last"], timing["spent"] = now, time.perf_counter() - t0

    def work():
        try:
            result = session.read(document, progress=lambda p: events.put(("progress", p)),
                                  should_stop=stop.is_set, on_chunk=on_chunk if live_retention else None,
                                  total_tokens=total)
            events.put(("done", result))
        except Cancelled:
            events.put(("cancelled", "cancelled"))
        except UserError as e:
            events.put(("error", str(e)))
        except Exception as e:  # noqa: BLE001 - a bug: show it, keep the app alive
            events.put(("error", f"{type(e).__name__}: {e}"))

    worker.submit(work)  # on the one model thread (engine.worker says why)
    finished = False
    try:
        while True:
            kind, payload = events.get()
            if kind == "retention":
                # rendering happens in the UI thread; count it against the live-map budget too
                t0 = time.perf_counter()
                yield kind, payload
                timing["spent"] += time.perf_counter() - t0
                continue
            yield kind, payload
            if kind in ("done", "cancelled", "error"):
                finished = True
                return
    finally:
        if not finished:  # the client went away: stop the worker within one chunk
            stop.set()


def read_document(st: UserState, file, pasted, model, policy, window, cascades, sinks, stride,
                  request: gr.Request = None):
    """Generator -> (progress, live map, status, facts, layer slider, head slider, position slider, jump)."""
    _register(st, request)
    skip = gr.skip()
    path = _upload_path(file)

    def out(progress=skip, live=skip, status=skip, facts=skip, *rest):
        return (progress, live, status, facts, *(rest or (skip, skip, skip, skip)))

    if st.stop.is_set():
        yield out(views.progress_html(0, None, 0, None, "cancelled"), status="Cancelled before reading started.")
        return
    try:
        config = make_config(policy, window, cascades, sinks)
        stride = check_stride(stride)
        if path:
            document = documents.load_document(path)
        elif pasted and pasted.strip():
            document = documents.document_from_text(pasted, title="pasted text")
        else:
            raise UserError("upload a document or paste some text first")
        yield out(views.progress_html(0, None, 0, None, "loading model"), status="")
        loaded = get_model(model)
        yield out(views.progress_html(0, None, 0, None, "counting tokens"))
        total = documents.count_tokens(document, loaded.tokenizer)
        session = ReadingSession(loaded, config, stride=stride)
    except UserError as e:
        yield out(views.progress_html(0, None, 0, None, "error"), live_map(st), f"⚠ {_nice_error(e, path)}")
        return
    except Exception as e:  # noqa: BLE001 - a corrupt upload must not take the page down
        yield out(views.progress_html(0, None, 0, None, "error"),
                  status=f"⚠ {Path(path).name if path else 'text'}: {type(e).__name__}: {e}")
        return
    yield out(views.progress_html(0, total, 0, None, "reading"),
              views.retention_map_html(None), f"Reading **{document.title}** ({total:,} tokens)…", "")
    done, shown = (0, total, 0.0), 0.0
    for kind, payload in _run_read(session, document, total, st.stop, live_retention=True):
        if kind == "progress":
            pre = session.prefix_tokens
            done = (max(payload.tokens_read - pre, 0), max(payload.tokens_total - pre, 0), payload.tokens_per_second)
            if time.monotonic() - shown >= PROGRESS_EVERY_S:  # fast machines: at most ~10 updates a second
                shown = time.monotonic()
                yield out(views.progress_html(*done, payload.eta_seconds, "reading"))
        elif kind == "retention":
            yield out(live=views.retention_map_html(payload, total=total, width=LIVE_WIDTH, ticks=3))
        elif kind == "done":
            st.session, st.turns = session, []
            st.retention = session_retention(session)
            r = payload
            yield (views.progress_html(r.doc_tokens, r.doc_tokens, r.tokens_per_second, None, "done",
                                       f"{views._duration(r.seconds)}"),
                   live_map(st), "✓ Read. Ask a question in the **Chat** tab.", views.facts_markdown(session),
                   *_retention_controls(st))
            return
        elif kind == "cancelled":
            # keep the partial map when nothing else is loaded; otherwise show the loaded document's again
            yield out(views.progress_html(done[0], done[1], done[2], None, "cancelled"),
                      live_map(st) if st.session else skip,
                      status=f"Cancelled after {done[0]:,} of {done[1]:,} tokens."
                             + (" The previous document is still loaded." if st.session else ""))
            return
        else:
            yield out(views.progress_html(*done, None, "error"), live_map(st),
                      status=f"⚠ {_nice_error(payload, path)}")
            return


def live_map(st: UserState) -> str:
    if st.session is None or st.retention is None:
        return views.retention_map_html(None)
    return views.retention_map_html(st.retention, tick_labels=_tick_labels(st, 3), width=LIVE_WIDTH, ticks=3,
                                    recalled=_recalled(st))


def _recalled(st: UserState) -> list[tuple[int, int]]:
    """Token ranges of the passages re-read for the last answer (marked on the retention maps)."""
    answers = st.session.answers if st.session is not None else []
    return [(p["token_start"], p["token_end"]) for p in answers[-1].recalled] if answers else []


def _tick_labels(st: UserState, ticks: int = 5) -> list[str]:
    sm, n = st.session.source_map, st.session.read_result.doc_tokens
    if sm is None or not len(sm) or not n:
        return []
    tokens = np.minimum(np.round(np.linspace(0, n, ticks)).astype(np.int64), len(sm) - 1)
    return sm.labels_for(tokens)


def _jump_choices(st: UserState) -> list[tuple[str, int]]:
    sm = st.session.source_map
    starts = np.asarray(st.session.document.segment_starts(), dtype=np.int64)
    offsets = sm.offsets
    if not len(offsets):
        return []
    first_tokens = np.searchsorted(offsets, starts, side="left")
    segs = st.session.document.segments
    keep = range(len(segs)) if len(segs) <= MAX_JUMP_CHOICES else np.linspace(0, len(segs) - 1, MAX_JUMP_CHOICES).astype(int)
    return [(f"{segs[k].label or f'part {k + 1}'} (token {int(first_tokens[k]):,})", int(min(first_tokens[k], len(offsets) - 1)))
            for k in keep]


def _retention_controls(st: UserState):
    r = st.retention
    layers, heads = r["positions"].shape[0], r["positions"].shape[1]
    n = st.session.read_result.doc_tokens
    return (gr.update(maximum=layers - 1, value=0), gr.update(maximum=heads - 1, value=0),
            gr.update(maximum=max(n - 1, 1), value=max(n - 1500, 0)),
            gr.update(choices=_jump_choices(st), value=None))


def stop(st: UserState):
    st.stop.set()


def arm(st: UserState):
    """Runs at click time (not queued): a Cancel/Stop clicked after this, even while the model work
    still waits in the queue, stops it."""
    st.stop.clear()


# ------------------------------------------------------------------ chat

def ask(st: UserState, message, history, mode, max_new_tokens, temperature, request: gr.Request = None):
    """Generator -> (chat history, question box)."""
    _register(st, request)
    history = list(history or [])
    message = (message or "").strip()
    if not message:
        yield history, gr.skip()
        return
    if st.session is None:
        history += [{"role": "user", "content": message},
                    {"role": "assistant", "content": "⚠ Read a document first (Document panel on the left)."}]
        yield history, ""
        return
    history += [{"role": "user", "content": message}, {"role": "assistant", "content": "…"}]
    yield history, ""
    text = ""
    try:
        for delta in worker.iterate(lambda: st.session.ask(
                message, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                continue_conversation=(mode == "continue"), should_stop=st.stop.is_set)):
            text += delta
            history[-1] = {"role": "assistant", "content": text}
            yield history, gr.skip()
    except UserError as e:
        history[-1] = {"role": "assistant", "content": f"⚠ {e}"}
        yield history, gr.skip()
        return
    answer = st.session.answers[-1]
    content = answer.text or "(no answer)"
    if answer.stopped:
        content += "\n\n*(stopped)*"
    history[-1] = {"role": "assistant", "content": content}
    history += views.recall_messages(answer)
    history += views.citation_messages(answer.citations)
    st.turns.append(views.answer_record(answer, mode))
    yield history, gr.skip()


def clear_chat(st: UserState):
    st.turns = []
    if st.session is not None:
        st.session.reset_conversation()  # "continue" starts again from the document
    return []


def export_chat(st: UserState):
    if not st.turns:
        return gr.update(value=None, visible=False), "⚠ Nothing to export yet."
    s = st.session
    title = s.document.title if s and s.document else "a document"
    settings = {"model": s.loaded.model_id, **s.config.to_dict(), "stride": s.stride} if s else {}
    folder = Path(tempfile.mkdtemp(prefix="cascade-chat-"))
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(title).stem)[:40] or "chat"
    md, js = folder / f"chat-{stem}.md", folder / f"chat-{stem}.json"
    md.write_text(views.chat_export_markdown(title, st.turns, settings))
    js.write_text(views.chat_export_json(title, st.turns, settings))
    return gr.update(value=[str(md), str(js)], visible=True), f"Exported {len(st.turns)} turn(s)."


# ------------------------------------------------------------------ summaries

def summarize(st: UserState, mode, max_new_tokens, request: gr.Request = None):
    _register(st, request)
    if st.session is None or st.session.document is None:
        yield views.plain_summary_html("", "⚠ Read a document first.")
        return
    if mode == "cache":
        text = ""
        yield views.plain_summary_html("", "Summarizing from the cache…")
        for delta in worker.iterate(lambda: st.session.summarize(max_new_tokens=int(max_new_tokens),
                                                                 should_stop=st.stop.is_set)):
            text += delta
            yield views.plain_summary_html(text, "Summarizing from the cache…")
        answer = st.session.answers[-1]
        yield views.plain_summary_html(answer.text, "(stopped)" if answer.stopped else
                                       f"From the cache after reading: {answer.tokens} tokens in "
                                       f"{answer.seconds:.1f} s.")
        return
    sections, current, label, final = [], "", "", ""
    progress = {"p": None}

    def note():
        p = progress["p"]
        return f"Re-reading section by section: {p.tokens_read:,} / {p.tokens_total:,} tokens" if p else "Starting…"

    yield views.sections_html([], "", "", "", note())
    try:
        for ev in worker.iterate(lambda: summarize_sections(
                st.session, st.session.document, final_tokens=int(max_new_tokens),
                max_new_tokens=min(160, int(max_new_tokens)),
                should_stop=st.stop.is_set, progress=lambda p: progress.update(p=p))):
            kind = ev.get("type")
            if kind == "section_delta":
                current += ev["text"]
                label = ev.get("label", label)
            elif kind == "section":
                sections.append(ev)
                current = ""
            elif kind == "delta":
                final += ev["text"]
            elif kind == "done":
                final = ev.get("summary", final)
                st.retention = session_retention(st.session)  # the session now holds the re-read document
                yield views.sections_html(sections, "", "", final, f"Done: {len(sections)} section"
                                          f"{'s' if len(sections) != 1 else ''}.")
                break
            else:
                continue
            yield views.sections_html(sections, label, current, final, note())
    except Cancelled:
        yield views.sections_html(sections, label, current, final, "Stopped.")
    except UserError as e:
        yield views.sections_html(sections, label, current, final, f"⚠ {e}")


# ------------------------------------------------------------------ retention view

def retention_view(st: UserState, rows, layer, head, position, count):
    """-> (map, occupancy table, legend + highlighted text)."""
    if st.session is None or st.retention is None:
        return views.retention_map_html(None), [], "<i>Read a document first.</i>"
    r = st.retention
    pos = r["positions"]
    layer = int(min(max(int(layer or 0), 0), pos.shape[0] - 1))
    head = int(min(max(int(head or 0), 0), pos.shape[1] - 1))
    rows = "cascade" if rows == "cascades of one layer" else "layer"
    img = views.retention_map_html(r, rows, layer, tick_labels=_tick_labels(st), recalled=_recalled(st))
    cfg = st.session.config
    table = views.occupancy_table(r, layer, cfg.cascade_slots if cfg.slots else 0, cfg.sinks)
    sm = st.session.source_map
    offsets = sm.offsets
    count = int(count or 1500)
    start = int(min(max(int(position or 0), 0), max(len(offsets) - 1, 0)))
    slot_pos = pos[layer, head]
    keep = slot_pos >= 0
    parts = r.get("cascade")
    text = views.highlighted_text(sm.text, offsets, slot_pos[keep], parts[keep] if parts is not None else None,
                                  start, count)
    end = min(len(offsets), start + count)
    where = sm.labels_for([start, max(end - 1, start)]) if len(offsets) else ["", ""]
    in_view = int(((slot_pos >= start) & (slot_pos < end)).sum())
    head_txt = (f"<div class='where'>layer {layer}, KV head {head}: tokens {start:,}–{end - 1:,} of "
                f"{len(offsets):,} ({where[0]}{' – ' + where[1] if where[1] != where[0] else ''}) · "
                f"{in_view:,} of them held</div>")
    if cfg.policy == "sink":
        table = [["window" if row[0] == "cascade 0" else row[0], *row[1:]] for row in table]
    legend = views.legend_html(None if parts is None else int(parts.max()) + 1, cfg.policy)
    return img, table, head_txt + legend + text


def jump_to(value):
    return gr.update(value=int(value)) if value is not None else gr.skip()


# ------------------------------------------------------------------ compare policies

def compare(st: UserState, policy_a, policy_b, question, model, window, cascades, sinks, stride, max_new_tokens,
            temperature, request: gr.Request = None):
    _register(st, request)
    if st.session is None:
        yield views.compare_html(policy_a, "error", note="⚠ Read a document first."), ""
        return
    question = (question or "").strip() or "What is this document about?"
    document = st.session.document
    outs = [views.compare_html(p, "waiting", note="waiting…") for p in (policy_a, policy_b)]
    yield tuple(outs)
    for k, policy in enumerate((policy_a, policy_b)):
        try:
            config = make_config(policy, window, cascades, sinks)
            loaded = get_model(model)
            session = ReadingSession(loaded, config, stride=check_stride(stride))
            total = documents.count_tokens(document, loaded.tokenizer)
        except UserError as e:
            outs[k] = views.compare_html(policy, "error", note=f"⚠ {e}")
            yield tuple(outs)
            continue
        for kind, payload in _run_read(session, document, total, st.stop, live_retention=False):
            if kind == "progress":
                pct = 100 * payload.tokens_read / max(payload.tokens_total, 1)
                outs[k] = views.compare_html(policy, "reading", note=f"reading… {pct:.0f}% "
                                             f"({payload.tokens_per_second:,.0f} tokens/s)")
                yield tuple(outs)
            elif kind in ("cancelled", "error"):
                outs[k] = views.compare_html(policy, kind, note="Cancelled." if kind == "cancelled" else f"⚠ {payload}")
                yield tuple(outs)
                return
        text = ""
        for delta in worker.iterate(lambda: session.ask(question, max_new_tokens=int(max_new_tokens),
                                                        temperature=float(temperature), should_stop=st.stop.is_set)):
            text += delta
            outs[k] = views.compare_html(policy, "answering", session, text, note="answering…")
            yield tuple(outs)
        a = session.answers[-1]
        outs[k] = views.compare_html(policy, "done", session, a.text or "(no answer)", a.citations,
                                     note=f"{a.tokens} tokens in {a.seconds:.1f} s" + (" (stopped)" if a.stopped else ""))
        yield tuple(outs)
        if st.stop.is_set():
            return


# ------------------------------------------------------------------ snapshots

def save_snapshot(st: UserState, name):
    if st.session is None:
        return "⚠ Read a document first.", gr.update(choices=snapshot_choices())
    raw = name or Path(st.session.document.title).stem
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", raw.strip())[:60].strip("_") or "document"
    try:
        st.session.save(snapshot_dir() / name)
    except (UserError, OSError) as e:
        return f"⚠ Could not save: {e}", gr.skip()
    return f"✓ Saved **{name}** in `{snapshot_dir()}`.", gr.update(choices=snapshot_choices(), value=name)


def load_snapshot(st: UserState, name, request: gr.Request = None):
    """-> (status, facts, live map, model, policy, window, cascades, sinks, stride, chat, 4 retention controls)."""
    _register(st, request)
    n_out = 14
    if not name:
        return ("⚠ Pick a snapshot.",) + (gr.skip(),) * (n_out - 1)
    try:
        manifest = json.loads((snapshot_dir() / f"{name}.json").read_text())
        config = CacheConfig(**manifest["config"])
        spec = manifest["model_id"]
        spec = next((k for k, pm in PACKAGED.items() if pm.name == spec and k != spec), spec)
        session = ReadingSession(get_model(spec), config, stride=int(manifest["stride"]), prompt=manifest["prompt"])
        worker.call(session.load, snapshot_dir() / name)
    except UserError as e:
        return (f"⚠ Could not load {name}: {e}",) + (gr.skip(),) * (n_out - 1)
    except (OSError, KeyError, TypeError, ValueError) as e:
        return (f"⚠ Could not load {name}: {type(e).__name__}: {e}",) + (gr.skip(),) * (n_out - 1)
    st.session, st.turns = session, []
    st.retention = session_retention(session)
    return (f"✓ Loaded **{name}**: ask away (settings below now match the snapshot).", views.facts_markdown(session),
            live_map(st), spec, config.policy, config.window, str(config.cascades), config.sinks, session.stride, [],
            *_retention_controls(st))


def delete_snapshot(name):
    if not name:
        return "⚠ Pick a snapshot.", gr.skip()
    for ext in (".json", ".safetensors", ".index.sqlite"):
        (snapshot_dir() / f"{name}{ext}").unlink(missing_ok=True)
    return f"Deleted **{name}**.", gr.update(choices=snapshot_choices(), value=None)


# ------------------------------------------------------------------ layout

def _header() -> str:
    icon = (ASSETS / "icon.svg").read_text() if (ASSETS / "icon.svg").exists() else ""
    return (f"<div class='header'><div class='logo'>{icon}</div><div><h1>Cascade Reader</h1>"
            "<p>Chat with a whole book on a fixed memory budget: a cascading KV cache keeps the passages the "
            "model attends to and forgets the rest, so memory never grows.</p></div></div>")


def css() -> str:
    p = ASSETS / "style.css"
    return p.read_text() if p.exists() else ""


def build_app(default_model: str = "smollm2") -> gr.Blocks:
    d = CacheConfig()
    with gr.Blocks(title="Cascade Reader") as demo:
        st = gr.State(new_state, delete_callback=lambda s: s.stop.set())
        gr.HTML(_header())
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=340):
                gr.Markdown("### Document")
                file = gr.File(label="PDF, EPUB, TXT, MD, SRT or VTT", file_types=list(documents.SUPPORTED),
                               type="filepath", elem_id="upload", height=120)
                pasted = gr.Textbox(label="…or paste text", lines=3, max_lines=8, elem_id="pasted")
                with gr.Accordion("Settings", open=False, elem_id="settings"):
                    model = gr.Dropdown(MODEL_CHOICES if default_model in MODEL_CHOICES else [default_model, *MODEL_CHOICES],
                                        value=default_model, label="model", allow_custom_value=True,
                                        info="smollm2, gemma3, a model folder, a .gguf file or a hub id",
                                        elem_id="model")
                    policy = gr.Radio(POLICIES, value=d.policy, label="cache policy", elem_id="policy",
                                      info="cascade: sparse long memory · sink: sinks + recent window · full: keep all")
                    with gr.Row():
                        window = gr.Number(d.window, label="window (slots)", precision=0, elem_id="window")
                        cascades = gr.Textbox("auto", label="cascades (a number, or auto)", max_lines=1,
                                              elem_id="cascades",
                                              info="auto: the fewest whose span covers the document")
                    with gr.Row():
                        sinks = gr.Number(d.sinks, label="sinks", precision=0, elem_id="sinks")
                        stride = gr.Number(512, label="stride (tokens per chunk)", precision=0, elem_id="stride")
                    settings_msg = gr.Markdown(views.settings_note(replace(d, cascades="auto"), 512),
                                               elem_id="settings-msg")
                    gr.Markdown(f"device: **{DEVICE or parse_device('auto')}** (start with `launch.py --device "
                                "cpu|cuda[:N]` to change it)", elem_id="device")
                    with gr.Row():
                        max_new = gr.Slider(8, 1024, value=256, step=8, label="answer tokens",
                                            elem_id="max-new")
                        temperature = gr.Slider(0, 1.5, value=0.0, step=0.05, label="temperature",
                                                elem_id="temperature")
                with gr.Row():
                    read_btn = gr.Button("Read", variant="primary", elem_id="read")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
                progress = gr.HTML(views.progress_html(0, None, 0, None, "idle"), elem_id="progress", container=True,
                                   padding=True, min_height=64)
                status = gr.Markdown("", elem_id="status")
                live = gr.HTML(views.retention_map_html(None), elem_id="live-map")
                facts = gr.Markdown("", elem_id="facts")
            with gr.Column(scale=3, min_width=480), gr.Tabs():
                with gr.Tab("Chat", id="chat-tab"):
                    chat = gr.Chatbot(height=460, elem_id="chat", label="Conversation", feedback_options=None,
                                      buttons=["copy"], placeholder="Read a document, then ask about it.")
                    mode = gr.Radio([("New question from the document", "new"),
                                     ("Continue the conversation", "continue")], value="new",
                                    label="Each question", elem_id="mode",
                                    info="new: answered from the passages it recalls and the document's memory · "
                                         "continue: follows on from the previous answer")
                    with gr.Row():
                        question = gr.Textbox(placeholder="Ask about the document…", show_label=False, scale=5,
                                              elem_id="question", submit_btn=False)
                        ask_btn = gr.Button("Ask", variant="primary", scale=1, elem_id="ask", min_width=80)
                        stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="stop", min_width=80)
                    with gr.Row():
                        clear_btn = gr.Button("Clear chat", size="sm", elem_id="clear")
                        export_btn = gr.Button("Export chat (Markdown + JSON)", size="sm", elem_id="export")
                    export_msg = gr.Markdown(elem_id="export-msg")
                    export_files = gr.File(label="download", file_count="multiple", interactive=False,
                                           elem_id="export-files", visible=False)
                with gr.Tab("Summary", id="summary-tab"):
                    sum_mode = gr.Radio([("From the cache (fast, after reading)", "cache"),
                                         ("Section by section (re-reads the document)", "sections")],
                                        value="cache", label="mode", elem_id="sum-mode")
                    with gr.Row():
                        sum_btn = gr.Button("Summarize", variant="primary", elem_id="summarize")
                        sum_stop = gr.Button("Stop", variant="stop", elem_id="sum-stop")
                    summary = gr.HTML(elem_id="summary")
                with gr.Tab("Retention", id="retention-tab"):
                    retention = gr.HTML(views.retention_map_html(None), elem_id="retention-map")
                    with gr.Row():
                        rows = gr.Radio(["layers", "cascades of one layer"], value="layers", label="map rows",
                                        elem_id="rows")
                        layer = gr.Slider(0, 29, value=0, step=1, label="layer", elem_id="layer")
                        head = gr.Slider(0, 2, value=0, step=1, label="KV head", elem_id="head")
                    occupancy = gr.Dataframe(headers=["part", "slots filled", "oldest token", "newest token",
                                                      "span (tokens)", "density"],
                                             label="occupancy of this layer (max over KV heads)",
                                             interactive=False, elem_id="occupancy")
                    with gr.Row():
                        jump = gr.Dropdown([], label="jump to page / chapter / cue", elem_id="jump",
                                           allow_custom_value=False)
                        position = gr.Slider(0, 1, value=0, step=1, label="first token shown",
                                             elem_id="position")
                        count = gr.Slider(200, 4000, value=1500, step=100, label="tokens shown",
                                          elem_id="count")
                    refresh = gr.Button("Refresh view", size="sm", elem_id="retention-refresh")
                    held_text = gr.HTML(elem_id="retained-text")
                with gr.Tab("Compare", id="compare-tab"):
                    gr.Markdown("Read the current document again with two policies (same window, cascades, "
                                "sinks and stride) and answer the same question with each.")
                    with gr.Row():
                        pol_a = gr.Dropdown(POLICIES, value="cascade", label="policy A", elem_id="pol-a")
                        pol_b = gr.Dropdown(POLICIES, value="sink", label="policy B", elem_id="pol-b")
                    cmp_q = gr.Textbox(label="question", elem_id="compare-question")
                    with gr.Row():
                        cmp_btn = gr.Button("Read with both and answer", variant="primary", elem_id="compare")
                        cmp_stop = gr.Button("Stop", variant="stop", elem_id="compare-stop")
                    with gr.Row(equal_height=False):
                        out_a = gr.HTML(elem_id="compare-a")
                        out_b = gr.HTML(elem_id="compare-b")
                with gr.Tab("Snapshots", id="snapshots-tab"):
                    gr.Markdown("Save the read document (its cache and source map) and load it later without "
                                "reading again. Snapshots live in the user cache folder.")
                    with gr.Row():
                        snap_name = gr.Textbox(label="name", placeholder="defaults to the document's name",
                                               elem_id="snap-name", scale=3)
                        save_btn = gr.Button("Save snapshot", elem_id="snap-save", scale=1)
                    snaps = gr.Dropdown(snapshot_choices(), label="saved documents", value=None,
                                        elem_id="snaps")
                    with gr.Row():
                        load_btn = gr.Button("Load", variant="primary", elem_id="snap-load")
                        list_btn = gr.Button("Refresh list", elem_id="snap-refresh")
                        del_btn = gr.Button("Delete", variant="stop", elem_id="snap-delete")
                    snap_status = gr.Markdown(elem_id="snap-status")

        model_work = {"concurrency_limit": 1, "concurrency_id": "model"}
        instant = {"queue": False, "show_progress": "hidden"}
        controls = [layer, head, position, jump]
        view_inputs = [st, rows, layer, head, position, count]
        view_outputs = [retention, occupancy, held_text]

        gr.on([c.change for c in (policy, window, cascades, sinks, stride)], validate_settings,
              [policy, window, cascades, sinks, stride], [settings_msg], trigger_mode="always_last",
              concurrency_limit=1, concurrency_id="settings", show_progress="hidden")
        read_evt = read_btn.click(arm, [st], None, **instant).then(
            read_document, [st, file, pasted, model, policy, window, cascades, sinks, stride],
            [progress, live, status, facts, *controls], show_progress="full", show_progress_on=[progress],
            **model_work)
        read_evt.then(retention_view, view_inputs, view_outputs, show_progress="hidden", queue=False)
        for b in (cancel_btn, stop_btn, sum_stop, cmp_stop):
            b.click(stop, [st], None, **instant)

        ask_args = dict(fn=ask, inputs=[st, question, chat, mode, max_new, temperature], outputs=[chat, question],
                        show_progress="minimal", **model_work)
        for trigger in (ask_btn.click, question.submit):  # then mark the recalled passages on both maps
            trigger(arm, [st], None, **instant).then(**ask_args).then(live_map, [st], [live], queue=False).then(
                retention_view, view_inputs, view_outputs, queue=False)
        clear_btn.click(clear_chat, [st], [chat], **instant)
        chat.clear(clear_chat, [st], [chat], **instant)
        export_btn.click(export_chat, [st], [export_files, export_msg], queue=False)

        sum_btn.click(arm, [st], None, **instant).then(summarize, [st, sum_mode, max_new], [summary], show_progress="minimal", **model_work)

        refresh.click(retention_view, view_inputs, view_outputs, queue=False)
        for c in (rows,):
            c.change(retention_view, view_inputs, view_outputs, **instant)
        for c in (layer, head, position, count):
            c.release(retention_view, view_inputs, view_outputs, **instant)
        jump.change(jump_to, [jump], [position], **instant).then(retention_view, view_inputs, view_outputs, **instant)

        cmp_btn.click(arm, [st], None, **instant).then(compare, [st, pol_a, pol_b, cmp_q, model, window, cascades, sinks, stride, max_new, temperature],
                      [out_a, out_b], show_progress="minimal", **model_work)

        snapshot_work = {"concurrency_limit": 1, "concurrency_id": "snapshots"}  # own files only: no model queue
        save_btn.click(save_snapshot, [st, snap_name], [snap_status, snaps], **snapshot_work)
        list_btn.click(lambda: gr.update(choices=snapshot_choices()), None, [snaps], **instant)
        del_btn.click(delete_snapshot, [snaps], [snap_status, snaps], **instant)
        load_btn.click(load_snapshot, [st, snaps],
                       [snap_status, facts, live, model, policy, window, cascades, sinks, stride, chat, *controls],
                       **snapshot_work).then(retention_view, view_inputs, view_outputs, queue=False)
        demo.unload(on_unload)
    return demo
