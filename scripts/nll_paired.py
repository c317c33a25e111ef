"""Paired streaming-NLL difference, cascade minus sink, with a bootstrap 95% interval.

    python scripts/nll_paired.py SINK_RUN/ppl.jsonl CASCADE_RUN/ppl.jsonl [...]

Both runs read the same KJV stream, so their per-bucket NLL sums pair up bucket by bucket (the
`sums` of each ppl.jsonl row, `--bucket` tokens each); the interval resamples the buckets.
"""
import json
import random
import sys


def rows(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def paired(cascade: dict, sink: dict, draws: int = 2000) -> tuple[float, float, float, int]:
    """Mean difference per token and its 95% bootstrap interval; buckets where the cascade is better."""
    diffs = [a - b for a, b in zip(cascade["sums"], sink["sums"])]
    tokens, n = cascade["case"]["tokens"], len(diffs)
    rng = random.Random(0)
    boots = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / tokens for _ in range(draws))
    return sum(diffs) / tokens, boots[int(0.025 * draws)], boots[int(0.975 * draws) - 1], sum(d < 0 for d in diffs)


def main(sink_path: str, *paths: str) -> None:
    sinks = {r["case"]["tokens"]: r for r in rows(sink_path) if r["case"]["policy"] == "sink"}
    for path in paths:
        for r in rows(path):
            c = r["case"]
            if c["policy"] != "cascade" or c["tokens"] not in sinks:
                continue
            s = sinks[c["tokens"]]
            mean, lo, hi, wins = paired(r, s)
            label = f"sizes {c.get('cascade_sizes', 'equal')}, block {c.get('block', 1)}, {c.get('contest', 'head')} contests"
            print(f"{label}, {c['tokens']} tokens: cascade {r['nll']:.4f} vs sink {s['nll']:.4f}: "
                  f"{mean:+.4f} (95% {lo:+.4f} .. {hi:+.4f}), cascade better in {wins} of {len(r['sums'])} buckets")


if __name__ == "__main__":
    main(*sys.argv[1:])
