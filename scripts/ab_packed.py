"""A/B in one process: SmolLM2 in bfloat16 with plain linear layers vs prepacked ones (engine/packed.py).

Each round reads --tokens KJV tokens through a cascade cache at the defaults, then decodes 64 greedy
tokens, for both models in turn; it reports the medians and whether both wrote the same tokens.

    python scripts/ab_packed.py --threads 2 --rounds 3 --out results/ab_packed.json
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.bench import bench_tokens  # noqa: E402
from engine.cache import CacheConfig  # noqa: E402
from engine.models import load_model  # noqa: E402
from engine.runtime import Engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--out", default="results/ab_packed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {"plain": load_model("smollm2", dtype="bfloat16", say=lambda s: None, pack=False),
              "packed": load_model("smollm2", dtype="bfloat16", say=lambda s: None, pack=True)}
    ids = bench_tokens(models["plain"].tokenizer, args.tokens)
    rows = {name: {"read_tps": [], "decode_ms": [], "tokens": None} for name in models}
    for r in range(args.rounds):
        for name, loaded in models.items():
            engine = Engine(loaded, CacheConfig(), stride=512)
            cache = engine.new_cache()
            t0 = time.perf_counter()
            for i in range(0, len(ids), 512):
                engine.forward(torch.tensor([ids[i:i + 512]]), cache)
            read_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = list(engine.generate(cache, ids[:4], max_new_tokens=64))
            decode_ms = (time.perf_counter() - t0) / len(out) * 1e3
            rows[name]["read_tps"].append(len(ids) / read_s)
            rows[name]["decode_ms"].append(decode_ms)
            rows[name]["tokens"] = rows[name]["tokens"] or out
            print(f"round {r} {name}: read {len(ids) / read_s:.0f} tok/s, decode {decode_ms:.1f} ms/token", flush=True)
    result = {"threads": args.threads, "rounds": args.rounds, "tokens": args.tokens,
              "same_tokens": rows["plain"]["tokens"] == rows["packed"]["tokens"],
              **{name: {"median_read_tps": statistics.median(v["read_tps"]),
                        "median_decode_ms": statistics.median(v["decode_ms"]),
                        "read_tps": v["read_tps"], "decode_ms": v["decode_ms"]} for name, v in rows.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({"same_tokens": result["same_tokens"],
                      **{n: {"read": round(result[n]["median_read_tps"]),
                             "decode_ms": round(result[n]["median_decode_ms"], 1)} for n in models}}))


if __name__ == "__main__":
    main()
