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

The slots attention sees change with every answer token, so on CPU the runtime runs this memory's
attention in float32 (`KVCache.steady_shapes`; oneDNN keeps state per bfloat16 matrix shape).
"""

from __future__ import annotations

import copy

import torch

from . import kernels
from .cache import ChunkPlan, HybridCache, KVCache
from .errors import UserError


class FrozenMemory(KVCache):
    """Document slots (read-only) + `tail_slots` append-only slots, per layer."""

    steady_shapes = False  # the slots seen grow with the tail
    append_only = True  # the tail only grows; the document slots never move

    def __init__(self, doc: KVCache, tail_slots: int):
        super().__init__(doc.config, doc.n_layers, doc.kv_heads, doc.head_dim, batch=doc.batch, dtype=doc.dtype,
                         device=doc.device)
        self.capacity = tail_slots
        self.keys = self.values = self.pos = self.score = None
        self.load(doc)

    def load(self, doc: KVCache) -> "FrozenMemory":
        """Start over from `doc`: copy its slots in, empty the tail. The buffers are reused when the
        document has as many slots as last time, so asking again allocates nothing (RSS stays put)."""
        self.doc_pos, self.doc_valid = doc.slot_positions()  # [n_doc] each
        self.n_doc = len(self.doc_pos)
        self.doc_span = int(doc.n_valid)  # in-cache positions 0..doc_span-1 are the document's
        self.doc_seen = self.seen = doc.seen  # stream positions continue after the document
        self.tail = 0
        self.first = 0  # first slot in the view (hide_document may move it past hidden slots)
        self.scored = True  # set False to skip score sums (the fast attention path)
        self.rotated = [0] * self.n_layers  # per layer: slots before this one hold rotated keys
        n = self.n_doc + self.capacity
        if self.keys is None or self.keys[0].shape[2] != n:
            shape = (self.batch, self.kv_heads, n)
            self.keys = [torch.zeros(*shape, self.head_dim, dtype=self.dtype, device=self.device)
                         for _ in range(self.n_layers)]
            self.values = [torch.zeros_like(k) for k in self.keys]
            self.pos = [torch.full(shape, -1, dtype=torch.int64, device=self.device) for _ in range(self.n_layers)]
            self.score = [torch.zeros(shape, dtype=torch.float32, device=self.device) for _ in range(self.n_layers)]
        for layer in range(self.n_layers):
            k, v = doc.resident(layer)  # [batch, kv_heads, n_doc, head_dim]
            self.keys[layer][:, :, : self.n_doc] = k
            self.values[layer][:, :, : self.n_doc] = v
            self.pos[layer][:, :, : self.n_doc] = doc.original_positions(layer)
            self.pos[layer][:, :, self.n_doc:] = -1
        self.reset_scores()
        return self

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
                         cache_pos=torch.cat((self.doc_pos[self.first:], self.doc_span + tail)),
                         cache_valid=torch.cat((self.doc_valid[self.first:], torch.ones_like(tail, dtype=torch.bool))),
                         chunk_pos=self.n_valid + torch.arange(length, device=self.device),
                         original_pos=self.seen + torch.arange(length, device=self.device))

    def resident(self, layer):
        return self.keys[layer][:, :, self.first: self.end], self.values[layer][:, :, self.first: self.end]

    def rotated_resident(self, layer: int, cos: torch.Tensor, sin: torch.Tensor):
        """`resident(layer)` with the keys rotated at their in-cache positions, each slot once.

        A frozen slot never moves (the document's slots are fixed, a tail slot's position is set when
        it is written), so its key is rotated in place the first time attention reads it, not again
        for every answer token as the cascade's moving slots must be: per layer and answer token one
        new slot is rotated instead of all ~600 (fewer ops per token; the same values). After this the
        keys held are rotated ones. cos, sin: [slots in view, head_dim], the runtime's for this plan.
        """
        done, end = max(self.rotated[layer], self.first), self.end
        if done < end:
            k = self.keys[layer][:, :, done:end]  # [batch, kv_heads, new slots, head_dim]
            k.copy_(kernels.rope(k, cos[done - self.first:], sin[done - self.first:]))
            self.rotated[layer] = end
        return self.resident(layer)

    def original_positions(self, layer):
        return self.pos[layer][:, :, self.first: self.end]

    def slot_positions(self):
        plan = self.plan(0)
        return plan.cache_pos, plan.cache_valid

    def push(self, layer, plan, keys, values, cache_score, chunk_score):
        end, L = self.end, plan.length
        if cache_score is not None:
            self.score[layer][..., self.first: self.end] += cache_score
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
        self.rotated = [min(r, self.end) for r in self.rotated]

    def hide_document(self, sinks: int, recent: int = 0) -> None:
        """Mask the document's slots from attention except the first `sinks` physical slots and the
        `recent` slots with the latest in-cache positions (the most recent text read); tail untouched.

        Used when recalled passages carry the answer: a small model reads a detail from a short clean
        context far better than from the cascade's sparse sketch beside it (docs/eval.md).
        With recent == 0 the sinks are copied next to the tail and the view starts there, so the
        answer's attention skips the hidden slots instead of computing them masked: the same result
        (a masked slot's weight is exactly 0) for far less work per answer token.
        """
        # rotated keys (`rotated_resident`) may be copied: a sink's copy keeps the sink's in-cache position
        keep = torch.zeros_like(self.doc_valid)
        keep[:sinks] = True
        keep |= self.doc_pos >= self.doc_span - recent
        self.doc_valid = self.doc_valid & keep
        if recent or not 0 < sinks < self.n_doc:
            return
        first = self.n_doc - sinks  # this copy's last `sinks` document slots take the sinks
        for layer in range(self.n_layers):
            for buf in (self.keys[layer], self.values[layer], self.pos[layer], self.score[layer]):
                buf[:, :, first: self.n_doc] = buf[:, :, :sinks].clone()
        self.doc_pos = self.doc_pos.clone()  # may be the document cache's own tensor (doc_valid is a new one)
        self.doc_pos[first:], self.doc_valid[first:] = self.doc_pos[:sinks].clone(), self.doc_valid[:sinks].clone()
        self.first = first

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


def freeze(doc: KVCache, tail_slots: int, reuse: KVCache | None = None) -> KVCache:
    """A cache that answers from `doc` without changing it: frozen document slots + a tail.

    `reuse`: a cache an earlier `freeze` returned, whose buffers are refilled instead of allocated
    anew when its tail is at least as large. For hybrid models (Gemma-3) the global layers get the
    frozen memory; the sliding-window layers keep sliding (a copy of their window), since they only
    ever see the last few hundred tokens.
    """
    old = memory_of(reuse) if reuse is not None else None
    hybrid = isinstance(doc, HybridCache)
    if isinstance(old, FrozenMemory) and old.capacity >= tail_slots and isinstance(reuse, HybridCache) == hybrid:
        memory = old.load(doc.main if hybrid else doc)
    else:
        memory = FrozenMemory(doc.main if hybrid else doc, tail_slots)
    if hybrid:
        out = copy.copy(doc)
        out.main, out.sliding = memory, doc.sliding.clone()
        return out
    return memory


def memory_of(cache: KVCache) -> FrozenMemory:
    """The frozen part of a cache made by `freeze`."""
    return cache.main if isinstance(cache, HybridCache) else cache
