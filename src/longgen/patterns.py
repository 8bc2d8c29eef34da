"""What each attention head may see: the pattern types and their exact semantics.

This module is the single source of truth for masks. Everything else (the reference attention, the Triton
kernels, the KV cache) derives what it visits or keeps from the methods here.

Conventions (SPEC.md, "Sparse patterns"): positions are absolute token indices inside one sequence; query
position ``t``, key position ``s``, always ``s <= t``. Semantics are defined per KV head ``g``; query head ``h``
belongs to KV head ``h // (num_heads // num_kv_heads)``. Block indices are ``t // B`` and ``s // B``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

__all__ = [
    "BlockLayout",
    "BlockSparse",
    "Full",
    "Pattern",
    "SinkWindow",
    "pattern_from_dict",
]

DEFAULT_TILE = 64  # block size used to iterate token-level patterns (Full, SinkWindow) when none is given
MAX_DEFAULT_STRIDE = 64


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_block_size(name: str, value: Any) -> None:
    _check_int(name, value, 16)
    if value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16 (16, 32, 64, 128, ...), got {value}")


def _check_heads(num_kv_heads: Any) -> None:
    _check_int("num_kv_heads", num_kv_heads, 1)


def _check_len(seq_len: Any) -> None:
    _check_int("seq_len", seq_len, 1)


class Pattern(ABC):
    """A static attention pattern: which key positions each query position of each KV head may attend.

    Subclasses define `_allowed` (the exact semantics) and the analytic block/retention rules; the public
    methods validate arguments, resolve head-dependent defaults and return tensors on the CPU.
    """

    kind: ClassVar[str]

    # ----------------------------------------------------------------------------------------------------
    # semantics
    def resolve(self, num_kv_heads: int) -> Pattern:
        """Return this pattern with head-dependent defaults filled in, checking it fits `num_kv_heads`."""
        _check_heads(num_kv_heads)
        return self

    @abstractmethod
    def _allowed(self, t: torch.Tensor, s: torch.Tensor, g: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        """Exact semantics on broadcastable int64 tensors of query position, key position, KV head."""

    def allowed(
        self, q_pos: torch.Tensor, k_pos: torch.Tensor, kv_head: torch.Tensor | int, num_kv_heads: int
    ) -> torch.Tensor:
        """Boolean tensor (broadcast of the three inputs): may query `q_pos` of `kv_head` see key `k_pos`?

        Positions are absolute indices within one sequence; causality (``k_pos <= q_pos``) is included.
        """
        p = self.resolve(num_kv_heads)
        g = torch.as_tensor(kv_head, dtype=torch.long, device=q_pos.device)
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= num_kv_heads):
            raise ValueError(f"kv_head must be in [0, {num_kv_heads}), got values in [{g.min()}, {g.max()}]")
        if q_pos.numel():
            p._check_seq_len(int(q_pos.max()) + 1)
        return p._allowed(q_pos.long(), k_pos.long(), g, num_kv_heads)

    def mask(self, seq_len: int, num_kv_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Dense boolean mask ``(num_kv_heads, seq_len, seq_len)``: ``mask[g, t, s]`` is `allowed(t, s, g)`.

        Quadratic in `seq_len`: meant for tests and small sizes.
        """
        _check_len(seq_len)
        p = self.resolve(num_kv_heads)
        p._check_seq_len(seq_len)
        pos = torch.arange(seq_len, device=device)
        g = torch.arange(num_kv_heads, device=device)
        return p._allowed(pos[None, :, None], pos[None, None, :], g[:, None, None], num_kv_heads)

    def mask_mod(self, num_heads: int, num_kv_heads: int):
        """The pattern as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` over query heads ``h``
        (query head h belongs to KV head ``h // (num_heads // num_kv_heads)``); `allowed` without its checks, for
        ``torch.nn.attention.flex_attention.create_block_mask``."""
        _check_heads(num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        p, group = self.resolve(num_kv_heads), num_heads // num_kv_heads

        def mask_mod(b, h, q_idx, kv_idx):
            return p._allowed(q_idx, kv_idx, h // group, num_kv_heads)

        return mask_mod

    def _check_seq_len(self, seq_len: int) -> None:
        """Raise if the pattern is not defined at this length (only fixed-size layouts are limited)."""

    def _query_chunk(self) -> int | None:
        """Preferred query-chunk length for `_key_candidates` to prune well (None: no preference)."""
        return None

    def _key_candidates(self, t0: int, t1: int) -> torch.Tensor | None:
        """Key positions that queries ``t0 .. t1 - 1`` may attend, as a superset (None: all of ``0 .. t1 - 1``).

        Only prunes work; `_allowed` still decides every pair."""
        return None

    # ----------------------------------------------------------------------------------------------------
    # block iteration (what the kernels visit)
    @property
    def natural_block_size(self) -> int:
        """Block size the pattern is defined on (token-level patterns: the default tile, 64)."""
        return DEFAULT_TILE

    def block_mask(self, seq_len: int, num_kv_heads: int, block_size: int | None = None) -> torch.Tensor:
        """Which (query block, key block) tiles hold at least one allowed pair.

        Returns bool ``(num_kv_heads, n_blocks, n_blocks)`` with ``n_blocks = ceil(seq_len / block_size)``;
        `block_size` defaults to `natural_block_size`. A kernel that visits exactly these tiles (and masks
        inside them with `allowed`) computes the pattern exactly and skips all fully masked work.
        """
        _check_len(seq_len)
        block_size = self.natural_block_size if block_size is None else block_size
        _check_block_size("block_size", block_size)
        p = self.resolve(num_kv_heads)
        p._check_seq_len(seq_len)
        return p._block_mask(seq_len, num_kv_heads, block_size)

    @abstractmethod
    def _block_mask(self, seq_len: int, num_kv_heads: int, block_size: int) -> torch.Tensor: ...

    def full_block_mask(self, seq_len: int, num_kv_heads: int, block_size: int | None = None) -> torch.Tensor:
        """Which tiles of `block_mask` need no mask inside: bool ``(num_kv_heads, n_blocks, n_blocks)``.

        True only where every pair (query `t`, key `s`) of the tile with ``t < seq_len`` is allowed, which
        needs key tile < query tile. A subset of `block_mask`; the other visited tiles are masked with `allowed`.
        """
        _check_len(seq_len)
        block_size = self.natural_block_size if block_size is None else block_size
        _check_block_size("block_size", block_size)
        p = self.resolve(num_kv_heads)
        p._check_seq_len(seq_len)
        n = math.ceil(seq_len / block_size)
        below = torch.ones(n, n, dtype=torch.bool).tril(-1)
        return p._full_block_mask(seq_len, num_kv_heads, block_size) & below

    @abstractmethod
    def _full_block_mask(self, seq_len: int, num_kv_heads: int, block_size: int) -> torch.Tensor:
        """Tiles (below the diagonal) in which every pair is allowed; `full_block_mask` masks the diagonal."""

    def dense_heads(self, seq_len: int, num_kv_heads: int) -> torch.Tensor:
        """Bool ``(num_kv_heads,)``: which KV heads attend every earlier key (``s <= t``) of a `seq_len` sequence.

        Such heads are computed exactly by plain causal attention.
        """
        _check_len(seq_len)
        p = self.resolve(num_kv_heads)
        p._check_seq_len(seq_len)
        return p._dense_heads(seq_len, num_kv_heads)

    @abstractmethod
    def _dense_heads(self, seq_len: int, num_kv_heads: int) -> torch.Tensor: ...

    def key_blocks(self, seq_len: int, num_kv_heads: int, block_size: int | None = None) -> list[list[list[int]]]:
        """``key_blocks(...)[g][i]`` is the sorted list of key blocks query block `i` of KV head `g` visits."""
        bm = self.block_mask(seq_len, num_kv_heads, block_size)
        return [[torch.nonzero(row).flatten().tolist() for row in head] for head in bm]

    def block_fraction(self, seq_len: int, num_kv_heads: int, block_size: int | None = None) -> float:
        """Visited tiles over causal tiles (``n(n+1)/2`` per head), averaged over KV heads.

        The sparsity-ideal time of a kernel is the causal time times this fraction.
        """
        bm = self.block_mask(seq_len, num_kv_heads, block_size)
        n = bm.shape[-1]
        return float(bm.sum()) / (num_kv_heads * n * (n + 1) / 2)

    # ----------------------------------------------------------------------------------------------------
    # KV retention (what a decoding cache keeps)
    def kv_retention(self, seq_len: int, num_kv_heads: int) -> list[torch.Tensor]:
        """Key positions each KV head must hold once `seq_len` tokens are in the cache.

        These are the positions ``s < seq_len`` that the newest token (position ``seq_len - 1``) or any later
        token may attend. Returns one sorted int64 tensor per KV head.
        """
        _check_len(seq_len)
        p = self.resolve(num_kv_heads)
        p._check_seq_len(seq_len)
        return p._kv_retention(seq_len, num_kv_heads)

    @abstractmethod
    def _kv_retention(self, seq_len: int, num_kv_heads: int) -> list[torch.Tensor]: ...

    def kept_tokens(self, seq_len: int, num_kv_heads: int) -> list[int]:
        """Number of cached tokens per KV head at `seq_len` (the length of each `kv_retention` entry)."""
        return [int(r.numel()) for r in self.kv_retention(seq_len, num_kv_heads)]

    def is_kv_cache_efficient(self, num_kv_heads: int, seq_len: int | None = None) -> bool:
        """True when a key block a query block stops attending is never attended again by a later one.

        Only such patterns can drop keys from a decoding cache for good. Built-in patterns always are;
        `BlockLayout` is checked over its whole layout (`seq_len` is ignored for the others).
        """
        _check_heads(num_kv_heads)
        return True

    def check_kv_cache_efficient(self, num_kv_heads: int, seq_len: int | None = None) -> None:
        """Raise `ValueError` if the pattern cannot be served with a KV-reduced cache."""
        if not self.is_kv_cache_efficient(num_kv_heads, seq_len):
            raise ValueError(
                f"{self!r} is not KV-cache efficient: some key block is attended again by a later query block "
                "after an earlier one stopped attending it, so a reduced KV cache would have dropped it. "
                "Use a layout in which every key block, once dropped from a row, stays dropped in all later "
                "rows (e.g. local + strided blocks), or serve this layer with a full KV cache."
            )

    # ----------------------------------------------------------------------------------------------------
    # serialisation
    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-able description, e.g. ``{"type": "sink_window", "sink": 64, "window": 2048}``."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Pattern:
        """Inverse of `to_dict` (dispatches on ``d["type"]``)."""
        return pattern_from_dict(d)


def _column_efficient(bm: torch.Tensor) -> bool:
    """Block mask ``(g, n, n)`` is KV-cache efficient: in every column, a False below a True stays False."""
    n = bm.shape[-1]
    lower = torch.ones(n, n, dtype=torch.bool).tril()
    col = bm & lower
    # "dropped" marks rows at or after the first False below the diagonal in each column
    dropped = torch.cumsum((~col & lower).long(), dim=-2) > 0
    return not bool((col & dropped).any())


def _causal_blocks(n: int) -> torch.Tensor:
    i = torch.arange(n)
    return i[:, None] >= i[None, :]


@dataclass(frozen=True)
class Full(Pattern):
    """Ordinary causal attention: ``s <= t``."""

    kind: ClassVar[str] = "full"

    def _allowed(self, t, s, g, num_kv_heads):
        return (s <= t) & (g >= 0)  # g only broadcasts the head dimension

    def _block_mask(self, seq_len, num_kv_heads, block_size):
        n = math.ceil(seq_len / block_size)
        return _causal_blocks(n).expand(num_kv_heads, n, n).clone()

    def _full_block_mask(self, seq_len, num_kv_heads, block_size):
        return self._block_mask(seq_len, num_kv_heads, block_size)

    def _dense_heads(self, seq_len, num_kv_heads):
        return torch.ones(num_kv_heads, dtype=torch.bool)

    def _kv_retention(self, seq_len, num_kv_heads):
        return [torch.arange(seq_len) for _ in range(num_kv_heads)]

    def to_dict(self):
        return {"type": self.kind}


@dataclass(frozen=True)
class SinkWindow(Pattern):
    """Attention sink + sliding window (the "AttnSink" variant), token-exact.

    ``s <= t and (s < sink or t - s < window)``: the first `sink` tokens are always visible, plus the last
    `window` tokens including the query itself (FlashAttention's ``window_size=(window - 1, 0)``).
    """

    sink: int = 64
    window: int = 2048
    kind: ClassVar[str] = "sink_window"

    def __post_init__(self):
        _check_int("SinkWindow.sink", self.sink, 0)
        _check_int("SinkWindow.window", self.window, 1)

    def _allowed(self, t, s, g, num_kv_heads):
        return (s <= t) & ((s < self.sink) | (t - s < self.window)) & (g >= 0)

    def _block_mask(self, seq_len, num_kv_heads, block_size):
        n = math.ceil(seq_len / block_size)
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        # smallest t - s over a tile pair below the diagonal is (i - j) * B - (B - 1)
        near = (i - j) * block_size - (block_size - 1) < self.window
        bm = (j <= i) & ((j * block_size < self.sink) | near)
        return bm.expand(num_kv_heads, n, n).clone()

    def _full_block_mask(self, seq_len, num_kv_heads, block_size):
        n = math.ceil(seq_len / block_size)
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        # keys below `sink` are always visible; the others must all be within the window of the tile's last query
        first_outside_sink = torch.clamp(j * block_size, min=self.sink)
        full = (first_outside_sink >= (j + 1) * block_size) | (
            i * block_size + block_size - 1 - first_outside_sink < self.window
        )
        return full.expand(num_kv_heads, n, n).clone()

    def _dense_heads(self, seq_len, num_kv_heads):
        # the farthest pair a sink does not cover is t = seq_len - 1, s = sink
        return torch.full((num_kv_heads,), seq_len <= self.sink + self.window, dtype=torch.bool)

    def _query_chunk(self):
        return max(64, self.window)

    def _key_candidates(self, t0, t1):
        recent = max(self.sink, t0 - self.window + 1)
        if recent <= self.sink:
            return None
        return torch.cat([torch.arange(min(self.sink, t1)), torch.arange(recent, t1)])

    def _kv_retention(self, seq_len, num_kv_heads):
        sink = torch.arange(min(self.sink, seq_len))
        recent = torch.arange(min(seq_len, max(self.sink, seq_len - self.window)), seq_len)
        kept = torch.cat([sink, recent])
        return [kept.clone() for _ in range(num_kv_heads)]

    def to_dict(self):
        return {"type": self.kind, "sink": self.sink, "window": self.window}


class _BlockPattern(Pattern):
    """A pattern that is constant on (query block, key block) tiles of `block_size`, apart from causality."""

    block_size: int

    @property
    def natural_block_size(self) -> int:
        return self.block_size

    @abstractmethod
    def _block_visible(self, i: torch.Tensor, j: torch.Tensor, g: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        """May query block `i` of KV head `g` see key block `j` (ignoring causality)? Broadcasting int64."""

    def _natural_block_mask(self, n_blocks: int, num_kv_heads: int) -> torch.Tensor:
        """Bool ``(num_kv_heads, n_blocks, n_blocks)`` on the pattern's own blocks (lower triangular)."""
        i = torch.arange(n_blocks)[None, :, None]
        j = torch.arange(n_blocks)[None, None, :]
        g = torch.arange(num_kv_heads)[:, None, None]
        return (j <= i) & self._block_visible(i, j, g, num_kv_heads)

    def _allowed(self, t, s, g, num_kv_heads):
        B = self.block_size
        return (s <= t) & self._block_visible(t // B, s // B, g, num_kv_heads)

    def _block_mask(self, seq_len, num_kv_heads, block_size):
        B = self.block_size
        n_tiles = math.ceil(seq_len / block_size)
        if block_size >= B:
            r = block_size // B
            nat = self._natural_block_mask(n_tiles * r, num_kv_heads)
            n_real = math.ceil(seq_len / B)  # blocks past the sequence end hold no tokens
            nat[:, n_real:, :] = False
            nat[:, :, n_real:] = False
            return nat.view(num_kv_heads, n_tiles, r, n_tiles, r).any(dim=4).any(dim=2)
        r = B // block_size
        nat = self._natural_block_mask(math.ceil(n_tiles / r), num_kv_heads)
        tiles = torch.arange(n_tiles)
        up = nat[:, tiles[:, None] // r, tiles[None, :] // r]
        return up & _causal_blocks(n_tiles)

    def _full_block_mask(self, seq_len, num_kv_heads, block_size):
        B = self.block_size
        n_tiles = math.ceil(seq_len / block_size)
        if block_size < B:
            r = B // block_size
            nat = self._natural_block_mask(math.ceil(n_tiles / r), num_kv_heads)
            tiles = torch.arange(n_tiles)
            return nat[:, tiles[:, None] // r, tiles[None, :] // r]
        r = block_size // B
        nat = self._natural_block_mask(n_tiles * r, num_kv_heads)
        nat[:, math.ceil(seq_len / B) :, :] = True  # blocks past the sequence end hold no queries
        return nat.view(num_kv_heads, n_tiles, r, n_tiles, r).all(dim=4).all(dim=2)

    def _dense_heads(self, seq_len, num_kv_heads):
        # the pattern is constant on its own blocks apart from causality, so block level is exact
        n = math.ceil(seq_len / self.block_size)
        return (self._natural_block_mask(n, num_kv_heads) == _causal_blocks(n)).flatten(1).all(1)

    def _kv_retention(self, seq_len, num_kv_heads):
        B = self.block_size
        n = math.ceil(seq_len / B)
        i0 = (seq_len - 1) // B
        n_future = self._future_rows(n)
        bm = self._natural_block_mask(n_future, num_kv_heads)
        kept_blocks = bm[:, i0:, :n].any(dim=1)  # (g, n): visible to query block i0 or any later one
        pos = torch.arange(seq_len)
        return [pos[kept_blocks[g, pos // B]] for g in range(num_kv_heads)]

    def last_query_block(self, num_kv_heads: int, n_blocks: int) -> torch.Tensor:
        """Int64 ``(num_kv_heads, n_blocks)``: the last query block (< `n_blocks`) that sees each key block, i.e.
        how long a decoding cache must keep it (a KV-cache-efficient pattern sees it from its own block until then).
        """
        _check_int("n_blocks", n_blocks, 1)
        p = self.resolve(num_kv_heads)
        return p._last_query_block(num_kv_heads, n_blocks)

    def _last_query_block(self, num_kv_heads: int, n_blocks: int) -> torch.Tensor:
        bm = self._natural_block_mask(n_blocks, num_kv_heads)
        rows = torch.arange(n_blocks)[None, :, None].expand_as(bm)
        return torch.where(bm, rows, -1).amax(dim=1)

    def _future_rows(self, n: int) -> int:
        """How many block rows to look at so that every later query block's visibility is represented."""
        return n

    def is_kv_cache_efficient(self, num_kv_heads: int, seq_len: int | None = None) -> bool:
        _check_heads(num_kv_heads)
        p = self.resolve(num_kv_heads)
        n = p._efficiency_rows(seq_len)
        return _column_efficient(p._natural_block_mask(n, num_kv_heads))

    def _efficiency_rows(self, seq_len: int | None) -> int:
        return math.ceil(seq_len / self.block_size) if seq_len else 256


@dataclass(frozen=True)
class BlockSparse(_BlockPattern):
    """Local blocks + strided blocks sharded across KV heads (the "BlockSparse" variant).

    For KV head ``g``: ``s <= t and (i - j < local_blocks or (j + g * step) % stride == 0)`` with
    ``i = t // block_size``, ``j = s // block_size``, ``step = max(1, stride // num_kv_heads)``.
    ``stride=None`` means the number of KV heads, capped at 64 (resolved by `resolve`), so the union of heads
    covers every block. The last `dense_kv_heads` KV heads attend densely (causal).
    """

    block_size: int = 64
    local_blocks: int = 16
    stride: int | None = None
    dense_kv_heads: int = 0
    kind: ClassVar[str] = "block_sparse"

    def __post_init__(self):
        _check_block_size("BlockSparse.block_size", self.block_size)
        _check_int("BlockSparse.local_blocks", self.local_blocks, 1)
        if self.stride is not None:
            _check_int("BlockSparse.stride", self.stride, 1)
        _check_int("BlockSparse.dense_kv_heads", self.dense_kv_heads, 0)

    def resolve(self, num_kv_heads: int) -> BlockSparse:
        _check_heads(num_kv_heads)
        if self.dense_kv_heads > num_kv_heads:
            raise ValueError(
                f"BlockSparse.dense_kv_heads={self.dense_kv_heads} exceeds the number of KV heads "
                f"({num_kv_heads}); it must be between 0 and {num_kv_heads}"
            )
        if self.stride is None:
            return replace(self, stride=min(num_kv_heads, MAX_DEFAULT_STRIDE))
        return self

    def step(self, num_kv_heads: int) -> int:
        """Offset between the strided residue classes of consecutive KV heads."""
        stride = self.resolve(num_kv_heads).stride
        return max(1, stride // num_kv_heads)

    def _block_visible(self, i, j, g, num_kv_heads):
        stride = self.stride
        step = max(1, stride // num_kv_heads)
        dense = g >= num_kv_heads - self.dense_kv_heads
        return (i - j < self.local_blocks) | ((j + g * step) % stride == 0) | dense

    def _last_query_block(self, num_kv_heads, n_blocks):
        # a strided block (or any block of a dense head) is seen by every later query block, the others by the
        # local_blocks query blocks from their own
        j = torch.arange(n_blocks)
        g = torch.arange(num_kv_heads)[:, None]
        forever = ((j[None] + g * self.step(num_kv_heads)) % self.stride == 0) | (
            g >= num_kv_heads - self.dense_kv_heads
        )
        return torch.where(forever, n_blocks - 1, (j + self.local_blocks - 1).clamp(max=n_blocks - 1)[None])

    def live_blocks(self, first: int, last: int, num_kv_heads: int, device=None) -> torch.Tensor:
        """Blocks among ``first .. last`` that a query in block `last` or later still sees, per KV head of a sparse
        (not dense) head: int64 ``(num_kv_heads, K)``, ascending, padded with values > `last` to one length K that
        depends only on the host integers (no host sync when built on a GPU). They are the head's strided blocks
        before the last query's local range, then every block of that range."""
        p = self.resolve(num_kv_heads)
        local = max(first, last - p.local_blocks + 1)  # blocks first .. local - 1: strided ones only
        g = torch.arange(num_kv_heads, device=device)
        s0 = first + (-(first + g * p.step(num_kv_heads))) % p.stride  # each head's first strided block >= first
        n_far = ((local - s0).clamp(min=0) + p.stride - 1) // p.stride
        k = torch.arange(-(-(local - first) // p.stride) + last - local + 1, device=device)[None]
        return torch.where(k < n_far[:, None], s0[:, None] + k * p.stride, local + k - n_far[:, None])

    def to_dict(self):
        return {
            "type": self.kind,
            "block_size": self.block_size,
            "local_blocks": self.local_blocks,
            "stride": self.stride,
            "dense_kv_heads": self.dense_kv_heads,
        }


class BlockLayout(_BlockPattern):
    """A user-given block layout: bool ``(kv_heads, n_blocks, n_blocks)``, causal, diagonal always on.

    A layout with one head applies to every KV head. Sequences longer than ``n_blocks * block_size`` are
    outside the layout and rejected.
    """

    kind: ClassVar[str] = "block_layout"

    def __init__(self, layout: torch.Tensor, block_size: int = 64):
        _check_block_size("BlockLayout.block_size", block_size)
        if not isinstance(layout, torch.Tensor):
            raise TypeError(f"BlockLayout.layout must be a torch.Tensor, got {type(layout).__name__}")
        if layout.dim() != 3 or layout.shape[1] != layout.shape[2] or layout.shape[1] == 0:
            raise ValueError(
                "BlockLayout.layout must have shape (kv_heads, n_blocks, n_blocks) with n_blocks >= 1, "
                f"got {tuple(layout.shape)}"
            )
        if layout.dtype != torch.bool:
            if layout.is_floating_point() or layout.is_complex() or not bool(((layout == 0) | (layout == 1)).all()):
                raise TypeError(f"BlockLayout.layout must be a bool tensor (or integers 0/1), got dtype {layout.dtype}")
            layout = layout != 0
        layout = layout.detach().to("cpu").contiguous()
        n = layout.shape[1]
        upper = ~_causal_blocks(n)
        if bool((layout & upper).any()):
            h, i, j = (int(x) for x in torch.nonzero(layout & upper)[0])
            raise ValueError(
                f"BlockLayout.layout is not causal: head {h}, query block {i} attends key block {j} > {i}; "
                "only key blocks j <= i are allowed"
            )
        diag = layout.diagonal(dim1=1, dim2=2)
        if not bool(diag.all()):
            h, i = (int(x) for x in torch.nonzero(~diag)[0])
            raise ValueError(
                f"BlockLayout.layout lacks the diagonal: head {h}, query block {i} does not attend its own "
                "block; every query block must attend its own block"
            )
        self.layout = layout
        self.block_size = block_size

    @property
    def n_blocks(self) -> int:
        return self.layout.shape[1]

    def resolve(self, num_kv_heads: int) -> BlockLayout:
        _check_heads(num_kv_heads)
        if self.layout.shape[0] not in (1, num_kv_heads):
            raise ValueError(
                f"BlockLayout has {self.layout.shape[0]} heads but the attention has {num_kv_heads} KV heads; "
                f"the layout must have 1 or {num_kv_heads} heads"
            )
        return self

    def _check_seq_len(self, seq_len: int) -> None:
        if seq_len > self.n_blocks * self.block_size:
            raise ValueError(
                f"sequence length {seq_len} exceeds the BlockLayout's span of {self.n_blocks} blocks x "
                f"{self.block_size} = {self.n_blocks * self.block_size} tokens"
            )

    def _block_visible(self, i, j, g, num_kv_heads):
        n = self.n_blocks
        layout = self.layout.to(i.device)
        head = g if layout.shape[0] > 1 else torch.zeros_like(g)
        inside = (i < n) & (j < n)  # blocks past the layout's span are never visible
        return layout[head, i.clamp(max=n - 1), j.clamp(max=n - 1)] & inside

    def _future_rows(self, n: int) -> int:
        return self.n_blocks  # later queries may use any row of the layout

    def _efficiency_rows(self, seq_len: int | None) -> int:
        return self.n_blocks

    def to_dict(self):
        rows = [["".join("1" if x else "0" for x in row.tolist()) for row in head] for head in self.layout]
        return {"type": self.kind, "block_size": self.block_size, "layout": rows}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockLayout):
            return NotImplemented
        return (
            self.block_size == other.block_size
            and self.layout.shape == other.layout.shape
            and bool(torch.equal(self.layout, other.layout))
        )

    def __hash__(self) -> int:
        return hash((self.block_size, tuple(self.layout.shape), self.layout.numpy().tobytes()))

    def __repr__(self) -> str:
        h, n, _ = self.layout.shape
        return f"BlockLayout(kv_heads={h}, n_blocks={n}, block_size={self.block_size})"


_TYPES: dict[str, type[Pattern]] = {c.kind: c for c in (Full, SinkWindow, BlockSparse, BlockLayout)}


def pattern_from_dict(d: dict[str, Any]) -> Pattern:
    """Build a pattern from its `to_dict` form."""
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError(f"a pattern dict needs a 'type' key (one of {sorted(_TYPES)}), got {d!r}")
    kind = d["type"]
    if kind not in _TYPES:
        raise ValueError(f"unknown pattern type {kind!r}; known types: {sorted(_TYPES)}")
    args = {k: v for k, v in d.items() if k != "type"}
    if kind == BlockLayout.kind:
        unknown = set(args) - {"layout", "block_size"}
        if unknown or "layout" not in args:
            raise ValueError(f"block_layout dict takes 'layout' and 'block_size', got keys {sorted(args)}")
        layout = args["layout"]
        if not isinstance(layout, list) or not all(isinstance(h, list) for h in layout):
            raise ValueError("block_layout 'layout' must be a list (heads) of lists (rows) of '0'/'1' strings")
        try:
            tensor = torch.tensor([[[c == "1" for c in row] for row in head] for head in layout], dtype=torch.bool)
            valid = all(set(row) <= {"0", "1"} for head in layout for row in head)
        except (TypeError, ValueError) as e:
            raise ValueError(f"block_layout 'layout' is malformed: {e}") from None
        if not valid:
            raise ValueError("block_layout 'layout' rows must contain only '0' and '1'")
        return BlockLayout(tensor, block_size=args.get("block_size", 64))
    try:
        return _TYPES[kind](**args)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise ValueError(f"bad parameters for pattern {kind!r}: {e}") from None
        raise
