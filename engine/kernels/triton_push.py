"""Triton cascade push: one launch per cascade level resolves the score contests and ring-writes the
winners (the CUDA path of `CascadeCache._push_level`, which stays the readable oracle).

The acceptance schedule is a function of token index only, so `CascadeCache.plan` has already
computed, once per chunk and shared by every layer and head, which candidates compete in which
group, which resident slots are evicted and where the surviving winners go (`LevelPlan`). What is
left per layer and KV head is the contest itself (the highest score of each group wins, ties to the
newer candidate) and the data movement; one program per (batch row, KV head) does both, in the
torch path's order, with barriers between the phases that touch the same slots:

1. winners: for every group, the index of its best candidate -> scratch;
2. the incumbent's contest is settled in place (the group-0 winner goes to the newest resident slot);
3. evicted tokens (the oldest residents, then accepted winners that do not fit) are copied out;
   they are the offers to the next cascade;
4. the remaining winners are written into the ring.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..cache import CascadeCache, LevelPlan, Tokens

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BLOCK_T = 16 if INTERPRET else 32  # tokens per step


@triton.jit
def _copy_tokens(src_idx, dst_idx, ok, SK, SV, SS, SP, ssk, ssv, sss, ssp, DK, DV, DS, DP, dsk, dsv, dss, dsp,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[dst_idx] = src[src_idx] for key, value, score, position (base pointers of one head)."""
    offs_d = tl.arange(0, BLOCK_D)
    m2 = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(SK + src_idx[:, None] * ssk + offs_d[None, :], mask=m2)
    v = tl.load(SV + src_idx[:, None] * ssv + offs_d[None, :], mask=m2)
    s = tl.load(SS + src_idx * sss, mask=ok)
    p = tl.load(SP + src_idx * ssp, mask=ok)
    tl.store(DK + dst_idx[:, None] * dsk + offs_d[None, :], k, mask=m2)
    tl.store(DV + dst_idx[:, None] * dsv + offs_d[None, :], v, mask=m2)
    tl.store(DS + dst_idx * dss, s, mask=ok)
    tl.store(DP + dst_idx * dsp, p, mask=ok)


@triton.jit
def _push_level_kernel(
    K, V, S, P, skb, skh, skn, svb, svh, svn, ssb, ssh, ssn, spb, sph, spn,  # layer storage, level at BASE
    OK, OV, OS, OP, sokb, sokh, sokn, sovb, sovh, sovn, sosb, sosh, sosn, sopb, soph, sopn,  # offers
    EK, EV, ES, EP,  # evicted out: [B, H, E1 + E2, D] / [B, H, E1 + E2], contiguous
    GROUP_START, EVICT_RES, WRITE_NEW, WRITE_SLOT, WIN,
    KV_HEADS, BASE, INC, INCUMBENT, N_GROUPS, E1, E2, N_WRITE,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // KV_HEADS
    h = pid % KV_HEADS
    lk, lv, ls, lp = K + b * skb + h * skh + BASE * skn, V + b * svb + h * svh + BASE * svn, \
        S + b * ssb + h * ssh + BASE * ssn, P + b * spb + h * sph + BASE * spn
    ok_, ov_, os_, op_ = OK + b * sokb + h * sokh, OV + b * sovb + h * sovh, OS + b * sosb + h * sosh, \
        OP + b * sopb + h * soph
    n_out = E1 + E2
    ek, ev, es, ep = EK + pid * n_out * HEAD_DIM, EV + pid * n_out * HEAD_DIM, ES + pid * n_out, EP + pid * n_out
    win = WIN + pid * N_GROUPS
    offs_t = tl.arange(0, BLOCK_T)
    inc_score = tl.load(ls + INCUMBENT * ssn)  # only used when INC (INCUMBENT is 0 otherwise)

    # 1. winners: highest score per group, ties to the later (newer) candidate
    for g0 in range(0, N_GROUPS, BLOCK_T):
        offs_g = g0 + offs_t
        g_ok = offs_g < N_GROUPS
        start = tl.load(GROUP_START + offs_g, mask=g_ok, other=0)
        end = tl.load(GROUP_START + offs_g + 1, mask=g_ok, other=0)
        longest = tl.max(end - start, 0)
        best_s = tl.full([BLOCK_T], float("-inf"), tl.float32)
        best_i = start
        for j in range(0, longest):
            idx = start + j
            ok = g_ok & (idx < end)
            is_inc = idx < INC  # candidate 0 is the incumbent when there is one
            s = tl.load(os_ + (idx - INC) * sosn, mask=ok & ~is_inc, other=float("-inf"))
            s = tl.where(is_inc, inc_score, s)
            better = ok & (s >= best_s)
            best_s = tl.where(better, s, best_s)
            best_i = tl.where(better, idx, best_i)
        tl.store(win + offs_g, best_i, mask=g_ok)
    tl.debug_barrier()

    # 2. the newest resident's contest, settled in place (a candidate > 0 is an offer)
    if INC == 1:
        w0 = tl.load(win + offs_t * 0)  # group 0's winner, broadcast
        ok = (offs_t == 0) & (w0 > 0)
        _copy_tokens(w0 - 1, offs_t * 0 + INCUMBENT, ok, ok_, ov_, os_, op_, sokn, sovn, sosn, sopn,
                     lk, lv, ls, lp, skn, svn, ssn, spn, HEAD_DIM, BLOCK_D)
    tl.debug_barrier()

    # 3. evicted: the oldest residents, then the first E2 accepted winners (oldest first)
    for r0 in range(0, E1, BLOCK_T):
        offs = r0 + offs_t
        ok = offs < E1
        slot = tl.load(EVICT_RES + offs, mask=ok, other=0)
        _copy_tokens(slot, offs, ok, lk, lv, ls, lp, skn, svn, ssn, spn,
                     ek, ev, es, ep, HEAD_DIM, HEAD_DIM, 1, 1, HEAD_DIM, BLOCK_D)
    for k0 in range(0, E2, BLOCK_T):
        offs = k0 + offs_t
        ok = offs < E2
        cand = tl.load(win + INC + offs, mask=ok, other=0)
        _copy_tokens(cand - INC, E1 + offs, ok, ok_, ov_, os_, op_, sokn, sovn, sosn, sopn,
                     ek, ev, es, ep, HEAD_DIM, HEAD_DIM, 1, 1, HEAD_DIM, BLOCK_D)
    tl.debug_barrier()

    # 4. the winners that stay, into the ring
    for i0 in range(0, N_WRITE, BLOCK_T):
        offs = i0 + offs_t
        ok = offs < N_WRITE
        k = tl.load(WRITE_NEW + offs, mask=ok, other=0)
        slot = tl.load(WRITE_SLOT + offs, mask=ok, other=0)
        cand = tl.load(win + INC + k, mask=ok, other=0)
        _copy_tokens(cand - INC, slot, ok, ok_, ov_, os_, op_, sokn, sovn, sosn, sopn,
                     lk, lv, ls, lp, skn, svn, ssn, spn, HEAD_DIM, BLOCK_D)


def push_level(keys, values, score, pos, lv: LevelPlan, offers: Tokens) -> Tokens:
    """In place on one layer's storage ([batch, kv_heads, slots, head_dim] keys/values,
    [batch, kv_heads, slots] score/pos); returns the evicted tokens, oldest first."""
    batch, kv_heads, _, head_dim = keys.shape
    inc = int(lv.incumbent is not None)
    e1, e2, n_write = len(lv.evict_resident), len(lv.evict_new), len(lv.write_new)
    n = e1 + e2
    out = Tokens(keys.new_empty(batch, kv_heads, n, head_dim), values.new_empty(batch, kv_heads, n, head_dim),
                 score.new_empty(batch, kv_heads, n), pos.new_empty(batch, kv_heads, n))
    if lv.n_groups == 0:
        return out
    for t in (keys, values, offers.keys, offers.values):
        if t.stride(-1) != 1:
            raise ValueError("push_level needs head_dim-contiguous keys and values")
    group = lv.group
    group_start = torch.searchsorted(group, torch.arange(lv.n_groups + 1, device=group.device, dtype=group.dtype))
    win = torch.empty(batch * kv_heads, lv.n_groups, dtype=torch.int64, device=keys.device)
    _push_level_kernel[(batch * kv_heads,)](
        keys, values, score, pos, keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), *score.stride(), *pos.stride(),
        offers.keys, offers.values, offers.score, offers.pos,
        offers.keys.stride(0), offers.keys.stride(1), offers.keys.stride(2),
        offers.values.stride(0), offers.values.stride(1), offers.values.stride(2),
        *offers.score.stride(), *offers.pos.stride(),
        out.keys, out.values, out.score, out.pos,
        group_start, lv.evict_resident, lv.write_new, lv.write_slot, win,
        kv_heads, lv.base, inc, lv.incumbent if inc else 0, lv.n_groups, e1, e2, n_write,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_T=BLOCK_T)
    return out


def push(cache: CascadeCache, layer: int, plan, keys, values, cache_score, chunk_score) -> None:
    """`CascadeCache.push` with the per-level contests and ring writes in Triton (same results)."""
    if not keys.is_cuda and not INTERPRET:
        raise RuntimeError("the Triton push needs CUDA tensors, or TRITON_INTERPRET=1 (CPU tests)")
    L, S = plan.length, cache.config.sinks
    score = cache.score[layer]
    if cache_score is not None:  # EMA over the chunk: s = beta**L * s + sum_t beta**(L-1-t) a_t
        score[..., S:] = score[..., S:] * (cache.config.beta ** L) + cache_score[..., S:]
    if chunk_score is None:
        chunk_score = torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)
    pos = plan.original_pos.expand(cache.batch, cache.kv_heads, L)
    k = plan.n_sink_new
    if k:
        sink_slots = plan.original_pos[:k]
        for store, src in ((cache.keys, keys), (cache.values, values), (cache.pos, pos)):
            store[layer][:, :, sink_slots] = src[:, :, :k]
    keys, values = keys[:, :, k:], values[:, :, k:]
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    if values.stride(-1) != 1:
        values = values.contiguous()
    offers = Tokens(keys, values, chunk_score[:, :, k:], pos[:, :, k:])
    for lv in plan.levels:
        offers = push_level(cache.keys[layer], cache.values[layer], score, cache.pos[layer], lv, offers)
