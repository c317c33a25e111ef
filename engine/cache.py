"""Cache policies: cascade (the paper), sink (StreamingLLM, one cascade) and full (unbounded).

Every policy stores per layer un-rotated keys, values, an fp32 attention score and the token's
original position per slot. Positions used by RoPE are positions *inside the cache* (sinks first,
then the oldest cascade first, by age within a cascade), so the model never sees a position beyond
sinks + window + stride, however long the document.

Bookkeeping that depends only on how many tokens were seen (fill counts, ring heads, which cascade
accepts which token) is shared by all layers, heads and batch rows, and is planned once per chunk
(`plan`). Which token wins a slot depends on scores, so it is decided per layer and per KV head
(`push`). DESIGN.md section 1 states the push rule this file implements.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch

from .errors import UserError

POLICIES = ("cascade", "sink", "full")


@dataclass(frozen=True)
class CacheConfig:
    policy: str = "cascade"
    sinks: int = 64  # must cover the chat template's system prompt and instruction
    window: int = 512  # non-sink slots per layer (was 2048; docs/speed.md: 1.5x faster reads, same recall answers)
    cascades: int | str = 4  # or "auto": the fewest whose span covers the document (see `resolve`)
    beta: float = 0.9999  # EMA factor of attention scores, per query
    head_reduce: str = "max"  # how the query heads of a GQA group combine into one KV-head score
    rope: str = "cache"  # RoPE at positions inside the cache, or "original" stream positions (ablation)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise UserError(f"policy must be one of {', '.join(POLICIES)}, not '{self.policy}'")
        if self.sinks < 0:
            raise UserError(f"sinks must be >= 0, not {self.sinks}")
        if self.policy != "full":
            if self.window < 1:
                raise UserError(f"window must be >= 1, not {self.window}")
            if self.cascades == "auto":
                pass
            elif not isinstance(self.cascades, int) or isinstance(self.cascades, bool) or self.cascades < 1:
                raise UserError(f"cascades must be 'auto' or an integer >= 1, not {self.cascades!r}")
            elif self.window % self.effective_cascades:
                raise UserError(f"window ({self.window}) must be divisible by cascades ({self.cascades})")
        if not 0.0 < self.beta <= 1.0:
            raise UserError(f"beta must be in (0, 1], not {self.beta}")
        if self.rope not in ("cache", "original"):
            raise UserError(f"rope must be 'cache' or 'original', not '{self.rope}'")
        if self.head_reduce not in ("max", "mean"):
            raise UserError(f"head_reduce must be 'max' or 'mean', not '{self.head_reduce}'")

    def resolve(self, tokens: int) -> "CacheConfig":
        """A concrete config for a stream of `tokens`: cascades="auto" becomes the smallest C that
        divides the window and whose span S + (W/C)(2**C - 1) covers the stream (C = 1 when it fits)."""
        if self.cascades != "auto":
            return self
        if self.policy != "cascade":
            return replace(self, cascades=1)
        c = 1
        while c < self.window and (self.window % c or self.sinks + (self.window // c) * (2 ** c - 1) < tokens):
            c += 1
        return replace(self, cascades=c)

    @property
    def effective_cascades(self) -> int:
        if self.cascades == "auto":
            raise ValueError("cascades='auto' must be resolved for a document length first (CacheConfig.resolve)")
        return 1 if self.policy == "sink" else self.cascades

    @property
    def cascade_slots(self) -> int:
        return self.window // self.effective_cascades

    @property
    def slots(self) -> int | None:
        """Slots per layer (sinks + window); None for the unbounded full policy."""
        return None if self.policy == "full" else self.sinks + self.window

    @property
    def span(self) -> int | None:
        """About how many tokens of history the cache spans: S + w * (2**C - 1)."""
        if self.policy == "full":
            return None
        return self.sinks + self.cascade_slots * (2 ** self.effective_cascades - 1)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Tokens:
    """A bundle of tokens travelling through the cascades, per batch row and KV head."""

    keys: torch.Tensor  # [batch, kv_heads, n, head_dim], un-rotated
    values: torch.Tensor  # [batch, kv_heads, n, head_dim]
    score: torch.Tensor  # [batch, kv_heads, n] fp32
    pos: torch.Tensor  # [batch, kv_heads, n] int64, original position in the stream

    def take(self, index: torch.Tensor) -> "Tokens":
        """Pick tokens by a per-head index. index: [batch, kv_heads, m]"""
        b, h, n, d = self.keys.shape
        # rows of the flattened [batch * kv_heads * n, head_dim] keys: index_select copies whole rows,
        # 5x faster on CPU than gather with an index expanded over head_dim (measured)
        rows = (index + n * torch.arange(b * h, device=index.device).view(b, h, 1)).reshape(-1)
        def pick(t):
            return t.reshape(b * h * n, d).index_select(0, rows).view(b, h, -1, d)
        return Tokens(pick(self.keys), pick(self.values), self.score.gather(2, index), self.pos.gather(2, index))

    def select(self, index: torch.Tensor) -> "Tokens":
        """Pick tokens by an index shared by all heads. index: [m]"""
        return Tokens(*(t.index_select(2, index) for t in (self.keys, self.values, self.score, self.pos)))

    @staticmethod
    def cat(parts: list["Tokens"]) -> "Tokens":
        return Tokens(*(torch.cat([getattr(p, f) for p in parts], dim=2) for f in ("keys", "values", "score", "pos")))

    def __len__(self) -> int:
        return self.score.shape[2]


@dataclass
class LevelPlan:
    """What happens to one cascade during one chunk; identical for every layer and head."""

    base: int  # first physical slot of this cascade
    capacity: int  # w
    incumbent: int | None  # physical slot of the newest resident, if leading offers contest it
    group: torch.Tensor  # [candidates] group id of each candidate ([incumbent] + offers)
    n_groups: int
    evict_resident: torch.Tensor  # [e1] physical slots evicted, oldest first
    evict_new: torch.Tensor  # [e2] indices of accepted winners evicted within this chunk
    write_new: torch.Tensor  # [k] indices of accepted winners that stay
    write_slot: torch.Tensor  # [k] their physical slots


@dataclass
class ChunkPlan:
    length: int  # L tokens in this chunk
    cache_pos: torch.Tensor  # [slots] in-cache position of each physical slot (0 where empty)
    cache_valid: torch.Tensor  # [slots] bool
    chunk_pos: torch.Tensor  # [L] in-cache positions of the chunk's tokens
    original_pos: torch.Tensor  # [L] original stream positions of the chunk's tokens
    n_sink_new: int = 0  # leading chunk tokens that become sinks
    levels: list[LevelPlan] = field(default_factory=list)


class KVCache:
    """Common storage and interface; a policy decides what stays."""

    scored = True  # whether attention must return score sums for this policy
    steady_shapes = True  # False where the slots attention sees change with every token (see runtime)

    def __init__(self, config: CacheConfig, n_layers: int, kv_heads: int, head_dim: int,
                 batch: int = 1, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.config = config
        self.n_layers, self.kv_heads, self.head_dim, self.batch = n_layers, kv_heads, head_dim, batch
        self.dtype, self.device = dtype, torch.device(device)
        self.seen = 0  # tokens pushed so far (the stream's length)

    # --- interface used by the attention function ---
    def plan(self, length: int) -> ChunkPlan:
        raise NotImplementedError

    def resident(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-rotated keys and values of every physical slot. # [batch, kv_heads, slots, head_dim] each"""
        return self.keys[layer], self.values[layer]

    def push(self, layer: int, plan: ChunkPlan, keys: torch.Tensor, values: torch.Tensor,
             cache_score: torch.Tensor | None, chunk_score: torch.Tensor | None) -> None:
        raise NotImplementedError

    def commit(self, plan: ChunkPlan) -> None:
        raise NotImplementedError

    # --- state, for snapshots and the retention view ---
    def state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def clone(self) -> "KVCache":
        other = type(self).__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.load_state({k: v.clone() for k, v in self.state().items()})
        return other

    def original_positions(self, layer: int) -> torch.Tensor:
        """Original stream positions held by a layer, -1 for empty slots. # [batch, kv_heads, slots]"""
        return self.pos[layer]

    def slot_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """In-cache position (RoPE) and filled flag of every resident slot. # [slots] each"""
        raise NotImplementedError

    @property
    def n_valid(self) -> int:
        raise NotImplementedError

    @property
    def parts(self) -> dict[str, "KVCache"]:
        """Caches that plan independently; one for most models (see HybridCache)."""
        return {"global": self}

    def part_of(self, layer: int) -> tuple[str, int]:
        """Which part holds a model layer, and its index there."""
        return "global", layer

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state().values())


class CascadeCache(KVCache):
    """Sinks + C cascades of w slots; cascade i keeps about one token per 2**i, the score winner."""

    def __init__(self, config: CacheConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.cascades = config.effective_cascades
        self.w = config.cascade_slots
        slots = config.sinks + config.window
        shape = (self.batch, self.kv_heads, slots)
        self.keys = [torch.zeros(*shape, self.head_dim, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.score = [torch.zeros(shape, dtype=torch.float32, device=self.device) for _ in range(self.n_layers)]
        self.pos = [torch.full(shape, -1, dtype=torch.int64, device=self.device) for _ in range(self.n_layers)]
        self.count = [0] * self.cascades  # filled slots per cascade
        self.head = [0] * self.cascades  # physical index (within the cascade) of its oldest slot

    @property
    def n_sinks(self) -> int:
        return min(self.seen, self.config.sinks)

    @property
    def n_valid(self) -> int:
        return self.n_sinks + sum(self.count)

    def cascade_base(self, i: int) -> int:
        return self.config.sinks + i * self.w

    def slot_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """In-cache position of every physical slot: sinks, then oldest cascade first, by age."""
        slots = self.config.sinks + self.config.window
        pos = torch.zeros(slots, dtype=torch.int64)
        valid = torch.zeros(slots, dtype=torch.bool)
        pos[: self.n_sinks] = torch.arange(self.n_sinks)
        valid[: self.n_sinks] = True
        offset = self.n_sinks
        for i in reversed(range(self.cascades)):
            c, h, base = self.count[i], self.head[i], self.cascade_base(i)
            physical = (h + torch.arange(c)) % self.w  # age rank r lives at physical (h + r) % w
            pos[base + physical] = offset + torch.arange(c)
            valid[base + physical] = True
            offset += c
        return pos.to(self.device), valid.to(self.device)

    def plan(self, length: int) -> ChunkPlan:
        S, W = self.config.sinks, self.config.window
        cache_pos, cache_valid = self.slot_positions()
        original = torch.arange(self.seen, self.seen + length)
        n_sink_new = max(0, min(S - self.seen, length))
        plan = ChunkPlan(length=length, cache_pos=cache_pos, cache_valid=cache_valid,
                         chunk_pos=(self.n_valid + torch.arange(length)).to(self.device),
                         original_pos=original.to(self.device), n_sink_new=n_sink_new)
        # offers to cascade 0: every non-sink token of the chunk, at its time t (counted after sinks)
        times = original[n_sink_new:] - S
        for i in range(self.cascades):
            c, h, w = self.count[i], self.head[i], self.w
            # eager fill: until the cache is full for the first time (t < W), every cascade accepts
            accept = (times < W) | (times % (2 ** i) == 0)
            if c == 0 and len(times):
                accept[0] = True  # an empty cascade takes whatever it is offered
            leading = bool(len(times)) and not bool(accept[0])
            group = torch.cumsum(accept.long(), 0) - 1 + int(leading)
            if leading:
                group = torch.cat((torch.zeros(1, dtype=torch.long), group))
            accepted_times = times[accept]
            n_new = len(accepted_times)
            n_evict = max(0, c + n_new - w)
            n_evict_resident = min(c, n_evict)
            evict_resident = (h + torch.arange(n_evict_resident)) % w
            evict_new = torch.arange(n_evict - n_evict_resident)
            # the j-th evicted token leaves when the (j + w - c)-th accepted winner is written
            evict_times = accepted_times[torch.arange(n_evict) + w - c] if n_evict else accepted_times[:0]
            keep = min(n_new, w)
            write_new = torch.arange(n_new - keep, n_new)
            write_slot = (h + c + write_new) % w
            plan.levels.append(LevelPlan(
                base=self.cascade_base(i), capacity=w,
                incumbent=((h + c - 1) % w) if leading else None,
                group=group.to(self.device), n_groups=n_new + int(leading),
                evict_resident=evict_resident.to(self.device), evict_new=evict_new.to(self.device),
                write_new=write_new.to(self.device), write_slot=write_slot.to(self.device)))
            times = evict_times  # what cascade i evicts is offered to cascade i + 1 at those times
        return plan

    def push(self, layer, plan, keys, values, cache_score, chunk_score):
        L, S = plan.length, self.config.sinks
        score = self.score[layer]
        if cache_score is not None:  # EMA over the chunk: s = beta**L * s + sum_t beta**(L-1-t) a_t
            score[..., S:] = score[..., S:] * (self.config.beta ** L) + cache_score[..., S:]
        if chunk_score is None:
            chunk_score = torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)
        pos = plan.original_pos.expand(self.batch, self.kv_heads, L)
        incoming = Tokens(keys, values, chunk_score, pos)
        k = plan.n_sink_new
        if k:
            sink_slots = plan.original_pos[:k]
            for store, src in ((self.keys, keys), (self.values, values), (self.pos, pos)):
                store[layer][:, :, sink_slots] = src[:, :, :k]
        offers = incoming.select(torch.arange(k, L, device=keys.device))
        for lv in plan.levels:
            offers = self._push_level(layer, lv, offers)

    def layers_as_batch(self) -> "CascadeCache":
        """All layers as the batch rows of one layer: a copy of the storage, to push every layer at once.

        The plan is the same for every layer, so one push over [layers * batch] rows does the work of
        `n_layers` pushes with 1/n_layers of the Python and dispatch overhead (at 16 cascades that
        overhead was ~135 ms per 512-token chunk, more than the push's own arithmetic). Copy the
        result back with `take_layers`.
        """
        stacked = type(self).__new__(type(self))
        stacked.__dict__.update(self.__dict__)
        stacked.n_layers, stacked.batch = 1, self.n_layers * self.batch
        for name in ("keys", "values", "score", "pos"):  # [layers * batch, kv_heads, slots, ...]
            setattr(stacked, name, [torch.cat(getattr(self, name))])
        return stacked

    def take_layers(self, stacked: "CascadeCache") -> None:
        """Copy a `layers_as_batch` cache's storage back into this cache's layers."""
        for name in ("keys", "values", "score", "pos"):
            for mine, theirs in zip(getattr(self, name), getattr(stacked, name)[0].split(self.batch)):
                mine.copy_(theirs)

    def _push_level(self, layer: int, lv: LevelPlan, offers: Tokens) -> Tokens:
        """Resolve contests, ring-write accepted winners, return evicted tokens (oldest first)."""
        sl = slice(lv.base, lv.base + lv.capacity)
        level = Tokens(self.keys[layer][:, :, sl], self.values[layer][:, :, sl],
                       self.score[layer][:, :, sl], self.pos[layer][:, :, sl])  # views into storage
        if lv.incumbent is not None:
            offers = Tokens.cat([level.select(torch.tensor([lv.incumbent], device=offers.score.device)), offers])
        winners = offers.take(last_argmax_per_group(offers.score, lv.group, lv.n_groups))
        if lv.incumbent is not None:  # the newest resident's contest is settled in place
            self._write(level, torch.tensor([lv.incumbent], device=winners.score.device),
                        winners.select(torch.zeros(1, dtype=torch.long, device=winners.score.device)))
            winners = winners.select(torch.arange(1, len(winners), device=winners.score.device))
        evicted = Tokens.cat([level.select(lv.evict_resident), winners.select(lv.evict_new)])
        self._write(level, lv.write_slot, winners.select(lv.write_new))
        return evicted

    @staticmethod
    def _write(level: Tokens, slots: torch.Tensor, tokens: Tokens) -> None:
        for dst, src in ((level.keys, tokens.keys), (level.values, tokens.values),
                         (level.score, tokens.score), (level.pos, tokens.pos)):
            dst.index_copy_(2, slots, src)

    def commit(self, plan: ChunkPlan) -> None:
        for i, lv in enumerate(plan.levels):
            n_new = lv.n_groups - int(lv.incumbent is not None)
            c = self.count[i]
            if c + n_new >= self.w:
                self.head[i] = (self.head[i] + c + n_new) % self.w
            self.count[i] = min(self.w, c + n_new)
        self.seen += plan.length

    def state(self) -> dict[str, torch.Tensor]:
        out = {"seen": torch.tensor(self.seen), "count": torch.tensor(self.count), "head": torch.tensor(self.head)}
        for l in range(self.n_layers):
            out[f"{l}.keys"], out[f"{l}.values"] = self.keys[l], self.values[l]
            out[f"{l}.score"], out[f"{l}.pos"] = self.score[l], self.pos[l]
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.seen = int(state["seen"])
        self.count, self.head = [int(x) for x in state["count"]], [int(x) for x in state["head"]]
        self.keys = [state[f"{l}.keys"] for l in range(self.n_layers)]
        self.values = [state[f"{l}.values"] for l in range(self.n_layers)]
        self.score = [state[f"{l}.score"] for l in range(self.n_layers)]
        self.pos = [state[f"{l}.pos"] for l in range(self.n_layers)]

    def cascade_of_slot(self) -> torch.Tensor:
        """-1 for sinks, i for slots of cascade i. # [slots]"""
        S = self.config.sinks
        return torch.cat((torch.full((S,), -1), torch.arange(self.cascades).repeat_interleave(self.w)))


class SinkCache(CascadeCache):
    """StreamingLLM: sinks + one sliding window (a cascade cache with C = 1)."""


class FullCache(KVCache):
    """Unbounded cache: every token stays; the quality ceiling and the speed baseline."""

    scored = False

    def __init__(self, config: CacheConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.capacity = 0
        self.keys, self.values, self.pos = [], [], []
        self._grow(256)

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * self.capacity)
        shape = (self.batch, self.kv_heads, cap)

        def grown(old, fill, *tail, dtype):
            new = torch.full((*shape, *tail), fill, dtype=dtype, device=self.device)
            if old is not None:
                new[:, :, : self.seen] = old[:, :, : self.seen]
            return new

        olds = list(zip(self.keys, self.values, self.pos)) or [(None, None, None)] * self.n_layers
        self.keys = [grown(k, 0, self.head_dim, dtype=self.dtype) for k, _, _ in olds]
        self.values = [grown(v, 0, self.head_dim, dtype=self.dtype) for _, v, _ in olds]
        self.pos = [grown(p, -1, dtype=torch.int64) for _, _, p in olds]
        self.capacity = cap

    @property
    def n_valid(self) -> int:
        return self.seen

    def plan(self, length: int) -> ChunkPlan:
        if self.seen + length > self.capacity:
            self._grow(self.seen + length)
        n = self.seen
        idx = torch.arange(n, n + length, device=self.device)
        return ChunkPlan(length=length, cache_pos=torch.arange(n, device=self.device),
                         cache_valid=torch.ones(n, dtype=torch.bool, device=self.device),
                         chunk_pos=idx, original_pos=idx)

    def resident(self, layer):
        return self.keys[layer][:, :, : self.seen], self.values[layer][:, :, : self.seen]

    def original_positions(self, layer):
        return self.pos[layer][:, :, : self.seen]

    def slot_positions(self):
        return (torch.arange(self.seen, device=self.device),
                torch.ones(self.seen, dtype=torch.bool, device=self.device))

    def push(self, layer, plan, keys, values, cache_score, chunk_score):
        sl = slice(self.seen, self.seen + plan.length)
        self.keys[layer][:, :, sl] = keys
        self.values[layer][:, :, sl] = values
        self.pos[layer][:, :, sl] = plan.original_pos

    def commit(self, plan):
        self.seen += plan.length

    def state(self):
        n = self.seen
        out = {"seen": torch.tensor(n)}
        for l in range(self.n_layers):
            out[f"{l}.keys"] = self.keys[l][:, :, :n]
            out[f"{l}.values"] = self.values[l][:, :, :n]
            out[f"{l}.pos"] = self.pos[l][:, :, :n]
        return out

    def load_state(self, state):
        self.seen = int(state["seen"])
        self.capacity = 0
        self.keys = [state[f"{l}.keys"] for l in range(self.n_layers)]
        self.values = [state[f"{l}.values"] for l in range(self.n_layers)]
        self.pos = [state[f"{l}.pos"] for l in range(self.n_layers)]
        self.capacity = self.seen
        self._grow(self.seen + 256)


def last_argmax_per_group(score: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Index of the highest score in each group, ties going to the later (newer) candidate.

    score: [batch, kv_heads, n]; group: [n] non-decreasing ids in [0, n_groups). # -> [batch, kv_heads, n_groups]
    """
    b, h, n = score.shape
    idx = group.expand(b, h, n)
    best = torch.full((b, h, n_groups), float("-inf"), dtype=score.dtype, device=score.device)
    best = best.scatter_reduce(2, idx, score, reduce="amax", include_self=True)
    is_best = score >= best.gather(2, idx)
    order = torch.arange(n, device=score.device).expand(b, h, n)
    candidate = torch.where(is_best, order, torch.full_like(order, -1))
    winner = torch.full((b, h, n_groups), -1, dtype=torch.long, device=score.device)
    return winner.scatter_reduce(2, idx, candidate, reduce="amax", include_self=True)


class HybridCache(KVCache):
    """Models that mix global and sliding-window layers (Gemma-3): the policy applies to the global
    layers; each sliding layer keeps its own window, a FIFO of sliding_window - 1 slots without
    sinks (the query itself is the window's last token)."""

    def __init__(self, config: CacheConfig, layer_types: list[str], sliding_window: int, kv_heads: int,
                 head_dim: int, batch: int = 1, dtype=torch.float32, device="cpu"):
        super().__init__(config, len(layer_types), kv_heads, head_dim, batch=batch, dtype=dtype, device=device)
        sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
        glob = [i for i, t in enumerate(layer_types) if t != "sliding_attention"]
        self.sliding_window = sliding_window
        self.main = POLICY_CLASSES[config.policy](config, len(glob), kv_heads, head_dim, batch=batch,
                                                  dtype=dtype, device=device)
        window_config = CacheConfig(policy="sink", sinks=0, window=max(1, sliding_window - 1), cascades=1)
        self.sliding = SinkCache(window_config, len(sliding), kv_heads, head_dim, batch=batch, dtype=dtype,
                                 device=device)
        self.layer_map = {layer: ("global", k) for k, layer in enumerate(glob)}
        self.layer_map.update({layer: ("sliding", k) for k, layer in enumerate(sliding)})
        self.scored = self.main.scored

    @property
    def parts(self):
        return {"global": self.main, "sliding": self.sliding}

    def part_of(self, layer):
        return self.layer_map[layer]

    @property
    def seen(self):
        return self.main.seen

    @seen.setter
    def seen(self, value):  # set by KVCache.__init__ before the parts exist
        pass

    @property
    def n_valid(self):
        return self.main.n_valid

    def original_positions(self, layer):
        name, k = self.part_of(layer)
        return self.parts[name].original_positions(k)

    def state(self):
        return {f"{name}.{k}": v for name, part in self.parts.items() for k, v in part.state().items()}

    def load_state(self, state):
        for name, part in self.parts.items():
            part.load_state({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})

    def clone(self):
        other = type(self).__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.main, other.sliding = self.main.clone(), self.sliding.clone()
        return other


POLICY_CLASSES = {"cascade": CascadeCache, "sink": SinkCache, "full": FullCache}


def make_cache(config: CacheConfig, model_config, batch: int = 1, dtype=torch.float32, device="cpu") -> KVCache:
    """A cache for a transformers model config: one KV cache per decoder layer."""
    n_layers = model_config.num_hidden_layers
    kv_heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    layer_types = list(getattr(model_config, "layer_types", None) or [])
    if "sliding_attention" in layer_types and getattr(model_config, "sliding_window", None):
        return HybridCache(config, layer_types[:n_layers], model_config.sliding_window, kv_heads, head_dim,
                           batch=batch, dtype=dtype, device=device)
    return POLICY_CLASSES[config.policy](config, n_layers, kv_heads, head_dim, batch=batch, dtype=dtype,
                                         device=device)
