"""Linear layers whose weights oneDNN lays out once, at load, instead of at every call (CPU, bfloat16).

A bfloat16 `F.linear` on the CPU goes through oneDNN, which first reorders the weight into its
blocked layout: at every call, for every layer. Answering calls each of SmolLM2's 211 linear layers
once per token, so that reorder is most of a small product's cost (a [1, 576] x [576, 1536] product:
0.090 ms plain, 0.054 ms prepacked here; the [1, 576] x [576, 49152] head: 4.2 vs 2.4 ms). Prepacked
once, the same oneDNN kernel computes the same numbers (bit for bit, checked at load below) from the
layout it wants. Reading gains ~5% (512-row products), answering ~20-25% a token.

Only where the numbers are unchanged: bfloat16 weights on the CPU, each weight shape checked at load
(`same_products`).

Products of more than one row are padded to a multiple of ROW_STEP rows. oneDNN keeps state for
every row count it meets (~3 MB per count over SmolLM2's layers, measured: +124 MB over 40 new
counts), so a prompt read in one forward of any length would grow memory with every new question;
padded, a prompt meets at most stride / ROW_STEP counts, warmed once after the first read
(`session._warm_prompt_shapes`). A row's numbers do not depend on how many rows are in the product
(checked at load: `same_products` compares padded products with unpadded F.linear), so the pad
costs only its rows' work: at most ROW_STEP - 1 rows, ~7% of a 440-token recall prompt. In float32 oneDNN's prepacked kernel sums in another order than torch's default
(MKL): logits moved by up to 8e-5, so answers could change, and float32 is left as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROWS_HINT = 512  # oneDNN picks the blocking for products of about this many rows (a reading stride)
CHECK_ROWS = (1, 7, 64, 100, 512)  # row counts checked bit for bit against F.linear before packing
ROW_STEP = 64  # products of more than one row are padded to a multiple of this many rows


def product(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's x W^T + b from a weight in its blocked layout. # [..., in] -> [..., out]"""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


class PackedLinear(nn.Module):
    """y = x W^T + b, W stored in oneDNN's blocked layout (an opaque tensor: only this op reads it)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            # [out, in] -> oneDNN's blocked layout for products of ~ROWS_HINT rows
            self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(
                linear.weight.detach(), ROWS_HINT), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        rows = x.numel() // self.in_features
        pad = -rows % ROW_STEP if rows > 1 else 0  # one row (a decoded token) is a single count already
        if not pad:
            return product(x, self.packed_weight, self.bias)
        padded = F.pad(x.reshape(rows, self.in_features), (0, 0, 0, pad))  # [rows + pad, in], zero rows
        return product(padded, self.packed_weight, self.bias)[:rows].view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def same_products(packed: PackedLinear, linear: nn.Linear) -> bool:
    """Whether the packed layer computes F.linear's numbers bit for bit, on random rows of several counts
    (7 and 100 are padded: this also checks that a row's numbers do not depend on the product's rows)."""
    gen = torch.Generator().manual_seed(0)
    for rows in CHECK_ROWS:
        x = torch.randn(1, rows, linear.in_features, generator=gen).to(linear.weight.dtype)  # [1, rows, in]
        if not torch.equal(packed(x), F.linear(x, linear.weight, linear.bias)):
            return False
    return True


def pack_linears(model: nn.Module) -> int:
    """Replace the bfloat16 CPU nn.Linear layers of `model` by PackedLinear ones, where oneDNN packs
    them and the first layer of each weight shape computes the same numbers. Returns how many.

    A head tied to the embeddings gets its own packed copy (the embedding lookup keeps the original):
    SmolLM2's 49,152 x 576 head, +57 MB, for 4.2 -> 2.4 ms per answer token here."""
    checked: dict[tuple, bool] = {}  # weight shape -> packing keeps its products
    replaced = 0
    with torch.no_grad():
        for module in list(model.modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is not nn.Linear or child.weight.device.type != "cpu" \
                        or child.weight.dtype != torch.bfloat16:
                    continue
                shape = tuple(child.weight.shape)
                if checked.get(shape) is False:
                    continue
                try:
                    packed = PackedLinear(child)
                    if shape not in checked:
                        checked[shape] = same_products(packed, child)
                except (AttributeError, RuntimeError):  # a torch without these ops, a CPU oneDNN refuses
                    checked[shape] = False
                if checked[shape]:
                    setattr(module, child_name, packed)
                    replaced += 1
    if replaced:
        release_freed_memory()
    return replaced


def bounded_rows(model: nn.Module) -> bool:
    """Whether every bfloat16 CPU linear layer of `model` is packed, so every product's row count is 1 or a
    multiple of ROW_STEP (a prompt may then go in one forward of any length without new oneDNN state)."""
    return not any(type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.bfloat16
                   for m in model.modules()) and any(isinstance(m, PackedLinear) for m in model.modules())


def release_freed_memory() -> None:
    """Hand the freed plain weights back to the system. They were freed in the middle of glibc's heap,
    under packed ones allocated after them, and glibc keeps such holes: without this the process held
    ~200 MB more after packing SmolLM2 (986 vs 788 MB; 717 MB unpacked). Other C libraries: nothing."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
