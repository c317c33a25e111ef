"""Browser sessions: each owns its document, chat and snapshots, and survives a page reload.

A session is named by a random id that the browser keeps (gr.BrowserState, in localStorage), so a
reload finds the same UserState here; the id is also the session's owner on the model thread
(engine.worker takes turns between owners) and the name of its snapshot folder. Ids come from the
browser, so one that is not shaped like ours is replaced, never used as a path.

Limits (launch.py flags): at most `max_busy` sessions with model work in flight at once (the next
one is told so in words), and a session idle for `idle_timeout_s` is freed (its reading cache goes;
its snapshots stay on disk, under its id, for when it comes back).
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine import worker
from engine.models import cache_dir
from engine.session import ReadingSession

ID_RE = re.compile(r"[A-Za-z0-9_-]{20,64}")


@dataclass
class Limits:
    max_busy: int = 4  # sessions with model work in flight at once
    idle_timeout_s: float = 3600.0  # a session untouched this long is freed
    max_upload_mb: float = 50.0


LIMITS = Limits()


@dataclass
class UserState:
    """One browser session: its reading session, chat, snapshots folder and stop flag."""

    sid: str = ""
    session: ReadingSession | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    turns: list = field(default_factory=list)  # answer records, for export
    history: list = field(default_factory=list)  # the chat as shown, restored after a reload
    retention: dict | None = None
    read_seconds: float | None = None  # the read as the user watched it (wall clock, waits included)
    loaded_from: str | None = None  # the snapshot the document came from, when it did
    last_seen: float = field(default_factory=time.monotonic)
    own_work: threading.Lock = field(default_factory=threading.Lock)  # one model job per session at a time

    def __deepcopy__(self, memo):  # gr.State deep-copies its value; the session object is shared on purpose
        return self

    def lane(self, label: str) -> worker.Lane:
        return worker.lane(self.sid or None, label)

    def touch(self) -> None:
        self.last_seen = time.monotonic()

    def free(self) -> None:
        """Drop what holds memory (the reading cache); the id and its snapshots stay valid."""
        self.stop.set()
        self.session, self.retention = None, None


_SESSIONS: dict[str, UserState] = {}
_LOCK = threading.Lock()


def new_id() -> str:
    return secrets.token_urlsafe(24)


def create() -> UserState:
    """A new session with a fresh id, registered at once: model work a page starts before its load
    event has run (a busy server) still runs in a lane of its own."""
    st = UserState(sid=new_id())
    with _LOCK:
        _SESSIONS[st.sid] = st
    return st


def forget(st: UserState) -> None:
    """Drop a session that never held anything (a page's fresh state, replaced by its restored one)."""
    with _LOCK:
        if _SESSIONS.get(st.sid) is st and st.session is None and not st.history:
            del _SESSIONS[st.sid]


def get(sid: str | None) -> tuple[UserState, bool]:
    """The session with this id (made anew for a missing, freed or foreign-looking one); -> (state, known)."""
    with _LOCK:
        known = bool(sid) and ID_RE.fullmatch(sid) is not None and sid in _SESSIONS
        if not known:
            sid = sid if sid and ID_RE.fullmatch(sid) else new_id()
            _SESSIONS[sid] = UserState(sid=sid)
        st = _SESSIONS[sid]
    st.touch()
    return st, known


def resolve(sid: str | None, st: UserState) -> UserState:
    """The session a page event acts on: the one named by the id the browser keeps, whenever the page's
    state holds another, empty one (measured: after a session was freed and the page came back, a
    later event could still arrive with the page's first, fresh state, and Load then looked in a new,
    empty snapshot folder). A state that holds work of its own (started before the page load event
    ran) stays: restore gave the browser its id."""
    if not sid or sid == st.sid or ID_RE.fullmatch(sid) is None:
        return st
    if st.session is not None or st.history or st.own_work.locked():
        return st
    return get(sid)[0]


def browser_secret() -> str:
    """The key gr.BrowserState encrypts the session id with, kept on disk (mode 600) so that an id a
    browser holds still opens after a server restart: the document is gone then, its snapshots not."""
    path = snapshot_root() / ".browser-secret"
    try:
        return path.read_text().strip()
    except OSError:
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(24)
        path.write_text(secret)
        path.chmod(0o600)
        return secret


def snapshot_root() -> Path:
    """All sessions' snapshots: <user cache>/snapshots (CASCADE_READER_SNAPSHOTS overrides, e.g. for tests)."""
    return Path(os.environ.get("CASCADE_READER_SNAPSHOTS") or cache_dir() / "snapshots")


def snapshot_dir(st: UserState) -> Path:
    """This session's own snapshots: nobody else lists, loads or deletes them."""
    d = snapshot_root() / (st.sid if ID_RE.fullmatch(st.sid or "") else "shared")
    d.mkdir(parents=True, exist_ok=True)
    return d


def busy_message(st: UserState) -> str | None:
    """None when this session may start model work now; else why not, in words."""
    others = worker.busy_owners() - {st.sid, None}  # None: model loading, shared by all
    if len(others) >= LIMITS.max_busy:
        return (f"The reader is at capacity: {len(others)} other sessions have work running (the limit is "
                f"{LIMITS.max_busy}). Please try again in a minute.")
    return None


def free_idle(now: float | None = None) -> int:
    """Free every session idle longer than the timeout, unless it has work in flight. -> how many."""
    now = time.monotonic() if now is None else now
    busy = worker.busy_owners()
    with _LOCK:
        idle = [sid for sid, st in _SESSIONS.items()
                if now - st.last_seen > LIMITS.idle_timeout_s and sid not in busy and not st.own_work.locked()]
        gone = [_SESSIONS.pop(sid) for sid in idle]
    for st in gone:
        st.free()
    return len(gone)


def start_reaper(every_s: float = 60.0) -> None:
    def loop():
        while True:
            time.sleep(min(every_s, max(LIMITS.idle_timeout_s / 4, 1.0)))
            free_idle()

    threading.Thread(target=loop, name="free-idle-sessions", daemon=True).start()
