"""How many CPU threads the model uses, chosen by measuring the machine as it is.

On a quiet machine torch's default (one thread per core) is fastest. When other programs keep the
cores busy, the model's worker threads meet at the end of every parallel region, and a thread the
scheduler has handed to another program makes the others wait (libgomp even spins while waiting):
reads ran 2-15x slower with a browser and a build beside them (FINDINGS.md). One thread has no one
to wait for. Which is faster depends on the load of the moment, so `--threads auto` measures it: a
short probe (model-shaped matmuls in the model's dtype, ~0.1 s) with each candidate, alternated, when work
starts, again after FIRST_RECHECK_S, then every RECHECK_S seconds of model work; the faster count
is used until the next check. `--threads N` fixes the count. OMP_WAIT_POLICY is left as the user
set it.
"""

from __future__ import annotations

import os
import time

import torch

from .errors import UserError

RECHECK_S = 10.0  # seconds between probes while the model works (a probe costs ~1% of that)
FIRST_RECHECK_S = 3.0  # the first probe runs as work starts, when the load may still be settling
_state = {"mode": None, "next_check": 0.0, "max": None, "probes": []}


def parse_threads(text: str | int | None) -> str | int:
    """'auto' or a positive integer; anything else is a one-line error."""
    if text is None or text == "auto":
        return "auto"
    try:
        n = int(text)
    except (TypeError, ValueError):
        raise UserError(f"threads must be 'auto' or an integer >= 1, not {text!r}") from None
    if n < 1:
        raise UserError(f"threads must be 'auto' or an integer >= 1, not {n}")
    return n


def configure(setting: str | int | None = "auto") -> None:
    """Use a fixed thread count, or measure (auto) from now on."""
    mode = parse_threads(setting)
    if _state["max"] is None:
        _state["max"] = torch.get_num_threads()  # torch's default: the cores it may use
    _state["mode"], _state["next_check"] = mode, 0.0
    if mode != "auto":
        torch.set_num_threads(mode)


def budget() -> int:
    """The threads model work may use at most: the fixed count, or (auto, unset) every core torch may use."""
    mode = _state["mode"]
    return mode if isinstance(mode, int) else (_state["max"] or torch.get_num_threads())


def candidates() -> list[int]:
    most = _state["max"] or torch.get_num_threads()
    return sorted({1, most}, reverse=True)


def _probe(dtype: torch.dtype = torch.float32, repeats: int = 16) -> float:
    """Seconds for a fixed model-shaped workload (a 64-token chunk through one MLP) at the current count,
    in the model's dtype: a bfloat16 probe on a CPU without native bfloat16 (AVX2 only) took 2.4 s, not
    ~0.1 s, and its emulation gains nothing from a second thread, so auto chose 1 thread and spent more
    time probing than reading (63 tok/s against 291 with 2 threads, float32, 4k tokens)."""
    x = torch.ones(64, 576, dtype=dtype)
    w1 = torch.ones(576, 1536, dtype=dtype)
    w2 = torch.ones(1536, 576, dtype=dtype)
    start = time.perf_counter()
    for _ in range(repeats):
        x = torch.nn.functional.silu(x @ w1) @ w2 * 1e-3
    return time.perf_counter() - start


def choose(dtype: torch.dtype = torch.float32) -> int:
    """Probe every candidate (alternating, median of 3 each) and use the fastest; returns the count.

    The median, not the best: under load a short probe with every thread sometimes lands in a moment
    when all its cores are free, and the best of a few would pick the count that usually stalls.
    """
    options = candidates()
    times: dict[int, list[float]] = {n: [] for n in options}
    for _ in range(3):
        for n in options:
            torch.set_num_threads(n)
            times[n].append(_probe(dtype))
    best = {n: sorted(t)[1] for n, t in times.items()}
    # more threads only when clearly faster: on a quiet machine they win by ~1.5x, under load they lose
    choice = options[0] if best[options[0]] < 0.9 * best[options[-1]] else options[-1]
    torch.set_num_threads(choice)
    _state["probes"] = (_state["probes"] + [{n: round(t * 1e3, 2) for n, t in best.items()}])[-20:]
    return choice


def tick(dtype: torch.dtype = torch.float32) -> None:
    """Call between steps of model work (every forward, with the model's dtype): re-measures when a
    check is due."""
    if _state["mode"] != "auto" or len(candidates()) == 1:
        return
    now = time.monotonic()
    if now >= _state["next_check"]:
        first = not _state["probes"]
        choose(dtype)
        _state["next_check"] = time.monotonic() + (FIRST_RECHECK_S if first else RECHECK_S)


def report() -> dict:
    """What was chosen and the last probes (ms per probe by thread count), for --json and the bench."""
    return {"threads": _state["mode"] or "default", "threads_now": torch.get_num_threads(),
            "thread_probes_ms": _state["probes"][-3:], "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
