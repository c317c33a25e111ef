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

import re
from dataclasses import asdict, dataclass, field, replace

import torch

from .errors import UserError

POLICIES = ("cascade", "sink", "full")


SIZE_RULES = ("equal", "half")  # named rules for --cascade-sizes (or an explicit list "N,N,...")
CONTESTS = ("head", "layer", "model")  # who shares one contest: each KV head (the paper), each layer, the model
BLOCK_SCORES = ("max", "sum")  # a block's score: its best token's, or the sum of its tokens' (same for b = 1)


@dataclass(frozen=True)
class CacheConfig:
    policy: str = "cascade"
    sinks: int = 64  # must cover the chat template's system prompt and instruction
    window: int = 512  # non-sink slots per layer (was 2048; docs/speed.md: 1.5x faster reads, same recall answers)
    cascades: int | str = 4  # or "auto": the fewest whose span covers the document (see `resolve`)
    beta: float = 0.9999  # EMA factor of attention scores, per query
    head_reduce: str = "max"  # how the query heads of a GQA group combine into one KV-head score
    rope: str = "cache"  # RoPE at positions inside the cache, or "original" stream positions (ablation)
    block: int = 1  # tokens that move through the cascades as one (1: the paper's token contests)
    cascade_sizes: str = "equal"  # "equal", "half" (cascade 0 gets half the window) or "N,N,..."
    # who decides a contest: "head" (the paper: every KV head of every layer keeps its own tokens),
    # "layer" (a layer's KV heads decide together) or "model" (one decision for every layer and head)
    contest: str = "head"
    # a block's score in a contest: "max" (its best token: one attended token carries the block) or "sum"
    # (all its tokens: a block the reader used throughout beats one with a single spike); contests past
    # cascade 0 are between whole blocks, so "sum" ranks them as a mean would
    block_score: str = "max"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise UserError(f"policy must be one of {', '.join(POLICIES)}, not '{self.policy}'")
        if self.sinks < 0:
            raise UserError(f"sinks must be >= 0, not {self.sinks}")
        if not isinstance(self.block, int) or self.block < 1:
            raise UserError(f"block must be an integer >= 1, not {self.block!r}")
        if self.cascade_sizes not in SIZE_RULES and not re.fullmatch(r"\d+(,\d+)*", str(self.cascade_sizes)):
            raise UserError(f"cascade sizes must be 'equal', 'half' or a list like 512,256,256, "
                            f"not '{self.cascade_sizes}'")
        if self.policy != "full":
            if self.window < 1:
                raise UserError(f"window must be >= 1, not {self.window}")
            explicit = self._explicit_sizes()
            if explicit is not None and sum(explicit) != self.window:
                raise UserError(f"cascade sizes {self.cascade_sizes} must add up to the window ({self.window})")
            if self.cascades == "auto":
                pass
            elif not isinstance(self.cascades, int) or isinstance(self.cascades, bool) or self.cascades < 1:
                raise UserError(f"cascades must be 'auto' or an integer >= 1, not {self.cascades!r}")
            elif self.sizes is None:
                raise UserError(self._size_problem(self.effective_cascades))
        if not 0.0 < self.beta <= 1.0:
            raise UserError(f"beta must be in (0, 1], not {self.beta}")
        if self.rope not in ("cache", "original"):
            raise UserError(f"rope must be 'cache' or 'original', not '{self.rope}'")
        if self.head_reduce not in ("max", "mean"):
            raise UserError(f"head_reduce must be 'max' or 'mean', not '{self.head_reduce}'")
        if self.contest not in CONTESTS:
            raise UserError(f"contest must be one of {', '.join(CONTESTS)}, not '{self.contest}'")
        if self.block_score not in BLOCK_SCORES:
            raise UserError(f"block score must be one of {', '.join(BLOCK_SCORES)}, not '{self.block_score}'")

    def _explicit_sizes(self) -> list[int] | None:
        if self.cascade_sizes in SIZE_RULES:
            return None
        return [int(x) for x in str(self.cascade_sizes).split(",")]

    def _size_problem(self, c: int) -> str:
        if self._explicit_sizes() is not None:
            return (f"cascade sizes {self.cascade_sizes} must give {c} cascades, each a positive multiple of "
                    f"the block ({self.block})")
        if self.cascade_sizes == "half" and c > 1:
            return (f"with --cascade-sizes half, window/2 ({self.window // 2}) must be a multiple of the block "
                    f"({self.block}) and the other half hold {c - 1} cascades of whole blocks")
        if self.window % self.block:
            return f"window ({self.window}) must be a multiple of the block ({self.block})"
        return (f"window ({self.window}) is too small for {c} cascades: each needs at least one block "
                f"({self.block} slot{'s' if self.block != 1 else ''})")

    def _near_equal(self, slots: int, c: int) -> list[int] | None:
        """`slots` split into c cascades of whole blocks, as equal as whole blocks allow; the newest
        cascades get the blocks left over (512 slots in 9 cascades: 8 of 57 and one of 56). Exactly
        equal sizes would force C to divide the window, so `--cascades auto` would jump from 8 to 16
        cascades for a 23k-token document, and the 7 cascades it does not need would keep what they took
        while the cache filled: 211 of 512 slots held its first 1,000 tokens (9 cascades: 24)."""
        blocks, extra = divmod(slots, self.block)
        if extra or blocks < c:
            return None
        q, r = divmod(blocks, c)
        return [(q + (i < r)) * self.block for i in range(c)]

    def sizes_for(self, c: int) -> list[int] | None:
        """Slots of each of c cascades under this config's size rule; None where c does not fit it.

        Every cascade holds whole blocks, so every size is a positive multiple of `block`."""
        if self.policy == "sink":  # one window of single tokens, whatever the cascade options say
            return [self.window]
        explicit = self._explicit_sizes()
        if explicit is not None:
            sizes = explicit if len(explicit) == c else None
        elif self.cascade_sizes == "half" and c > 1:
            first = self.window // 2
            rest = self._near_equal(self.window - first, c - 1)
            sizes = [first] + rest if rest is not None else None
        else:
            sizes = self._near_equal(self.window, c)
        if sizes is None or any(w < self.block or w % self.block for w in sizes):
            return None
        return sizes

    def resolve(self, tokens: int) -> "CacheConfig":
        """A concrete config for a stream of `tokens`: cascades="auto" becomes the smallest C whose sizes
        fit the window and whose span S + sum_i w_i 2**i covers the stream (C = 1 when it fits), or
        the C of the longest span when none covers it (blocks can make the deepest layouts impossible)."""
        if self.cascades != "auto":
            return self
        if self.policy != "cascade":
            return replace(self, cascades=1)
        explicit = self._explicit_sizes()
        if explicit is not None:
            return replace(self, cascades=len(explicit))
        longest = 1
        for c in range(1, self.window + 1):
            if (sizes := self.sizes_for(c)) is None:
                continue
            if self._span(sizes) >= tokens:
                return replace(self, cascades=c)
            longest = max(longest, c, key=lambda k: self._span(self.sizes_for(k)))
        return replace(self, cascades=longest)

    @property
    def effective_cascades(self) -> int:
        if self.cascades == "auto":
            raise ValueError("cascades='auto' must be resolved for a document length first (CacheConfig.resolve)")
        return 1 if self.policy == "sink" else self.cascades

    @property
    def sizes(self) -> list[int] | None:
        """Slots of each cascade, cascade 0 (the newest tokens) first; None where they do not fit."""
        return self.sizes_for(self.effective_cascades)

    @property
    def slots(self) -> int | None:
        """Slots per layer (sinks + window); None for the unbounded full policy."""
        return None if self.policy == "full" else self.sinks + self.window

    def _span(self, sizes: list[int]) -> int:
        return self.sinks + sum(w * 2 ** i for i, w in enumerate(sizes))

    @property
    def span(self) -> int | None:
        """About how many tokens of history the cache spans: S + sum_i w_i 2**i (equal sizes: S + w (2**C - 1))."""
        if self.policy == "full":
            return None
        return self._span(self.sizes)

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
    """What happens to one cascade during one chunk; identical for every layer and head.

    Candidates of the contests are [the incumbent block's tokens (when leading offers contest it)]
    + the offers after the `n_fill` leading ones; they form blocks of `block` tokens (the last
    offered block of cascade 0 may be shorter); blocks form groups; each group's best block wins.
    """

    base: int  # first physical slot of this cascade
    capacity: int  # w slots (a multiple of the block)
    n_fill: int  # leading offers that complete cascade 0's newest, unfinished block (no contest)
    fill_slot: torch.Tensor  # [n_fill] their physical slots
    incumbent: torch.Tensor | None  # [block] physical slots of the newest resident block, if contested
    cand_block: torch.Tensor  # [candidates] block id of each candidate token
    block_start: torch.Tensor  # [blocks + 1] first candidate of each block (and the end)
    block_group: torch.Tensor  # [blocks] non-decreasing group id of each candidate block
    n_groups: int
    win_group: torch.Tensor  # [winner tokens] group of each winner token, the incumbent's group first
    win_offset: torch.Tensor  # [winner tokens] its place inside the winning block
    evict_resident: torch.Tensor  # [e1] physical slots evicted, oldest first
    evict_new: torch.Tensor  # [e2] indices of accepted winner tokens evicted within this chunk
    write_new: torch.Tensor  # [k] indices of accepted winner tokens that stay
    write_slot: torch.Tensor  # [k] their physical slots
    count: int  # filled slots after this chunk
    head: int  # physical slot (within the cascade) of the oldest token after this chunk

    @property
    def n_incumbent(self) -> int:
        return 0 if self.incumbent is None else len(self.incumbent)


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
    # True where a prompt's cut into chunks cannot change what the cache keeps (an append-only tail):
    # there `Engine.prefill` may read it in fewer, longer forwards
    append_only = False

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

    def local_layers(self, name: str, layers: range) -> range:
        """The indices in part `name` of the model layers `layers` (a run of model layers is a run in each
        part: a part numbers its layers in model order)."""
        local = [k for part, k in map(self.part_of, layers) if part == name]
        return range(local[0], local[-1] + 1) if local else range(0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state().values())


class CascadeCache(KVCache):
    """Sinks + C cascades; cascade i keeps about one block of tokens per 2**i blocks, the score winner.

    The rule, one token at a time, is `engine.push_rule.OracleCascade` (read that first); `plan` and
    `push` do the same for a whole chunk at once, vectorised, and must agree with it token for token.
    """

    def __init__(self, config: CacheConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.sizes, self.block = self.layout(config)
        self.cascades = len(self.sizes)
        slots = config.sinks + config.window
        shape = (self.batch, self.kv_heads, slots)
        self.keys = [torch.zeros(*shape, self.head_dim, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.score = [torch.zeros(shape, dtype=torch.float32, device=self.device) for _ in range(self.n_layers)]
        self.pos = [torch.full(shape, -1, dtype=torch.int64, device=self.device) for _ in range(self.n_layers)]
        self.count = [0] * self.cascades  # filled slots per cascade
        self.head = [0] * self.cascades  # physical index (within the cascade) of its oldest slot

    @staticmethod
    def layout(config: CacheConfig) -> tuple[list[int], int]:
        """Slots of each cascade and the block (tokens that move as one)."""
        return config.sizes, config.block

    @property
    def n_sinks(self) -> int:
        return min(self.seen, self.config.sinks)

    @property
    def n_valid(self) -> int:
        return self.n_sinks + sum(self.count)

    def cascade_base(self, i: int) -> int:
        return self.config.sinks + sum(self.sizes[:i])

    def slot_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """In-cache position of every physical slot: sinks, then oldest cascade first, by age."""
        slots = self.config.sinks + self.config.window
        pos = torch.zeros(slots, dtype=torch.int64)
        valid = torch.zeros(slots, dtype=torch.bool)
        pos[: self.n_sinks] = torch.arange(self.n_sinks)
        valid[: self.n_sinks] = True
        offset = self.n_sinks
        for i in reversed(range(self.cascades)):
            c, h, w, base = self.count[i], self.head[i], self.sizes[i], self.cascade_base(i)
            physical = (h + torch.arange(c)) % w  # age rank r lives at physical (h + r) % w
            pos[base + physical] = offset + torch.arange(c)
            valid[base + physical] = True
            offset += c
        return pos.to(self.device), valid.to(self.device)

    def plan(self, length: int) -> ChunkPlan:
        S, b = self.config.sinks, self.block
        cache_pos, cache_valid = self.slot_positions()
        original = torch.arange(self.seen, self.seen + length)
        n_sink_new = max(0, min(S - self.seen, length))
        plan = ChunkPlan(length=length, cache_pos=cache_pos, cache_valid=cache_valid,
                         chunk_pos=(self.n_valid + torch.arange(length)).to(self.device),
                         original_pos=original.to(self.device), n_sink_new=n_sink_new)
        # offers to cascade 0: every non-sink token of the chunk, at its time t (counted after sinks);
        # the first ones may complete the newest block, the rest start new blocks at t % block == 0
        times = original[n_sink_new:] - S
        n_fill = min(len(times), -int(times[0]) % b) if len(times) else 0
        starts = torch.arange(0, len(times) - n_fill, b)
        lengths = (len(times) - n_fill - starts).clamp(max=b)
        block_times = times[n_fill + starts]
        for i in range(self.cascades):
            lv, block_times = self._plan_level(i, n_fill, block_times, lengths)
            plan.levels.append(lv)
            n_fill, lengths = 0, torch.full_like(block_times, b)  # cascade i evicts whole blocks
        return plan

    def _plan_level(self, i: int, n_fill: int, times: torch.Tensor, lengths: torch.Tensor):
        """One cascade's part of the plan. times/lengths: [offered blocks] the time each block is
        offered at and its tokens. Returns the LevelPlan and the times of the blocks it evicts."""
        b, W, dev = self.block, self.config.window, self.device
        c, h, w = self.count[i], self.head[i], self.sizes[i]
        fill_slot = (h + c + torch.arange(n_fill)) % w
        c += n_fill
        blocks_held, blocks_max = -(-c // b), w // b
        # eager fill: until the cache is full for the first time (t < W), every cascade accepts
        accept = (times < W) | ((times // b) % (2 ** i) == 0)
        if blocks_held == 0 and len(times):
            accept[0] = True  # an empty cascade takes whatever it is offered
        leading = bool(len(times)) and not bool(accept[0])
        n_inc = b if leading else 0  # the incumbent (the newest resident block) is whole past cascade 0
        group = torch.cumsum(accept.long(), 0) - 1 + int(leading)
        block_start = n_inc + torch.cat((torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)))
        group_len = lengths[accept]
        if leading:
            group = torch.cat((torch.zeros(1, dtype=torch.long), group))
            block_start = torch.cat((torch.zeros(1, dtype=torch.long), block_start))
            group_len = torch.cat((torch.tensor([b]), group_len))
        n_groups = len(group_len)
        win_group = torch.repeat_interleave(torch.arange(n_groups), group_len)
        win_offset = torch.arange(len(win_group)) - torch.repeat_interleave(torch.cumsum(group_len, 0) - group_len,
                                                                             group_len)
        cand_block = torch.repeat_interleave(torch.arange(len(block_start) - 1), torch.diff(block_start))
        accepted_times, accepted_len = times[accept], lengths[accept]
        n_new, n_new_tokens = len(accepted_times), int(accepted_len.sum())
        n_evict = max(0, blocks_held + n_new - blocks_max)
        n_evict_resident = min(blocks_held, n_evict)
        # the j-th evicted block leaves when the (j + blocks_max - blocks_held)-th accepted block is written
        evict_times = accepted_times[torch.arange(n_evict) + blocks_max - blocks_held]
        keep = min(n_new, blocks_max)
        write_new = torch.arange((n_new - keep) * b, n_new_tokens)  # every accepted block but the last is whole
        if n_new:
            count, head = (min(blocks_max, blocks_held + n_new) - 1) * b + int(accepted_len[-1]), (h + n_evict * b) % w
        else:
            count, head = c, h
        lv = LevelPlan(
            base=self.cascade_base(i), capacity=w, n_fill=n_fill, fill_slot=fill_slot.to(dev),
            incumbent=((h + (blocks_held - 1) * b + torch.arange(b)) % w).to(dev) if leading else None,
            cand_block=cand_block.to(dev), block_start=block_start.to(dev), block_group=group.to(dev),
            n_groups=n_groups, win_group=win_group.to(dev), win_offset=win_offset.to(dev),
            evict_resident=((h + torch.arange(n_evict_resident * b)) % w).to(dev),
            evict_new=torch.arange((n_evict - n_evict_resident) * b).to(dev),
            write_new=write_new.to(dev), write_slot=((h + blocks_held * b + write_new) % w).to(dev),
            count=count, head=head)
        return lv, evict_times

    def start_push(self, layer: int, plan: ChunkPlan, keys: torch.Tensor, values: torch.Tensor,
                   cache_score: torch.Tensor | None, chunk_score: torch.Tensor | None) -> Tokens:
        """What every push path does first: decay and add the residents' scores, store new sinks.
        Returns the chunk's other tokens, the offers to cascade 0 (head_dim-contiguous keys/values)."""
        L, S = plan.length, self.config.sinks
        if cache_score is not None:  # EMA over the chunk: s = beta**L * s + sum_t beta**(L-1-t) a_t
            score = self.score[layer]
            score[..., S:] = score[..., S:] * (self.config.beta ** L) + cache_score[..., S:]
        if chunk_score is None:
            chunk_score = torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)
        pos = plan.original_pos.expand(self.batch, self.kv_heads, L)
        k = plan.n_sink_new
        if k:
            sink_slots = plan.original_pos[:k]
            for store, src in ((self.keys, keys), (self.values, values), (self.pos, pos)):
                store[layer][:, :, sink_slots] = src[:, :, :k]
        keys, values = keys[:, :, k:], values[:, :, k:]
        if keys.stride(-1) != 1:
            keys = keys.contiguous()
        if values.stride(-1) != 1:
            values = values.contiguous()
        return Tokens(keys, values, chunk_score[:, :, k:], pos[:, :, k:])

    def contest_scores(self, score: torch.Tensor | None) -> torch.Tensor | None:
        """Scores as the contest's deciders see them. score: [layers * batch, kv_heads, n] (all layers
        as batch rows, see `layers_as_batch`) -> the same shape.

        "head" leaves them alone (the paper). "layer" gives every KV head of a layer their mean, and
        "model" every layer and head theirs, so the deciders agree on every contest: they hold the
        same tokens in the same slots, and a kept token is whole in every head (and every layer),
        where per-head contests keep a needle's tokens scattered over heads (docs/eval.md, issue 10).
        """
        if score is None or self.config.contest == "head":
            return score
        s = score.view(-1, self.batch, self.kv_heads, score.shape[-1])  # [layers, batch, kv_heads, n]
        dims = (2,) if self.config.contest == "layer" else (0, 2)
        return s.mean(dims, keepdim=True).expand_as(s).reshape(score.shape)

    def layers_as_batch(self, layers: range | None = None) -> "CascadeCache":
        """All layers (or `layers`) as the batch rows of one layer: a copy of the storage, to push them at once.

        The plan is the same for every layer, so one push over [layers * batch] rows does the work of
        `n_layers` pushes with 1/n_layers of the Python and dispatch overhead (at 16 cascades that
        overhead was ~135 ms per 512-token chunk, more than the push's own arithmetic). Copy the
        result back with `take_layers`.
        """
        layers = range(self.n_layers) if layers is None else layers
        stacked = type(self).__new__(type(self))
        stacked.__dict__.update(self.__dict__)
        stacked.n_layers, stacked.batch = 1, len(layers) * self.batch
        for name in ("keys", "values", "score", "pos"):  # [layers * batch, kv_heads, slots, ...]
            setattr(stacked, name, [torch.cat([getattr(self, name)[layer] for layer in layers])])
        return stacked

    def take_layers(self, stacked: "CascadeCache", layers: range | None = None) -> None:
        """Copy a `layers_as_batch` cache's storage back into this cache's layers (or `layers`)."""
        layers = range(self.n_layers) if layers is None else layers
        for name in ("keys", "values", "score", "pos"):
            for layer, theirs in zip(layers, getattr(stacked, name)[0].split(self.batch)):
                getattr(self, name)[layer].copy_(theirs)

    def level_view(self, layer: int, lv: LevelPlan) -> Tokens:
        """One cascade's slots of a layer, as views into the storage."""
        sl = slice(lv.base, lv.base + lv.capacity)
        return Tokens(self.keys[layer][:, :, sl], self.values[layer][:, :, sl],
                      self.score[layer][:, :, sl], self.pos[layer][:, :, sl])

    @staticmethod
    def fill(level: Tokens, lv: LevelPlan, offers: Tokens) -> Tokens:
        """Write the offers that complete the newest block (cascade 0); return the others."""
        if not lv.n_fill:
            return offers
        dev = offers.score.device
        write(level, lv.fill_slot, offers.select(torch.arange(lv.n_fill, device=dev)))
        return offers.select(torch.arange(lv.n_fill, len(offers), device=dev))

    def push(self, layer, plan, keys, values, cache_score, chunk_score):
        offers = self.start_push(layer, plan, keys, values, cache_score, chunk_score)
        for lv in plan.levels:
            offers = self._push_level(self.level_view(layer, lv), lv, offers)

    def _push_level(self, level: Tokens, lv: LevelPlan, offers: Tokens) -> Tokens:
        """Resolve contests, ring-write accepted winners, return evicted tokens (oldest first)."""
        offers = self.fill(level, lv, offers)
        if lv.incumbent is not None:
            offers = Tokens.cat([level.select(lv.incumbent), offers])
        winner = last_argmax_per_group(block_scores(offers.score, lv, self.config.block_score), lv.block_group,
                                       lv.n_groups)
        b, h, _ = winner.shape
        # every token of a winning block: its block's first candidate + its place in the block
        first = lv.block_start[winner.gather(2, lv.win_group.expand(b, h, -1))]  # [batch, kv_heads, winner tokens]
        winners = offers.take(first + lv.win_offset)
        if lv.incumbent is not None:  # the newest resident block's contest is settled in place
            dev = winners.score.device
            write(level, lv.incumbent, winners.select(torch.arange(lv.n_incumbent, device=dev)))
            winners = winners.select(torch.arange(lv.n_incumbent, len(winners), device=dev))
        evicted = Tokens.cat([level.select(lv.evict_resident), winners.select(lv.evict_new)])
        write(level, lv.write_slot, winners.select(lv.write_new))
        return evicted

    def commit(self, plan: ChunkPlan) -> None:
        for i, lv in enumerate(plan.levels):
            self.count[i], self.head[i] = lv.count, lv.head
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
        return torch.cat((torch.full((S,), -1), torch.arange(self.cascades).repeat_interleave(torch.tensor(self.sizes))))


class SinkCache(CascadeCache):
    """StreamingLLM: sinks + one sliding window of single tokens, oldest out first.

    The same ring as cascade 0 of a CascadeCache, whatever the config's cascades, block and sizes say.
    Nothing here ever compares scores, so attention does not compute them (`scored = False`)."""

    scored = False

    @staticmethod
    def layout(config: CacheConfig) -> tuple[list[int], int]:
        return [config.window], 1


def write(level: Tokens, slots: torch.Tensor, tokens: Tokens) -> None:
    """level[slots] = tokens, for keys, values, scores and positions (in place)."""
    for dst, src in ((level.keys, tokens.keys), (level.values, tokens.values),
                     (level.score, tokens.score), (level.pos, tokens.pos)):
        dst.index_copy_(2, slots, src)


def block_scores(score: torch.Tensor, lv: LevelPlan, rule: str = "max") -> torch.Tensor:
    """A block's score: the highest of its tokens' ("max") or their sum ("sum").
    score: [batch, kv_heads, candidates] -> [batch, kv_heads, blocks]"""
    n_blocks = len(lv.block_group)
    if n_blocks == score.shape[2]:  # blocks of one token
        return score
    b, h, n = score.shape
    start = float("-inf") if rule == "max" else 0.0
    best = torch.full((b, h, n_blocks), start, dtype=score.dtype, device=score.device)
    return best.scatter_reduce(2, lv.cand_block.expand(b, h, n), score, reduce="amax" if rule == "max" else "sum",
                               include_self=True)


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

    @property
    def scored(self) -> bool:  # the sliding layers never contest; the global part decides
        return self.main.scored

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
