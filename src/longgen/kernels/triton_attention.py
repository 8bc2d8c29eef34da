"""Triton kernels for attention under a static sparse pattern: forward, dQ, and dK/dV.

FlashAttention-2 tiling with an online softmax, reading top to bottom:

* Rows. The query heads of one KV group are packed into the rows of a tile: row ``r`` of a sequence is query
  position ``r // G`` of query head ``g * G + r % G``. K/V tiles are loaded once per group, and the dK/dV
  kernel sums over the group in registers (no repeated K/V, no atomics).
* Sequences. Every call is a set of packed sequences (``starts``, ``lens``); a batched input is equal-length
  packed sequences. Positions restart at 0 in each sequence.
* Patterns. Which key tiles a query tile visits (and which query tiles a key tile is visited by) is computed
  arithmetically for Full, SinkWindow and BlockSparse; BlockLayout uses a compact tile index built on the host.
  Inside a visited tile, `_allowed` (the same formulas as `longgen.patterns`) masks exactly, and only tiles
  that straddle an edge evaluate it.
* Load balance. dK/dV programs are launched tile-major with the longest columns first (BlockSparse's strided
  blocks, SinkWindow's sink tile), so a few long columns never run last.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from longgen.kernels.inputs import TRITON_HEAD_DIMS, AttentionShape
from longgen.patterns import BlockLayout, BlockSparse, Full, SinkWindow

FULL, SINK_WINDOW, BLOCK_SPARSE, LAYOUT = 0, 1, 2, 3
LOG2E = 1.4426950408889634


# -------------------------------------------------------------------------------------------------------------
# pattern semantics and iteration, shared by all three kernels
@triton.jit
def _allowed(t, s, g, L, SINK, WINDOW, PB, LOCAL, STRIDE, STEP, DENSE_FROM, LAY, lay_sh, lay_si, PATTERN: tl.constexpr):
    """Exact mask for query positions t (column) and key positions s (row) of KV head g; both < L."""
    ok = (s <= t) & (s < L) & (t < L)
    if PATTERN == SINK_WINDOW:
        ok = ok & ((s < SINK) | (t - s < WINDOW))
    elif PATTERN == BLOCK_SPARSE:
        i = t // PB
        j = s // PB
        ok = ok & (((i - j) < LOCAL) | (((j + g * STEP) % STRIDE) == 0) | (g >= DENSE_FROM))
    elif PATTERN == LAYOUT:
        bits = tl.load(LAY + g * lay_sh + (t // PB) * lay_si + s // PB, mask=ok, other=0)
        ok = ok & (bits != 0)
    return ok


@triton.jit
def _needs_mask(qs, qe, ks, ke, L, g, SINK, WINDOW, PB, LOCAL, STRIDE, STEP, DENSE_FROM, PATTERN: tl.constexpr):
    """Does the tile (query positions [qs, qe), key positions [ks, ke)) hold any pair that is not allowed?"""
    need = (ke - 1 > qs) | (ke > L) | (qe > L)
    if PATTERN == SINK_WINDOW:
        need = need | ((ke > SINK) & (qe - 1 - ks >= WINDOW))
    elif PATTERN == BLOCK_SPARSE:
        jb = ks // PB  # key tiles never straddle pattern blocks (BLOCK_N <= PB)
        not_strided = ((jb + g * STEP) % STRIDE) != 0
        need = need | ((g < DENSE_FROM) & not_strided & ((qe - 1) // PB - jb >= LOCAL))
    elif PATTERN == LAYOUT:
        need = need | (ks >= 0)  # layouts always mask inside visited tiles
    return need


@triton.jit
def _strided_blocks(g, qs, PB, LOCAL, STRIDE, STEP, DENSE_FROM):
    """For a query tile starting at qs: the count of strided blocks before the local range, and the first local
    block (dense heads: no strided loop, local range from 0)."""
    local_lo = tl.maximum(qs // PB - LOCAL + 1, 0)
    j0 = (STRIDE - (g * STEP) % STRIDE) % STRIDE
    n = tl.maximum((local_lo - j0 + STRIDE - 1) // STRIDE, 0)
    dense = g >= DENSE_FROM
    n = tl.where(dense, 0, n)
    local_lo = tl.where(dense, 0, local_lo)
    return n, local_lo


@triton.jit
def _key_ranges(
    g, qs, qe, L, SINK, WINDOW, PB, LOCAL, STRIDE, STEP, DENSE_FROM, BLOCK_N: tl.constexpr, PATTERN: tl.constexpr
):
    """Key tiles a query tile visits, as (first loop: a tile count for the 'far' tiles), (second loop range).

    Far tiles: SinkWindow's sink tiles (tile u -> tile u), BlockSparse's strided tiles (u -> block
    j0 + (u // SUB) * STRIDE, sub-tile u % SUB). Near tiles: a contiguous range [lo, hi).
    """
    hi = (qe + BLOCK_N - 1) // BLOCK_N
    n_far = 0
    lo = 0
    if PATTERN == SINK_WINDOW:
        n_far = tl.minimum((tl.minimum(SINK, qe) + BLOCK_N - 1) // BLOCK_N, hi)
        lo = tl.maximum(n_far, tl.maximum(qs - WINDOW + 1, 0) // BLOCK_N)
    elif PATTERN == BLOCK_SPARSE:
        n_blocks, local_lo = _strided_blocks(g, qs, PB, LOCAL, STRIDE, STEP, DENSE_FROM)
        n_far = n_blocks * (PB // BLOCK_N)
        lo = local_lo * (PB // BLOCK_N)
    return n_far, lo, hi


@triton.jit
def _far_tile(u, g, SINK, PB, LOCAL, STRIDE, STEP, DENSE_FROM, BLOCK_N: tl.constexpr, PATTERN: tl.constexpr):
    kt = u
    if PATTERN == BLOCK_SPARSE:
        sub = PB // BLOCK_N
        j0 = (STRIDE - (g * STEP) % STRIDE) % STRIDE
        kt = (j0 + (u // sub) * STRIDE) * sub + u % sub
    return kt


# -------------------------------------------------------------------------------------------------------------
# forward
@triton.jit
def _fwd_tile(
    acc,
    m_i,
    l_i,
    q,
    t,
    g,
    L,
    kt,
    K,
    V,
    skt,
    svt,
    offs_n,
    offs_d,
    qs,
    qe,
    qk_scale,
    SINK,
    WINDOW,
    PB,
    LOCAL,
    STRIDE,
    STEP,
    DENSE_FROM,
    LAY,
    lay_sh,
    lay_si,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PATTERN: tl.constexpr,
):
    ks = kt * BLOCK_N
    s = ks + offs_n
    dmask = offs_d[None, :] < HEAD_DIM
    k = tl.load(K + s[:, None] * skt + offs_d[None, :], mask=(s[:, None] < L) & dmask, other=0.0)
    v = tl.load(V + s[:, None] * svt + offs_d[None, :], mask=(s[:, None] < L) & dmask, other=0.0)
    qk = tl.dot(q, tl.trans(k)) * qk_scale
    if _needs_mask(qs, qe, ks, ks + BLOCK_N, L, g, SINK, WINDOW, PB, LOCAL, STRIDE, STEP, DENSE_FROM, PATTERN):
        ok = _allowed(
            t[:, None],
            s[None, :],
            g,
            L,
            SINK,
            WINDOW,
            PB,
            LOCAL,
            STRIDE,
            STEP,
            DENSE_FROM,
            LAY,
            lay_sh,
            lay_si,
            PATTERN,
        )
        qk = tl.where(ok, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet (edge tiles)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    STARTS,
    LENS,
    sqt,
    sqh,
    skt,
    skh,
    svt,
    svh,
    sot,
    soh,
    slt,
    qk_scale,
    G,
    SINK,
    WINDOW,
    PB,
    LOCAL,
    STRIDE,
    STEP,
    DENSE_FROM,
    LAY,
    lay_sh,
    lay_si,
    IDX,
    CNT,
    idx_sh,
    idx_sm,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PATTERN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    seq = tl.program_id(2)
    start = tl.load(STARTS + seq)
    L = tl.load(LENS + seq)
    row0 = pid_m * BLOCK_M
    if row0 >= L * G:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    t = rows // G
    head = g * G + rows % G
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = t < L
    qs = row0 // G
    qe = tl.minimum((row0 + BLOCK_M - 1) // G + 1, L)
    q_ptrs = Q + (start + t)[:, None] * sqt + head[:, None] * sqh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    Kg = K + start * skt + g * skh
    Vg = V + start * svt + g * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if PATTERN == LAYOUT:
        cnt = tl.load(CNT + g * idx_sh + pid_m)
        for u in range(cnt):
            kt = tl.load(IDX + g * idx_sh * idx_sm + pid_m * idx_sm + u)
            acc, m_i, l_i = _fwd_tile(
                acc,
                m_i,
                l_i,
                q,
                t,
                g,
                L,
                kt,
                Kg,
                Vg,
                skt,
                svt,
                offs_n,
                offs_d,
                qs,
                qe,
                qk_scale,
                SINK,
                WINDOW,
                PB,
                LOCAL,
                STRIDE,
                STEP,
                DENSE_FROM,
                LAY,
                lay_sh,
                lay_si,
                HEAD_DIM,
                BLOCK_N,
                PATTERN,
            )
    else:
        n_far, lo, hi = _key_ranges(g, qs, qe, L, SINK, WINDOW, PB, LOCAL, STRIDE, STEP, DENSE_FROM, BLOCK_N, PATTERN)
        for u in range(n_far):
            kt = _far_tile(u, g, SINK, PB, LOCAL, STRIDE, STEP, DENSE_FROM, BLOCK_N, PATTERN)
            acc, m_i, l_i = _fwd_tile(
                acc,
                m_i,
                l_i,
                q,
                t,
                g,
                L,
                kt,
                Kg,
                Vg,
                skt,
                svt,
                offs_n,
                offs_d,
                qs,
                qe,
                qk_scale,
                SINK,
                WINDOW,
                PB,
                LOCAL,
                STRIDE,
                STEP,
                DENSE_FROM,
                LAY,
                lay_sh,
                lay_si,
                HEAD_DIM,
                BLOCK_N,
                PATTERN,
            )
        for kt in range(lo, hi):
            acc, m_i, l_i = _fwd_tile(
                acc,
                m_i,
                l_i,
                q,
                t,
                g,
                L,
                kt,
                Kg,
                Vg,
                skt,
                svt,
                offs_n,
                offs_d,
                qs,
                qe,
                qk_scale,
                SINK,
                WINDOW,
                PB,
                LOCAL,
                STRIDE,
                STEP,
                DENSE_FROM,
                LAY,
                lay_sh,
                lay_si,
                HEAD_DIM,
                BLOCK_N,
                PATTERN,
            )
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + (start + t)[:, None] * sot + head[:, None] * soh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    # log-sum-exp in log2 units of the scaled scores; the launcher converts it to natural log
    tl.store(LSE + (start + t) * slt + head, m_i + tl.math.log2(l_safe), mask=row_ok)


# -------------------------------------------------------------------------------------------------------------
# backward: dQ (iterates like the forward) and dK/dV (iterates over the query tiles that see a key tile)
@triton.jit
def _dq_tile(
    dq,
    q,
    do,
    lse,
    delta,
    t,
    g,
    L,
    kt,
    K,
    V,
    skt,
    svt,
    offs_n,
    offs_d,
    qs,
    qe,
    qk_scale,
    SINK,
    WINDOW,
    PB,
    LOCAL,
    STRIDE,
    STEP,
    DENSE_FROM,
    LAY,
    lay_sh,
    lay_si,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PATTERN: tl.constexpr,
):
    ks = kt * BLOCK_N
    s = ks + offs_n
    dmask = offs_d[None, :] < HEAD_DIM
    k = tl.load(K + s[:, None] * skt + offs_d[None, :], mask=(s[:, None] < L) & dmask, other=0.0)
    v = tl.load(V + s[:, None] * svt + offs_d[None, :], mask=(s[:, None] < L) & dmask, other=0.0)
    qk = tl.dot(q, tl.trans(k)) * qk_scale
    p = tl.math.exp2(qk - lse[:, None])
    if _needs_mask(qs, qe, ks, ks + BLOCK_N, L, g, SINK, WINDOW, PB, LOCAL, STRIDE, STEP, DENSE_FROM, PATTERN):
        ok = _allowed(
            t[:, None],
            s[None, :],
            g,
            L,
            SINK,
            WINDOW,
            PB,
            LOCAL,
            STRIDE,
            STEP,
            DENSE_FROM,
            LAY,
            lay_sh,
            lay_si,
            PATTERN,
        )
        p = tl.where(ok, p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    STARTS,
    LENS,
    sqt,
    sqh,
    skt,
    skh,
    svt,
    svh,
    sdot,
    sdoh,
    sdqt,
    sdqh,
    slt,
    qk_scale,
    G,
    SINK,
    WINDOW,
    PB,
    LOCAL,
    STRIDE,
    STEP,
    DENSE_FROM,
    LAY,
    lay_sh,
    lay_si,
    IDX,
    CNT,
    idx_sh,
    idx_sm,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PATTERN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    seq = tl.program_id(2)
    start = tl.load(STARTS + seq)
    L = tl.load(LENS + seq)
    row0 = pid_m * BLOCK_M
    if row0 >= L * G:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    t = rows // G
    head = g * G + rows % G
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = t < L
    ld_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    qs = row0 // G
    qe = tl.minimum((row0 + BLOCK_M - 1) // G + 1, L)
    q = tl.load(Q + (start + t)[:, None] * sqt + head[:, None] * sqh + offs_d[None, :], mask=ld_mask, other=0.0)
    do = tl.load(DO + (start + t)[:, None] * sdot + head[:, None] * sdoh + offs_d[None, :], mask=ld_mask, other=0.0)
    lse = tl.load(LSE + (start + t) * slt + head, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + (start + t) * slt + head, mask=row_ok, other=0.0)
    Kg = K + start * skt + g * skh
    Vg = V + start * svt + g * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if PATTERN == LAYOUT:
        cnt = tl.load(CNT + g * idx_sh + pid_m)
        for u in range(cnt):
            kt = tl.load(IDX + g * idx_sh * idx_sm + pid_m * idx_sm + u)
            dq = _dq_tile(
                dq,
                q,
                do,
                lse,
                delta,
                t,
                g,
                L,
                kt,
                Kg,
                Vg,
                skt,
                svt,
                offs_n,
                offs_d,
                qs,
                qe,
                qk_scale,
                SINK,
                WINDOW,
                PB,
                LOCAL,
                STRIDE,
                STEP,
                DENSE_FROM,
                LAY,
                lay_sh,
                lay_si,
                HEAD_DIM,
                BLOCK_N,
                PATTERN,
            )
    else:
        n_far, lo, hi = _key_ranges(g, qs, qe, L, SINK, WINDOW, PB, LOCAL, STRIDE, STEP, DENSE_FROM, BLOCK_N, PATTERN)
        for u in range(n_far):
            kt = _far_tile(u, g, SINK, PB, LOCAL, STRIDE, STEP, DENSE_FROM, BLOCK_N, PATTERN)
            dq = _dq_tile(
                dq,
                q,
                do,
                lse,
                delta,
                t,
                g,
                L,
                kt,
                Kg,
                Vg,
                skt,
                svt,
                offs_n,
                offs_d,
                qs,
                qe,
                qk_scale,
                SINK,
                WINDOW,
                PB,
                LOCAL,
                STRIDE,
                STEP,
                DENSE_FROM,
                LAY,
                lay_sh,
                lay_si,
                HEAD_DIM,
                BLOCK_N,
                PATTERN,
            )
        for kt in range(lo, hi):
            dq = _dq_tile(
                dq,
                q,
                do,
                lse,
                delta,
                t,
                g,
                L,
                kt,
                Kg,
                Vg,
                skt,
                svt,
                offs_n,
                offs_d,
                qs,
                qe,
                qk_scale,
                SINK,
                WINDOW,
                PB,
                LOCAL,
                STRIDE,
                STEP,
                DENSE_FROM,
                LAY,
                lay_sh,
                lay_si,
                HEAD_DIM,
                BLOCK_N,
                PATTERN,
            )
    dq = dq * (qk_scale / 1.4426950408889634)  # scores were scaled in log2 units
    tl.store(
        DQ + (start + t)[:, None] * sdqt + head[:, None] * sdqh + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=ld_mask,
    )


@triton.jit
def _key_tile_order(pid, g, PB, STRIDE, STEP, DENSE_FROM, n_blocks, BLOCK_N: tl.constexpr, PATTERN: tl.constexpr):
    """Map the launch index to a key tile, longest columns first (BlockSparse: strided blocks first).

    Launch indices cover whole pattern blocks (n_blocks * PB // BLOCK_N); the map is a bijection on them."""
    kt = pid
    if PATTERN == BLOCK_SPARSE:
        sub = PB // BLOCK_N
        r = (STRIDE - (g * STEP) % STRIDE) % STRIDE
        n_strided = tl.maximum((n_blocks - r + STRIDE - 1) // STRIDE, 0)
        b = pid // sub
        p = tl.maximum(b - n_strided, 0)
        per = tl.maximum(STRIDE - 1, 1)
        c = p % per
        jb_other = (p // per) * STRIDE + tl.where(c < r, c, c + 1)
        jb = tl.where(b < n_strided, r + b * STRIDE, jb_other)
        reorder = (g < DENSE_FROM) & (STRIDE > 1)
        kt = tl.where(reorder, jb * sub + pid % sub, pid)
    return kt


@triton.jit
def _query_range(ks, ke, g, L, SINK, WINDOW, PB, LOCAL, STRIDE, STEP, DENSE_FROM, PATTERN: tl.constexpr):
    """Query positions [ks, end) that may see key tile [ks, ke)."""
    end = L
    if PATTERN == SINK_WINDOW:
        end = tl.where(ks < SINK, L, tl.minimum(L, ke - 1 + WINDOW))
    elif PATTERN == BLOCK_SPARSE:
        jb = ks // PB
        long_col = (g >= DENSE_FROM) | (((jb + g * STEP) % STRIDE) == 0)
        end = tl.where(long_col, L, tl.minimum(L, (jb + LOCAL) * PB))
    return end


@triton.jit
def _dkdv_tile(
    dk,
    dv,
    k,
    v,
    s,
    g,
    L,
    m,
    G,
    Q,
    DO,
    LSE,
    DELTA,
    sqt,
    sqh,
    sdot,
    sdoh,
    slt,
    offs_m,
    offs_d,
    ks,
    ke,
    qk_scale,
    SINK,
    WINDOW,
    PB,
    LOCAL,
    STRIDE,
    STEP,
    DENSE_FROM,
    LAY,
    lay_sh,
    lay_si,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PATTERN: tl.constexpr,
):
    rows = m * BLOCK_M + offs_m
    t = rows // G
    head = g * G + rows % G
    row_ok = t < L
    ld_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + t[:, None] * sqt + head[:, None] * sqh + offs_d[None, :], mask=ld_mask, other=0.0)
    do = tl.load(DO + t[:, None] * sdot + head[:, None] * sdoh + offs_d[None, :], mask=ld_mask, other=0.0)
    lse = tl.load(LSE + t * slt + head, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + t * slt + head, mask=row_ok, other=0.0)
    # transposed scores: (keys, rows)
    qkT = tl.dot(k, tl.trans(q)) * qk_scale
    pT = tl.math.exp2(qkT - lse[None, :])
    qs = (m * BLOCK_M) // G
    qe = tl.minimum((m * BLOCK_M + BLOCK_M - 1) // G + 1, L)
    if _needs_mask(qs, qe, ks, ke, L, g, SINK, WINDOW, PB, LOCAL, STRIDE, STEP, DENSE_FROM, PATTERN):
        ok = _allowed(
            t[None, :],
            s[:, None],
            g,
            L,
            SINK,
            WINDOW,
            PB,
            LOCAL,
            STRIDE,
            STEP,
            DENSE_FROM,
            LAY,
            lay_sh,
            lay_si,
            PATTERN,
        )
        pT = tl.where(ok, pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do)
    dpT = tl.dot(v, tl.trans(do))
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    STARTS,
    LENS,
    sqt,
    sqh,
    skt,
    skh,
    svt,
    svh,
    sdot,
    sdoh,
    sdkt,
    sdkh,
    sdvt,
    sdvh,
    slt,
    qk_scale,
    G,
    n_kv_heads,
    SINK,
    WINDOW,
    PB,
    LOCAL,
    STRIDE,
    STEP,
    DENSE_FROM,
    LAY,
    lay_sh,
    lay_si,
    IDX,
    CNT,
    idx_sh,
    idx_sm,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PATTERN: tl.constexpr,
):
    # tile-major launch: all heads' first (longest) key tiles run first
    g = tl.program_id(0) % n_kv_heads
    seq = tl.program_id(0) // n_kv_heads
    start = tl.load(STARTS + seq)
    L = tl.load(LENS + seq)
    n_tiles = (L + BLOCK_N - 1) // BLOCK_N
    n_blocks = (L + PB - 1) // PB
    n_launch = n_tiles
    if PATTERN == BLOCK_SPARSE:  # the longest-first order permutes whole pattern blocks
        n_launch = n_blocks * (PB // BLOCK_N)
    pid = tl.program_id(1)
    if pid >= n_launch:
        return
    kt = _key_tile_order(pid, g, PB, STRIDE, STEP, DENSE_FROM, n_blocks, BLOCK_N, PATTERN)
    if kt >= n_tiles:
        return
    ks = kt * BLOCK_N
    ke = ks + BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    s = ks + tl.arange(0, BLOCK_N)
    kv_mask = (s[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + (start + s)[:, None] * skt + g * skh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + (start + s)[:, None] * svt + g * svh + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    Qs = Q + start * sqt
    DOs = DO + start * sdot
    LSEs = LSE + start * slt
    DELTAs = DELTA + start * slt
    if PATTERN == LAYOUT:
        cnt = tl.load(CNT + g * idx_sh + kt)
        for u in range(cnt):
            m = tl.load(IDX + g * idx_sh * idx_sm + kt * idx_sm + u)
            dk, dv = _dkdv_tile(
                dk,
                dv,
                k,
                v,
                s,
                g,
                L,
                m,
                G,
                Qs,
                DOs,
                LSEs,
                DELTAs,
                sqt,
                sqh,
                sdot,
                sdoh,
                slt,
                offs_m,
                offs_d,
                ks,
                ke,
                qk_scale,
                SINK,
                WINDOW,
                PB,
                LOCAL,
                STRIDE,
                STEP,
                DENSE_FROM,
                LAY,
                lay_sh,
                lay_si,
                HEAD_DIM,
                BLOCK_M,
                PATTERN,
            )
    else:
        end = _query_range(ks, ke, g, L, SINK, WINDOW, PB, LOCAL, STRIDE, STEP, DENSE_FROM, PATTERN)
        m_lo = (ks * G) // BLOCK_M
        m_hi = (end * G + BLOCK_M - 1) // BLOCK_M
        for m in range(m_lo, m_hi):
            dk, dv = _dkdv_tile(
                dk,
                dv,
                k,
                v,
                s,
                g,
                L,
                m,
                G,
                Qs,
                DOs,
                LSEs,
                DELTAs,
                sqt,
                sqh,
                sdot,
                sdoh,
                slt,
                offs_m,
                offs_d,
                ks,
                ke,
                qk_scale,
                SINK,
                WINDOW,
                PB,
                LOCAL,
                STRIDE,
                STEP,
                DENSE_FROM,
                LAY,
                lay_sh,
                lay_si,
                HEAD_DIM,
                BLOCK_M,
                PATTERN,
            )
    dk = dk * (qk_scale / 1.4426950408889634)
    tl.store(DK + (start + s)[:, None] * sdkt + g * sdkh + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + (start + s)[:, None] * sdvt + g * sdvh + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


# -------------------------------------------------------------------------------------------------------------
# launch
class _Plan:
    """Everything the kernels need about one call: sequences, pattern parameters, tile sizes, index."""

    def __init__(
        self, shape: AttentionShape, starts: torch.Tensor, lens: torch.Tensor, device: torch.device, dtype: torch.dtype
    ):
        p = shape.pattern
        self.shape = shape
        self.starts, self.lens = starts, lens
        self.n_seqs = len(shape.seq_lens)
        self.max_len = max(shape.seq_lens, default=0)
        self.G = shape.group
        self.head_dim = shape.head_dim
        self.block_d = max(16, triton.next_power_of_2(shape.head_dim))
        interpret = _interpreting()
        self.block_m, self.block_n, self.bwd_block_m, self.bwd_block_n, self.num_warps, self.num_stages = _tile_config(
            shape.head_dim, dtype, interpret
        )
        dense_from = shape.num_kv_heads
        sink = window = local = step = 0
        stride = pb = 1
        if isinstance(p, Full):
            self.kind = FULL
        elif isinstance(p, SinkWindow):
            self.kind, sink, window = SINK_WINDOW, p.sink, p.window
        elif isinstance(p, BlockSparse):
            self.kind, pb, local, stride = BLOCK_SPARSE, p.block_size, p.local_blocks, p.stride
            step = max(1, stride // shape.num_kv_heads)
            dense_from = shape.num_kv_heads - p.dense_kv_heads
        elif isinstance(p, BlockLayout):
            self.kind, pb = LAYOUT, p.block_size
        else:  # pragma: no cover - every Pattern subclass is listed above
            raise TypeError(f"no Triton kernel for pattern {p!r}")
        if self.kind in (BLOCK_SPARSE, LAYOUT):  # key tiles must not straddle pattern blocks
            self.block_n = min(self.block_n, pb)
            self.bwd_block_n = min(self.bwd_block_n, pb)
        self.params = (sink, window, pb, local, stride, step, dense_from)
        self.layout = torch.zeros(1, dtype=torch.int8, device=device)
        self.layout_strides = (0, 0)
        self.fwd_index = self.bwd_index = None
        if self.kind == LAYOUT:
            lay = p.layout.expand(shape.num_kv_heads, -1, -1).to(device=device, dtype=torch.int8).contiguous()
            self.layout = lay
            self.layout_strides = (lay.stride(0), lay.stride(1))
            self.fwd_index = _layout_index(p, shape, self.max_len, self.G, self.block_m, self.block_n, device)
            self.bwd_index = _layout_index(
                p, shape, self.max_len, self.G, self.bwd_block_m, self.bwd_block_n, device, transpose=True
            )
            if self.bwd_block_m != self.block_m or self.bwd_block_n != self.block_n:
                self.dq_index = _layout_index(
                    p, shape, self.max_len, self.G, self.bwd_block_m, self.bwd_block_n, device
                )
            else:
                self.dq_index = self.fwd_index
        else:
            self.dq_index = None

    def pattern_args(self):
        return (*self.params, self.layout, *self.layout_strides)


def _index_args(index, device):
    if index is None:
        z = torch.zeros(1, dtype=torch.int32, device=device)
        return z, z, 0, 0
    idx, cnt = index
    return idx, cnt, cnt.stride(0), idx.stride(1)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tile_config(head_dim: int, dtype: torch.dtype, interpret: bool):
    """(fwd BLOCK_M, fwd BLOCK_N, bwd BLOCK_M, bwd BLOCK_N, num_warps, num_stages)."""
    if interpret:
        return 16, 16, 16, 16, 4, 1
    if head_dim <= 64:
        return 128, 64, 64, 64, 4, 3
    return 128, 64, 64, 64, 8, 3


def _layout_index(
    p: BlockLayout,
    shape: AttentionShape,
    max_len: int,
    G: int,
    block_m: int,
    block_n: int,
    device,
    transpose: bool = False,
):
    """Compact tile index for a BlockLayout: for each (KV head, query row tile) the key tiles it visits,
    or with `transpose` for each (KV head, key tile) the query row tiles that visit it. Tiles never straddle
    layout blocks on the key side (block_n <= block_size); query tiles may span several layout rows."""
    B = p.block_size
    hkv = shape.num_kv_heads
    n_m = math.ceil(max_len * G / block_m)
    n_k = math.ceil(max_len / block_n)
    lay = p.layout.expand(hkv, -1, -1)
    m = torch.arange(n_m)
    qs = (m * block_m) // G
    qe = torch.clamp(((m + 1) * block_m - 1) // G + 1, max=max_len)
    kt = torch.arange(n_k)
    kb = (kt * block_n) // B
    visit = torch.zeros(hkv, n_m, n_k, dtype=torch.bool)
    span = math.ceil(block_m / G / B) + 1  # layout rows a query tile can touch
    for d in range(span):
        rb = qs // B + d
        rows_ok = rb * B < qe
        rb_c = rb.clamp(max=p.n_blocks - 1)
        visit |= lay[:, rb_c][:, :, kb] & rows_ok[None, :, None]
    visit &= (kt[None, :] * block_n <= (qe[:, None] - 1))[None]
    if transpose:
        visit = visit.transpose(1, 2)
    cnt = visit.sum(-1).to(torch.int32)
    width = max(1, int(cnt.max()) if cnt.numel() else 1)
    # sort visited tiles first, in ascending order
    order = torch.argsort(
        (~visit).to(torch.int8) * visit.shape[-1] * 2 + torch.arange(visit.shape[-1]), dim=-1, stable=True
    )
    idx = order[..., :width].to(torch.int32)
    return idx.to(device).contiguous(), cnt.to(device).contiguous()


def _seq_tensors(shape: AttentionShape, cu_seqlens: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor(shape.seq_lens, dtype=torch.int32)
    if cu_seqlens is None:
        starts = torch.arange(len(shape.seq_lens), dtype=torch.int32) * (shape.seq_lens[0] if shape.seq_lens else 0)
    else:
        starts = cu_seqlens[:-1].to("cpu", torch.int32)
    return starts.to(device), lens.to(device)


def _check_supported(q: torch.Tensor, shape: AttentionShape) -> None:
    if shape.head_dim not in TRITON_HEAD_DIMS:
        raise ValueError(f"the Triton kernels support head_dim in {TRITON_HEAD_DIMS}, got {shape.head_dim}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton kernels support float16, bfloat16 and float32, got {q.dtype}")
    if q.device.type == "cpu" and not _interpreting():
        raise ValueError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    if q.device.type == "cuda" and q.dtype == torch.float32:
        raise TypeError("the Triton kernels take float16 or bfloat16 on the GPU; float32 runs on the reference")


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(batch, seq, heads, d) -> (batch*seq, heads, d) with unit stride on the last dimension."""
    if x.dim() == 4:
        x = x.reshape(-1, x.shape[2], x.shape[3])
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(q, k, v, plan: _Plan):
    total, H, _ = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(total, H, dtype=torch.float32, device=q.device)
    if total == 0 or plan.max_len == 0:
        return o, lse
    qk_scale = plan.shape.scale * LOG2E
    idx, cnt, idx_sh, idx_sm = _index_args(plan.fwd_index, q.device)
    grid = (triton.cdiv(plan.max_len * plan.G, plan.block_m), plan.shape.num_kv_heads, plan.n_seqs)
    _fwd_kernel[grid](
        q,
        k,
        v,
        o,
        lse,
        plan.starts,
        plan.lens,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        o.stride(0),
        o.stride(1),
        lse.stride(0),
        qk_scale,
        plan.G,
        *plan.pattern_args(),
        idx,
        cnt,
        idx_sh,
        idx_sm,
        HEAD_DIM=plan.head_dim,
        BLOCK_D=plan.block_d,
        BLOCK_M=plan.block_m,
        BLOCK_N=plan.block_n,
        PATTERN=plan.kind,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    return o, lse  # lse in log2 units


def _backward(do, dlse, q, k, v, o, lse2, plan: _Plan):
    total = q.shape[0]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if total == 0 or plan.max_len == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta = (o.float() * do.float()).sum(-1)  # (total, H)
    if dlse is not None:  # d lse / d score = p, so a gradient on lse shifts delta
        delta = delta - dlse
    qk_scale = plan.shape.scale * LOG2E
    hkv = plan.shape.num_kv_heads
    idx, cnt, idx_sh, idx_sm = _index_args(plan.dq_index, q.device)
    grid = (triton.cdiv(plan.max_len * plan.G, plan.bwd_block_m), hkv, plan.n_seqs)
    _dq_kernel[grid](
        q,
        k,
        v,
        do,
        dq,
        lse2,
        delta,
        plan.starts,
        plan.lens,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        do.stride(0),
        do.stride(1),
        dq.stride(0),
        dq.stride(1),
        lse2.stride(0),
        qk_scale,
        plan.G,
        *plan.pattern_args(),
        idx,
        cnt,
        idx_sh,
        idx_sm,
        HEAD_DIM=plan.head_dim,
        BLOCK_D=plan.block_d,
        BLOCK_M=plan.bwd_block_m,
        BLOCK_N=plan.bwd_block_n,
        PATTERN=plan.kind,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    idx, cnt, idx_sh, idx_sm = _index_args(plan.bwd_index, q.device)
    n_launch = triton.cdiv(plan.max_len, plan.bwd_block_n)
    if plan.kind == BLOCK_SPARSE:
        pb = plan.params[2]
        n_launch = triton.cdiv(plan.max_len, pb) * (pb // plan.bwd_block_n)
    grid = (hkv * plan.n_seqs, n_launch)
    _dkdv_kernel[grid](
        q,
        k,
        v,
        do,
        dk,
        dv,
        lse2,
        delta,
        plan.starts,
        plan.lens,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        do.stride(0),
        do.stride(1),
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        lse2.stride(0),
        qk_scale,
        plan.G,
        hkv,
        *plan.pattern_args(),
        idx,
        cnt,
        idx_sh,
        idx_sm,
        HEAD_DIM=plan.head_dim,
        BLOCK_D=plan.block_d,
        BLOCK_M=plan.bwd_block_m,
        BLOCK_N=plan.bwd_block_n,
        PATTERN=plan.kind,
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    return dq, dk, dv


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan):
        o, lse2 = _forward(q, k, v, plan)
        ctx.save_for_backward(q, k, v, o, lse2)
        ctx.plan = plan
        return o, lse2 / LOG2E

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse2 = ctx.saved_tensors
        dq, dk, dv = _backward(do, dlse, q, k, v, o, lse2, ctx.plan)
        return dq, dk, dv, None


def triton_attention(q, k, v, shape: AttentionShape, cu_seqlens: torch.Tensor | None, return_lse: bool):
    """Run the Triton kernels on validated inputs (see `longgen.sparse_attention`)."""
    _check_supported(q, shape)
    batched = cu_seqlens is None
    out_shape = q.shape
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    starts, lens = _seq_tensors(shape, cu_seqlens, q.device)
    plan = _Plan(shape, starts, lens, q.device, q.dtype)
    o, lse = _TritonAttention.apply(qf, kf, vf, plan)
    o = o.reshape(out_shape)
    if not return_lse:
        return o
    lse = lse.transpose(0, 1)  # (H, total)
    if batched:
        B, T = out_shape[0], out_shape[1]
        lse = lse.reshape(shape.num_heads, B, T).transpose(0, 1)
    return o, lse
