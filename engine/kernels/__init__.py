"""Kernel dispatch: Triton on CUDA tensors, the readable torch reference (engine.attention) elsewhere.

CASCADE_KERNELS=torch|triton|auto forces a path; "triton" on CPU tensors needs TRITON_INTERPRET=1
(that is how the tests run the kernels without a GPU). Sliding-window layers (Gemma-3) always use
the torch path: their distance mask is not in the Triton kernel.
"""

from __future__ import annotations

import os

import torch

from .. import attention as reference


def backend(t: torch.Tensor) -> str:
    choice = os.environ.get("CASCADE_KERNELS", "auto")
    if choice in ("torch", "triton"):
        return choice
    return "triton" if t.is_cuda else "torch"


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return reference.apply_rope(x, cos, sin)


def chunk_attention(q, k_cache, v_cache, cache_valid, k_chunk, v_chunk, scaling, weights=None, head_reduce="max",
                    bias=None, window_bias=None):
    """Attention of a chunk over [cache | chunk] with exact per-key scores; see engine.attention."""
    if window_bias is None and backend(q) == "triton":
        from . import triton_attention  # imported lazily: CPU-only installs never need a working Triton

        return triton_attention.chunk_attention(q, k_cache, v_cache, cache_valid, k_chunk, v_chunk, scaling,
                                                weights=weights, head_reduce=head_reduce)
    return reference.chunk_attention(q, k_cache, v_cache, cache_valid, k_chunk, v_chunk, scaling,
                                     weights=weights, head_reduce=head_reduce, bias=bias, window_bias=window_bias)
