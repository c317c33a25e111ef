"""The engine on a tiny random Llama: exactness, chunking, scores, decoding, memory bounds."""

import copy

import pytest
import torch

from conftest import reference_logits
from engine.attention import apply_rope, chunk_attention, query_weights
from engine.cache import CacheConfig
from engine.errors import Cancelled, UserError
from engine.runtime import Engine, auto_stride


def read_logits(engine, ids, stride):
    cache = engine.new_cache()
    outs = [engine.forward(torch.tensor([ids[i:i + stride]]), cache, logits="all") for i in range(0, len(ids), stride)]
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("policy", ["cascade", "sink", "full"])
@pytest.mark.parametrize("stride", [1, 7, 64, 300])
def test_fits_in_cache_equals_plain_model(tiny_llama, policy, stride):
    ids = torch.randint(0, 257, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    engine = Engine(tiny_llama, CacheConfig(policy=policy, sinks=4, window=300, cascades=4), stride=stride)
    got, cache = read_logits(engine, ids, stride)
    want = reference_logits(tiny_llama, ids)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert cache.n_valid == 300


def test_eviction_changes_logits_but_positions_stay_bounded(tiny_llama):
    ids = torch.randint(0, 257, (600,), generator=torch.Generator().manual_seed(2)).tolist()
    config = CacheConfig(sinks=4, window=64, cascades=4)
    engine = Engine(tiny_llama, config, stride=32)
    got, cache = read_logits(engine, ids, 32)
    want = reference_logits(tiny_llama, ids)
    assert torch.allclose(got[:, :68], want[:, :68], atol=1e-4)  # before anything is evicted
    assert not torch.allclose(got[:, -32:], want[:, -32:], atol=1e-2)  # after: a different (bounded) context
    assert cache.n_valid == 68
    plan = cache.plan(32)
    assert int(plan.chunk_pos.max()) < config.sinks + config.window + 32  # never beyond S + W + stride


def test_chunked_reading_equals_one_shot_when_nothing_is_evicted(tiny_llama):
    ids = torch.randint(0, 257, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    # head_reduce="mean" is linear, so the EMA over chunks must equal the EMA over one chunk
    # ("max" is applied per forward, so it legitimately differs between chunkings)
    engine = Engine(tiny_llama, CacheConfig(sinks=8, window=256, cascades=2, head_reduce="mean"), stride=200)
    one_shot, c1 = read_logits(engine, ids, 200)
    chunked, c2 = read_logits(engine, ids, 17)
    assert torch.allclose(one_shot, chunked, atol=1e-4)
    for layer in range(2):
        assert torch.allclose(c1.score[layer], c2.score[layer], rtol=1e-4, atol=1e-5)


def test_focus_rows_feed_scores_but_never_enter_the_cache(tiny_llama):
    ids = torch.randint(0, 257, (96,), generator=torch.Generator().manual_seed(4)).tolist()
    question = [5, 17, 99, 3]
    engine = Engine(tiny_llama, CacheConfig(sinks=4, window=128, cascades=2, block=2), stride=32)
    plain, focused = engine.new_cache(), engine.new_cache()
    for i in range(0, 96, 32):
        chunk = torch.tensor([ids[i:i + 32]])
        want = engine.forward(chunk, plain, logits="all")
        got = engine.forward(chunk, focused, logits="all", focus=question)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5)  # causal: the chunk never sees them
    assert focused.n_valid == plain.n_valid == 96  # nothing evicted yet, and no question token was stored
    for layer in range(2):
        assert torch.equal(focused.pos[layer], plain.pos[layer])
        assert (focused.score[layer] >= plain.score[layer] - 1e-6).all()  # the question's rows only add
        assert (focused.score[layer] > plain.score[layer] + 1e-4).any()


def test_focus_share_sets_the_question_rows_weight_in_the_scores(tiny_llama):
    """--focus-share: the question's rows carry that share of the score mass. Scores are linear in the
    row weights (mean over the group), so each run is a known mix of the chunk's part and the question's."""
    from engine.attention import query_weights

    ids = torch.randint(0, 257, (32,), generator=torch.Generator().manual_seed(4)).tolist()
    question = [5, 17, 99, 3]
    engine = Engine(tiny_llama, CacheConfig(sinks=4, window=128, cascades=2, head_reduce="mean"), stride=32)
    caches = {}
    for name, share, focus in (("plain", None, None), ("focused", None, question), ("snap", 1.0, question),
                               ("half", 0.5, question)):
        engine.focus_share, caches[name] = share, engine.new_cache()
        engine.forward(torch.tensor([ids]), caches[name], focus=focus)
    w = query_weights(32 + 4, engine.config.beta)
    scale = float(w[:32].sum() / w[32:].sum())  # share 0.5: question rows x scale weigh as much as the chunk
    for layer in range(2):
        plain, focused, snap, half = (caches[n].score[layer] for n in ("plain", "focused", "snap", "half"))
        # share 1 (SnapKV): only the question's part; the chunk rows of a focused read weigh beta**4 more
        question_part = focused - engine.config.beta ** 4 * plain
        assert torch.allclose(snap, question_part, atol=1e-5)
        assert torch.allclose(half, focused + (scale - 1) * snap, atol=1e-4)
        assert (snap[..., 4:32] > 0).all()  # every document token past the sinks gets some of the question


def brute_force_scores(q, k_all, valid_all, scaling, beta, group):
    """Explicit softmax matrix per query head, then the weighted column sum, max over each GQA group."""
    b, hq, L, d = q.shape
    keys = k_all.shape[2]
    out = torch.zeros(b, hq // group, keys)
    slots = keys - L
    for bi in range(b):
        for h in range(hq):
            kv = h // group
            col = torch.zeros(keys)
            for t in range(L):
                logits = (k_all[bi, kv] @ q[bi, h, t]) * scaling
                allowed = valid_all.clone()
                allowed[slots + t + 1:] = False
                p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), 0)
                col += beta ** (L - 1 - t) * p
            out[bi, kv] = torch.maximum(out[bi, kv], col)
    return out


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("L", [9, 150])  # one query block, and several (the chunk's later keys skipped per block)
def test_scores_equal_brute_force_column_sums(group, L):
    torch.manual_seed(group)
    b, kv, slots, d = 2, 2, 13, 8
    q = torch.randn(b, kv * group, L, d)
    kc, vc = torch.randn(b, kv, slots, d), torch.randn(b, kv, slots, d)
    kn, vn = torch.randn(b, kv, L, d), torch.randn(b, kv, L, d)
    valid = torch.rand(slots) > 0.3
    beta = 0.9
    out, cs, ns = chunk_attention(q, kc, vc, valid, kn, vn, 0.3, weights=query_weights(L, beta))
    want = brute_force_scores(q, torch.cat((kc, kn), 2), torch.cat((valid, torch.ones(L, dtype=torch.bool))), 0.3,
                              beta, group)
    assert torch.allclose(torch.cat((cs, ns), -1), want, atol=1e-5)
    assert torch.all(cs[..., ~valid] == 0)
    ref_out, _, _ = chunk_attention(q, kc, vc, valid, kn, vn, 0.3)  # the sdpa path
    assert torch.allclose(out, ref_out, atol=1e-5)


def test_bfloat16_attention_stays_close_to_float32():
    """bfloat16 inputs keep logits, probabilities and block score sums in bfloat16 (engine.attention):
    the output and the score sums stay within bfloat16's own error of the float32 computation."""
    torch.manual_seed(0)
    kv, group, slots, L, d = 3, 3, 200, 150, 64
    args = [torch.randn(1, kv * group, L, d), torch.randn(1, kv, slots, d), torch.randn(1, kv, slots, d),
            torch.rand(slots) > 0.2, torch.randn(1, kv, L, d), torch.randn(1, kv, L, d)]
    low = [a.bfloat16() if a.is_floating_point() else a for a in args]
    high = [a.float() if a.is_floating_point() else a for a in low]  # the same rounded inputs in float32
    w = query_weights(L, 0.9999)
    got = chunk_attention(*low[:4], *low[4:], 0.125, weights=w)
    want = chunk_attention(*high[:4], *high[4:], 0.125, weights=w)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert (got[0].float() - want[0]).abs().max() < 0.02 * want[0].abs().max()
    for g, ref in zip(got[1:], want[1:]):
        assert (g - ref).abs().max() < 0.01 * ref.abs().max()
        assert torch.equal(g == 0, ref == 0)  # masked slots get exactly nothing


def test_pushing_all_layers_at_once_equals_one_push_per_layer(tiny_llama):
    """runtime pushes every layer in one push, the layers as batch rows: same cache as layer by layer."""
    engine = Engine(tiny_llama, CacheConfig(sinks=4, window=32, cascades=4), stride=16)
    _, cache = read_logits(engine, list(range(1, 200)), 16)  # filled and evicting
    per_layer, g = cache.clone(), torch.Generator().manual_seed(5)
    for chunk in range(3):
        plan = cache.plan(16)
        shape = (cache.batch, cache.kv_heads, 16, cache.head_dim)
        rows = [tuple(t.to(cache.device) for t in (  # drawn on the CPU (one generator), pushed on the cache's device
                 torch.randn(shape, generator=g), torch.randn(shape, generator=g),
                 torch.rand(cache.batch, cache.kv_heads, cache.config.sinks + cache.config.window, generator=g),
                 torch.rand(cache.batch, cache.kv_heads, 16, generator=g))) for _ in range(cache.n_layers)]
        for layer, row in enumerate(rows):
            per_layer.push(layer, plan, *row)
        stacked = cache.layers_as_batch()
        stacked.push(0, plan, *(torch.cat(parts) for parts in zip(*rows)))
        cache.take_layers(stacked)
        cache.commit(plan)
        per_layer.commit(plan)
        for name, a in cache.state().items():
            assert torch.equal(a, per_layer.state()[name]), (chunk, name)


@pytest.mark.parametrize("block", [1, 4])
def test_shared_contests_keep_the_same_tokens_in_every_head_they_span(block):
    """--contest layer: a layer's KV heads hold the same tokens; model: every layer and head does.
    The paper's per-head contests (head) let them differ, which is what sharing is for."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import device_under_test
    from engine.models import LoadedModel

    torch.manual_seed(0)  # large weights: sharp attention, so heads disagree on which tokens matter
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=257, initializer_range=0.5)
    sharp = LoadedModel(model=LlamaForCausalLM(config).eval().to(device_under_test()), tokenizer=None,
                        spec="tiny", model_id="tiny-llama-sharp", prompt_format="plain")
    ids = torch.randint(0, 257, (600,), generator=torch.Generator().manual_seed(6)).tolist()
    pos = {}
    for contest in ("head", "layer", "model"):
        engine = Engine(sharp, CacheConfig(sinks=4, window=64, cascades=4, block=block, contest=contest), stride=32)
        _, cache = read_logits(engine, ids, 32)
        pos[contest] = torch.stack([cache.pos[layer][0] for layer in range(cache.n_layers)])  # [layers, kv_heads, slots]
        assert cache.n_valid == 68
    assert cache.kv_heads > 1 and cache.n_layers > 1
    assert not torch.equal(pos["head"], pos["head"][:, :1].expand_as(pos["head"]))  # heads differ
    assert torch.equal(pos["layer"], pos["layer"][:, :1].expand_as(pos["layer"]))
    assert not torch.equal(pos["layer"], pos["layer"][:1].expand_as(pos["layer"]))  # layers still differ
    assert torch.equal(pos["model"], pos["model"][:1, :1].expand_as(pos["model"]))


def test_rope_at_cache_positions_matches_model_rotation(tiny_llama):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    engine = Engine(tiny_llama, CacheConfig(), stride=8)
    x = torch.randn(1, 2, 5, 16, device=engine.device)
    pos = torch.tensor([0, 3, 4, 100, 2000], device=engine.device)
    cos, sin = tiny_llama.model.model.rotary_emb(x, pos[None])
    want, _ = apply_rotary_pos_emb(x, x, cos, sin)
    c, s = engine.rope["global"](pos)
    assert torch.allclose(apply_rope(x, c, s), want, atol=1e-5)
    far = pos + 100_000  # beyond the table: computed on the fly (rope="original" on a long book)
    cos, sin = tiny_llama.model.model.rotary_emb(x, far[None])
    want, _ = apply_rotary_pos_emb(x, x, cos, sin)
    c, s = engine.rope["global"](far)
    assert torch.allclose(apply_rope(x, c, s), want, atol=1e-4)


def test_generation_is_deterministic_and_leaves_snapshot_intact(tiny_llama):
    ids = torch.randint(0, 257, (150,), generator=torch.Generator().manual_seed(4)).tolist()
    engine = Engine(tiny_llama, CacheConfig(sinks=4, window=32, cascades=2), stride=16)
    cache = engine.new_cache()
    engine.read([ids[:70], ids[70:]], cache)
    before = {k: v.clone() for k, v in cache.state().items()}
    a = list(engine.generate(cache.clone(), [5, 6, 7], max_new_tokens=10))
    b = list(engine.generate(cache.clone(), [5, 6, 7], max_new_tokens=10))
    assert a == b and len(a) == 10
    for k, v in cache.state().items():
        assert torch.equal(v, before[k])
    # greedy decode equals argmax of the plain model when everything fits
    big = Engine(tiny_llama, CacheConfig(sinks=4, window=400, cascades=2), stride=16)
    c2 = big.new_cache()
    big.read([ids], c2)
    gen = list(big.generate(c2, [5, 6, 7], max_new_tokens=5))
    seq = ids + [5, 6, 7]
    for tok in gen:
        assert tok == int(reference_logits(tiny_llama, seq)[0, -1].argmax())
        seq.append(tok)


def test_read_reports_progress_and_can_cancel(tiny_llama):
    engine = Engine(tiny_llama, CacheConfig(sinks=4, window=32, cascades=2), stride=10)
    seen = []
    done = engine.read(iter([[1] * 25, [2] * 20]), engine.new_cache(), total=45, progress=seen.append)
    # the last 5 tokens go as 4 + 1: chunk lengths seen before (runtime.tail_chunks)
    assert [p.tokens_read for p in seen] == [10, 20, 30, 40, 44, 45] and done.tokens_read == 45
    assert seen[-1].eta_seconds == 0 and seen[0].tokens_per_second > 0
    with pytest.raises(Cancelled):
        engine.read([[1] * 100], engine.new_cache(), should_stop=lambda: len(seen) > 6,
                    progress=seen.append)
    assert len(seen) == 7  # stopped within one chunk


def test_memory_is_independent_of_length(tiny_llama):
    engine = Engine(tiny_llama, CacheConfig(sinks=4, window=32, cascades=4), stride=16)
    sizes = []
    for n in (200, 2000):
        cache = engine.new_cache()
        engine.read(([3] * 50 for _ in range(n // 50)), cache)
        sizes.append(cache.nbytes())
        assert cache.seen == n
    assert sizes[0] == sizes[1]


def test_bad_stride_is_a_user_error(tiny_llama):
    with pytest.raises(UserError, match="stride"):
        Engine(tiny_llama, CacheConfig(), stride=0)
    with pytest.raises(UserError, match="stride must be >= 1 or auto, not fast"):
        Engine(tiny_llama, CacheConfig(), stride="fast")


def test_auto_stride_follows_the_device_and_fits_the_models_positions(tiny_llama):
    config = CacheConfig(sinks=64, window=512)
    model_config = copy.deepcopy(tiny_llama.model.config)
    model_config.max_position_embeddings = 8192
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # only the device's type is read: no GPU needed
    assert auto_stride(cpu, model_config, config) == 512
    assert auto_stride(cuda, model_config, config) == 4096  # 64 + 512 + 4096 fit in 8192
    model_config.max_position_embeddings = 4096
    assert auto_stride(cuda, model_config, config) == 2048  # 64 + 512 + 4096 do not fit; 2048 does
    model_config.sliding_window = 2047  # a sliding window on every layer (Phi-3-mini-4k) binds first
    assert auto_stride(cuda, model_config, config) == 1024
    model_config.sliding_window, model_config.max_position_embeddings = None, 600
    assert auto_stride(cuda, model_config, config) == 512  # never below 512: too small a model is refused elsewhere
    engine = Engine(tiny_llama, config, stride="auto")
    assert engine.stride == auto_stride(engine.device, tiny_llama.model.config, config)


def test_rope_original_ablation(tiny_llama):
    ids = torch.randint(0, 257, (400,), generator=torch.Generator().manual_seed(6)).tolist()
    # nothing evicted: original positions == in-cache positions, so both modes equal the plain model
    fit = Engine(tiny_llama, CacheConfig(sinks=4, window=400, cascades=4, rope="original"), stride=64)
    got, _ = read_logits(fit, ids, 64)
    assert torch.allclose(got, reference_logits(tiny_llama, ids), atol=1e-4)
    # after evictions the two modes rotate keys differently, so their logits differ
    small = dict(sinks=4, window=32, cascades=4)
    a, ca = read_logits(Engine(tiny_llama, CacheConfig(**small), stride=64), ids, 64)
    b, cb = read_logits(Engine(tiny_llama, CacheConfig(**small, rope="original"), stride=64), ids, 64)
    assert torch.allclose(a[:, :36], b[:, :36], atol=1e-4) and not torch.allclose(a[:, -64:], b[:, -64:], atol=1e-3)


def test_read_trace_cuts_quarters_by_tokens():
    """A read's flatness is measured over quarters of its tokens: a book of 8 strides of 4,096 whose rest is
    read in power-of-two chunks (runtime.tail_chunks) at one second per forward, whatever its length,
    has a last quarter of ~8k tokens, not the last few chunks' ~100 (it reported 4 tok/s on a GPU)."""
    from engine.bench import ReadTrace
    from engine.runtime import ReadProgress, tail_chunks

    trace, read = ReadTrace(), 0
    lengths = [4096] * 8 + tail_chunks(1365, 4096)
    for i, n in enumerate(lengths):
        read += n
        trace(ReadProgress(read, None, float(i + 1)))
    s = trace.summary()
    assert s["tokens"] == 8 * 4096 + 1365
    assert s["first_quarter_tps"] == 4096  # samples 0 -> 2: two strides in two seconds
    # from the last sample before 3/4 of the tokens (6 strides) to the end: 2 strides and the rest, in 2 + 6 s
    assert s["last_quarter_tps"] == (2 * 4096 + 1365) / (len(lengths) - 6)
    assert len(s["rss_mb_at_quarters"]) == 4


@pytest.mark.parametrize("n", [1, 5, 300])
def test_bench_tokens_returns_short_lengths(n):
    """`engine bench --ceiling-max 1` asked for one token of KJV text: the text cut to 6 characters was
    empty (no whole verse fits) and the tokenizing loop never ended."""
    from engine.bench import bench_tokens
    from tiny_models import word_tokenizer

    ids = bench_tokens(word_tokenizer(["In", "the", "beginning", "God"]), n)
    assert len(ids) == n


@pytest.mark.parametrize("scored", [True, False])
def test_compute_dtype_is_converting_the_inputs_first(scored):
    """Answering on CPU attends in float32 over bfloat16 slots: the slots are converted while they are
    joined with the chunk (`join_slots`, one pass), giving exactly what converting them first gives."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 3, 16, generator=g).bfloat16() for _ in range(3))
    kc, vc = (torch.randn(1, 2, 40, 16, generator=g).bfloat16() for _ in range(2))
    k, v = k[:, :2], v[:, :2]
    valid = torch.ones(40, dtype=torch.bool)
    valid[5:9] = False
    weights = query_weights(3, 0.99) if scored else None
    a = chunk_attention(q, kc, vc, valid, k, v, 0.25, weights=weights, compute_dtype=torch.float32)
    b = chunk_attention(q.float(), kc.float(), vc.float(), valid, k.float(), v.float(), 0.25, weights=weights)
    assert a[0].dtype == torch.float32
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y)


def test_bench_paired_times_the_ceiling_beside_each_chunk(tmp_path):
    """`engine bench --paired`: after each cascade chunk the same chunk runs with attention skipped; the
    worker reports the ratio of the sums and the per-chunk quartiles, and its own tok/s without the
    ceiling's time."""
    from engine import pipeline
    from engine.bench import worker
    from tiny_models import tiny_llama, word_tokenizer

    tokenizer = word_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path)
    job = {"model": str(tmp_path), "device": "cpu", "dtype": "float32", "policy": "cascade", "length": 640,
           "sinks": 4, "window": 32, "cascades": 2, "stride": 64, "block": 1, "cascade_sizes": "equal",
           "contest": "head", "block_score": "max", "threads": torch.get_num_threads(), "pipeline": "off"}
    try:  # pipelined reads pair segments (tests/test_pipeline.py)
        alone, paired = worker(job), worker({**job, "paired": True})
    finally:
        pipeline.configure("auto")
    assert "over_paired_ceiling" not in alone
    low, median, high = paired["over_paired_ceiling_quartiles"]
    assert 0 < low <= median <= high and paired["over_paired_ceiling"] > 0 and paired["paired_ceiling_tps"] > 0
    assert paired["tokens_per_second"] == pytest.approx(640 / paired["seconds"])
    assert (paired["paired_unit"], paired["paired_units"]) == ("chunk", 10)


def test_the_ceiling_between_chunks_gives_the_model_its_attention_back(tiny_llama):
    """Skipped attention (the ceiling) must not leak into the cascade read around it: the chunk read after
    it writes real keys into the cache and the same logits as a read that never skipped."""
    from engine.bench import attention_skipped

    ids = torch.randint(0, 257, (1, 128), generator=torch.Generator().manual_seed(3))
    out = {}
    for skip_between in (False, True):
        engine = Engine(tiny_llama, CacheConfig(sinks=4, window=32, cascades=2), stride=64)
        cache = engine.new_cache()
        engine.forward(ids[:, :64], cache)
        if skip_between:
            with attention_skipped(tiny_llama.model):
                tiny_llama.model.model(input_ids=ids[:, 64:], use_cache=False)
        out[skip_between] = engine.forward(ids[:, 64:], cache, logits="all")
        assert cache.resident(0)[0].abs().sum() > 0
    assert torch.equal(out[False], out[True])
