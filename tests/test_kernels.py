"""Triton kernels against the torch reference: by Triton's interpreter on CPU (small shapes), or
compiled on CUDA with TRITON_INTERPRET=0 CASCADE_TEST_DEVICE=cuda (scripts/gpu_check.sh).

TRITON_INTERPRET must be set before Triton is first imported (triton.jit picks the interpreter at
decoration time, for Triton's own tl.* helpers too); conftest.py sets it before any test module loads.
"""

import os

import pytest
import torch

from conftest import device_under_test

from engine.attention import chunk_attention as reference
from engine.attention import query_weights, window_bias

triton_attention = pytest.importorskip("engine.kernels.triton_attention")
triton_push = pytest.importorskip("engine.kernels.triton_push")

DEVICE = device_under_test()
if os.environ.get("TRITON_INTERPRET") == "0" and DEVICE.type != "cuda":
    pytest.skip("compiled Triton kernels need CUDA: set CASCADE_TEST_DEVICE=cuda, or TRITON_INTERPRET=1 to interpret",
                allow_module_level=True)


def inputs(batch, kv_heads, group, slots, length, head_dim, dtype, empty=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    q = r(batch, kv_heads * group, length, head_dim)
    kc, vc = r(batch, kv_heads, slots, head_dim), r(batch, kv_heads, slots, head_dim)
    # chunk keys/values as transformers hands them over: [batch, L, heads, dim] transposed (strided)
    kn = r(batch, length, kv_heads, head_dim).transpose(1, 2)
    vn = r(batch, length, kv_heads, head_dim).transpose(1, 2)
    valid = torch.rand(slots, generator=g) >= empty
    return tuple(t.to(DEVICE) for t in (q, kc, vc, valid, kn, vn))


CASES = [  # batch, kv_heads, group, slots, L, head_dim, dtype, share of empty slots
    (1, 2, 1, 37, 21, 64, torch.float32, 0.0),   # GQA 1; slots and L not multiples of any block
    (2, 1, 3, 50, 17, 64, torch.float32, 0.3),   # batch 2, GQA 3, empty slots
    (1, 2, 4, 20, 1, 64, torch.float32, 0.0),    # decode: one query (split-K kernel)
    (2, 1, 3, 45, 1, 64, torch.float32, 0.5),    # decode, batch 2, GQA 3, several splits, holes
    (1, 1, 4, 19, 5, 256, torch.float32, 0.5),   # Gemma-3 head_dim, partial last chunk
    (1, 1, 3, 0, 9, 64, torch.float32, 0.0),     # no cache yet (the first chunk)
    (1, 2, 2, 20, 6, 64, torch.float32, 1.0),    # cache allocated but every slot empty
    (1, 2, 3, 33, 18, 64, torch.bfloat16, 0.2),  # bf16 inputs
    (1, 2, 4, 26, 1, 64, torch.bfloat16, 0.2),   # bf16 decode
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
@pytest.mark.parametrize("head_reduce", ["max", "mean"])
def test_triton_matches_reference(case, head_reduce):
    batch, kv_heads, group, slots, length, head_dim, dtype, empty = case
    q, kc, vc, valid, kn, vn = inputs(batch, kv_heads, group, slots, length, head_dim, dtype, empty)
    w = query_weights(length, 0.99)
    want = reference(q, kc, vc, valid, kn, vn, head_dim ** -0.5, weights=w, head_reduce=head_reduce)
    got = triton_attention.chunk_attention(q, kc, vc, valid, kn, vn, head_dim ** -0.5, weights=w,
                                           head_reduce=head_reduce)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-4)
    assert got[0].dtype == dtype and got[0].shape == want[0].shape
    assert torch.allclose(got[0].float(), want[0].float(), **tol)
    assert got[1].dtype == got[2].dtype == torch.float32
    assert torch.allclose(got[1], want[1], **tol) and torch.allclose(got[2], want[2], **tol)
    assert torch.all(got[1][..., ~valid] == 0)  # empty slots get exactly nothing


def test_without_scores_and_sliding_window_mask():
    q, kc, vc, valid, kn, vn = inputs(1, 2, 2, 21, 13, 64, torch.float32, 0.2, seed=1)
    out, cs, ns = triton_attention.chunk_attention(q, kc, vc, valid, kn, vn, 0.125)
    assert cs is None and ns is None
    assert torch.allclose(out, reference(q, kc, vc, valid, kn, vn, 0.125)[0], atol=1e-5)
    cache_pos = torch.randperm(21, generator=torch.Generator().manual_seed(1)).to(DEVICE).masked_fill(~valid, 0)
    bias = window_bias(cache_pos, valid, 21 + torch.arange(13, device=DEVICE), 9)  # Gemma-3 sliding layer
    want = reference(q, kc, vc, valid, kn, vn, 0.125, window_bias=bias)[0]
    got = triton_attention.chunk_attention(q, kc, vc, valid, kn, vn, 0.125, window_bias=bias)[0]
    assert torch.allclose(got, want, atol=1e-5)


def brute_force_scores(q, k_all, valid_all, scaling, beta, group, head_reduce):
    """Explicit softmax matrix per query head (python loop), weighted column sums, group reduce."""
    b, hq, L, _ = q.shape
    slots = k_all.shape[2] - L
    allowed = torch.cat((valid_all[:slots].expand(L, -1), torch.ones(L, L, dtype=torch.bool).tril()), 1)
    per_head = torch.zeros(b, hq, k_all.shape[2], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            logits = (q[bi, h].double() @ k_all[bi, h // group].double().T) * scaling  # [L, keys]
            p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
            per_head[bi, h] = (beta ** torch.arange(L - 1, -1, -1, dtype=torch.float64)) @ p
    per_head = per_head.view(b, hq // group, group, -1)
    return (per_head.amax(2) if head_reduce == "max" else per_head.mean(2)).float()


@pytest.mark.parametrize("group,head_reduce", [(3, "max"), (4, "mean")])
def test_scores_equal_brute_force_column_sums(group, head_reduce):
    q, kc, vc, valid, kn, vn = inputs(2, 2, group, 23, 11, 64, torch.float32, 0.25, seed=3)
    _, cs, ns = triton_attention.chunk_attention(q, kc, vc, valid, kn, vn, 0.1, weights=query_weights(11, 0.9),
                                                 head_reduce=head_reduce)
    want = brute_force_scores(q.cpu(), torch.cat((kc, kn), 2).cpu(), valid.cpu(), 0.1, 0.9, group, head_reduce)
    assert torch.allclose(torch.cat((cs, ns), -1).cpu(), want, atol=1e-5)


@pytest.mark.parametrize("sinks,window,cascades,block,sizes,chunks,block_score", [
    (4, 24, 3, 1, "equal", [7] * 20 + [5, 1, 1, 1, 30, 2], "max"),  # ring wraps, contests with the incumbent
    (2, 12, 4, 1, "equal", [3, 50, 1, 1, 9, 13, 40], "max"),  # chunks longer than a cascade: the incumbent is evicted
    (3, 36, 3, 3, "equal", [7] * 12 + [1, 1, 2, 40, 5, 1], "max"),  # blocks of 3: unfinished blocks, block contests
    (3, 36, 3, 3, "equal", [7] * 12 + [1, 1, 2, 40, 5, 1], "sum"),  # the same, blocks scored by their sum
    (0, 32, 3, 2, "16,8,8", [5, 3, 70, 1, 1, 9, 33], "max"),  # blocks of 2 and a larger cascade 0
    (1, 34, 4, 2, "equal", [5, 3, 70, 1, 1, 9, 33], "sum"),  # uneven sizes (10, 8, 8, 8), sums of blocks of 2
])
def test_push_kernel_matches_torch_push(sinks, window, cascades, block, sizes, chunks, block_score):
    from engine.cache import CacheConfig, CascadeCache

    config = CacheConfig(sinks=sinks, window=window, cascades=cascades, beta=0.9, block=block, cascade_sizes=sizes,
                         block_score=block_score)
    want, got = (CascadeCache(config, 1, 2, 16, batch=2, device=DEVICE) for _ in range(2))
    g = torch.Generator().manual_seed(sinks)
    for length in chunks:
        plan_want, plan_got = want.plan(length), got.plan(length)
        k = torch.randn(2, length, 2, 16, generator=g).to(DEVICE).transpose(1, 2)  # strided, as from transformers
        v = torch.randn(2, length, 2, 16, generator=g).to(DEVICE).transpose(1, 2)
        slots = sinks + window
        cache_score = (torch.rand(2, 2, slots, generator=g) * (torch.rand(slots, generator=g) < 0.7)).to(DEVICE)
        chunk_score = torch.randint(0, 3, (2, 2, length), generator=g).float().to(DEVICE)  # many ties
        want.push(0, plan_want, k, v, cache_score, chunk_score)
        triton_push.push(got, 0, plan_got, k, v, cache_score, chunk_score)
        want.commit(plan_want)
        got.commit(plan_got)
        for name in ("keys", "values", "score", "pos"):
            assert torch.equal(getattr(got, name)[0], getattr(want, name)[0]), (name, length)


def test_engine_gives_same_tokens_with_kernels_forced_on(tiny_llama, monkeypatch):
    from engine import kernels
    from engine.cache import CacheConfig, CascadeCache
    from engine.runtime import Engine

    ids = torch.randint(0, 257, (100,), generator=torch.Generator().manual_seed(5)).tolist()
    runs, calls = {}, []
    for name, module in (("attention", triton_attention), ("push", triton_push)):
        fn = module.chunk_attention if name == "attention" else module.push_level
        counted = lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k)  # noqa: E731
        monkeypatch.setattr(module, fn.__name__, counted)
    for path in ("torch", "triton"):
        monkeypatch.setenv("CASCADE_KERNELS", path)
        if path == "triton":  # the engine calls cache.push; route it through the dispatch (push kernel)
            monkeypatch.setattr(CascadeCache, "push", lambda self, *a: kernels.cascade_push(self, *a))
        engine = Engine(tiny_llama, CacheConfig(policy="cascade", sinks=4, window=24, cascades=3), stride=7)
        cache = engine.new_cache()
        engine.read([ids], cache)
        runs[path] = (list(engine.generate(cache, [1, 2, 3], max_new_tokens=8)), cache)
    (want_tokens, want), (got_tokens, got) = runs["torch"], runs["triton"]
    assert {"attention", "push"} <= set(calls)  # the Triton kernels really ran
    assert got_tokens == want_tokens
    for layer in range(2):
        assert torch.equal(got.pos[layer], want.pos[layer])  # the same tokens were kept
        assert torch.allclose(got.score[layer], want.score[layer], rtol=1e-4, atol=1e-5)


def test_kernel_bench_runs_without_cuda(tmp_path, monkeypatch):
    import json

    from engine.kernels.bench import run_kernel_bench

    monkeypatch.setenv("CASCADE_KERNELS", "torch")  # the interpreter would take minutes at these sizes
    result = run_kernel_bench(tmp_path, sizes=[300, 700], cache_slots=128, device="cpu")
    assert [r["tokens"] for r in result["rows"]] == [300, 700] and result["settings"]["cache_slots"] == 128
    assert all(r["cascade_s"] > 0 and r["full_s"] > 0 for r in result["rows"])
    assert json.loads((tmp_path / "kernel_bench.json").read_text())["rows"] == result["rows"]
    assert (tmp_path / "kernel_bench.png").stat().st_size > 0


def test_fixed_config_mode_keeps_one_small_tile_for_every_kernel():
    """CASCADE_AUTOTUNE=0 (compiled correctness runs): one config, the smallest tile, so that a new
    shape costs one compile and no timing runs; autotune keeps every option."""
    options = [(128, 64, 8, 3), (64, 64, 4, 3), (32, 32, 4, 2), (32, 32, 4, 1), (16, 256, 8, 2)]
    fixed = triton_attention._configs(options, mode="fixed")
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in fixed] == [(32, 32, 4, 1)]
    assert len(triton_attention._configs(options, mode="autotune")) == len(options)
    interpreted = triton_attention._configs(options, mode="interpret")
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in interpreted] == [(16, 16)]
