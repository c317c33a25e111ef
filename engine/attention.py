"""Readable PyTorch attention for the cache: the CPU path and the oracle for the Triton kernels.

One function covers reading (a chunk of L queries) and decoding (L = 1): queries attend to
[resident cache slots | the chunk itself, causally], and we also return, per key, the exact sum of
the softmax attention it received, weighted by beta**(L-1-t) for query t and reduced over the
query heads of each GQA group. Those sums feed the cache's exponential moving average of scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QUERY_BLOCK = 64  # queries per block in the scored path (64 was fastest of 32/64/128 here)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, n, head_dim]; cos/sin: [n, rotary_dim] (same convention as transformers' Llama).

    rotary_dim < head_dim is partial rotary (Phi-4-mini): only the first rotary_dim features turn."""
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)
    return x * cos + rotate_half(x) * sin


def query_weights(length: int, beta: float, device=None) -> torch.Tensor:
    """EMA weight of query t inside a chunk of `length`: beta**(length-1-t). # [length] fp32"""
    exponent = torch.arange(length - 1, -1, -1, device=device, dtype=torch.float64)
    return (beta ** exponent).to(torch.float32)


def focus_weights(weights: torch.Tensor, length: int, share: float) -> torch.Tensor:
    """Scale the focus rows (those past the chunk's `length`) so that they carry `share` of the score
    mass, the chunk's own rows the rest. Plain rows give a 10-token question ~4% of a 256-token
    chunk's mass; share 1 is SnapKV's rule (only the question decides what stays). # [length + focus] fp32"""
    out = weights.clone()
    if share >= 1:
        out[:length] = 0
    else:
        out[length:] *= share / (1 - share) * weights[:length].sum() / weights[length:].sum()
    return out


def chunk_mask(cache_valid: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean mask of allowed (query, key) pairs over [cache | chunk]. # [length, slots + length]"""
    causal = torch.ones(length, length, dtype=torch.bool, device=cache_valid.device).tril()
    return torch.cat((cache_valid.expand(length, -1), causal), dim=1)


def mask_bias(cache_valid: torch.Tensor, length: int, group: int) -> torch.Tensor | None:
    """Additive mask (0 / -inf) over the cache slots, or None when every slot is filled. # [slots]"""
    if bool(cache_valid.all()):
        return None
    return torch.zeros(cache_valid.shape, dtype=torch.float32, device=cache_valid.device).masked_fill_(
        ~cache_valid, float("-inf"))


def causal_bias(length: int, device=None) -> torch.Tensor:
    """Additive causal mask within the chunk. # [length, length]"""
    return torch.full((length, length), float("-inf"), device=device).triu_(1)


def window_bias(cache_pos: torch.Tensor, cache_valid: torch.Tensor, chunk_pos: torch.Tensor,
                window: int) -> torch.Tensor:
    """Additive mask for a sliding-window layer: query at position P sees keys at p with 0 <= P - p < window.

    # [L, slots + L]
    """
    key_pos = torch.cat((cache_pos, chunk_pos))
    key_ok = torch.cat((cache_valid, torch.ones_like(chunk_pos, dtype=torch.bool)))
    distance = chunk_pos[:, None] - key_pos[None, :]
    allowed = key_ok[None, :] & (distance >= 0) & (distance < window)
    return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def join_slots(cache: torch.Tensor, chunk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[cache | chunk] along the slots, in `dtype`, converted while copied: one pass over the cache
    instead of a conversion and then a concatenation (per layer and answer token, ~3x less time
    over ~600 bfloat16 slots, measured). # [batch, kv_heads, slots + L, head_dim]"""
    out = torch.empty(*cache.shape[:2], cache.shape[2] + chunk.shape[2], cache.shape[3], dtype=dtype,
                      device=cache.device)
    return torch.cat((cache, chunk), dim=2, out=out)


def reduce_heads(per_query_head: torch.Tensor, head_reduce: str) -> torch.Tensor:
    """[batch, kv_heads, group, keys] -> [batch, kv_heads, keys]: one score per KV head."""
    if head_reduce == "max":
        return per_query_head.amax(dim=2)
    if head_reduce == "mean":
        return per_query_head.mean(dim=2)
    raise ValueError(f"head_reduce must be 'max' or 'mean', not {head_reduce!r}")


def chunk_attention(
    q: torch.Tensor,  # [batch, q_heads, L, head_dim], rotated at the chunk's in-cache positions
    k_cache: torch.Tensor,  # [batch, kv_heads, slots, head_dim], rotated at the slots' in-cache positions
    v_cache: torch.Tensor,  # [batch, kv_heads, slots, head_dim]
    cache_valid: torch.Tensor,  # [slots] bool: filled slots
    k_chunk: torch.Tensor,  # [batch, kv_heads, L, head_dim], rotated
    v_chunk: torch.Tensor,  # [batch, kv_heads, L, head_dim]
    scaling: float,
    weights: torch.Tensor | None = None,  # [L] fp32 query weights; None: no scores wanted
    head_reduce: str = "max",
    bias: torch.Tensor | None = None,  # [slots] precomputed mask_bias (shared by layers)
    bias_known: bool = False,  # `bias` was computed already (None then means every slot is filled)
    window_bias: torch.Tensor | None = None,  # [L, slots + L] additive mask of a sliding-window layer
    compute_dtype: torch.dtype | None = None,  # compute in this dtype (default: q's); the output is in it
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Returns (out [batch, q_heads, L, head_dim], cache_score [batch, kv_heads, slots] fp32,
    chunk_score [batch, kv_heads, L] fp32); the scores are None when weights is None."""
    dtype = compute_dtype or q.dtype
    q = q.to(dtype)
    batch, q_heads, length, head_dim = q.shape
    kv_heads, slots = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    k_all = join_slots(k_cache, k_chunk, dtype)  # [batch, kv_heads, slots + L, head_dim]
    v_all = join_slots(v_cache, v_chunk, dtype)
    keys = slots + length

    if weights is None:  # fast path: nobody needs the scores (full policy, sliding-window layers)
        mask = chunk_mask(cache_valid, length) if window_bias is None else window_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=scaling, enable_gqa=True)
        return out, None, None
    if window_bias is not None:
        raise ValueError("window_bias is only supported without scores")

    if bias is None and not bias_known:  # asking the device whether every slot is filled costs a sync
        bias = mask_bias(cache_valid, length, group)  # [slots] or None when the cache is full
    # Logits, probabilities and the per-block score sums stay in the inputs' dtype: a bfloat16 bmm
    # rounds its logits to bfloat16 anyway, softmax computes in float32 inside and only rounds its
    # output, and PV needs bfloat16 probabilities. Float32 copies of the [rows, keys] matrices cost
    # ~20% of the attention (measured) and changed the score sums by ~1e-3 relative, against the
    # 0.5% step of bfloat16 itself. Float32 inputs (tests, CPUs without bf16) compute as before.
    causal = causal_bias(length, q.device).to(q.dtype)  # [L, L]
    bias = None if bias is None else bias.to(q.dtype)
    w = weights.to(device=q.device, dtype=q.dtype)  # [L]
    # GQA by reshaping: the `group` query heads of a KV head are rows of one matrix; no repeated K/V.
    qg = (q * scaling).view(batch * kv_heads, group, length, head_dim)
    kt = k_all.reshape(batch * kv_heads, keys, head_dim).transpose(1, 2)  # [batch*kv_heads, head_dim, keys]
    vv = v_all.reshape(batch * kv_heads, keys, head_dim)
    out = torch.empty(batch * kv_heads, group, length, head_dim, dtype=q.dtype, device=q.device)
    per_head = torch.zeros(batch * kv_heads, group, keys, dtype=torch.float32, device=q.device)
    # Blocks of queries keep the [group * rows, keys] probabilities in cache memory. A block's
    # queries see the slots and the chunk only up to its own last token (causal), so the chunk's
    # later keys are skipped, not masked (~18% less work at 576 slots + 512). Each block's softmax
    # covers every key its queries may see, so its sums are exact.
    for t0 in range(0, length, QUERY_BLOCK):
        t1 = min(length, t0 + QUERY_BLOCK)
        rows, seen = t1 - t0, slots + t1
        block = qg[:, :, t0:t1].reshape(batch * kv_heads, group * rows, head_dim)
        logits = torch.bmm(block, kt[:, :, :seen]).view(batch * kv_heads, group, rows, seen)
        if bias is not None:
            logits[..., :slots] += bias
        logits[..., slots + t0:] += causal[t0:t1, t0:t1]  # the chunk's earlier keys are all allowed: no mask
        probs = torch.softmax(logits, dim=-1)  # [batch*kv_heads, group, rows, seen]
        out[:, :, t0:t1] = torch.bmm(probs.view(batch * kv_heads, group * rows, seen), vv[:, :seen]).view(
            batch * kv_heads, group, rows, head_dim)
        # sum_t beta**(L-1-t) * p_t(j) for this block's queries
        per_head[..., :seen] += torch.matmul(w[t0:t1].view(1, 1, 1, rows), probs).squeeze(2)
    score = reduce_heads(per_head.view(batch, kv_heads, group, keys), head_reduce)  # [batch, kv_heads, keys]
    return out.view(batch, q_heads, length, head_dim), score[..., :slots], score[..., slots:]
