"""Where a read's time goes, per chunk: torch.profiler over a few chunks of a cascade read.

Each part of the read path is wrapped in a profiler label (plan, RoPE tables, RoPE, attention with
its score sums, push, commit); "model" is the rest of the forward (projections, MLP, norms). The
aten ops' own time is summed per label, so a label's wall time minus its ops' time is Python and
dispatch overhead. Writes JSON, a Markdown table and a bar plot.

    python scripts/profile_read.py --window 512 --tokens 8192 --chunks 4 --out results/profile
    python scripts/profile_read.py --plot docs/speed_profile.png LABEL=results/profile/x.json ...
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import attention, cache as cache_mod, kernels, runtime  # noqa: E402
from engine.bench import bench_tokens  # noqa: E402
from engine.cache import CacheConfig  # noqa: E402
from engine.models import load_model  # noqa: E402

LABELS = ("plan", "rope_tables", "rope", "attention", "score_sums", "push", "commit")


SYNC = False  # on CUDA each label waits for its kernels, so GPU time lands in the label that launched it


def labelled(label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            out = fn(*args, **kwargs)
            if SYNC:
                torch.cuda.synchronize()
            return out
    return wrapper


def instrument() -> None:
    """Wrap each part of the read path in a profiler label (module attributes, so callers see them)."""
    for cls in (cache_mod.CascadeCache, cache_mod.FullCache):
        cls.plan = labelled("plan", cls.plan)
        cls.commit = labelled("commit", cls.commit)
    runtime.RopeTable.__call__ = labelled("rope_tables", runtime.RopeTable.__call__)
    kernels.rope = labelled("rope", kernels.rope)
    kernels.chunk_attention = labelled("attention", kernels.chunk_attention)
    kernels.cascade_push = labelled("push", kernels.cascade_push)
    attention.reduce_heads = labelled("score_sums", attention.reduce_heads)


def plot(path: str, named: list[str]) -> None:
    """Stacked bars, ms per chunk by part, one bar per LABEL=profile.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(n.split("=", 1)[0], json.loads(Path(n.split("=", 1)[1]).read_text())) for n in named]
    parts = ["model (rest of forward)", "attention", "push", "rope", "plan", "rope_tables", "commit"]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(runs) + 1.6))
    left = [0.0] * len(runs)
    for part in parts:
        ms = [next((r["ms_per_chunk"] for r in run["rows"] if r["part"] == part), 0.0) for _, run in runs]
        ax.barh(range(len(runs)), ms, left=left, label=part)
        left = [a + b for a, b in zip(left, ms)]
    ax.set_yticks(range(len(runs)), [name for name, _ in runs])
    ax.invert_yaxis()
    ax.set_xlabel("ms per 512-token chunk (torch.profiler)")
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25 - 0.1 / len(runs)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--plot":
        return plot(sys.argv[2], sys.argv[3:])
    p = argparse.ArgumentParser()
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--cascades", default="auto")
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--tokens", type=int, default=8192, help="document length (cascades auto resolve for it)")
    p.add_argument("--warm", type=int, default=6, help="chunks read before profiling (the cache fills)")
    p.add_argument("--chunks", type=int, default=4, help="chunks profiled")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (each part then waits for its kernels)")
    p.add_argument("--model", default=None, help="model spec (default: the packaged default model)")
    p.add_argument("--out", default="results/profile")
    args = p.parse_args()
    global SYNC
    SYNC = args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    instrument()
    loaded = load_model(args.model, dtype=torch.bfloat16, say=lambda s: None, device=args.device)
    cascades = args.cascades if args.cascades == "auto" else int(args.cascades)
    config = CacheConfig(window=args.window, cascades=cascades).resolve(args.tokens)
    engine = runtime.Engine(loaded, config, stride=args.stride)
    n = (args.warm + args.chunks) * args.stride
    ids = bench_tokens(loaded.tokenizer, n)
    cache = engine.new_cache()
    chunks = [ids[i:i + args.stride] for i in range(0, n, args.stride)]
    for c in chunks[:args.warm]:
        engine.forward(torch.tensor([c]), cache)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for c in chunks[args.warm:]:
            with record_function("chunk"):
                engine.forward(torch.tensor([c]), cache)
                if SYNC:
                    torch.cuda.synchronize()
        wall = time.perf_counter() - start
    rows = breakdown(prof, wall, args.chunks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"w{args.window}_c{config.cascades}_s{args.stride}" + ("" if args.device == "cpu" else "_cuda")
    result = {"settings": {**vars(args), "cascades": config.cascades, "threads_used": torch.get_num_threads()},
              "wall_ms_per_chunk": 1000 * wall / args.chunks, "tokens_per_second": args.chunks * args.stride / wall,
              "rows": rows,
              "top_ops": top_ops(prof, args.chunks)}
    (out / f"profile_{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("settings", "wall_ms_per_chunk", "tokens_per_second")}))
    print(table(result))


def breakdown(prof, wall: float, chunks: int) -> list[dict]:
    """ms per chunk of each label (inclusive), its aten-op time, and the model's rest."""
    events = prof.events()
    spans = {l: [] for l in (*LABELS, "chunk")}
    for e in events:
        if e.name in spans:
            spans[e.name].append((e.time_range.start, e.time_range.end))
    ops = [e for e in events if e.name.startswith("aten::") and e.cpu_parent is not None]
    # self time of top-level aten ops under each label (own time of every op, children included once)
    def op_time_inside(intervals):
        total = 0.0
        for e in events:
            if not e.name.startswith("aten::"):
                continue
            s, t = e.time_range.start, e.time_range.end
            if any(a <= s and t <= b for a, b in intervals):
                total += e.self_cpu_time_total
        return total
    rows = []
    inner = 0.0
    for label in LABELS:
        iv = spans[label]
        if not iv:
            continue
        wall_us = sum(b - a for a, b in iv)
        if label != "score_sums":  # score_sums is inside attention
            inner += wall_us
        rows.append({"part": label, "ms_per_chunk": wall_us / 1000 / chunks,
                     "aten_ms_per_chunk": op_time_inside(iv) / 1000 / chunks, "calls_per_chunk": len(iv) / chunks})
    chunk_us = sum(b - a for a, b in spans["chunk"])
    model_ops = op_time_inside(spans["chunk"]) - sum(op_time_inside(spans[l]) for l in LABELS
                                                     if l != "score_sums" and spans[l])
    rows.append({"part": "model (rest of forward)", "ms_per_chunk": (chunk_us - inner) / 1000 / chunks,
                 "aten_ms_per_chunk": model_ops / 1000 / chunks, "calls_per_chunk": 1})
    rows.append({"part": "total", "ms_per_chunk": chunk_us / 1000 / chunks,
                 "aten_ms_per_chunk": op_time_inside(spans["chunk"]) / 1000 / chunks, "calls_per_chunk": 1})
    return rows


def top_ops(prof, chunks: int, n: int = 15) -> list[dict]:
    avg = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:n]
    return [{"op": e.key, "self_ms_per_chunk": e.self_cpu_time_total / 1000 / chunks, "calls_per_chunk": e.count / chunks}
            for e in avg]


def table(result: dict) -> str:
    lines = ["| part | ms/chunk | of which aten ops | Python + dispatch | calls/chunk |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['part']} | {r['ms_per_chunk']:.1f} | {r['aten_ms_per_chunk']:.1f} | "
                     f"{r['ms_per_chunk'] - r['aten_ms_per_chunk']:.1f} | {r['calls_per_chunk']:.0f} |")
    lines.append("")
    lines.append("| op | self ms/chunk | calls/chunk |")
    lines.append("|---|---|---|")
    for o in result["top_ops"]:
        lines.append(f"| {o['op']} | {o['self_ms_per_chunk']:.1f} | {o['calls_per_chunk']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
