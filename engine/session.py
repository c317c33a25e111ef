"""Reading and answering sessions: one document, one cache, many questions.

A `ReadingSession` streams a document through the cache once (strided prefill), keeps the read
state, and answers each question from a copy of it, so questions never erode the document. A
running conversation (follow-ups that see earlier answers) is opt-in per question.
"""

from __future__ import annotations

import functools
import json
import re
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import psutil
import torch

from . import documents, packed, recall, snapshots
from .cache import CacheConfig, HybridCache, KVCache
from .copying import COPY_TOKENS, CopyGuard, whole_sentences, without_echo
from .architectures import check_positions
from .devices import peak_memory_mb
from .errors import UserError
from .memory import FrozenMemory, freeze, memory_of
from .models import LoadedModel
from .grounding import SourceNames, part_names, with_names
from .prompts import (DOC_OUTRO, SUMMARY_PART_QUESTION, SUMMARY_PART_STORY_QUESTION, SUMMARY_QUESTION, PromptFormat,
                      prompt_format)
from .recall import MIN_SHARE, NARROW_TOKENS, ORDERS
from .runtime import Engine, ReadProgress



@dataclass
class Citation:
    token: int  # document token the answer attended to most in this passage
    weight: float  # share of the answer's attention over document tokens (recalled and in memory)
    label: str  # the passage's label: "p. 3", "ch. 2: Title", "00:01:02 Alice", "Chapter 12", "lines 4-9"
    excerpt: str
    location: dict = field(default_factory=dict)
    source: str = "memory"  # "recalled": re-read for this question; "memory": a slot of the cache
    passage: int | None = None  # index of the passage in the document's passage index


@dataclass
class Answer:
    question: str
    text: str = ""
    tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: float | None = None  # from the question to the first answer token
    stopped: bool = False
    cut: bool = False  # ended by the token limit, not by the model
    citations: list[Citation] = field(default_factory=list)
    recalled: list[dict] = field(default_factory=list)  # passages re-read for this question
    recall_note: str = ""  # why nothing was recalled, when nothing was
    dropped_turns: int = 0  # earlier turns that no longer fit the conversation budget

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ReadResult:
    doc_tokens: int
    prompt_tokens: int  # prefix tokens before the document (pinned in the sinks)
    seconds: float
    tokens_per_second: float
    peak_rss_mb: float | None = None  # the process's largest RSS while reading (sampled after each chunk)
    pipelined: bool = False  # read in two pipelined halves of the layers (engine/pipeline.py)


@dataclass(frozen=True)
class AnswerSettings:
    """How questions are answered; with the cache config these fix the memory budget."""

    recall: bool = True
    recall_tokens: int = 384  # tail budget for re-read passages (measured: 384 beat 1,024, docs/eval.md)
    # Passages after the best one are cut to their best-matching lines, at most this many tokens
    # (0: every passage whole). recall.NARROW_TOKENS says why.
    recall_narrow: int = NARROW_TOKENS
    # The best passage keeps its context, at most this many tokens around its best line (0: whole).
    recall_best: int = 0
    # Passages after the best are recalled only when their BM25 score is at least this share of the
    # best's (0: fill the budget). recall.MIN_SHARE says why.
    recall_share: float = MIN_SHARE
    recall_order: str = "document"  # the order passages are re-read in (recall.ORDERS says why)
    conversation_tokens: int = 768  # tail budget for earlier turns of a running conversation
    question_tokens: int = 512  # longest question accepted
    # transformers' RepetitionPenaltyLogitsProcessor over the answer so far (1: off), once the answer has
    # `repetition_penalty_from` tokens. The first words of an answer must be free to write again what
    # they just wrote ("The two sons of Eli who were priests ... were"): a penalty of 1.1 from the first
    # token scales a used token's logit by 1/1.1, and the oracle answered 25/69 book questions against
    # 29/69 without it (7 won, 3 lost; docs/eval.md). A long answer needs it: without any, SmolLM2's
    # 256-token answers collapsed into "chapter chapter chapter ..." (the no-repeat n-grams alone let
    # such near-repeats through).
    repetition_penalty: float = 1.1
    repetition_penalty_from: int = 48
    summary_repetition_penalty: float = 1.1  # the same over a summary (section, final or cache summary)
    no_repeat_ngram: int = 4  # and NoRepeatNGramLogitsProcessor: no 4-gram twice in one answer
    # Whether the cascade memory stays in view when passages were recalled. Off by default: measured on
    # the book set, SmolLM2 answered 1/12 with the memory in view and 6/12 (the oracle's score) without.
    memory_in_answer: bool = False
    recent_in_answer: int = 0  # with the memory hidden, keep this many most recent slots in view
    # Names and numbers an answer may write: "source" (those of the recalled passages and the question,
    # else the document's; engine.grounding) or "free". Measured (docs/eval.md): with only the answer's
    # passages in view 19 / 71 right vs 14 / 71 (6 won, 1 lost); through the engine on 17 Exodus
    # questions 8 vs 8 (9 answers worded differently, fewer invented chapter numbers and places).
    names: str = "source"
    # A summary may not copy this many tokens in a row from the passages it summarizes (engine.copying;
    # 0: no limit). Answers may quote.
    summary_copy_tokens: int = COPY_TOKENS

    def __post_init__(self):
        for name in ("recall_tokens", "recall_narrow", "recall_best", "conversation_tokens", "question_tokens",
                     "repetition_penalty_from"):
            if getattr(self, name) < 0 or (name == "question_tokens" and self.question_tokens < 1):
                raise UserError(f"{name.replace('_', '-')} must be >= {1 if name == 'question_tokens' else 0}, "
                                f"not {getattr(self, name)}")
        if self.recall_order not in ORDERS:
            raise UserError(f"recall-order must be one of {', '.join(ORDERS)}, not {self.recall_order!r}")
        if not 0.0 <= self.recall_share <= 1.0:
            raise UserError(f"recall-share must be between 0 and 1, not {self.recall_share}")
        for name in ("repetition_penalty", "summary_repetition_penalty"):
            if getattr(self, name) < 1.0:
                raise UserError(f"{name.replace('_', ' ')} must be >= 1, not {getattr(self, name)}")
        if self.summary_copy_tokens < 0 or self.summary_copy_tokens == 1:
            raise UserError(f"summary copy limit must be 0 (none) or >= 2 tokens, not {self.summary_copy_tokens}")
        if self.no_repeat_ngram < 0:
            raise UserError(f"no-repeat n-gram size must be >= 0, not {self.no_repeat_ngram}")
        if self.names not in ("source", "free"):
            raise UserError(f"names must be 'source' or 'free', not '{self.names}'")

    def tail_slots(self, max_new_tokens: int) -> int:
        return self.recall_tokens + self.conversation_tokens + self.question_tokens + 96 + max_new_tokens


_WARM: "weakref.WeakKeyDictionary[torch.nn.Module, set[int]]" = weakref.WeakKeyDictionary()  # chunk lengths run
# A cache-mode summary's parts, each from the central passages of its third of the document
SUMMARY_PARTS = ("beginning", "middle", "end")
ANSWER_TOKENS = 256  # the answer length the answer memory is first sized for (longer ones resize it)
# What a snapshot saved before these cache options existed was read with (whatever today's defaults)
BEFORE_OPTIONS = {"block": 1, "cascade_sizes": "equal", "contest": "head", "block_score": "max"}
BASELINE_QUESTION = "What is this document about?"  # the attention of a question with no particular target


def check_request(question: str | None, max_new_tokens: int, temperature: float = 0.0,
                  top_p: float = 0.95) -> str | None:
    """The checks that need no model (the CLI runs them before loading one); the question, stripped."""
    if question is not None:
        question = question.strip()
        if not question:
            raise UserError("the question is empty")
    if max_new_tokens < 1:
        raise UserError(f"max-new-tokens must be >= 1, not {max_new_tokens}")
    if not temperature >= 0:  # also refuses NaN
        raise UserError(f"temperature must be >= 0, not {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"top-p must be in (0, 1], not {top_p}")
    return question


class ReadingSession:
    def __init__(self, loaded: LoadedModel, config: CacheConfig, stride: int | str = "auto",
                 prompt: str | None = None, answering: AnswerSettings | None = None):
        self.requested = config  # may say cascades="auto"; resolved for each document
        self.requested_stride = stride  # may say "auto": the device's stride (engine.runtime.auto_stride)
        self.config = config.resolve(0) if config.cascades == "auto" else config
        self.engine = Engine(loaded, self.config, stride)
        self.loaded, self.stride = loaded, self.engine.stride
        self.answering = answering or AnswerSettings()
        self.format: PromptFormat = prompt_format(loaded.tokenizer, prompt or loaded.prompt_format, loaded.bos)
        self.document: documents.Document | None = None
        self.source_map: documents.SourceMap | None = None
        self.index: recall.PassageIndex | None = None
        self.index_note = ""  # why there is no index (an older snapshot), when there is none
        self.doc_cache: KVCache | None = None  # state right after reading: every answer starts here
        self.turns: list[tuple[str, str]] = []  # (question, answer) of the running conversation
        self.prefix_tokens = 0
        self.read_result: ReadResult | None = None
        self.answers: list[Answer] = []
        self.loaded_seconds: float | None = None  # set when the document came from a snapshot
        self._baseline: np.ndarray | None = None  # per-slot attention of BASELINE_QUESTION
        self._document_names: SourceNames | None = None  # built at the first answer that needs it
        self._answer_memory: KVCache | None = None  # the frozen memory + tail of the last question

    # ---------------------------------------------------------------- reading
    def _ids(self, text: str) -> list[int]:
        return self.loaded.tokenizer(text, add_special_tokens=False).input_ids

    def configure_for(self, total_tokens: int) -> CacheConfig:
        """Resolve cascades="auto" for a stream of total_tokens (prefix included)."""
        return self._use_config(self.requested.resolve(total_tokens))

    def _use_config(self, config: CacheConfig) -> CacheConfig:
        if config != self.config:  # the engine's rope tables and attention hook are per config
            self.config, self.engine = config, Engine(self.loaded, config, self.stride)
        return config

    def read(self, document: documents.Document, progress: Callable[[ReadProgress], None] | None = None,
             should_stop: Callable[[], bool] | None = None,
             on_chunk: Callable[["ReadingSession", KVCache], None] | None = None,
             total_tokens: int | None = None, focus: str | None = None) -> ReadResult:
        """Stream the document (after the prompt prefix) through a fresh cache, then index its passages."""
        tok = self.loaded.tokenizer
        source_map = documents.SourceMap(document)
        prefix_ids = self._ids(self.format.prefix)
        pieces = documents.tokenize_stream(document, tok, source_map=source_map)
        total = (total_tokens or documents.count_tokens(document, tok)) + len(prefix_ids)
        self._check_full_positions(total, "the document")
        self.configure_for(total)
        cache = self.engine.new_cache()

        def stream():
            yield prefix_ids
            yield from pieces

        chunk_hook = (lambda c: on_chunk(self, c)) if on_chunk else None
        proc = psutil.Process()
        peak = proc.memory_info().rss

        def sampled(p: ReadProgress) -> None:
            nonlocal peak
            peak = max(peak, proc.memory_info().rss)
            if progress is not None:
                progress(p)

        # focus: a question known before reading; its rows join every chunk's scores (Engine.forward)
        focus_ids = self._ids(self.format.question_text(focus)) if focus else None
        pipelined = self.engine.pipelined(cache, focus=focus_ids)
        done = self.engine.read(stream(), cache, total=total, progress=sampled, should_stop=should_stop,
                                on_chunk=chunk_hook, focus=focus_ids)
        doc_tokens = done.tokens_read - len(prefix_ids)
        if doc_tokens <= 0:
            raise UserError(f"{document.title}: no text to read")
        self._set_document(document, source_map, cache, len(prefix_ids),
                           ReadResult(doc_tokens, len(prefix_ids), done.seconds, done.tokens_per_second,
                                      round(peak / 2 ** 20, 1), pipelined),
                           recall.PassageIndex.build(document, source_map.offsets))
        return self.read_result

    def _check_full_positions(self, tokens: int, what: str) -> None:
        """Full attention places token i at position i: past the model's trained positions it answers
        gibberish, so such a read or answer is refused (the cascade and sink caches never get there)."""
        if self.config.policy == "full" and not self.loaded.fits_positions(tokens):
            raise UserError(f"full attention over {what} needs {tokens:,} positions, past the "
                            f"{self.loaded.max_positions:,} that {self.loaded.model_id} was trained on; "
                            "use --policy cascade or sink")

    def _set_document(self, document, source_map, cache, prefix_tokens, result,
                      index: recall.PassageIndex | None, index_note: str = "") -> None:
        self.document, self.source_map, self.doc_cache = document, source_map, cache
        self.prefix_tokens, self.read_result = prefix_tokens, result
        self.index, self.index_note = index, index_note
        self.turns, self._baseline, self.loaded_seconds = [], None, None
        self._document_names: SourceNames | None = None
        # The answer memory is part of the fixed budget: allocate it now, not at the first question,
        # so memory after reading is memory while answering.
        self._answer_memory = freeze(cache, self.answering.tail_slots(ANSWER_TOKENS), self._answer_memory)
        self._warm_prompt_shapes()

    def _warm_prompt_shapes(self) -> None:
        """Run each prompt-chunk length once (`runtime.tail_chunks`: powers of two), once per process.

        oneDNN keeps state for each new bfloat16 matrix shape it meets; met first by questions, they
        grew RSS over the first answers (~50 MB, measured) and slowed their first token. Met here,
        right after the first read, memory after reading is memory while answering. ~0.5 s, once.
        Packed bfloat16 layers on the CPU pad their products to multiples of `packed.ROW_STEP` rows, so
        there the prompt lengths to meet are those multiples (and 1, a decoded token). Kept where prompts
        go in one forward too (`Engine.shape_state` False): on a GPU these lengths' power-of-two buckets
        are the Triton kernels' autotune keys, tuned here instead of at the first question.
        """
        if self.engine.packed_rows:
            lengths = [1] + list(range(packed.ROW_STEP, self.stride, packed.ROW_STEP)) + [self.stride]
        else:
            lengths = [1 << i for i in range(self.stride.bit_length()) if 1 << i < self.stride] + [self.stride]
        todo = [n for n in lengths if n not in _WARM.setdefault(self.loaded.model, set())]
        memory = memory_of(self._answer_memory)
        for n in todo:
            if n > memory.capacity:
                continue
            self.engine.forward(torch.zeros(1, n, dtype=torch.long), self._answer_memory, logits="last")
            memory.truncate(0)
            _WARM[self.loaded.model].add(n)

    def reset_conversation(self) -> None:
        self.turns = []

    # ---------------------------------------------------------------- answering
    def _require_read(self) -> None:
        if self.doc_cache is None:
            raise UserError("no document has been read yet")

    def check_question(self, question: str, max_new_tokens: int = 256, temperature: float = 0.0,
                       top_p: float = 0.95) -> str:
        """The question, stripped; refuses an empty or over-long one and sampling settings out of range."""
        question = check_request(question, max_new_tokens, temperature, top_p)
        n = len(self._ids(question))
        if n > self.answering.question_tokens:
            raise UserError(f"the question is {n} tokens long; the limit is {self.answering.question_tokens}")
        return question

    def ask(self, question: str, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 0.95,
            continue_conversation: bool = False, should_stop: Callable[[], bool] | None = None,
            seed: int | None = 0, n_citations: int = 3, recall_on: bool | None = None,
            passages: list[recall.Recalled] | None = None, keep_memory: bool | None = None,
            names: SourceNames | None = None, written: list[int] | None = None,
            summary: bool = False) -> Iterator[str]:
        """Yield the answer as text deltas; the finished `Answer` is then `self.answers[-1]`.

        `passages`: re-read these instead of the ones recall would choose for the question (summaries);
        `keep_memory`: keep the cascade memory in view beside recalled passages (default: the setting);
        `names`: the names and numbers the answer may write (a summary part: its part of the document's);
        default: the recalled passages' and the question's (`_answer_names`);
        `written`: token ids already written (a summary's earlier parts): no n-gram of theirs is repeated.
        `summary`: a summary re-reads its passages without a transcript's cue times (each passage's label
        keeps its first cue's time), and may not copy `summary_copy_tokens` tokens in a row of their text
        (as stored, cue times included; guarding the cue-less text as re-read measured worse, docs/eval.md).

        The document memory stays frozen: recalled passages, earlier turns (when continuing), the
        question and the answer go into a tail after it (`engine.memory`).
        """
        self._require_read()
        question = self.check_question(question, max_new_tokens, temperature, top_p)
        start = time.perf_counter()
        settings = self.answering
        check_positions(self.loaded.model.config, self.config, settings.tail_slots(max_new_tokens), "answer tail")
        # one answer memory per session, refilled for each question: answering allocates nothing new
        cache = freeze(self.doc_cache, settings.tail_slots(max_new_tokens), self._answer_memory)
        self._answer_memory = cache
        answer = Answer(question)
        self.answers.append(answer)
        turns = self._kept_turns(answer) if continue_conversation else []
        use_recall = settings.recall if recall_on is None else recall_on
        recalled: list[recall.Recalled] = []
        if passages is not None:
            recalled = passages
            answer.recalled = [r.to_dict() for r in recalled]
        elif not use_recall:
            answer.recall_note = "recall is off"
        elif self.index is None:
            answer.recall_note = self.index_note or "no passage index"
        else:
            recalled = self.locate(question, cache)
            answer.recalled = [r.to_dict() for r in recalled]
            if not recalled:
                answer.recall_note = "no passage was recalled: no part of the document matches the question"
        ids, tail_doc = self._tail(question, turns, recalled, cue_times=not summary)
        self._check_full_positions(self.doc_cache.n_valid + len(ids) + max_new_tokens,
                                   "the document, question and answer")
        cache_memory = memory_of(cache)
        if recalled and not (settings.memory_in_answer if keep_memory is None else keep_memory):
            cache_memory.hide_document(self.config.sinks, settings.recent_in_answer)
        yield from self._generate(cache, ids, answer, max_new_tokens, temperature, top_p, should_stop, seed,
                                  n_citations, tail_doc=tail_doc, start=start,
                                  names=names if names is not None else self._answer_names(question, recalled), written=written,
                                  no_copy=self._ids("\n".join(r.text for r in recalled))
                                  if summary and recalled and settings.summary_copy_tokens else None, summary=summary)
        if continue_conversation:
            self.turns = turns + [(question, answer.text)]

    def _answer_names(self, question: str, recalled: list[recall.Recalled]) -> SourceNames | None:
        """The names an answer may write (AnswerSettings.names): the recalled passages' and the
        question's, or the whole document's when nothing was recalled."""
        if self.answering.names == "free":
            return None
        if recalled:
            return self.source_names("\n".join([self.document.title, question] + [r.text for r in recalled]))
        return self.document_names()

    def _summary_names(self, part: str = "") -> SourceNames | None:
        """The names a summary may write: those of its `part` of the document, else the whole document's
        (None when AnswerSettings.names is "free")."""
        if self.answering.names == "free":
            return None
        return self.source_names(f"{self.document.title}\n{part}") if part else self.document_names()

    def source_names(self, source: str) -> SourceNames:
        """The names and numbers of `source`, plus the prompt format's own turn words: a base model ends
        its answer by writing "Question:", which no source needs to contain."""
        return SourceNames(source, self.loaded.tokenizer).allow(self.format.question.replace("{q}", " "))

    def document_names(self) -> SourceNames:
        """The document's names and numbers, built once per document (the whole KJV: 0.9 s, 4.9 MB held)."""
        if self._document_names is None:
            self._document_names = self.source_names(self.document.title + "\n" + self.source_map.text)
        return self._document_names

    def _kept_turns(self, answer: Answer) -> list[tuple[str, str]]:
        """The latest turns that fit the conversation budget; the oldest leave first."""
        kept, used = [], 0
        for q, a in reversed(self.turns):
            n = len(self._ids(self._turn_text(q, a)))
            if used + n > self.answering.conversation_tokens:
                break
            kept.insert(0, (q, a))
            used += n
        answer.dropped_turns = len(self.turns) - len(kept)
        return kept

    @staticmethod
    def _turn_text(q: str, a: str) -> str:
        return f"Earlier question: {q}\nEarlier answer: {a}\n\n"

    def _tail(self, question: str, turns, recalled, cue_times: bool = True) -> tuple[list[int], np.ndarray]:
        """Token ids read after the document, and the document token each stands for (-1: none).
        cue_times=False: the recalled passages without a transcript's cue times (`recall.without_cue_times`)."""
        ids: list[int] = []
        doc: list[np.ndarray] = []

        def add(piece: list[int], doc_tokens: np.ndarray | None = None):
            ids.extend(piece)
            doc.append(np.full(len(piece), -1, dtype=np.int64) if doc_tokens is None else doc_tokens)

        add(self._ids(DOC_OUTRO + "".join(self._turn_text(q, a) for q, a in turns)))
        if recalled:
            if self.format.recall_intro:
                add(self._ids(self.format.recall_intro))
            offsets = self.source_map.offsets
            for r in recalled:
                add(self._ids(f"[{r.passage.label}]\n"))
                text, kept = (r.text, None) if cue_times else recall.without_cue_times(r.text)
                enc = self.loaded.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                chars = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)[:, 0]
                chars = r.passage.char_start + (chars if kept is None else kept[np.minimum(chars, len(kept) - 1)])
                add(list(enc["input_ids"]), np.searchsorted(offsets, chars, side="right") - 1)
                add(self._ids("\n\n"))
        add(self._ids(self.format.question.format(q=(self.format.recall_ask if recalled else "") + question)))
        return ids, np.concatenate(doc) if doc else np.zeros(0, dtype=np.int64)

    def _probe(self, cache: KVCache, text: str) -> np.ndarray:
        """Attention that `text`, read after the document, gives each document slot of each layer and
        KV head; the tail is rolled back afterwards. # [layers, kv_heads, n_doc]"""
        memory = memory_of(cache)
        sliding = cache.sliding.clone() if isinstance(cache, HybridCache) else None
        memory.scored = True
        memory.reset_scores()
        self.engine.prefill(self._ids(text), cache, logits="none")
        score, _ = memory.slot_scores()  # [layers, kv_heads, slots]
        per_slot = score[..., : memory.n_doc]
        memory.truncate(0)
        memory.reset_scores()
        if sliding is not None:
            cache.sliding = sliding
        return per_slot.cpu().numpy()

    def passage_attention(self, question: str, cache: KVCache) -> dict[int, float] | None:
        """Per passage, the attention the question gives its retained slots beyond what a question with
        no target gives them (the "lift"), as shares summing to 1; None with no document slots."""
        memory = memory_of(cache)
        if not memory.n_doc:
            return None
        if self._baseline is None:
            self._baseline = self._probe(cache, self.format.question_text(BASELINE_QUESTION))
        asked = self._probe(cache, self.format.question_text(question))
        lift = np.maximum(asked - self._baseline, 0.0)  # [layers, kv_heads, n_doc]
        # each layer and head keeps its own tokens, so a slot's lift goes to the token it holds there
        pos = memory.slot_scores()[1][..., : memory.n_doc].cpu().numpy()  # [layers, kv_heads, n_doc]
        in_doc = pos >= max(self.config.sinks, self.prefix_tokens)  # sinks draw attention whatever is asked
        return recall.attention_by_passage(self.index, (pos - self.prefix_tokens)[in_doc], lift[in_doc])

    def locate(self, question: str, cache: KVCache, signals: str = "both") -> list[recall.Recalled]:
        """Rank passages for the question (BM25 and/or the question's attention, fused) within the budget.

        With both signals, the attention probes (two short forwards) run only when BM25 finds nothing:
        otherwise recall takes BM25's passages, and at its fusion weight attention could reorder only
        ranks far beyond any budget (`recall.FUSION`), so the probes would change nothing.
        """
        wanted = signals == "attention" or (signals == "both" and not self.index.bm25(question, 1))
        attention = self.passage_attention(question, cache) if wanted else None
        return recall.rank(self.index, question, attention, self.answering.recall_tokens,
                           tokens_of=self.recall_cost, use_bm25=signals in ("both", "bm25"),
                           offsets=self.source_map.offsets, narrow_tokens=self.answering.recall_narrow,
                           best_tokens=self.answering.recall_best, min_share=self.answering.recall_share,
                           order=self.answering.recall_order)

    @staticmethod
    def recall_cost(p: recall.Passage) -> int:
        return p.tokens + 10  # its text and its "[label]" line

    def _generate(self, cache, prompt_ids, answer: Answer, max_new_tokens, temperature, top_p, should_stop,
                  seed, n_citations, tail_doc: np.ndarray | None = None, start: float | None = None,
                  names: SourceNames | None = None, written: list[int] | None = None,
                  no_copy: list[int] | None = None, summary: bool = False) -> Iterator[str]:
        """names: the only names and numbers the answer may write (`engine.grounding`); no_copy: source
        token ids whose long runs it may not copy (`engine.copying`); summary: a summary's repetition
        penalty instead of an answer's."""
        tok = self.loaded.tokenizer
        stops = {i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"),
                             tok.convert_tokens_to_ids("<end_of_turn>"))
                 if isinstance(i, int) and i >= 0 and i != tok.unk_token_id}
        memory = memory_of(cache)
        memory = memory if isinstance(memory, FrozenMemory) else None
        counted = n_citations > 0  # citations count the answer's attention only, never the prompt's

        def start_counting() -> None:
            memory.scored = counted
            memory.reset_scores()

        if memory is not None:
            # The prompt (recalled passages, question) is read without score sums: they would be reset
            # after it anyway, and without them its attention takes the fast path (`chunk_attention`'s
            # weights=None): the first token comes sooner. Summaries (no citations) never count.
            memory.scored = False
        start = start or time.perf_counter()
        ids, shown = [], ""
        for token in self.engine.generate(cache, prompt_ids, max_new_tokens, temperature, top_p, stops,
                                          should_stop, seed, logits_processor=self._processor(names, written, no_copy, summary),
                                          after_prompt=start_counting if memory else None):
            if not ids:
                answer.first_token_seconds = time.perf_counter() - start
            ids.append(token)
            text, turn_end = visible_text(tok.decode(ids, skip_special_tokens=True), self.format.name == "plain")
            if text.endswith("\ufffd") and not turn_end:  # half of a multi-byte character: wait for the rest
                continue
            delta, shown = text[len(shown):], text
            answer.text, answer.tokens = shown, len(ids)
            if delta:
                yield delta
            if turn_end:
                break
        else:
            answer.cut = len(ids) >= max_new_tokens
            rest = tok.decode(ids, skip_special_tokens=True)[len(shown):]  # what was held back at the end
            if rest.replace("\ufffd", ""):
                shown += rest
                yield rest.replace("\ufffd", "")
        answer.text = shown.replace("\ufffd", "").strip()
        answer.tokens, answer.seconds = len(ids), time.perf_counter() - start
        answer.stopped = bool(should_stop and should_stop())
        if memory is not None and counted:
            answer.citations = self._citations(memory, n_citations, tail_doc)

    def _processor(self, names: SourceNames | None = None, written: list[int] | None = None,
                   no_copy: list[int] | None = None, summary: bool = False):
        """Repetition control over the answer so far (transformers' logits processors), and with
        `names` only the names and numbers of its source (`engine.grounding`). `written` ids precede
        the answer for the no-repeat n-grams only: a summary's parts do not repeat each other's phrases
        ("The document summarizes the ..." opened all three parts of a summary, counted as a loop),
        while the repetition penalty stays per part so that each part may name the book's people."""
        from transformers import (LogitsProcessorList, NoRepeatNGramLogitsProcessor,
                                  RepetitionPenaltyLogitsProcessor)

        a = self.answering
        procs = LogitsProcessorList()
        penalty = a.summary_repetition_penalty if summary else a.repetition_penalty
        if penalty > 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(penalty))
        ngrams = NoRepeatNGramLogitsProcessor(a.no_repeat_ngram) if a.no_repeat_ngram > 0 else None
        before = list(written or [])
        guard = CopyGuard(no_copy, a.summary_copy_tokens) if no_copy and a.summary_copy_tokens else None
        if not procs and ngrams is None and names is None and guard is None:
            return None

        lower = lower_case_ids(self.loaded.tokenizer) if ngrams is not None else None
        piece = functools.lru_cache(maxsize=None)(lambda i: self.loaded.tokenizer.decode([i]))  # decoded, not raw:
        # a byte-level "Ġ" (a space) is a letter to str.isalnum

        free = 0 if summary else a.repetition_penalty_from  # a summary's penalty holds from its first token

        def process(ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            if ids and len(ids) >= free and procs:
                logits = procs(torch.tensor([ids], dtype=torch.long), logits[None])[0]
            if ngrams is not None and (ids or before):
                # n-grams compared without case: "the LORD is the one" came back as "THE LORD IS THE ONE"
                # and "the Lord is the One" in a section summary that the 4-gram rule let loop
                seen = lower[torch.tensor(before + ids, dtype=torch.long)][None]
                banned = ngrams(seen, torch.zeros(1, len(lower))).isinf()[0]  # [vocab] in lower-case ids
                mask = torch.zeros(logits.shape[-1], dtype=torch.bool)
                n = min(len(mask), len(lower))
                mask[:n] = banned[lower[:n]]
                if ids and piece(ids[-1])[-1:].isalnum():
                    # a word may be finished however often it was written: "Elimelech" is 4 pieces, and a name
                    # could otherwise be written once per summary, then only cut ("Elimelec") or bent ("Elimelechs").
                    # A piece that goes on with the word (a letter or digit first) is not banned; a repeated
                    # phrase still is, at its words' first pieces. (A handful of ids are banned at a step.)
                    for i in mask.nonzero().flatten().tolist():
                        mask[i] = not piece(i)[:1].isalnum()
                logits = logits.masked_fill(mask.to(logits.device), float("-inf"))
            if guard is not None and (copied := guard.banned(ids)):
                logits = logits.index_fill(0, torch.tensor(sorted(copied)), float("-inf"))
            return names(ids, logits) if names is not None else logits
        return process

    def _citations(self, memory: FrozenMemory, k: int, tail_doc: np.ndarray | None) -> list[Citation]:
        """Passages that the answer attended to most, in recalled passages and in the cache's slots.

        Scores are the per-slot sums the frozen memory kept during the answer (fixed size).
        """
        score, pos = memory.slot_scores()  # [layers, kv_heads, slots]
        # a few MB moved to the host (scores and positions only, never keys or values)
        w = score.reshape(-1).cpu().numpy()  # several layers and heads may hold one token: their weights add up
        p = pos.reshape(-1).cpu().numpy()
        doc_tokens = self.read_result.doc_tokens
        doc = np.full_like(p, -1)
        in_doc = (p >= max(self.config.sinks, self.prefix_tokens)) & (p < memory.doc_seen)
        doc[in_doc] = p[in_doc] - self.prefix_tokens
        recalled = np.zeros(len(p), dtype=bool)
        if tail_doc is not None and len(tail_doc):
            t = p - memory.doc_seen
            in_tail = (t >= 0) & (t < len(tail_doc))
            doc[in_tail] = tail_doc[t[in_tail]]
            recalled = in_tail & (doc >= 0)
        keep = (doc >= 0) & (doc < doc_tokens)
        if not keep.any():
            return []
        if self.index is not None:  # one citation per passage
            unit = self.index.passage_of_token(doc[keep])
        else:
            unit = self.source_map.segment_of_chars(self.source_map.offsets[doc[keep]])
        weights, tokens, from_tail = w[keep], doc[keep], recalled[keep]
        ok = unit >= 0
        total = np.bincount(unit[ok], weights=weights[ok])
        norm = float(total.sum()) or 1.0
        picked = []
        for u in np.argsort(-total)[:k]:
            if total[u] <= 0:
                break
            mine = ok & (unit == u)
            best = int(tokens[mine][np.argmax(weights[mine])])
            loc = self.source_map.locate(best)
            label = self.index.passages[u].label if self.index is not None else loc.get("label", "")
            picked.append(Citation(best, float(total[u]) / norm, label, self.source_map.excerpt(best), loc,
                                   "recalled" if from_tail[mine].any() else "memory",
                                   int(u) if self.index is not None else None))
        return picked

    # ---------------------------------------------------------------- summaries
    def summarize(self, max_new_tokens: int = 300, should_stop=None, temperature: float = 0.0,
                  on_part: Callable[[int, int, str, int, int], None] | None = None) -> Iterator[str]:
        """Whole-document summary from the cache after reading (the paper's setting), as text deltas;
        the finished `Answer` is then `self.answers[-1]`.

        With recall on, the summary is written in parts, the book's beginning, middle and end
        (`SUMMARY_PARTS`), each re-reading the central passages of its own third (`recall.central`)
        within the recall and conversation budgets, from the same frozen memory, so memory stays
        flat. Without them the cache alone holds mostly the book's end, and a summary of a long book
        covered only its last chapters (issue 14); one summary from passages spread over the whole
        book still left out a third of Ruth and of Jonah (docs/eval.md). A part sees its passages and
        the sinks, not the cascade memory, which holds mostly the book's end and drew the beginning's
        part to it (measured, docs/eval.md); a one-part summary keeps the memory in view beside its
        passages (measured: the passages alone gave vaguer summaries that named fewer people).
        on_part(k, parts, name, start_char, end_char) is called as each part starts (progress)."""
        self._require_read()
        settings = self.answering
        passages = self.index.passages if settings.recall and self.index is not None else []
        budget = settings.recall_tokens + settings.conversation_tokens  # a summary has no conversation
        parts = SUMMARY_PARTS if len(passages) >= len(SUMMARY_PARTS) else ()
        if not parts:  # recall off, or a document of fewer passages than parts: one summary
            recalled = recall.central(self.index, self.source_map.text, budget, self.recall_cost) if passages else None
            if on_part:
                on_part(0, 1, "whole", 0, len(self.source_map.text))
            yield from self.ask(SUMMARY_QUESTION, max_new_tokens=max_new_tokens, temperature=temperature,
                                should_stop=should_stop, recall_on=recalled is not None, passages=recalled,
                                keep_memory=True, names=self._summary_names(), summary=True)
            return
        whole, start, end = Answer(SUMMARY_QUESTION), time.perf_counter(), passages[-1].token_end
        texts, written = [], []  # the parts' text and token ids so far
        for k, part_name in enumerate(parts):
            span = (end * k // len(parts), end * (k + 1) // len(parts))
            recalled = recall.central(self.index, self.source_map.text, budget, self.recall_cost, span=span)
            inside, part_text = recall.in_span(passages, self.source_map.text, span)
            if on_part:
                on_part(k, len(parts), part_name, *((inside[0].char_start, inside[-1].char_end) if inside else (0, 0)))
            gap = " " if whole.text else ""
            # The part's request names the names of its passages that are most its own third's
            # (grounding.part_names), and it may write only names its third has: the beginning's
            # part had named the book's last people (docs/eval.md, issue 14).
            names = part_names("\n".join(r.text for r in recalled), part_text,
                               self.source_map.text) if recalled else []
            asked = SUMMARY_PART_QUESTION if self.document.transcript else SUMMARY_PART_STORY_QUESTION
            question, _ = with_names(asked.format(part=part_name), "",
                                     f"the {part_name} of the document", names)
            grounded = self._summary_names(part_text)
            for delta in self.ask(question,
                                  max_new_tokens=max(32, max_new_tokens // len(parts)), temperature=temperature,
                                  should_stop=should_stop, recall_on=bool(recalled), passages=recalled or None,
                                  keep_memory=not recalled, names=grounded, written=written, summary=True):
                delta = (gap + delta.lstrip()) if gap and delta else delta
                gap = "" if delta else gap
                if delta and whole.first_token_seconds is None:
                    whole.first_token_seconds = time.perf_counter() - start
                yield delta
            part = self.answers.pop()
            # the shown stream had these; the summary does not: an unfinished last sentence, the request said back
            part.text = without_echo(whole_sentences(part.text) if part.cut else part.text, question)
            texts.append(part.text)
            written += self.loaded.tokenizer(part.text, add_special_tokens=False).input_ids  # as a part opens
            whole.text = " ".join(t for t in texts if t)  # the parts' finished texts, not the stream
            whole.tokens += part.tokens
            whole.cut = whole.cut or part.cut
            whole.citations += part.citations
            whole.recalled += part.recalled
            if part.stopped:
                whole.stopped = True
                break
        whole.seconds = time.perf_counter() - start
        self.answers.append(whole)

    # ---------------------------------------------------------------- retention view
    def retention(self, layer: int | None = None) -> dict:
        """Which document tokens the cache holds, per layer and KV head (positions in document tokens)."""
        self._require_read()
        return retention_of(self.doc_cache, self.prefix_tokens, layer)

    def budget(self) -> dict:
        cache = self.doc_cache or self.engine.new_cache()
        return {"policy": self.config.policy, "slots": self.config.slots, "cache_mb": cache.nbytes() / 2 ** 20,
                "span": self.config.span, "cascades": self.config.cascades,
                "tail_slots": self.answering.tail_slots(256),
                "index_mb": self.index.nbytes_on_disk() / 2 ** 20 if self.index else 0.0}

    def device_report(self) -> dict:
        """Where the model runs and the peak memory per device so far (CPU: RSS; CUDA: allocated)."""
        device = self.engine.device
        return {"device": str(device), "dtype": str(self.engine.dtype).removeprefix("torch."),
                "peak_memory_mb": peak_memory_mb(device)}

    # ---------------------------------------------------------------- snapshots
    def manifest(self) -> dict:
        self._require_read()
        d = self.document
        return {
            "model_id": self.loaded.model_id, "config": self.config.to_dict(),
            "stride": self.stride, "prompt": self.format.name, "prefix_tokens": self.prefix_tokens,
            "read": asdict(self.read_result), "index": self.index is not None,
            "document": {"path": d.path, "kind": d.kind, "title": d.title, "sha256": d.sha256,
                         "segments": [{"text": s.text, "label": s.label, "meta": s.meta} for s in d.segments]},
        }

    def save(self, path: str | Path, label: str | None = None) -> Path:
        """Save the read document as a snapshot (`engine.snapshots`: atomic, checksummed); `label` is
        the name a person gave it (kept in the manifest, so covered by its checksum)."""
        tensors = {f"cache.{k}": v for k, v in self.doc_cache.state().items()}
        tensors.update({f"map.{k}": torch.from_numpy(np.ascontiguousarray(v))
                        for k, v in self.source_map.to_arrays().items()})
        manifest = self.manifest() if label is None else {**self.manifest(), "label": label}
        return snapshots.write(path, tensors, manifest, self.index)

    def load(self, path: str | Path) -> None:
        """Load a snapshot saved by `save`; refuses a damaged one, or one made with another model or
        other settings, in one line."""
        start = time.perf_counter()
        man, tensors, index_path = snapshots.read(path)
        man_path = snapshots.files(snapshots.base_of(path))[0]
        if man["model_id"] != self.loaded.model_id:
            raise UserError(f"{man_path}: made with model {man['model_id']}, not {self.loaded.model_id}")
        wanted = self.requested.to_dict()
        if wanted["cascades"] == "auto":  # any resolved C fits "auto"
            wanted["cascades"] = man["config"].get("cascades")
        # options added since a snapshot was saved had the values of the paper's rule when it was read
        saved = {**CacheConfig().to_dict(), **BEFORE_OPTIONS, **man["config"]}
        # any stride fits "auto": a snapshot read on a GPU (4,096) loads on a CPU (512) and back
        stride_fits = self.requested_stride == "auto" or man["stride"] == self.stride
        if saved != wanted or not stride_fits or man["prompt"] != self.format.name:
            raise UserError(f"{man_path}: made with other cache settings ({man['config']}, stride {man['stride']}, "
                            f"prompt {man['prompt']}); use the same settings to load it")
        if man["stride"] != self.stride:  # only under "auto"; checked before anything changes
            self.stride, self.engine = man["stride"], Engine(self.loaded, self.config, man["stride"])
        doc = man["document"]
        document = documents.Document(path=doc["path"], kind=doc["kind"], title=doc["title"], sha256=doc["sha256"],
                                      segments=[documents.Segment(s["text"], s["label"], s["meta"]) for s in doc["segments"]])
        self._use_config(CacheConfig(**{**BEFORE_OPTIONS, **man["config"]}))
        cache = self.engine.new_cache()
        cache.load_state({k[len("cache."):]: v.to(self.engine.device) for k, v in tensors.items()
                          if k.startswith("cache.")})
        source_map = documents.SourceMap.from_arrays(
            document, {k[len("map."):]: v.numpy() for k, v in tensors.items() if k.startswith("map.")})
        result = ReadResult(**man["read"])
        index, note = None, ""
        if index_path is not None:
            index = recall.PassageIndex.open(index_path, document, result.doc_tokens)
        else:
            note = "recall is off: this snapshot was saved without a passage index" + (
                " (an older format)" if man.get("version") == 1 else "")
        self._set_document(document, source_map, cache, man["prefix_tokens"], result, index, note)
        self.loaded_seconds = time.perf_counter() - start  # the read itself happened when it was saved


# A base model (plain format) ends its answer by starting the prompt's scaffold again with a new question.
TURN_ENDS = ("\nQuestion:",)
# Any answer ends where a line opens a markup tag: Gemma's section summaries went on "\n\n<document>\nChapter
# 2 ..." and copied verses; SmolLM2's went on "\n<document>", "\n<summary>" or "\n<script>" and web-page
# code, in 8 of 30 section-mode texts (docs/eval.md). A document reader's answer has no use for markup.
MARKUP_LINE = re.compile(r"\n[ \t]*<(?:[^\W\d_]|[/!])")  # "<" then a letter, "/" or "!"
MAYBE_MARKUP = re.compile(r"\n[ \t]*<?$")  # what may still become a markup line: held back


@functools.lru_cache(maxsize=4)
def lower_case_ids(tokenizer) -> torch.Tensor:
    """Each token's id in lower case: the id of the same piece with its ASCII capitals lowered where the
    vocabulary has it, else its own (" LORD" -> " lord"; byte-level markers such as "Ġ" stay). # [vocab]"""
    vocab = tokenizer.get_vocab()
    out = torch.arange(max(len(tokenizer), max(vocab.values()) + 1), dtype=torch.long)
    for piece, i in vocab.items():
        low = piece.translate(_ASCII_LOWER)
        if low != piece and low in vocab:
            out[i] = vocab[low]
    return out


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def visible_text(text: str, plain: bool) -> tuple[str, bool]:
    """(the part of a growing answer that may be shown, whether the answer ended). An answer ends where a
    line opens a markup tag, and a base model's also where it writes one of TURN_ENDS; an ending that
    may still become one ("\nQuest", "\n<") is held back, so a stream never shows what the finished
    answer drops."""
    ends = [m.start()] if (m := MARKUP_LINE.search(text)) else []
    turn_ends = TURN_ENDS if plain else ()
    ends += [text.index(end) for end in turn_ends if end in text]
    if ends:
        return text[: min(ends)].rstrip(), True
    held = len(m.group()) if (m := MAYBE_MARKUP.search(text)) else 0
    held = max([held] + [k for end in turn_ends for k in range(len(end) - 1, 0, -1) if text.endswith(end[:k])])
    return text[: len(text) - held], False


def retention_of(cache: KVCache, prefix_tokens: int, layer: int | None = None) -> dict:
    """positions: [layers, kv_heads, slots] document-token index of each slot (-1: empty or prompt)."""
    layers = range(cache.n_layers) if layer is None else [layer]
    pos = torch.stack([cache.original_positions(l)[0] for l in layers]) - prefix_tokens  # [layers, kv_heads, slots]
    pos = torch.where(pos >= 0, pos, torch.full_like(pos, -1))
    out = {"positions": pos.cpu().numpy(), "seen": cache.seen - prefix_tokens, "layers": list(layers)}
    if hasattr(cache, "cascade_of_slot"):
        out["cascade"] = cache.cascade_of_slot().numpy()  # [slots]: -1 sinks, i for cascade i
    return out
