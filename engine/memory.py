"""Frozen document memory: the cache as it was after reading, plus an append-only tail.

Answering a question reads more tokens (recalled passages, the question, the answer). Pushed
through the cascades they would evict document tokens from the middle of the cache, so every
question would erode what was read. Instead the document's slots are frozen: they are attended
to, never pushed, and new tokens go into a tail of fixed capacity after them. Memory per layer is
sinks + window + tail, whatever the document's length; every question starts from the same
document memory (a copy is made once per question, the same cost as the old clone).

Positions: document slots keep their in-cache positions 0..n-1; tail slot i sits at n + i; a
chunk's queries follow the tail. Scores are plain per-slot sums of the attention each slot got
(fixed size, so citations never grow memory with the answer's length); `reset_scores()` starts
a new sum, e.g. after the question so that only the answer's attention is counted.
"""

from __future__ import annotations

import copy

import torch

from .cache import ChunkPlan, HybridCache, KVCache
from .errors import UserError


class FrozenMemory(KVCache):
    """Document slots (read-only) + `tail_slots` append-only slots, per layer."""

    def __init__(self, doc: KVCache, tail_slots: int):
        super().__init__(doc.config, doc.n_layers, doc.kv_heads, doc.head_dim, batch=doc.batch, dtype=doc.dtype,
                         device=doc.device)
        self.doc_pos, self.doc_valid = doc.slot_positions()  # [n_doc] each
        self.n_doc = len(self.doc_pos)
        self.doc_span = int(doc.n_valid)  # in-cache positions 0..doc_span-1 are the document's
        self.doc_seen = doc.seen
        self.seen = doc.seen  # stream positions continue after the document
        self.capacity, self.tail = tail_slots, 0
        self.scored = True  # set False to skip score sums (the fast attention path)
        n = self.n_doc + tail_slots
        self.keys, self.values, self.pos, self.score = [], [], [], []
        for layer in range(self.n_layers):
            k, v = doc.resident(layer)  # [batch, kv_heads, n_doc, head_dim]
            keys = torch.zeros(self.batch, self.kv_heads, n, self.head_dim, dtype=self.dtype, device=self.device)
            values = torch.zeros_like(keys)
            keys[:, :, : self.n_doc], values[:, :, : self.n_doc] = k, v
            pos = torch.full((self.batch, self.kv_heads, n), -1, dtype=torch.int64, device=self.device)
            pos[:, :, : self.n_doc] = doc.original_positions(layer)
            self.keys.append(keys)
            self.values.append(values)
            self.pos.append(pos)
            self.score.append(torch.zeros(self.batch, self.kv_heads, n, dtype=torch.float32, device=self.device))

    @property
    def n_valid(self) -> int:
        return self.doc_span + self.tail

    @property
    def end(self) -> int:
        return self.n_doc + self.tail

    def plan(self, length: int) -> ChunkPlan:
        if self.tail + length > self.capacity:
            raise UserError(f"the answer memory is full ({self.capacity} tokens after the document); "
                            "ask a shorter question or lower the answer length")
        tail = torch.arange(self.tail, device=self.device)
        return ChunkPlan(length=length,
                         cache_pos=torch.cat((self.doc_pos, self.doc_span + tail)),
                         cache_valid=torch.cat((self.doc_valid, torch.ones_like(tail, dtype=torch.bool))),
                         chunk_pos=self.n_valid + torch.arange(length, device=self.device),
                         original_pos=self.seen + torch.arange(length, device=self.device))

    def resident(self, layer):
        return self.keys[layer][:, :, : self.end], self.values[layer][:, :, : self.end]

    def original_positions(self, layer):
        return self.pos[layer][:, :, : self.end]

    def slot_positions(self):
        plan = self.plan(0)
        return plan.cache_pos, plan.cache_valid

    def push(self, layer, plan, keys, values, cache_score, chunk_score):
        end, L = self.end, plan.length
        if cache_score is not None:
            self.score[layer][..., :end] += cache_score
        new = slice(end, end + L)
        self.keys[layer][:, :, new] = keys
        self.values[layer][:, :, new] = values
        self.pos[layer][:, :, new] = plan.original_pos
        self.score[layer][..., new] = 0.0 if chunk_score is None else chunk_score

    def commit(self, plan):
        self.tail += plan.length
        self.seen += plan.length

    def truncate(self, tail: int) -> None:
        """Forget the tail after its first `tail` tokens (the document memory is untouched)."""
        self.tail = min(self.tail, tail)
        self.seen = self.doc_seen + self.tail

    def hide_document(self, sinks: int, recent: int = 0) -> None:
        """Mask the document's slots from attention except the first `sinks` physical slots and the
        `recent` slots with the latest in-cache positions (the most recent text read); tail untouched.

        Used when recalled passages carry the answer: a small model reads a detail from a short clean
        context far better than from the cascade's sparse sketch beside it (docs/eval.md).
        """
        keep = torch.zeros_like(self.doc_valid)
        keep[:sinks] = True
        keep |= self.doc_pos >= self.doc_span - recent
        self.doc_valid = self.doc_valid & keep

    def reset_scores(self) -> None:
        for s in self.score:
            s.zero_()

    def slot_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention summed since the last reset, per layer and KV head, and the slots' stream positions.

        # ([layers, kv_heads, slots] fp32, [layers, kv_heads, slots] int64)
        """
        return (torch.stack([s[0, :, : self.end] for s in self.score]),
                torch.stack([p[0, :, : self.end] for p in self.pos]))

    def state(self):
        out = {"seen": torch.tensor(self.seen)}
        for l in range(self.n_layers):
            out[f"{l}.keys"], out[f"{l}.values"] = self.keys[l], self.values[l]
            out[f"{l}.score"], out[f"{l}.pos"] = self.score[l], self.pos[l]
        return out


def freeze(doc: KVCache, tail_slots: int) -> KVCache:
    """A cache that answers from `doc` without changing it: frozen document slots + a tail.

    For hybrid models (Gemma-3) the global layers get the frozen memory; the sliding-window layers
    keep sliding (a copy of their window), since they only ever see the last few hundred tokens.
    """
    if isinstance(doc, HybridCache):
        out = copy.copy(doc)
        out.main, out.sliding = FrozenMemory(doc.main, tail_slots), doc.sliding.clone()
        out.scored = True
        return out
    return FrozenMemory(doc, tail_slots)


def memory_of(cache: KVCache) -> FrozenMemory:
    """The frozen part of a cache made by `freeze`."""
    return cache.main if isinstance(cache, HybridCache) else cache
