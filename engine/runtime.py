"""Running a transformers model over a fixed-size cache: one forward per chunk, any length.

The model computes q/k/v with its own projections; we call it with every position set to 0, so
RoPE is the identity there and keys arrive un-rotated. Our attention function (registered with
transformers' AttentionInterface as "cascade") then rotates queries and keys at positions *inside
the cache*, attends over [cache | chunk], updates scores and pushes the chunk into the cache.
Engine state travels to it as keyword arguments of `model(...)`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from . import kernels, packed, pipeline, threads
from .architectures import check_architecture, check_positions, sliding_everywhere
from .attention import focus_weights, mask_bias, query_weights, window_bias
from .cache import CacheConfig, CascadeCache, ChunkPlan, KVCache, make_cache
from .errors import Cancelled
from .models import LoadedModel
from .worker import turn

ATTENTION_NAME = "cascade"


class RopeTable:
    """cos/sin per position from the model's own rotary module, normalised by its value at 0.

    The model already multiplied q and k by the rotary module's output at position 0 (its
    attention scaling; 1.0 for plain RoPE), so we divide that back out to avoid applying it twice.
    layer_type selects the rotary of one kind of layer where a model has several (Gemma-3).
    """

    MAX_TABLE = 1 << 16

    def __init__(self, rotary: torch.nn.Module, device, dtype, layer_type: str | None = None):
        self.rotary, self.device, self.dtype, self.layer_type = rotary, device, dtype, layer_type
        self.cos = self.sin = None
        self._build(4096)

    def _build(self, n: int) -> None:
        pos = torch.arange(n, device=self.device)[None]
        dummy = torch.zeros(1, dtype=torch.float32, device=self.device)
        extra = (self.layer_type,) if self.layer_type else ()
        cos, sin = self.rotary(dummy, pos, *extra)  # [1, n, head_dim] each
        scale = cos[0, 0, 0]
        self.cos, self.sin = (cos[0] / scale).to(self.dtype), (sin[0] / scale).to(self.dtype)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: any shape [...] -> cos, sin: [..., head_dim]"""
        need = int(positions.max()) + 1 if positions.numel() else 0
        if need > self.MAX_TABLE:  # far positions (rope="original" on a long book): compute, don't tabulate
            extra = (self.layer_type,) if self.layer_type else ()
            dummy = torch.zeros(1, dtype=torch.float32, device=self.device)
            cos, sin = self.rotary(dummy, positions.reshape(1, -1), *extra)
            scale = self.rotary(dummy, torch.zeros(1, 1, dtype=torch.long, device=self.device), *extra)[0][0, 0, 0]
            shape = (*positions.shape, cos.shape[-1])
            return (cos[0] / scale).to(self.dtype).view(shape), (sin[0] / scale).to(self.dtype).view(shape)
        if need > self.cos.shape[0]:
            self._build(max(need, 2 * self.cos.shape[0]))
        return self.cos[positions], self.sin[positions]


@dataclass
class PartStep:
    """What the layers of one cache part need for one forward (shared by those layers)."""

    cache: KVCache
    plan: ChunkPlan
    cache_cos: torch.Tensor  # [slots, head_dim]
    cache_sin: torch.Tensor
    chunk_cos: torch.Tensor  # [L, head_dim]
    chunk_sin: torch.Tensor
    weights: torch.Tensor | None  # [L] EMA weights of queries; None when the part is unscored
    bias: torch.Tensor | None = None  # additive mask over slots, built by the part's first layer
    bias_ready: bool = False  # bias is built (it stays None when every slot is filled)
    rope: "RopeTable | None" = None  # set for rope="original": cache keys rotate at their stream positions
    window_bias: torch.Tensor | None = None  # [L, slots + L] for sliding-window parts
    # (keys, values, cache_score, chunk_score) per layer, pushed after the forward (see push_pending)
    pending: dict[int, tuple] = field(default_factory=dict)


@dataclass
class StepContext:
    """What one forward needs besides the tokens."""

    cache: KVCache
    parts: dict[str, PartStep]


def cascade_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                              cascade_step: StepContext | None = None, **kwargs):
    """transformers attention interface: returns ([batch, L, q_heads, head_dim], None)."""
    if cascade_step is None:
        raise RuntimeError("the 'cascade' attention needs cascade_step=...; run the model through engine.runtime")
    name, layer = cascade_step.cache.part_of(module.layer_idx)
    part = cascade_step.parts[name]
    if part.rope is not None:  # ablation: each slot at its original stream position, per KV head
        k_res, v_res = part.cache.resident(layer)  # [batch, kv_heads, slots, head_dim], un-rotated
        cos, sin = part.rope(part.cache.original_positions(layer).clamp(min=0))  # [batch, kv_heads, slots, hd]
        k_res = kernels.rope(k_res, cos, sin)
    elif hasattr(part.cache, "rotated_resident"):  # frozen slots never move: each is rotated once (engine.memory)
        k_res, v_res = part.cache.rotated_resident(layer, part.cache_cos, part.cache_sin)
    else:  # a cascade's slots move to new in-cache positions as it pushes: rotated at every forward
        k_res, v_res = part.cache.resident(layer)  # un-rotated
        k_res = kernels.rope(k_res, part.cache_cos, part.cache_sin)
    q = kernels.rope(query, part.chunk_cos, part.chunk_sin)
    k_new = kernels.rope(key, part.chunk_cos, part.chunk_sin)
    if not part.bias_ready and part.weights is not None and kernels.backend(q) == "torch":
        # once per forward, not per layer: `mask_bias` asks the device whether every slot is filled
        part.bias = mask_bias(part.plan.cache_valid, q.shape[2], q.shape[1] // k_res.shape[1])
        part.bias_ready = True
    compute_dtype = None
    if not part.cache.steady_shapes and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # oneDNN, which runs bfloat16 matmuls on CPU, keeps ~1 MB of state for every matrix shape it
        # meets and never frees it; where the slots change with every answer token that grew RSS by
        # ~100 MB per answer (measured). float32 matmuls keep no such state.
        compute_dtype = torch.float32
    out, cache_score, chunk_score = kernels.chunk_attention(
        q, k_res, v_res, part.plan.cache_valid, k_new, value, scaling or module.scaling,
        weights=part.weights, head_reduce=part.cache.config.head_reduce, bias=part.bias,
        bias_known=part.bias_ready, window_bias=part.window_bias, compute_dtype=compute_dtype)
    n = part.plan.length  # rows past it are focus rows (Engine.forward): they add to scores, never stay
    if chunk_score is not None:
        chunk_score = chunk_score[..., :n]
    key, value = key[:, :, :n], value[:, :, :n]
    if isinstance(part.cache, CascadeCache):  # pushed with the other layers after the forward
        part.pending[layer] = (key, value, cache_score, chunk_score)
    else:
        kernels.cascade_push(part.cache, layer, part.plan, key, value, cache_score, chunk_score)
    return out.to(query.dtype).transpose(1, 2), None


def push_pending(part: PartStep, layers: range | None = None) -> None:
    """Push every layer's chunk into a cascade cache at once, its layers as batch rows.

    A layer's push only changes that layer's slots, which its attention has already read, so the
    pushes can wait until the forward is done; together they cost one push's overhead instead of
    one per layer (the plan is the same for all of them). `layers`: push only these (the two halves
    of a pipelined read, engine/pipeline.py); default every layer.
    """
    layers = range(part.cache.n_layers) if layers is None else layers
    if not part.pending or not layers:
        return
    if any(layer not in part.pending for layer in layers):
        raise RuntimeError(f"{len(part.pending)} of {part.cache.n_layers} layers attended in this forward")
    rows = [part.pending.pop(layer) for layer in layers]

    def stacked(i):  # [layers * batch, kv_heads, ...] or None where a layer has no scores
        items = [r[i] for r in rows]
        return None if items[0] is None else torch.cat(items)

    batch = part.cache.layers_as_batch(layers)
    key, value, cache_score, chunk_score = (stacked(i) for i in range(4))
    cache_score, chunk_score = part.cache.contest_scores(cache_score), part.cache.contest_scores(chunk_score)
    kernels.cascade_push(batch, 0, part.plan, key, value, cache_score, chunk_score)
    part.cache.take_layers(batch, layers)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, cascade_attention_forward)


_register()


@dataclass
class ReadProgress:
    tokens_read: int
    tokens_total: int | None
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_read / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        if not self.tokens_total or not self.tokens_read:
            return None
        return max(0.0, (self.tokens_total - self.tokens_read) / max(self.tokens_per_second, 1e-9))


class Engine:
    """A model plus a cache policy: reads token streams in strides and generates answers."""

    def __init__(self, loaded: LoadedModel, config: CacheConfig, stride: int | str = 512):
        from .errors import UserError

        p = next(loaded.model.parameters())
        if stride == "auto":
            stride = auto_stride(p.device, loaded.model.config, config)
        if not isinstance(stride, int) or stride < 1:
            raise UserError(f"stride must be >= 1 or auto, not {stride}")
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        self.config, self.stride = config, stride
        self.focus_share: float | None = None  # --focus-share: the question rows' share of the scores (None: plain rows)
        check_architecture(self.model.config)
        check_positions(self.model.config, config, stride)
        self.model.set_attn_implementation(ATTENTION_NAME)
        self.device, self.dtype = p.device, p.dtype
        layer_types = set(getattr(self.model.config, "layer_types", None) or [])
        rotary = self.model.model.rotary_emb
        per_type = isinstance(getattr(rotary, "rope_type", None), dict)  # one rotary per kind of layer (Gemma-3)
        if "sliding_attention" in layer_types:
            kinds = {"global": "full_attention", "sliding": "sliding_attention"}
            self.rope = {name: RopeTable(rotary, self.device, self.dtype, kind if per_type else None)
                         for name, kind in kinds.items()}
        else:
            self.rope = {"global": RopeTable(rotary, self.device, self.dtype)}
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        # Whether each new matmul shape leaves state behind (oneDNN on CPU below float32), so prompts are
        # read in lengths seen before (`tail_chunks`). Not where every linear layer is packed: those pad
        # their products to a multiple of `packed.ROW_STEP` rows, a bounded set of shapes.
        self.packed_rows = packed.bounded_rows(self.model)
        # read in two pipelined halves of the layers where that applies (engine/pipeline.py, --pipeline)
        self.pipeline = pipeline.enabled()
        self.shape_state = self.device.type == "cpu" and self.dtype != torch.float32 and not self.packed_rows

    def new_cache(self) -> KVCache:
        return make_cache(self.config, self.model.config, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache, logits: str = "none",
                focus: list[int] | None = None) -> torch.Tensor | None:
        """Run one chunk through the model and push it into the cache.

        ids: [1, L]; logits: "none" (reading), "last" (next-token), or "all" (perplexity).
        focus: token ids of a question known before reading (--focus). They follow the chunk as extra
        query rows, so their attention joins the scores the cascade contests use (SnapKV-style), but
        their keys are never pushed: the cache holds the document only.
        """
        threads.tick(self.dtype)  # --threads auto: re-measure the best thread count when a check is due
        length = ids.shape[1]
        if focus:
            ids = torch.cat((ids, torch.tensor([focus])), dim=1)
        step = self.plan_step(cache, length, focus)
        out = self.model.model(input_ids=ids.to(self.device), position_ids=torch.zeros_like(ids, device=self.device),
                               use_cache=False, cascade_step=step)
        self.push_layers(step)
        self.commit(step)
        hidden = out.last_hidden_state[:, :length]  # [1, L, hidden]
        if logits == "none":
            return None
        if logits == "last":
            hidden = hidden[:, -1:]
        out = self.model.lm_head(hidden).float()
        if self.softcap:  # Gemma-style final logit soft-capping
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def plan_step(self, cache: KVCache, length: int, focus: list[int] | None = None) -> StepContext:
        """What the layers need to read a chunk of `length` tokens (plus `focus` rows) into `cache`: each
        part's plan, RoPE tables, query weights and masks."""
        extra = len(focus) if focus else 0
        parts = {}
        for name, part in cache.parts.items():
            plan = part.plan(length)
            rope = self.rope[name]
            weights = (query_weights(length + extra, self.config.beta, self.device)
                       if part.scored and name == "global" else None)
            if weights is not None and extra and self.focus_share is not None:
                weights = focus_weights(weights, length, self.focus_share)
            original = self.config.rope == "original" and name == "global"
            chunk_pos = plan.original_pos if original else plan.chunk_pos
            if extra:  # the focus rows sit right after the chunk
                chunk_pos = torch.cat((chunk_pos, chunk_pos[-1] + 1 + torch.arange(extra, device=chunk_pos.device)))
            step = PartStep(part, plan, *rope(plan.cache_pos), *rope(chunk_pos), weights,
                            rope=rope if original else None)
            if name == "sliding":
                step.window_bias = window_bias(plan.cache_pos, plan.cache_valid, chunk_pos, cache.sliding_window)
            parts[name] = step
        return StepContext(cache, parts)

    @staticmethod
    def push_layers(step: StepContext, layers: range | None = None) -> None:
        """Push the chunk into the layers that attended in this step (`layers`: these model layers only;
        default all)."""
        for name, part in step.parts.items():
            push_pending(part, None if layers is None else step.cache.local_layers(name, layers))

    @staticmethod
    def commit(step: StepContext) -> None:
        """Every part of the cache now counts the step's chunk (its slots were pushed or are being pushed)."""
        for name, part in step.cache.parts.items():
            part.commit(step.parts[name].plan)

    def read(self, pieces: Iterable[list[int]], cache: KVCache, total: int | None = None,
             progress: Callable[[ReadProgress], None] | None = None,
             should_stop: Callable[[], bool] | None = None, on_chunk: Callable[[KVCache], None] | None = None,
             logits: str = "none", focus: list[int] | None = None) -> ReadProgress:
        """Read a stream of token-id pieces in `stride` chunks. Returns the final progress.
        focus: a question's token ids whose attention joins every chunk's scores (see `forward`).

        Memory never depends on the stream's length: pieces are consumed lazily, and at most one
        chunk (plus less than one piece) of ids is held at a time.
        """
        if focus:
            check_positions(self.model.config, self.config, self.stride + len(focus), "stride + focus question")
        start = time.perf_counter()

        def done(read: int) -> None:  # after each chunk, when the cache holds it
            if on_chunk is not None:
                on_chunk(cache)
            if progress is not None:
                progress(ReadProgress(read, total, time.perf_counter() - start))

        if self.pipelined(cache, logits, focus):
            read = pipeline.read(self, self.chunks(pieces), cache, done, should_stop)
            return ReadProgress(read, total, time.perf_counter() - start)
        read = 0
        for chunk in self.chunks(pieces):
            turn()  # a chunk is one step: other sessions' work goes first if it waits (engine.worker)
            if should_stop is not None and should_stop():
                raise Cancelled(f"reading cancelled after {read} tokens")
            self.forward(torch.tensor([chunk]), cache, logits=logits, focus=focus)
            read += len(chunk)
            done(read)
        return ReadProgress(read, total, time.perf_counter() - start)

    def pipelined(self, cache: KVCache, logits: str = "none", focus: list[int] | None = None) -> bool:
        """Whether `read` into `cache` runs in two pipelined halves of the layers (engine/pipeline.py)."""
        return self.pipeline and pipeline.supported(self, cache, logits, focus)

    def chunks(self, pieces: Iterable[list[int]]) -> Iterator[list[int]]:
        """A stream of token-id pieces cut into chunks: whole strides, then the rest in powers of two."""
        buffer: list[int] = []
        for piece in pieces:
            buffer.extend(piece)
            while len(buffer) >= self.stride:
                yield buffer[: self.stride]
                del buffer[: self.stride]
        # the rest in lengths seen before (tail_chunks), whatever the dtype: how a document is cut into
        # chunks decides which tokens the cascades keep, so one document reads the same everywhere
        for n in tail_chunks(len(buffer), self.stride):
            yield buffer[:n]
            del buffer[:n]

    def prefill(self, ids: list[int], cache: KVCache, logits: str = "last") -> torch.Tensor | None:
        """Read a prompt after the document in chunks of `tail_chunks` lengths; the last one's logits.

        Into an append-only tail where shapes leave no state (float32 on CPU, GPUs, packed bfloat16 layers
        on CPU), the rest after whole strides goes in one forward: every forward reads all the weights,
        and the cut changes nothing there. A cascade's own cache keeps the powers of two, so a prompt
        pushes the same tokens out whatever the dtype."""
        out, start = None, 0
        lengths = tail_chunks(len(ids), self.stride, self.shape_state or not cache.append_only)
        for i, n in enumerate(lengths):
            turn()  # a fair turn for other sessions between chunks (engine.worker)
            out = self.forward(torch.tensor([ids[start: start + n]]), cache,
                               logits=logits if i == len(lengths) - 1 else "none")
            start += n
        return out

    @torch.inference_mode()
    def generate(self, cache: KVCache, prompt_ids: list[int], max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, stop_ids: Iterable[int] = (),
                 should_stop: Callable[[], bool] | None = None, seed: int | None = None,
                 logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None,
                 after_prompt: Callable[[], None] | None = None) -> Iterator[int]:
        """Read the prompt into the cache, then yield generated token ids one by one.

        Greedy when temperature == 0. Stops on a stop id (not yielded), max_new_tokens or should_stop.
        logits_processor(generated ids, logits [vocab]) may reshape the next-token logits (repetition
        control); after_prompt runs once the prompt is read (e.g. to start counting the answer's attention).
        """
        stop = set(stop_ids)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        if not prompt_ids:
            raise ValueError("generate needs a non-empty prompt")
        logits = self.prefill(prompt_ids, cache)
        if after_prompt is not None:
            after_prompt()
        generated: list[int] = []
        for _ in range(max_new_tokens):
            turn()  # a token is one step (engine.worker)
            if should_stop is not None and should_stop():
                return
            # [vocab] on the host: the logits processors and the sampler's generator live there
            next_logits = logits[0, -1].cpu()
            if logits_processor is not None:
                next_logits = logits_processor(generated, next_logits)
            next_id = sample(next_logits, temperature, top_p, gen)
            if next_id in stop:
                return
            generated.append(next_id)
            yield next_id
            if len(generated) < max_new_tokens:  # the last token's logits would never be used
                logits = self.forward(torch.tensor([[next_id]]), cache, logits="last")


# Tokens per chunk while reading when none is chosen (`--stride auto`), by device. The CPU is compute
# bound: a longer chunk adds its own causal attention and saves little else. A GPU is host bound: on an
# H100 a chunk of 512 tokens took 66 ms, 40 of them Python and kernel launches, and a chunk of 4,096 took
# 95 ms, so the whole KJV read in 17 s instead of 114 with the same answer (docs/gpu.md).
AUTO_STRIDE = {"cpu": 512, "cuda": 4096}
MIN_AUTO_STRIDE = 512


def device_stride(device: torch.device) -> int:
    """The stride `--stride auto` starts from on this device (before fitting a model's positions)."""
    return AUTO_STRIDE.get(device.type, MIN_AUTO_STRIDE)


def auto_stride(device: torch.device, model_config, config: CacheConfig) -> int:
    """The device's stride, halved (not below MIN_AUTO_STRIDE) until sinks + window + stride, the farthest
    distance inside the cache while reading, fits the model: its sliding window where every layer has one,
    else the positions it was trained on."""
    stride = device_stride(device)
    limit = sliding_everywhere(model_config) or int(getattr(model_config, "max_position_embeddings", 0) or 0)
    while limit and stride > MIN_AUTO_STRIDE and config.sinks + config.window + stride > limit:
        stride //= 2
    return stride


def tail_chunks(n: int, stride: int, powers_of_two: bool = True) -> list[int]:
    """Chunk lengths for reading n prompt tokens: whole strides, then the rest in powers of two (or whole).

    oneDNN keeps state for every new matrix shape it meets in bfloat16 (~1 MB each, measured), so a
    question of any length must not bring a new chunk length: with powers of two there are at most
    log2(stride) + 2 lengths in the life of the process, at the cost of a few more small forwards.
    float32 keeps no such state (measured: 0 MB over 250 new shapes, docs/eval.md), nor do packed
    bfloat16 layers, which pad their products to a multiple of `packed.ROW_STEP` rows; each forward reads
    every weight once, so there the rest goes in one forward (`Engine.shape_state`).
    """
    lengths = [stride] * (n // stride)
    rest = n % stride
    if rest and not powers_of_two:
        return lengths + [rest]
    while rest:
        p = 1 << (rest.bit_length() - 1)
        lengths.append(p)
        rest -= p
    return lengths


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> int:
    """logits: [vocab] -> a token id (greedy at temperature 0, nucleus sampling otherwise)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
