"""engine.worker: every model call runs on one thread, whichever thread asks."""

import threading

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
