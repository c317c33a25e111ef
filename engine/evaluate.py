"""Evaluations: passkey retrieval, streaming perplexity, long-document QA (python -m engine eval ...).

Every case is appended to a JSONL file as soon as it finishes, keyed by all the settings that
change its result, so a long grid can be stopped and resumed: a second run with the same settings
skips the cases already in the file. Each case draws its own random numbers from a seed string made
of its coordinates, so a case gets the same passkey, depth and document whichever grid it is part of.
Summaries are written as JSON, a PNG and a Markdown table, over the rows of the current settings.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .cache import POLICIES, CacheConfig
from .cli import add_layout_options, int_or_auto
from .errors import UserError
from .recall import NARROW_TOKENS, ORDERS

FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                    "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
# the paper's form (their passkey set): a marked block that states the key six times, in two lines
NEEDLE_REPEATED = ("=== IMPORTANT INFORMATION BEGINS ===\nTHE PASS KEY! The pass key is {key}. {key} is the pass key. "
                   "**the pass key is {key}** REMEMBER THE PASS KEY\nONCE MORE:\nTHE PASS KEY! The pass key is {key}. "
                   "{key} is the pass key. **the pass key is {key}** REMEMBER THE PASS KEY\n"
                   "=== IMPORTANT INFORMATION ENDS ===")
NEEDLES = {"ours": NEEDLE, "repeated": NEEDLE_REPEATED}
PASSKEY_QUESTION = "What is the pass key?"
PASSKEY_ANSWER_PREFIX = "The pass key is"
DEPTH_BANDS = [(0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0)]


# ------------------------------------------------------------------ shared

def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="task", required=True)
    for name, helptext in (("passkey", "passkey retrieval by length x depth"),
                           ("ppl", "streaming perplexity on the KJV"),
                           ("qa", "questions about facts at known depths of the KJV")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", default=None, help="model spec (default: smollm2)")
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
        p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
        p.add_argument("--policies", nargs="+", default=["cascade", "sink", "full"], choices=POLICIES)
        qa = name == "qa"  # its defaults depend on --set (filled in by main)
        p.add_argument("--window", type=int, default=None if qa else 512 if name == "ppl" else 256,
                       help="non-sink slots per layer (cascade and sink get the same budget)")
        p.add_argument("--sinks", type=int, default=64)
        p.add_argument("--cascades", type=int_or_auto, default=None if qa else "auto" if name == "passkey" else 4,
                       help="an integer or auto (passkey's default: the span covers each case's prompt)")
        p.add_argument("--stride", type=int_or_auto if qa else int, default=None if qa else 256,
                       help="chunk length for reading" + (" (books: auto, the product's default, as in `engine ask`)"
                                                          if qa else ""))
        p.add_argument("--beta", type=float, default=None, help="score EMA factor (default: the cache's, 0.9999)")
        add_layout_options(p)
        p.add_argument("--head-reduce", choices=["max", "mean"], default=None,
                       help="how a GQA group's query heads combine into one score (default: max)")
        p.add_argument("--out", default="results/eval", help="folder for the .jsonl/.json/.png/.md files")
        p.add_argument("--seed", type=int, default=0)
        if name == "passkey":
            p.add_argument("--prompt", choices=["chat", "plain"], default="plain",
                           help="prompt format (plain works much better for passkey with tiny models)")
            p.add_argument("--lengths-x", type=float, nargs="+", default=[1, 4, 16],
                           help="prompt lengths (prefix + haystack + question + answer) as multiples of the cache "
                                "size (sinks + window): at 1x everything fits the cache")
            p.add_argument("--samples", type=int, default=4, help="samples per (length, depth band)")
            p.add_argument("--focus", action="store_true",
                           help="the question's rows join every chunk's attention scores while reading (never pushed)")
            p.add_argument("--focus-share", type=float, default=None,
                           help="with --focus: the share of every chunk's score mass the question's rows carry "
                                "(default: plain rows, ~4%%; 1 = SnapKV, the question alone)")
            p.add_argument("--needle", choices=list(NEEDLES), default="ours",
                           help="ours: the key twice in one sentence; repeated: the paper's marked block, key x6")
            p.add_argument("--haystack", choices=["filler", "kjv"], default="filler",
                           help="repeated 'The grass is green...' filler, or KJV verses")
            p.add_argument("--new-tokens", type=int, default=8, help="tokens generated for the answer")
            p.add_argument("--recall", nargs="+", choices=["on", "off"], default=["off"],
                           help="on: each case is read and asked through ReadingSession, which re-reads the "
                                "passages the question needs (rows labelled policy+recall)")
            p.add_argument("--recall-tokens", type=int, default=384, help="recall budget (tokens)")
        elif name == "ppl":
            p.add_argument("--tokens", type=int, default=16384, help="length of the KJV stream")
            p.add_argument("--start-verse", type=int, default=0, help="first KJV verse of the stream")
            p.add_argument("--bucket", type=int, default=1024, help="tokens per point of the NLL curve")
        else:
            p.add_argument("--prompt", choices=["chat", "plain"], default=None,
                           help="prompt format (default: the model's own, as `python -m engine ask`)")
            p.add_argument("--lengths-x", type=float, nargs="+", default=[1, 4, 16],
                           help="document lengths as multiples of the cache size (sinks + window)")
            p.add_argument("--samples", type=int, default=1, help="documents per (length, depth band)")
            p.add_argument("--facts", type=int, default=1,
                           help="facts per document: the one asked about, plus distractors at random depths")
            p.add_argument("--new-tokens", type=int, default=None, help="answer length limit (24; books: 48)")
            p.add_argument("--set", choices=["synthetic", "books"], default="synthetic",
                           help="synthetic facts in KJV text (window 256, 4 cascades, stride 256), or natural "
                                "questions over whole books (assets/eval/books_qa.json; the product's defaults: "
                                "window 512, cascades auto, stride auto)")
            p.add_argument("--recall", nargs="+", choices=["on", "off"], default=None,
                           help="recall settings to run (synthetic: off; books: on off)")
            p.add_argument("--recall-tokens", type=int, default=384, help="recall budget (tokens)")
            p.add_argument("--recall-best", type=int, default=None,
                           help="books: the best recalled passage cut to at most this many tokens (0 = whole; "
                                "default: the engine's)")
            p.add_argument("--recall-narrow", type=int, default=NARROW_TOKENS,
                           help="books: recalled passages after the best one cut to at most this many "
                                "tokens (0 = whole)")
            p.add_argument("--names", choices=["source", "free"], default="source",
                           help="books: names and numbers an answer may write (source: only its passages' or the "
                                "document's; free: any)")
            p.add_argument("--recall-share", type=float, default=None,
                           help="books: passages after the best recalled only at this share of its BM25 score "
                                "(0 = fill the budget; default: the engine's)")
            p.add_argument("--recall-order", choices=ORDERS, default=None,
                           help="books: the order recalled passages are re-read in (default: the engine's)")
            p.add_argument("--repetition-penalty", type=float, default=None,
                           help="books: penalty on tokens the answer already used (1 = off; default: the engine's)")
            p.add_argument("--books", nargs="+", default=None, help="books: which books of the set (default: all)")
            p.add_argument("--limit", type=int, default=None, help="books: first N questions per book")
            p.add_argument("--references", nargs="*", choices=["none", "oracle"], default=["none", "oracle"],
                           help="books: reference rows (no document; full attention over only the answer's "
                                "passages); none given: no reference rows")
            p.add_argument("--bible", action="store_true",
                           help="books: the whole KJV (~1M tokens) as one document, with the set's Bible questions")
    from .eval_summary import add_parser

    add_parser(sub)



def _check_args(args) -> None:
    if (args.window < 1 or args.sinks < 0 or (args.stride != "auto" and args.stride < 1)
            or (args.cascades != "auto" and args.cascades < 1)):
        raise UserError("window, cascades and stride must be >= 1 and sinks >= 0")
    for policy in args.policies:
        _config(args, policy)  # the cache options themselves (sizes, blocks) fail here, in one line
    if any(x <= 0 for x in getattr(args, "lengths_x", [1])):
        raise UserError("--lengths-x must be positive")
    if getattr(args, "samples", 1) < 1:
        raise UserError("--samples must be >= 1")
    if getattr(args, "tokens", 2) < 2:
        raise UserError("--tokens must be >= 2")
    if getattr(args, "facts", 1) < 1:
        raise UserError("--facts must be >= 1")
    share = getattr(args, "focus_share", None)
    if share is not None and (not args.focus or not 0 < share <= 1):
        raise UserError("--focus-share needs --focus and a share in (0, 1]")


def _key(case: dict) -> str:
    return json.dumps(case, sort_keys=True)


class Results:
    """Append-only JSONL of finished cases, for resumable grids."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = []
        if path.exists():
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a run killed mid-write leaves a cut last line
                    _say(f"{path}:{n}: skipping an unreadable line")
                    continue
                if isinstance(row, dict) and isinstance(row.get("case"), dict):
                    self.rows.append(row)
        self.done = {_key(r["case"]) for r in self.rows}

    def has(self, case: dict) -> bool:
        return _key(case) in self.done

    def add(self, case: dict, result: dict) -> None:
        row = {"case": case, **result}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        self.done.add(_key(case))

    def matching(self, settings: dict, ignore: frozenset = frozenset()) -> list[dict]:
        """Rows whose case agrees with every given setting, and has none of OPTIONAL_KEYS that the settings
        lack (so an ablation row never counts as a default one); keys in `ignore` are not compared."""
        keys = (set(settings) | OPTIONAL_KEYS) - ignore
        return [r for r in self.rows if all(r["case"].get(k) == settings.get(k) for k in keys)]


# Keys a case carries only when its run set them away from their defaults (or, for the book set's newer
# settings, away from the defaults its older rows were run with)
OPTIONAL_KEYS = frozenset({"beta", "head_reduce", "recall", "focus", "focus_share", "recall_best", "recall_share",
                           "recall_order", "repetition_penalty", "repetition_penalty_from", "names"})


def _ablation(args) -> dict:
    """Cache options given explicitly (kept out of the case key otherwise, so defaults stay comparable)."""
    return {k: v for k, v in (("beta", getattr(args, "beta", None)), ("head_reduce", getattr(args, "head_reduce", None)))
            if v is not None}


def _config(args, policy: str) -> CacheConfig:
    return CacheConfig(policy=policy, sinks=args.sinks, window=args.window, cascades=args.cascades,
                       block=args.block, cascade_sizes=args.cascade_sizes, contest=args.contest,
                       block_score=args.block_score, **_ablation(args))


def _settings(args, loaded, task: str, **extra) -> dict:
    """What every case of one run shares (the summary is made over rows with these settings)."""
    dtype = str(next(loaded.model.parameters()).dtype).replace("torch.", "")
    return {"task": task, "model": loaded.model_id, "dtype": dtype, "window": args.window, "sinks": args.sinks,
            "stride": args.stride, "seed": args.seed, **_ablation(args), **extra}


def _policy_fields(args, policy: str) -> dict:
    """The case fields of one policy. Cascades, block and sizes only matter to the cascade policy (sink is
    one window); block and sizes join the key only when not the defaults, so older rows stay comparable."""
    fields = {"policy": policy, "cascades": {"cascade": args.cascades, "sink": 1}.get(policy)}
    if policy == "cascade":
        default = CacheConfig()
        fields.update({k: getattr(args, k) for k in ("block", "cascade_sizes", "contest", "block_score")
                       if getattr(args, k) != getattr(default, k)})
    return fields


def _for_run(rows: list[dict], args) -> list[dict]:
    """Rows of the policies asked for; cascade rows only with this run's cascades, block and sizes."""
    default = CacheConfig()
    want = _policy_fields(args, "cascade")
    return [r for r in rows if r["case"]["policy"] in args.policies
            and (r["case"]["policy"] != "cascade"
                 or all(r["case"].get(k, getattr(default, k)) == v for k, v in want.items()))]


def _fits(loaded, policy: str, total_tokens: int) -> bool:
    """Full attention only where the whole prompt fits the model's trained positions."""
    return policy != "full" or loaded.fits_positions(total_tokens)


def _stops(tokenizer) -> set[int]:
    ids = [tokenizer.eos_token_id]
    try:
        ids.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    except (KeyError, ValueError):
        pass
    unk = getattr(tokenizer, "unk_token_id", None)
    return {i for i in ids if isinstance(i, int) and i >= 0 and i != unk}


def needle_retention(cache, positions: list[int]) -> float:
    """Share of the given stream positions still resident, averaged over layers and KV heads.

    1.0 for full attention. For hybrid (Gemma-3) caches only the global layers are counted.
    """
    if cache.config.policy == "full" or not positions:
        return 1.0
    part = cache.parts["global"]
    target = torch.tensor(positions, device=part.device)
    shares = []
    for layer in range(part.n_layers):
        pos = part.original_positions(layer)  # [batch, kv_heads, slots]
        shares.append((pos[..., None] == target).any(dim=2).float().mean().item())
    return float(np.mean(shares))


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson interval of a proportion k/n."""
    if n == 0:
        return (0.0, 0.0)
    z, p = 1.96, k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def sign_test(won: int, lost: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven between `won` and `lost`
    when each discordant case goes either way with probability 1/2 (ties, right or wrong in both, carry
    no information about which is better and are left out)."""
    n = won + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(won, lost) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt_len(n: int) -> str:
    return f"{n / 1000:.1f}k".replace(".0k", "k") if n >= 1000 else str(n)


# ------------------------------------------------------------------ passkey

def haystack_units(tokenizer, kind: str = "filler") -> list[list[int]]:
    """Token ids of the haystack's units (sentences or verses), each starting with its separator,
    so units concatenate (and a needle slots in between two of them) with natural tokenization."""
    if kind == "filler":
        texts, sep = list(FILLER_SENTENCES), " "
    elif kind == "kjv":
        from .corpus import kjv_verses

        texts, sep = [v.text for v in kjv_verses()[:4000]], "\n"
    else:
        raise UserError(f"haystack must be 'filler' or 'kjv', not '{kind}'")
    return [tokenizer(sep + t, add_special_tokens=False).input_ids for t in texts]


def passkey_prompt(tokenizer, n_tokens: int, depth: float, key: str, haystack: str = "filler",
                   units: list[list[int]] | None = None, start: int = 0,
                   needle: str = "ours") -> tuple[list[int], int, int]:
    """A haystack of n_tokens (needle included) with the needle at relative `depth`.

    The needle goes between two units (sentences / verses), at the boundary nearest to the
    requested depth. Returns (ids, needle_start, needle_length); depth = needle_start / (n - needle).
    """
    units = units or haystack_units(tokenizer, haystack)
    sep = " " if haystack == "filler" else "\n"
    needle_ids = tokenizer(sep + NEEDLES[needle].format(key=key), add_special_tokens=False).input_ids
    body = max(0, n_tokens - len(needle_ids))
    hay, bounds, i = [], [0], start
    while len(hay) < body:
        hay.extend(units[i % len(units)])
        bounds.append(len(hay))
        i += 1
    hay = hay[:body]
    bounds = [b for b in bounds if b <= body]
    target = depth * body
    at = min(bounds, key=lambda b: abs(b - target))
    return hay[:at] + needle_ids + hay[at:], at, len(needle_ids)


def digits_score(answer: str, key: str) -> tuple[bool, float]:
    """Exact match of the first number in the answer, and the share of the key's digits that are
    right position by position (missing digits count as wrong)."""
    m = re.search(r"\d+", answer)
    got = m.group(0) if m else ""
    per_digit = sum(a == b for a, b in zip(got.ljust(len(key)), key)) / len(key)
    return got == key, per_digit


def passkey_draw(seed: int, length: int, band: int, sample: int) -> tuple[float, str, int]:
    """Depth, key and haystack offset of one case: a function of its coordinates only."""
    rng = random.Random(f"passkey/{seed}/{length}/{band}/{sample}")
    lo, hi = DEPTH_BANDS[band]
    return rng.uniform(lo, hi), str(rng.randrange(10000, 100000)), rng.randrange(0, 1000)


def run_passkey(args) -> dict:
    """Each case's prompt (prefix + haystack + question + answer) is `length` tokens, so at 1x all of it
    fits the cache; retention is measured when the first answer token is predicted."""
    from . import models
    from .prompts import prompt_format
    from .runtime import Engine
    from .session import AnswerSettings

    _check_args(args)
    answering = AnswerSettings(recall=True, recall_tokens=args.recall_tokens)  # checked before the model loads
    loaded = models.load_model(args.model, dtype=args.dtype, say=_say, device=getattr(args, "device", None))
    tok = loaded.tokenizer
    fmt = prompt_format(tok, args.prompt, loaded.bos)
    prefix = tok(fmt.prefix, add_special_tokens=False).input_ids
    sep = " " if args.prompt == "plain" else ""
    question = tok(fmt.question_text(PASSKEY_QUESTION) + sep + PASSKEY_ANSWER_PREFIX, add_special_tokens=False).input_ids
    units = haystack_units(tok, args.haystack)
    stops = _stops(tok)
    budget = args.sinks + args.window
    settings = _settings(args, loaded, "passkey", prompt=args.prompt, haystack=args.haystack,
                         new_tokens=args.new_tokens, needle=args.needle, protocol=2,
                         **({"focus": True} if args.focus else {}),
                         **({"focus_share": args.focus_share} if args.focus_share is not None else {}))
    results = Results(Path(args.out) / "passkey.jsonl")
    lengths = sorted({max(32, round(budget * x)) for x in args.lengths_x})
    overhead = len(prefix) + len(question) + args.new_tokens
    if lengths[0] - overhead < 32:
        raise UserError(f"the shortest prompt ({lengths[0]} tokens) leaves no room for a haystack after "
                        f"{overhead} tokens of prefix, question and answer")
    engines: dict = {}
    for recall_on, policy, length in itertools.product([r == "on" for r in args.recall], args.policies, lengths):
        config = _config(args, policy).resolve(length)  # cascades auto: the span covers the prompt
        for band in range(len(DEPTH_BANDS)):
            for s in range(args.samples):
                case = {**settings, **_policy_fields(args, policy), "length": length, "band": band, "sample": s,
                        **({"recall": "on", "recall_tokens": args.recall_tokens} if recall_on else {})}
                if results.has(case):
                    continue
                if not _fits(loaded, policy, length):
                    continue
                depth, key, offset = passkey_draw(args.seed, length, band, s)
                hay, at, n_needle = passkey_prompt(tok, length - overhead, depth, key, args.haystack, units,
                                                   offset, args.needle)
                if recall_on:
                    results.add(case, passkey_with_recall(args, loaded, config, answering, tok.decode(hay), key))
                    r = results.rows[-1]
                    _say(f"passkey {policy}+recall {length} tok band {band}: {r['answer'].strip()!r} "
                         f"({'ok' if r['exact'] else 'miss'}, recall hit {r['hit']})")
                    continue
                if config not in engines:
                    engines[config] = Engine(loaded, config, stride=args.stride)
                    engines[config].focus_share = args.focus_share
                engine = engines[config]
                digit_pos = [len(prefix) + at + i for i, t in enumerate(hay[at:at + n_needle])
                             if any(ch.isdigit() for ch in tok.decode([t]))]
                cache = engine.new_cache()
                t0 = time.perf_counter()
                engine.read([prefix + hay], cache, focus=question if args.focus else None)
                kept_read = needle_retention(cache, digit_pos)
                kept = []  # at the first answer token: the question has been read too
                out = list(engine.generate(cache, question, max_new_tokens=args.new_tokens, stop_ids=stops,
                                           after_prompt=lambda: kept.append(needle_retention(cache, digit_pos))))
                answer = tok.decode(out, skip_special_tokens=True)
                exact, per_digit = digits_score(answer, key)
                results.add(case, {"key": key, "depth": at / max(1, len(hay) - n_needle),
                                   "needle_from_end": len(hay) - at, "answer": answer, "exact": exact,
                                   "per_digit": per_digit, "needle_kept": kept[0], "needle_kept_read": kept_read,
                                   "cascades_used": config.effective_cascades if policy != "full" else None,
                                   "span": config.span, "seconds": time.perf_counter() - t0})
                _say(f"passkey {policy} {length} tok band {band}: {answer.strip()!r} "
                     f"({'ok' if exact else 'miss'}, needle digits kept {kept[0]:.2f})")
    rows = [r for recall in args.recall
            for r in _for_run(results.matching({**settings, **({"recall": "on"} if recall == "on" else {})}), args)
            if recall == "off" or r["case"].get("recall_tokens") == args.recall_tokens]
    return summarize_passkey(rows, Path(args.out), loaded.model_id,
                             {**settings, "cascades": args.cascades, "block": args.block,
                              "cascade_sizes": args.cascade_sizes, "contest": args.contest,
                              "block_score": args.block_score})


def passkey_with_recall(args, loaded, config: CacheConfig, answering, text: str, key: str) -> dict:
    """One passkey case the way a user meets it: the haystack read as a document, then the question
    asked through ReadingSession with recall. Retention is the key's digit tokens in the document memory
    (it is frozen, so the same when the answer starts); hit: a recalled passage holds the key."""
    from . import documents
    from .session import ReadingSession

    t0 = time.perf_counter()
    session = ReadingSession(loaded, config, stride=args.stride, prompt=args.prompt, answering=answering)
    doc = documents.document_from_text(text, title="passkey haystack")
    session.read(doc)
    first = text.index(key)  # the key's first mention in the needle
    kept = needle_retention(session.doc_cache, _stream_positions(session, text, first, first + len(key)))
    # no answer prefix here (the model says "The pass key is" itself), so its tokens are added to the limit
    limit = args.new_tokens + len(loaded.tokenizer(" " + PASSKEY_ANSWER_PREFIX, add_special_tokens=False).input_ids)
    "".join(session.ask(PASSKEY_QUESTION, max_new_tokens=limit, n_citations=0))
    answer = session.answers[-1]
    exact, per_digit = digits_score(answer.text, key)
    hit = any(key in r["text"] for r in answer.recalled)  # keys are the haystack's only digits
    return {"key": key, "answer": answer.text, "exact": exact, "per_digit": per_digit, "needle_kept": kept,
            "needle_kept_read": kept, "hit": hit, "recalled_text": [r["text"] for r in answer.recalled],
            "recalled_tokens": sum(r["token_end"] - r["token_start"] for r in answer.recalled),
            "cascades_used": config.effective_cascades if config.policy != "full" else None, "span": config.span,
            "seconds": time.perf_counter() - t0}


def _row_policy(case: dict) -> str:
    """A row's label in the tables: its policy, '+recall' when the question was answered with recall."""
    return case["policy"] + ("+recall" if case.get("recall") == "on" else "")


def _policy_order(label: str) -> tuple[int, bool]:
    return POLICIES.index(label.split("+")[0]), label.endswith("+recall")


def passkey_table(rows: list[dict]) -> dict:
    """(policy, length, band) -> dict of means over samples."""
    cells: dict = {}
    for r in rows:
        c = r["case"]
        cells.setdefault((_row_policy(c), c["length"], c["band"]), []).append(r)
    return {k: {"exact": float(np.mean([r["exact"] for r in v])),
                "per_digit": float(np.mean([r["per_digit"] for r in v])),
                "kept": float(np.mean([r.get("needle_kept", 1.0) for r in v])), "n": len(v)}
            for k, v in cells.items()}


def retention_groups(rows: list[dict]) -> tuple[list[bool], list[bool], list[bool]]:
    """Exact-match outcomes split by needle retention: every digit token kept in every layer and
    head / partly kept / none kept."""
    full, part, none = [], [], []
    for r in rows:
        kept = r.get("needle_kept", 1.0)
        (full if kept >= 1.0 else part if kept > 0 else none).append(bool(r["exact"]))
    return full, part, none


def summarize_passkey(rows: list[dict], out: Path, model_id: str, settings: dict) -> dict:
    table = passkey_table(rows)
    policies = sorted({k[0] for k in table}, key=_policy_order)
    lengths = sorted({k[1] for k in table})
    summary = {"settings": settings, "cells": [{"policy": p, "length": n, "band": b, **v}
                                               for (p, n, b), v in sorted(table.items())]}

    def mean(p, n, field):
        sel = [v[field] for (pp, nn, _), v in table.items() if pp == p and nn == n]
        return (float(np.mean(sel)), len(sel)) if sel else (None, 0)

    summary["by_length"] = [{"policy": p, "length": n, "exact": mean(p, n, "exact")[0],
                             "per_digit": mean(p, n, "per_digit")[0], "kept": mean(p, n, "kept")[0]}
                            for p in policies for n in lengths if mean(p, n, "exact")[0] is not None]
    (out / "passkey.json").write_text(json.dumps(summary, indent=1))
    budget = settings["sinks"] + settings["window"]
    head = "| policy | " + " | ".join(f"{_fmt_len(n)} ({n / budget:g}x)" for n in lengths) + " |"
    rule = "|---|" + "---|" * len(lengths)
    n_samples = max((v["n"] for v in table.values()), default=0)
    md = [(f"Passkey retrieval, {model_id} ({settings['dtype']}, {settings['prompt']} prompt, "
          f"{settings['haystack']} haystack, needle {settings.get('needle', 'ours')}; prompt length = haystack + "
          f"prefix + question + answer): cache {settings['sinks']} sinks + {settings['window']} window "
          f"(cascade: {settings.get('cascades', '?')} cascades, block {settings.get('block', 1)}, sizes "
          f"{settings.get('cascade_sizes', 'equal')}, contest {settings.get('contest', 'head')}, block score "
          f"{settings.get('block_score', 'max')}), stride {settings['stride']}, "
          f"{len(DEPTH_BANDS)} depth bands x {n_samples} sample(s) per length."), "",
          "Exact match [95% Wilson interval] (mean per-digit accuracy), n cases per cell:", "", head, rule]
    for p in policies:
        cells = []
        for n in lengths:
            hits = [bool(r["exact"]) for r in rows if _row_policy(r["case"]) == p and r["case"]["length"] == n]
            if not hits:
                cells.append("-")
                continue
            lo, hi = wilson(sum(hits), len(hits))
            cells.append(f"{sum(hits) / len(hits):.2f} [{lo:.2f}-{hi:.2f}] ({mean(p, n, 'per_digit')[0]:.2f}), "
                         f"n={len(hits)}")
        md.append(f"| {p} | " + " | ".join(cells) + " |")
    md += ["", ("Share of the key's digit tokens still in the cache when the first answer token is predicted "
           "(mean over layers, KV heads, depth bands):"), "", head, rule]
    for p in policies:
        if p == "full":
            continue
        md.append(f"| {p} | " + " | ".join(f"{mean(p, n, 'kept')[0]:.2f}" if mean(p, n, "kept")[0] is not None
                                           else "-" for n in lengths) + " |")
    md += ["", "Exact match by how much of the key survived in the cache (all lengths; correct / cases):", "",
           "| policy | every digit token kept | partly kept | none kept |", "|---|---|---|---|"]
    for p in policies:
        if p == "full":
            continue
        groups = retention_groups([r for r in rows if _row_policy(r["case"]) == p])
        md.append(f"| {p} | " + " | ".join(f"{sum(g)} / {len(g)}" for g in groups) + " |")
    md += ["", "Exact match by needle depth (rows) and length (columns):", ""]
    for p in policies:
        md += [f"{p}:", "", "| depth | " + " | ".join(_fmt_len(n) for n in lengths) + " |", rule]
        for b, (lo, hi) in enumerate(DEPTH_BANDS):
            md.append(f"| {int(lo * 100)}-{int(hi * 100)}% | " + " | ".join(
                f"{table[(p, n, b)]['exact']:.2f}" if (p, n, b) in table else "-" for n in lengths) + " |")
        md.append("")
    md.append("Full attention runs only where the prompt fits the model's trained positions.")
    (out / "passkey.md").write_text("\n".join(md) + "\n")
    _heatmaps(table, policies, lengths, out / "passkey.png", f"passkey exact match, {model_id}")
    return summary


def _heatmaps(table, policies, lengths, path, title):
    plt = _plt()
    n = max(1, len(policies))
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 1.4, 3.4), squeeze=False)
    im = None
    for ax, p in zip(axes[0], policies):
        grid = np.full((len(DEPTH_BANDS), len(lengths)), np.nan)
        for j, length in enumerate(lengths):
            for b in range(len(DEPTH_BANDS)):
                if (p, length, b) in table:
                    grid[b, j] = table[(p, length, b)]["exact"]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        for b in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                ax.text(j, b, "-" if np.isnan(grid[b, j]) else f"{grid[b, j]:.1f}", ha="center", va="center",
                        fontsize=8)
        ax.set_xticks(range(len(lengths)), [_fmt_len(x) for x in lengths])
        ax.set_yticks(range(len(DEPTH_BANDS)), [f"{int(lo * 100)}-{int(hi * 100)}%" for lo, hi in DEPTH_BANDS]
                      if ax is axes[0][0] else [])
        ax.set_title(p)
        ax.set_xlabel("prompt tokens")
    for ax in axes[0][len(policies):]:
        ax.axis("off")
    axes[0][0].set_ylabel("needle depth")
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), fraction=0.03)
    fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------ perplexity

FINE = 128  # tokens per stored NLL sum; curves and ranges are built from these


def stream_nll(engine, ids: list[int], n: int, stride: int) -> np.ndarray:
    """nll[t] = -log p(ids[t + 1] | ids[:t + 1]) for t < n, reading ids in `stride` chunks."""
    cache = engine.new_cache()
    nll = np.zeros(n, dtype=np.float64)
    for i in range(0, n, stride):
        chunk = ids[i:min(i + stride, n)]
        logits = engine.forward(torch.tensor([chunk]), cache, logits="all")[0]  # [L, vocab]
        target = torch.tensor(ids[i + 1:i + 1 + len(chunk)], device=logits.device)
        nll[i:i + len(chunk)] = torch.nn.functional.cross_entropy(
            logits[:len(target)].float(), target, reduction="none").double().cpu().numpy()
    return nll


def range_nll(row: dict, lo: int, hi: int) -> float | None:
    """Mean NLL of the predictions at positions [lo, hi), from the stored 128-token sums."""
    sums, n = row["sums"], row["case"]["tokens"]
    hi = min(hi, n)
    if lo % FINE or (hi % FINE and hi != n) or hi <= lo:
        raise ValueError("ranges must fall on 128-token boundaries")
    return float(sum(sums[lo // FINE:math.ceil(hi / FINE)]) / (hi - lo))


def run_ppl(args) -> dict:
    from . import models
    from .corpus import kjv_text
    from .runtime import Engine

    _check_args(args)
    loaded = models.load_model(args.model, dtype=args.dtype, say=_say, device=getattr(args, "device", None))
    tok = loaded.tokenizer
    text = loaded.bos + kjv_text(max_chars=args.tokens * 8, start_verse=args.start_verse)
    ids = tok(text, add_special_tokens=False).input_ids[:args.tokens + 1]
    if len(ids) < args.tokens + 1:
        raise UserError(f"the KJV text from verse {args.start_verse} gives only {len(ids)} tokens")
    settings = _settings(args, loaded, "ppl", start_verse=args.start_verse)
    results = Results(Path(args.out) / "ppl.jsonl")
    for policy in args.policies:
        n = args.tokens
        if policy == "full" and loaded.max_positions:
            n = min(n, loaded.max_positions)  # full attention only over the model's trained positions
        case = {**settings, **_policy_fields(args, policy), "tokens": n}
        if results.has(case):
            continue
        engine = Engine(loaded, _config(args, policy), stride=args.stride)
        t0 = time.perf_counter()
        nll = stream_nll(engine, ids, n, args.stride)
        sums = [float(nll[a:a + FINE].sum()) for a in range(0, n, FINE)]
        results.add(case, {"nll": float(nll.mean()), "ppl": math.exp(nll.mean()), "sums": sums,
                           "seconds": time.perf_counter() - t0})
        _say(f"ppl {policy} ({n} tokens): nll {nll.mean():.4f} ppl {math.exp(nll.mean()):.3f}")
    rows = _for_run([r for r in results.matching(settings) if r["case"]["tokens"] in (
        args.tokens, min(args.tokens, loaded.max_positions or args.tokens))], args)
    return summarize_ppl(rows, Path(args.out), loaded.model_id, settings, args.bucket, args.cascades)


def summarize_ppl(rows: list[dict], out: Path, model_id: str, settings: dict, bucket: int, cascades: int) -> dict:
    order = {p: i for i, p in enumerate(POLICIES)}
    rows = sorted(rows, key=lambda r: (order.get(r["case"]["policy"]), -r["case"]["tokens"]))
    budget = settings["sinks"] + settings["window"]
    common = min((r["case"]["tokens"] for r in rows), default=0) // FINE * FINE
    beyond = math.ceil(budget / FINE) * FINE  # first position where a fixed cache can have evicted tokens
    summary = {"settings": {**settings, "cascades": cascades}, "budget": budget, "common_tokens": common,
               "rows": []}
    md = [(f"Streaming perplexity on the KJV (from verse {settings['start_verse']}), {model_id} "
          f"({settings['dtype']}): cascade and sink with the same {budget} slots ({settings['sinks']} sinks + "
          f"{settings['window']} window; cascade: {cascades} cascades), stride {settings['stride']}; full "
          f"attention only over the model's trained positions. NLL is in nats per token."), "",
          (f"| policy | slots | tokens | NLL (all) | ppl (all) | NLL 0-{_fmt_len(common)} | "
          f"NLL {_fmt_len(beyond)}-{_fmt_len(common)} |"), "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["case"]
        a = range_nll(r, 0, common) if common else None
        b = range_nll(r, beyond, common) if common > beyond else None
        slots = "all" if c["policy"] == "full" else str(budget)
        summary["rows"].append({"policy": c["policy"], "tokens": c["tokens"], "nll": r["nll"], "ppl": r["ppl"],
                                "nll_common": a, "nll_common_beyond_cache": b, "seconds": r["seconds"]})
        md.append(f"| {c['policy']} | {slots} | {c['tokens']:,} | {r['nll']:.4f} | {r['ppl']:.3f} | "
                  + (f"{a:.4f}" if a is not None else "-") + " | " + (f"{b:.4f}" if b is not None else "-") + " |")
    md += ["", (f"NLL 0-{_fmt_len(common)}: over the tokens every policy read (full attention's range); "
           f"NLL {_fmt_len(beyond)}-{_fmt_len(common)}: the part of it where a {budget}-slot cache has started "
           f"to evict (before that all policies see the same context).")]
    (out / "ppl.md").write_text("\n".join(md) + "\n")
    (out / "ppl.json").write_text(json.dumps(summary, indent=1))
    _curves(rows, out / "ppl.png", model_id, bucket, budget)
    return summary


def _curves(rows, path, model_id, bucket, budget):
    plt = _plt()
    bucket = max(FINE, bucket // FINE * FINE)
    fig, (ax, dax) = plt.subplots(1, 2, figsize=(11, 4))
    ref = next((r for r in rows if r["case"]["policy"] == "sink"), None)
    for r in rows:
        n = r["case"]["tokens"]
        edges = list(range(0, n, bucket)) + [n]
        xs = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
        ys = [range_nll(r, a, b) for a, b in itertools.pairwise(edges)]
        ax.plot(xs, ys, marker="o", ms=3, label=f"{r['case']['policy']} (ppl {r['ppl']:.2f} over {_fmt_len(n)})")
        if ref is not None:
            n = min(n, ref["case"]["tokens"])
            edges = list(range(0, n, bucket)) + [n]
            dax.plot([(a + b) / 2 for a, b in itertools.pairwise(edges)],
                     [range_nll(r, a, b) - range_nll(ref, a, b) for a, b in itertools.pairwise(edges)],
                     marker="o", ms=3, label=r["case"]["policy"])
    for a in (ax, dax):
        a.axvline(budget, color="grey", ls=":", lw=1)
        a.set_xlabel(f"position in stream (tokens; {bucket}-token buckets; dotted: cache size)")
        a.grid(alpha=0.3)
        a.legend()
    ax.set_ylabel("mean NLL (nats/token)")
    ax.set_title(f"streaming NLL on the KJV, {model_id}")
    dax.set_ylabel("NLL minus the sink policy's (nats/token)")
    dax.set_title("difference from the sink cache (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ long-document QA

def qa_document(verses, tokenizer, n_tokens: int, depths, rng: random.Random):
    """A stretch of KJV verses of about n_tokens, with one 'special word' fact per depth.

    Each fact is made from the text itself: right after a verse, the line
    'Remember: the special word for <Book c:v> is "<a word of that verse>".' is inserted.
    Returns (text, items) where items hold depth, ref, word and the fact's line index.
    """
    start = rng.randrange(0, len(verses) - 4000)
    target = n_tokens - 20 * len(depths)  # a fact line is about 20 tokens
    lines, size, k = [], 0, start
    while k < len(verses):
        batch = verses[k:k + 64]
        lengths = [len(ids) + 1 for ids in tokenizer([v.text for v in batch], add_special_tokens=False).input_ids]
        for v, n in zip(batch, lengths):
            if size + n > target and len(lines) >= len(depths):
                break
            lines.append(v)
            size += n
        else:
            k += len(batch)
            continue
        break
    items, used = [], set()
    for d in depths:
        idx = min(len(lines) - 1, int(d * len(lines)))
        while idx in used and idx + 1 < len(lines):
            idx += 1
        used.add(idx)
        v = lines[idx]
        words = {w.strip(".,;:!?'\"()").lower() for w in v.text.split()}
        words = sorted(w for w in words if w.isalpha() and len(w) >= 5 and w not in {i["word"] for i in items})
        items.append({"depth": d, "line": idx, "ref": f"{v.book} {v.chapter}:{v.verse}",
                      "word": rng.choice(words) if words else rng.choice(["cedar", "lamp", "vine", "stone"])})
    out = [v.text for v in lines]
    for it in sorted(items, key=lambda i: -i["line"]):
        out.insert(it["line"] + 1, f"Remember: the special word for {it['ref']} is \"{it['word']}\".")
    return "\n".join(out), items


def qa_score(answer: str, word: str, others: list[str]) -> tuple[bool, bool]:
    """(correct, exact): the word appears in the answer as a whole word; exact also requires that no
    other fact's word does (an answer listing every special word is not a retrieval)."""
    low = answer.lower()

    def has(w):
        return re.search(rf"\b{re.escape(w)}\b", low) is not None

    correct = has(word)
    return correct, correct and not any(has(o) for o in others if o != word)


def qa_draw(seed: int, length: int, band: int, sample: int, facts: int) -> tuple[list[float], random.Random]:
    """Depths of a QA case's facts (the asked one first, inside the band; distractors anywhere) and
    the case's own random generator (document start, words): a function of its coordinates only."""
    rng = random.Random(f"qa/{seed}/{length}/{band}/{sample}/{facts}")
    lo, hi = DEPTH_BANDS[band]
    return [rng.uniform(lo, hi)] + [rng.random() for _ in range(facts - 1)], rng


def qa_defaults(args) -> None:
    """Fill the qa options left unset with the defaults of its --set."""
    books = getattr(args, "set", "synthetic") == "books"
    # books: the product's own defaults (CacheConfig's window; stride auto, resolved once the model's device is known)
    for field, synthetic, book in (("window", 256, CacheConfig().window), ("cascades", 4, "auto"),
                                   ("stride", 256, "auto"), ("new_tokens", 24, 48), ("recall", ["off"], ["on", "off"])):
        if getattr(args, field, None) is None:
            setattr(args, field, book if books else synthetic)


def resolve_stride(args, loaded) -> None:
    """`--stride auto`: the number `engine ask` would read with on this device and model, so every row's
    case records the stride that ran (4,096 on a GPU, 512 on the CPU; runtime.auto_stride)."""
    if args.stride == "auto":
        from .runtime import auto_stride

        config = CacheConfig(policy="cascade", sinks=args.sinks, window=args.window)
        args.stride = auto_stride(next(loaded.model.parameters()).device, loaded.model.config, config)


def run_qa(args) -> dict:
    from . import models

    qa_defaults(args)
    _check_args(args)
    loaded = models.load_model(args.model, dtype=args.dtype, say=_say, device=getattr(args, "device", None))
    resolve_stride(args, loaded)
    for recall in args.recall:
        summary = run_qa_grid(args, loaded, recall)
    return summary


def run_qa_grid(args, loaded, recall: str) -> dict:
    from . import documents
    from .corpus import kjv_verses
    from .session import AnswerSettings, ReadingSession

    tok = loaded.tokenizer
    prompt = args.prompt or loaded.prompt_format
    settings = _settings(args, loaded, "qa", prompt=prompt, facts=args.facts, new_tokens=args.new_tokens)
    if recall == "on":  # rows without the key are recall off (they predate recall)
        settings.update(recall="on", recall_tokens=args.recall_tokens)
    answering = AnswerSettings(recall=recall == "on", recall_tokens=args.recall_tokens)
    results = Results(Path(args.out) / "qa.jsonl")
    verses = kjv_verses()
    budget = args.sinks + args.window
    lengths = sorted({max(32, round(budget * x)) for x in args.lengths_x})
    for length in lengths:
        for band in range(len(DEPTH_BANDS)):
            for s in range(args.samples):
                cases = [(p, {**settings, **_policy_fields(args, p), "length": length, "band": band, "sample": s})
                         for p in args.policies]
                cases = [(p, c) for p, c in cases if not results.has(c)]
                if not cases:
                    continue
                depths, rng = qa_draw(args.seed, length, band, s, args.facts)
                text, items = qa_document(verses, tok, length, depths, rng)
                doc = documents.document_from_text(text, title=f"KJV excerpt ({length} tokens)")
                doc_tokens = documents.count_tokens(doc, tok)
                target, words = items[0], [it["word"] for it in items]
                question = f"What is the special word for {target['ref']}?"
                for policy, case in cases:
                    session = ReadingSession(loaded, _config(args, policy), stride=args.stride, prompt=prompt,
                                             answering=answering)
                    prefix = len(tok(session.format.prefix, add_special_tokens=False).input_ids)
                    if not _fits(loaded, policy, prefix + doc_tokens + 40 + args.new_tokens):
                        continue
                    t0 = time.perf_counter()
                    read = session.read(doc)
                    kept = needle_retention(session.doc_cache, _fact_positions(session, doc, target))
                    "".join(session.ask(question, max_new_tokens=args.new_tokens, n_citations=0))
                    answer = session.answers[-1].text
                    correct, exact = qa_score(answer, target["word"], words)
                    results.add(case, {"doc_tokens": read.doc_tokens, "depth": target["depth"], "ref": target["ref"],
                                       "word": target["word"], "distractors": words[1:], "answer": answer,
                                       "correct": correct, "exact": exact, "fact_kept": kept,
                                       "seconds": time.perf_counter() - t0})
                    _say(f"qa {policy} {read.doc_tokens} tok band {band}: {target['word']!r} -> {answer!r} "
                         f"({'ok' if exact else 'miss'}, fact word kept {kept:.2f})")
    rows = _for_run(results.matching(settings), args)
    return summarize_qa(rows, Path(args.out), loaded.model_id, {**settings, "cascades": args.cascades})


def _fact_positions(session, doc, item) -> list[int]:
    """Stream positions (prompt prefix included) of the tokens that overlap the fact's word."""
    text = doc.text
    line = f'Remember: the special word for {item["ref"]} is "{item["word"]}".'
    start = text.index(line) + line.index(f'"{item["word"]}"') + 1
    return _stream_positions(session, text, start, start + len(item["word"]))


def _stream_positions(session, text: str, start: int, end: int) -> list[int]:
    """Stream positions (prompt prefix included) of the document tokens that overlap text[start:end]."""
    offsets = np.asarray(session.source_map.offsets)  # char offset of every document token
    following = np.append(offsets[1:], len(text))
    hits = np.nonzero((offsets < end) & (following > start))[0]
    return [session.prefix_tokens + int(i) for i in hits]


def summarize_qa(rows: list[dict], out: Path, model_id: str, settings: dict) -> dict:
    order = {p: i for i, p in enumerate(POLICIES)}
    policies = sorted({r["case"]["policy"] for r in rows}, key=order.get)
    lengths = sorted({r["case"]["length"] for r in rows})
    budget = settings["sinks"] + settings["window"]

    def sel(p, n=None, band=None):
        return [r for r in rows if r["case"]["policy"] == p and (n is None or r["case"]["length"] == n)
                and (band is None or r["case"]["band"] == band)]

    def mean(rs, field):
        vals = [r[field] for r in rs if r.get(field) is not None]
        return float(np.mean(vals)) if vals else None

    summary = {"settings": settings, "cells": [
        {"policy": p, "length": n, "documents": len(sel(p, n)), "exact": mean(sel(p, n), "exact"),
         "correct": mean(sel(p, n), "correct"), "fact_kept": mean(sel(p, n), "fact_kept"),
         "by_band": [mean(sel(p, n, b), "exact") for b in range(len(DEPTH_BANDS))]}
        for p in policies for n in lengths if sel(p, n)]}
    n_docs = max((len(sel(p, n)) for p in policies for n in lengths), default=0)
    head = "| policy | " + " | ".join(f"{_fmt_len(n)} ({n / budget:g}x)" for n in lengths) + " |"
    rule = "|---|" + "---|" * len(lengths)
    facts = settings["facts"]
    md = [f"Long-document QA on the KJV, {model_id} ({settings['dtype']}, {settings['prompt']} prompt, answered "
          f"through ReadingSession.ask): one asked fact per document at a depth drawn in each of "
          f"{len(DEPTH_BANDS)} bands" + (f", plus {facts - 1} distractor fact(s) at random depths" if facts > 1 else "")
          + f"; {n_docs} document(s) per length; cache {settings['sinks']} sinks + {settings['window']} window "
          f"(cascade: {settings['cascades']} cascades), stride {settings['stride']}.", "",
          "Accuracy (the right special word in the answer" + (", and no distractor's word" if facts > 1 else "")
          + "):", "", head, rule]
    for p in policies:
        md.append(f"| {p} | " + " | ".join(f"{mean(sel(p, n), 'exact'):.2f}" if sel(p, n) else "-"
                                           for n in lengths) + " |")
    md += ["", "Share of the fact's word tokens still in the cache when the question is asked:", "", head, rule]
    for p in policies:
        if p != "full":
            md.append(f"| {p} | " + " | ".join(f"{mean(sel(p, n), 'fact_kept'):.2f}" if sel(p, n) else "-"
                                               for n in lengths) + " |")
    md += ["", "Accuracy by how much of the fact's word survived in the cache (all lengths; correct / cases):", "",
           "| policy | every token kept | partly kept | none kept |", "|---|---|---|---|"]
    for p in policies:
        if p != "full":
            groups = retention_groups([{"needle_kept": r.get("fact_kept", 1.0), **r} for r in sel(p)])
            md.append(f"| {p} | " + " | ".join(f"{sum(g)} / {len(g)}" for g in groups) + " |")
    md += ["", "Accuracy by depth band of the fact, all lengths together:", "",
           "| policy | " + " | ".join(f"{int(lo * 100)}-{int(hi * 100)}%" for lo, hi in DEPTH_BANDS) + " |",
           "|---|" + "---|" * len(DEPTH_BANDS)]
    for p in policies:
        md.append(f"| {p} | " + " | ".join(f"{mean(sel(p, band=b), 'exact'):.2f}" if sel(p, band=b) else "-"
                                           for b in range(len(DEPTH_BANDS))) + " |")
    md += ["", "Full attention runs only where the document fits the model's trained positions."]
    (out / "qa.md").write_text("\n".join(md) + "\n")
    (out / "qa.json").write_text(json.dumps(summary, indent=1))
    _bars({p: [mean(sel(p, n), "exact") for n in lengths] for p in policies}, [_fmt_len(n) for n in lengths],
          out / "qa.png", f"long-document QA, {model_id}")
    return summary


def _bars(series: dict[str, list], labels: list[str], path, title):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + k * width for i, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_xlabel("document tokens")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> int:
    name = args.task
    if args.task == "qa":
        if args.set == "books":
            from .eval_books import run_books

            run_books(args)
            name = "books"
        else:
            run_qa(args)
    elif args.task == "summary":
        from .eval_summary import run_summary

        run_summary(args)
    else:
        {"passkey": run_passkey, "ppl": run_ppl}[args.task](args)
    out = Path(args.out)
    print((out / f"{name}.md").read_text())
    print(f"wrote {out / name}.jsonl/.json/.png/.md")
    return 0
