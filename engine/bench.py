"""Reading benchmark: tokens/s and peak RSS vs document length, per policy, written as JSON + PNG.

Each (dtype, policy, length) runs in its own process, so peak RSS is that run's alone. The
"ceiling" row is the same chunked forward with attention skipped: what the rest of the model costs
on this machine, the bound any cache policy can approach.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from .cache import CacheConfig
from .devices import parse_device
from .errors import UserError

PAIR_CHUNKS = 16  # chunks per paired segment of a pipelined read: its one fill and drain are ~1/16 of it


def bench_tokens(tokenizer, n: int) -> list[int]:
    """n token ids of real English text (the KJV, repeated if needed)."""
    from .corpus import kjv_text

    ids: list[int] = []
    # at least a few verses: a cut below the first verse's length gave empty text and an endless loop
    text = kjv_text(max_chars=min(4_200_000, max(n * 6, 4_096)))
    # Tokenize in line-aligned pieces, as document ingestion does: one call over the whole text leaves
    # a length-dependent transient (~20 MB at 64k tokens) in the RSS the benchmark attributes to reading.
    piece = 16_384
    while len(ids) < n:
        start = 0
        while start < len(text) and len(ids) < n:
            end = text.find("\n", start + piece) + 1 or len(text)
            ids.extend(tokenizer(text[start:end], add_special_tokens=False).input_ids)
            start = end
    return ids[:n]


def kjv_document(tokenizer, n: int):
    """The KJV from Genesis 1:1 as one plain-text document with "# Book chapter" headings (recall's
    passage labels), cut at a chapter boundary near n tokens (the whole Bible is ~1.07M)."""
    from .corpus import kjv_verses
    from .documents import document_from_text

    sample = "".join(f"{v.verse} {v.text}\n" for v in kjv_verses()[:3000])
    chars_per_token = len(sample) / len(tokenizer(sample, add_special_tokens=False).input_ids)
    parts, size, last = [], 0, None
    for v in kjv_verses():
        if (v.book, v.chapter) != last:
            if size >= n * chars_per_token:
                break
            parts.append(f"\n# {v.book} {v.chapter}\n")
            last = (v.book, v.chapter)
        parts.append(f"{v.verse} {v.text}\n")
        size += len(parts[-1])
    return document_from_text("".join(parts).lstrip(), title="KJV")


class ReadTrace:
    """A progress callback that samples throughput and RSS along a read (is memory flat? is speed?)."""

    def __init__(self):
        self.proc, self.points = psutil.Process(), []  # (tokens read, seconds, RSS MB) after every chunk

    def __call__(self, p) -> None:
        self.points.append((p.tokens_read, p.seconds, self.proc.memory_info().rss / 2 ** 20))

    def summary(self) -> dict:
        """Speed over the whole read and its first and last quarter of tokens; RSS at each quarter's end.

        Quarters are cut by tokens read, not by samples: a read ends with its rest in power-of-two chunks
        (runtime.tail_chunks), so with few strides (a 33k-token book at stride 4,096: 8 strides and ~6
        small chunks) the last quarter of the samples held a few hundred tokens and reported 4 tok/s."""
        tokens, secs, rss = (np.asarray(x, dtype=np.float64) for x in zip(*self.points))
        n = len(tokens) - 1
        # the sample where each quarter of the tokens is reached; the last quarter is measured from the
        # sample before 3/4 of the tokens, so that both measured stretches hold at least a quarter
        q = [min(int(np.searchsorted(tokens, f * tokens[-1])), n) for f in (0.25, 0.5, 0.75)]
        last = int(np.searchsorted(tokens, 0.75 * tokens[-1], side="right")) - 1

        def rate(a, b):  # tokens per second between two samples
            return float((tokens[b] - tokens[a]) / max(secs[b] - secs[a], 1e-9))

        overall = float(tokens[-1] / secs[-1])  # also each quarter's, for a read of one sample
        return {"tokens": int(tokens[-1]), "read_seconds": float(secs[-1]), "tokens_per_second": overall,
                "first_quarter_tps": rate(0, max(q[0], 1)) if n else overall,
                "last_quarter_tps": rate(min(max(last, 0), n - 1), n) if n else overall,
                "rss_mb_at_quarters": [round(float(rss[i]), 1) for i in (*q, n)]}

    def write(self, path: Path, **extra) -> dict:
        """Append the summary, with `extra` fields, as one JSON line."""
        out = {**extra, **self.summary()}
        with open(path, "a") as f:
            f.write(json.dumps(out) + "\n")
        return out


def read_and_ask(loaded, config: CacheConfig, args: dict) -> dict:
    """Read the KJV as a user's document (read + passages + index), then answer one question with recall."""
    from .session import ReadingSession

    doc = kjv_document(loaded.tokenizer, args["length"])
    session = ReadingSession(loaded, config, stride=args["stride"])
    trace = ReadTrace()
    start = time.perf_counter()
    read = session.read(doc, progress=trace)
    seconds = time.perf_counter() - start  # reading + cutting the passages + the index
    answer = "".join(session.ask(args["question"], max_new_tokens=48))
    a = session.answers[-1]
    along = trace.summary()
    return {
        "doc_tokens": read.doc_tokens, "seconds": seconds, "read_seconds": read.seconds,
        "index_seconds": seconds - read.seconds, "tokens_per_second": read.doc_tokens / read.seconds,
        "first_quarter_tps": along["first_quarter_tps"], "last_quarter_tps": along["last_quarter_tps"],
        "rss_mb_at_quarters": along["rss_mb_at_quarters"],
        "peak_rss_mb": read.peak_rss_mb, "cascades": session.config.cascades, "stride": session.stride,
        "passages": len(session.index.passages), "index_mb": session.index.nbytes_on_disk() / 2 ** 20,
        "question": args["question"], "answer": answer, "first_token_seconds": a.first_token_seconds,
        "answer_tokens": a.tokens, "answer_seconds": a.seconds,
        "recalled": [d["label"] for d in a.recalled],
        "peak_memory_mb": session.device_report()["peak_memory_mb"],  # CPU: the process's RSS; CUDA: allocated
    }


def _skip_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The model ceiling: no attention at all (output zeros of the right shape)."""
    return torch.zeros_like(query).transpose(1, 2), None


def skip_attention(model) -> None:
    """From now on the model runs as the ceiling (`_skip_attention`)."""
    from transformers import AttentionInterface

    AttentionInterface.register("skip", _skip_attention)
    model.set_attn_implementation("skip")


@contextlib.contextmanager
def attention_skipped(model):
    """The model runs as the ceiling inside, with its own attention again after."""
    before = model.config._attn_implementation
    skip_attention(model)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def worker(args: dict) -> dict:
    """One run in this process: read `length` tokens with one policy; returns timings and RSS."""
    import resource

    from .devices import peak_memory_mb
    from .models import load_model
    from .runtime import Engine

    torch.manual_seed(0)
    from . import pipeline, threads

    threads.configure(args.get("threads", "auto"))
    pipeline.configure(args.get("pipeline", "auto"))
    device = parse_device(args.get("device"))
    loaded = load_model(args["model"], dtype=getattr(torch, args["dtype"]), say=lambda s: None, device=device)
    ids = bench_tokens(loaded.tokenizer, args["length"])
    policy = args["policy"]
    config = CacheConfig(policy="sink" if policy == "ceiling" else policy, sinks=args["sinks"],
                         window=args["window"], cascades=args["cascades"], block=args.get("block", 1),
                         cascade_sizes=args.get("cascade_sizes", "equal"),
                         contest=args.get("contest", "head"),
                         block_score=args.get("block_score", "max")).resolve(args["length"])
    if args.get("question") and policy != "ceiling":
        row = read_and_ask(loaded, config, args)
        return {"policy": policy, "dtype": args["dtype"], "length": row["doc_tokens"], **row,
                "cache_slots": config.slots, "threads": torch.get_num_threads(), "device": str(device)}
    engine = Engine(loaded, config, stride=args["stride"])
    if policy == "ceiling":
        skip_attention(loaded.model)
    paired = bool(args.get("paired")) and policy != "ceiling"
    # --paired: the ceiling timed right beside the read, chunk by chunk (segment by segment when pipelined)
    ceiling_times: list[float] = []
    paired_times: list[float] = []  # the read's own time of each chunk or segment the ceiling ran beside

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        if device.type == "cuda":  # kernels run asynchronously: time the chunk, not its launch
            torch.cuda.synchronize(device)
        return time.perf_counter() - t

    def ceiling_forward(chunk: list[int]) -> None:
        loaded.model.model(input_ids=torch.tensor([chunk], device=device), use_cache=False)

    def read(ids: list[int], cache, chunk_times: list[float]) -> None:
        for i in range(0, len(ids), engine.stride):
            chunk = ids[i:i + engine.stride]
            if policy == "ceiling":
                chunk_times.append(timed(lambda: ceiling_forward(chunk)))
                continue
            chunk_times.append(timed(lambda: engine.forward(torch.tensor([chunk]), cache)))
            if paired:
                # The ceiling measured beside each chunk, not minutes before in another process: this
                # machine's speed drifts by up to 30% between runs, more than the ratio's distance to a target.
                with attention_skipped(loaded.model):
                    ceiling_times.append(timed(lambda: ceiling_forward(chunk)))
                paired_times.append(chunk_times[-1])

    warmup_seconds = None
    if device.type == "cuda":
        # The first read on a GPU compiles and autotunes the kernels for every slot-count bucket the cache
        # grows through (on the first lent GPU, most of an 8k read). A warm-up read as long as it takes
        # the cache to fill (plus the last chunk's odd length) pays that once; it is reported, not hidden.
        fill = config.slots if config.slots is not None else 2 * engine.stride  # full attention: no fixed slots
        n = min(len(ids), (-(-fill // engine.stride) + 2) * engine.stride)
        start = time.perf_counter()
        with torch.inference_mode():
            warm_cache = engine.new_cache()
            read(ids[:n], warm_cache, [])
            if len(ids) % engine.stride and n % engine.stride == 0:
                read(ids[:len(ids) % engine.stride], warm_cache, [])
            del warm_cache
        warmup_seconds = time.perf_counter() - start
        ceiling_times.clear()
        paired_times.clear()
    cache = engine.new_cache()
    proc = psutil.Process()
    rss_reading = proc.memory_info().rss
    chunk_times: list[float] = []
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # The ceiling reads through the same pipeline as the cascade (engine/pipeline.py), its attention skipped
    # (`skip_attention` above): the bound under the schedule the cascade runs, plan and all.
    pipelined = engine.pipelined(cache)
    start = time.perf_counter()
    if pipelined:  # as a document is read: chunk times from the progress after each chunk
        marks: list[float] = []

        def after_chunk(p) -> None:
            nonlocal rss_reading
            marks.append(time.perf_counter())
            rss_reading = max(rss_reading, proc.memory_info().rss)

        # --paired: segments of PAIR_CHUNKS chunks, each read again right after with attention skipped through
        # the same pipeline. A pipeline cannot switch attention off between two chunks it overlaps, so the
        # pairs are segments; each pays one pipeline fill and drain, both reads alike.
        segment = PAIR_CHUNKS * engine.stride if paired else len(ids)
        ceiling_cache = engine.new_cache() if paired else None  # skipped attention leaves its slots untouched
        for i in range(0, len(ids), segment):
            piece = ids[i:i + segment]
            marks.append(time.perf_counter())
            engine.read([piece], cache, progress=after_chunk)
            segment_times = list(np.diff(marks))
            chunk_times += segment_times
            marks.clear()
            if paired:
                with attention_skipped(loaded.model):
                    ceiling_times.append(timed(lambda: engine.read([piece], ceiling_cache)))
                paired_times.append(sum(segment_times))
    else:
        with torch.inference_mode():
            for i in range(0, len(ids), engine.stride):
                read(ids[i:i + engine.stride], cache, chunk_times)
                rss_reading = max(rss_reading, proc.memory_info().rss)  # sampled after every chunk
    seconds = time.perf_counter() - start - sum(ceiling_times)  # the read's own time (--paired: without the ceiling's)
    q = max(1, len(chunk_times) // 4)
    first, last = sum(chunk_times[:q]), sum(chunk_times[-q:])
    return {
        "policy": policy, "dtype": args["dtype"], "length": len(ids), "seconds": seconds,
        "tokens_per_second": len(ids) / seconds,
        "first_quarter_tps": q * engine.stride / first, "last_quarter_tps": q * engine.stride / last,
        # process peak (includes loading the model) and the peak seen while reading
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_mb": rss_reading / 2 ** 20, "rss_after_load_mb": rss0,
        "cache_slots": config.slots if policy != "ceiling" else 0, "stride": engine.stride, "pipelined": pipelined,
        "threads": torch.get_num_threads(), "thread_probes_ms": threads.report()["thread_probes_ms"],
        "device": str(device), "peak_memory_mb": peak_memory_mb(device), "warmup_seconds": warmup_seconds,
        **(paired_ratio(paired_times, ceiling_times, len(ids), "segment" if pipelined else "chunk") if paired else {}),
    }


def paired_ratio(times: list[float], ceiling_times: list[float], tokens: int, unit: str) -> dict:
    """The read against the ceiling timed beside each of its chunks or segments (`--paired`): the ratio of
    the sums and the quartiles of the per-unit ratios."""
    per_unit = np.asarray(ceiling_times) / np.asarray(times)  # ceiling seconds / read seconds
    q = max(1, len(times) // 4)  # flat over a long read, whatever the machine's drift: first and last quarter
    return {"paired_ceiling_tps": tokens / sum(ceiling_times), "paired_unit": unit, "paired_units": len(times),
            "over_paired_ceiling": sum(ceiling_times) / sum(times),
            "over_paired_ceiling_first_last_quarter": [sum(ceiling_times[:q]) / sum(times[:q]),
                                                       sum(ceiling_times[-q:]) / sum(times[-q:])],
            "over_paired_ceiling_quartiles": [float(x) for x in np.percentile(per_unit, [25, 50, 75])]}


def run_read_bench(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "read_bench.json"
    rows: list[dict] = []
    policies = list(dict.fromkeys(["ceiling", *args.policies]))
    args.device = str(parse_device(args.device))  # a bad device fails here too, not in every worker
    for policy in args.policies:  # bad settings fail here, in one line, before any worker starts
        CacheConfig(policy=policy, sinks=args.sinks, window=args.window, cascades=args.cascades, block=args.block,
                    cascade_sizes=args.cascade_sizes, contest=args.contest, block_score=args.block_score)
    if (args.stride != "auto" and args.stride < 1) or any(n < 1 for n in args.lengths) \
            or getattr(args, "ceiling_max", 1) < 1:
        raise UserError("bench: --stride, --lengths and --ceiling-max must be >= 1 (--stride may be auto)")
    for dtype in args.dtypes:
        for length in sorted(args.lengths):
            for policy in policies:
                if policy == "full" and length > args.full_max:
                    continue
                # the ceiling has no attention, so its speed cannot depend on the length: past ceiling_max
                # tokens it is measured at ceiling_max (a 1M-token ceiling would add ~6 minutes here)
                run_length = min(length, getattr(args, "ceiling_max", 65536)) if policy == "ceiling" else length
                job = {"model": args.model, "device": args.device, "dtype": dtype, "policy": policy,
                       "length": run_length, "sinks": args.sinks, "window": args.window, "cascades": args.cascades,
                       "stride": args.stride, "block": args.block, "cascade_sizes": args.cascade_sizes,
                       "contest": args.contest, "block_score": args.block_score,
                       "threads": getattr(args, "threads", "auto"), "paired": getattr(args, "paired", False),
                       "pipeline": getattr(args, "pipeline", "auto"),
                       "question": getattr(args, "question", None)}
                print(f"bench: {dtype} {policy} {length} tokens...", file=sys.stderr, flush=True)
                # The worker inherits OMP_WAIT_POLICY: PASSIVE rescues an oversubscribed CPU but costs
                # ~1.6x on a quiet one (measured here: 690 vs 1103 tok/s), so it is the caller's choice.
                row = run_worker("engine.bench", job, f"the {policy} run at {length} tokens")
                row["requested_length"] = length
                ceiling = next((r for r in rows if r["policy"] == "ceiling" and r["dtype"] == dtype
                                and r["requested_length"] == length), None)
                if ceiling is not None:  # measured in this run, just before
                    row["over_ceiling"] = row["tokens_per_second"] / ceiling["tokens_per_second"]
                rows.append(row)
                print(f"  {row['tokens_per_second']:.0f} tok/s, peak RSS {row['peak_rss_mb']:.0f} MB"
                      + (f", {row['over_ceiling']:.2f} of the ceiling" if "over_ceiling" in row else "")
                      + (f", {row['over_paired_ceiling']:.2f} of the ceiling timed beside each {row['paired_unit']}"
                         if "over_paired_ceiling" in row else "")
                      + (f"; answer: {row['answer']!r}" if "answer" in row else ""), file=sys.stderr)
                if getattr(args, "busy", False) and policy != "ceiling":
                    with background_load() as n:
                        busy = run_worker("engine.bench", job, f"the busy {policy} run at {length} tokens")
                    row.update(busy_processes=n, busy_tokens_per_second=busy["tokens_per_second"],
                               busy_over_quiet=busy["tokens_per_second"] / row["tokens_per_second"],
                               busy_threads=busy.get("threads"), busy_thread_probes_ms=busy.get("thread_probes_ms"))
                    print(f"  busy ({n} busy processes): {busy['tokens_per_second']:.0f} tok/s "
                          f"({row['busy_over_quiet']:.0%} of quiet)", file=sys.stderr)
                results_path.write_text(json.dumps({"settings": vars_of(args), "rows": rows}, indent=1))
    summary = summarize(rows)
    results_path.write_text(json.dumps({"settings": vars_of(args), "rows": rows, "summary": summary}, indent=1))
    plot(rows, out / "read_bench.png")
    return {"rows": rows, "summary": summary, "json": str(results_path), "png": str(out / "read_bench.png")}


@contextlib.contextmanager
def background_load(processes: int | None = None):
    """A bounded busy machine: one spinning process per core (like a build or a busy browser beside
    the reader), started here and always stopped on the way out. Yields the number of processes."""
    n = processes or os.cpu_count() or 1
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5)  # let the scheduler see them
        yield n
    finally:
        for p in procs:
            p.kill()
            p.wait()


def run_worker(module: str, job: dict, what: str) -> dict:
    """Run `python -m module JOB` in a fresh process (its RSS is its own); its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, "-m", module, json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("error: ")
        raise UserError(f"bench: {what} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def vars_of(args) -> dict:
    settings = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list, type(None)))}
    return {**settings, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "cpu_count": os.cpu_count()}


def summarize(rows: list[dict]) -> dict:
    """The issue's targets, computed from the rows."""
    out = {}
    for dtype in sorted({r["dtype"] for r in rows}):
        by = {(r["policy"], r.get("requested_length", r["length"])): r for r in rows if r["dtype"] == dtype}
        s = {}
        lengths = sorted({l for p, l in by if p == "cascade"})
        if lengths:
            longest = by[("cascade", lengths[-1])]
            s["cascade_last_vs_first_quarter"] = longest["last_quarter_tps"] / longest["first_quarter_tps"]
            if ("cascade", 8192) in by:
                s["cascade_rss_growth_8k_to_longest"] = longest["peak_rss_mb"] / by[("cascade", 8192)]["peak_rss_mb"] - 1
            for l in lengths:
                c = by[("cascade", l)]
                if ("full", l) in by:
                    s[f"cascade_over_full_at_{l}"] = c["tokens_per_second"] / by[("full", l)]["tokens_per_second"]
                if ("ceiling", l) in by:
                    s[f"cascade_over_ceiling_at_{l}"] = c["tokens_per_second"] / by[("ceiling", l)]["tokens_per_second"]
                if "over_paired_ceiling" in c:
                    s[f"cascade_over_paired_ceiling_at_{l}"] = c["over_paired_ceiling"]
        out[dtype] = s
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for dtype in sorted({r["dtype"] for r in rows}):
        for policy in sorted({r["policy"] for r in rows}):
            sel = sorted((r for r in rows if r["policy"] == policy and r["dtype"] == dtype), key=lambda r: r["length"])
            if not sel:
                continue
            x = [r["length"] for r in sel]
            label = f"{policy} ({dtype})"
            a.plot(x, [r["tokens_per_second"] for r in sel], marker="o", label=label)
            b.plot(x, [r["peak_rss_mb"] for r in sel], marker="o", label=label)
    for ax, title in ((a, "reading throughput (tokens/s)"), (b, "peak RSS (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("document length (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    try:
        print(json.dumps(worker(json.loads(sys.argv[1]))))
    except UserError as e:  # the parent shows this line as the reason
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
