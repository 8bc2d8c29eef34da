"""Triton kernels for attention of a few new queries over a compact KV cache (decoding, short appends).

Flash-decoding, reading top to bottom:

* Grid ``(batch * kv_heads, num_splits, row tiles)``. The G query heads of a KV group and the Q query positions
  are packed into the rows of one tile (row ``r`` is query ``r // G`` of head ``g * G + r % G``), so every K/V
  slot of a KV head is read once per group, not once per query head.
* Splits. Each program scans its share of the slots ``[0, n)`` (``n = kv_len[b]`` or all S) in BLOCK_N tiles
  with an online softmax. The share is computed inside the kernel from ``kv_len[b]``, so the launch depends only
  on shapes and a CUDA graph can replay it at any cache length.
* Masking. Slots are in any order and each KV head has its own positions: a tile loads ``k_pos`` first, evaluates
  `_allowed` (the formulas of `longgen.patterns`, shared with the prefill kernels) per (row, slot), and loads K/V
  only for slots some row may see (predicated loads: empty or masked slots cost no memory traffic, and the loop
  stays branch-free so the loads pipeline).
* Combine. With one split the kernel writes the output directly; otherwise each split writes a float32 partial
  output and its log-sum-exp, and `_combine_kernel` merges them in one launch (a torch version takes ~8 kernels
  for max / exp / weighted sums / the transpose back to (B, Q, H, d), for the same bytes).

Scores are kept in log2 units (scale * log2(e) folded into one multiply), as in `triton_attention`.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from longgen.kernels.inputs import TRITON_HEAD_DIMS
from longgen.kernels.plan import LOG2E, PatternParams, Tiles, interpreting
from longgen.kernels.triton_attention import _allowed
from longgen.patterns import BlockLayout, Pattern

# num_splits heuristic (see `default_num_splits`)
PROGRAMS_PER_SM = 2  # at least two resident programs per SM hide the load latency of a memory-bound scan
MIN_SPLIT_SLOTS = 256  # below this a split's partial output costs more than the parallelism it buys
MAX_SPLITS = 128
NO_SPAN = 2**31 - 1  # position bound of patterns without a fixed span (never masks)


# -------------------------------------------------------------------------------------------------------------
# kernels
@triton.jit
def _split_kernel(
    Q,
    QPOS,
    K,
    V,
    KPOS,
    KVLEN,
    O,
    OPART,
    LPART,
    LAY,
    n_lay,
    span,
    sqb,
    sqt,
    sqh,
    sqpb,
    sqpt,
    skb,
    skh,
    sks,
    svb,
    svh,
    svs,
    skpb,
    skph,
    skps,
    sob,
    sot,
    soh,
    S,
    Hkv,
    n_rows,
    n_splits,
    qk_scale,
    PAT: tl.constexpr,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_KV_LEN: tl.constexpr,
    SPLIT: tl.constexpr,
):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = (bh // Hkv).to(tl.int64)
    g = bh % Hkv
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    t_idx = rows // G
    head = g * G + rows % G
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    io_mask = row_ok[:, None] & d_ok[None, :]
    # query positions of the rows; padding rows get -1, which sees no key
    tq = tl.load(QPOS + b * sqpb + t_idx * sqpt, mask=row_ok, other=-1).to(tl.int32)
    L = tl.minimum(tq + 1, span)  # `_allowed`'s sequence bound: masks only past a BlockLayout's span
    q = tl.load(Q + b * sqb + t_idx[:, None] * sqt + head[:, None] * sqh + offs_d[None, :], mask=io_mask, other=0.0)

    # this split's key tiles, from the row's cache length (on the device: no host sync, graph-safe)
    n = S
    if HAS_KV_LEN:
        n = tl.maximum(tl.minimum(tl.load(KVLEN + b).to(tl.int32), S), 0)
    per_split = tl.cdiv(tl.cdiv(n, BLOCK_N), n_splits)
    lo = sp * per_split
    hi = tl.minimum(lo + per_split, tl.cdiv(n, BLOCK_N))

    Kg = K + b * skb + g.to(tl.int64) * skh
    Vg = V + b * svb + g.to(tl.int64) * svh
    Pg = KPOS + b * skpb + g.to(tl.int64) * skph
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for u in range(lo, hi):
        slot = u * BLOCK_N + offs_n
        kp = tl.load(Pg + slot * skps, mask=slot < n, other=-1).to(tl.int32)  # -1: empty slot or past kv_len
        ok = _allowed(tq[:, None], tl.maximum(kp, 0)[None, :], g, L[:, None], LAY, n_lay, PAT)
        ok = ok & (kp >= 0)[None, :]
        seen = tl.max(ok.to(tl.int32), 0) > 0  # slots some row may attend: the only K/V bytes read
        kv_mask = seen[:, None]
        if BLOCK_D != HEAD_DIM:
            kv_mask = kv_mask & d_ok[None, :]
        k = tl.load(Kg + slot[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(Vg + slot[:, None] * svs + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a row that saw nothing: output 0, lse -inf
    out = acc / l_safe[:, None]
    if SPLIT:
        part = (bh * n_splits + sp) * n_rows + rows
        tl.store(OPART + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=io_mask)
        tl.store(LPART + part, m_i + tl.math.log2(l_safe), mask=row_ok)
    else:
        tl.store(
            O + b * sob + t_idx[:, None] * sot + head[:, None] * soh + offs_d[None, :],
            out.to(O.dtype.element_ty),
            mask=io_mask,
        )


@triton.jit
def _combine_kernel(
    OPART,
    LPART,
    O,
    sob,
    sot,
    soh,
    Hkv,
    n_rows,
    n_splits,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Merge the splits' partial outputs by their log-sum-exp (an online softmax over splits)."""
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = (bh // Hkv).to(tl.int64)
    g = bh % Hkv
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    io_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for sp in range(n_splits):
        part = (bh * n_splits + sp) * n_rows + rows
        lse = tl.load(LPART + part, mask=row_ok, other=float("-inf"))
        o = tl.load(OPART + part[:, None] * HEAD_DIM + offs_d[None, :], mask=io_mask, other=0.0)
        m_new = tl.maximum(m_i, lse)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        w = tl.math.exp2(lse - m_use)
        acc = acc * alpha[:, None] + w[:, None] * o
        l_i = l_i * alpha + w
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    t_idx = rows // G
    head = g * G + rows % G
    tl.store(
        O + b * sob + t_idx[:, None] * sot + head[:, None] * soh + offs_d[None, :],
        out.to(O.dtype.element_ty),
        mask=io_mask,
    )


# -------------------------------------------------------------------------------------------------------------
# launch
# GPU scan settings of `_split_kernel` (BLOCK_N, num_warps, num_stages); benchmarks/decode_attention.py --tiles
# passes others to `triton_cache_attention` to sweep them
SCAN_TILES = (64, 4, 3)


def tile_config(rows: int, interpret: bool, scan: tuple[int, int, int] = SCAN_TILES) -> Tiles:
    """Tiles of `_split_kernel` for `rows` = Q * G packed rows (BLOCK_M >= 16 for tl.dot, at most 64) and `scan`
    = (BLOCK_N, num_warps, num_stages) on a GPU.

    Decoding is memory-bound (each K/V slot is read once per KV head), so the choice is about bytes in flight. With
    3 stages the pipeliner loads k_pos two tiles ahead and K/V (2 x 16 KB at BLOCK_N 64, d 128) one tile ahead
    (~40 KB of shared memory, 5 programs fit an SM); two programs per SM then keep ~64 KB per SM in flight, above
    what H100 bandwidth x latency needs (~25 KB per SM).
    """
    if interpret:
        return Tiles(16, 16, 1, 1)
    return Tiles(min(64, max(16, triton.next_power_of_2(rows))), *scan)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(slots: int, programs: int, sm_count: int) -> int:
    """Splits of the slot range so that `programs` (batch * kv_heads * row tiles) x splits fills the GPU.

    Aim for PROGRAMS_PER_SM programs per SM (H100: 132 SMs -> 264 programs), but give every split at least
    MIN_SPLIT_SLOTS slots (a small cache is one split: no combine kernel) and use at most MAX_SPLITS.
    Examples on an H100 (Q = 1): 128K slots at batch 1 -> 33 splits of ~4K slots (8 KV heads), 9 (32 KV heads);
    at batch 8 -> 5 (8 KV heads), 2 (32); a 2176-slot SinkWindow(64, 2048) cache at batch 1 -> 8 (256 slots each).
    """
    if slots <= MIN_SPLIT_SLOTS or programs <= 0:
        return 1
    want = math.ceil(PROGRAMS_PER_SM * sm_count / programs)
    return max(1, min(want, slots // MIN_SPLIT_SLOTS, MAX_SPLITS))


def launch_splits(batch: int, q_len: int, heads: int, kv_heads: int, slots: int, device: torch.device) -> int:
    """The num_splits a call with these shapes uses by default (`default_num_splits` on `device`'s SMs)."""
    rows = q_len * (heads // kv_heads)
    row_tiles = triton.cdiv(rows, tile_config(rows, interpreting()).block_m)
    sms = (
        _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        if device.type == "cuda"
        else 1
    )
    return default_num_splits(slots, batch * kv_heads * row_tiles, sms)


_LAYOUTS: dict[tuple, torch.Tensor] = {}


def _layout_table(p: Pattern, hkv: int, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """(int8 table (hkv, n, n), n, span in tokens) for `_allowed`; built once per pattern and device, so a call
    during CUDA-graph capture copies nothing from the host."""
    key = (p if isinstance(p, BlockLayout) else None, hkv, str(device))
    table = _LAYOUTS.get(key)
    if table is None:
        if isinstance(p, BlockLayout):
            table = p.layout.expand(hkv, -1, -1).to(device=device, dtype=torch.int8).contiguous()
        else:
            table = torch.zeros(1, 1, 1, dtype=torch.int8, device=device)
        _LAYOUTS[key] = table
    if isinstance(p, BlockLayout):
        return table, p.n_blocks, p.n_blocks * p.block_size
    return table, 1, NO_SPAN


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_supported(query: torch.Tensor) -> None:
    d = query.shape[-1]
    if d not in TRITON_HEAD_DIMS:
        raise ValueError(f"the Triton cache attention supports head_dim in {TRITON_HEAD_DIMS}, got {d}")
    if query.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"the Triton cache attention needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {query.device}"
        )
    dtypes = (torch.float16, torch.bfloat16) if query.device.type == "cuda" else (torch.float16, torch.float32)
    if query.dtype not in dtypes:
        raise TypeError(
            f"the Triton cache attention takes {' or '.join(map(str, dtypes))} on {query.device.type}, got "
            f"{query.dtype} (backend='reference' takes any floating dtype)"
        )


def triton_cache_attention(
    query: torch.Tensor,
    q_pos: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    k_pos: torch.Tensor,
    pattern: Pattern,
    scale: float,
    kv_len: torch.Tensor | None,
    num_splits: int | None,
    scan: tuple[int, int, int] = SCAN_TILES,
) -> torch.Tensor:
    """Run the kernels on validated inputs (see `longgen.kernels.cache_attention`); `pattern` is resolved. `scan`:
    (BLOCK_N, num_warps, num_stages) of the GPU scan, the measured `SCAN_TILES` unless a benchmark sweeps them."""
    _check_supported(query)
    B, Q, H, d = query.shape
    hkv, S = key_cache.shape[1], key_cache.shape[2]
    G = H // hkv
    query, key_cache, value_cache = (_unit_last(x) for x in (query, key_cache, value_cache))
    out = torch.empty(B, Q, H, d, dtype=query.dtype, device=query.device)
    if out.numel() == 0:
        return out
    rows = Q * G
    tiles = tile_config(rows, interpreting(), scan)
    row_tiles = triton.cdiv(rows, tiles.block_m)
    if num_splits is None:
        num_splits = launch_splits(B, Q, H, hkv, S, query.device)
    split = num_splits > 1
    if split:
        opart = torch.empty(B * hkv, num_splits, rows, d, dtype=torch.float32, device=query.device)
        lpart = torch.empty(B * hkv, num_splits, rows, dtype=torch.float32, device=query.device)
    else:
        opart = lpart = out  # unused
    layout, n_lay, span = _layout_table(pattern, hkv, query.device)
    meta = dict(PAT=tuple(PatternParams.of(pattern, hkv)), G=G, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)))
    _split_kernel[(B * hkv, num_splits, row_tiles)](
        query,
        q_pos,
        key_cache,
        value_cache,
        k_pos,
        kv_len if kv_len is not None else q_pos,
        out,
        opart,
        lpart,
        layout,
        n_lay,
        span,
        *query.stride()[:3],
        *q_pos.stride(),
        *key_cache.stride()[:3],
        *value_cache.stride()[:3],
        *k_pos.stride(),
        *out.stride()[:3],
        S,
        hkv,
        rows,
        num_splits,
        scale * LOG2E,
        **meta,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        HAS_KV_LEN=kv_len is not None,
        SPLIT=split,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    if split:
        block_r = 16
        _combine_kernel[(B * hkv, triton.cdiv(rows, block_r))](
            opart,
            lpart,
            out,
            *out.stride()[:3],
            hkv,
            rows,
            num_splits,
            G=G,
            HEAD_DIM=d,
            BLOCK_D=meta["BLOCK_D"],
            BLOCK_R=block_r,
            num_warps=4,
        )
    return out
