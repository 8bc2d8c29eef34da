"""Hopper (sm_90) forward kernel in Gluon: warp-specialised, FlashAttention-3 style.

The Triton forward (`triton_attention._fwd_kernel`) runs every warp through load, matmul and softmax in turn; on
an H100 that leaves the tensor cores idle during the softmax. This kernel splits a program into three partitions
(Gluon's `warp_specialize`):

* a loader warp that streams the visited K/V tiles with TMA into a ring of `STAGES` shared-memory buffers
  (a "full" mbarrier per buffer for the loader -> consumers hand-off, an "empty" one for the way back);
* two consumer warpgroups, each owning 64 query rows of the program's 128: per key tile, S = Q K^T and the
  previous tile's O += P V are issued as asynchronous wgmma together, the softmax of S runs while the P V
  product is in flight, and the two warpgroups drift into alternating matmul / softmax phases on their own.
  Registers are rebalanced with `setmaxnreg` (consumers 240, loader 24).

Visited key tiles, tile masks and the exact in-tile masks follow the Triton kernels (`_key_ranges`,
`_allowed`): far tiles (SinkWindow's sink, BlockSparse's strided blocks) first, then the contiguous range; a
tile is masked only where some pair in it is not allowed. Scores are in log2 units; the LSE is written in log2
units, (total, H), as the Triton forward writes it, so the Triton backward runs unchanged on its output.

Scope (everything else runs the Triton forward): CUDA capability 9.0, float16/bfloat16, head_dim 64 or 128,
Full / SinkWindow / BlockSparse with block_size >= 64, batches of equal-length sequences (no padding, no
cu_seqlens, no query offset) whose length is a multiple of 128, contiguous (total, heads, head_dim) tensors.
``LONGGEN_GLUON=0`` turns it off. Measured choices and timings: docs/kernels/attention.md.
"""

from __future__ import annotations

import inspect
import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from longgen.kernels.triton_attention import K_BLOCK_SPARSE, K_FULL, K_SINK_WINDOW, _Plan

# Triton 3.6 (the GPU machines) and later versions spell these differently; warp_specialize takes a list of
# (function, arguments) from 3.6 on (older Tritons run the Triton forward)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
_NEW_WS_API = "functions_and_args" in inspect.signature(gl.warp_specialize).parameters

ROWS = 64  # query rows per consumer warpgroup; a program covers 2 * ROWS
HEAD_DIMS = (64, 128)
GL_SINK_WINDOW = gl.constexpr(K_SINK_WINDOW)
GL_BLOCK_SPARSE = gl.constexpr(K_BLOCK_SPARSE)


# ---------------------------------------------------------------------------------------------------------------
# visited tiles and masks (scalar arithmetic; the semantics of triton_attention._key_ranges / _allowed)
@gluon.jit
def _visit_plan(
    g,
    m0,
    MR: gl.constexpr,
    PATTERN: gl.constexpr,
    SINK: gl.constexpr,
    WINDOW: gl.constexpr,
    PB: gl.constexpr,
    LOCAL: gl.constexpr,
    STRIDE: gl.constexpr,
    STEP: gl.constexpr,
    DENSE_FROM: gl.constexpr,
    BN: gl.constexpr,
):
    """(n_far, lo, n_visit) for query rows [m0, m0 + MR) of KV head g: `n_far` far tiles, then [lo, hi]."""
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
def _tile_of(
    i, g, n_far, lo, PATTERN: gl.constexpr, PB: gl.constexpr, STRIDE: gl.constexpr, STEP: gl.constexpr, BN: gl.constexpr
):
    """Key tile of the i-th visit."""
    far = i
    if PATTERN == GL_BLOCK_SPARSE:
        SUB: gl.constexpr = PB // BN
        j0 = (STRIDE - (g * STEP) % STRIDE) % STRIDE
        far = (j0 + (i // SUB) * STRIDE) * SUB + i % SUB
    return gl.where(i < n_far, far, lo + (i - n_far))


@gluon.jit
def _needs_mask(
    i,
    n_far,
    k0,
    g,
    mc,
    MR: gl.constexpr,
    PATTERN: gl.constexpr,
    SINK: gl.constexpr,
    WINDOW: gl.constexpr,
    PB: gl.constexpr,
    LOCAL: gl.constexpr,
    DENSE_FROM: gl.constexpr,
    BN: gl.constexpr,
):
    """Whether some (query in [mc, mc + MR), key in the tile at k0) pair of the i-th visit is not allowed."""
    last = mc + MR - 1
    masked = k0 + BN - 1 > mc  # the causal diagonal
    if PATTERN == GL_SINK_WINDOW:
        masked = masked | ((k0 + BN > SINK) & (last - k0 >= WINDOW))
    elif PATTERN == GL_BLOCK_SPARSE:
        local_edge = (last // PB - k0 // PB >= LOCAL) & (g < DENSE_FROM)
        masked = masked | ((i >= n_far) & local_edge)  # far (strided) tiles are seen whole
    return masked


@gluon.jit
def _apply_mask(
    s,
    k0,
    g,
    rows,
    cols,
    PATTERN: gl.constexpr,
    SINK: gl.constexpr,
    WINDOW: gl.constexpr,
    PB: gl.constexpr,
    LOCAL: gl.constexpr,
    STRIDE: gl.constexpr,
    STEP: gl.constexpr,
    DENSE_FROM: gl.constexpr,
):
    t = gl.expand_dims(rows, 1)
    c = gl.expand_dims(k0 + cols, 0)
    ok = c <= t
    if PATTERN == GL_SINK_WINDOW:
        ok = ok & ((c < SINK) | (t - c < WINDOW))
    elif PATTERN == GL_BLOCK_SPARSE:
        j = c // PB
        ok = ok & (((t // PB - j) < LOCAL) | (((j + g * STEP) % STRIDE) == 0) | (g >= DENSE_FROM))
    return gl.where(ok, s, -float("inf"))


# ---------------------------------------------------------------------------------------------------------------
# partitions
@gluon.jit
def _consume(
    WHICH: gl.constexpr,
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    lse_ptr,
    q_smem,
    k_smem,
    v_smem,
    full,
    empty,
    q_bars,
    qk_scale,
    m0,
    g,
    h,
    H,
    q_row,
    q_col,
    n_far,
    lo,
    n_visit,
    PATTERN: gl.constexpr,
    SINK: gl.constexpr,
    WINDOW: gl.constexpr,
    PB: gl.constexpr,
    LOCAL: gl.constexpr,
    STRIDE: gl.constexpr,
    STEP: gl.constexpr,
    DENSE_FROM: gl.constexpr,
    BM: gl.constexpr,
    BN: gl.constexpr,
    D: gl.constexpr,
    STAGES: gl.constexpr,
):
    """One consumer warpgroup: query rows [m0 + WHICH * BM, + BM) against every visited key tile."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_l: gl.constexpr = gl.SliceLayout(1, o_layout)
    mc = m0 + WHICH * BM
    qs = q_smem.index(WHICH)
    qb = q_bars.index(WHICH)
    mbarrier.expect(qb, q_desc.block_type.nbytes)
    _tma_load(q_desc, [q_row + WHICH * BM, q_col], qb, qs)
    offs = gl.arange(0, BM, layout=row_l)
    rows = mc + offs  # positions in the sequence
    cols = gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
    zero_s = gl.zeros([BM, BN], gl.float32, s_layout)
    mbarrier.wait(qb, 0)

    # first tile: no P V product yet
    mbarrier.wait(full.index(0), 0)
    s = warpgroup_mma(qs, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False)
    k0 = _tile_of(0, g, n_far, lo, PATTERN, PB, STRIDE, STEP, BN) * BN
    if _needs_mask(0, n_far, k0, g, mc, BM, PATTERN, SINK, WINDOW, PB, LOCAL, DENSE_FROM, BN):
        s = _apply_mask(s, k0, g, rows, cols, PATTERN, SINK, WINDOW, PB, LOCAL, STRIDE, STEP, DENSE_FROM)
    m_i = gl.max(s, axis=1) * qk_scale
    m_use = gl.where(m_i > -float("inf"), m_i, 0.0)  # a row may see nothing in a tile (exp2(-inf) = 0)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
    l_i = gl.sum(p, axis=1)
    acc = gl.zeros([BM, D], gl.float32, o_layout)

    for i in range(1, n_visit):
        st = i % STAGES
        prev = (i - 1) % STAGES
        mbarrier.wait(full.index(st), (i // STAGES) & 1)
        # S of this tile and P V of the previous one in flight together; the softmax waits for S only
        s_tok = warpgroup_mma(qs, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        p_op = gl.convert_layout(p.to(k_desc.dtype), p_layout)
        acc_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
        k0 = _tile_of(i, g, n_far, lo, PATTERN, PB, STRIDE, STEP, BN) * BN
        if _needs_mask(i, n_far, k0, g, mc, BM, PATTERN, SINK, WINDOW, PB, LOCAL, DENSE_FROM, BN):
            s = _apply_mask(s, k0, g, rows, cols, PATTERN, SINK, WINDOW, PB, LOCAL, STRIDE, STEP, DENSE_FROM)
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        m_use = gl.where(m_new > -float("inf"), m_new, 0.0)
        alpha = gl.exp2(m_i - m_use)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok, p_op))
        mbarrier.arrive(empty.index(prev), count=1)  # the previous tile's buffers go back to the loader
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_l), 1)

    last = (n_visit - 1) % STAGES
    p_op = gl.convert_layout(p.to(k_desc.dtype), p_layout)
    acc = warpgroup_mma(p_op, v_smem.index(last), acc)
    acc = acc / gl.expand_dims(gl.convert_layout(l_i, orow_l), 1)
    gl.store(lse_ptr + (q_row + WHICH * BM + offs) * H + h, m_i + gl.log2(l_i))  # log2 units, (total, H)
    qs.store(acc.to(o_desc.dtype))  # Q is no longer needed: its buffer stages the output
    fence_async_shared()
    _tma_store(o_desc, [q_row + WHICH * BM, q_col], qs)
    tma.store_wait(pendings=0)


@gluon.jit
def _loader(
    k_desc,
    v_desc,
    k_smem,
    v_smem,
    full,
    empty,
    g,
    kv_row,
    kv_col,
    n_far,
    lo,
    n_visit,
    PATTERN: gl.constexpr,
    PB: gl.constexpr,
    STRIDE: gl.constexpr,
    STEP: gl.constexpr,
    BN: gl.constexpr,
    STAGES: gl.constexpr,
):
    """Streams the visited K/V tiles into the ring; waits for both consumers to release a buffer before reuse."""
    for i in range(n_visit):
        st = i % STAGES
        mbarrier.wait(empty.index(st), ((i // STAGES) & 1) ^ 1)  # a fresh barrier passes parity 1 at once
        row = kv_row + _tile_of(i, g, n_far, lo, PATTERN, PB, STRIDE, STEP, BN) * BN
        bar = full.index(st)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        _tma_load(k_desc, [row, kv_col], bar, k_smem.index(st))
        _tma_load(v_desc, [row, kv_col], bar, v_smem.index(st))


@gluon.jit
def _fwd_ws_kernel(
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    lse_ptr,
    T,
    H,
    qk_scale,
    PATTERN: gl.constexpr,
    SINK: gl.constexpr,
    WINDOW: gl.constexpr,
    PB: gl.constexpr,
    LOCAL: gl.constexpr,
    STRIDE: gl.constexpr,
    STEP: gl.constexpr,
    DENSE_FROM: gl.constexpr,
    G: gl.constexpr,
    BM: gl.constexpr,
    BN: gl.constexpr,
    D: gl.constexpr,
    STAGES: gl.constexpr,
    num_warps: gl.constexpr,
):
    MR: gl.constexpr = 2 * BM
    pid_m = T // MR - 1 - gl.program_id(0)  # longest key ranges first
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // G
    m0 = pid_m * MR
    q_row = b * T + m0
    kv_row = b * T
    q_col = h * D
    kv_col = g * D
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
    n_far, lo, n_visit = _visit_plan(g, m0, MR, PATTERN, SINK, WINDOW, PB, LOCAL, STRIDE, STEP, DENSE_FROM, BN)
    # two consumer warpgroups (the default partition and a worker) and the loader warp; the argument tuples are
    # written in place (a tuple held in a variable loses its constexpr entries)
    gl.warp_specialize(
        [
            (
                _consume,
                (
                    0,
                    q_desc,
                    k_desc,
                    v_desc,
                    o_desc,
                    lse_ptr,
                    q_smem,
                    k_smem,
                    v_smem,
                    full,
                    empty,
                    q_bars,
                    qk_scale,
                    m0,
                    g,
                    h,
                    H,
                    q_row,
                    q_col,
                    n_far,
                    lo,
                    n_visit,
                    PATTERN,
                    SINK,
                    WINDOW,
                    PB,
                    LOCAL,
                    STRIDE,
                    STEP,
                    DENSE_FROM,
                    BM,
                    BN,
                    D,
                    STAGES,
                ),
            ),
            (
                _consume,
                (
                    1,
                    q_desc,
                    k_desc,
                    v_desc,
                    o_desc,
                    lse_ptr,
                    q_smem,
                    k_smem,
                    v_smem,
                    full,
                    empty,
                    q_bars,
                    qk_scale,
                    m0,
                    g,
                    h,
                    H,
                    q_row,
                    q_col,
                    n_far,
                    lo,
                    n_visit,
                    PATTERN,
                    SINK,
                    WINDOW,
                    PB,
                    LOCAL,
                    STRIDE,
                    STEP,
                    DENSE_FROM,
                    BM,
                    BN,
                    D,
                    STAGES,
                ),
            ),
            (
                _loader,
                (
                    k_desc,
                    v_desc,
                    k_smem,
                    v_smem,
                    full,
                    empty,
                    g,
                    kv_row,
                    kv_col,
                    n_far,
                    lo,
                    n_visit,
                    PATTERN,
                    PB,
                    STRIDE,
                    STEP,
                    BN,
                    STAGES,
                ),
            ),
        ],
        [4, 1],
        [240, 24],
    )


# ---------------------------------------------------------------------------------------------------------------
# host side
def enabled() -> bool:
    return os.environ.get("LONGGEN_GLUON", "1") != "0"


def _in_scope(q: torch.Tensor, head_dim: int, kind: int, block_size: int, seq_len: int) -> bool:
    """The device, dtype, head_dim, pattern and length conditions of the module docstring."""
    if not (enabled() and _NEW_WS_API and q.is_cuda) or torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or head_dim not in HEAD_DIMS:
        return False
    if kind not in (K_FULL, K_SINK_WINDOW, K_BLOCK_SPARSE) or (kind == K_BLOCK_SPARSE and block_size < 64):
        return False
    return seq_len > 0 and seq_len % (2 * ROWS) == 0


def suits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _Plan, batched: bool) -> bool:
    """Whether this forward call is in the kernel's scope (see the module docstring); flattened inputs
    ``(total, heads, head_dim)``."""
    shape, cx = plan.shape, plan.constexprs
    if not batched or shape.padded or plan.q_offset != 0:
        return False
    if cx["KV_OFF"] != 0 or shape.num_kv_heads != shape.global_kv_heads:  # context-parallel slices
        return False
    if not _in_scope(q, shape.head_dim, plan.kind, cx["PB"], plan.max_len):
        return False
    return all(x.is_contiguous() and x.data_ptr() % 16 == 0 for x in (q, k, v))


def takes_causal_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a plain causal forward of ``(B, T, heads, head_dim)`` q, k, v with no gradient to compute is in
    scope: the model's Full layers then run this kernel instead of PyTorch SDPA (measured faster than cuDNN's
    forward on H100 and H200; training keeps SDPA, whose backward is faster than the Triton one)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return _in_scope(q, q.shape[-1], K_FULL, 1, q.shape[1])


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse in log2 units ``(total, H)``) for inputs `suits` accepted."""
    total, H, D = q.shape
    hkv = k.shape[1]
    T = plan.max_len
    cx = plan.constexprs
    BN = 128 if cx["PATTERN"] != K_BLOCK_SPARSE else min(128, cx["PB"])
    stages = 3 if BN == 128 else 4
    dt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    o = torch.empty_like(q)
    lse2 = torch.empty(total, H, dtype=torch.float32, device=q.device)
    q_layout = gl.NVMMASharedLayout.get_default_for([ROWS, D], dt)
    kv_layout = gl.NVMMASharedLayout.get_default_for([BN, D], dt)

    def desc(x, heads, block, layout):
        x2 = x.view(total, heads * D)
        return TensorDescriptor(x2, list(x2.shape), list(x2.stride()), block, layout)

    _fwd_ws_kernel[(T // (2 * ROWS), plan.n_seqs * H)](
        desc(q, H, [ROWS, D], q_layout),
        desc(k, hkv, [BN, D], kv_layout),
        desc(v, hkv, [BN, D], kv_layout),
        desc(o, H, [ROWS, D], q_layout),
        lse2,
        T,
        H,
        plan.shape.scale * 1.4426950408889634,
        PATTERN=cx["PATTERN"],
        SINK=cx["SINK"],
        WINDOW=cx["WINDOW"],
        PB=cx["PB"],
        LOCAL=cx["LOCAL"],
        STRIDE=cx["STRIDE"],
        STEP=cx["STEP"],
        DENSE_FROM=cx["DENSE_FROM"],
        G=plan.shape.group,
        BM=ROWS,
        BN=BN,
        D=D,
        STAGES=stages,
        num_warps=4,
    )
    return o, lse2


__all__ = ["HEAD_DIMS", "enabled", "forward", "suits", "takes_causal_forward"]
