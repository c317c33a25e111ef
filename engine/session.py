"""Reading and answering sessions: one document, one cache, many questions.

A `ReadingSession` streams a document through the cache once (strided prefill), keeps the read
state, and answers each question from a copy of it, so questions never erode the document. A
running conversation (follow-ups that see earlier answers) is opt-in per question.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from . import documents
from .cache import CacheConfig, KVCache
from .errors import UserError
from .models import LoadedModel
from .prompts import (SUMMARY_QUESTION, PromptFormat,
                      prompt_format)
from .runtime import Engine, ReadProgress

SNAPSHOT_VERSION = 1


@dataclass
class Citation:
    token: int  # document token index the answer attended to most around here
    weight: float  # share of the answer's attention (over retained document tokens)
    label: str  # "p. 3", "ch. 2: Title", "00:01:02 Alice", or ""
    excerpt: str
    location: dict = field(default_factory=dict)


@dataclass
class Answer:
    question: str
    text: str = ""
    tokens: int = 0
    seconds: float = 0.0
    stopped: bool = False
    citations: list[Citation] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ReadResult:
    doc_tokens: int
    prompt_tokens: int  # prefix tokens before the document (pinned in the sinks)
    seconds: float
    tokens_per_second: float


class ReadingSession:
    def __init__(self, loaded: LoadedModel, config: CacheConfig, stride: int = 512,
                 prompt: str | None = None):
        self.engine = Engine(loaded, config, stride)
        self.loaded, self.config, self.stride = loaded, config, stride
        self.format: PromptFormat = prompt_format(loaded.tokenizer, prompt or loaded.prompt_format, loaded.bos)
        self.document: documents.Document | None = None
        self.source_map: documents.SourceMap | None = None
        self.doc_cache: KVCache | None = None  # state right after reading: every answer starts here
        self.conversation: KVCache | None = None  # state after the last answer (running conversation)
        self.prefix_tokens = 0
        self.read_result: ReadResult | None = None
        self.answers: list[Answer] = []

    # ---------------------------------------------------------------- reading
    def _ids(self, text: str) -> list[int]:
        return self.loaded.tokenizer(text, add_special_tokens=False).input_ids

    def read(self, document: documents.Document, progress: Callable[[ReadProgress], None] | None = None,
             should_stop: Callable[[], bool] | None = None,
             on_chunk: Callable[["ReadingSession", KVCache], None] | None = None,
             total_tokens: int | None = None) -> ReadResult:
        """Stream the document (after the prompt prefix) through a fresh cache."""
        tok = self.loaded.tokenizer
        source_map = documents.SourceMap(document)
        prefix_ids = self._ids(self.format.prefix)
        pieces = documents.tokenize_stream(document, tok, source_map=source_map)
        cache = self.engine.new_cache()
        total = (total_tokens or documents.count_tokens(document, tok)) + len(prefix_ids)

        def stream():
            yield prefix_ids
            yield from pieces

        chunk_hook = (lambda c: on_chunk(self, c)) if on_chunk else None
        self.document, self.source_map, self.prefix_tokens = document, source_map, len(prefix_ids)
        done = self.engine.read(stream(), cache, total=total, progress=progress, should_stop=should_stop,
                                on_chunk=chunk_hook)
        self.doc_cache, self.conversation = cache, None
        doc_tokens = done.tokens_read - len(prefix_ids)
        if doc_tokens <= 0:
            raise UserError(f"{document.title}: no text to read")
        self.read_result = ReadResult(doc_tokens, len(prefix_ids), done.seconds, done.tokens_per_second)
        return self.read_result

    # ---------------------------------------------------------------- answering
    def _require_read(self) -> None:
        if self.doc_cache is None:
            raise UserError("no document has been read yet")

    def ask(self, question: str, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 0.95,
            continue_conversation: bool = False, should_stop: Callable[[], bool] | None = None,
            seed: int | None = 0, n_citations: int = 3) -> Iterator[str]:
        """Yield the answer as text deltas; the finished `Answer` is then `self.answers[-1]`."""
        self._require_read()
        question = question.strip()
        if not question:
            raise UserError("the question is empty")
        if continue_conversation and self.conversation is not None:
            cache, text = self.conversation, self.format.follow_up_text(question)
        else:
            cache, text = self.doc_cache.clone(), self.format.question_text(question)
        answer = Answer(question)
        self.answers.append(answer)
        yield from self._generate(cache, self._ids(text), answer, max_new_tokens, temperature, top_p,
                                  should_stop, seed, n_citations)
        self.conversation = cache

    def _generate(self, cache, prompt_ids, answer: Answer, max_new_tokens, temperature, top_p, should_stop,
                  seed, n_citations) -> Iterator[str]:
        tok = self.loaded.tokenizer
        stops = {i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if isinstance(i, int) and i >= 0}
        attention: list[torch.Tensor] = []
        start, ids, shown = time.perf_counter(), [], ""
        for token in self.engine.generate(cache, prompt_ids, max_new_tokens, temperature, top_p, stops,
                                          should_stop, seed, attention_sink=attention if cache.scored and n_citations > 0 else None):
            ids.append(token)
            text = tok.decode(ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            delta, shown = text[len(shown):], text
            answer.text, answer.tokens = shown, len(ids)
            if delta:
                yield delta
        answer.text = tok.decode(ids, skip_special_tokens=True).strip()
        answer.tokens, answer.seconds = len(ids), time.perf_counter() - start
        answer.stopped = bool(should_stop and should_stop())
        if attention:
            answer.citations = self._citations(attention, n_citations)

    def _citations(self, attention, k) -> list[Citation]:
        if k <= 0:
            return []
        """Document tokens that the answer attended to most, mapped to their source passages.

        `attention` holds, per generated token and layer, the score sums over the resident slots
        and the original positions those slots held at that moment.
        """
        doc_tokens = self.read_result.doc_tokens if self.read_result else 0
        total: dict[int, float] = {}
        for score, pos in attention:
            doc = pos.reshape(-1).numpy() - self.prefix_tokens
            s = score.reshape(-1).float().numpy()
            keep = (doc >= 0) & (doc < doc_tokens)
            held, where = np.unique(doc[keep], return_inverse=True)  # several heads may hold one token
            for d, v in zip(held.tolist(), np.bincount(where, weights=s[keep]).tolist()):
                total[d] = total.get(d, 0.0) + v
        if not total or self.source_map is None:
            return []
        norm = sum(total.values())
        picked: list[Citation] = []
        for d in sorted(total, key=total.get, reverse=True):
            loc = self.source_map.locate(d)
            # one citation per passage: nearby tokens of the same page / chapter / cue count once
            if any(abs(d - c.token) < 48 and c.location.get("segment") == loc["segment"] for c in picked):
                continue
            picked.append(Citation(d, total[d] / norm, loc.get("label", ""), self.source_map.excerpt(d), loc))
            if len(picked) == k:
                break
        return picked

    # ---------------------------------------------------------------- summaries
    def summarize(self, max_new_tokens: int = 300, should_stop=None, temperature: float = 0.0) -> Iterator[str]:
        """Whole-document summary from the cache after reading (the paper's setting)."""
        yield from self.ask(SUMMARY_QUESTION, max_new_tokens=max_new_tokens, temperature=temperature,
                            should_stop=should_stop)

    # ---------------------------------------------------------------- retention view
    def retention(self, layer: int | None = None) -> dict:
        """Which document tokens the cache holds, per layer and KV head (positions in document tokens)."""
        self._require_read()
        return retention_of(self.doc_cache, self.prefix_tokens, layer)

    def budget(self) -> dict:
        cache = self.doc_cache or self.engine.new_cache()
        return {"policy": self.config.policy, "slots": self.config.slots, "cache_mb": cache.nbytes() / 2 ** 20,
                "span": self.config.span}

    # ---------------------------------------------------------------- snapshots
    def manifest(self) -> dict:
        self._require_read()
        d = self.document
        return {
            "version": SNAPSHOT_VERSION, "model_id": self.loaded.model_id, "config": self.config.to_dict(),
            "stride": self.stride, "prompt": self.format.name, "prefix_tokens": self.prefix_tokens,
            "read": asdict(self.read_result),
            "document": {"path": d.path, "kind": d.kind, "title": d.title, "sha256": d.sha256,
                         "segments": [{"text": s.text, "label": s.label, "meta": s.meta} for s in d.segments]},
        }

    def save(self, path: str | Path) -> Path:
        """Save the read document: `<path>.safetensors` (cache + source map) and `<path>.json`."""
        from safetensors.torch import save_file

        base = Path(path).with_suffix("")
        base.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"cache.{k}": v.contiguous() for k, v in self.doc_cache.state().items()}
        tensors.update({f"map.{k}": torch.from_numpy(np.ascontiguousarray(v))
                        for k, v in self.source_map.to_arrays().items()})
        save_file(tensors, str(base) + ".safetensors")
        Path(str(base) + ".json").write_text(json.dumps(self.manifest(), indent=1))
        return base

    def load(self, path: str | Path) -> None:
        """Load a snapshot saved by `save`; refuses one made with another model or other settings."""
        from safetensors.torch import load_file

        base = Path(path).with_suffix("") if str(path).endswith((".json", ".safetensors")) else Path(path)
        man_path, data_path = Path(str(base) + ".json"), Path(str(base) + ".safetensors")
        if not man_path.exists() or not data_path.exists():
            raise UserError(f"{base}: no snapshot there (need {man_path.name} and {data_path.name})")
        try:
            man = json.loads(man_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{man_path}: not a snapshot manifest (unreadable JSON)") from None
        if man.get("version") != SNAPSHOT_VERSION:
            raise UserError(f"{man_path}: snapshot version {man.get('version')} is not supported")
        if man["model_id"] != self.loaded.model_id:
            raise UserError(f"{man_path}: made with model {man['model_id']}, not {self.loaded.model_id}")
        if man["config"] != self.config.to_dict() or man["stride"] != self.stride or man["prompt"] != self.format.name:
            raise UserError(f"{man_path}: made with other cache settings ({man['config']}, stride {man['stride']}, "
                            f"prompt {man['prompt']}); use the same settings to load it")
        try:
            tensors = load_file(str(data_path))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise UserError(f"{data_path}: corrupt snapshot ({type(e).__name__})") from None
        doc = man["document"]
        document = documents.Document(path=doc["path"], kind=doc["kind"], title=doc["title"], sha256=doc["sha256"],
                                      segments=[documents.Segment(s["text"], s["label"], s["meta"]) for s in doc["segments"]])
        cache = self.engine.new_cache()
        cache.load_state({k[len("cache."):]: v for k, v in tensors.items() if k.startswith("cache.")})
        self.source_map = documents.SourceMap.from_arrays(
            document, {k[len("map."):]: v.numpy() for k, v in tensors.items() if k.startswith("map.")})
        self.document, self.doc_cache, self.conversation = document, cache, None
        self.prefix_tokens = man["prefix_tokens"]
        self.read_result = ReadResult(**man["read"])


def retention_of(cache: KVCache, prefix_tokens: int, layer: int | None = None) -> dict:
    """positions: [layers, kv_heads, slots] document-token index of each slot (-1: empty or prompt)."""
    layers = range(cache.n_layers) if layer is None else [layer]
    pos = torch.stack([cache.original_positions(l)[0] for l in layers]) - prefix_tokens  # [layers, kv_heads, slots]
    pos = torch.where(pos >= 0, pos, torch.full_like(pos, -1))
    out = {"positions": pos.numpy(), "seen": cache.seen - prefix_tokens, "layers": list(layers)}
    if hasattr(cache, "cascade_of_slot"):
        out["cascade"] = cache.cascade_of_slot().numpy()  # [slots]: -1 sinks, i for cascade i
    return out
