"""The Gradio app: upload, read with progress, chat, summarize, retention view, compare, snapshots.

UI code only: every model action goes through the engine's public API (engine.models,
engine.documents, engine.session, engine.summaries). Each browser session has its own UserState
(app.sessions: its reading session, chat, snapshots and stop flag), found again after a reload
through a random id the browser keeps (gr.BrowserState). Model work of all sessions runs on the
one model thread in fair turns (engine.worker: a read chunk or a token per turn, round-robin over
sessions), so Gradio lets several sessions' model events run at once and each session runs one of
its own at a time; Cancel/Stop bypass the queue and only set their own session's flag, which the
engine checks before every chunk (reading) and every token (generation).
"""

from __future__ import annotations

import inspect
import json
import queue
import re
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import gradio as gr
import numpy as np
import torch

from engine import documents, worker
from engine.cache import CacheConfig
from engine.devices import parse_device
from engine.errors import Cancelled, UserError
from engine.models import PACKAGED, load_model
from engine.runtime import device_stride
from engine.session import ReadingSession, retention_of
from engine.summaries import SECTION_TOKENS, summarize_sections

from . import sessions, views
from .sessions import UserState

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MODEL_CHOICES = ["smollm2", "gemma3"]
POLICIES = ["cascade", "sink", "full"]
RETENTION_MIN_INTERVAL_S = 1.0  # live retention map while reading: at most once a second ...
RETENTION_MAX_SHARE = 0.04  # ... and never more than ~4% of the reading time
MAX_JUMP_CHOICES = 400
PROGRESS_EVERY_S = 0.1
WAIT_POLL_S = 0.5  # how often a waiting handler re-says why it waits
LIVE_WIDTH = 400  # px of the small live map in the document column
DEVICE: torch.device | None = None  # where models load; None: auto (CUDA when available); see use_device


# ------------------------------------------------------------------ shared models

_MODELS: dict[str, object] = {}
_MODELS_LOCK = threading.Lock()


def new_state() -> UserState:
    return sessions.create()


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


def _one_job_at_a_time(st: UserState, say, work):
    """Run the generator work() as this session's model job: refused in words when too many sessions
    are busy (sessions.busy_message), and started only after the session's previous job is done (a
    question asked during a read waits for it and is answered from the new document). Meanwhile
    say(text, refused) gives the handler's output that tells the person why they wait."""
    busy = sessions.busy_message(st)
    if busy:
        yield say(f"⚠ {busy}", True)
        return
    while not st.own_work.acquire(timeout=WAIT_POLL_S):
        yield say(_waiting_words(st), False)
    st.touch()
    try:
        yield from work()
    finally:
        st.touch()  # idle time counts from the end of the job: a read longer than the timeout is not freed at once
        st.own_work.release()


def _waiting_words(st: UserState) -> str:
    """Why this session's work has not started, in words, with an estimate from the others' steps."""
    if st.own_work.locked() and not worker.busy_owners() - {st.sid, None}:
        return "Waiting for your previous request to finish…"
    return views.turn_note(st.lane("").others())


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

def _run_read(session: ReadingSession, document, total: int, stop: threading.Event, lane: worker.Lane,
              live_retention: bool):
    """Read on the model thread (engine.worker, in this session's lane); yield ("progress", p) /
    ("retention", r) / ("waiting", None) every WAIT_POLL_S without news / ("done", result) /
    ("cancelled", msg) / ("error", msg) as they happen. Closing this generator early stops the reading."""
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

    lane.submit(work)  # on the one model thread (engine.worker says why)
    finished = False
    try:
        while True:
            try:
                kind, payload = events.get(timeout=WAIT_POLL_S)
            except queue.Empty:
                kind, payload = "waiting", None
            # set before the last yield: the consumer returns on it without resuming this generator,
            # and a stop set in `finally` then would stop the session's next job (a question asked
            # during the read came back "(no answer) (stopped)")
            finished = kind in ("done", "cancelled", "error")
            if kind == "retention":
                # rendering happens in the UI thread; count it against the live-map budget too
                t0 = time.perf_counter()
                yield kind, payload
                timing["spent"] += time.perf_counter() - t0
                continue
            yield kind, payload
            if finished:
                return
    finally:
        if not finished:  # the client went away: stop the worker within one chunk
            stop.set()


def read_document(st: UserState, file, pasted, model, policy, window, cascades, sinks, stride):
    """Generator -> (progress, live map, status, facts, layer slider, head slider, position slider, jump)."""
    skip = gr.skip()
    path = _upload_path(file)
    clicked = time.monotonic()

    def out(progress=skip, live=skip, status=skip, facts=skip, *rest):
        return (progress, live, status, facts, *(rest or (skip, skip, skip, skip)))

    yield from _one_job_at_a_time(
        st, lambda text, refused: out(views.progress_html(0, None, 0, None, "not started" if refused else "waiting"),
                                      status=text),
        lambda: _read(st, path, pasted, model, policy, window, cascades, sinks, stride, clicked, out))


def _read(st: UserState, path, pasted, model, policy, window, cascades, sinks, stride, clicked, out):
    skip = gr.skip()
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
        yield out(views.progress_html(0, None, 0, None, "error"), live_map(st), f"⚠ {_nice_error(e, path)}",
                  _facts(st))
        return
    except Exception as e:  # noqa: BLE001 - a corrupt upload must not take the page down
        yield out(views.progress_html(0, None, 0, None, "error"),
                  status=f"⚠ {Path(path).name if path else 'text'}: {type(e).__name__}: {e}", facts=_facts(st))
        return
    reading = f"Reading **{document.title}** ({total:,} tokens)…"
    yield out(views.progress_html(0, total, 0, None, "reading"), views.retention_map_html(None), reading, "")
    done, shown, said = (0, total, 0.0), 0.0, reading
    lane = st.lane("reading a document")
    for kind, payload in _run_read(session, document, total, st.stop, lane, live_retention=True):
        if kind in ("progress", "waiting"):
            others = lane.others()
            # sharing the model: say so; the ETA is from wall-clock speed, so it already counts the turns
            note = reading + (" " + views.turn_note(others) if others else "")
            if kind == "progress":
                pre = session.prefix_tokens
                done = (max(payload.tokens_read - pre, 0), max(payload.tokens_total - pre, 0),
                        payload.tokens_per_second)
            if time.monotonic() - shown >= PROGRESS_EVERY_S or note != said:  # at most ~10 updates a second
                shown, said = time.monotonic(), note
                eta = payload.eta_seconds if kind == "progress" else None
                yield out(views.progress_html(*done, eta, "reading" if done[0] or not others else "waiting"),
                          status=note)
        elif kind == "retention":
            yield out(live=views.retention_map_html(payload, total=total, width=LIVE_WIDTH, ticks=3))
        elif kind == "done":
            st.session, st.turns, st.history = session, [], []
            st.retention = session_retention(session)
            st.read_seconds, st.loaded_from = time.monotonic() - clicked, None
            yield (_done_progress(st), live_map(st), "✓ Read. Ask a question in the **Chat** tab.", _facts(st),
                   *_retention_controls(st))
            return
        elif kind == "cancelled":
            # keep the partial map when nothing else is loaded; otherwise show the loaded document's again
            yield out(views.progress_html(done[0], done[1], done[2], None, "cancelled"),
                      live_map(st) if st.session else skip,
                      f"Cancelled after {done[0]:,} of {done[1]:,} tokens."
                      + (" The previous document is still loaded." if st.session else ""), _facts(st))
            return
        else:
            yield out(views.progress_html(*done, None, "error"), live_map(st),
                      f"⚠ {_nice_error(payload, path)}", _facts(st))
            return


def _facts(st: UserState) -> str:
    """The loaded document's facts, with the read time the user watched (or where it was loaded from)."""
    if st.session is None or st.session.document is None:
        return ""
    return views.facts_markdown(st.session, watched_s=st.read_seconds, snapshot=st.loaded_from)


def _done_progress(st: UserState) -> str:
    r = st.session.read_result
    if st.loaded_from:
        return views.progress_html(r.doc_tokens, r.doc_tokens, 0, None, "loaded",
                                   f"from snapshot {st.loaded_from} in {views._duration(st.read_seconds or 0)}")
    return views.progress_html(r.doc_tokens, r.doc_tokens, r.tokens_per_second, None, "done",
                               views._duration(st.read_seconds if st.read_seconds is not None else r.seconds))


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

def ask(st: UserState, message, history, mode, max_new_tokens, temperature):
    """Generator -> (chat history, question box)."""
    history = list(history or [])
    message = (message or "").strip()
    if not message:
        yield history, gr.skip()
        return
    history += [{"role": "user", "content": message}]
    yield history + [{"role": "assistant", "content": "…"}], ""
    yield from _one_job_at_a_time(
        st, lambda text, refused: (history + [{"role": "assistant", "content": text if refused else f"*{text}*"}],
                                   gr.skip()),
        lambda: _answer(st, message, history, mode, max_new_tokens, temperature))


def _answer(st: UserState, message, history, mode, max_new_tokens, temperature):
    if st.session is None:
        st.history = history + [{"role": "assistant",
                                 "content": "⚠ Read a document first (Document panel on the left)."}]
        yield st.history, gr.skip()
        return
    session, text, waiting = st.session, "", object()
    lane = st.lane("answering a question")
    history.append({"role": "assistant", "content": "…"})
    try:
        for delta in lane.iterate(lambda: session.ask(
                message, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                continue_conversation=(mode == "continue"), should_stop=st.stop.is_set), waiting=waiting):
            if delta is waiting:  # no token yet: say whose turn it is
                others = lane.others()
                if not text and others:
                    history[-1] = {"role": "assistant", "content": f"*{views.turn_note(others)}*"}
                    yield history, gr.skip()
                continue
            text += delta
            history[-1] = {"role": "assistant", "content": text}
            yield history, gr.skip()
    except UserError as e:
        history[-1] = {"role": "assistant", "content": f"⚠ {e}"}
        st.history = history
        yield history, gr.skip()
        return
    answer = session.answers[-1]
    content = answer.text or "(no answer)"
    if answer.stopped:
        content += "\n\n*(stopped)*"
    history[-1] = {"role": "assistant", "content": content}
    history += views.recall_messages(answer)
    history += views.citation_messages(answer.citations)
    st.turns.append(views.answer_record(answer, mode))
    st.history = history
    yield history, gr.skip()


def clear_chat(st: UserState):
    st.turns, st.history = [], []
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

def summarize(st: UserState, mode, max_new_tokens):
    yield from _one_job_at_a_time(st, lambda text, refused: views.plain_summary_html("", text),
                                  lambda: _summarize(st, mode, max_new_tokens))


def _summarize(st: UserState, mode, max_new_tokens):
    if st.session is None or st.session.document is None:
        yield views.plain_summary_html("", "⚠ Read a document first.")
        return
    session = st.session
    if mode == "cache":
        text, lane = "", st.lane("summarizing")
        yield views.plain_summary_html("", "Summarizing from the cache…")
        for delta in lane.iterate(lambda: session.summarize(max_new_tokens=int(max_new_tokens),
                                                            should_stop=st.stop.is_set), waiting=None):
            text += delta or ""
            yield views.plain_summary_html(text, "Summarizing from the cache… " + views.turn_note(lane.others()))
        answer = session.answers[-1]
        passages = f" and {len(answer.recalled)} passages spread over the document, re-read" if answer.recalled else ""
        yield views.plain_summary_html(answer.text, "Stopped: the summary is cut where you stopped." if answer.stopped
                                       else f"From the cache after reading{passages}: {answer.tokens} tokens in "
                                       f"{answer.seconds:.1f} s.")
        return
    sections, current, label, final = [], "", "", ""
    job = {"status": None, "planned": None}
    lane = st.lane("summarizing section by section")
    document = session.document

    def note():
        return f"{views.summary_progress(job['status'], len(sections))} {views.turn_note(lane.others())}".strip()

    def stopped() -> str:
        return (f"Stopped. Kept the {views.section_summaries(len(sections), finished=True)} "
                f"of {job['planned'] or '?'}; no summary of the whole document was written.")

    def html(final_text: str, said: str) -> str:
        return views.sections_html(sections, label, current, final_text, said, document, job["planned"])

    yield html("", note())
    try:
        for ev in lane.iterate(lambda: summarize_sections(
                session, document, final_tokens=int(max_new_tokens),
                max_new_tokens=min(SECTION_TOKENS, int(max_new_tokens)), should_stop=st.stop.is_set),
                waiting={}):
            kind = ev.get("type")
            if kind == "plan":
                job["planned"] = len(ev["sections"])
            elif kind == "status":
                job["status"], current = ev, ""
                label = ev.get("label", label)
            elif kind == "section_delta":
                current += ev["text"]
            elif kind == "section":
                sections.append(ev)
                current = ""
            elif kind == "delta":
                final += ev["text"]
            elif kind == "stopped":
                current = ""
                yield html("", stopped())
                return
            elif kind == "done":
                final = ev.get("summary", final)
                st.retention = session_retention(session)  # the session now holds the re-read document
                yield html(final, views.sections_done(len(sections), ev["seconds"]))
                return
            yield html(final, note())
    except Cancelled:
        current = ""
        yield html("", stopped())
    except UserError as e:
        yield html(final, f"⚠ {e}")


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
    table = views.occupancy_table(r, layer, cfg.sizes if cfg.slots else [], cfg.sinks,
                                  st.session.prefix_tokens)
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
            temperature):
    yield from _one_job_at_a_time(
        st, lambda text, refused: (views.compare_html(policy_a, "error" if refused else "waiting", note=text), ""),
        lambda: _compare(st, policy_a, policy_b, question, model, window, cascades, sinks, stride, max_new_tokens,
                         temperature))


def _compare(st: UserState, policy_a, policy_b, question, model, window, cascades, sinks, stride, max_new_tokens,
             temperature):
    if st.session is None:
        yield views.compare_html(policy_a, "error", note="⚠ Read a document first."), ""
        return
    question = (question or "").strip() or "What is this document about?"
    document = st.session.document
    policies = (policy_a, policy_b)
    outs = [views.compare_html(p, "waiting", note="waiting…") for p in policies]
    yield tuple(outs)
    lane = st.lane("comparing policies")

    def stopped_from(k: int):
        """Stop ends this column and says so in every column that never started."""
        for j in range(k, len(policies)):
            outs[j] = views.compare_html(policies[j], "cancelled", note="Stopped before it started.")

    for k, policy in enumerate(policies):
        if st.stop.is_set():
            stopped_from(k)
            yield tuple(outs)
            return
        try:
            config = make_config(policy, window, cascades, sinks)
            loaded = get_model(model)
            session = ReadingSession(loaded, config, stride=check_stride(stride))
            total = documents.count_tokens(document, loaded.tokenizer)
        except UserError as e:
            outs[k] = views.compare_html(policy, "error", note=f"⚠ {e}")
            yield tuple(outs)
            continue
        for kind, payload in _run_read(session, document, total, st.stop, lane, live_retention=False):
            if kind == "progress":
                pct = 100 * payload.tokens_read / max(payload.tokens_total, 1)
                eta = payload.eta_seconds
                outs[k] = views.compare_html(policy, "reading", note=(
                    f"reading… {payload.tokens_read:,} / {payload.tokens_total:,} tokens ({pct:.0f}%), "
                    f"{payload.tokens_per_second:,.0f} tokens/s" + (f", ETA {views._duration(eta)}" if eta else "")
                    + (" · " + views.turn_note(lane.others()) if lane.others() else "")))
                yield tuple(outs)
            elif kind in ("cancelled", "error"):
                outs[k] = views.compare_html(policy, kind, note="Stopped while reading." if kind == "cancelled"
                                             else f"⚠ {payload}")
                stopped_from(k + 1)
                yield tuple(outs)
                return
        text = ""
        for delta in lane.iterate(lambda: session.ask(question, max_new_tokens=int(max_new_tokens),
                                                      temperature=float(temperature), should_stop=st.stop.is_set)):
            text += delta
            outs[k] = views.compare_html(policy, "answering", session, text,
                                         note=f"answering… {len(text.split())} words")
            yield tuple(outs)
        a = session.answers[-1]
        outs[k] = views.compare_html(policy, "done", session, a.text or "(no answer)", a.citations,
                                     note=f"{a.tokens} tokens in {a.seconds:.1f} s" + (" (stopped)" if a.stopped else ""))
        yield tuple(outs)


# ------------------------------------------------------------------ snapshots

SNAPSHOT_FILES = (".json", ".safetensors", ".index.sqlite")


def _snapshot_file_name(name: str) -> str:
    """The file stem for a name the user typed (letters, digits, - and _ only: never a path)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", (name or "").strip())[:60].strip("_")


def snapshot_choices(st: UserState) -> list[tuple[str, str]]:
    """This session's snapshots, newest first, under the names the user gave them (no server paths)."""
    out = []
    for p in sorted(sessions.snapshot_dir(st).glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            man = json.loads(p.read_text())
            info = (f"{man.get('label') or p.stem} — {man['document']['title']} "
                    f"({man['read']['doc_tokens']:,} tokens, {man['config']['policy']})")
        except (OSError, KeyError, TypeError, json.JSONDecodeError):
            info = f"{p.stem} (unreadable)"
        out.append((info, p.stem))
    return out


def _snapshot_label(st: UserState, stem: str) -> str:
    return next((info.split(" — ")[0] for info, s in snapshot_choices(st) if s == stem), stem)


def save_snapshot(st: UserState, name):
    if st.session is None:
        return "⚠ Read a document first.", gr.update(choices=snapshot_choices(st))
    label = (name or "").strip() or Path(st.session.document.title).stem
    stem = _snapshot_file_name(label) or "document"
    path = sessions.snapshot_dir(st) / stem
    try:
        st.session.save(path, label=label)
    except (UserError, OSError) as e:
        return f"⚠ Could not save: {_nice_error(e, str(sessions.snapshot_root()))}", gr.skip()
    return f"✓ Saved **{label}** (only this browser session can see it).", gr.update(choices=snapshot_choices(st),
                                                                                       value=stem)


def load_snapshot(st: UserState, stem):
    """-> (status, progress, facts, live map, model, policy, window, cascades, sinks, stride, chat,
    4 retention controls)."""
    n_out = 15
    stems = {s for _, s in snapshot_choices(st)}
    if not stem or stem not in stems:  # only this session's own snapshots, by their listed names
        return ("⚠ Pick one of your snapshots.",) + (gr.skip(),) * (n_out - 1)
    label = _snapshot_label(st, stem)
    path, t0 = sessions.snapshot_dir(st) / stem, time.monotonic()
    try:
        manifest = json.loads(path.with_suffix(".json").read_text())
        config = CacheConfig(**manifest["config"])
        spec = manifest["model_id"]
        spec = next((k for k, pm in PACKAGED.items() if pm.name == spec and k != spec), spec)
        session = ReadingSession(get_model(spec), config, stride=int(manifest["stride"]), prompt=manifest["prompt"])
        st.lane("loading a snapshot").call(session.load, path)
    except UserError as e:
        return (f"⚠ Could not load {label}: {_nice_error(e, str(path))}",) + (gr.skip(),) * (n_out - 1)
    except (OSError, KeyError, TypeError, ValueError) as e:
        return (f"⚠ Could not load {label}: {type(e).__name__}",) + (gr.skip(),) * (n_out - 1)
    st.session, st.turns, st.history = session, [], []
    st.retention = session_retention(session)
    st.read_seconds, st.loaded_from = time.monotonic() - t0, label
    return (f"✓ Loaded **{label}**: ask away (settings below now match the snapshot).", _done_progress(st),
            _facts(st), live_map(st), spec, config.policy, config.window, str(config.cascades), config.sinks,
            session.stride, [], *_retention_controls(st))


def ask_delete(st: UserState, stem):
    """First click on Delete: name what would go and ask again (-> message, confirm row)."""
    if not stem or stem not in {s for _, s in snapshot_choices(st)}:
        return "⚠ Pick one of your snapshots.", gr.update(visible=False)
    return (f"Delete **{_snapshot_label(st, stem)}** for good? It cannot be undone.", gr.update(visible=True))


def delete_snapshot(st: UserState, stem):
    """-> (status, list, confirm row)."""
    if not stem or stem not in {s for _, s in snapshot_choices(st)}:
        return "⚠ Pick one of your snapshots.", gr.skip(), gr.update(visible=False)
    label = _snapshot_label(st, stem)
    for ext in SNAPSHOT_FILES:
        (sessions.snapshot_dir(st) / f"{stem}{ext}").unlink(missing_ok=True)
    return f"Deleted **{label}**.", gr.update(choices=snapshot_choices(st), value=None), gr.update(visible=False)


def keep_snapshot():
    return "Kept.", gr.update(visible=False)


# ------------------------------------------------------------------ a session, found again after a reload

def on_session(fn):
    """fn(st, ...) as a page event of (browser session id, st, ...): it acts on `sessions.resolve`'s
    session, so an event never lands in a stale, empty state when the browser names its session."""
    if inspect.isgeneratorfunction(fn):  # Gradio streams only from generator functions
        def handler(sid, st, *args):
            yield from fn(sessions.resolve(sid, st), *args)
    else:
        def handler(sid, st, *args):
            return fn(sessions.resolve(sid, st), *args)
    handler.__name__ = handler.__qualname__ = fn.__name__
    return handler


def restore(sid, fresh: UserState):
    """Page load: the session this browser had (its chat, document, snapshots), or else the page's own
    fresh one (already registered), whose id the browser then keeps.
    -> (state, session id, chat, progress, status, facts, live map, snapshot list, 4 retention controls)."""
    if sid and sid != fresh.sid:
        st, known = sessions.get(sid)
        if fresh.session is None and not fresh.own_work.locked():
            sessions.forget(fresh)
        else:  # the page started work before this ran (a busy server): keep what it started
            st, known = fresh, True
    else:
        st, known = fresh, True
    st.touch()
    skip = gr.skip()
    snaps = gr.update(choices=snapshot_choices(st), value=None)
    if st.session is None or st.session.document is None:
        note = ""
        if sid and not known and snapshot_choices(st):
            note = ("Your earlier session was freed after being idle (or the server restarted); your snapshots "
                    "are still in the **Snapshots** tab.")
        return (st, st.sid, st.history, views.progress_html(0, None, 0, None, "idle"), note, "",
                views.retention_map_html(None), snaps, skip, skip, skip, skip)
    return (st, st.sid, st.history, _done_progress(st), f"✓ **{st.session.document.title}** is loaded.",
            _facts(st), live_map(st), snaps, *_retention_controls(st))


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
    stride_start = device_stride(DEVICE or parse_device("auto"))  # --stride auto's start on this device
    with gr.Blocks(title="Cascade Reader") as demo:
        st = gr.State(new_state)  # filled by `restore` on page load with this browser's session
        # survives reloads (localStorage) and, with a secret kept on disk, server restarts
        sid = gr.BrowserState("", storage_key="cascade-reader-session", secret=sessions.browser_secret())
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
                        stride = gr.Number(stride_start, label="stride (tokens per chunk)", precision=0,
                                           elem_id="stride", info="512 on a CPU, 4,096 on a GPU: a GPU reads faster "
                                                                  "in longer chunks")
                    settings_msg = gr.Markdown(views.settings_note(replace(d, cascades="auto"), stride_start),
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
                    # no floating label (it covered the messages when scrolled) and no built-in trash
                    # icon (it sat on the first message's copy icon): "Clear chat" below does that
                    chat = gr.Chatbot(height=460, elem_id="chat", label="Conversation", show_label=False,
                                      feedback_options=None, buttons=["copy"],
                                      placeholder="Read a document, then ask about it.")
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
                                "reading again. Your snapshots are yours: other people using this app "
                                "cannot see, load or delete them.")
                    with gr.Row():
                        snap_name = gr.Textbox(label="name", placeholder="defaults to the document's name",
                                               elem_id="snap-name", scale=3)
                        save_btn = gr.Button("Save snapshot", elem_id="snap-save", scale=1)
                    snaps = gr.Dropdown([], label="your saved documents", value=None, elem_id="snaps")
                    with gr.Row():
                        load_btn = gr.Button("Load", variant="primary", elem_id="snap-load")
                        list_btn = gr.Button("Refresh list", elem_id="snap-refresh")
                        del_btn = gr.Button("Delete", variant="stop", elem_id="snap-delete")
                    snap_status = gr.Markdown(elem_id="snap-status")
                    with gr.Row(visible=False, elem_id="snap-confirm") as confirm_row:
                        del_yes = gr.Button("Yes, delete it", variant="stop", elem_id="snap-delete-yes")
                        del_no = gr.Button("Keep it", elem_id="snap-delete-no")

        # several sessions' model work runs at once (engine.worker takes turns between them, and
        # sessions.busy_message turns away work beyond the limit in words); one session's own jobs
        # run one after another (UserState.own_work)
        model_work = {"concurrency_limit": sessions.LIMITS.max_busy + 2, "concurrency_id": "model"}
        instant = {"queue": False, "show_progress": "hidden"}
        controls = [layer, head, position, jump]
        view = on_session(retention_view)  # the retention view, redrawn after many events
        armed = on_session(arm)  # at click time: clears the session's stop flag
        view_inputs = [sid, st, rows, layer, head, position, count]
        view_outputs = [retention, occupancy, held_text]

        gr.on([c.change for c in (policy, window, cascades, sinks, stride)], validate_settings,
              [policy, window, cascades, sinks, stride], [settings_msg], trigger_mode="always_last",
              concurrency_limit=1, concurrency_id="settings", show_progress="hidden")
        read_evt = read_btn.click(armed, [sid, st], None, **instant).then(
            on_session(read_document), [sid, st, file, pasted, model, policy, window, cascades, sinks, stride],
            [progress, live, status, facts, *controls], show_progress="full", show_progress_on=[progress],
            **model_work)
        read_evt.then(view, view_inputs, view_outputs, show_progress="hidden", queue=False)
        for b in (cancel_btn, stop_btn, sum_stop, cmp_stop):
            b.click(on_session(stop), [sid, st], None, **instant)

        # no Gradio progress on the chat: its pending bubble showed above the new question; ask() shows
        # its own "…" (then who it waits for) below the question
        ask_args = dict(fn=on_session(ask), inputs=[sid, st, question, chat, mode, max_new, temperature], outputs=[chat, question],
                        show_progress="hidden", **model_work)
        for trigger in (ask_btn.click, question.submit):  # then mark the recalled passages on both maps
            trigger(armed, [sid, st], None, **instant).then(**ask_args).then(on_session(live_map), [sid, st], [live], queue=False).then(
                view, view_inputs, view_outputs, queue=False)
        clear_btn.click(on_session(clear_chat), [sid, st], [chat], **instant)
        export_btn.click(on_session(export_chat), [sid, st], [export_files, export_msg], queue=False)

        sum_btn.click(armed, [sid, st], None, **instant).then(on_session(summarize), [sid, st, sum_mode, max_new], [summary], show_progress="minimal", **model_work)

        refresh.click(view, view_inputs, view_outputs, queue=False)
        for c in (rows,):
            c.change(view, view_inputs, view_outputs, **instant)
        for c in (layer, head, position, count):
            c.release(view, view_inputs, view_outputs, **instant)
        jump.change(jump_to, [jump], [position], **instant).then(view, view_inputs, view_outputs, **instant)

        cmp_btn.click(armed, [sid, st], None, **instant).then(on_session(compare), [sid, st, pol_a, pol_b, cmp_q, model, window, cascades, sinks, stride, max_new, temperature],
                      [out_a, out_b], show_progress="minimal", **model_work)

        snapshot_work = {"concurrency_limit": 1, "concurrency_id": "snapshots"}  # own files only: no model queue
        save_btn.click(on_session(save_snapshot), [sid, st, snap_name], [snap_status, snaps], **snapshot_work)
        list_btn.click(on_session(lambda s: gr.update(choices=snapshot_choices(s))), [sid, st], [snaps], **instant)
        del_btn.click(on_session(ask_delete), [sid, st, snaps], [snap_status, confirm_row], **instant)
        del_yes.click(on_session(delete_snapshot), [sid, st, snaps], [snap_status, snaps, confirm_row], **instant)
        del_no.click(keep_snapshot, None, [snap_status, confirm_row], **instant)
        load_btn.click(on_session(load_snapshot), [sid, st, snaps],
                       [snap_status, progress, facts, live, model, policy, window, cascades, sinks, stride, chat,
                        *controls], **snapshot_work).then(view, view_inputs, view_outputs, queue=False)
        demo.load(restore, [sid, st], [st, sid, chat, progress, status, facts, live, snaps, *controls],
                  queue=False).then(view, view_inputs, view_outputs, queue=False)
    return demo
