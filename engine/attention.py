"""Readable PyTorch attention for the cache: the CPU path and the oracle for the Triton kernels.

One function covers reading (a chunk of L queries) and decoding (L = 1): queries attend to
[resident cache slots | the chunk itself, causally], and we also return, per key, the exact sum of
the softmax attention it received, weighted by beta**(L-1-t) for query t and reduced over the
query heads of each GQA group. Those sums feed the cache's exponential moving average of scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, n, head_dim]; cos/sin: [n, head_dim] (same convention as transformers' Llama)."""
    return x * cos + rotate_half(x) * sin


def query_weights(length: int, beta: float, device=None) -> torch.Tensor:
    """EMA weight of query t inside a chunk of `length`: beta**(length-1-t). # [length] fp32"""
    exponent = torch.arange(length - 1, -1, -1, device=device, dtype=torch.float64)
    return (beta ** exponent).to(torch.float32)


def chunk_mask(cache_valid: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean mask of allowed (query, key) pairs over [cache | chunk]. # [length, slots + length]"""
    causal = torch.ones(length, length, dtype=torch.bool, device=cache_valid.device).tril()
    return torch.cat((cache_valid.expand(length, -1), causal), dim=1)


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
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Returns (out [batch, q_heads, L, head_dim], cache_score [batch, kv_heads, slots] fp32,
    chunk_score [batch, kv_heads, L] fp32); the scores are None when weights is None."""
    batch, q_heads, length, head_dim = q.shape
    kv_heads, slots = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    mask = chunk_mask(cache_valid, length)  # [L, slots + L]
    k_all = torch.cat((k_cache, k_chunk), dim=2)  # [batch, kv_heads, slots + L, head_dim]
    v_all = torch.cat((v_cache, v_chunk), dim=2)

    if weights is None:  # fast path: nobody needs the scores (full policy)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=scaling, enable_gqa=True)
        return out, None, None

    # GQA by reshaping: query head h uses KV head h // group, so the group's queries stack as rows.
    qg = q.reshape(batch, kv_heads, group * length, head_dim)
    logits = torch.matmul(qg, k_all.transpose(-1, -2)).float() * scaling  # [batch, kv_heads, group*L, keys]
    logits = logits.view(batch, kv_heads, group, length, slots + length)
    logits.masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # exact: normalised by the full row, not a running estimate
    out = torch.matmul(probs.view(batch, kv_heads, group * length, -1).to(v_all.dtype), v_all)
    out = out.view(batch, q_heads, length, head_dim)
    # sum_t beta**(L-1-t) * p_t(j), per query head, then reduced over the GQA group
    per_head = torch.einsum("l,bkglj->bkgj", weights.to(probs.device), probs)  # [batch, kv_heads, group, keys]
    score = reduce_heads(per_head, head_reduce)  # [batch, kv_heads, keys]
    return out, score[..., :slots], score[..., slots:]
