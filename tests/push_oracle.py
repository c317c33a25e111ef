"""A literal, one-token-at-a-time implementation of DESIGN.md's push rule, for one KV head.

Deliberately naive (Python lists, no vectorisation) so that it reads like the spec; the engine's
vectorised CascadeCache must agree with it token for token.
"""


class OracleCascade:
    def __init__(self, sinks: int, window: int, cascades: int, beta: float):
        self.S, self.W, self.C, self.beta = sinks, window, cascades, beta
        self.w = window // cascades
        self.sinks: list[dict] = []
        self.rings: list[list[dict]] = [[] for _ in range(cascades)]  # each oldest first
        self.seen = 0

    def chunk(self, resident_gain: dict[int, float], new_scores: list[float]) -> None:
        """One chunk: decay + gain for residents (by original position), then push new tokens."""
        L = len(new_scores)
        for ring in self.rings:
            for tok in ring:
                tok["score"] = tok["score"] * self.beta ** L + resident_gain.get(tok["pos"], 0.0)
        for s in new_scores:
            self.push({"pos": self.seen, "score": s})
            self.seen += 1

    def push(self, tok: dict) -> None:
        if len(self.sinks) < self.S:
            self.sinks.append(tok)
            return
        t = tok["pos"] - self.S
        for i, ring in enumerate(self.rings):
            accepts = t < self.W or t % (2 ** i) == 0
            if accepts or not ring:
                ring.append(tok)
                if len(ring) <= self.w:
                    return
                tok = ring.pop(0)  # evicted oldest moves on to cascade i + 1
                continue
            if tok["score"] >= ring[-1]["score"]:  # contest with the newest; ties to the newcomer
                ring[-1] = tok
            return

    def positions(self) -> list[int]:
        """Original positions in cache order: sinks, then oldest cascade first, by age."""
        out = [t["pos"] for t in self.sinks]
        for ring in reversed(self.rings):
            out += [t["pos"] for t in ring]
        return out

    def scores(self) -> dict[int, float]:
        return {t["pos"]: t["score"] for ring in self.rings for t in ring}
