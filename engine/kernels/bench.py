"""Kernel benchmark: strided prefill with the cascade cache vs full attention over the whole prompt.

The paper's setup: one attention layer of an 8B-shaped model (32 query / 8 KV heads, head_dim 128),
random inputs, prompts of 8k .. 1M tokens, a 16k-slot cache. Ours = for every chunk, chunk attention
with exact scores + the cascade push; baseline = torch SDPA (flash attention on GPU) over the full
causal prompt. On CPU the same code runs at small sizes so it is exercised in CI.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..attention import query_weights
from ..cache import CacheConfig, CascadeCache
from . import backend, chunk_attention


def _shape(device: torch.device) -> dict:
    if device.type == "cuda":
        return dict(q_heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16, stride=4096, sinks=64,
                    window=16384 - 64, cascades=4, sizes=[8192, 32768, 131072, 524288, 1048576])
    return dict(q_heads=8, kv_heads=2, head_dim=64, dtype=torch.float32, stride=256, sinks=32, window=480,
                cascades=4, sizes=[1024, 2048, 4096])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_cascade(n: int, s: dict, device) -> float:
    """Seconds to stream n tokens through one layer: chunk attention + scores + push per chunk."""
    config = CacheConfig(sinks=s["sinks"], window=s["window"], cascades=s["cascades"])
    cache = CascadeCache(config, 1, s["kv_heads"], s["head_dim"], dtype=s["dtype"], device=device)
    g = torch.Generator(device=device).manual_seed(0)
    L = s["stride"]
    q = torch.randn(1, s["q_heads"], L, s["head_dim"], generator=g, device=device, dtype=s["dtype"])
    k = torch.randn(1, s["kv_heads"], L, s["head_dim"], generator=g, device=device, dtype=s["dtype"])
    v = torch.randn_like(k)
    w = query_weights(L, config.beta, device)
    scale = s["head_dim"] ** -0.5
    _sync(device)
    start = time.perf_counter()
    for _ in range(0, n, L):
        plan = cache.plan(L)
        k_res, v_res = cache.resident(0)
        _, cs, ns = chunk_attention(q, k_res, v_res, plan.cache_valid, k, v, scale, weights=w)
        cache.push(0, plan, k, v, cs, ns)
        cache.commit(plan)
    _sync(device)
    return time.perf_counter() - start


def time_full(n: int, s: dict, device) -> float | None:
    """Seconds for causal SDPA over the whole prompt (None if it does not fit in memory)."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, s["q_heads"], n, s["head_dim"], generator=g, device=device, dtype=s["dtype"])
        k = torch.randn(1, s["kv_heads"], n, s["head_dim"], generator=g, device=device, dtype=s["dtype"])
        v = torch.randn_like(k)
        _sync(device)
        start = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        _sync(device)
        return time.perf_counter() - start
    except torch.OutOfMemoryError:
        return None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_kernel_bench(out_dir, sizes=None, device=None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    s = _shape(device)
    sizes = sizes or s["sizes"]
    time_cascade(2 * s["stride"], s, device)  # warm-up (autotuning, allocations)
    rows = []
    for n in sizes:
        ours, full = time_cascade(n, s, device), time_full(n, s, device)
        rows.append({"tokens": n, "cascade_s": ours, "full_s": full,
                     "speedup": (full / ours) if full else None})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in s.items() if k != "sizes"}
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "backend": backend(torch.empty(0, device=device)), "settings": settings, "rows": rows,
              "summary": {f"speedup_at_{r['tokens']}": r["speedup"] for r in rows}}
    (out / "kernel_bench.json").write_text(json.dumps(result, indent=1))
    _plot(rows, out / "kernel_bench.png", result["device"])
    result["json"], result["png"] = str(out / "kernel_bench.json"), str(out / "kernel_bench.png")
    return result


def _plot(rows, path, device_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["tokens"] for r in rows]
    ax.plot(x, [r["cascade_s"] for r in rows], marker="o", label="cascade (chunk attention + push)")
    ax.plot([r["tokens"] for r in rows if r["full_s"]], [r["full_s"] for r in rows if r["full_s"]], marker="o",
            label="full attention (SDPA)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("seconds (one layer)")
    ax.set_title(f"prefill attention, {device_name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
