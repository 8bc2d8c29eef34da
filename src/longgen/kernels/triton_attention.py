"""Triton kernels for attention under a static sparse pattern: forward, dQ, and dK/dV.

FlashAttention-2 tiling with an online softmax, reading top to bottom:

* Rows. The G query heads of one KV group are packed into the rows of a tile: row ``r`` of a sequence is query
  position ``r // G`` of query head ``g * G + r % G``. K/V tiles are loaded once per group, and the dK/dV
  kernel sums over the group in registers (no repeated K/V, no atomics).
* Sequences. Every call is a set of packed sequences (``starts``, ``lens``); a batched input is equal-length
  packed sequences. Positions restart at 0 in each sequence.
* Patterns. The pattern travels as one compile-time tuple ``PAT`` (`longgen.kernels.plan.PatternParams`: kind,
  sink, window, block, local, stride, step, dense_from; a model uses one or two patterns), so block arithmetic
  compiles to shifts. Which key tiles a query tile visits, and which query tiles visit a key tile, is computed
  arithmetically for Full, SinkWindow and BlockSparse; BlockLayout uses a compact tile index built on the host.
  Every tile range is split into masked edges and an unmasked interior (a constexpr MASK flag), so the interior
  loop carries no branch and pipelines; `_allowed` (the formulas of `longgen.patterns`) masks edges. Unmasked
  tiles lie inside the sequence, so their loads skip length tests; when every length is a whole number of tiles
  (constexpr EVEN) no load does. tests/test_kernel_tiles.py checks the visited tiles against
  `Pattern.block_mask`.
  A call may hold a slice of the KV heads (context parallelism): the pattern helpers see the global head
  ``g + KV_OFF`` (a constexpr), the tensors are indexed with the local ``g``.
* Load balance. dK/dV programs are launched tile-major with the longest columns first (BlockSparse's strided
  blocks, SinkWindow's sink tile, Full's first tiles), so a few long columns never run last.

Scores are kept in log2 units (scale * log2(e) folded into one multiply); the LSE is converted on return.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from longgen.kernels import dispatch
from longgen.kernels.inputs import TRITON_HEAD_DIMS, AttentionShape
from longgen.kernels.plan import K_BLOCK_SPARSE, K_LAYOUT, K_SINK_WINDOW, LOG2E, Plan, Tuning, interpreting, seq_tensors

# pattern kinds inside the kernels (the first entry of PAT)
SINK_WINDOW = tl.constexpr(K_SINK_WINDOW)
BLOCK_SPARSE = tl.constexpr(K_BLOCK_SPARSE)
LAYOUT = tl.constexpr(K_LAYOUT)
LN2 = tl.constexpr(0.6931471805599453)


# -------------------------------------------------------------------------------------------------------------
# pattern semantics and iteration, shared by the three kernels (and the decoding kernel's `_allowed`)
@triton.jit
def _allowed(t, s, g, L, LAY, n_lay, PAT: tl.constexpr):
    """Exact mask for query positions t and key positions s (broadcast) of KV head g in a sequence of L."""
    KIND: tl.constexpr = PAT[0]
    PB: tl.constexpr = PAT[3]
    ok = (s <= t) & (s < L) & (t < L)
    if KIND == SINK_WINDOW:
        ok = ok & ((s < PAT[1]) | (t - s < PAT[2]))
    elif KIND == BLOCK_SPARSE:
        i = t // PB
        j = s // PB
        ok = ok & (((i - j) < PAT[4]) | (((j + g * PAT[6]) % PAT[5]) == 0) | (g >= PAT[7]))
    elif KIND == LAYOUT:
        bits = tl.load(LAY + (g * n_lay + t // PB) * n_lay + s // PB, mask=ok, other=0)
        ok = ok & (bits != 0)
    return ok


@triton.jit
def _key_ranges(g, qs, qe, PAT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles seen by query positions [qs, qe): `n_far` far tiles (see `_far_tile`), then the contiguous
    range [lo, hi) split as [lo, a) masked, [a, b) unmasked, [b, hi) masked (the causal diagonal)."""
    KIND: tl.constexpr = PAT[0]
    SINK: tl.constexpr = PAT[1]
    WINDOW: tl.constexpr = PAT[2]
    PB: tl.constexpr = PAT[3]
    LOCAL: tl.constexpr = PAT[4]
    STRIDE: tl.constexpr = PAT[5]
    hi = (qe + BLOCK_N - 1) // BLOCK_N
    n_far = 0
    lo = 0
    a = 0
    if KIND == SINK_WINDOW:
        n_far = tl.minimum((tl.minimum(qe, SINK) + BLOCK_N - 1) // BLOCK_N, hi)
        lo = tl.maximum(n_far, tl.maximum(qs - WINDOW + 1, 0) // BLOCK_N)
        # tiles starting at or before qe - 1 - WINDOW hold pairs outside the window
        a = tl.minimum(tl.maximum((qe - 1 - WINDOW) // BLOCK_N + 1, lo), hi)
    elif KIND == BLOCK_SPARSE:
        SUB = PB // BLOCK_N
        dense = g >= PAT[7]  # dense heads: no strided loop, local range from 0, no local edge
        local_lo = tl.where(dense, 0, tl.maximum(qs // PB - LOCAL + 1, 0))
        j0 = (STRIDE - (g * PAT[6]) % STRIDE) % STRIDE
        n_far = tl.where(dense, 0, tl.maximum((local_lo - j0 + STRIDE - 1) // STRIDE, 0)) * SUB
        lo = local_lo * SUB
        # blocks the last rows of the tile no longer see locally
        a = tl.where(dense, lo, tl.minimum(tl.maximum(((qe - 1) // PB - LOCAL + 1) * SUB, lo), hi))
    b = tl.minimum(tl.maximum((qs + 1) // BLOCK_N, a), hi)
    return n_far, lo, a, b, hi


@triton.jit
def _far_tile(u, g, PAT: tl.constexpr, BLOCK_N: tl.constexpr):
    """The u-th far key tile: SinkWindow's sink tiles (u itself), BlockSparse's strided tiles."""
    STRIDE: tl.constexpr = PAT[5]
    kt = u
    if PAT[0] == BLOCK_SPARSE:
        SUB = PAT[3] // BLOCK_N
        j0 = (STRIDE - (g * PAT[6]) % STRIDE) % STRIDE
        kt = (j0 + (u // SUB) * STRIDE) * SUB + u % SUB
    return kt


@triton.jit
def _query_ranges(ks, ke, g, L, PAT: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query row tiles that see key positions [ks, ke): [m_lo, d) masked (diagonal), [d, e) unmasked,
    [e, m_hi) masked (window / local edge)."""
    KIND: tl.constexpr = PAT[0]
    SINK: tl.constexpr = PAT[1]
    WINDOW: tl.constexpr = PAT[2]
    PB: tl.constexpr = PAT[3]
    LOCAL: tl.constexpr = PAT[4]
    STRIDE: tl.constexpr = PAT[5]
    end = L
    if KIND == SINK_WINDOW:
        end = tl.where(ks < SINK, L, tl.minimum(L, ke - 1 + WINDOW))
    elif KIND == BLOCK_SPARSE:
        jb = ks // PB
        long_col = (g >= PAT[7]) | (((jb + g * PAT[6]) % STRIDE) == 0)
        end = tl.where(long_col, L, tl.minimum(L, (jb + LOCAL) * PB))
    m_lo = (ks * G) // BLOCK_M
    m_hi = (end * G + BLOCK_M - 1) // BLOCK_M
    d = tl.minimum(tl.maximum(((ke - 1) * G + BLOCK_M - 1) // BLOCK_M, m_lo), m_hi)
    e = m_hi
    if KIND == SINK_WINDOW:
        e_win = tl.minimum(tl.maximum(((ks + WINDOW) * G) // BLOCK_M, d), m_hi)
        e = tl.where(ke <= SINK, m_hi, tl.where(ks < SINK, d, e_win))
    elif KIND == BLOCK_SPARSE:
        jb = ks // PB
        long_col = (g >= PAT[7]) | (((jb + g * PAT[6]) % STRIDE) == 0)
        e_loc = tl.minimum(tl.maximum(((jb + LOCAL) * PB * G) // BLOCK_M, d), m_hi)
        e = tl.where(long_col, m_hi, e_loc)
    return m_lo, d, e, m_hi


@triton.jit
def _key_tile_order(pid, g, n_blocks, PAT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Launch index -> key tile, longest columns first. BlockSparse: strided blocks before the others (a
    bijection on whole pattern blocks); other patterns are longest-first in natural order."""
    STRIDE: tl.constexpr = PAT[5]
    kt = pid
    if PAT[0] == BLOCK_SPARSE:
        if STRIDE > 1:
            SUB = PAT[3] // BLOCK_N
            r = (STRIDE - (g * PAT[6]) % STRIDE) % STRIDE
            n_strided = tl.maximum((n_blocks - r + STRIDE - 1) // STRIDE, 0)
            b = pid // SUB
            p = tl.maximum(b - n_strided, 0)
            c = p % (STRIDE - 1)
            jb_other = (p // (STRIDE - 1)) * STRIDE + tl.where(c < r, c, c + 1)
            jb = tl.where(b < n_strided, r + b * STRIDE, jb_other)
            kt = tl.where(g < PAT[7], jb * SUB + pid % SUB, pid)
    return kt


@triton.jit
def _load_rows(ptrs, s, L, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_LEN: tl.constexpr):
    """Load a (rows, BLOCK_D) tile at positions s (0 past the sequence end when CHECK_LEN, 0 past HEAD_DIM). Only
    the edge tiles of a range can run past the end: unmasked tiles lie inside the sequence, and with EVEN lengths
    (every one a whole number of tiles) all of them do, so those loads skip the length test."""
    if CHECK_LEN:
        x = tl.load(ptrs, mask=(s[:, None] < L) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif BLOCK_D != HEAD_DIM:
        x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _load_vec(ptrs, t, L, CHECK_LEN: tl.constexpr):
    """Load one float per row at positions t (0 past the sequence end when CHECK_LEN)."""
    if CHECK_LEN:
        x = tl.load(ptrs, mask=t < L, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _visit(u, g, IDX, PAT: tl.constexpr, BLOCK_N: tl.constexpr, FAR: tl.constexpr, INDEXED: tl.constexpr):
    """Key tile of loop index u: from the BlockLayout index, a far tile (`_far_tile`), or u itself."""
    if INDEXED:
        kt = tl.load(IDX + u)
    elif FAR:
        kt = _far_tile(u, g, PAT, BLOCK_N)
    else:
        kt = u
    return kt


# -------------------------------------------------------------------------------------------------------------
# forward; `mask` = (t, g, L, LAY, n_lay): query positions, the global KV head, the length, the BlockLayout
@triton.jit
def _fwd_tiles(state, q, mask, kv, IDX, lo, hi, qk_scale, PAT: tl.constexpr, DIMS: tl.constexpr, FLAGS: tl.constexpr):
    """Online-softmax accumulation of state = (acc, m_i, l_i) over key tiles u in [lo, hi) (far tiles via
    `_far_tile`, or an index) of kv = (K, V, skt, svt); DIMS = (HEAD_DIM, BLOCK_D, BLOCK_N), FLAGS = (MASK, FAR,
    INDEXED, EVEN)."""
    HEAD_DIM: tl.constexpr = DIMS[0]
    BLOCK_D: tl.constexpr = DIMS[1]
    BLOCK_N: tl.constexpr = DIMS[2]
    MASK: tl.constexpr = FLAGS[0]
    CHECK_LEN: tl.constexpr = MASK and (FLAGS[2] or not FLAGS[3])  # edge tiles may pass the end
    acc, m_i, l_i = state
    t, g, L, LAY, n_lay = mask
    K, V, skt, svt = kv
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_rel = offs_n[:, None] * skt + offs_d[None, :]  # a tile's element offsets: the loop adds a scalar
    v_rel = offs_n[:, None] * svt + offs_d[None, :]
    for u in range(lo, hi):
        kt = _visit(u, g, IDX, PAT, BLOCK_N, FLAGS[1], FLAGS[2])
        s = kt * BLOCK_N + offs_n
        k = _load_rows(K + kt * BLOCK_N * skt + k_rel, s, L, offs_d, HEAD_DIM, BLOCK_D, CHECK_LEN)
        qk = tl.dot(q, tl.trans(k))
        if MASK:
            ok = _allowed(t[:, None], s[None, :], g, L, LAY, n_lay, PAT)
            qk = tl.where(ok, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            p = tl.math.exp2(qk - m_use[:, None])
        else:  # the scale is applied to the row max, then once per score inside one multiply-add
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V + kt * BLOCK_N * svt + v_rel, s, L, offs_d, HEAD_DIM, BLOCK_D, CHECK_LEN)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, STARTS, QSTARTS, LENS, QOFF, LAY, n_lay, IDX, CNT, idx_w,
    sqt, sqh, skt, skh, svt, svh, sot, soh, qk_scale, H,
    PAT: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, KV_OFF: tl.constexpr = 0, EVEN: tl.constexpr = False,
):  # fmt: skip
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    gp = g + KV_OFF  # the global KV head: what the pattern sees (g indexes the local tensors)
    seq = tl.program_id(2)
    start = tl.load(STARTS + seq).to(tl.int64)
    qstart = tl.load(QSTARTS + seq).to(tl.int64)  # the queries are positions QOFF .. L - 1 of the sequence
    L = tl.load(LENS + seq)
    row0 = pid_m * BLOCK_M
    if row0 >= (L - QOFF) * G:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    tq = rows // G
    t = QOFF + tq
    head = g * G + rows % G
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = (t < L)[:, None] & (offs_d[None, :] < HEAD_DIM)
    qs = QOFF + row0 // G
    qe = tl.minimum(QOFF + (row0 + BLOCK_M - 1) // G + 1, L)
    q = tl.load(Q + (qstart + tq)[:, None] * sqt + head[:, None] * sqh + offs_d[None, :], mask=io_mask, other=0.0)
    kv = (K + start * skt + g * skh, V + start * svt + g * svh, skt, svt)
    mask = (t, gp, L, LAY, n_lay)
    dims: tl.constexpr = (HEAD_DIM, BLOCK_D, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    state = (acc, m_i, l_i)
    if PAT[0] == LAYOUT:
        row = g * tl.num_programs(0) + pid_m
        IDX_ROW = IDX + row * idx_w
        state = _fwd_tiles(state, q, mask, kv, IDX_ROW, 0, tl.load(CNT + row), qk_scale, PAT, dims, (1, 0, 1, EVEN))
    else:  # far tiles (masked for SinkWindow's sinks), the masked window / local edge, the interior, the diagonal
        n_far, lo, a, b, hi = _key_ranges(gp, qs, qe, PAT, BLOCK_N)
        FAR_MASK: tl.constexpr = PAT[0] == SINK_WINDOW
        state = _fwd_tiles(state, q, mask, kv, IDX, 0, n_far, qk_scale, PAT, dims, (FAR_MASK, 1, 0, EVEN))
        state = _fwd_tiles(state, q, mask, kv, IDX, lo, a, qk_scale, PAT, dims, (1, 0, 0, EVEN))
        state = _fwd_tiles(state, q, mask, kv, IDX, a, b, qk_scale, PAT, dims, (0, 0, 0, EVEN))
        state = _fwd_tiles(state, q, mask, kv, IDX, b, hi, qk_scale, PAT, dims, (1, 0, 0, EVEN))
    acc, m_i, l_i = state
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + (qstart + tq)[:, None] * sot + head[:, None] * soh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=io_mask)
    tl.store(LSE + (qstart + tq) * H + head, m_i + tl.math.log2(l_safe), mask=t < L)


# -------------------------------------------------------------------------------------------------------------
# backward: dQ iterates like the forward; dK/dV iterates over the query row tiles that see a key tile
@triton.jit
def _dq_tiles(dq, rows, mask, kv, IDX, lo, hi, qk_scale, PAT: tl.constexpr, DIMS: tl.constexpr, FLAGS: tl.constexpr):
    """dQ of rows = (q, do, lse, delta) over key tiles u in [lo, hi), as `_fwd_tiles` visits them."""
    HEAD_DIM: tl.constexpr = DIMS[0]
    BLOCK_D: tl.constexpr = DIMS[1]
    BLOCK_N: tl.constexpr = DIMS[2]
    MASK: tl.constexpr = FLAGS[0]
    CHECK_LEN: tl.constexpr = MASK and (FLAGS[2] or not FLAGS[3])  # edge tiles may pass the end
    q, do, lse, delta = rows
    t, g, L, LAY, n_lay = mask
    K, V, skt, svt = kv
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_rel = offs_n[:, None] * skt + offs_d[None, :]  # a tile's element offsets: the loop adds a scalar
    v_rel = offs_n[:, None] * svt + offs_d[None, :]
    for u in range(lo, hi):
        kt = _visit(u, g, IDX, PAT, BLOCK_N, FLAGS[1], FLAGS[2])
        s = kt * BLOCK_N + offs_n
        k = _load_rows(K + kt * BLOCK_N * skt + k_rel, s, L, offs_d, HEAD_DIM, BLOCK_D, CHECK_LEN)
        v = _load_rows(V + kt * BLOCK_N * svt + v_rel, s, L, offs_d, HEAD_DIM, BLOCK_D, CHECK_LEN)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        if MASK:
            ok = _allowed(t[:, None], s[None, :], g, L, LAY, n_lay, PAT)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, DO, DQ, O, LSE, DLSE, DELTA, STARTS, LENS, LAY, n_lay, IDX, CNT, idx_w,
    sqt, sqh, skt, skh, svt, svh, sdot, sdoh, sdqt, sdqh, sot, soh, qk_scale, H, HAS_DLSE: tl.constexpr,
    PAT: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, KV_OFF: tl.constexpr = 0, EVEN: tl.constexpr = False,
):  # fmt: skip
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    gp = g + KV_OFF  # the global KV head: what the pattern sees (g indexes the local tensors)
    seq = tl.program_id(2)
    start = tl.load(STARTS + seq).to(tl.int64)
    L = tl.load(LENS + seq)
    row0 = pid_m * BLOCK_M
    if row0 >= L * G:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    t = rows // G
    head = g * G + rows % G
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = (t < L)[:, None] & (offs_d[None, :] < HEAD_DIM)
    qs = row0 // G
    qe = tl.minimum((row0 + BLOCK_M - 1) // G + 1, L)
    q = tl.load(Q + (start + t)[:, None] * sqt + head[:, None] * sqh + offs_d[None, :], mask=io_mask, other=0.0)
    do = tl.load(DO + (start + t)[:, None] * sdot + head[:, None] * sdoh + offs_d[None, :], mask=io_mask, other=0.0)
    lse = tl.load(LSE + (start + t) * H + head, mask=t < L, other=0.0)
    # delta = rowsum(o * do) (minus the gradient of the returned lse), written for the dK/dV kernel
    o = tl.load(O + (start + t)[:, None] * sot + head[:, None] * soh + offs_d[None, :], mask=io_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + (start + t) * H + head, mask=t < L, other=0.0)
    tl.store(DELTA + (start + t) * H + head, delta, mask=t < L)
    kv = (K + start * skt + g * skh, V + start * svt + g * svh, skt, svt)
    mask = (t, gp, L, LAY, n_lay)
    rows = (q, do, lse, delta)
    dims: tl.constexpr = (HEAD_DIM, BLOCK_D, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if PAT[0] == LAYOUT:
        row = g * tl.num_programs(0) + pid_m
        IDX_ROW = IDX + row * idx_w
        dq = _dq_tiles(dq, rows, mask, kv, IDX_ROW, 0, tl.load(CNT + row), qk_scale, PAT, dims, (1, 0, 1, EVEN))
    else:  # the forward's ranges
        n_far, lo, a, b, hi = _key_ranges(gp, qs, qe, PAT, BLOCK_N)
        FAR_MASK: tl.constexpr = PAT[0] == SINK_WINDOW
        dq = _dq_tiles(dq, rows, mask, kv, IDX, 0, n_far, qk_scale, PAT, dims, (FAR_MASK, 1, 0, EVEN))
        dq = _dq_tiles(dq, rows, mask, kv, IDX, lo, a, qk_scale, PAT, dims, (1, 0, 0, EVEN))
        dq = _dq_tiles(dq, rows, mask, kv, IDX, a, b, qk_scale, PAT, dims, (0, 0, 0, EVEN))
        dq = _dq_tiles(dq, rows, mask, kv, IDX, b, hi, qk_scale, PAT, dims, (1, 0, 0, EVEN))
    dq = dq * (qk_scale * LN2)  # back from log2 units: d(score)/dq = scale * k
    dq_ptrs = DQ + (start + t)[:, None] * sdqt + head[:, None] * sdqh + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=io_mask)


@triton.jit
def _dkdv_tiles(grads, keys, mask, rows, IDX, lo, hi, qk_scale, PAT: tl.constexpr, DIMS: tl.constexpr, FLAGS):
    """Accumulate grads = (dK, dV) of keys = (k, v, s) over query row tiles [lo, hi) of rows = (Q, DO, LSE, DELTA,
    sqt, sqh, sdot, sdoh, H), which point at the group's first query head. Rows past the sequence end load
    q = do = 0, so they add nothing even unmasked. mask = (g, L, LAY, n_lay), g the global KV head the pattern
    sees; DIMS = (G, HEAD_DIM, BLOCK_D, BLOCK_M), FLAGS = (MASK, INDEXED, EVEN)."""
    G: tl.constexpr = DIMS[0]
    HEAD_DIM: tl.constexpr = DIMS[1]
    BLOCK_D: tl.constexpr = DIMS[2]
    BLOCK_M: tl.constexpr = DIMS[3]
    INDEXED: tl.constexpr = FLAGS[1]
    # with EVEN lengths the row tiles a key tile sees lie inside the sequence (an index built for the longest
    # sequence may list tiles past a shorter one's end)
    CHECK_LEN: tl.constexpr = INDEXED or not FLAGS[2]
    dk, dv = grads
    k, v, s = keys
    g, L, LAY, n_lay = mask
    Q, DO, LSE, DELTA, sqt, sqh, sdot, sdoh, H = rows
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # row r of a tile: position r // G, head r % G within the KV group (the pointers start at its first query
    # head). When a tile holds whole positions (WHOLE) the element offsets are the same for every tile, so the
    # loop adds one scalar per tile.
    WHOLE: tl.constexpr = BLOCK_M % G == 0
    t_rel = offs_m // G
    q_rel = t_rel[:, None] * sqt + (offs_m % G)[:, None] * sqh + offs_d[None, :]
    do_rel = t_rel[:, None] * sdot + (offs_m % G)[:, None] * sdoh + offs_d[None, :]
    r_rel = t_rel * H + offs_m % G
    for u in range(lo, hi):
        if INDEXED:
            m = tl.load(IDX + u)
        else:
            m = u
        if WHOLE:
            t0 = (m * BLOCK_M) // G
            t = t0 + t_rel
            q_ptrs, do_ptrs, r_off = Q + t0 * sqt + q_rel, DO + t0 * sdot + do_rel, t0 * H + r_rel
        else:
            r = m * BLOCK_M + offs_m  # not `rows`: that name holds the pointer bundle
            t = r // G
            head = r % G
            q_ptrs = Q + t[:, None] * sqt + head[:, None] * sqh + offs_d[None, :]
            do_ptrs = DO + t[:, None] * sdot + head[:, None] * sdoh + offs_d[None, :]
            r_off = t * H + head
        q = _load_rows(q_ptrs, t, L, offs_d, HEAD_DIM, BLOCK_D, CHECK_LEN)
        lse = _load_vec(LSE + r_off, t, L, CHECK_LEN)
        qkT = tl.dot(k, tl.trans(q)) * qk_scale  # (keys, rows)
        pT = tl.math.exp2(qkT - lse[None, :])
        if FLAGS[0]:
            ok = _allowed(t[None, :], s[:, None], g, L, LAY, n_lay, PAT)
            pT = tl.where(ok, pT, 0.0)
        do = _load_rows(do_ptrs, t, L, offs_d, HEAD_DIM, BLOCK_D, CHECK_LEN)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        delta = _load_vec(DELTA + r_off, t, L, CHECK_LEN)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, STARTS, LENS, LAY, n_lay, IDX, CNT, idx_w,
    sqt, sqh, skt, skh, svt, svh, sdot, sdoh, sdkt, sdkh, sdvt, sdvh, qk_scale, H, n_kv_heads, n_key_tiles,
    PAT: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, KV_OFF: tl.constexpr = 0, EVEN: tl.constexpr = False,
):  # fmt: skip
    PB: tl.constexpr = PAT[3]
    # tile-major launch: every head's first (longest) key tiles are scheduled first
    g = tl.program_id(0) % n_kv_heads
    gp = g + KV_OFF  # the global KV head: what the pattern sees (g indexes the local tensors)
    seq = tl.program_id(0) // n_kv_heads
    start = tl.load(STARTS + seq).to(tl.int64)
    L = tl.load(LENS + seq)
    n_tiles = (L + BLOCK_N - 1) // BLOCK_N
    n_blocks = (L + PB - 1) // PB
    pid = tl.program_id(1)
    if PAT[0] == BLOCK_SPARSE:  # the longest-first order permutes whole pattern blocks
        n_launch = n_blocks * (PB // BLOCK_N)
    else:
        n_launch = n_tiles
    if pid >= n_launch:
        return
    kt = _key_tile_order(pid, gp, n_blocks, PAT, BLOCK_N)
    if kt >= n_tiles:
        return
    ks = kt * BLOCK_N
    ke = ks + BLOCK_N
    offs_d = tl.arange(0, BLOCK_D)
    s = ks + tl.arange(0, BLOCK_N)
    kv_mask = (s[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + (start + s)[:, None] * skt + g * skh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + (start + s)[:, None] * svt + g * svh + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    grads = (dk, dv)
    keys = (k, v, s)
    mask = (gp, L, LAY, n_lay)
    rows = (
        Q + start * sqt + g * G * sqh, DO + start * sdot + g * G * sdoh, LSE + start * H + g * G,
        DELTA + start * H + g * G, sqt, sqh, sdot, sdoh, H,
    )  # fmt: skip
    dims: tl.constexpr = (G, HEAD_DIM, BLOCK_D, BLOCK_M)
    if PAT[0] == LAYOUT:
        col = g * n_key_tiles + kt
        IDX_COL = IDX + col * idx_w
        grads = _dkdv_tiles(grads, keys, mask, rows, IDX_COL, 0, tl.load(CNT + col), qk_scale, PAT, dims, (1, 1, EVEN))
    else:  # the masked diagonal, the interior, the masked window / local edge
        m_lo, d, e, m_hi = _query_ranges(ks, ke, gp, L, PAT, G, BLOCK_M)
        grads = _dkdv_tiles(grads, keys, mask, rows, IDX, m_lo, d, qk_scale, PAT, dims, (1, 0, EVEN))
        grads = _dkdv_tiles(grads, keys, mask, rows, IDX, d, e, qk_scale, PAT, dims, (0, 0, EVEN))
        grads = _dkdv_tiles(grads, keys, mask, rows, IDX, e, m_hi, qk_scale, PAT, dims, (1, 0, EVEN))
    dk, dv = grads
    dk = dk * (qk_scale * LN2)
    tl.store(DK + (start + s)[:, None] * sdkt + g * sdkh + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + (start + s)[:, None] * sdvt + g * sdvh + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


# -------------------------------------------------------------------------------------------------------------
# launch
def _check_supported(q: torch.Tensor, shape: AttentionShape) -> None:
    if shape.head_dim not in TRITON_HEAD_DIMS:
        raise ValueError(f"the Triton kernels support head_dim in {TRITON_HEAD_DIMS}, got {shape.head_dim}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton kernels support float16, bfloat16 and float32, got {q.dtype}")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    if q.device.type == "cuda" and q.dtype == torch.float32:
        raise TypeError("the Triton kernels take float16 or bfloat16 on the GPU; float32 runs on the reference")


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(batch, seq, heads, d) -> (batch*seq, heads, d) with unit stride on the last dimension."""
    if x.dim() == 4:
        x = x.reshape(-1, x.shape[2], x.shape[3])
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(q, k, v, plan: Plan):
    total, H, _ = q.shape
    if plan.shape.padded:  # padded positions are never written by the kernel: output 0, lse -inf
        o = torch.zeros_like(q)
        lse2 = torch.full((total, H), float("-inf"), dtype=torch.float32, device=q.device)
    else:
        o = torch.empty_like(q)
        lse2 = torch.empty(total, H, dtype=torch.float32, device=q.device)
    if total == 0 or plan.max_len == 0:
        return o, lse2
    if "fwd" in plan.gluon:
        from longgen.kernels import gluon_attention

        return gluon_attention.forward(q, k, v, plan)
    meta = plan.meta("fwd")
    n_rows = (plan.max_len - plan.q_offset) * plan.shape.group
    grid = (triton.cdiv(n_rows, meta["BLOCK_M"]), plan.shape.num_kv_heads, plan.n_seqs)
    _fwd_kernel[grid](
        q,
        k,
        v,
        o,
        lse2,
        plan.starts,
        plan.q_starts,
        plan.lens,
        plan.q_offset,
        *plan.launch_args("fwd"),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        o.stride(0),
        o.stride(1),
        plan.shape.scale * LOG2E,
        H,
        **meta,
    )
    return o, lse2  # lse in log2 units, (total, H)


def _backward(do, dlse, q, k, v, o, lse2, plan: Plan):
    total, H, _ = q.shape
    alloc = torch.zeros_like if plan.shape.padded else torch.empty_like  # padding gets no gradient
    dq, dk, dv = alloc(q), alloc(k), alloc(v)
    if total == 0 or plan.max_len == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if do is None:  # only the lse was used
        do = torch.zeros_like(o)
    do = do if do.stride(-1) == 1 else do.contiguous()
    # d lse / d score = p, so a gradient on the lse shifts delta (the dQ kernel computes delta and subtracts it)
    has_dlse = dlse is not None
    dlse = dlse.float().contiguous() if has_dlse else torch.zeros(1, dtype=torch.float32, device=q.device)
    delta = torch.empty(total, H, dtype=torch.float32, device=q.device)
    qk_scale = plan.shape.scale * LOG2E
    hkv = plan.shape.num_kv_heads
    if plan.gluon:
        from longgen.kernels import gluon_attention

        if not (do.is_contiguous() and do.data_ptr() % 16 == 0):
            do = do.clone(memory_format=torch.contiguous_format)  # TMA reads whole aligned rows
    if "dq" in plan.gluon:
        gluon_attention.dq_delta(q, k, v, o, do, lse2, dlse if has_dlse else None, delta, dq, plan)
    else:
        meta = plan.meta("dq")
        grid = (triton.cdiv(plan.max_len * plan.shape.group, meta["BLOCK_M"]), hkv, plan.n_seqs)
        _dq_kernel[grid](
            q,
            k,
            v,
            do,
            dq,
            o,
            lse2,
            dlse,
            delta,
            plan.starts,
            plan.lens,
            *plan.launch_args("dq"),
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
            o.stride(0),
            o.stride(1),
            qk_scale,
            H,
            has_dlse,
            **meta,
        )
    if "dkdv" in plan.gluon:
        gluon_attention.dkdv(q, k, v, do, lse2, delta, dk, dv, plan)
        return dq, dk, dv
    meta = plan.meta("dkdv")
    n_key_tiles = triton.cdiv(plan.max_len, meta["BLOCK_N"])
    n_launch = n_key_tiles
    if plan.kind == K_BLOCK_SPARSE:
        pb = plan.pat.block
        n_launch = triton.cdiv(plan.max_len, pb) * (pb // meta["BLOCK_N"])
    _dkdv_kernel[(hkv * plan.n_seqs, n_launch)](
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
        *plan.launch_args("dkdv"),
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
        qk_scale,
        H,
        hkv,
        n_key_tiles,
        **meta,
    )
    return dq, dk, dv


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan):
        o, lse2 = _forward(q, k, v, plan)
        ctx.set_materialize_grads(False)  # an unused lse gets no gradient tensor (and no kernel work)
        ctx.save_for_backward(q, k, v, o, lse2)
        ctx.plan = plan
        return o, lse2 / LOG2E

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse2 = ctx.saved_tensors
        dq, dk, dv = _backward(do, dlse, q, k, v, o, lse2, ctx.plan)
        return dq, dk, dv, None


def triton_suffix_attention(q, k, v, shape: AttentionShape) -> torch.Tensor:
    """Forward only: q ``(B, n, H, d)`` are positions ``L - n .. L - 1`` of k, v ``(B, L, Hkv, d)`` (see
    `longgen.kernels.cache_attention.suffix_attention`); not for BlockLayout (its tile index starts at 0)."""
    _check_supported(q, shape)
    n, L = q.shape[1], k.shape[1]
    starts, lens = seq_tensors(shape, None, L, q.device)
    plan = Plan(shape, starts, lens, q.dtype, q_offset=L - n)
    o, _ = _forward(_flat(q), _flat(k), _flat(v), plan)
    return o.reshape(q.shape)


def triton_attention(
    q,
    k,
    v,
    shape: AttentionShape,
    cu_seqlens: torch.Tensor | None,
    return_lse: bool,
    tuning: Tuning | None = None,
):
    """Run the Triton kernels on validated inputs (see `longgen.sparse_attention`), and the Hopper Gluon kernels
    where `dispatch.hopper_kernels` gives them the call; `tuning` overrides the measured launch settings."""
    _check_supported(q, shape)
    out_shape = q.shape
    starts, lens = seq_tensors(shape, cu_seqlens, q.shape[1] if cu_seqlens is None else 0, q.device)
    plan = Plan(shape, starts, lens, q.dtype, tuning=tuning)
    q, k, v = _flat(q), _flat(k), _flat(v)
    plan.gluon = dispatch.hopper_kernels(q, k, v, plan, batched=cu_seqlens is None)
    o, lse = _TritonAttention.apply(q, k, v, plan)
    o = o.reshape(out_shape)
    if not return_lse:
        return o
    lse = lse.transpose(0, 1)  # (H, total)
    if cu_seqlens is None:
        B, T = out_shape[0], out_shape[1]
        lse = lse.reshape(shape.num_heads, B, T).transpose(0, 1)
    return o, lse
