"""What both kernel families (the Triton kernels, `triton_attention`, and the Hopper Gluon kernels,
`gluon_attention`) need to launch a call: the pattern's compile-time parameters, tile sizes, launch tuning, and the
`Plan` of one call (its sequences, tiles and BlockLayout tile index)."""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton

from longgen.kernels.inputs import AttentionShape
from longgen.patterns import BlockLayout, BlockSparse, Full, SinkWindow

# pattern ids: plain ints on the host, constexpr globals inside the kernels
K_FULL, K_SINK_WINDOW, K_BLOCK_SPARSE, K_LAYOUT = 0, 1, 2, 3
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch settings of one kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Tuning:
    """Launch settings still worth sweeping (benchmarks/tune_attention.py passes its own to `triton_attention`);
    the defaults are the measured choices (CHANGELOG.md)."""

    tiles: dict[str, Tiles] | None = None  # Triton kernels' tiles per kernel ("fwd", "dq", "dkdv"); None: tile_config
    fwd_stages: int = 0  # Hopper forward: K/V ring stages, 0 by the tile (3 of 128 keys, 4 of 64)
    bwd_stages: int = 3  # Hopper dK/dV: Q / dO tiles in flight
    persistent_programs: int = 0  # programs of a persistent Hopper forward: 0 one per SM (tests use a few)

    def __post_init__(self):
        for name in ("fwd_stages", "bwd_stages", "persistent_programs"):
            value, least = getattr(self, name), 1 if name == "bwd_stages" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"Tuning.{name} must be an integer >= {least}, got {value!r}")


def tile_config(head_dim: int, dtype: torch.dtype, interpret: bool) -> dict[str, Tiles]:
    """Tile configuration per kernel ("fwd", "dq", "dkdv"); measured choices are in docs/kernels/attention.md."""
    if interpret:
        t = Tiles(16, 16, 1, 1)
        return {"fwd": t, "dq": t, "dkdv": t}
    return {
        "fwd": Tiles(128, 64, 8, 3),
        "dq": Tiles(128, 64, 8, 3) if head_dim > 64 else Tiles(128, 64, 4, 3),
        "dkdv": Tiles(32, 64, 4, 4),
    }


class PatternParams(NamedTuple):
    """A resolved pattern's compile-time parameters, the one bundle every kernel takes (as the plain tuple ``PAT``,
    read inside the kernels by position in this order)."""

    kind: int  # K_FULL, K_SINK_WINDOW, K_BLOCK_SPARSE or K_LAYOUT
    sink: int = 0
    window: int = 0
    block: int = 1  # BlockSparse / BlockLayout block size
    local: int = 0
    stride: int = 1
    step: int = 0
    dense_from: int = 0  # BlockSparse: KV heads from this one on are dense

    @staticmethod
    def of(p, hkv: int) -> PatternParams:
        """The parameters of a pattern resolved for `hkv` KV heads."""
        if isinstance(p, Full):
            return PatternParams(K_FULL, dense_from=hkv)
        if isinstance(p, SinkWindow):
            return PatternParams(K_SINK_WINDOW, sink=p.sink, window=p.window, dense_from=hkv)
        if isinstance(p, BlockSparse):
            step, dense_from = max(1, p.stride // hkv), hkv - p.dense_kv_heads
            return PatternParams(K_BLOCK_SPARSE, 0, 0, p.block_size, p.local_blocks, p.stride, step, dense_from)
        if isinstance(p, BlockLayout):
            return PatternParams(K_LAYOUT, block=p.block_size, dense_from=hkv)
        raise TypeError(f"no kernel for pattern {p!r}")  # pragma: no cover - every Pattern subclass is listed above


class Plan:
    """Everything the kernels need about one call: sequences, constexpr pattern parameters, tiles, indices."""

    def __init__(
        self,
        shape: AttentionShape,
        starts: torch.Tensor,
        lens: torch.Tensor,
        dtype: torch.dtype,
        q_offset: int = 0,
        tuning: Tuning | None = None,
    ):
        p = shape.pattern
        device = starts.device
        tuning = tuning or Tuning()
        self.tuning = tuning
        self.shape = shape
        self.starts, self.lens = starts, lens
        self.n_seqs = len(shape.seq_lens)
        self.max_len = max(shape.seq_lens, default=0)
        # queries: whole sequences, or (forward only, equal lengths) positions q_offset .. max_len - 1 of each
        self.q_offset = q_offset
        self.q_starts = starts
        if q_offset:
            self.q_starts = torch.arange(self.n_seqs, dtype=torch.int32, device=device) * (self.max_len - q_offset)
        hkv, off = shape.num_kv_heads, shape.kv_head_offset
        self.tiles = tuning.tiles or tile_config(shape.head_dim, dtype, interpreting())
        self.pat = PatternParams.of(p, shape.global_kv_heads)
        kind, pb = self.pat.kind, self.pat.block
        if kind in (K_BLOCK_SPARSE, K_LAYOUT):  # key tiles never straddle pattern blocks
            self.tiles = {
                name: Tiles(t.block_m, min(t.block_n, pb), t.num_warps, t.num_stages) for name, t in self.tiles.items()
            }
        self.kind = kind
        # EVEN: every sequence (and the query count) is a whole number of tiles, so no load needs a length test
        tile = max(max(t.block_m, t.block_n) for t in self.tiles.values())
        even = all(n % tile == 0 for n in (*shape.seq_lens, self.max_len - q_offset))
        self.constexprs = dict(
            PAT=tuple(self.pat),
            EVEN=even,
            G=shape.group,
            HEAD_DIM=shape.head_dim,
            BLOCK_D=max(16, triton.next_power_of_2(shape.head_dim)),
            KV_OFF=off,
        )
        # the Hopper Gluon kernels that take the call ("fwd", "dq", "dkdv"), chosen by `longgen.kernels.dispatch`
        self.gluon: frozenset[str] = frozenset()
        self.layout = torch.zeros(1, dtype=torch.int8, device=device)
        self.n_lay = 1
        self.index: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {"fwd": None, "dq": None, "dkdv": None}
        if kind == K_LAYOUT:
            tiles = tuple(self.tiles.items())
            self.layout, index = _layout_tensors(p, shape.global_kv_heads, hkv, off, self.max_len, shape.group, tiles,
                                                 device)  # fmt: skip
            self.index.update(index)
            self.n_lay = p.n_blocks

    def launch_args(self, name: str) -> tuple:
        """(layout, n_lay, index, counts, index width) for kernel `name`."""
        index = self.index[name]
        if index is None:
            z = torch.zeros(1, dtype=torch.int32, device=self.starts.device)
            return self.layout, self.n_lay, z, z, 0
        idx, cnt = index
        return self.layout, self.n_lay, idx, cnt, idx.shape[-1]

    def meta(self, name: str) -> dict:
        t = self.tiles[name]
        return dict(
            self.constexprs, BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps, num_stages=t.num_stages
        )


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=8)  # a few shapes at once (training: one); each entry holds device memory
def _layout_tensors(
    p: BlockLayout,
    global_kv_heads: int,
    hkv: int,
    kv_head_offset: int,
    max_len: int,
    G: int,
    tiles: tuple[tuple[str, Tiles], ...],
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A BlockLayout call's device tensors: the layout at every global KV head (int8), which the kernels read, and
    each kernel's tile index (`layout_index`) for the local heads. Kept for calls of the same layout and shape:
    built on the host and copied to the device, they would be paid for by every sparse layer of every step. The
    last 8 are kept (calls of many lengths, as in serving, rebuild them as before)."""
    layout = p.layout.expand(global_kv_heads, -1, -1).to(device=device, dtype=torch.int8).contiguous()
    index = {
        name: layout_index(p, hkv, max_len, G, t, device, transpose=name == "dkdv", kv_head_offset=kv_head_offset)
        for name, t in tiles
    }
    return layout, index


def layout_index(
    p: BlockLayout,
    hkv: int,
    max_len: int,
    G: int,
    tiles: Tiles,
    device,
    transpose: bool = False,
    kv_head_offset: int = 0,
):
    """Compact tile index of a BlockLayout: for each (KV head, query row tile) the key tiles it visits, or with
    `transpose` for each (KV head, key tile) the query row tiles that visit it. Returns (index padded to the
    longest list, counts), both int32 and flattened over (head, tile). The heads are the `hkv` layout heads from
    `kv_head_offset` on."""
    B, bm, bn = p.block_size, tiles.block_m, tiles.block_n
    n_m = math.ceil(max_len * G / bm)
    n_k = math.ceil(max_len / bn)
    lay = p.layout if p.layout.shape[0] == 1 else p.layout[kv_head_offset : kv_head_offset + hkv]
    lay = lay.expand(hkv, -1, -1)
    m = torch.arange(n_m)
    qs = (m * bm) // G
    qe = torch.clamp(((m + 1) * bm - 1) // G + 1, max=max_len)
    kt = torch.arange(n_k)
    kb = (kt * bn) // B  # key tiles never straddle layout blocks (bn <= B)
    visit = torch.zeros(hkv, n_m, n_k, dtype=torch.bool)
    for extra in range(math.ceil(bm / G / B) + 2):  # layout rows one query tile can touch
        rb = qs // B + extra
        rows_ok = rb * B < qe
        visit |= lay[:, rb.clamp(max=p.n_blocks - 1)][:, :, kb] & rows_ok[None, :, None]
    visit &= (kt[None, :] * bn <= qe[:, None] - 1)[None]
    if transpose:
        visit = visit.transpose(1, 2)
    cnt = visit.sum(-1).to(torch.int32)
    width = max(1, int(cnt.max()) if cnt.numel() else 1)
    n = visit.shape[-1]
    order = torch.argsort((~visit).to(torch.int64) * n + torch.arange(n), dim=-1)  # visited first, ascending
    idx = order[..., :width].to(torch.int32)
    return idx.reshape(-1, width).to(device).contiguous(), cnt.reshape(-1).to(device).contiguous()


def seq_tensors(
    shape: AttentionShape, cu_seqlens: torch.Tensor | None, row_len: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    # built on the device where possible: a blocking host-to-device copy synchronises the stream (~2 stalls per
    # layer of a prefill)
    n = len(shape.seq_lens)
    if cu_seqlens is None:
        starts = torch.arange(n, dtype=torch.int32, device=device) * row_len
    else:
        starts = cu_seqlens[:-1].to(device, torch.int32)
    if len(set(shape.seq_lens)) <= 1:
        lens = torch.full((n,), shape.seq_lens[0] if n else 0, dtype=torch.int32, device=device)
    else:
        lens = torch.tensor(shape.seq_lens, dtype=torch.int32).to(device)
    return starts, lens
