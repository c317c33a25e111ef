"""Reading in two pipelined halves of the layers (engine/pipeline.py): the same cache as a plain read, chunk
after chunk, on stops and errors too."""

import threading

import pytest
import torch

from engine import pipeline, threads
from engine.cache import CacheConfig
from engine.errors import Cancelled
from engine.runtime import Engine
from test_architectures import ARCHITECTURES, tiny

CONFIG = CacheConfig(sinks=4, window=32, cascades=2)


@pytest.fixture
def thread_budget():
    """Set the model's thread budget for one test; torch's and the thread module's settings come back after."""
    before, state = torch.get_num_threads(), dict(threads._state)

    def use(n: int) -> None:
        threads.configure(n)

    yield use
    threads._state.clear()
    threads._state.update(state)
    torch.set_num_threads(before)


def ids(n=600, seed=0):
    return torch.randint(0, 257, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def read_states(loaded, tokens, pipelined: bool, budget, thread_budget, **kwargs):
    """The cache's state after every chunk (as `on_chunk` sees it) and the progress reported, for one read."""
    thread_budget(budget)
    engine = Engine(loaded, CONFIG, stride=64)
    engine.pipeline = pipelined
    cache = engine.new_cache()
    assert pipeline.supported(engine, cache) == pipelined
    states, progress = [], []
    engine.read([tokens], cache, on_chunk=lambda c: states.append({k: v.clone() for k, v in c.state().items()}),
                progress=lambda p: progress.append(p.tokens_read), **kwargs)
    return states, progress, cache


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_tested_architecture_reads_pipelined_as_a_plain_read(name, thread_budget):
    """Each architecture users bring (tests/test_architectures.py), Gemma-3's sliding-window layers and its two
    rotaries included: a pipelined read leaves the states of a plain one-thread read after every chunk."""
    loaded = tiny(name)
    tokens = ids(300, seed=3)
    plain = read_states(loaded, tokens, False, 1, thread_budget)
    piped = read_states(loaded, tokens, True, 2, thread_budget)
    assert plain[1] == piped[1] and len(plain[0]) == len(piped[0]) == 7  # 4 strides of 64, then 32 + 8 + 4
    assert all(same(a, b) for a, b in zip(plain[0], piped[0]))


def test_a_pipelined_read_leaves_the_cache_of_a_plain_read_after_every_chunk(tiny_llama, thread_budget):
    """Two stages of one thread each against a plain read on one thread: every state the per-chunk callback
    sees, the progress, and the final cache are the same bit for bit (the tail's odd chunks included)."""
    tokens = ids(600)  # 9 strides of 64 and a rest of 24 (16 + 8)
    plain = read_states(tiny_llama, tokens, False, 1, thread_budget)
    piped = read_states(tiny_llama, tokens, True, 2, thread_budget)
    assert plain[1] == piped[1] == [64 * i for i in range(1, 10)] + [592, 600]
    assert len(plain[0]) == len(piped[0]) == 11 and all(same(a, b) for a, b in zip(plain[0], piped[0]))
    assert same(plain[2].state(), piped[2].state())
    assert not any(t.name == "cascade-reader-stage-b" for t in threading.enumerate())


def test_a_stopped_pipelined_read_stops_where_a_plain_read_stops(tiny_llama, thread_budget):
    """Asked to stop once 3 chunks are reported, both reads stop there, with the same message and the cache
    of exactly 3 chunks: the chunk in flight is finished, the next one never pushed."""
    tokens = ids(600, seed=1)
    results = []
    for pipelined, budget in ((False, 1), (True, 2)):
        thread_budget(budget)
        engine = Engine(tiny_llama, CONFIG, stride=64)
        engine.pipeline = pipelined
        cache, seen = engine.new_cache(), []
        with pytest.raises(Cancelled) as stopped:
            engine.read([tokens], cache, progress=seen.append, should_stop=lambda: len(seen) >= 3)
        results.append((str(stopped.value), cache.state(), [p.tokens_read for p in seen]))
    (plain_msg, plain_state, plain_seen), (piped_msg, piped_state, piped_seen) = results
    assert plain_msg == piped_msg == "reading cancelled after 192 tokens"
    assert plain_seen == piped_seen == [64, 128, 192]
    assert same(plain_state, piped_state) and int(piped_state["seen"]) == 192
    assert not any(t.name == "cascade-reader-stage-b" for t in threading.enumerate())


def test_an_error_in_the_second_stage_reaches_the_caller_and_stops_the_pipeline(tiny_llama, thread_budget):
    """A layer of the second half fails on the third chunk: the read raises that error (no hang, no
    traceback swallowed) and the second stage's thread is gone."""
    thread_budget(2)
    last = tiny_llama.model.model.layers[-1]
    seen = {"n": 0}

    def fail_third(module, args):
        seen["n"] += 1
        if seen["n"] == 3:
            raise RuntimeError("layer broke")

    handle = last.register_forward_pre_hook(fail_third)
    try:
        engine = Engine(tiny_llama, CONFIG, stride=64)
        with pytest.raises(RuntimeError, match="layer broke"):
            engine.read([ids(600, seed=2)], engine.new_cache())
    finally:
        handle.remove()
    assert not any(t.name == "cascade-reader-stage-b" for t in threading.enumerate())


def test_the_pipeline_only_runs_where_it_applies(tiny_llama, thread_budget, monkeypatch):
    engine = Engine(tiny_llama, CONFIG, stride=64)
    cache = engine.new_cache()
    thread_budget(1)
    assert not pipeline.supported(engine, cache)  # one thread: nothing to split
    thread_budget(2)
    assert pipeline.supported(engine, cache)
    assert not pipeline.supported(engine, cache, focus=[5, 6])  # focus rows: a plain forward
    assert not pipeline.supported(engine, cache, logits="all")
    model_contests = Engine(tiny_llama, CacheConfig(sinks=4, window=32, cascades=2, contest="model"), stride=64)
    assert not pipeline.supported(model_contests, model_contests.new_cache())  # decided over all layers at once
    full = Engine(tiny_llama, CacheConfig(policy="full"), stride=64)
    assert not pipeline.supported(full, full.new_cache())
    monkeypatch.setenv("CASCADE_KERNELS", "triton")  # the Triton interpreter is not thread-safe
    assert not pipeline.supported(engine, cache)
    monkeypatch.delenv("CASCADE_KERNELS")
    pipeline.configure("off")
    try:
        assert not Engine(tiny_llama, CONFIG, stride=64).pipeline
    finally:
        pipeline.configure("auto")
    with pytest.raises(Exception, match="pipeline must be"):
        pipeline.configure("on")


def test_the_bench_times_its_ceiling_through_the_same_pipeline(tmp_path, thread_budget):
    """Where the cascade reads pipelined, `engine bench`'s ceiling row reads through the same pipeline with
    attention skipped, and `--paired` pairs segments of PAIR_CHUNKS chunks (the last one short), each read
    again with attention skipped right after; with `--pipeline off` the pairs are single chunks again."""
    from engine.bench import PAIR_CHUNKS, worker
    from tiny_models import tiny_llama, word_tokenizer

    tokenizer = word_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path)
    job = {"model": str(tmp_path), "device": "cpu", "dtype": "float32", "policy": "cascade",
           "length": 64 * (2 * PAIR_CHUNKS + 3), "sinks": 4, "window": 32, "cascades": 2, "stride": 64, "block": 1,
           "cascade_sizes": "equal", "contest": "head", "block_score": "max", "threads": 2}
    try:
        plain = worker({**job, "paired": True, "pipeline": "off"})
        ceiling = worker({**job, "policy": "ceiling"})
        paired = worker({**job, "paired": True})
    finally:
        pipeline.configure("auto")
    assert ceiling["pipelined"] and paired["pipelined"] and not plain["pipelined"]
    assert (paired["paired_unit"], paired["paired_units"]) == ("segment", 3)
    assert (plain["paired_unit"], plain["paired_units"]) == ("chunk", 2 * PAIR_CHUNKS + 3)
    for row in (paired, plain):
        low, median, high = row["over_paired_ceiling_quartiles"]
        assert 0 < low <= median <= high and row["over_paired_ceiling"] > 0
        assert all(r > 0 for r in row["over_paired_ceiling_first_last_quarter"])
        assert row["paired_ceiling_tps"] > row["tokens_per_second"] * row["over_paired_ceiling"] * 0.5
