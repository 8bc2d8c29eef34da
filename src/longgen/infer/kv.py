"""Compact per-layer KV storage: every layer holds only the keys and values its pattern can still attend.

One `CompactKV` per attention layer, for a fixed number of rows (sequences) and a maximum length. Each token
has a slot computed from its absolute position, so storing is a scatter with no bookkeeping on the host and a
decode step has static shapes (CUDA-graph capturable):

* Full layers (and patterns that keep everything up to `max_len`): slot = position; ``max_len`` slots.
* SinkWindow: the first `sink` positions in their own slots, then a ring of `window` slots
  (slot = sink + (position - sink) % window): ``sink + window`` slots.
* Block patterns (BlockSparse, BlockLayout): a key block is live from its first token until the last query block
  that sees it (an interval, because the cache only takes KV-cache-efficient patterns). Slot blocks are assigned
  to key blocks by greedy interval colouring, per KV head, into a table ``(kv_heads, n_blocks)``; the number of
  slot blocks is the largest number of blocks live at once (local blocks + strided blocks so far, for BlockSparse).

A slot whose block or ring position is reused holds a dead key until it is overwritten; `positions` says which
token each slot holds and the attention masks by the pattern, so dead keys are never attended. `stored_tokens`
counts the live ones, which is exactly `Pattern.kv_retention`. One extra slot at the end takes the writes of
tokens that are not kept (padding, or prompt tokens the pattern already dropped) and never holds a position.

`attend` is the one attention-with-cache path (Hugging Face `generate` through `HybridCache`, and the serving
runner): a prompt into an empty row runs the sparse kernels over the prompt; one new token is stored first and
then attends the cache (its slot only ever replaces a key it cannot see); several new tokens attend the cache
plus themselves, then are stored. A prompt slice of a row (the serving runner's chunked prefill) attends its keys
laid out in position order with the prefill kernels instead (`_attend_slice`; all patterns but BlockLayout): SDPA
with a bottom-right causal mask for Full layers, the sparse kernels with a query offset for the others.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from longgen.patterns import BlockLayout, BlockSparse, Full, Pattern, SinkWindow, _BlockPattern

IDENTITY, RING, TABLE = "identity", "ring", "table"


@dataclass(frozen=True)
class SlotMap:
    """How one layer's pattern maps positions to slots for sequences of up to `max_len` tokens."""

    kind: str
    capacity: int
    sink: int = 0
    window: int = 0
    block_size: int = 1
    table: torch.Tensor | None = None  # (kv_heads, n_blocks) slot block of each key block (TABLE)

    @staticmethod
    def build(pattern: Pattern, num_kv_heads: int, max_len: int) -> SlotMap:
        p = pattern.resolve(num_kv_heads)
        if isinstance(p, SinkWindow) and p.sink + p.window < max_len:
            return SlotMap(RING, p.sink + p.window, sink=p.sink, window=p.window)
        if isinstance(p, _BlockPattern):
            n_blocks = math.ceil(max_len / p.block_size)
            table, n_slot_blocks = _slot_table(p, num_kv_heads, n_blocks)
            if n_slot_blocks * p.block_size < max_len:
                return SlotMap(TABLE, n_slot_blocks * p.block_size, block_size=p.block_size, table=table)
        return SlotMap(IDENTITY, max_len)

    def slots(self, pos: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        """Slot of each position: pos ``(B, 1 or kv_heads, n)`` int64 -> ``(B, kv_heads or 1, n)``; or, with
        `heads` (the KV head of each position, same shape), any shape."""
        if self.kind == RING:
            return torch.where(pos < self.sink, pos, self.sink + (pos - self.sink) % self.window)
        if self.kind == TABLE:
            if heads is None:
                heads = torch.arange(self.table.shape[0], device=pos.device)[None, :, None]
            return self.table[heads, pos // self.block_size] * self.block_size + pos % self.block_size
        return pos

    def ring_positions(self, first: int, end: int, last: int, device) -> torch.Tensor:
        """RING: the positions in [first, end) that a query at `last` (or later) can see — the sink, then the last
        window — in increasing order; built on the device from host integers (no host sync)."""
        lo = max(first, self.sink, last - self.window + 1)
        sink_end = max(first, min(self.sink, end))
        return torch.cat([torch.arange(first, sink_end, device=device), torch.arange(lo, max(lo, end), device=device)])


@lru_cache(maxsize=64)
def _slot_table(p: _BlockPattern, num_kv_heads: int, n_blocks: int) -> tuple[torch.Tensor, int]:
    """Greedy interval colouring of key blocks by liveness, per KV head -> (table int64 on CPU, slot blocks)."""
    last = p.last_query_block(num_kv_heads, n_blocks).tolist()
    table = torch.empty(num_kv_heads, n_blocks, dtype=torch.long)
    used = 0
    for g in range(num_kv_heads):
        free: list[int] = []
        release: dict[int, list[int]] = {}
        n_colours = 0
        row = table[g]
        colours = [0] * n_blocks
        for j in range(n_blocks):
            for c in release.pop(j, ()):
                heapq.heappush(free, c)
            if free:
                c = heapq.heappop(free)
            else:
                c, n_colours = n_colours, n_colours + 1
            colours[j] = c
            release.setdefault(last[g][j] + 1, []).append(c)
        row.copy_(torch.tensor(colours))
        used = max(used, n_colours)
    return table, used


class CompactKV:
    """One layer's compact cache for `batch` rows of up to `max_len` tokens (see the module docstring)."""

    def __init__(
        self,
        pattern: Pattern,
        num_kv_heads: int,
        head_dim: int,
        *,
        max_len: int,
        batch: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        value_dim: int | None = None,
    ):
        if max_len < 1 or batch < 1:
            raise ValueError(f"max_len and batch must be >= 1, got {max_len} and {batch}")
        pattern = pattern.resolve(num_kv_heads)
        pattern.check_kv_cache_efficient(num_kv_heads, max_len if isinstance(pattern, BlockLayout) else None)
        if isinstance(pattern, BlockLayout) and max_len > pattern.n_blocks * pattern.block_size:
            raise ValueError(
                f"max_len {max_len} exceeds the BlockLayout's length {pattern.n_blocks * pattern.block_size}"
            )
        self.pattern, self.num_kv_heads, self.max_len = pattern, num_kv_heads, max_len
        self.map = SlotMap.build(pattern, num_kv_heads, max_len)
        if self.map.table is not None:
            self.map = replace(self.map, table=self.map.table.to(device))
        cap = self.map.capacity
        self.keys = torch.zeros(batch, num_kv_heads, cap + 1, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros(batch, num_kv_heads, cap + 1, value_dim or head_dim, dtype=dtype, device=device)
        self.positions = torch.full((batch, num_kv_heads, cap + 1), -1, dtype=torch.int32, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)  # tokens stored so far per row
        self._heads = torch.arange(num_kv_heads, device=device)[None, :, None]

    @property
    def capacity(self) -> int:
        return self.map.capacity

    def rows(self, start: int, stop: int | None = None) -> CompactKV:
        """A view of rows [start, stop) sharing this cache's storage (writes go through)."""
        stop = start + 1 if stop is None else stop
        view = object.__new__(CompactKV)
        view.__dict__.update(self.__dict__)
        for name in ("keys", "values", "positions", "next_pos"):
            setattr(view, name, getattr(self, name)[start:stop])
        return view

    def reset(self) -> None:
        """Empty every row of this cache (or view)."""
        self.positions.fill_(-1)
        self.next_pos.zero_()

    # -- what is kept -------------------------------------------------------------------------------------------
    def _retained(self, pos: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """May the token at `last` (``(B,)``) or any later one see keys at `pos` (``(B, 1|H, n)``)?"""
        if isinstance(self.pattern, Full):
            return (pos >= 0) & (pos <= last[:, None, None])
        allowed = self.pattern._allowed(last[:, None, None], pos.clamp(min=0), self._heads, self.num_kv_heads)
        return allowed & (pos >= 0)

    def stored_tokens(self) -> torch.Tensor:
        """Live tokens (ones a present or future query can attend) per row and KV head, ``(B, kv_heads)``."""
        pos = self.positions[..., : self.capacity].long()
        return self._retained(pos, self.next_pos - 1).sum(-1)

    def stored_positions(self, row: int, head: int) -> torch.Tensor:
        pos = self.positions[row : row + 1, :, : self.capacity].long()
        live = self._retained(pos, self.next_pos[row : row + 1] - 1)[0, head]
        return pos[0, head][live].sort().values

    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    # -- storing ------------------------------------------------------------------------------------------------
    def write(self, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor) -> None:
        """Store key/value ``(B, kv_heads, n, d)`` of tokens at `pos` where `keep` (both ``(B, 1|kv_heads, n)``).

        Kept tokens must fit at once (at most the pattern's retention): only tokens a later query can see."""
        B, n = key.shape[0], key.shape[2]
        if n > 1:  # a prompt or a chunk (never inside a CUDA graph): copy only the kept tokens
            keep = keep.expand(B, self.num_kv_heads, n)
            pos = pos.expand(B, self.num_kv_heads, n)[keep]
            rows = torch.arange(B * self.num_kv_heads, device=pos.device).view(B, -1, 1).expand(-1, -1, n)[keep]
            flat = rows * (self.capacity + 1) + self.map.slots(pos, heads=rows % self.num_kv_heads)
            for store, new in ((self.keys, key), (self.values, value)):
                store.view(-1, store.shape[-1]).index_copy_(0, flat, new[keep].to(store.dtype))
            self.positions.view(-1).index_copy_(0, flat, pos.to(torch.int32))
            return
        slot = torch.where(keep, self.map.slots(pos), self.capacity)
        slot = slot.expand(key.shape[0], self.num_kv_heads, -1)
        self.keys.scatter_(2, slot[..., None].expand(-1, -1, -1, key.shape[-1]), key.to(self.keys.dtype))
        self.values.scatter_(2, slot[..., None].expand(-1, -1, -1, value.shape[-1]), value.to(self.values.dtype))
        self.positions.scatter_(2, slot, pos.expand_as(slot).to(torch.int32))
        self.positions[..., self.capacity] = -1

    def _write_new(self, key, value, pos, keep, start: int | None, last: torch.Tensor | None = None) -> None:
        """Store the new tokens `keep` selects; with `last` only those a query at `last` or later can see.

        With `start` (every row's tokens are positions start .. start + n - 1, none padded, and the rows hold `start`
        tokens) the slots come from host arithmetic: a copy for IDENTITY, for RING the sink and the last `window`
        tokens, and for BlockSparse slot tables each head's kept blocks (`_table_kept`) — no boolean indexing, so
        no host sync."""
        n, dev = key.shape[2], key.device
        if start is not None and last is not None and self.map.kind == TABLE and isinstance(self.pattern, BlockSparse):
            kept, slots = self._table_kept(start, n)
            B = key.shape[0]
            src = (kept - start).clamp(0, n - 1)[None, :, :, None]
            for store, new in ((self.keys, key), (self.values, value)):
                d = new.shape[-1]
                picked = new.gather(2, src.expand(B, -1, -1, d)).to(store.dtype)
                store.scatter_(2, slots[None, :, :, None].expand(B, -1, -1, d), picked)
            self.positions.scatter_(2, slots[None].expand(B, -1, -1), kept.to(torch.int32)[None].expand(B, -1, -1))
            self.positions[..., self.capacity] = -1  # the spare slot took the padding of the kept lists
            return
        if start is None or self.map.kind == TABLE:
            self.write(key, value, pos, keep if last is None else keep & self._retained(pos, last))
            return
        if self.map.kind == IDENTITY:
            self.keys[:, :, start : start + n] = key
            self.values[:, :, start : start + n] = value
            self.positions[:, :, start : start + n] = torch.arange(start, start + n, device=dev, dtype=torch.int32)
            return
        kept = self.map.ring_positions(start, start + n, start + n - 1, dev)
        slots = self.map.slots(kept)
        for store, new in ((self.keys, key), (self.values, value)):
            store.index_copy_(2, slots, new.index_select(2, kept - start).to(store.dtype))
        B, hkv = self.positions.shape[:2]
        self.positions.index_copy_(2, slots, kept.to(torch.int32).expand(B, hkv, -1).contiguous())

    def _table_kept(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """BlockSparse slot tables: the positions among start .. start + n - 1 that a query at start + n - 1 or later
        still sees, per KV head, and their slots, both ``(kv_heads, K)`` int64, padded to one length K (known on the
        host) with the spare slot `capacity`. Built on the device from host integers (`BlockSparse.live_blocks`): no
        host sync. (A dense head keeps everything, so its layer gets the position-indexed map, not a slot table.)"""
        p, bs, hkv, dev = self.pattern, self.map.block_size, self.num_kv_heads, self.keys.device
        last = start + n - 1
        end = last // bs
        blocks = p.live_blocks(start // bs, end, hkv, dev)
        kept = (blocks[:, :, None] * bs + torch.arange(bs, device=dev)).view(hkv, -1)
        ok = ((blocks <= end)[:, :, None].expand(-1, -1, bs).reshape(hkv, -1)) & (kept >= start) & (kept <= last)
        g = torch.arange(hkv, device=dev)
        table = self.map.table[g[:, None], blocks.clamp(max=self.map.table.shape[1] - 1)]
        slots = (table[:, :, None] * bs + torch.arange(bs, device=dev)).view(hkv, -1)
        return kept, torch.where(ok, slots, self.capacity)

    def copy_from(self, other: CompactKV) -> None:
        """Take over the live tokens of `other` (same pattern and rows; used when a growing cache is rebuilt)."""
        pos = other.positions[..., : other.capacity].long()
        keep = other._retained(pos, other.next_pos - 1)
        self.write(other.keys[:, :, : other.capacity], other.values[:, :, : other.capacity], pos, keep)
        self.next_pos.copy_(other.next_pos)

    # -- attention with the cache -------------------------------------------------------------------------------
    def _slices_in_order(self) -> bool:
        """Whether a prompt slice can attend this layer's keys laid out in position order (`_attend_slice`): every
        pattern but BlockLayout (the prefill kernels take no query offset for it)."""
        return not isinstance(self.pattern, BlockLayout)

    def _attend_slice(self, query, key, value, pos, keep, last, start: int, scale) -> torch.Tensor:
        """A prompt slice (positions start .. start + n - 1 of every row, no padding) attends the keys before it and
        itself, then is stored. The keys go in position order and the queries are the last positions
        (`suffix_attention`: SDPA with a bottom-right causal mask for Full, else the prefill kernels with a query
        offset, which visit only the key tiles the pattern keeps)."""
        from longgen.kernels.cache_attention import suffix_attention

        n = query.shape[2]
        if self.map.kind == IDENTITY:  # slot = position: keys 0 .. start + n - 1 in order once the slice is stored
            self._write_new(key, value, pos, keep, start)
            k, v = self.keys[:, :, : start + n], self.values[:, :, : start + n]
        elif self.map.kind == RING:  # SinkWindow: the sink and the window - 1 keys before `start` that the slice
            # can see, in position order; past the sink the pattern only depends on position differences, so the
            # gap between them closes
            slots = self.map.slots(self.map.ring_positions(0, start, start, self.keys.device))
            k = torch.cat([self.keys[:, :, slots], key.to(self.keys.dtype)], dim=2)
            v = torch.cat([self.values[:, :, slots], value.to(self.values.dtype)], dim=2)
        else:  # slot tables (BlockSparse): every stored key at its position in zero-filled keys 0 .. start + n - 1;
            # the kernels visit only the key blocks the slice can see, which are all stored (or in the slice)
            k, v = (self._by_position(store, new, start) for store, new in ((self.keys, key), (self.values, value)))
        out = suffix_attention(query.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.pattern, scale=scale)
        if self.map.kind != IDENTITY:
            self._write_new(key, value, pos, keep, start, last)
        return out

    def _by_position(self, store: torch.Tensor, new: torch.Tensor, start: int) -> torch.Tensor:
        """``(B, Hkv, start + n, d)``: the stored entries of `store` at their positions before `start` (zeros
        elsewhere), then `new` ``(B, Hkv, n, d)``."""
        B, hkv, _, d = store.shape
        end = start + new.shape[2]
        out = store.new_zeros(B, hkv, end + 1, d)  # the last row takes the slots that hold nothing before start
        dest = torch.where((self.positions >= 0) & (self.positions < start), self.positions, end).long()
        out.scatter_(2, dest[..., None].expand(-1, -1, -1, d), store)
        out[:, :, start:end] = new.to(store.dtype)
        return out[:, :, :end]

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        q_pos: torch.Tensor,
        valid: torch.Tensor | None,
        scale: float | None,
        *,
        empty: bool = False,
        start: int | None = None,
    ) -> torch.Tensor:
        """New tokens attend the cache and themselves, then are stored. Returns ``(B, n, heads, d)``.

        query ``(B, heads, n, d)``; key/value ``(B, kv_heads, n, d)``, already rotated; q_pos ``(B, n)`` absolute
        positions; valid ``(B, n)`` bool or None (all real tokens: invalid ones are neither attended nor stored
        and get zeros); `empty`: the rows hold nothing yet (a prompt: the sparse kernels over it); `start`: every
        row's new tokens are the real tokens at positions start, start + 1, ... (lets a Full layer copy a slice)."""
        from longgen.kernels.cache_attention import cache_attention
        from longgen.model.attention import _attend_prefill

        n = query.shape[2]
        keep = (q_pos >= 0)[:, None] if valid is None else valid[:, None]
        n_valid = n if valid is None else valid.sum(-1)
        last = self.next_pos + n_valid - 1
        pos = q_pos[:, None]
        if empty and n > 1:
            out = _attend_prefill(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), self.pattern, valid, None, scale
            )
            self._write_new(key, value, pos, keep, start, last)
        elif n > 1 and start is not None and valid is None and self._slices_in_order():
            out = self._attend_slice(query, key, value, pos, keep, last, start, scale)
        elif n == 1 or self.map.kind == IDENTITY:
            # a stored token only replaces keys the new queries cannot see
            self._write_new(key, value, pos, keep, start)
            kv_len = (last + 1).to(torch.int32) if self.map.kind == IDENTITY else None
            out = cache_attention(
                query.transpose(1, 2), q_pos, self.keys, self.values, self.positions, self.pattern,
                scale=scale, kv_len=kv_len,
            )  # fmt: skip
        else:
            new_pos = torch.where(keep, pos, -1).to(torch.int32).expand(-1, self.num_kv_heads, -1)
            out = cache_attention(
                query.transpose(1, 2),
                q_pos,
                torch.cat([self.keys, key.to(self.keys.dtype)], dim=2),
                torch.cat([self.values, value.to(self.values.dtype)], dim=2),
                torch.cat([self.positions, new_pos], dim=2),
                self.pattern,
                scale=scale,
            )
            self.write(key, value, pos, keep & self._retained(pos, last))
        self.next_pos.copy_(last + 1)
        if valid is not None:
            out = out * valid[:, :, None, None]
        return out


__all__ = ["CompactKV", "SlotMap"]
