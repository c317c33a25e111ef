"""Triton kernels against the torch reference, run by Triton's interpreter on CPU (small shapes)."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton compiles anything: run kernels on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402

from engine.attention import chunk_attention as reference  # noqa: E402
from engine.attention import query_weights  # noqa: E402

triton_attention = pytest.importorskip("engine.kernels.triton_attention")


def inputs(batch, kv_heads, group, slots, length, head_dim, dtype, empty=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    q = r(batch, kv_heads * group, length, head_dim)
    kc, vc = r(batch, kv_heads, slots, head_dim), r(batch, kv_heads, slots, head_dim)
    kn, vn = r(batch, kv_heads, length, head_dim), r(batch, kv_heads, length, head_dim)
    valid = torch.rand(slots, generator=g) >= empty
    return q, kc, vc, valid, kn, vn


CASES = [  # batch, kv_heads, group, slots, L, head_dim, dtype, empty share
    (1, 2, 1, 37, 21, 64, torch.float32, 0.0),   # slots and L not multiples of any block
    (2, 1, 3, 50, 17, 64, torch.float32, 0.3),   # batch 2, GQA 3, empty slots
    (1, 2, 4, 20, 1, 64, torch.float32, 0.0),    # decode: one query
    (1, 1, 4, 19, 5, 256, torch.float32, 0.5),   # Gemma-3 head_dim, partial last chunk
    (1, 1, 3, 0, 9, 64, torch.float32, 0.0),     # empty cache (the first chunk)
    (1, 2, 3, 33, 18, 64, torch.bfloat16, 0.2),  # bf16 inputs
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
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    assert got[0].dtype == dtype
    assert torch.allclose(got[0].float(), want[0].float(), **tol)
    assert got[1].dtype == torch.float32
    assert torch.allclose(got[1], want[1], **tol) and torch.allclose(got[2], want[2], **tol)
    assert torch.all(got[1][..., ~valid] == 0)


def test_scores_equal_brute_force_column_sums():
    from test_engine import brute_force_scores

    q, kc, vc, valid, kn, vn = inputs(1, 2, 3, 23, 11, 64, torch.float32, 0.25, seed=3)
    _, cs, ns = triton_attention.chunk_attention(q, kc, vc, valid, kn, vn, 0.1, weights=query_weights(11, 0.9))
    want = brute_force_scores(q, torch.cat((kc, kn), 2), torch.cat((valid, torch.ones(11, dtype=torch.bool))),
                              0.1, 0.9, 3)
    assert torch.allclose(torch.cat((cs, ns), -1), want, atol=1e-5)


def test_engine_gives_same_tokens_with_kernels_forced_on(tiny_llama, monkeypatch):
    from engine.cache import CacheConfig
    from engine.runtime import Engine

    ids = torch.randint(0, 257, (90,), generator=torch.Generator().manual_seed(5)).tolist()
    runs = {}
    for path in ("torch", "triton"):
        monkeypatch.setenv("CASCADE_KERNELS", path)
        engine = Engine(tiny_llama, CacheConfig(sinks=4, window=24, cascades=3), stride=7)
        cache = engine.new_cache()
        engine.read([ids], cache)
        runs[path] = (list(engine.generate(cache, [1, 2, 3], max_new_tokens=8)), cache.pos[0].clone())
    assert runs["torch"][0] == runs["triton"][0]
    assert torch.equal(runs["torch"][1], runs["triton"][1])  # the same tokens were kept


def test_kernel_bench_runs_on_cpu(tmp_path):
    from engine.kernels.bench import run_kernel_bench

    result = run_kernel_bench(tmp_path, sizes=[512, 1024])
    assert (tmp_path / "kernel_bench.json").exists() and (tmp_path / "kernel_bench.png").exists()
    assert [r["tokens"] for r in result["rows"]] == [512, 1024]
    assert all(r["cascade_s"] > 0 and r["full_s"] > 0 for r in result["rows"])
