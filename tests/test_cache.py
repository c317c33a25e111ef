"""The push rule: golden layouts, agreement with a literal oracle, and invariants (hypothesis)."""

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.cache import CacheConfig, make_cache
from engine.errors import UserError
from engine.push_rule import OracleCascade


def model_config(layers=1, kv_heads=1, head_dim=4):
    return SimpleNamespace(num_hidden_layers=layers, num_key_value_heads=kv_heads, num_attention_heads=kv_heads,
                           head_dim=head_dim, hidden_size=kv_heads * head_dim)


def feed(cache, lengths, gen=None, scored=True):
    """Push chunks straight into layer 0 with random (or all-zero) scores; returns the gains used."""
    history = []
    b, h, d = cache.batch, cache.kv_heads, cache.head_dim
    for L in lengths:
        plan = cache.plan(L)
        slots = plan.cache_valid.shape[0]
        if scored and gen is not None:
            gain = torch.rand(b, h, slots, generator=gen)
            new = torch.rand(b, h, L, generator=gen)
        else:
            gain, new = torch.zeros(b, h, slots), torch.zeros(b, h, L)
        before = cache.pos[0].clone()
        keys = plan.original_pos.float().view(1, 1, L, 1).expand(b, h, L, d).clone()  # key encodes position
        cache.push(0, plan, keys, keys.clone(), gain, new)
        cache.commit(plan)
        history.append((before, gain, new))
    return history


def cache_order(cache, b=0, h=0):
    """Original positions of valid slots, sorted by in-cache position."""
    pos, valid = cache.slot_positions()
    order = torch.argsort(torch.where(valid, pos, torch.full_like(pos, 1 << 40)))[: int(valid.sum())]
    return cache.pos[0][b, h, order].tolist()


def test_golden_tied_layout():
    # S=2, W=32, C=4, 400 tokens, all scores tied: a deterministic strided layout
    cache = make_cache(CacheConfig(sinks=2, window=32, cascades=4), model_config())
    feed(cache, [7] * 57 + [1])
    assert cache.seen == 400
    order = cache_order(cache)
    assert order[:2] == [0, 1]  # sinks stay
    cascades = [order[2 + 8 * (3 - i): 2 + 8 * (4 - i)] for i in range(4)]  # cache order: oldest cascade first
    assert cascades[0] == list(range(392, 400))  # cascade 0: the last 8 tokens
    for i in (1, 2, 3):
        gaps = {b - a for a, b in zip(cascades[i], cascades[i][1:])}
        # every 2**i-th token; the newest slot may still be mid-contest, so one shorter gap is allowed
        assert max(gaps) == 2 ** i and min(gaps) >= 2 ** (i - 1), (i, cascades[i])
    # span: the oldest non-sink token is about S + w * (2**C - 1) back
    assert 400 - order[2] == pytest.approx(cache.config.span - 2, abs=2 ** 4)


def test_random_scores_pick_block_winners():
    # with beta = 1 scores never change, so cascade 1 must hold the better token of each pair
    cfg = CacheConfig(sinks=2, window=16, cascades=2, beta=1.0)
    cache = make_cache(cfg, model_config())
    gen = torch.Generator().manual_seed(0)
    scores = {}
    for L in [5] * 40:
        plan = cache.plan(L)
        new = torch.rand(1, 1, L, generator=gen)
        for j, p in enumerate(plan.original_pos.tolist()):
            scores[p] = float(new[0, 0, j])
        keys = torch.zeros(1, 1, L, 4)
        cache.push(0, plan, keys, keys, torch.zeros(1, 1, plan.cache_valid.shape[0]), new)
        cache.commit(plan)
    held = cache.pos[0][0, 0, 2 + 8: 2 + 16].tolist()  # cascade 1's physical slots
    assert len(set(held)) == 8
    for p in sorted(held)[:-1]:  # the newest may still face its contest
        first = 2 + ((p - 2) // 2) * 2  # pairs (even t, t + 1), t counted after the sinks
        assert scores[p] == max(scores[first], scores[first + 1]), (p, first)


def sizes_of(sizes_rule, w, cascades, block):
    """The cascade sizes a strategy draws: equal, uneven (the window does not split evenly: "equal"
    gives the newest cascades a block more), cascade 0 twice the others, or 'half'."""
    if sizes_rule == "equal":
        return "equal", [w * block] * cascades
    if sizes_rule == "uneven":
        return "equal", [(w + (i < cascades - 1)) * block for i in range(cascades)]
    if sizes_rule == "first-double" or cascades == 1:
        sizes = [2 * w * block] + [w * block] * (cascades - 1)
        return ",".join(map(str, sizes)), sizes
    return "half", [w * block * (cascades - 1)] + [w * block] * (cascades - 1)


@settings(max_examples=80, deadline=None)
@given(
    sinks=st.integers(0, 5),
    w=st.integers(1, 6),  # blocks per cascade
    cascades=st.integers(1, 4),
    block=st.sampled_from([1, 1, 2, 3, 4]),
    sizes_rule=st.sampled_from(["equal", "uneven", "first-double", "half"]),
    lengths=st.lists(st.integers(1, 23), min_size=1, max_size=14),
    seed=st.integers(0, 2 ** 16),
    beta=st.sampled_from([1.0, 0.9, 0.5]),
    block_score=st.sampled_from(["max", "sum"]),
)
def test_matches_literal_oracle_and_invariants(sinks, w, cascades, block, sizes_rule, lengths, seed, beta, block_score):
    rule, sizes = sizes_of(sizes_rule, w, cascades, block)
    window = sum(sizes)
    cfg = CacheConfig(sinks=sinks, window=window, cascades=cascades, beta=beta, block=block, cascade_sizes=rule,
                      block_score=block_score)
    assert cfg.sizes == sizes
    cache = make_cache(cfg, model_config(kv_heads=2), batch=2)
    gen = torch.Generator().manual_seed(seed)
    oracles = [[OracleCascade(sinks, sizes, beta, block, block_score) for _ in range(2)]
               for _ in range(2)]
    first_sinks = None
    for L in lengths:
        before = cache.pos[0].clone()
        hist = feed(cache, [L], gen)
        _, gain, new = hist[0]
        for b in range(2):
            for h in range(2):
                resident_gain = {int(p): float(g) for p, g in zip(before[b, h], gain[b, h]) if p >= 0}
                oracles[b][h].chunk(resident_gain, new[b, h].tolist())
    # invariants
        pos, valid = cache.slot_positions()
        assert int(valid.sum()) == cache.n_valid <= sinks + window
        if first_sinks is None and cache.seen >= sinks:
            first_sinks = cache.pos[0][:, :, :sinks].clone()
        if first_sinks is not None:
            assert torch.equal(cache.pos[0][:, :, :sinks], first_sinks)  # sinks never move
        for b in range(2):
            for h in range(2):
                order = cache_order(cache, b, h)
                assert order == sorted(order) and len(set(order)) == len(order)  # unique, in stream order
                assert order == oracles[b][h].positions()
                vec_scores = {int(p): float(s) for p, s in zip(cache.pos[0][b, h, sinks:], cache.score[0][b, h, sinks:]) if p >= 0}
                for p, s in oracles[b][h].scores().items():
                    assert vec_scores[p] == pytest.approx(s, rel=1e-5, abs=1e-6)
    # in-cache positions are 0..n-1 and never exceed sinks + window
    pos, valid = cache.slot_positions()
    assert sorted(pos[valid].tolist()) == list(range(cache.n_valid))


def test_keys_travel_with_their_positions():
    cache = make_cache(CacheConfig(sinks=3, window=12, cascades=3), model_config(kv_heads=3), batch=1)
    feed(cache, [5] * 30, torch.Generator().manual_seed(1))
    pos = cache.pos[0]
    valid = pos >= 0
    assert torch.equal(cache.keys[0][..., 0][valid], pos[valid].float())


def test_sink_policy_is_one_window():
    cache = make_cache(CacheConfig(policy="sink", sinks=4, window=10), model_config())
    feed(cache, [6] * 10, torch.Generator().manual_seed(2))
    assert cache_order(cache) == [0, 1, 2, 3] + list(range(50, 60))


def test_full_policy_keeps_everything_and_snapshot_roundtrip():
    cache = make_cache(CacheConfig(policy="full"), model_config(layers=2))
    feed(cache, [100, 300, 7], scored=False)
    assert cache.n_valid == 407 and cache.pos[0][0, 0, :407].tolist() == list(range(407))
    twin = cache.clone()
    feed(twin, [5], scored=False)
    assert cache.seen == 407 and twin.seen == 412


def test_clone_is_independent():
    cache = make_cache(CacheConfig(sinks=2, window=8, cascades=2), model_config())
    feed(cache, [5, 5], torch.Generator().manual_seed(3))
    twin = cache.clone()
    snapshot = {k: v.clone() for k, v in cache.state().items()}
    feed(twin, [9], torch.Generator().manual_seed(4))
    for k, v in cache.state().items():
        assert torch.equal(v, snapshot[k]), k


def test_sizes_rules_spans_and_auto_cascades():
    half = CacheConfig(sinks=64, window=256, cascades=5, cascade_sizes="half", block=8)
    assert half.sizes == [128, 32, 32, 32, 32] and half.span == 64 + 128 + 32 * (2 + 4 + 8 + 16)
    explicit = CacheConfig(sinks=0, window=64, cascades="auto", cascade_sizes="32,16,16")
    assert explicit.resolve(10_000).sizes == [32, 16, 16]
    # auto: the fewest cascades whose sizes hold whole blocks and whose span covers the stream
    auto = CacheConfig(sinks=64, window=256, cascades="auto", block=16).resolve(5120)
    assert auto.cascades == 8 and auto.sizes == [32] * 8 and auto.span >= 5120
    assert CacheConfig(sinks=64, window=256, cascades="auto", block=64).resolve(5120).cascades == 4  # 64-slot cascades
    # a window that does not split evenly: the newest cascades get the blocks left over, so auto takes
    # the C the document needs (9 for 23,414 tokens at window 512), not the next divisor of the window (16)
    genesis = CacheConfig(sinks=64, window=512, cascades="auto").resolve(23_414)
    assert genesis.cascades == 9 and genesis.sizes == [57] * 8 + [56]
    assert genesis.span >= 23_414 > CacheConfig(sinks=64, window=512, cascades=8).span
    assert CacheConfig(sinks=0, window=40, cascades=3, block=4).sizes == [16, 12, 12]
    assert CacheConfig(sinks=0, window=40, cascades=3, block=4, cascade_sizes="half").sizes == [20, 12, 8]
    # the sink policy is one window of single tokens whatever the cascade options say
    sink = CacheConfig(policy="sink", window=100, cascades=4, block=8, cascade_sizes="half")
    assert sink.sizes == [100] and make_cache(sink, model_config()).block == 1
    assert not make_cache(sink, model_config()).scored and make_cache(half, model_config()).scored


def test_blocks_move_whole_and_cascade_zero_keeps_its_size():
    # S=0, W=24 as 12 + 6 + 6 slots, blocks of 3: every resident block is 3 consecutive tokens
    cache = make_cache(CacheConfig(sinks=0, window=24, cascades=3, block=3, cascade_sizes="12,6,6"), model_config())
    feed(cache, [5] * 40 + [2], torch.Generator().manual_seed(7))
    order = cache_order(cache)
    # cascade 0: three whole blocks, then the unfinished one (token 201 opened the block [201, 202, 203])
    assert cache.seen == 202 and cache.count[0] == 10 and order[-10:] == list(range(192, 202))
    older = order[:-10]
    assert len(older) == 12 and older[0] < 192 - 12  # cascades 1 and 2 reach further back
    for block in [older[i:i + 3] for i in range(0, len(older), 3)]:  # whole aligned blocks
        assert block[0] % 3 == 0 and block == [block[0], block[0] + 1, block[0] + 2]


@pytest.mark.parametrize("kwargs,msg", [
    (dict(window=10, cascades=11), "too small for 11 cascades"),
    (dict(window=250, cascades=2, block=16), "multiple of the block"),
    (dict(policy="nope"), "policy"),
    (dict(window=0), "window"),
    (dict(sinks=-1), "sinks"),
    (dict(beta=0.0), "beta"),
    (dict(window=256, cascades=4, block=48), "block"),
    (dict(window=256, cascades=3, cascade_sizes="128,64,32"), "add up"),
    (dict(window=256, cascades=4, cascade_sizes="128,64,64"), "give 4 cascades"),
    (dict(cascade_sizes="big"), "cascade sizes"),
    (dict(block=0), "block"),
    (dict(contest="everyone"), "contest must be one of head, layer, model"),
    (dict(block_score="mean"), "block score must be one of max, sum"),
])
def test_bad_config_is_a_user_error(kwargs, msg):
    with pytest.raises(UserError, match=msg):
        CacheConfig(**kwargs)
