"""The push rule of the cascading cache, one token at a time, for one KV head: the readable spec.

Deliberately naive (Python lists, no vectorisation) so that it reads like DESIGN.md section 1;
`CascadeCache.plan` + `push` (engine/cache.py) do the same for a whole chunk at once, on every
layer and head, and the tests check that they agree token for token.

Terms: S sinks, W window slots split into cascades of sizes w_0..w_{C-1} (cascade 0 holds the
newest tokens), and the block b: b consecutive tokens (aligned on t % b == 0, t counted after the
sinks) travel through the cascades as one, and a block's score is its best token's. b = 1 is the
paper's rule. A new block is offered to cascade 0 when its first token arrives (the others join it
there); walking the cascades i = 0, 1, ... with the block offered at time t:

- cascade i *accepts* when t < W (eager fill: the cache starts as one contiguous window) or when
  the block's index t // b is a multiple of 2**i (cascade 0 accepts every block);
- accepting (or empty): append; when that overfills the cascade, its oldest block moves on and is
  offered to cascade i + 1, still at time t (from the last cascade it is dropped);
- not accepting: contest with the cascade's newest block; the higher score keeps the place, ties
  going to the newcomer, and the loser is dropped. A block's score is its best token's (`--block-score
  max`, the default) or the sum of its tokens' (`sum`); past cascade 0 every block is whole.

Worked example: S = 0, two cascades of 4 slots (W = 8), b = 2. Tokens 0-7 fill cascade 0 with
blocks [0 1] [2 3] and, when [4 5] and [6 7] arrive, push [0 1] and [2 3] on to cascade 1 (t < W:
accepted). Block [8 9] (t = 8, block index 4, even) evicts [4 5] from cascade 0; cascade 1 accepts
it and drops its oldest, [0 1]. Block [10 11] (index 5, odd) evicts [6 7]; cascade 1 does not
accept at t = 10, so [6 7] contests [4 5]: if token 6 or 7 has the best score of the four, the
cascade now holds [2 3] [6 7], else [2 3] [4 5]. Cascade 1 thus keeps one block in two, the winner
of each pair, and a C-cascade cache spans about S + sum_i w_i 2**i tokens.

Scores: after each chunk of L queries, every resident's score becomes beta**L * score + its gain
(the attention the chunk's queries gave it); a new token starts with the attention of the
chunk's later queries (see engine.attention). The rule runs for one KV head; with a shared contest
(`CacheConfig.contest` "layer" or "model") every head it spans is given the mean of their scores
(`CascadeCache.contest_scores`), so they all make the same decisions and hold the same tokens.
"""

from __future__ import annotations


class OracleCascade:
    def __init__(self, sinks: int, sizes: list[int], beta: float, block: int = 1, block_score: str = "max"):
        """sizes: the slots of each cascade, newest first (`CacheConfig.sizes`); the window is their sum."""
        self.S, self.W, self.beta, self.b = sinks, sum(sizes), beta, block
        self.block_score = block_score
        self.sizes = sizes
        self.sinks: list[dict] = []
        self.rings: list[list[list[dict]]] = [[] for _ in self.sizes]  # per cascade: blocks, oldest first
        self.seen = 0

    def chunk(self, resident_gain: dict[int, float], new_scores: list[float]) -> None:
        """One chunk: decay + gain for residents (by original position), then push new tokens."""
        L = len(new_scores)
        for tok in self.tokens():
            tok["score"] = tok["score"] * self.beta ** L + resident_gain.get(tok["pos"], 0.0)
        for s in new_scores:
            self.push({"pos": self.seen, "score": s})
            self.seen += 1

    def push(self, tok: dict) -> None:
        if len(self.sinks) < self.S:
            self.sinks.append(tok)
            return
        t = tok["pos"] - self.S
        if t % self.b:  # the newest block of cascade 0 is not complete: the token joins it
            self.rings[0][-1].append(tok)
            return
        block = [tok]
        for i, ring in enumerate(self.rings):
            accepts = t < self.W or (t // self.b) % (2 ** i) == 0
            if accepts or not ring:
                ring.append(block)
                if len(ring) <= self.sizes[i] // self.b:
                    return
                block = ring.pop(0)  # the oldest block moves on to cascade i + 1
                continue
            if self.score(block) >= self.score(ring[-1]):  # contest with the newest block; ties to the newcomer
                ring[-1] = block
            return

    def tokens(self) -> list[dict]:
        return [tok for ring in self.rings for block in ring for tok in block]

    def positions(self) -> list[int]:
        """Original positions in cache order: sinks, then oldest cascade first, by age."""
        out = [t["pos"] for t in self.sinks]
        for ring in reversed(self.rings):
            out += [t["pos"] for block in ring for t in block]
        return out

    def scores(self) -> dict[int, float]:
        return {t["pos"]: t["score"] for t in self.tokens()}

    def score(self, block: list[dict]) -> float:
        scores = [t["score"] for t in block]
        return max(scores) if self.block_score == "max" else sum(scores)
