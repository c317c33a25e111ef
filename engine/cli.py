"""Command line: python -m engine ask|summarize|bench|eval ...

Progress goes to stderr; results to stdout (text, or one JSON object with --json). Any problem the
user can fix exits non-zero with a one-line message naming it, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .devices import parse_device, peak_rss_mb
from .errors import Cancelled, UserError


def int_or_auto(text: str) -> int | str:
    """A --cascades or --stride option: an integer or 'auto' (argparse prints the error in one line)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer or 'auto', not {text!r}") from None


def add_cache_options(p: argparse.ArgumentParser) -> None:
    from .cache import CacheConfig

    d = CacheConfig()
    p.add_argument("--model", default=None, help="smollm2 (default), a model folder, a .gguf file or a hub id")
    p.add_argument("--policy", default=d.policy, choices=["cascade", "sink", "full"])
    p.add_argument("--window", type=int, default=d.window, help="non-sink slots per layer")
    p.add_argument("--cascades", type=int_or_auto, default="auto",
                   help="cascades, or auto (default): the fewest whose span covers the document")
    p.add_argument("--sinks", type=int, default=d.sinks)
    p.add_argument("--beta", type=float, default=d.beta, help="EMA factor of attention scores")
    add_layout_options(p)
    p.add_argument("--stride", type=int_or_auto, default="auto",
                   help="tokens per chunk while reading, or auto (default): 512 on the CPU, 4096 on a GPU (fewer "
                        "if the model's positions need it)")
    p.add_argument("--rope", choices=["cache", "original"], default=d.rope,
                   help="RoPE positions: inside the cache (default) or original stream positions (ablation)")
    p.add_argument("--prompt", choices=["chat", "plain"], default=None,
                   help="prompt format (default: chat if the model has a chat template)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: bfloat16 on CUDA and where the CPU has native bf16 (about 2x faster), else float32")
    p.add_argument("--device", default="auto",
                   help="auto (default: CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--threads", default="auto",
                   help="CPU threads for the model: auto (default: measured now and every 10 s, so a busy "
                        "computer does not stall the read) or a number")
    p.add_argument("--pipeline", choices=["auto", "off"], default="auto",
                   help="read with the layers in two halves on two threads, a chunk apart (auto, default, where it "
                        "applies: CPU, Llama-family models, 2+ threads; faster on a busy computer) or off")


def add_layout_options(p: argparse.ArgumentParser, default_block: int | None = None,
                       default_sizes: str | None = None) -> None:
    """--block and --cascade-sizes (engine.cache.CacheConfig; engine/push_rule.py states the rule)."""
    from .cache import CacheConfig

    d = CacheConfig()
    p.add_argument("--block", type=int, default=d.block if default_block is None else default_block,
                   help=f"tokens that move through the cascades as one; contests are between blocks "
                        f"(1: the paper's token contests; default {d.block})")
    p.add_argument("--cascade-sizes", default=d.cascade_sizes if default_sizes is None else default_sizes,
                   help="slots per cascade: equal, half (cascade 0, the newest tokens, gets half the window) "
                        "or a list like 512,256,256,256 adding up to the window")
    p.add_argument("--contest", choices=["head", "layer", "model"], default=d.contest,
                   help="who decides which token stays: each KV head of each layer (the paper), each layer, "
                        f"or one decision for the whole model, so kept tokens are whole in every head (default {d.contest})")
    p.add_argument("--block-score", choices=["max", "sum"], default=d.block_score,
                   help="a block's score in a contest: its best token's, or the sum of its tokens' "
                        f"(the same for blocks of 1; default {d.block_score})")


def add_answer_options(p: argparse.ArgumentParser) -> None:
    from .recall import ORDERS
    from .session import AnswerSettings

    d = AnswerSettings()
    p.add_argument("--recall", choices=["on", "off"], default="on",
                   help="re-read the passages the question needs before answering (default on)")
    p.add_argument("--recall-tokens", type=int, default=d.recall_tokens, help="recall budget in tokens")
    p.add_argument("--recall-narrow", type=int, default=d.recall_narrow,
                   help="cut recalled passages after the best one to their best-matching lines, at most "
                        "this many tokens (0 = whole passages)")
    p.add_argument("--recall-best", type=int, default=d.recall_best,
                   help="cut the best recalled passage to at most this many tokens around its best-matching "
                        "line (0 = whole)")
    p.add_argument("--recall-share", type=float, default=d.recall_share,
                   help="recall a passage after the best only when its BM25 score is at least this share of the "
                        f"best's (0 = fill the budget; default {d.recall_share})")
    p.add_argument("--recall-order", choices=ORDERS, default=d.recall_order,
                   help="re-read the recalled passages in document order, or by rank with the best last, next to "
                        f"the question (default {d.recall_order})")
    p.add_argument("--memory-in-answer", action="store_true",
                   help="keep the cascade memory in view while answering from recalled passages")
    p.add_argument("--names", choices=["source", "free"], default=d.names,
                   help="names and numbers an answer may write: source (only those of its recalled passages, "
                        f"or of the document; default {d.names}) or free")
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help=f"penalty on tokens an answer already used (1 = off; default {d.repetition_penalty})")
    p.add_argument("--repetition-penalty-from", type=int, default=d.repetition_penalty_from,
                   help="an answer's repetition penalty applies once it has this many tokens: its first words may "
                        f"repeat the question's (default {d.repetition_penalty_from})")
    p.add_argument("--summary-repetition-penalty", type=float, default=d.summary_repetition_penalty,
                   help=f"penalty on tokens a summary already used (1 = off; default {d.summary_repetition_penalty})")
    p.add_argument("--no-repeat-ngram", type=int, default=d.no_repeat_ngram,
                   help="forbid repeating any n-gram of this size within an answer (0 = off)")
    p.add_argument("--summary-copy-tokens", type=int, default=d.summary_copy_tokens,
                   help="a cache summary may not copy this many tokens in a row from the passages it re-reads "
                        f"(default {d.summary_copy_tokens}; 0 = no limit)")


def answer_settings(args):
    from .session import AnswerSettings

    return AnswerSettings(recall=args.recall == "on", recall_tokens=args.recall_tokens,
                          recall_narrow=args.recall_narrow, recall_best=args.recall_best,
                          recall_share=args.recall_share, recall_order=args.recall_order,
                          repetition_penalty=args.repetition_penalty, no_repeat_ngram=args.no_repeat_ngram,
                          summary_repetition_penalty=args.summary_repetition_penalty,
                          repetition_penalty_from=args.repetition_penalty_from,
                          memory_in_answer=args.memory_in_answer, names=args.names,
                          summary_copy_tokens=args.summary_copy_tokens)


def cache_config(args):
    from .cache import CacheConfig

    return CacheConfig(policy=args.policy, sinks=args.sinks, window=args.window, cascades=args.cascades,
                       beta=args.beta, rope=args.rope, block=args.block, cascade_sizes=args.cascade_sizes,
                       contest=args.contest, block_score=args.block_score)


def load(args, say):
    from .models import load_model

    return load_model(args.model, dtype=args.dtype, say=say, device=args.device)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def open_session(args, read: bool = True):
    """Load the model and either read DOC (with a progress bar) or load --load SNAPSHOT.

    With read=False the document is only loaded (session.pending_document) for the caller to read.
    """
    from . import documents
    from .session import ReadingSession, check_request

    config = cache_config(args)  # validate options before the slow model load
    answering = answer_settings(args)
    if args.stride != "auto" and args.stride < 1:
        raise UserError(f"stride must be >= 1 or auto, not {args.stride}")
    check_request(getattr(args, "question", None), getattr(args, "max_new_tokens", 1),
                  getattr(args, "temperature", 0.0))
    if args.save:
        from .snapshots import check_writable

        check_writable(args.save)  # now, not after a read of minutes
    document = None if args.load else documents.load_document(args.doc)
    loaded = load(args, _say)
    session = ReadingSession(loaded, config, stride=args.stride, prompt=args.prompt, answering=answering)
    if args.load:
        session.load(args.load)
        return session
    if not read:
        session.pending_document = document
        return session
    bar = reading_bar(args, session, document)
    try:
        session.read(document, progress=bar.progress, total_tokens=bar.doc_tokens,
                     focus=args.question if getattr(args, "focus", False) else None)
    finally:
        bar.close()
    if args.save:
        _say(f"saved snapshot to {session.save(args.save)}")
    return session


def reading_bar(args, session, document):
    """A tqdm bar on stderr fed by ReadProgress callbacks (bar.progress)."""
    from tqdm import tqdm

    from . import documents

    doc_tokens = documents.count_tokens(document, session.loaded.tokenizer)
    bar = tqdm(total=doc_tokens + len(session._ids(session.format.prefix)), unit="tok", desc="reading",
               file=sys.stderr, disable=args.quiet, dynamic_ncols=True)

    def progress(p):
        bar.total = max(bar.total, p.tokens_total or 0)
        bar.update(p.tokens_read - bar.n)
        bar.set_postfix_str(f"{p.tokens_per_second:.0f} tok/s")

    bar.progress, bar.doc_tokens = progress, doc_tokens
    return bar


def result_json(session, answer, extra: dict | None = None) -> dict:
    from . import threads

    r = session.read_result
    loaded = session.loaded_seconds is not None  # from a snapshot: this run did not read
    out = {
        "answer": answer.text, "question": answer.question, "doc_tokens": r.doc_tokens,
        "read_seconds": None if loaded else round(r.seconds, 3),
        "tokens_per_second": None if loaded else round(r.tokens_per_second, 1),
        "loaded_seconds": round(session.loaded_seconds, 3) if loaded else None,
        "snapshot_read": {"seconds": round(r.seconds, 3), "tokens_per_second": round(r.tokens_per_second, 1)}
        if loaded else None,
        "answer_tokens": answer.tokens, "answer_seconds": round(answer.seconds, 3),
        # the process's peak includes loading the model; read_peak_rss_mb is the peak while reading
        "peak_rss_mb": round(peak_rss_mb(), 1), "read_peak_rss_mb": None if loaded else r.peak_rss_mb,
        "pipelined": None if loaded else r.pipelined,  # read in two pipelined halves (--pipeline)
        **session.device_report(), **threads.report(), "cache_slots": session.config.slots,
        "cache_mb": round(session.budget()["cache_mb"], 2), "policy": session.config.policy,
        "window": session.config.window, "cascades": session.config.cascades, "sinks": session.config.sinks,
        "stride": session.stride, "model": session.loaded.model_id, "prompt": session.format.name,
        "first_token_seconds": answer.first_token_seconds and round(answer.first_token_seconds, 3),
        "cut_by_token_limit": answer.cut,
        "recall": {"on": session.answering.recall and session.index is not None,
                   "budget_tokens": session.answering.recall_tokens, "note": answer.recall_note,
                   "index_mb": round(session.index.nbytes_on_disk() / 2 ** 20, 3) if session.index else None,
                   "passages": answer.recalled},
        "citations": [c.__dict__ for c in answer.citations],
    }
    out.update(extra or {})
    return out


def stream_out(gen, args) -> None:
    for delta in gen:
        if not args.json:
            print(delta, end="", flush=True)
    if not args.json:
        print()


def cmd_ask(args) -> int:
    session = open_session(args)
    stream_out(session.ask(args.question, max_new_tokens=args.max_new_tokens, temperature=args.temperature), args)
    answer = session.answers[-1]
    if args.json:
        print(json.dumps(result_json(session, answer)))
        return 0
    if answer.recall_note:
        print(f"  ({answer.recall_note})", file=sys.stderr)
    if answer.recalled:
        print("  recalled: " + ", ".join(p["label"] for p in answer.recalled), file=sys.stderr)
    for c in answer.citations:
        print(f"  [{c.label or 'token ' + str(c.token)}] {c.excerpt!r}", file=sys.stderr)
    return 0


def cmd_summarize(args) -> int:
    if args.mode == "sections":
        from .summaries import summarize_sections

        if args.load:
            raise UserError("--mode sections reads the document section by section; it cannot start from --load")
        session = open_session(args, read=False)
        sections, heading = [], None
        bar = reading_bar(args, session, session.pending_document)
        for event in summarize_sections(session, session.pending_document, final_tokens=args.max_new_tokens,
                                        progress=bar.progress):
            kind = event["type"]
            if kind == "section":
                sections.append(event)
            if kind == "status" and event["phase"] != "reading" and not args.quiet:
                eta = event["eta_seconds"]
                where = (f"final summary, part {event['part'] + 1}/{event['parts']}: {event['label']}"
                         if event["phase"] == "final" else
                         f"section {event['index'] + 1}/{event['of']}: {event['label']}")
                bar.write(f"[{where}{f', about {eta:.0f} s left' if eta is not None else ''}]", file=sys.stderr)
            if args.json or kind not in ("section_delta", "delta"):
                continue
            title = event["label"] if kind == "section_delta" else "Summary"
            if title != heading:  # a new section (or the final summary) starts streaming
                print(f"\n## {title}\n", flush=True)
                heading = title
            print(event["text"], end="", flush=True)
        bar.close()
        if args.save:
            session.save(args.save)
        answer = session.answers[-1]
        if args.json:
            print(json.dumps(result_json(session, answer, {"summary": answer.text, "mode": "sections",
                                                           "sections": sections})))
        else:
            print()
        return 0
    session = open_session(args)
    stream_out(session.summarize(max_new_tokens=args.max_new_tokens), args)
    answer = session.answers[-1]
    if args.json:
        print(json.dumps(result_json(session, answer, {"summary": answer.text, "mode": "cache"})))
    return 0


def cmd_bench(args) -> int:
    if args.kernels:
        from .kernels.bench import run_kernel_bench

        res = run_kernel_bench(args.out, sizes=args.sizes, device=parse_device(args.device))
    elif args.answers:
        from .bench_answers import run_answer_bench

        res = run_answer_bench(args)
    else:
        from .bench import run_read_bench

        res = run_read_bench(args)
    print(json.dumps(res.get("summary", res), indent=1))
    return 0


def cmd_eval(args) -> int:
    from . import evaluate

    return evaluate.main(args)


def build_parser() -> argparse.ArgumentParser:
    # the installed `cascade-reader` command names itself; `python -m engine` otherwise
    prog = "cascade-reader" if os.path.basename(sys.argv[0]) == "cascade-reader" else "python -m engine"
    parser = argparse.ArgumentParser(prog=prog, description="Cascade Reader engine")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("ask", "read a document and answer a question"),
                           ("summarize", "read a document and summarize it")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("doc", nargs="?", help="txt, md, pdf, epub, srt or vtt file")
        if name == "ask":
            p.add_argument("--question", "-q", required=True)
            p.add_argument("--focus", action="store_true",
                           help="read with the question in view: its attention joins the scores that decide "
                                "what the cascade keeps (the question itself is never stored)")
        else:
            p.add_argument("--mode", choices=["cache", "sections"], default="cache")
        add_cache_options(p)
        add_answer_options(p)
        p.add_argument("--max-new-tokens", type=int, default=256 if name == "ask" else 300)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.add_argument("--save", metavar="SNAPSHOT", help="save the read document to SNAPSHOT(.json/.safetensors)")
        p.add_argument("--load", metavar="SNAPSHOT", help="load a saved document instead of reading DOC")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    b = sub.add_parser("bench", help="reading throughput and memory vs length (JSON + PNG)")
    add_cache_options(b)
    b.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536])
    b.add_argument("--policies", nargs="+", default=["cascade", "sink", "full"])
    b.add_argument("--full-max", type=int, default=32768, help="longest length to run full attention at")
    b.add_argument("--ceiling-max", type=int, default=65536,
                   help="the ceiling (attention skipped) runs at most this many tokens: its speed does not depend on length")
    b.add_argument("--question", default=None,
                   help="read the KJV as a document (reading + passages + index) and answer this question with "
                        "recall after each non-ceiling read")
    b.add_argument("--kernels", action="store_true", help="time the attention kernels instead (GPU benchmark)")
    b.add_argument("--sizes", type=int, nargs="+", default=None, help="prompt sizes for --kernels")
    b.add_argument("--busy", action="store_true",
                   help="run each reading case again beside a background load it starts and stops itself "
                        "(one busy process per core) and report busy / quiet")
    b.add_argument("--paired", action="store_true",
                   help="also time the ceiling beside each chunk of every read (the same chunk, attention skipped; "
                        "a pipelined read: each segment of 16 chunks) and report that ratio: robust to a machine "
                        "whose speed drifts between runs")
    b.add_argument("--answers", type=int, default=0,
                   help="instead of reading speed: RSS after reading Exodus and after each of N answers")
    b.add_argument("--doc-chars", type=int, default=40_000, help="characters of Exodus read for --answers")
    b.add_argument("--max-new-tokens", type=int, default=256, help="answer length for --answers")
    b.add_argument("--out", default="results/bench", help="output folder")
    b.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="dtypes to compare")
    e = sub.add_parser("eval", help="passkey / perplexity / QA evaluations")
    try:
        from . import evaluate

        evaluate.add_arguments(e)
    except ImportError:
        pass
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("ask", "summarize") and not args.doc and not args.load:
        parser.error(f"{args.command} needs a document (DOC) or --load SNAPSHOT")
    handler = {"ask": cmd_ask, "summarize": cmd_summarize, "bench": cmd_bench, "eval": cmd_eval}[args.command]
    try:
        if getattr(args, "device", None) is not None:  # a bad device is refused before anything loads
            args.device = parse_device(args.device)
        if getattr(args, "threads", None) is not None:
            from . import threads

            threads.configure(args.threads)
        if getattr(args, "pipeline", None) is not None:
            from . import pipeline

            pipeline.configure(args.pipeline)
        return handler(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Cancelled as e:
        print(f"cancelled: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
