"""Hopper (sm_90) attention kernels in Gluon: warp-specialised, FlashAttention-3 style.

The Triton kernels (`triton_attention`) run every warp through load, matmul and softmax in turn; on an H100 that
leaves the tensor cores idle during the softmax. These kernels split a program into three partitions (Gluon's
`warp_specialize`): a loader warp that streams tiles with TMA into a ring of `STAGES` shared-memory buffers (a
"full" mbarrier per buffer for the loader -> consumers hand-off, an "empty" one for the way back), and two
consumer warpgroups that issue their products as asynchronous wgmma and do the elementwise work while they run;
registers are rebalanced with `setmaxnreg` (consumers 240, loader 24).

* Forward (`_fwd_ws_kernel`): work items of 128 query rows (64 per consumer) against the visited K/V tiles; per
  key tile, S = Q K^T and the previous tile's O += P V are issued together, the softmax of S runs while P V is in
  flight, and the two warpgroups drift into alternating matmul / softmax phases on their own. One program per work
  item for Full; for the sparse patterns persistent (one program per SM taking the items in turn, the next item's
  Q loaded while the current one finishes), which hides their short programs' prologue and epilogue.
* dK/dV of the backward (`_dkdv_ws_kernel`): two key tiles of 64 per program (one per consumer) against the
  streamed (query tile, head) visits: Q and dO by TMA, the LSE and delta rows (strided by the head count, so not
  TMA-able) loaded by the loader warp into shared memory. S^T = K Q^T and dP^T = V dO^T are issued together,
  then dV += P^T dO and dK += dS^T Q with P^T and dS^T as register operands, both retired within the visit. The
  dQ kernel runs first (it writes delta). For Full and for BlockSparse with GQA the programs of one head are launched
  together (after every head's long, strided pairs) and (Full without GQA, BlockSparse with GQA) sweep their query
  tiles from the last down (`dkdv_pairs_first`, `dkdv_descends`); otherwise the heads are innermost and the sweep
  goes upwards.
* dQ of the backward (`_dq_ws_kernel`): the forward's program and loader; a consumer computes delta for its 64 rows,
  then per key tile S = Q K^T and dP = dO V^T together, dS = P (dP - delta), dQ += dS K.

Visited tiles, tile masks and the exact in-tile masks follow the Triton kernels (`_key_ranges`, `_query_ranges`,
`_allowed`). Scores are in log2 units; the LSE is written in log2 units, (total, H), as the Triton forward writes
it, so the Triton dQ kernel runs unchanged on the Gluon forward's output.

The pattern travels as the compile-time tuple ``PAT`` (`longgen.kernels.plan.PatternParams`). Which calls these
kernels take (CUDA capability 9.0, float16/bfloat16, head_dim 64 or 128, Full / SinkWindow / BlockSparse with
block_size >= 64, batches of equal-length sequences whose length is a multiple of 128, ``LONGGEN_GLUON``) is
decided in `longgen.kernels.dispatch`; everything else runs the Triton kernels. The design and its measured
choices: docs/kernels/attention.md; their history: CHANGELOG.md.
"""

from __future__ import annotations

import functools
import inspect

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from longgen.kernels.plan import K_BLOCK_SPARSE, K_FULL, K_SINK_WINDOW, LOG2E, PatternParams, Plan

# Triton 3.6 (the GPU machines) and later versions spell these differently; warp_specialize takes a list of
# (function, arguments) from 3.6 on (older Tritons run the Triton forward)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
NEW_WS_API = "functions_and_args" in inspect.signature(gl.warp_specialize).parameters

ROWS = 64  # query rows per consumer warpgroup; a program covers 2 * ROWS
BWD_TILE = 64  # dK/dV kernel: keys per consumer warpgroup, and queries per streamed Q / dO tile
FWD_BLOCK_N = 128  # forward: keys per streamed K / V tile (never wider than a BlockSparse block)
DQ_BLOCK_N, DQ_STAGES = 64, 4  # dQ kernel: keys per streamed K / V tile, and ring stages
GL_SINK_WINDOW = gl.constexpr(K_SINK_WINDOW)
GL_BLOCK_SPARSE = gl.constexpr(K_BLOCK_SPARSE)


# ---------------------------------------------------------------------------------------------------------------
# visited tiles and masks (scalar arithmetic; the semantics of triton_attention._key_ranges / _allowed)
@gluon.jit
def _visit_plan(g, m0, MR: gl.constexpr, PAT: gl.constexpr, BN: gl.constexpr):
    """(n_far, lo, n_visit) for query rows [m0, m0 + MR) of KV head g: `n_far` far tiles, then [lo, hi]."""
    PATTERN: gl.constexpr = PAT[0]
    SINK: gl.constexpr = PAT[1]
    WINDOW: gl.constexpr = PAT[2]
    PB: gl.constexpr = PAT[3]
    LOCAL: gl.constexpr = PAT[4]
    STRIDE: gl.constexpr = PAT[5]
    STEP: gl.constexpr = PAT[6]
    DENSE_FROM: gl.constexpr = PAT[7]
    hi = (m0 + MR - 1) // BN
    n_far = hi * 0
    lo = hi * 0
    if PATTERN == GL_SINK_WINDOW:
        n_far = gl.minimum((SINK + BN - 1) // BN, hi + 1)
        lo = gl.maximum(n_far, gl.maximum(m0 - WINDOW + 1, 0) // BN)
    elif PATTERN == GL_BLOCK_SPARSE:
        SUB: gl.constexpr = PB // BN
        dense = g >= DENSE_FROM
        local_lo = gl.where(dense, 0, gl.maximum(m0 // PB - LOCAL + 1, 0))
        j0 = (STRIDE - (g * STEP) % STRIDE) % STRIDE
        n_far = gl.where(dense, 0, gl.maximum((local_lo - j0 + STRIDE - 1) // STRIDE, 0)) * SUB
        lo = local_lo * SUB
    return n_far, lo, n_far + hi - lo + 1


@gluon.jit
def _tile_of(i, g, n_far, lo, PAT: gl.constexpr, BN: gl.constexpr):
    """Key tile of the i-th visit."""
    PATTERN: gl.constexpr = PAT[0]
    PB: gl.constexpr = PAT[3]
    STRIDE: gl.constexpr = PAT[5]
    STEP: gl.constexpr = PAT[6]
    far = i
    if PATTERN == GL_BLOCK_SPARSE:
        SUB: gl.constexpr = PB // BN
        j0 = (STRIDE - (g * STEP) % STRIDE) % STRIDE
        far = (j0 + (i // SUB) * STRIDE) * SUB + i % SUB
    return gl.where(i < n_far, far, lo + (i - n_far))


@gluon.jit
def _needs_mask(far, k0, g, mc, MR: gl.constexpr, PAT: gl.constexpr, BN: gl.constexpr):
    """Whether some (query in [mc, mc + MR), key in the BN keys at k0) pair is not allowed; `far`: the key tile
    is a BlockSparse strided block of this head (seen whole by every later query)."""
    PATTERN: gl.constexpr = PAT[0]
    last = mc + MR - 1
    masked = k0 + BN - 1 > mc  # the causal diagonal
    if PATTERN == GL_SINK_WINDOW:
        masked = masked | _leaves_window(k0, last, PAT, BN)
    elif PATTERN == GL_BLOCK_SPARSE:
        masked = masked | (_leaves_local(k0, g, last, PAT) & (far == 0))
    return masked


@gluon.jit
def _leaves_window(k0, last, PAT: gl.constexpr, BN: gl.constexpr):
    """SinkWindow: whether some non-sink key of the BN at k0 is out of the window of the query at `last`."""
    SINK: gl.constexpr = PAT[1]
    WINDOW: gl.constexpr = PAT[2]
    return (k0 + BN > SINK) & (last - k0 >= WINDOW)


@gluon.jit
def _leaves_local(k0, g, last, PAT: gl.constexpr):
    """BlockSparse: whether the query at `last` has left the local blocks of the key block at k0 (KV head g, not
    dense); the block may still be a strided one, seen whole."""
    PB: gl.constexpr = PAT[3]
    LOCAL: gl.constexpr = PAT[4]
    DENSE_FROM: gl.constexpr = PAT[7]
    return (last // PB - k0 // PB >= LOCAL) & (g < DENSE_FROM)


@gluon.jit
def _allowed(t, c, g, PAT: gl.constexpr):
    """Whether query positions `t` may attend key positions `c` (broadcast tensors) of KV head g."""
    PATTERN: gl.constexpr = PAT[0]
    SINK: gl.constexpr = PAT[1]
    WINDOW: gl.constexpr = PAT[2]
    PB: gl.constexpr = PAT[3]
    LOCAL: gl.constexpr = PAT[4]
    STRIDE: gl.constexpr = PAT[5]
    STEP: gl.constexpr = PAT[6]
    DENSE_FROM: gl.constexpr = PAT[7]
    ok = c <= t
    if PATTERN == GL_SINK_WINDOW:
        ok = ok & ((c < SINK) | (t - c < WINDOW))
    elif PATTERN == GL_BLOCK_SPARSE:
        j = c // PB
        ok = ok & (((t // PB - j) < LOCAL) | (((j + g * STEP) % STRIDE) == 0) | (g >= DENSE_FROM))
    return ok


@gluon.jit
def _mask_tile(s, k0, g, rows, cols, PAT: gl.constexpr):
    """Scores s of a tile (query positions rows, keys k0 + cols) with the pairs `_allowed` forbids set to -inf."""
    t = gl.expand_dims(rows, 1)
    c = gl.expand_dims(k0 + cols, 0)
    return gl.where(_allowed(t, c, g, PAT), s, -float("inf"))


@gluon.jit
def _edge_mask(s, t, c, k0, g, mc, MR: gl.constexpr, PAT: gl.constexpr, BN: gl.constexpr):
    """Scores s of a tile `_needs_mask` flagged (queries [mc, mc + MR), keys [k0, k0 + BN)) with the forbidden
    pairs set to -inf, testing per element only the constraint the tile can break: the causal diagonal alone
    (c <= t), the SinkWindow window start alone (t - c < WINDOW) or a far query tile's sink tile (a key test, c <
    SINK), a BlockSparse local edge (a query test); the full rule otherwise. t and c are the query and key positions
    broadcast to s's orientation (queries x keys in the forward and dQ, keys x queries in dK/dV). The same allowed
    pairs as `_allowed` (benchmarks/results/gluon_edge_masks.md)."""
    PATTERN: gl.constexpr = PAT[0]
    SINK: gl.constexpr = PAT[1]
    WINDOW: gl.constexpr = PAT[2]
    PB: gl.constexpr = PAT[3]
    LOCAL: gl.constexpr = PAT[4]
    STRIDE: gl.constexpr = PAT[5]
    STEP: gl.constexpr = PAT[6]
    causal = k0 + BN - 1 > mc  # some key after some query
    out = s
    if PATTERN == GL_SINK_WINDOW:
        if not _leaves_window(k0, mc + MR - 1, PAT, BN):
            out = gl.where(c <= t, s, -float("inf"))
        elif (not causal) & (k0 >= SINK):
            out = gl.where(t - c < WINDOW, s, -float("inf"))
        elif (not causal) & (mc - (k0 + BN - 1) >= WINDOW):  # every pair outside the window: only sinks are seen
            out = gl.where(c < SINK, s, -float("inf"))
        else:
            out = gl.where(_allowed(t, c, g, PAT), s, -float("inf"))
    elif PATTERN == GL_BLOCK_SPARSE:
        j = k0 // PB  # a key tile lies inside one block
        if not (_leaves_local(k0, g, mc + MR - 1, PAT) & (((j + g * STEP) % STRIDE) != 0)):
            out = gl.where(c <= t, s, -float("inf"))
        elif not causal:  # a local block some queries have left behind: a query test
            out = gl.where(t // PB - j < LOCAL, s, -float("inf"))
        else:
            out = gl.where(_allowed(t, c, g, PAT), s, -float("inf"))
    else:
        out = gl.where(c <= t, s, -float("inf"))
    return out


@gluon.jit
def _work_item(w, n_m, H, G: gl.constexpr, MR: gl.constexpr):
    """(m0, b, h, g) of work item w: query rows [m0, m0 + MR) of head h (KV head g) of sequence b; a head's
    row tiles in order of decreasing length (longest key ranges first), heads one after another."""
    bh = w // n_m
    h = bh % H
    return (n_m - 1 - w % n_m) * MR, bh // H, h, h // G


@gluon.jit
def _item_row(w, n_m, T, H, G: gl.constexpr, MR: gl.constexpr):
    """(first flattened row, query head) of work item w: where its Q rows start."""
    m0, b, h, _ = _work_item(w, n_m, H, G, MR)
    return b * T + m0, h


# ---------------------------------------------------------------------------------------------------------------
# partitions
@gluon.jit
def _consume(
    WHICH: gl.constexpr, q_desc, k_desc, v_desc, o_ptr, lse_ptr, q_smem, k_smem, v_smem, full, empty, q_bars,
    qk_scale, w0, step, n_work, T, H, PAT: gl.constexpr, G: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
    D: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    """One consumer warpgroup: for each work item w0, w0 + step, ... (`_work_item`) its query rows
    [m0 + WHICH * BM, + BM) against every visited key tile. The ring's visit count runs on across work items;
    the next item's Q is loaded as soon as this item's last S is in, and O goes straight from registers to memory,
    so a persistent program (step = the number of programs) does not drain its pipeline between items."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_l: gl.constexpr = gl.SliceLayout(1, o_layout)
    MR: gl.constexpr = 2 * BM
    n_m = T // MR
    qs = q_smem.index(WHICH)
    qb = q_bars.index(WHICH)
    offs = gl.arange(0, BM, layout=row_l)
    cols = gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
    o_offs = gl.expand_dims(gl.arange(0, BM, layout=orow_l).to(gl.int64) * (H * D), 1) + gl.expand_dims(
        gl.arange(0, D, layout=gl.SliceLayout(0, o_layout)), 0
    )
    zero_s = gl.zeros([BM, BN], gl.float32, s_layout)
    r, h = _item_row(w0, n_m, T, H, G, MR)
    mbarrier.expect(qb, q_desc.block_type.nbytes)
    _tma_load(q_desc, [r + WHICH * BM, h * D], qb, qs)
    c = w0 * 0  # visits consumed so far: the ring's position
    for w in range(w0, n_work, step):
        m0, b, h, g = _work_item(w, n_m, H, G, MR)
        n_far, lo, n_visit = _visit_plan(g, m0, MR, PAT, BN)
        mc = m0 + WHICH * BM
        row0 = b * T + mc  # first flattened row of this warpgroup
        rows = mc + offs  # positions in the sequence
        mbarrier.wait(qb, ((w - w0) // step) & 1)

        # first tile: no P V product yet
        st = c % STAGES
        mbarrier.wait(full.index(st), (c // STAGES) & 1)
        s = warpgroup_mma(qs, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False)
        k0 = _tile_of(0, g, n_far, lo, PAT, BN) * BN
        if _needs_mask(n_far > 0, k0, g, mc, BM, PAT, BN):
            s = _mask_tile(s, k0, g, rows, cols, PAT)
        m_i = gl.max(s, axis=1) * qk_scale
        m_use = gl.where(m_i > -float("inf"), m_i, 0.0)  # a row may see nothing in a tile (exp2(-inf) = 0)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
        l_i = gl.sum(p, axis=1)
        acc = gl.zeros([BM, D], gl.float32, o_layout)

        for i in range(1, n_visit):
            prev = (c + i - 1) % STAGES
            st = (c + i) % STAGES
            mbarrier.wait(full.index(st), ((c + i) // STAGES) & 1)
            # S of this tile and P V of the previous one in flight together; the softmax waits for S only
            s_tok = warpgroup_mma(qs, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            p_op = gl.convert_layout(p.to(k_desc.dtype), p_layout)
            acc_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
            k0 = _tile_of(i, g, n_far, lo, PAT, BN) * BN
            if _needs_mask(i < n_far, k0, g, mc, BM, PAT, BN):
                s = _mask_tile(s, k0, g, rows, cols, PAT)
            m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
            m_use = gl.where(m_new > -float("inf"), m_new, 0.0)
            alpha = gl.exp2(m_i - m_use)
            p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
            l_i = l_i * alpha + gl.sum(p, axis=1)
            m_i = m_new
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok, p_op))
            mbarrier.arrive(empty.index(prev), count=1)  # the previous tile's buffers go back to the loader
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_l), 1)

        if w + step < n_work:  # every S of this item is in: Q's buffer takes the next item's rows
            r, hn = _item_row(w + step, n_m, T, H, G, MR)
            mbarrier.expect(qb, q_desc.block_type.nbytes)
            _tma_load(q_desc, [r + WHICH * BM, hn * D], qb, qs)
        last = (c + n_visit - 1) % STAGES
        p_op = gl.convert_layout(p.to(k_desc.dtype), p_layout)
        acc = warpgroup_mma(p_op, v_smem.index(last), acc)
        mbarrier.arrive(empty.index(last), count=1)
        acc = acc / gl.expand_dims(gl.convert_layout(l_i, orow_l), 1)
        gl.store(lse_ptr + (row0 + offs) * H + h, m_i + gl.log2(l_i))  # log2 units, (total, H)
        gl.store(o_ptr + row0.to(gl.int64) * (H * D) + h * D + o_offs, acc.to(o_ptr.dtype.element_ty))
        c += n_visit


@gluon.jit
def _load_visits(
    k_desc, v_desc, k_smem, v_smem, full, empty, c, g, kv_row, kv_col, n_far, lo, n_visit, PAT: gl.constexpr,
    BN: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    """Streams one work item's visited K/V tiles into the ring from its position c (visits loaded before); waits
    for both consumers to release a buffer before reuse."""
    for i in range(n_visit):
        st = (c + i) % STAGES
        mbarrier.wait(empty.index(st), (((c + i) // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1 at once
        row = kv_row + _tile_of(i, g, n_far, lo, PAT, BN) * BN
        bar = full.index(st)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        _tma_load(k_desc, [row, kv_col], bar, k_smem.index(st))
        _tma_load(v_desc, [row, kv_col], bar, v_smem.index(st))


@gluon.jit
def _loader(
    k_desc, v_desc, k_smem, v_smem, full, empty, w0, step, n_work, T, H, PAT: gl.constexpr, G: gl.constexpr,
    MR: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    """The forward's loader: the visited K/V tiles of work items w0, w0 + step, ... one item after another."""
    n_m = T // MR
    c = w0 * 0  # visits loaded so far: the ring's position
    for w in range(w0, n_work, step):
        m0, b, _, g = _work_item(w, n_m, H, G, MR)
        n_far, lo, n_visit = _visit_plan(g, m0, MR, PAT, BN)
        _load_visits(
            k_desc, v_desc, k_smem, v_smem, full, empty, c, g, b * T, g * D, n_far, lo, n_visit, PAT, BN, STAGES
        )
        c += n_visit


@gluon.jit
def _fwd_ws_kernel(
    q_desc, k_desc, v_desc, o_ptr, lse_ptr, T, H, n_work, qk_scale, PAT: gl.constexpr, G: gl.constexpr,
    BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    """Work items (`_work_item`) w = program_id, + num_programs, ...: one per program when launched with one
    program per item, several when launched persistent (one program per SM)."""
    w0 = gl.program_id(0)
    step = gl.num_programs(0)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, BM, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BN, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BN, D], v_desc.layout)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for si in gl.static_range(STAGES):
        mbarrier.init(full.index(si), count=1)
        mbarrier.init(empty.index(si), count=2)  # both consumers release a buffer
    mbarrier.init(q_bars.index(0), count=1)
    mbarrier.init(q_bars.index(1), count=1)
    # two consumer warpgroups (the default partition and a worker) and the loader warp; the argument tuples are
    # written in place (a tuple held in a variable loses its constexpr entries)
    gl.warp_specialize(
        [
            (
                _consume,
                (
                    0, q_desc, k_desc, v_desc, o_ptr, lse_ptr, q_smem, k_smem, v_smem, full, empty, q_bars, qk_scale,
                    w0, step, n_work, T, H, PAT, G, BM, BN, D, STAGES,
                ),
            ),
            (
                _consume,
                (
                    1, q_desc, k_desc, v_desc, o_ptr, lse_ptr, q_smem, k_smem, v_smem, full, empty, q_bars, qk_scale,
                    w0, step, n_work, T, H, PAT, G, BM, BN, D, STAGES,
                ),
            ),
            (
                _loader,
                (k_desc, v_desc, k_smem, v_smem, full, empty, w0, step, n_work, T, H, PAT, G, 2 * BM, BN, D, STAGES),
            ),
        ],
        [4, 1],
        [240, 24],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# backward: dK and dV (the Triton dQ kernel runs first and writes delta = rowsum(o * do))
@gluon.jit
def _class_tile(m, far, j0, PAT: gl.constexpr, TL: gl.constexpr):
    """The m-th key tile (ascending) among the strided (`far`) or the local-only BlockSparse tiles of a KV head
    whose strided blocks are the blocks j = j0 (mod STRIDE)."""
    PB: gl.constexpr = PAT[3]
    STRIDE: gl.constexpr = PAT[5]
    SUB: gl.constexpr = PB // TL
    mb = m // SUB
    rel = mb - j0
    local = gl.where(rel < 0, mb, j0 + (rel // (STRIDE - 1)) * STRIDE + 1 + rel % (STRIDE - 1))
    return gl.where(far, j0 + mb * STRIDE, local) * SUB + m % SUB


@gluon.jit
def _key_tile_pair(lid, g, n_tiles, PAT: gl.constexpr, BY_KIND: gl.constexpr, TL: gl.constexpr):
    """The two key tiles of launch index `lid`: consecutive tiles (a, a + 1), or with BY_KIND (BlockSparse
    with stride > 1) consecutive tiles of one kind, strided pairs first: both tiles of a pair then see nearly the
    same query tiles (a strided block is seen by every later query, a local-only one by `local_blocks`), and the
    long pairs are scheduled first. A tile past the sequence (a list's end) means "nothing to do"."""
    PB: gl.constexpr = PAT[3]
    STRIDE: gl.constexpr = PAT[5]
    STEP: gl.constexpr = PAT[6]
    DENSE_FROM: gl.constexpr = PAT[7]
    a = 2 * lid
    b = a + 1
    if BY_KIND:
        SUB: gl.constexpr = PB // TL
        j0 = (STRIDE - (g * STEP) % STRIDE) % STRIDE
        n_blocks = (n_tiles + SUB - 1) // SUB
        n_far_pairs = (gl.maximum((n_blocks - j0 + STRIDE - 1) // STRIDE, 0) * SUB + 1) // 2
        far = lid < n_far_pairs
        m = gl.where(far, 2 * lid, 2 * (lid - n_far_pairs))
        sparse = g < DENSE_FROM
        a = gl.where(sparse, _class_tile(m, far, j0, PAT, TL), a)
        b = gl.where(sparse, _class_tile(m + 1, far, j0, PAT, TL), b)
    return a, b


@gluon.jit
def _query_range(kt, g, n_tiles, PAT: gl.constexpr, TL: gl.constexpr):
    """(lo, hi, far): the query tiles [lo, hi) that see key tile kt (TL keys; queries in tiles of TL), and whether
    it is a strided BlockSparse block of head g. An empty range for a tile past the sequence."""
    PATTERN: gl.constexpr = PAT[0]
    SINK: gl.constexpr = PAT[1]
    WINDOW: gl.constexpr = PAT[2]
    PB: gl.constexpr = PAT[3]
    LOCAL: gl.constexpr = PAT[4]
    STRIDE: gl.constexpr = PAT[5]
    STEP: gl.constexpr = PAT[6]
    DENSE_FROM: gl.constexpr = PAT[7]
    k0 = kt * TL
    hi = n_tiles + kt * 0
    far = kt < 0
    if PATTERN == GL_SINK_WINDOW:
        hi = gl.where(k0 < SINK, n_tiles, gl.minimum(n_tiles, (k0 + TL + WINDOW - 2) // TL + 1))
    elif PATTERN == GL_BLOCK_SPARSE:
        j = k0 // PB
        far = (((j + g * STEP) % STRIDE) == 0) | (g >= DENSE_FROM)
        hi = gl.where(far, n_tiles, gl.minimum(n_tiles, ((j + LOCAL) * PB - 1) // TL + 1))
    valid = kt < n_tiles
    return gl.where(valid, kt, 0), gl.where(valid, hi, 0), far


@gluon.jit
def _query_tile(i, t1, n_first, t2, G: gl.constexpr, DESCEND: gl.constexpr):
    """Query tile of the i-th visit: n_first tiles from t1, then the rest from t2, ascending, or with DESCEND
    descending from t1 and t2; each tile once per query head of the group (heads innermost)."""
    u = i // G
    d: gl.constexpr = -1 if DESCEND else 1
    return gl.where(u < n_first, t1 + d * u, t2 + d * (u - n_first))


@gluon.jit
def _pass_visits(full, empty, v0, v1, STAGES: gl.constexpr):
    """Hand visits [v0, v1), which this consumer has no part in, back to the loader (after the loader filled them,
    so that each release counts towards its own buffer phase)."""
    for i in range(v0, v1):
        mbarrier.wait(full.index(i % STAGES), (i // STAGES) & 1)
        mbarrier.arrive(empty.index(i % STAGES), count=1)


@gluon.jit
def _bwd_visits(
    ks, vs, kvb, q_smem, do_smem, lse_smem, delta_smem, full, empty, qk_scale, g, k0, far, v0, v1, t1, n_first, t2,
    PAT: gl.constexpr, G: gl.constexpr, TL: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
    DESCEND: gl.constexpr,
):  # fmt: skip
    """A consumer's visits [v0, v1) against its key tile (K, V in ks, vs once kvb passes; keys from k0): dK
    (unscaled) and dV, all products retired, the last visit's buffers released."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, TL, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    dt: gl.constexpr = q_smem.dtype
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    keys = gl.arange(0, TL, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, TL, layout=col_layout)
    zero_s = gl.zeros([TL, TL], gl.float32, s_layout)
    # the accumulators are loop-carried as asynchronous results (retired at the end of every visit)
    dk = warpgroup_mma_init(gl.zeros([TL, D], gl.float32, acc_layout))
    dv = warpgroup_mma_init(gl.zeros([TL, D], gl.float32, acc_layout))
    # P^T and dS^T converted in place to the A-operand layout of dV / dK; a register operand is retired within the
    # visit that issued it (one carried around the loop makes ptxas serialise the wgmma chain)
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    if v0 < v1:
        mbarrier.wait(kvb, 0)  # K and V are in
    for i in range(v0, v1):
        st = i % STAGES
        q0 = _query_tile(i, t1, n_first, t2, G, DESCEND) * TL
        qs = q_smem.index(st)
        dos = do_smem.index(st)
        mbarrier.wait(full.index(st), (i // STAGES) & 1)
        s_tok = warpgroup_mma(ks, qs.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(vs, dos.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        # all but dP^T done: S^T
        s, dk, dv = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, dk, dv))
        if i > v0:
            mbarrier.arrive(empty.index((i - 1) % STAGES), count=1)
        if _needs_mask(far, k0, g, q0, TL, PAT, TL):
            qpos = gl.expand_dims(q0 + cols, 0)
            kpos = gl.expand_dims(k0 + keys, 1)
            s = gl.where(_allowed(qpos, kpos, g, PAT), s, -float("inf"))
        p = gl.exp2(s * qk_scale - gl.expand_dims(lse_smem.index(st).load(col_layout), 0))
        p_op = gl.convert_layout(p.to(dt), op_layout)
        dv = warpgroup_mma(p_op, dos, dv, is_async=True)
        dp = warpgroup_mma_wait(num_outstanding=1, deps=(dp_tok,))
        ds = p * (dp - gl.expand_dims(delta_smem.index(st).load(col_layout), 0))
        ds_op = gl.convert_layout(ds.to(dt), op_layout)
        dk = warpgroup_mma(ds_op, qs, dk, is_async=True)
        dk_done, dv_done, p_op, ds_op = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv, p_op, ds_op))
        dk = warpgroup_mma_init(dk_done)
        dv = warpgroup_mma_init(dv_done)
    dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))
    if v0 < v1:
        mbarrier.arrive(empty.index((v1 - 1) % STAGES), count=1)
    return dk, dv


@gluon.jit
def _store_dkdv(dk, dv, sm_scale, ks, vs, dk_desc, dv_desc, row, col):
    """Stages dK (scaled) and dV in their key tile's K / V buffers, done with, and issues their TMA stores."""
    ks.store((dk * sm_scale).to(dk_desc.dtype))
    vs.store(dv.to(dv_desc.dtype))
    fence_async_shared()
    _tma_store(dk_desc, [row, col], ks)
    _tma_store(dv_desc, [row, col], vs)


@gluon.jit
def _bwd_consume(
    WHICH: gl.constexpr, q_desc, k_desc, v_desc, dk_desc, dv_desc, q_smem, do_smem, lse_smem, delta_smem, k_smem,
    v_smem, full, empty, kv_bars, qk_scale, sm_scale, g, H, row0, kt, far, v0, v1, t1, n_first, t2, n_visit,
    PAT: gl.constexpr, G: gl.constexpr, TL: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr,
    DESCEND: gl.constexpr,
):  # fmt: skip
    """One consumer warpgroup: dK, dV of key tile kt (TL keys) over its visits [v0, v1) of the streamed
    (query tile, head) visits. Transposed scores S^T = K Q^T (keys x queries), so that P^T and dS^T are register
    operands of dV += P^T dO and dK += dS^T Q. Per visit the four products are issued asynchronously: S^T and
    dP^T = V dO^T together, dV once P^T is known (while dP^T completes), dK once dS^T is; dK and dV are retired at
    the visit's end (register operands cannot stay in flight around the loop), and the visit's buffers go back to
    the loader once the next visit's S^T is in (P^T / dS^T staged in shared memory instead, with dK kept in flight,
    was slower: CHANGELOG.md, 2026-12-02)."""
    k0 = kt * TL
    ks = k_smem.index(WHICH)
    vs = v_smem.index(WHICH)
    kvb = kv_bars.index(WHICH)
    mine = v0 < v1
    if mine:
        mbarrier.expect(kvb, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        _tma_load(k_desc, [row0 + k0, g * D], kvb, ks)
        _tma_load(v_desc, [row0 + k0, g * D], kvb, vs)
    _pass_visits(full, empty, 0, v0, STAGES)
    dk, dv = _bwd_visits(
        ks,
        vs,
        kvb,
        q_smem,
        do_smem,
        lse_smem,
        delta_smem,
        full,
        empty,
        qk_scale,
        g,
        k0,
        far,
        v0,
        v1,
        t1,
        n_first,
        t2,
        PAT,
        G,
        TL,
        D,
        STAGES,
        DESCEND,
    )
    _pass_visits(full, empty, v1, n_visit, STAGES)
    if mine:  # K and V are no longer needed: their buffers stage dK, dV
        _store_dkdv(dk, dv, sm_scale, ks, vs, dk_desc, dv_desc, row0 + k0, g * D)
        tma.store_wait(pendings=0)


@gluon.jit
def _bwd_loader(
    q_desc, do_desc, lse_ptr, delta_ptr, q_smem, do_smem, lse_smem, delta_smem, full, empty, g, H, row0, t1, n_first,
    t2, n_visit, G: gl.constexpr, TL: gl.constexpr, D: gl.constexpr, STAGES: gl.constexpr, DESCEND: gl.constexpr,
):  # fmt: skip
    """The dK/dV loader: streams the program's (query tile, head) visits into the ring, Q and dO tiles with TMA,
    and the tile's LSE and delta (strided by the head count in memory, so not TMA-able) loaded coalesced and stored
    to shared memory; a buffer is full once the TMA bytes have landed and this warp has arrived after its stores."""
    offs = gl.arange(0, TL, layout=gl.BlockedLayout([TL // 32], [32], [1], [0]))
    # the vectors are loaded one visit ahead, so that their latency overlaps the wait for a free buffer (a program
    # without visits, a tile pair past the sequence end, descends from query tile -1: clamped to stay in bounds)
    r = (row0 + gl.maximum(_query_tile(0, t1, n_first, t2, G, DESCEND), 0) * TL + offs) * H + g * G
    lse = gl.load(lse_ptr + r)
    delta = gl.load(delta_ptr + r)
    for i in range(n_visit):
        st = i % STAGES
        mbarrier.wait(empty.index(st), ((i // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1 at once
        row = row0 + _query_tile(i, t1, n_first, t2, G, DESCEND) * TL
        h = g * G + i % G
        bar = full.index(st)
        mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        _tma_load(q_desc, [row, h * D], bar, q_smem.index(st))
        _tma_load(do_desc, [row, h * D], bar, do_smem.index(st))
        j = gl.minimum(i + 1, n_visit - 1)
        r = (row0 + _query_tile(j, t1, n_first, t2, G, DESCEND) * TL + offs) * H + g * G + j % G
        lse_next = gl.load(lse_ptr + r)
        delta_next = gl.load(delta_ptr + r)
        lse_smem.index(st).store(lse)
        delta_smem.index(st).store(delta)
        mbarrier.arrive(bar, count=1)
        lse = lse_next
        delta = delta_next


@gluon.jit
def _dkdv_item(
    p, SH, NP, LEAD, HKV, T, PAT: gl.constexpr, G: gl.constexpr, BY_KIND: gl.constexpr, TL: gl.constexpr,
    DESCEND: gl.constexpr,
):  # fmt: skip
    """The dK/dV work item of launch index p (a pair of key tiles of one sequence and KV head): (g, row0, a, far_a,
    v0_a, v1_a, b, far_b, v0_b, v1_b, t1, n_first, t2, n_visit) -- the KV head, the sequence's first flattened row,
    each consumer's key tile, strided flag and run of visits, and the visits' query tiles (`_query_tile`)."""
    # launch order (`dkdv_lead_pairs`): the first LEAD pair indices of every (sequence, KV head) SH with the heads
    # innermost (the long pairs: every head's start together, not one head's at the end), then one head's remaining
    # pairs after another (the resident programs then stream the same head's Q / dO rows from L2, as the forward's
    # and dQ's programs share K / V); LEAD = NP is heads innermost throughout, LEAD = 0 pairs first throughout
    n_lead = LEAD * SH
    rest = p - n_lead
    n_rest = gl.maximum(NP - LEAD, 1)
    sh = gl.where(p < n_lead, p % SH, rest // n_rest)
    lid = gl.where(p < n_lead, p // SH, LEAD + rest % n_rest)
    g = sh % HKV
    row0 = (sh // HKV) * T
    n_tiles = T // TL
    a, b = _key_tile_pair(lid, g, n_tiles, PAT, BY_KIND, TL)
    lo_a, hi_a, far_a = _query_range(a, g, n_tiles, PAT, TL)
    lo_b, hi_b, far_b = _query_range(b, g, n_tiles, PAT, TL)
    n1 = hi_a - lo_a
    start2 = gl.maximum(hi_a, lo_b)
    n2 = gl.maximum(hi_b - start2, 0)
    n_visit = (n1 + n2) * G
    # visits: tile a's query tiles, then those of tile b past them (each consumer's visits are one contiguous run:
    # a's [v0_a, v1_a), b's [v0_b, v1_b)); DESCEND reverses the order: the same two runs of tiles from the top
    # down, and the consumers' runs mirrored
    valid_b = lo_b < hi_b
    v0_a = n1 * 0
    v1_a = n1 * G
    v0_b = gl.where(valid_b, (gl.minimum(lo_b, hi_a) - lo_a) * G, 0)
    v1_b = gl.where(valid_b, gl.where(hi_b <= hi_a, (hi_b - lo_a) * G, n_visit), 0)
    t1, n_first, t2 = lo_a, n1, start2
    if DESCEND:
        t1, n_first, t2 = start2 + n2 - 1, n2, hi_a - 1
        v0_a, v1_a = n_visit - v1_a, n_visit - v0_a
        v0_b, v1_b = n_visit - v1_b, n_visit - v0_b
    return g, row0, a, far_a, v0_a, v1_a, b, far_b, v0_b, v1_b, t1, n_first, t2, n_visit


@gluon.jit
def _dkdv_ws_kernel(
    q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc, lse_ptr, delta_ptr, T, H, HKV, SH, NP, LEAD, qk_scale,
    sm_scale, PAT: gl.constexpr, G: gl.constexpr, BY_KIND: gl.constexpr, TL: gl.constexpr, D: gl.constexpr,
    STAGES: gl.constexpr, DESCEND: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    g, row0, a, far_a, v0_a, v1_a, b, far_b, v0_b, v1_b, t1, n_first, t2, n_visit = _dkdv_item(
        gl.program_id(0), SH, NP, LEAD, HKV, T, PAT, G, BY_KIND, TL, DESCEND
    )
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES, TL, D], q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [STAGES, TL, D], do_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [2, TL, D], k_desc.layout)  # one K / V tile per consumer
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [2, TL, D], v_desc.layout)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    vec_layout: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, TL], vec_layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, TL], vec_layout)
    for si in gl.static_range(STAGES):
        mbarrier.init(full.index(si), count=2)  # the TMA transaction and the loader's LSE / delta stores
        mbarrier.init(empty.index(si), count=2)
    for bi in gl.static_range(2):
        mbarrier.init(kv_bars.index(bi), count=1)
    gl.warp_specialize(
        [
            (
                _bwd_consume,
                (
                    0, q_desc, k_desc, v_desc, dk_desc, dv_desc, q_smem, do_smem, lse_smem, delta_smem, k_smem,
                    v_smem, full, empty, kv_bars, qk_scale, sm_scale, g, H, row0, a, far_a, v0_a, v1_a, t1, n_first,
                    t2, n_visit, PAT, G, TL, D, STAGES, DESCEND,
                ),
            ),
            (
                _bwd_consume,
                (
                    1, q_desc, k_desc, v_desc, dk_desc, dv_desc, q_smem, do_smem, lse_smem, delta_smem, k_smem,
                    v_smem, full, empty, kv_bars, qk_scale, sm_scale, g, H, row0, b, far_b, v0_b, v1_b, t1, n_first,
                    t2, n_visit, PAT, G, TL, D, STAGES, DESCEND,
                ),
            ),
            (
                _bwd_loader,
                (
                    q_desc, do_desc, lse_ptr, delta_ptr, q_smem, do_smem, lse_smem, delta_smem, full, empty, g, H,
                    row0, t1, n_first, t2, n_visit, G, TL, D, STAGES, DESCEND,
                ),
            ),
        ],
        [4, 1],
        [240, 24],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# backward: dQ (and delta = rowsum(o * do) for the dK/dV kernel); query rows per program as in the forward
@gluon.jit
def _dq_consume(
    WHICH: gl.constexpr, q_desc, k_desc, do_desc, dq_desc, o_ptr, do_ptr, lse_ptr, dlse_ptr, delta_ptr, q_smem,
    do_smem, k_smem, v_smem, full, empty, q_bars, qk_scale, sm_scale, m0, g, h, H, q_row, q_col, n_far, lo, n_visit,
    PAT: gl.constexpr, HAS_DLSE: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr,
    STAGES: gl.constexpr,
):  # fmt: skip
    """One consumer warpgroup: dQ of query rows [m0 + WHICH * BM, + BM) over every visited key tile. Per tile
    S = Q K^T and dP = dO V^T are issued together, P = exp2(S - lse) once S is in, dS = P (dP - delta), and
    dQ += dS K with dS as a register operand; the tile's buffers go back to the loader once it is done. (Keeping
    dQ in flight into the next tile, as the dK/dV kernel does with dK and dV, makes ptxas serialise this kernel's
    wgmma chain: benchmarks/gluon_resources.py.) First computes delta (minus the LSE gradient) of its rows
    and writes it for the dK/dV kernel."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    io_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])  # coalesced 16-byte loads of a tile
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    dt: gl.constexpr = q_desc.dtype
    row0 = q_row + WHICH * BM  # first flattened row of this warpgroup
    mc = m0 + WHICH * BM  # its first position in the sequence
    qs = q_smem.index(WHICH)
    dos = do_smem.index(WHICH)
    qb = q_bars.index(WHICH)
    mbarrier.expect(qb, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
    _tma_load(q_desc, [row0, q_col], qb, qs)
    _tma_load(do_desc, [row0, q_col], qb, dos)
    r_io = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, io_l))
    offs = gl.expand_dims(r_io * (H * D) + q_col, 1) + gl.expand_dims(
        gl.arange(0, D, layout=gl.SliceLayout(0, io_l)), 0
    )
    delta = gl.sum(gl.load(o_ptr + offs).to(gl.float32) * gl.load(do_ptr + offs).to(gl.float32), axis=1)
    if HAS_DLSE:  # d lse / d score = p: a gradient on the returned LSE shifts delta
        delta -= gl.load(dlse_ptr + r_io * H + h)
    gl.store(delta_ptr + r_io * H + h, delta)
    delta = gl.convert_layout(delta, row_l)
    offs_r = gl.arange(0, BM, layout=row_l)
    lse = gl.load(lse_ptr + (row0 + offs_r) * H + h)
    rows = mc + offs_r
    cols = gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
    zero_s = gl.zeros([BM, BN], gl.float32, s_layout)
    dq = gl.zeros([BM, D], gl.float32, acc_layout)
    mbarrier.wait(qb, 0)
    for i in range(n_visit):
        st = i % STAGES
        mbarrier.wait(full.index(st), (i // STAGES) & 1)
        s_tok = warpgroup_mma(qs, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(dos, v_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
        k0 = _tile_of(i, g, n_far, lo, PAT, BN) * BN
        if _needs_mask(i < n_far, k0, g, mc, BM, PAT, BN):
            s = _edge_mask(s, gl.expand_dims(rows, 1), gl.expand_dims(k0 + cols, 0), k0, g, mc, BM, PAT, BN)
        p = gl.exp2(s * qk_scale - gl.expand_dims(lse, 1))
        dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp_tok,))
        ds_op = gl.convert_layout((p * (dp - gl.expand_dims(delta, 1))).to(dt), op_layout)
        dq_tok = warpgroup_mma(ds_op, k_smem.index(st), dq, is_async=True)
        dq, ds_op = warpgroup_mma_wait(num_outstanding=0, deps=(dq_tok, ds_op))
        mbarrier.arrive(empty.index(st), count=1)
    qs.store((dq * sm_scale).to(dq_desc.dtype))  # Q is no longer needed: its buffer stages dQ
    fence_async_shared()
    _tma_store(dq_desc, [row0, q_col], qs)
    tma.store_wait(pendings=0)


@gluon.jit
def _dq_ws_kernel(
    q_desc, k_desc, v_desc, do_desc, dq_desc, o_ptr, do_ptr, lse_ptr, dlse_ptr, delta_ptr, T, H, qk_scale, sm_scale,
    PAT: gl.constexpr, G: gl.constexpr, HAS_DLSE: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr,
    STAGES: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    MR: gl.constexpr = 2 * BM
    pid_m = T // MR - 1 - gl.program_id(0)  # longest key ranges first
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // G
    m0 = pid_m * MR
    q_row = b * T + m0
    q_col = h * D
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, BM, D], q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [2, BM, D], do_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BN, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BN, D], v_desc.layout)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for si in gl.static_range(STAGES):
        mbarrier.init(full.index(si), count=1)
        mbarrier.init(empty.index(si), count=2)  # both consumers release a buffer
    mbarrier.init(q_bars.index(0), count=1)
    mbarrier.init(q_bars.index(1), count=1)
    n_far, lo, n_visit = _visit_plan(g, m0, MR, PAT, BN)
    # the two consumers' argument tuples differ only in WHICH; they are written in place (a tuple held in a
    # variable loses its constexpr entries)
    gl.warp_specialize(
        [
            (
                _dq_consume,
                (
                    0, q_desc, k_desc, do_desc, dq_desc, o_ptr, do_ptr, lse_ptr, dlse_ptr, delta_ptr, q_smem, do_smem,
                    k_smem, v_smem, full, empty, q_bars, qk_scale, sm_scale, m0, g, h, H, q_row, q_col, n_far, lo,
                    n_visit, PAT, HAS_DLSE, BM, BN, D, STAGES,
                ),
            ),
            (
                _dq_consume,
                (
                    1, q_desc, k_desc, do_desc, dq_desc, o_ptr, do_ptr, lse_ptr, dlse_ptr, delta_ptr, q_smem, do_smem,
                    k_smem, v_smem, full, empty, q_bars, qk_scale, sm_scale, m0, g, h, H, q_row, q_col, n_far, lo,
                    n_visit, PAT, HAS_DLSE, BM, BN, D, STAGES,
                ),
            ),
            (
                _load_visits,
                (  # one work item per program: the ring starts at its beginning (0)
                    k_desc, v_desc, k_smem, v_smem, full, empty, 0, g, b * T, g * D, n_far, lo, n_visit, PAT, BN,
                    STAGES,
                ),
            ),
        ],
        [4, 1],
        [240, 24],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# host side: launch order and tiles (measured choices, see docs/kernels/attention.md)
def dkdv_descends(group: int, kind: int) -> bool:
    """Whether the dK/dV kernel sweeps its query tiles from the last down (DESCEND): for Full without GQA and for
    BlockSparse with GQA."""
    return (group == 1 and kind == K_FULL) or (kind == K_BLOCK_SPARSE and group > 1)


def dkdv_pairs_first(group: int, kind: int) -> bool:
    """Whether the dK/dV programs are launched one head's key-tile pairs after another (after every head's long
    pairs, `dkdv_lead_pairs`) rather than with the heads innermost: for Full, whose concurrent programs of one head
    then read the same Q / dO rows from L2, and for BlockSparse with GQA."""
    return kind == K_FULL or (kind == K_BLOCK_SPARSE and group > 1)


def _long_pairs(pat: PatternParams, n_tiles: int) -> int:
    """Launch indices (per KV head) of the dK/dV pairs whose key tiles every later query sees: SinkWindow's sink
    tiles; BlockSparse's strided tiles, which `_key_tile_pair` pairs first (the most any head has); none for Full,
    whose pairs shorten steadily."""
    if pat.kind == K_SINK_WINDOW:
        return (-(-pat.sink // BWD_TILE) + 1) // 2
    if pat.kind == K_BLOCK_SPARSE and pat.stride > 1:
        sub = pat.block // BWD_TILE
        n_blocks = -(-n_tiles // sub)
        return (-(-n_blocks // pat.stride) * sub + 1) // 2
    return 0


def dkdv_lead_pairs(group: int, pat: PatternParams, n_tiles: int, n_pairs: int) -> int:
    """How many of each head's `n_pairs` dK/dV launch indices go first with the heads innermost (the kernel's LEAD):
    all of them unless `dkdv_pairs_first`, else the long pairs (`_long_pairs`), so that no head's long pairs start
    at the end of the launch and run on alone."""
    return min(n_pairs, _long_pairs(pat, n_tiles)) if dkdv_pairs_first(group, pat.kind) else n_pairs


def fwd_persistent(kind: int) -> bool:
    """Whether the forward is launched persistent, one program per SM taking the work items in turn, instead of one
    program per work item: for the sparse patterns, whose short key ranges leave a program's prologue and epilogue
    a large share of its time."""
    return kind != K_FULL


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _fwd_programs(kind: int, n_work: int, device: torch.device, tuning) -> int:
    """Programs to launch the forward with for `n_work` work items of 128 query rows (see `fwd_persistent`)."""
    if not fwd_persistent(kind):
        return n_work
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return min(n_work, tuning.persistent_programs or sms)


def _desc(x: torch.Tensor, rows: int) -> TensorDescriptor:
    """TMA descriptor of a (total, heads, head_dim) tensor viewed as (total, heads * head_dim), tiles (rows, d)."""
    total, heads, d = x.shape
    dt = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    x2 = x.view(total, heads * d)
    layout = gl.NVMMASharedLayout.get_default_for([rows, d], dt)
    return TensorDescriptor(x2, list(x2.shape), list(x2.stride()), [rows, d], layout)


def forward_tiles(kind: int, block_size: int, stages: int = 0) -> tuple[int, int]:
    """(keys per K/V tile, ring stages) of the forward: 128-key tiles, clamped to the pattern block for BlockSparse
    (a key tile never straddles two blocks), with one stage more for 64-key tiles (`stages` > 0 overrides)."""
    bn = FWD_BLOCK_N if kind != K_BLOCK_SPARSE else min(FWD_BLOCK_N, block_size)
    return bn, stages or (3 if bn == 128 else 4)


def dq_tiles(kind: int, block_size: int) -> tuple[int, int]:
    """(keys per K/V tile, ring stages) of the dQ kernel: 64 / 4, the tile clamped to the pattern block for
    BlockSparse (a key tile never straddles two blocks) with the ring's bytes kept."""
    bn = DQ_BLOCK_N if kind != K_BLOCK_SPARSE else min(DQ_BLOCK_N, block_size)
    return bn, DQ_STAGES * DQ_BLOCK_N // bn


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse in log2 units ``(total, H)``) for inputs `longgen.kernels.dispatch.hopper_kernels` gave to "fwd"."""
    total, H, D = q.shape
    T = plan.max_len
    BN, stages = forward_tiles(plan.kind, plan.pat.block, plan.tuning.fwd_stages)
    o = torch.empty_like(q)
    lse2 = torch.empty(total, H, dtype=torch.float32, device=q.device)
    n_work = T // (2 * ROWS) * plan.n_seqs * H
    _fwd_ws_kernel[(_fwd_programs(plan.kind, n_work, q.device, plan.tuning),)](
        _desc(q, ROWS), _desc(k, BN), _desc(v, BN), o, lse2, T, H, n_work, plan.shape.scale * LOG2E,
        PAT=tuple(plan.pat), G=plan.shape.group, BM=ROWS, BN=BN, D=D, STAGES=stages, num_warps=4,
    )  # fmt: skip
    return o, lse2


def dq_delta(q, k, v, o, do, lse2, dlse: torch.Tensor | None, delta, dq, plan: Plan) -> None:
    """Writes dQ (like q) and delta = rowsum(o * do) - dlse ``(total, H)`` float32 (for `dkdv`) of a call given to
    "dq": q, o, do ``(total, H, d)``, k, v ``(total, Hkv, d)``, contiguous and 16-byte aligned; ``lse2`` the
    forward's LSE in log2 units, ``dlse`` the LSE gradient (natural units) or None."""
    H, D = q.shape[1:]
    bn, stages = dq_tiles(plan.kind, plan.pat.block)
    _dq_ws_kernel[(plan.max_len // (2 * ROWS), plan.n_seqs * H)](
        _desc(q, ROWS), _desc(k, bn), _desc(v, bn), _desc(do, ROWS), _desc(dq, ROWS), o, do, lse2,
        delta if dlse is None else dlse,  # not read without an LSE gradient
        delta, plan.max_len, H, plan.shape.scale * LOG2E, plan.shape.scale,
        PAT=tuple(plan.pat), G=plan.shape.group, HAS_DLSE=dlse is not None, BM=ROWS, BN=bn, D=D, STAGES=stages,
        num_warps=4,
    )  # fmt: skip


def dkdv(q, k, v, do, lse2, delta, dk, dv, plan: Plan) -> None:
    """Writes dK, dV (like k, v) of a call given to "dkdv": q, do ``(total, H, d)``, k, v ``(total, Hkv, d)``,
    contiguous and 16-byte aligned; ``lse2`` (log2 units) and ``delta`` = rowsum(o * do) ``(total, H)`` float32, as
    the dQ kernel leaves them."""
    H, D = q.shape[1:]
    hkv = k.shape[1]
    pat, G = plan.pat, plan.shape.group
    n_tiles = plan.max_len // BWD_TILE
    by_kind = pat.kind == K_BLOCK_SPARSE and pat.stride > 1
    # pairs of key tiles per program; pairing by kind needs more than half the tiles: one pair per odd-length list,
    # and the strided list counts the tiles of a last block past the sequence end (fewer than PB / 64 tiles;
    # programs left over find only tiles past the end and exit)
    extra = pat.block // BWD_TILE if by_kind else 0
    n_pairs = (n_tiles + 1) // 2 + extra
    sh = plan.n_seqs * hkv
    lead = dkdv_lead_pairs(G, pat, n_tiles, n_pairs)
    _dkdv_ws_kernel[(sh * n_pairs,)](
        _desc(q, BWD_TILE), _desc(do, BWD_TILE), _desc(k, BWD_TILE), _desc(v, BWD_TILE), _desc(dk, BWD_TILE),
        _desc(dv, BWD_TILE), lse2, delta, plan.max_len, H, hkv, sh, n_pairs, lead, plan.shape.scale * LOG2E,
        plan.shape.scale, PAT=tuple(pat), G=G, BY_KIND=by_kind, TL=BWD_TILE, D=D, STAGES=plan.tuning.bwd_stages,
        DESCEND=dkdv_descends(G, pat.kind), num_warps=4,
    )  # fmt: skip


__all__ = ["dkdv", "dq_delta", "forward"]
