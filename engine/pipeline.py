"""Reading with the model's layers in two halves, on two threads, one chunk apart (a pipeline).

Why: on a CPU shared with other programs, a forward split over OpenMP threads waits at the end of
every parallel region for the thread the scheduler gave away (engine/threads.py), and one thread alone
gets only its share of one core. Two single-threaded stages meet once per half-forward instead of
thousands of times, and both run whenever the scheduler lets them. Measured on 2 cores beside two
spinning processes (docs/speed.md section 8): SmolLM2 read 563 tok/s pipelined, 354-412 on one
thread, 247-298 on two OpenMP threads; quiet, the pipeline matches two OpenMP threads.

How: stage A (the calling thread) plans chunk n, runs the embeddings and layers [0, h), then waits
for stage B to finish chunk n - 1 (the only meeting point: the cache then holds n - 1 in every layer,
as a plain read leaves it, and progress is reported), pushes its half of chunk n, commits the plan
and hands the hidden states to stage B, which runs layers [h, L) and pushes them while A plans and
runs chunk n + 1. Each layer's storage is touched by one stage only, chunk after chunk in order, and
a push reads only its plan, so every layer goes through the same states as in `Engine.read`: the
cache after a pipelined read equals a plain read's, bit for bit at the same thread count per product
(tested after every chunk).

Where it applies (`supported`): the CPU with the torch kernels, decoders whose forward is embeddings,
rotary, layers, norm (Llama/SmolLM2, Mistral, Qwen2/3, Phi-3, and Gemma-3 with its sliding-window layers:
each part of a hybrid cache pushes its own layers of each half), a cascade or sink cache whose contests
stay within a layer, a read without a focus question or logits, and a thread budget of at least 2 (each
stage gets half). `--pipeline off` reads as before.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable

import torch

from . import kernels, threads
from .cache import CascadeCache
from .errors import Cancelled, UserError
from .worker import turn

# decoders whose forward is embeddings, rotary, layers, norm: their layers run one by one here as in that forward
PIPELINED_MODELS = ("LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model", "Phi3Model", "Gemma3TextModel")
_setting = {"pipeline": "auto"}


def configure(setting: str) -> None:
    """--pipeline auto (where it applies) or off (every read runs the layers as one forward)."""
    if setting not in ("auto", "off"):
        raise UserError(f"pipeline must be 'auto' or 'off', not {setting!r}")
    _setting["pipeline"] = setting


def enabled() -> bool:
    return _setting["pipeline"] == "auto"


def supported(engine, cache, logits: str = "none", focus=None) -> bool:
    decoder = engine.model.model
    # the torch kernels only: Triton's CPU interpreter (CASCADE_KERNELS=triton in tests) keeps global state
    # per launch and fails when two threads launch at once
    torch_kernels = kernels.backend(torch.empty(0, device=engine.device)) == "torch"
    # every part pushes after its layers' attention (CascadeCache, sliding windows included), within a layer
    pushes_per_layer = all(isinstance(p, CascadeCache) for p in cache.parts.values()) and cache.config.contest != "model"
    return (engine.device.type == "cpu" and torch_kernels and threads.budget() >= 2 and pushes_per_layer
            and type(decoder).__name__ in PIPELINED_MODELS and logits == "none" and not focus)


def layer_embeddings(decoder, hidden: torch.Tensor, zeros: torch.Tensor) -> list:
    """Each layer's (cos, sin), as the decoder's own forward makes them; at position 0 (identity), since the
    cascade attention rotates at in-cache positions itself. Gemma-3 has one rotary per layer type (global
    layers and sliding-window layers use different bases)."""
    n = len(decoder.layers)
    types = getattr(decoder.config, "layer_types", None)
    if type(decoder).__name__ == "Gemma3TextModel":
        by_type = {t: decoder.rotary_emb(hidden, zeros, t) for t in set(types)}
        return [by_type[t] for t in types[:n]]
    return [decoder.rotary_emb(hidden, position_ids=zeros)] * n


def read(engine, chunks: Iterable[list[int]], cache: CascadeCache, done: Callable[[int], None],
         should_stop: Callable[[], bool] | None = None) -> int:
    """Read `chunks` through the cache in two stages. `done(tokens read)` is called from this thread after
    each chunk, when every layer holds it (and the next chunk's first half has run, not yet pushed): the
    cache is then exactly as a plain read leaves it after that chunk. Returns the tokens read. On an
    error or a stop the chunk in flight is finished first, so the cache always holds whole chunks."""
    decoder = engine.model.model
    layers = list(decoder.layers)
    half = len(layers) // 2
    per_stage = max(1, threads.budget() // 2)
    handoff: queue.Queue = queue.Queue(maxsize=1)  # (hidden, position embeddings, step) or None: stop
    finished: queue.Queue = queue.Queue()  # None for each chunk stage B pushed, or its exception

    def run_layers(hidden, embeddings, step, part: range):  # as the decoder's own forward runs them
        zeros = torch.zeros(1, hidden.shape[1], dtype=torch.long, device=hidden.device)
        for i in part:
            hidden = layers[i](hidden, attention_mask=None, position_embeddings=embeddings[i], position_ids=zeros,
                               use_cache=False, cascade_step=step)
        return hidden

    def stage_b():
        torch.set_num_threads(per_stage)
        try:
            with torch.inference_mode():
                while (item := handoff.get()) is not None:
                    hidden, embeddings, step = item
                    run_layers(hidden, embeddings, step, range(half, len(layers)))
                    engine.push_layers(step, range(half, len(layers)))
                    finished.put(None)
        except BaseException as e:  # stage A raises it
            finished.put(e)
            while handoff.get() is not None:  # let A hand over what it has and stop
                pass

    read, in_flight = 0, 0  # tokens in chunks every layer holds; tokens of the chunk stage B has

    def settle() -> None:  # wait for stage B's chunk; then every layer holds it
        nonlocal read, in_flight
        if in_flight:
            error = finished.get()
            if error is not None:
                raise error
            read, in_flight = read + in_flight, 0
            done(read)

    helper = threading.Thread(target=stage_b, name="cascade-reader-stage-b", daemon=True)
    before = torch.get_num_threads()
    torch.set_num_threads(per_stage)
    helper.start()
    try:
        with torch.inference_mode():
            for chunk in chunks:
                turn()  # a chunk is one step for engine.worker, as in Engine.read
                if should_stop is not None and should_stop():
                    settle()
                    raise Cancelled(f"reading cancelled after {read} tokens")
                ids = torch.tensor([chunk], device=engine.device)
                step = engine.plan_step(cache, len(chunk))
                hidden = decoder.embed_tokens(ids)  # [1, L, hidden]
                embeddings = layer_embeddings(decoder, hidden, torch.zeros_like(ids))
                hidden = run_layers(hidden, embeddings, step, range(half))  # beside B's second half
                settle()
                if should_stop is not None and should_stop():  # asked again once the chunk before is reported,
                    raise Cancelled(f"reading cancelled after {read} tokens")  # as a plain read asks: unpushed
                engine.push_layers(step, range(half))
                engine.commit(step)  # pushes read their plan, not the cache's counts
                handoff.put((hidden, embeddings, step))
                in_flight = len(chunk)
            settle()
    finally:
        handoff.put(None)
        helper.join()
        torch.set_num_threads(before)
    return read
