"""Kernel benchmark: strided prefill with the cascade cache vs full attention over the whole prompt.

The paper's setup: one attention layer of an 8B-shaped model (32 query / 8 KV heads, head_dim 128),
random inputs, prompts of 8k .. 1M tokens, a 16k-slot cache. Ours = for every chunk, chunk attention
with exact scores + the cascade push; baseline = torch SDPA (flash attention on GPU) over the full
causal prompt. On CPU the same code runs at small sizes so it is exercised in CI.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..attention import query_weights
from ..cache import CacheConfig, CascadeCache
from ..devices import peak_memory_mb
from . import backend, cascade_push, chunk_attention


def _shape(device: torch.device, cache_slots: int | None) -> dict:
    """The benchmark's layer. cache_slots None: 16384 on CUDA, 512 on CPU (where it must stay fast)."""
    if device.type == "cuda":
        slots = cache_slots or 16384
        return dict(q_heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16, stride=4096, sinks=64,
                    window=slots - 64, cascades=4, sizes=[8192, 32768, 131072, 524288, 1048576])
    slots = cache_slots or 512
    return dict(q_heads=8, kv_heads=2, head_dim=64, dtype=torch.float32, stride=256, sinks=32, window=slots - 32,
                cascades=4, sizes=[1024, 2048, 4096])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_cascade(n: int, s: dict, device) -> tuple[float, float]:
    """Seconds to stream n tokens through one layer, per chunk: (chunk attention + exact scores, push)."""
    config = CacheConfig(sinks=s["sinks"], window=s["window"], cascades=s["cascades"])
    cache = CascadeCache(config, 1, s["kv_heads"], s["head_dim"], dtype=s["dtype"], device=device)
    g = torch.Generator(device=device).manual_seed(0)
    L = s["stride"]
    q = torch.randn(1, s["q_heads"], L, s["head_dim"], generator=g, device=device, dtype=s["dtype"])
    k = torch.randn(1, s["kv_heads"], L, s["head_dim"], generator=g, device=device, dtype=s["dtype"])
    v = torch.randn_like(k)
    scale = s["head_dim"] ** -0.5
    attention = push = 0.0
    for start in range(0, n, L):
        length = min(L, n - start)
        w = query_weights(length, config.beta, device)
        plan = cache.plan(length)
        k_res, v_res = cache.resident(0)
        _sync(device)
        t0 = time.perf_counter()
        _, cs, ns = chunk_attention(q[:, :, :length], k_res, v_res, plan.cache_valid, k[:, :, :length],
                                    v[:, :, :length], scale, weights=w)
        _sync(device)
        t1 = time.perf_counter()
        cascade_push(cache, 0, plan, k[:, :, :length], v[:, :, :length], cs, ns)
        cache.commit(plan)
        _sync(device)
        attention, push = attention + t1 - t0, push + time.perf_counter() - t1
    return attention, push


def time_full(n: int, s: dict, device) -> float | None:
    """Seconds for causal SDPA over the whole prompt (None if it does not fit in memory)."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, s["q_heads"], n, s["head_dim"], generator=g, device=device, dtype=s["dtype"])
        k = torch.randn(1, s["kv_heads"], n, s["head_dim"], generator=g, device=device, dtype=s["dtype"])
        v = torch.randn_like(k)
        _sync(device)
        # On CUDA the baseline is pinned to flash attention (the paper's baseline): with a causal flag,
        # no mask and bf16 it is eligible, and a silent fallback to another backend would flatter us.
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if device.type == "cuda" else contextlib.nullcontext():
            try:
                start = time.perf_counter()
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                _sync(device)
            except RuntimeError:  # a torch whose flash kernel lacks GQA: the same attention on repeated KV heads
                group = s["q_heads"] // s["kv_heads"]
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
                _sync(device)
                start = time.perf_counter()
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
                _sync(device)
        return time.perf_counter() - start
    except torch.OutOfMemoryError:
        return None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_kernel_bench(out_dir, sizes=None, cache_slots: int | None = 16384, device=None) -> dict:
    """Time our strided prefill (chunk attention + exact scores, then the cascade push; Triton on CUDA,
    the torch reference on CPU) against SDPA over the whole prompt; write kernel_bench.json/png.

    On CPU the layer is small (8/2 heads, head_dim 64, stride 256) and cache_slots is capped at 512,
    so the default sizes (1k..4k tokens) run in well under a minute.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and cache_slots:
        cache_slots = min(cache_slots, 512)
    s = _shape(device, cache_slots)
    sizes = list(sizes or s["sizes"])
    for n in {s["stride"]} | {n % s["stride"] for n in sizes if n % s["stride"]}:
        time_cascade(s["sinks"] + s["window"] + n, s, device)  # warm-up: autotuning of every chunk length timed
    rows = []
    for n in sizes:
        attention, push = time_cascade(n, s, device)
        ours, full = attention + push, time_full(n, s, device)
        rows.append({"tokens": n, "cascade_s": ours, "attention_s": attention, "push_s": push, "full_s": full,
                     "speedup": (full / ours) if full else None})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in s.items() if k != "sizes"}
    settings["cache_slots"] = s["sinks"] + s["window"]
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "backend": backend(torch.empty(0, device=device)), "settings": settings, "rows": rows,
              "baseline": "torch SDPA, flash attention backend" if device.type == "cuda" else "torch SDPA (CPU)",
              "peak_memory_mb": peak_memory_mb(device),
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
    ax.plot(x, [r["attention_s"] for r in rows], marker=".", linestyle="--", label="cascade, attention + scores only")
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
