"""Kernel dispatch: Triton on CUDA tensors, the readable torch reference (engine.attention) elsewhere.

CASCADE_KERNELS=torch|triton|auto forces a path; "triton" on CPU tensors needs TRITON_INTERPRET=1
set before the first kernel call (that is how the tests run the kernels without a GPU). Triton is
imported lazily, so CPU-only installs without a working Triton still import the engine; in "auto"
mode a CUDA machine whose Triton fails to import falls back to the torch path (with one warning).

- `chunk_attention`: triton_attention (chunk and decode, exact scores; sliding-window masks too).
- `cascade_push`: triton_push for CascadeCache/SinkCache (per-level contests and ring writes, one
  launch per cascade); other caches use their own `push`.
- `rope` stays in torch (one elementwise op; not worth a kernel of its own).
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from .. import attention as reference

_modules: dict[str, object] = {}


def backend(t: torch.Tensor) -> str:
    choice = os.environ.get("CASCADE_KERNELS", "auto")
    if choice in ("torch", "triton"):
        return choice
    return "triton" if t.is_cuda else "torch"


def _triton(name: str, t: torch.Tensor):
    """The Triton module `name` when the backend for t is "triton" and it imports, else None."""
    if backend(t) != "triton":
        return None
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"{__name__}.{name}")
        except Exception as exc:  # a broken Triton install must not break reading
            if os.environ.get("CASCADE_KERNELS") == "triton":
                raise
            warnings.warn(f"Triton kernels unavailable ({exc!r}); using the torch path")
            _modules[name] = None
    return _modules[name]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return reference.apply_rope(x, cos, sin)


def chunk_attention(q, k_cache, v_cache, cache_valid, k_chunk, v_chunk, scaling, weights=None, head_reduce="max",
                    bias=None, window_bias=None, bias_known=False, compute_dtype=None):
    """Attention of a chunk over [cache | chunk] with exact per-key scores; see engine.attention.
    compute_dtype: the torch path's arithmetic dtype (the output's too); Triton computes in fp32 anyway."""
    triton_attention = _triton("triton_attention", q)
    if triton_attention is not None:  # `bias` is redundant with cache_valid there
        return triton_attention.chunk_attention(q, k_cache, v_cache, cache_valid, k_chunk, v_chunk, scaling,
                                                weights=weights, head_reduce=head_reduce, window_bias=window_bias)
    return reference.chunk_attention(q, k_cache, v_cache, cache_valid, k_chunk, v_chunk, scaling,
                                     weights=weights, head_reduce=head_reduce, bias=bias, window_bias=window_bias,
                                     bias_known=bias_known, compute_dtype=compute_dtype)


def cascade_push(cache, layer, plan, keys, values, cache_score, chunk_score) -> None:
    """`cache.push(...)`, with the cascade contests and ring writes in Triton where that backend is on."""
    from ..cache import CascadeCache

    if isinstance(cache, CascadeCache):
        triton_push = _triton("triton_push", keys)
        if triton_push is not None:
            return triton_push.push(cache, layer, plan, keys, values, cache_score, chunk_score)
    return cache.push(layer, plan, keys, values, cache_score, chunk_score)
