"""The Gradio app: upload, read with progress, chat, summarize, retention view, compare, snapshots.

UI code only: every model action goes through the engine's public API (engine.session and
engine.documents). Each browser tab has its own UserState (keyed by Gradio's session hash); model
work is queued one at a time (Gradio shows the queue position), while Stop/Cancel bypass the
queue and only touch their own tab's flag.
"""

from __future__ import annotations

import json
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from engine import documents
from engine.cache import CacheConfig
from engine.errors import Cancelled, UserError
from engine.models import PACKAGED, cache_dir, load_model
from engine.session import ReadingSession, retention_of
from engine.summaries import summarize_sections

from . import views

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MODEL_CHOICES = ["smollm2", "gemma3"]
RETENTION_EVERY_S = 1.0  # retention snapshots while reading: at most this often (keeps overhead < 5%)


@dataclass
class UserState:
    session: ReadingSession | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    history: list = field(default_factory=list)
    retention: dict | None = None


_STATES: dict[str, UserState] = {}
_MODELS: dict[str, object] = {}
_MODELS_LOCK = threading.Lock()


def user(request: gr.Request | None) -> UserState:
    key = getattr(request, "session_hash", None) or "local"
    return _STATES.setdefault(key, UserState())


def forget(request: gr.Request):
    _STATES.pop(getattr(request, "session_hash", None) or "local", None)


def get_model(spec: str):
    """Models load once and are shared by every tab; caches are per session."""
    with _MODELS_LOCK:
        if spec not in _MODELS:
            _MODELS[spec] = load_model(spec, say=lambda s: None)
        return _MODELS[spec]


def snapshot_dir() -> Path:
    d = cache_dir() / "snapshots"
    d.mkdir(parents=True, exist_ok=True)
    return d


def list_snapshots() -> list[str]:
    return sorted(p.stem for p in snapshot_dir().glob("*.json"))


def make_config(policy, window, cascades, sinks) -> CacheConfig:
    return CacheConfig(policy=policy, window=int(window), cascades=int(cascades), sinks=int(sinks))


def facts_markdown(session: ReadingSession, seconds: float | None = None) -> str:
    d, r, b = session.document, session.read_result, session.budget()
    span = f"~{b['span']:,} tokens" if b["span"] else "unbounded"
    slots = f"{b['slots']:,}" if b["slots"] else "all tokens"
    lines = [f"**{d.title}** ({d.kind})",
             f"- tokens: **{r.doc_tokens:,}** in {len(d.segments):,} {d.units}",
             f"- cache: **{slots} slots** per layer, {b['cache_mb']:.1f} MB, policy **{b['policy']}**, span {span}",
             f"- read in {r.seconds:.1f} s ({r.tokens_per_second:,.0f} tokens/s)"]
    return "\n".join(lines)


# ------------------------------------------------------------------ handlers

def read_document(file, pasted, model, policy, window, cascades, sinks, stride, request: gr.Request):
    """Generator: (progress html, facts, retention image, status)."""
    st = user(request)
    st.stop.clear()
    try:
        config = make_config(policy, window, cascades, sinks)
        if file:
            document = documents.load_document(file if isinstance(file, str) else file.name)
        elif pasted and pasted.strip():
            document = documents.document_from_text(pasted, title="pasted text")
        else:
            raise UserError("upload a document or paste some text first")
        if int(stride) < 1:
            raise UserError(f"stride must be >= 1, not {stride}")
        yield views.progress_html(0, None, 0, None, "loading model"), gr.skip(), gr.skip(), ""
        loaded = get_model(model)
        session = ReadingSession(loaded, config, stride=int(stride))
        total = documents.count_tokens(document, loaded.tokenizer)
    except UserError as e:
        yield views.progress_html(0, None, 0, None, "error"), gr.skip(), gr.skip(), f"{e}"
        return
    events: queue.Queue = queue.Queue()
    last = [0.0]

    def on_chunk(sess, cache):
        now = time.monotonic()
        if now - last[0] >= RETENTION_EVERY_S:
            last[0] = now
            events.put(("retention", retention_of(cache, sess.prefix_tokens)))

    def work():
        try:
            events.put(("done", session.read(document, progress=lambda p: events.put(("progress", p)),
                                             should_stop=st.stop.is_set, on_chunk=on_chunk, total_tokens=total)))
        except Cancelled as e:
            events.put(("cancelled", e))
        except UserError as e:
            events.put(("error", e))
        except Exception as e:  # a bug: show it, keep the app alive
            events.put(("error", RuntimeError(f"{type(e).__name__}: {e}")))

    threading.Thread(target=work, daemon=True).start()
    state = (0, total + len(session._ids(session.format.prefix)), 0.0, None)
    while True:
        kind, payload = events.get()
        if kind == "progress":
            state = (payload.tokens_read, payload.tokens_total, payload.tokens_per_second, payload.eta_seconds)
            yield views.progress_html(*state), gr.skip(), gr.skip(), ""
        elif kind == "retention":
            yield gr.skip(), gr.skip(), views.retention_image(payload), ""
        elif kind == "done":
            st.session, st.history = session, []
            st.retention = session.retention()
            done = (state[0], state[1], state[2], 0)
            yield (views.progress_html(*done, "done"), facts_markdown(session), views.retention_image(st.retention),
                   "Read. Ask a question in the Chat tab.")
            return
        elif kind == "cancelled":
            yield views.progress_html(*state, "cancelled"), gr.skip(), gr.skip(), f"Cancelled: {payload}"
            return
        else:
            yield views.progress_html(*state, "error"), gr.skip(), gr.skip(), f"{payload}"
            return


def stop(request: gr.Request):
    user(request).stop.set()


def ask(message, history, mode, max_new_tokens, temperature, request: gr.Request):
    """Generator: (chat history, cleared textbox)."""
    st = user(request)
    history = list(history or [])
    message = (message or "").strip()
    if not message:
        yield history, ""
        return
    if st.session is None:
        history += [{"role": "user", "content": message},
                    {"role": "assistant", "content": "Read a document first (Document panel)."}]
        yield history, ""
        return
    st.stop.clear()
    history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
    try:
        for delta in st.session.ask(message, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                    continue_conversation=(mode == "continue"), should_stop=st.stop.is_set):
            history[-1]["content"] += delta
            yield history, ""
    except UserError as e:
        history[-1]["content"] = f"{e}"
        yield history, ""
        return
    answer = st.session.answers[-1]
    history[-1]["content"] = (answer.text or "(no answer)") + (" *(stopped)*" if answer.stopped else "") \
        + views.citations_markdown(answer.citations)
    st.history = history
    yield history, ""


def export_chat(history, request: gr.Request):
    st = user(request)
    title = st.session.document.title if st.session and st.session.document else "a document"
    path = Path(tempfile.mkdtemp()) / "conversation.md"
    path.write_text(views.chat_export(title, history or []))
    return str(path)


def summarize(mode, max_new_tokens, request: gr.Request):
    st = user(request)
    if st.session is None or st.session.document is None:
        yield "Read a document first."
        return
    st.stop.clear()
    if mode == "cache":
        text = ""
        for delta in st.session.summarize(max_new_tokens=int(max_new_tokens), should_stop=st.stop.is_set):
            text += delta
            yield text
        return
    sections, current, final = [], "", ""

    def render():
        parts = [f"<details><summary><b>{s['label']}</b></summary>\n\n{s['summary']}\n\n</details>" for s in sections]
        if current:
            parts.append(f"*summarizing…* {current}")
        head = f"### Summary\n\n{final}\n\n" if final else ""
        return head + f"**Section summaries ({len(sections)})**\n\n" + "\n\n".join(parts)

    try:
        for ev in summarize_sections(st.session, st.session.document, final_tokens=int(max_new_tokens),
                                     should_stop=st.stop.is_set):
            if ev["type"] == "section_delta":
                current += ev["text"]
            elif ev["type"] == "section":
                sections.append(ev)
                current = ""
            elif ev["type"] == "delta":
                final += ev["text"]
            yield render()
    except Cancelled:
        yield render() + "\n\nCancelled."
    st.retention = st.session.retention()


def retention_view(view, layer, head, start, count, request: gr.Request):
    st = user(request)
    if st.session is None or st.retention is None:
        return None, [], "<i>Read a document first.</i>"
    r = st.retention
    layers = r["positions"].shape[0]
    layer = min(int(layer), layers - 1)
    head = min(int(head), r["positions"].shape[1] - 1)
    img = views.retention_image(r, rows="cascade" if view == "cascades of one layer" else "layer", layer=layer)
    cfg = st.session.config
    table = views.occupancy_table(r, layer, cfg.cascade_slots if cfg.slots else 0, cfg.sinks)
    held = set(r["positions"][layer, head][r["positions"][layer, head] >= 0].tolist())
    sm = st.session.source_map
    offsets = sm.offsets  # document tokens only, in the same numbering as retention positions
    start_token = int(float(start) / 100.0 * max(len(offsets) - int(count), 0))
    text_html = views.highlighted_text(sm.text, offsets, held, start_token, int(count))
    where = sm.document.segments[int(sm.segment_of_chars(max(int(offsets[start_token]), 0)))].label if len(offsets) else ""
    return img, table, f"<div class='where'>tokens {start_token:,}+ {where}</div>" + text_html


def compare(policy_a, policy_b, question, window, cascades, sinks, stride, max_new_tokens, model,
            request: gr.Request):
    st = user(request)
    if st.session is None:
        yield "Read a document first.", ""
        return
    outs = ["", ""]
    for k, policy in enumerate((policy_a, policy_b)):
        try:
            config = make_config(policy, window, cascades, sinks)
        except UserError as e:
            outs[k] = f"{e}"
            yield tuple(outs)
            continue
        session = ReadingSession(get_model(model), config, stride=int(stride))
        outs[k] = f"*reading with {policy}…*"
        yield tuple(outs)
        try:
            session.read(st.session.document, should_stop=st.stop.is_set)
        except Cancelled:
            outs[k] = "Cancelled."
            yield tuple(outs)
            return
        text = ""
        for delta in session.ask(question or "Summarize the document.", max_new_tokens=int(max_new_tokens),
                                 should_stop=st.stop.is_set):
            text += delta
            outs[k] = f"**{policy}** ({session.config.slots or 'all'} slots)\n\n{text}"
            yield tuple(outs)
        a = session.answers[-1]
        outs[k] = (f"**{policy}** ({session.config.slots or 'all'} slots, read {session.read_result.tokens_per_second:,.0f}"
                   f" tok/s)\n\n{a.text}" + views.citations_markdown(a.citations))
        yield tuple(outs)


def save_snapshot(name, request: gr.Request):
    st = user(request)
    if st.session is None:
        return "Read a document first.", gr.update(choices=list_snapshots())
    name = "".join(ch for ch in (name or "").strip() if ch.isalnum() or ch in "-_ ").strip().replace(" ", "_")
    if not name:
        name = "".join(ch for ch in st.session.document.title if ch.isalnum() or ch in "-_")[:40] or "document"
    st.session.save(snapshot_dir() / name)
    return f"Saved **{name}**.", gr.update(choices=list_snapshots(), value=name)


def load_snapshot(name, model, request: gr.Request):
    st = user(request)
    if not name:
        return "Pick a snapshot.", gr.skip(), gr.skip()
    try:
        manifest = json.loads((snapshot_dir() / f"{name}.json").read_text())
        config = CacheConfig(**manifest["config"])
        spec = next((k for k, pm in PACKAGED.items() if pm.name == manifest["model_id"]), manifest["model_id"])
        session = ReadingSession(get_model(spec), config, stride=manifest["stride"], prompt=manifest["prompt"])
        session.load(snapshot_dir() / name)
    except (UserError, OSError, KeyError, json.JSONDecodeError) as e:
        return f"Could not load {name}: {e}", gr.skip(), gr.skip()
    st.session, st.history = session, []
    st.retention = session.retention()
    return f"Loaded **{name}**.", facts_markdown(session), views.retention_image(st.retention)


# ------------------------------------------------------------------ layout

def build_app(default_model: str = "smollm2") -> gr.Blocks:
    css = (ASSETS / "style.css").read_text() if (ASSETS / "style.css").exists() else ""
    d = CacheConfig()
    with gr.Blocks(title="Cascade Reader") as demo:
        demo.css_text = css
        gr.HTML("<div class='header'><img src='/gradio_api/file=" + str(ASSETS / "icon.svg") +
                "' class='logo'/><div><h1>Cascade Reader</h1><p>Chat with a whole book on a fixed memory budget."
                "</p></div></div>")
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                gr.Markdown("### Document")
                file = gr.File(label="PDF, EPUB, TXT, MD, SRT or VTT", file_types=list(documents.SUPPORTED),
                               elem_id="upload")
                pasted = gr.Textbox(label="…or paste text", lines=3, elem_id="pasted")
                with gr.Accordion("Cache settings", open=False, elem_id="settings"):
                    model = gr.Dropdown(MODEL_CHOICES if default_model in MODEL_CHOICES else [default_model, *MODEL_CHOICES],
                                        value=default_model, label="model", allow_custom_value=True)
                    policy = gr.Radio(["cascade", "sink", "full"], value=d.policy, label="cache policy")
                    with gr.Row():
                        window = gr.Number(d.window, label="window (slots)", precision=0, elem_id="window")
                        cascades = gr.Number(d.cascades, label="cascades", precision=0)
                    with gr.Row():
                        sinks = gr.Number(d.sinks, label="sinks", precision=0)
                        stride = gr.Number(512, label="stride (tokens/chunk)", precision=0)
                    with gr.Row():
                        max_new = gr.Slider(16, 1024, value=256, step=16, label="answer length (tokens)")
                        temperature = gr.Slider(0, 1.5, value=0.0, step=0.05, label="temperature")
                with gr.Row():
                    read_btn = gr.Button("Read", variant="primary", elem_id="read")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
                progress = gr.HTML(views.progress_html(0, None, 0, None, "idle"), elem_id="progress")
                status = gr.Markdown("", elem_id="status")
                facts = gr.Markdown("", elem_id="facts")
            with gr.Column(scale=3, min_width=480):
                with gr.Tabs():
                    with gr.Tab("Chat"):
                        chat = gr.Chatbot(height=430, elem_id="chat", label="Conversation")
                        mode = gr.Radio([("New question from the document", "new"),
                                         ("Continue the conversation", "continue")], value="new",
                                        label="Each question…", elem_id="mode")
                        with gr.Row():
                            question = gr.Textbox(placeholder="Ask about the document…", show_label=False, scale=5,
                                                  elem_id="question")
                            ask_btn = gr.Button("Ask", variant="primary", scale=1, elem_id="ask")
                            stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
                        with gr.Row():
                            export_btn = gr.Button("Export chat", size="sm")
                            export_file = gr.File(label="export", visible=True, height=60)
                    with gr.Tab("Summary"):
                        sum_mode = gr.Radio([("From the cache (after reading)", "cache"),
                                             ("Section by section", "sections")], value="cache", label="mode")
                        with gr.Row():
                            sum_btn = gr.Button("Summarize", variant="primary", elem_id="summarize")
                            sum_stop = gr.Button("Stop", variant="stop")
                        summary = gr.Markdown(elem_id="summary")
                    with gr.Tab("Retention"):
                        retention = gr.Image(label="what the cache holds (x: position in document, y: layer)",
                                             type="pil", elem_id="retention-map", height=260)
                        with gr.Row():
                            view = gr.Radio(["layers", "cascades of one layer"], value="layers", label="rows")
                            layer = gr.Slider(0, 63, value=0, step=1, label="layer")
                            head = gr.Slider(0, 15, value=0, step=1, label="KV head")
                        with gr.Row():
                            where = gr.Slider(0, 100, value=100, step=0.5, label="text window position (%)")
                            count = gr.Slider(200, 4000, value=1500, step=100, label="tokens shown")
                        refresh = gr.Button("Show", size="sm", elem_id="retention-refresh")
                        occupancy = gr.Dataframe(headers=["part", "filled", "oldest", "newest", "span"],
                                                 label="occupancy per cascade", interactive=False)
                        held_text = gr.HTML(elem_id="retained-text")
                    with gr.Tab("Compare"):
                        with gr.Row():
                            pol_a = gr.Dropdown(["cascade", "sink", "full"], value="cascade", label="policy A")
                            pol_b = gr.Dropdown(["cascade", "sink", "full"], value="sink", label="policy B")
                        cmp_q = gr.Textbox(label="question", elem_id="compare-question")
                        cmp_btn = gr.Button("Read with both and answer", variant="primary")
                        with gr.Row():
                            out_a = gr.Markdown()
                            out_b = gr.Markdown()
                    with gr.Tab("Snapshots"):
                        snap_name = gr.Textbox(label="name for the read document")
                        save_btn = gr.Button("Save snapshot")
                        snaps = gr.Dropdown(list_snapshots(), label="saved documents", allow_custom_value=False)
                        with gr.Row():
                            load_btn = gr.Button("Load")
                            list_btn = gr.Button("Refresh list", size="sm")
                        snap_status = gr.Markdown()

        model_kw = dict(concurrency_limit=1, concurrency_id="model")
        read_btn.click(read_document, [file, pasted, model, policy, window, cascades, sinks, stride],
                       [progress, facts, retention, status], **model_kw)
        for b in (cancel_btn, stop_btn, sum_stop):
            b.click(stop, None, None, queue=False)
        ask_evt = dict(fn=ask, inputs=[question, chat, mode, max_new, temperature], outputs=[chat, question], **model_kw)
        ask_btn.click(**ask_evt)
        question.submit(**ask_evt)
        export_btn.click(export_chat, [chat], [export_file])
        sum_btn.click(summarize, [sum_mode, max_new], [summary], **model_kw)
        refresh.click(retention_view, [view, layer, head, where, count], [retention, occupancy, held_text])
        cmp_btn.click(compare, [pol_a, pol_b, cmp_q, window, cascades, sinks, stride, max_new, model],
                      [out_a, out_b], **model_kw)
        save_btn.click(save_snapshot, [snap_name], [snap_status, snaps])
        list_btn.click(lambda: gr.update(choices=list_snapshots()), None, [snaps])
        load_btn.click(load_snapshot, [snaps, model], [snap_status, facts, retention], **model_kw)
        demo.unload(forget)
    return demo
