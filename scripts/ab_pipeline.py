"""A/B of a pipelined read against a plain one, in one process, interleaved (docs/speed.md section 9).

    python scripts/ab_pipeline.py --model gemma3 --tokens 8192 --rounds 2

Reads the same KJV tokens through a fresh cache at the defaults, pipelined (two stages of one thread)
and plain (--threads OpenMP threads), round after round, and checks that every pipelined cache equals
a plain one-thread read's bit for bit. Prints tok/s per round and writes them as JSON with --out.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import pipeline, threads  # noqa: E402
from engine.bench import bench_tokens  # noqa: E402
from engine.cache import CacheConfig  # noqa: E402
from engine.models import load_model  # noqa: E402
from engine.runtime import Engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="threads of the plain read; the pipeline's budget")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    loaded = load_model(args.model, dtype="auto", say=lambda s: None)
    ids = bench_tokens(loaded.tokenizer, args.tokens)
    config = CacheConfig(cascades="auto").resolve(len(ids))  # the defaults: 64 sinks + 512 window, cascades auto
    engine = Engine(loaded, config, stride=512)

    def read(pipelined: bool, n_threads: int):
        threads.configure(n_threads)
        engine.pipeline = pipelined
        cache = engine.new_cache()
        assert engine.pipelined(cache) == pipelined, "the pipeline does not apply to this model or cache"
        start = time.perf_counter()
        engine.read([ids], cache)
        return len(ids) / (time.perf_counter() - start), cache.state()

    _, reference = read(False, 1)  # a plain one-thread read: what every pipelined cache must equal
    rows = []
    for r in range(args.rounds):
        for pipelined in (True, False):
            tps, state = read(pipelined, args.threads)
            same = all(torch.equal(state[k], reference[k]) for k in reference) if pipelined else None
            rows.append({"round": r, "pipelined": pipelined, "tokens_per_second": tps, "equal_to_one_thread": same})
            print(f"round {r} {'pipelined' if pipelined else f'plain, {args.threads} threads'}: {tps:.0f} tok/s"
                  + (f", cache equal to the one-thread read: {same}" if pipelined else ""), flush=True)
    result = {"model": loaded.model_id, "dtype": str(engine.dtype), "tokens": len(ids), "rows": rows,
              "cascades": config.cascades}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
