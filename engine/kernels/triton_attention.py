"""Triton chunk / decode attention with exact per-key score sums (the CUDA path of engine.attention).

Same contract as `engine.attention.chunk_attention`, which stays the readable oracle: queries of a
chunk ([batch, q_heads, L, head_dim], already rotated) attend to [cache slots (masked by
cache_valid) | the chunk's own keys, causally]; query head h reads KV head h // group (GQA by
indexing: K/V are never repeated).

Two passes, so that the scores are exact rather than estimated from a partial softmax:
1. `_attn_fwd` (one program per query block and query head, the online softmax of the Triton
   fused-attention tutorial) writes the output in the input dtype and the per-row log-sum-exp
   (fp32, log2 units). Decode (L == 1) uses `_decode_split` instead: the group's query heads
   share one program per KV head and key split (split-K, "flash decoding"), and `_decode_combine`
   merges the splits.
2. `_attn_score` (one program per key block and KV head) recomputes q.k for every query head of
   the group, turns it into exact probabilities with the final LSE, weights query t by
   beta**(L-1-t), sums over the queries per head and reduces the group (max or mean). Padded query
   rows (beyond L) and masked keys contribute exactly 0; everything accumulates in fp32.

Masks are explicit, so any slots count and any L work (neither needs to be a multiple of a block).
Block sizes are autotuned on CUDA; under TRITON_INTERPRET=1 (the CPU tests) one small config is used.
CASCADE_AUTOTUNE=0 keeps one config per kernel on CUDA too (the smallest tile, which fits every head
dim): autotuning compiles and times every config for every new shape key, which is what a speed run
wants and what a correctness run over many shapes cannot afford (the compiled kernel tests on a lent
GPU: 4 of 27 did not finish in 120 s, all of them autotuning).
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
AUTOTUNE = os.environ.get("CASCADE_AUTOTUNE", "1") not in ("", "0")
# Tuning results are kept on disk beside Triton's compiled kernels (Triton >= 3.2), so the next process
# (the app after a benchmark, the next `ask`) does not compile and time every config again: on the first
# lent GPU that warm-up, paid per shape key, was most of an 8k-token read.
TUNE_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def _configs(options, interpret=(16, 16), mode: str | None = None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) options as Triton configs, by mode:
    "interpret" (TRITON_INTERPRET=1): one tiny config; "fixed" (CASCADE_AUTOTUNE=0): the smallest tile
    of the options, fewest stages first; "autotune" (default on CUDA): all of them."""
    mode = mode or ("interpret" if INTERPRET else "autotune" if AUTOTUNE else "fixed")
    if mode == "interpret":
        return [triton.Config({"BLOCK_M": interpret[0], "BLOCK_N": interpret[1]}, num_warps=1, num_stages=1)]
    if mode == "fixed":
        options = [min(options, key=lambda o: (o[0] * o[1], o[3]))]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in options]


# the last config of each list is small enough for head_dim 256 in fp32 (shared memory)
FWD_CONFIGS = _configs([(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 1)])
SCORE_CONFIGS = _configs([(64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1)])
# one query row (decode): BLOCK_M stays at tl.dot's minimum
SCORE_DECODE_CONFIGS = _configs([(16, 64, 4, 2), (16, 128, 4, 2), (16, 256, 8, 2)])
DECODE_CONFIGS = _configs([(16, 64, 4, 2), (16, 128, 4, 2), (16, 64, 2, 3)])


def _prune(configs, named_args, **kwargs):
    """Large head dims (Gemma's 256): drop the biggest tiles, they do not fit in shared memory."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 0))  # constexprs arrive as keyword arguments
    if INTERPRET or block_d <= 128:
        return configs
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    return kept or configs[-1:]


# ------------------------------------------------------------------------------------------------
# pass 1: output + log-sum-exp
# ------------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """fp32-accumulated a @ b. PRECISION "upcast" (interpreter): Triton's CPU interpreter gets bf16
    dots wrong, so cast to fp32 first (exact: bf16 products fit in fp32, as on tensor cores)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _online_block(acc, m_i, l_i, q, K, V, offs_n, offs_d, n_ok, d_ok, skn, skd, svn, svd, allowed, bias,
                  qk_scale, PRECISION: tl.constexpr):
    """One key block of the online softmax: keys K + offs_n * skn (masked by n_ok), log2 units."""
    k = tl.load(K + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
    qk = _dot(q, k, PRECISION) * qk_scale + bias  # [BLOCK_M, BLOCK_N]
    qk = tl.where(allowed, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
    return acc, m_new, l_i


@triton.autotune(configs=FWD_CONFIGS, key=["L_KEY", "SLOTS_KEY", "BLOCK_D", "GROUP", "HAS_BIAS"],
                 prune_configs_by={"early_config_prune": _prune}, **TUNE_CACHE)
@triton.jit
def _attn_fwd(
    Q, KC, VC, VALID, KN, VN, BIAS, OUT, LSE,
    sqb, sqh, sqm, sqd,
    skcb, skch, skcn, skcd,
    svcb, svch, svcn, svcd,
    sknb, sknh, sknn, sknd,
    svnb, svnh, svnn, svnd,
    sob, soh, som, sod,
    sbm, sbn,
    qk_scale, Q_HEADS, SLOTS, L, L_KEY, SLOTS_KEY,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)  # b * Q_HEADS + h
    b = pid_bh // Q_HEADS
    h = pid_bh % Q_HEADS
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bias = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)

    # resident cache slots: every query sees every filled slot
    kc = KC + b * skcb + kvh * skch
    vc = VC + b * svcb + kvh * svch
    for start_n in range(0, SLOTS, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < SLOTS
        valid = tl.load(VALID + offs_n, mask=n_ok, other=0) != 0
        if HAS_BIAS:  # additive [L, slots + L] mask (natural-log units)
            bias = tl.load(BIAS + offs_m[:, None] * sbm + offs_n[None, :] * sbn,
                           mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32) * 1.4426950408889634
        acc, m_i, l_i = _online_block(acc, m_i, l_i, q, kc, vc, offs_n, offs_d, n_ok, d_ok, skcn, skcd, svcn, svcd,
                                      m_ok[:, None] & valid[None, :], bias, qk_scale, PRECISION)

    # the chunk itself, causally: key t is visible to the queries t' >= t
    kn = KN + b * sknb + kvh * sknh
    vn = VN + b * svnb + kvh * svnh
    hi = tl.minimum(L, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        if HAS_BIAS:
            bias = tl.load(BIAS + offs_m[:, None] * sbm + (SLOTS + offs_n[None, :]) * sbn,
                           mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32) * 1.4426950408889634
        allowed = m_ok[:, None] & n_ok[None, :] & (offs_n[None, :] <= offs_m[:, None])
        acc, m_i, l_i = _online_block(acc, m_i, l_i, q, kn, vn, offs_n, offs_d, n_ok, d_ok, sknn, sknd, svnn, svnd,
                                      allowed, bias, qk_scale, PRECISION)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    tl.store(OUT + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh * L + offs_m, lse, mask=m_ok)


# ------------------------------------------------------------------------------------------------
# pass 1 for decode (L == 1): split-K over the keys, the GQA group packed into the rows
# ------------------------------------------------------------------------------------------------


# not keyed on SPLIT: it follows the slots, which grow by one per answer token, so keying on it would
# re-time every config every few tokens of an answer; SLOTS_KEY (a power-of-two bucket) bounds it
@triton.autotune(configs=DECODE_CONFIGS, key=["SLOTS_KEY", "BLOCK_D", "GROUP"],
                 prune_configs_by={"early_config_prune": _prune}, **TUNE_CACHE)
@triton.jit
def _decode_split(
    Q, KC, VC, VALID, KN, VN, PART_O, PART_LSE,
    sqb, sqh, sqd,
    skcb, skch, skcn, skcd,
    svcb, svch, svcn, svcd,
    sknb, sknh, sknd,
    svnb, svnh, svnd,
    qk_scale, KV_HEADS, SLOTS, SPLIT, N_SPLITS, SLOTS_KEY,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (split s, b * KV_HEADS + kvh): rows are the group's query heads, keys are the cache
    slots [s * SPLIT, (s + 1) * SPLIT); the last split also takes the query's own key.
    Writes the split's normalised output and LSE (log2 units, -inf when it saw no key)."""
    pid_s = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = pid_bk // KV_HEADS
    kvh = pid_bk % KV_HEADS
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    h = kvh * GROUP + offs_g
    q = tl.load(Q + b * sqb + h[:, None] * sqh + offs_d[None, :] * sqd, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bias = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
    kc = KC + b * skcb + kvh * skch
    vc = VC + b * svcb + kvh * svch
    lo = pid_s * SPLIT
    hi = tl.minimum(SLOTS, lo + SPLIT)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        valid = tl.load(VALID + offs_n, mask=n_ok, other=0) != 0
        acc, m_i, l_i = _online_block(acc, m_i, l_i, q, kc, vc, offs_n, offs_d, n_ok, d_ok, skcn, skcd, svcn, svcd,
                                      g_ok[:, None] & valid[None, :], bias, qk_scale, PRECISION)
    if pid_s == N_SPLITS - 1:  # the query's own key (always visible)
        k = tl.load(KN + b * sknb + kvh * sknh + offs_d * sknd, mask=d_ok, other=0.0).to(tl.float32)
        v = tl.load(VN + b * svnb + kvh * svnh + offs_d * svnd, mask=d_ok, other=0.0).to(tl.float32)
        qk = tl.sum(q.to(tl.float32) * k[None, :], 1) * qk_scale
        m_new = tl.maximum(m_i, qk)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v[None, :]
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
    row = pid_bk * GROUP + offs_g  # [batch * q_heads] in (b, h) order
    tl.store(PART_O + (row[:, None] * N_SPLITS + pid_s) * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None],
             mask=g_ok[:, None] & d_ok[None, :])
    tl.store(PART_LSE + row * N_SPLITS + pid_s, lse, mask=g_ok)


@triton.jit
def _decode_combine(PART_O, PART_LSE, OUT, LSE, Q_HEADS, sob, soh, sod, N_SPLITS,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program (b * Q_HEADS + h): merge the splits' outputs by their LSEs."""
    row = tl.program_id(0)
    b = row // Q_HEADS
    h = row % Q_HEADS
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < N_SPLITS
    d_ok = offs_d < HEAD_DIM
    lse_s = tl.load(PART_LSE + row * N_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)  # finite: the last split always holds the query's own key
    w = tl.exp2(lse_s - m)
    total = tl.sum(w, 0)
    o = tl.load(PART_O + (row * N_SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / total
    tl.store(OUT + b * sob + h * soh + offs_d * sod, out.to(OUT.dtype.element_ty), mask=d_ok)
    tl.store(LSE + row, m + tl.log2(total))


# ------------------------------------------------------------------------------------------------
# pass 2: exact weighted per-key sums of the probabilities, reduced over the GQA group
# ------------------------------------------------------------------------------------------------


@triton.jit
def _column_sums(Q, LSE, W, k, valid, offs_n, b, kvh, sqb, sqh, sqm, sqd, qk_scale, Q_HEADS, L, m_start,
                 CAUSAL: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 REDUCE_MEAN: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """sum_t w_t * p_t(j) for the keys k ([BLOCK_D, BLOCK_N]) per query head, reduced over the group."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    reduced = tl.zeros([BLOCK_N], tl.float32)
    for g in range(GROUP):
        h = kvh * GROUP + g
        col = tl.zeros([BLOCK_N], tl.float32)
        for start_m in range(m_start, L, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < L
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                        mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(LSE + (b * Q_HEADS + h) * L + offs_m, mask=m_ok, other=0.0)
            w = tl.load(W + offs_m, mask=m_ok, other=0.0)
            qk = _dot(q, k, PRECISION) * qk_scale
            allowed = m_ok[:, None] & valid[None, :]
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
            p = tl.exp2(tl.where(allowed, qk - lse[:, None], float("-inf")))  # exact: final LSE
            col += tl.sum(p * w[:, None], 0)
        if REDUCE_MEAN:
            reduced += col
        else:
            reduced = tl.maximum(reduced, col)
    if REDUCE_MEAN:
        reduced = reduced / GROUP
    return reduced


@triton.jit
def _attn_score(
    Q, KC, VALID, KN, LSE, W, CACHE_SCORE, CHUNK_SCORE,
    sqb, sqh, sqm, sqd,
    skcb, skch, skcn, skcd,
    sknb, sknh, sknn, sknd,
    qk_scale, Q_HEADS, KV_HEADS, SLOTS, L, L_KEY, SLOTS_KEY,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, REDUCE_MEAN: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (key block, b * KV_HEADS + kvh): cache blocks first, then the chunk's key blocks."""
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = pid_bk // KV_HEADS
    kvh = pid_bk % KV_HEADS
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_cache_blocks = tl.cdiv(SLOTS, BLOCK_N)
    if pid_n < n_cache_blocks:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < SLOTS
        valid = (tl.load(VALID + offs_n, mask=n_ok, other=0) != 0) & n_ok
        k = tl.load(KC + b * skcb + kvh * skch + offs_n[None, :] * skcn + offs_d[:, None] * skcd,
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        score = _column_sums(Q, LSE, W, k, valid, offs_n, b, kvh, sqb, sqh, sqm, sqd, qk_scale, Q_HEADS, L, 0,
                             False, GROUP, HEAD_DIM, BLOCK_D, REDUCE_MEAN, PRECISION, BLOCK_M, BLOCK_N)
        tl.store(CACHE_SCORE + pid_bk * SLOTS + offs_n, score, mask=n_ok)
    else:
        start_n = (pid_n - n_cache_blocks) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        k = tl.load(KN + b * sknb + kvh * sknh + offs_n[None, :] * sknn + offs_d[:, None] * sknd,
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        m_start = (start_n // BLOCK_M) * BLOCK_M  # earlier queries cannot see these keys
        score = _column_sums(Q, LSE, W, k, n_ok, offs_n, b, kvh, sqb, sqh, sqm, sqd, qk_scale, Q_HEADS, L,
                             m_start, True, GROUP, HEAD_DIM, BLOCK_D, REDUCE_MEAN, PRECISION, BLOCK_M, BLOCK_N)
        tl.store(CHUNK_SCORE + pid_bk * L + offs_n, score, mask=n_ok)


_score_chunk = triton.autotune(configs=SCORE_CONFIGS, key=["L_KEY", "SLOTS_KEY", "BLOCK_D", "GROUP"],
                               prune_configs_by={"early_config_prune": _prune}, **TUNE_CACHE)(_attn_score)
_score_decode = triton.autotune(configs=SCORE_DECODE_CONFIGS, key=["L_KEY", "SLOTS_KEY", "BLOCK_D", "GROUP"],
                                prune_configs_by={"early_config_prune": _prune}, **TUNE_CACHE)(_attn_score)


# ------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------


def _bucket(n: int) -> int:
    """Autotuning key for a length: its power-of-two bucket (the full policy grows every chunk)."""
    return triton.next_power_of_2(max(1, n))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _decode_splits(slots: int, bk: int, device: torch.device) -> int:
    """How many key splits for decode: enough programs to fill the GPU, at least ~256 keys each."""
    if INTERPRET or device.type != "cuda":
        return max(1, min(3, triton.cdiv(slots, 16)))
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(triton.cdiv(slots, 256), triton.cdiv(2 * sms, bk), 128))


def _check(q: torch.Tensor) -> None:
    if not q.is_cuda and not INTERPRET:
        raise RuntimeError("the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before the first "
                           "import of engine.kernels.triton_attention (CPU tests)")


def chunk_attention(q, k_cache, v_cache, cache_valid, k_chunk, v_chunk, scaling, weights=None, head_reduce="max",
                    window_bias=None):
    """Triton version of engine.attention.chunk_attention (same arguments and results).

    window_bias ([L, slots + L] additive mask of a sliding-window layer) is supported without scores.
    """
    _check(q)
    if head_reduce not in ("max", "mean"):
        raise ValueError(f"head_reduce must be 'max' or 'mean', not {head_reduce!r}")
    if window_bias is not None and weights is not None:
        raise ValueError("window_bias is only supported without scores")
    batch, q_heads, length, head_dim = q.shape
    kv_heads, slots = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    # fp32 inputs: exact fp32 dots (no tf32); bf16/fp16: tensor cores with fp32 accumulation
    precision = "upcast" if INTERPRET else ("ieee" if q.dtype == torch.float32 else "tf32")
    qk_scale = float(scaling) * LOG2E
    valid = cache_valid.to(device=q.device, dtype=torch.uint8)
    if slots == 0:  # keep a real allocation behind every pointer
        valid = torch.zeros(1, dtype=torch.uint8, device=q.device)
        k_cache = v_cache = torch.zeros(batch, kv_heads, 1, head_dim, dtype=q.dtype, device=q.device)
    out = torch.empty(batch, q_heads, length, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, q_heads, length, dtype=torch.float32, device=q.device)
    common = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, PRECISION=precision)

    if length == 1 and window_bias is None:
        n_splits = _decode_splits(slots, batch * kv_heads, q.device)
        split = triton.cdiv(slots, n_splits) if slots else 0
        part_o = torch.empty(batch * q_heads, n_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch * q_heads, n_splits, dtype=torch.float32, device=q.device)
        _decode_split[(n_splits, batch * kv_heads)](
            q, k_cache, v_cache, valid, k_chunk, v_chunk, part_o, part_lse,
            q.stride(0), q.stride(1), q.stride(3),
            *k_cache.stride(), *v_cache.stride(),
            k_chunk.stride(0), k_chunk.stride(1), k_chunk.stride(3),
            v_chunk.stride(0), v_chunk.stride(1), v_chunk.stride(3),
            qk_scale, kv_heads, slots, split, n_splits, _bucket(slots),
            BLOCK_G=max(16, triton.next_power_of_2(group)), **common)
        _decode_combine[(batch * q_heads,)](
            part_o, part_lse, out, lse, q_heads, out.stride(0), out.stride(1), out.stride(3), n_splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(n_splits)))
    else:
        bias = window_bias if window_bias is not None else lse  # a dummy pointer when unused
        grid = lambda meta: (triton.cdiv(length, meta["BLOCK_M"]), batch * q_heads)  # noqa: E731
        _attn_fwd[grid](
            q, k_cache, v_cache, valid, k_chunk, v_chunk, bias, out, lse,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *k_chunk.stride(), *v_chunk.stride(), *out.stride(),
            bias.stride(0) if window_bias is not None else 0, bias.stride(1) if window_bias is not None else 0,
            qk_scale, q_heads, slots, length, _bucket(length), _bucket(slots),
            HAS_BIAS=window_bias is not None, **common)
    if weights is None:
        return out, None, None

    weights = weights.to(device=q.device, dtype=torch.float32).contiguous()
    cache_score = torch.empty(batch, kv_heads, slots, dtype=torch.float32, device=q.device)
    chunk_score = torch.empty(batch, kv_heads, length, dtype=torch.float32, device=q.device)
    kernel = _score_decode if length == 1 else _score_chunk
    grid = lambda meta: (triton.cdiv(slots, meta["BLOCK_N"]) + triton.cdiv(length, meta["BLOCK_N"]),  # noqa: E731
                         batch * kv_heads)
    kernel[grid](
        q, k_cache, valid, k_chunk, lse, weights, cache_score, chunk_score,
        *q.stride(), *k_cache.stride(), *k_chunk.stride(),
        qk_scale, q_heads, kv_heads, slots, length, _bucket(length), _bucket(slots),
        REDUCE_MEAN=head_reduce == "mean", **common)
    return out, cache_score, chunk_score
