"""Triton cascade push: one launch per cascade level resolves the score contests and ring-writes the
winners (the CUDA path of `CascadeCache._push_level`; `engine.push_rule` is the readable rule).

The acceptance schedule is a function of token index only, so `CascadeCache.plan` has already
computed, once per chunk and shared by every layer and head, which candidate blocks compete in which
group, which resident slots are evicted and where the surviving winners go (`LevelPlan`); the
offers that complete cascade 0's newest block are written by torch before the launch
(`CascadeCache.fill`). What is left per layer and KV head is the contest itself (the block with the
highest token score of each group wins, ties to the newer block) and the data movement; one program
per (batch row, KV head) does both, in the torch path's order, with barriers between the phases
that touch the same slots:

1. winners: for every group, the index of its best block -> scratch;
2. the incumbent block's contest is settled in place (group 0's winning tokens go to its slots);
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
def _winner_token(m, ok, win, WIN_GROUP, WIN_OFFSET, BLOCK_START):
    """Candidate index of winner token m: the first candidate of its group's winning block + its offset."""
    group = tl.load(WIN_GROUP + m, mask=ok, other=0)
    block = tl.load(win + group, mask=ok, other=0)
    return tl.load(BLOCK_START + block, mask=ok, other=0) + tl.load(WIN_OFFSET + m, mask=ok, other=0)


@triton.jit
def _push_level_kernel(
    K, V, S, P, skb, skh, skn, svb, svh, svn, ssb, ssh, ssn, spb, sph, spn,  # layer storage, level at BASE
    OK, OV, OS, OP, sokb, sokh, sokn, sovb, sovh, sovn, sosb, sosh, sosn, sopb, soph, sopn,  # offers
    EK, EV, ES, EP,  # evicted out: [B, H, E1 + E2, D] / [B, H, E1 + E2], contiguous
    GROUP_START, BLOCK_START, INC_SLOTS, WIN_GROUP, WIN_OFFSET, EVICT_RES, WRITE_NEW, WRITE_SLOT, WIN,
    KV_HEADS, BASE, N_INC, BLOCK, N_GROUPS, E1, E2, N_WRITE,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_SUM: tl.constexpr,
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

    # 1. winners: the block with the best score per group (its best token's, or with BLOCK_SUM the sum of its
    # tokens'), ties to the later (newer) block
    for g0 in range(0, N_GROUPS, BLOCK_T):
        offs_g = g0 + offs_t
        g_ok = offs_g < N_GROUPS
        start = tl.load(GROUP_START + offs_g, mask=g_ok, other=0)
        end = tl.load(GROUP_START + offs_g + 1, mask=g_ok, other=0)
        longest = tl.max(end - start, 0)
        best_s = tl.full([BLOCK_T], float("-inf"), tl.float32)
        best_b = start
        for j in range(0, longest):
            blk = start + j
            ok = g_ok & (blk < end)
            first = tl.load(BLOCK_START + blk, mask=ok, other=0)
            stop = tl.load(BLOCK_START + blk + 1, mask=ok, other=0)
            s_blk = tl.full([BLOCK_T], 0.0 if BLOCK_SUM else float("-inf"), tl.float32)
            for k in range(0, BLOCK):
                idx = first + k
                t_ok = ok & (idx < stop)
                is_inc = idx < N_INC  # candidates 0 .. N_INC - 1 are the incumbent block's tokens
                slot = tl.load(INC_SLOTS + idx, mask=t_ok & is_inc, other=0)
                s_inc = tl.load(ls + slot * ssn, mask=t_ok & is_inc, other=float("-inf"))
                s = tl.load(os_ + (idx - N_INC) * sosn, mask=t_ok & ~is_inc, other=float("-inf"))
                s_tok = tl.where(is_inc, s_inc, s)
                if BLOCK_SUM:
                    s_blk += tl.where(t_ok, s_tok, 0.0)
                else:
                    s_blk = tl.maximum(s_blk, s_tok)
            better = ok & (s_blk >= best_s)
            best_s = tl.where(better, s_blk, best_s)
            best_b = tl.where(better, blk, best_b)
        tl.store(win + offs_g, best_b, mask=g_ok)
    tl.debug_barrier()

    # 2. the newest resident block's contest, settled in place (a candidate >= N_INC is an offer)
    for m0 in range(0, N_INC, BLOCK_T):
        offs = m0 + offs_t
        in_group = offs < N_INC
        cand = _winner_token(offs, in_group, win, WIN_GROUP, WIN_OFFSET, BLOCK_START)
        ok = in_group & (cand >= N_INC)
        slot = tl.load(INC_SLOTS + offs, mask=ok, other=0)
        _copy_tokens(cand - N_INC, slot, ok, ok_, ov_, os_, op_, sokn, sovn, sosn, sopn,
                     lk, lv, ls, lp, skn, svn, ssn, spn, HEAD_DIM, BLOCK_D)
    tl.debug_barrier()

    # 3. evicted: the oldest residents, then the first E2 accepted winner tokens (oldest first)
    for r0 in range(0, E1, BLOCK_T):
        offs = r0 + offs_t
        ok = offs < E1
        slot = tl.load(EVICT_RES + offs, mask=ok, other=0)
        _copy_tokens(slot, offs, ok, lk, lv, ls, lp, skn, svn, ssn, spn,
                     ek, ev, es, ep, HEAD_DIM, HEAD_DIM, 1, 1, HEAD_DIM, BLOCK_D)
    for k0 in range(0, E2, BLOCK_T):
        offs = k0 + offs_t
        ok = offs < E2
        cand = _winner_token(N_INC + offs, ok, win, WIN_GROUP, WIN_OFFSET, BLOCK_START)
        _copy_tokens(cand - N_INC, E1 + offs, ok, ok_, ov_, os_, op_, sokn, sovn, sosn, sopn,
                     ek, ev, es, ep, HEAD_DIM, HEAD_DIM, 1, 1, HEAD_DIM, BLOCK_D)
    tl.debug_barrier()

    # 4. the winners that stay, into the ring
    for i0 in range(0, N_WRITE, BLOCK_T):
        offs = i0 + offs_t
        ok = offs < N_WRITE
        k = tl.load(WRITE_NEW + offs, mask=ok, other=0)
        slot = tl.load(WRITE_SLOT + offs, mask=ok, other=0)
        cand = _winner_token(N_INC + k, ok, win, WIN_GROUP, WIN_OFFSET, BLOCK_START)
        _copy_tokens(cand - N_INC, slot, ok, ok_, ov_, os_, op_, sokn, sovn, sosn, sopn,
                     lk, lv, ls, lp, skn, svn, ssn, spn, HEAD_DIM, BLOCK_D)


def push_level(keys, values, score, pos, lv: LevelPlan, offers: Tokens, block: int,
               block_score: str = "max") -> Tokens:
    """In place on one layer's storage ([batch, kv_heads, slots, head_dim] keys/values,
    [batch, kv_heads, slots] score/pos), after `CascadeCache.fill`; returns the evicted tokens, oldest first."""
    batch, kv_heads, _, head_dim = keys.shape
    e1, e2, n_write = len(lv.evict_resident), len(lv.evict_new), len(lv.write_new)
    n = e1 + e2
    out = Tokens(keys.new_empty(batch, kv_heads, n, head_dim), values.new_empty(batch, kv_heads, n, head_dim),
                 score.new_empty(batch, kv_heads, n), pos.new_empty(batch, kv_heads, n))
    if lv.n_groups == 0:
        return out
    for t in (keys, values, offers.keys, offers.values):
        if t.stride(-1) != 1:
            raise ValueError("push_level needs head_dim-contiguous keys and values")
    group = lv.block_group
    group_start = torch.searchsorted(group, torch.arange(lv.n_groups + 1, device=group.device, dtype=group.dtype))
    inc_slots = lv.incumbent if lv.incumbent is not None else lv.block_start[:1]  # never read without an incumbent
    win = torch.empty(batch * kv_heads, lv.n_groups, dtype=torch.int64, device=keys.device)
    _push_level_kernel[(batch * kv_heads,)](
        keys, values, score, pos, keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), *score.stride(), *pos.stride(),
        offers.keys, offers.values, offers.score, offers.pos,
        offers.keys.stride(0), offers.keys.stride(1), offers.keys.stride(2),
        offers.values.stride(0), offers.values.stride(1), offers.values.stride(2),
        *offers.score.stride(), *offers.pos.stride(),
        out.keys, out.values, out.score, out.pos,
        group_start, lv.block_start, inc_slots, lv.win_group, lv.win_offset, lv.evict_resident, lv.write_new,
        lv.write_slot, win,
        kv_heads, lv.base, lv.n_incumbent, block, lv.n_groups, e1, e2, n_write,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_T=BLOCK_T,
        BLOCK_SUM=block_score == "sum")
    return out


def push(cache: CascadeCache, layer: int, plan, keys, values, cache_score, chunk_score) -> None:
    """`CascadeCache.push` with the per-level contests and ring writes in Triton (same results)."""
    if not keys.is_cuda and not INTERPRET:
        raise RuntimeError("the Triton push needs CUDA tensors, or TRITON_INTERPRET=1 (CPU tests)")
    offers = cache.start_push(layer, plan, keys, values, cache_score, chunk_score)
    for lv in plan.levels:
        offers = cache.fill(cache.level_view(layer, lv), lv, offers)
        offers = push_level(cache.keys[layer], cache.values[layer], cache.score[layer], cache.pos[layer], lv,
                            offers, cache.block, cache.config.block_score)
