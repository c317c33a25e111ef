"""One long-lived thread for all model work in a process (the web app's reading, answering, loading).

Why: torch's CPU kernels run on OpenMP, and libgomp gives every thread that starts parallel regions
a pool of its own. Once more pool threads exist than CPUs, libgomp stops spin-waiting between
parallel regions (its "throttled" spin count), and every small op pays a sleep/wake-up. A server
that runs model calls on whichever thread a request lands on ends up there: measured on this
2-core machine, reading from a second thread was 35% slower than from the first (5.2 s vs 7.0 s for
4k tokens), and the same work kept on one thread ran at full speed. `iterate` keeps every model
call on the same thread, whichever thread asks.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cascade-model")
_END = object()


def in_model_thread() -> bool:
    return threading.current_thread().name.startswith("cascade-model")


def call(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run fn on the model thread and return its result (its exception is raised here)."""
    if in_model_thread():  # already there: queueing on ourselves would deadlock
        return fn(*args, **kwargs)
    return submit(fn, *args, **kwargs).result()


def submit(fn: Callable[..., T], *args, **kwargs) -> "Future[T]":
    """Queue fn on the model thread without waiting for it."""
    return _executor.submit(fn, *args, **kwargs)


def iterate(make: Callable[[], Iterator[T]]) -> Iterator[T]:
    """Run the iterator that make() returns on the model thread, yielding its items here as they come.

    Closing this generator (the consumer went away) stops the producer at its next item; callers
    that can also stop a long step (a chunk, a token) pass their own should_stop to make().
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
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
            items.put((True, _END))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            items.put((False, e))

    _executor.submit(work)
    try:
        while True:
            ok, item = items.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        closed.set()
