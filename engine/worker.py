"""One long-lived thread for all model work in a process, shared in fair turns between its owners.

Why one thread: torch's CPU kernels run on OpenMP, and libgomp gives every thread that starts
parallel regions a pool of its own. Once more pool threads exist than CPUs, libgomp stops
spin-waiting between parallel regions (its "throttled" spin count), and every small op pays a
sleep/wake-up. A server that runs model calls on whichever thread a request lands on ends up there:
measured on this 2-core machine, reading from a second thread was 35% slower than from the first
(5.2 s vs 7.0 s for 4k tokens), and the same work kept on one thread ran at full speed.

Why turns: with one thread, a plain job queue makes the second user wait for all of the first
user's work (a 3-second read waited ~200 s behind a 256-token answer). So each job runs as a
greenlet on that thread, and model code calls `turn()` at its step boundaries (before each read
chunk, after each generated token). There the thread switches to the scheduler, which resumes the
next owner's job, round-robin over owners (one web session = one owner; an owner's own jobs run
in the order they came). A short read or a question therefore starts within one step of anyone
else's work, and every step still runs on the same OS thread: greenlets switch stacks, not threads.

The scheduler runs all jobs inside one `torch.inference_mode()`: jobs interleave their own
inference_mode/no_grad blocks, and exits out of order only ever restore the same outer state.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterator, TypeVar

import greenlet
import torch

T = TypeVar("T")

THREAD_NAME = "cascade-model"
STEP_EMA = 0.3  # weight of the newest step in an owner's mean step time (estimates for the others)
_END = object()
_STEPS_KEPT = 20_000  # recent steps, to say how long each job waited for its first one (start_waits)


class _JobGreenlet(greenlet.greenlet):
    """A job's stack; `turn()` only switches inside one of these."""


@dataclass
class _Job:
    owner: Hashable
    label: str
    fn: Callable
    future: Future
    glet: _JobGreenlet | None = None
    submitted: float = field(default_factory=time.monotonic)

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.fn())
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
            self.future.set_exception(e)


@dataclass
class _Owner:
    jobs: int = 0  # submitted and not finished (queued or running)
    label: str = ""  # what its current job is doing, in words ("reading", "answering")
    step_s: float = 0.0  # mean seconds per step (0 until it has taken one)
    started: float = field(default_factory=time.monotonic)


_inbox: queue.SimpleQueue = queue.SimpleQueue()
_owners: dict[Hashable, _Owner] = {}
_owners_lock = threading.Lock()
_steps: collections.deque = collections.deque(maxlen=_STEPS_KEPT)  # (end time, owner, seconds)
_starts: collections.deque = collections.deque(maxlen=1000)  # one record per job, when it first ran
_thread: threading.Thread | None = None
_thread_lock = threading.Lock()


def in_model_thread() -> bool:
    return threading.current_thread().name == THREAD_NAME


def turn() -> None:
    """A step boundary: let the other owners' jobs take a step before this one goes on.

    A no-op outside a job (plain calls, tests that drive the engine directly)."""
    g = greenlet.getcurrent()
    if isinstance(g, _JobGreenlet):
        g.parent.switch()


def _loop() -> None:
    lanes: dict[Hashable, collections.deque[_Job]] = {}
    order: collections.deque[Hashable] = collections.deque()  # owners with jobs, next one first
    last = [None]  # the owner that took the latest step

    def take(job: _Job) -> None:
        if job.owner not in lanes:
            lanes[job.owner] = collections.deque()
            # a newcomer goes ahead of the owner that just took a step (the back of the line), so it
            # waits for that one step only, not for another round of it
            if order and order[-1] == last[0]:
                order.insert(len(order) - 1, job.owner)
            else:
                order.append(job.owner)
        lanes[job.owner].append(job)

    with torch.inference_mode():
        while True:
            if not order:
                take(_inbox.get())  # idle: sleep until work arrives
            while True:
                try:
                    take(_inbox.get_nowait())
                except queue.Empty:
                    break
            owner = order[0]
            order.rotate(-1)  # it goes to the back: everyone else takes a step first
            job = lanes[owner][0]
            if job.glet is None:
                job.glet = _JobGreenlet(job.run)
                with _owners_lock:
                    _owners[owner].label = job.label
                _record_start(job)
            t0 = time.perf_counter()
            job.glet.switch()
            spent = time.perf_counter() - t0
            _steps.append((time.monotonic(), owner, spent))
            last[0] = owner
            with _owners_lock:
                info = _owners[owner]
                info.step_s = spent if not info.step_s else (1 - STEP_EMA) * info.step_s + STEP_EMA * spent
                if job.glet.dead:
                    info.jobs -= 1
                    if not info.jobs:
                        del _owners[owner]
            if job.glet.dead:
                lanes[owner].popleft()
                if not lanes[owner]:
                    del lanes[owner]
                    order.remove(owner)


def _record_start(job: _Job) -> None:
    """How long the job waited for its first step, and how many steps of others ran meanwhile."""
    others = [s for t, o, s in list(_steps) if t > job.submitted and o != job.owner]
    _starts.append({"owner": job.owner, "label": job.label, "wait_s": time.monotonic() - job.submitted,
                    "other_steps": len(others), "other_owners": len({o for t, o, _ in list(_steps)
                                                                      if t > job.submitted and o != job.owner}),
                    "longest_other_step_s": max(others, default=0.0)})


def start_waits() -> list[dict]:
    """One record per job started lately: owner, label, wait_s (submission to first step),
    other_steps / other_owners (others' steps run while it waited), longest_other_step_s."""
    return list(_starts)


def _ensure_thread() -> None:
    global _thread
    with _thread_lock:
        if _thread is None:
            _thread = threading.Thread(target=_loop, name=THREAD_NAME, daemon=True)
            _thread.start()


@dataclass(frozen=True)
class Lane:
    """One owner's way onto the model thread (a web session, or None for everyone else)."""

    owner: Hashable = None
    label: str = "working"

    def submit(self, fn: Callable[..., T], *args, **kwargs) -> "Future[T]":
        """Queue fn on the model thread without waiting for it."""
        _ensure_thread()
        future: Future = Future()
        with _owners_lock:
            info = _owners.setdefault(self.owner, _Owner())
            info.jobs += 1
        _inbox.put(_Job(self.owner, self.label, lambda: fn(*args, **kwargs), future))
        return future

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run fn on the model thread and return its result (its exception is raised here)."""
        if in_model_thread():  # already there: queueing on ourselves would deadlock
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    def iterate(self, make: Callable[[], Iterator[T]], waiting=_END, every_s: float = 0.5) -> Iterator[T]:
        """Run the iterator that make() returns on the model thread, yielding its items here as they come.

        With `waiting` given, that value is yielded whenever no item came for every_s seconds, so a
        consumer can say why it waits (other owners' turns) while it waits.

        Each item is a step (other owners get a turn between items). Closing this generator (the
        consumer went away) stops the producer at its next item; callers that can also stop a long
        step (a chunk, a token) pass their own should_stop to make().
        """
        if in_model_thread():
            yield from make()
            return
        items: queue.Queue = queue.Queue()
        closed = threading.Event()

        def work() -> None:
            try:
                it = make()
                try:
                    for item in it:
                        items.put((True, item))
                        if closed.is_set():
                            break
                        turn()
                finally:
                    close = getattr(it, "close", None)
                    if close is not None:
                        close()
                items.put((True, _END))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                items.put((False, e))

        self.submit(work)
        try:
            while True:
                try:
                    ok, item = items.get(timeout=None if waiting is _END else every_s)
                except queue.Empty:
                    yield waiting
                    continue
                if not ok:
                    raise item
                if item is _END:
                    return
                yield item
        finally:
            closed.set()

    def others(self) -> list[tuple[str, float]]:
        """(label, mean seconds per step) of every other owner with model work in flight."""
        with _owners_lock:
            return [(o.label or "waiting", o.step_s) for k, o in _owners.items() if k != self.owner]


def lane(owner: Hashable = None, label: str = "working") -> Lane:
    return Lane(owner, label)


def busy_owners() -> set:
    """Owners with model work queued or running."""
    with _owners_lock:
        return set(_owners)


_DEFAULT = Lane()
call, submit, iterate = _DEFAULT.call, _DEFAULT.submit, _DEFAULT.iterate
