"""engine.worker: every model call runs on one thread, whichever thread asks."""

import threading
import time

import pytest

from engine import worker


def test_calls_and_iterations_from_any_thread_run_on_one_thread():
    names = []

    def where(tag):
        names.append(threading.current_thread().name)
        return tag

    def produce(n):
        for i in range(n):
            names.append(threading.current_thread().name)
            yield i

    results = {}

    def caller(k):
        results[k] = (worker.call(where, k), list(worker.iterate(lambda: produce(3))))

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {k: (k, [0, 1, 2]) for k in range(3)}
    assert len(set(names)) == 1 and names[0].startswith("cascade-model")


def test_errors_reach_the_consumer():
    def broken():
        yield 1
        raise ValueError("bad chunk")

    got = []
    with pytest.raises(ValueError, match="bad chunk"):
        for item in worker.iterate(broken):
            got.append(item)
    assert got == [1]
    with pytest.raises(KeyError):
        worker.call(lambda: {}["missing"])


def test_closing_the_consumer_stops_the_producer():
    produced, closed = [], threading.Event()

    def endless():
        try:
            i = 0
            while True:
                produced.append(i)
                yield i
                i += 1
        finally:
            closed.set()

    it = worker.iterate(endless)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert closed.wait(5)  # the producer's generator was closed on the model thread
    n = worker.call(len, produced)  # the model thread is free again for the next job
    assert len(produced) == n and closed.is_set()


def test_nested_use_on_the_model_thread_does_not_deadlock():
    assert worker.call(lambda: worker.call(lambda: 7)) == 7
    assert worker.call(lambda: list(worker.iterate(lambda: iter([1, 2])))) == [1, 2]


def test_turns_are_fair_between_owners():
    """A short job of one owner starts within one step of another owner's long job, not after it."""
    log = []

    def long_job():
        for i in range(200):
            log.append(("long", i))
            time.sleep(0.005)  # one step of work
            worker.turn()
        return "long done"

    def short_job(tag):
        for i in range(3):
            log.append((tag, i))
            worker.turn()
        return tag

    a, b = worker.lane("A", "reading"), worker.lane("B", "answering")
    long_future = a.submit(long_job)
    while not log:
        time.sleep(0.001)
    assert [label for label, _ in b.others()] == ["reading"]  # B sees what A is doing
    assert b.call(short_job, "short") == "short"
    done_at = log.index(("short", 2))
    long_steps_before = sum(1 for tag, _ in log[:done_at] if tag == "long")
    assert long_future.result(timeout=30) == "long done"
    # B's three steps interleave with A's: A took at most one step per B step (plus the ones before B came)
    first_short = log.index(("short", 0))
    assert long_steps_before - first_short <= 3, log[:done_at + 1]
    start = next(r for r in worker.start_waits() if r["owner"] == "B")
    assert start["other_steps"] <= 1 and start["label"] == "answering"  # at most one step of A's before B's first
    assert worker.busy_owners() == set()


def test_one_owners_jobs_run_in_order():
    order = []

    def job(k):
        for _ in range(3):
            worker.turn()
        order.append(k)

    lane = worker.lane("same")
    futures = [lane.submit(job, k) for k in range(4)]
    for f in futures:
        f.result(timeout=10)
    assert order == [0, 1, 2, 3]
