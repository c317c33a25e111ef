"""app.sessions: ids the browser keeps, private snapshot folders, the busy limit and freeing idle sessions."""

import threading
import time

import pytest

from app import sessions
from engine import worker


@pytest.fixture
def snapshots(tmp_path, monkeypatch):
    monkeypatch.setenv("CASCADE_READER_SNAPSHOTS", str(tmp_path))
    monkeypatch.setattr(sessions, "LIMITS", sessions.Limits(max_busy=1, idle_timeout_s=60))
    return tmp_path


def test_ids_find_the_same_session_and_foreign_ids_are_never_paths(snapshots):
    st, known = sessions.get("")
    assert not known and sessions.ID_RE.fullmatch(st.sid)
    again, known = sessions.get(st.sid)
    assert known and again is st  # a reload finds the same session
    for bad in ("../../etc", "a/b", "short"):
        other, known = sessions.get(bad)
        assert not known and other.sid != bad and sessions.ID_RE.fullmatch(other.sid)
    assert sessions.snapshot_dir(st) == snapshots / st.sid
    assert sessions.snapshot_dir(st) != sessions.snapshot_dir(sessions.get("")[0])


def test_busy_limit_names_the_reason_in_words(snapshots):
    me, other = sessions.get("")[0], sessions.get("")[0]
    assert sessions.busy_message(me) is None
    release = threading.Event()
    future = other.lane("reading a document").submit(release.wait, 10)
    deadline = time.time() + 5
    while other.sid not in worker.busy_owners() and time.time() < deadline:
        time.sleep(0.01)
    try:
        msg = sessions.busy_message(me)
        assert msg and "at capacity" in msg and "try again" in msg
        assert sessions.busy_message(other) is None  # its own work does not count against it
    finally:
        release.set()
        future.result(timeout=10)


def test_idle_sessions_are_freed_but_their_snapshots_stay(snapshots):
    st = sessions.get("")[0]
    st.session = object()  # stands for a loaded document's reading session
    (sessions.snapshot_dir(st) / "mine.json").write_text("{}")
    assert sessions.free_idle(now=time.monotonic() + 10) == 0  # not idle long enough
    assert sessions.free_idle(now=time.monotonic() + 61) >= 1
    assert st.session is None and st.stop.is_set()
    back, known = sessions.get(st.sid)
    assert not known and back.sid == st.sid  # same id, so the same snapshot folder
    assert (sessions.snapshot_dir(back) / "mine.json").exists()


def test_idle_time_counts_from_the_end_of_a_job(snapshots, monkeypatch):
    # a job (a read) longer than the idle timeout must not leave its session freed the moment it ends
    from app import ui
    monkeypatch.setattr(sessions, "LIMITS", sessions.Limits(max_busy=1, idle_timeout_s=0.3))
    st = sessions.get("")[0]

    def work():
        st.session = object()  # the document this job read
        time.sleep(0.6)
        yield "read"

    assert list(ui._one_job_at_a_time(st, lambda text, refused: text, work)) == ["read"]
    sessions.free_idle()  # (other tests' sessions may go; this one must stay)
    assert st.session is not None
    sessions.free_idle(now=time.monotonic() + 1)
    assert st.session is None


def test_the_browser_secret_is_kept_across_restarts(snapshots):
    first = sessions.browser_secret()
    assert first and sessions.browser_secret() == first
    assert (snapshots / ".browser-secret").stat().st_mode & 0o077 == 0  # readable by the server's user only


def test_events_act_on_the_session_the_browser_names(snapshots):
    """A page whose state is still its first, empty one acts on the session the browser keeps."""
    mine = sessions.get("")[0]
    (sessions.snapshot_dir(mine) / "kept.json").write_text("{}")
    fresh = sessions.create()
    assert sessions.resolve(mine.sid, fresh) is mine
    assert sessions.resolve(mine.sid, mine) is mine and sessions.resolve("", fresh) is fresh
    assert sessions.resolve("../../etc/passwd-looking-id", fresh) is fresh  # never a foreign-shaped id
    sessions.free_idle(now=time.monotonic() + 61)  # both freed, as after a long absence
    back = sessions.resolve(mine.sid, fresh)
    assert back.sid == mine.sid and (sessions.snapshot_dir(back) / "kept.json").exists()
    fresh.history.append(("q", "a"))  # a page that already holds its own chat keeps it
    assert sessions.resolve(mine.sid, fresh) is fresh
