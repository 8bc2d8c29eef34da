"""The hybrid KV cache: every layer physically keeps only the keys and values its pattern can still attend.

Full layers keep everything; SinkWindow layers keep the sink tokens and the last `window` tokens; BlockSparse
layers keep, per KV head, the local blocks and that head's strided blocks. Keys are cached already rotated at
their absolute positions (static positions: nothing is ever re-rotated).

How it works. Each layer holds slots ``(batch, kv_heads, capacity, head_dim)`` and the absolute position of the
token in each slot (-1 = free). New tokens go into free slots; after each step the slots the pattern no longer
allows for the newest token are freed (`Pattern.allowed`, the single source of truth). For a KV-cache-efficient
pattern a key a query stops attending is never attended again, so what is kept is exactly `Pattern.kv_retention`
(tested at every step); other layouts are refused. Positions count real tokens, so left padding in a batch of
prompts of different lengths does not shift them.

transformers' `Cache.update` sees neither padding nor positions, so `update` registers the new key tensor in
`longgen.model.attention.CACHE_HOOKS` and the ``"longgen"`` attention hands the call back to `attend` here.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from longgen.model.attention import ATTN_IMPLEMENTATION, CACHE_HOOKS, _attend_prefill, attend_at_positions
from longgen.model.layout import read_layout
from longgen.patterns import Full, Pattern

STORE_CHUNK = 4096  # tokens appended between evictions while storing a prompt into a growing cache
PREALLOC_SLACK = 64  # slots beyond the pattern's retention in a preallocated cache (room to append, then evict)


class RetainedKVLayer(CacheLayerMixin):
    """One attention layer's cache under `pattern` (see the module docstring)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, pattern: Pattern, num_kv_heads: int, capacity: int = 0):
        super().__init__()
        pattern = pattern.resolve(num_kv_heads)
        pattern.check_kv_cache_efficient(num_kv_heads)
        self.pattern = pattern
        self.num_kv_heads = num_kv_heads
        self.initial_capacity = capacity
        self.seen = 0  # tokens passed through, padding included: transformers' sequence length
        self.positions: torch.Tensor | None = None  # (batch, kv_heads, capacity), -1 = free slot
        self.next_pos: torch.Tensor | None = None  # (batch,) real tokens so far per row

    # -- transformers' CacheLayerMixin ---------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, heads, _, d = key_states.shape
        if heads != self.num_kv_heads:
            raise ValueError(f"cache built for {self.num_kv_heads} KV heads, the model gives {heads}")
        self.dtype, self.device = key_states.dtype, key_states.device
        cap = self.initial_capacity
        self.keys = key_states.new_zeros(B, heads, cap, d)
        self.values = value_states.new_zeros(B, heads, cap, value_states.shape[-1])
        self.positions = torch.full((B, heads, cap), -1, dtype=torch.long, device=self.device)
        self.next_pos = torch.zeros(B, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        CACHE_HOOKS[id(key_states)] = self.attend
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False
        self.keys = self.values = self.positions = self.next_pos = None
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            for name in ("keys", "values", "positions", "next_pos"):
                setattr(self, name, getattr(self, name).index_select(0, indices.to(self.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            for name in ("keys", "values", "positions", "next_pos"):
                setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the longgen hybrid cache drops keys as it goes and cannot be cropped")

    # -- what the cache holds ------------------------------------------------------------------------------
    def stored_tokens(self) -> torch.Tensor:
        """Tokens physically kept, ``(batch, kv_heads)``."""
        return (self.positions >= 0).sum(-1)

    def stored_positions(self, row: int, head: int) -> torch.Tensor:
        p = self.positions[row, head]
        return p[p >= 0].sort().values

    def allocated_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    # -- attention with the cache --------------------------------------------------------------------------
    def attend(self, query, key, value, mask, scale) -> torch.Tensor:
        """q ``(B, H, q, d)``, new k/v ``(B, Hkv, q, d)``, 2-D padding mask over all tokens or None.

        Returns ``(B, q, H, d)``: attention of the new queries over the kept keys and the new ones, after which
        the new tokens are stored and what the pattern no longer allows is freed."""
        device_type = query.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        B, q_len = query.shape[0], query.shape[2]
        valid = torch.ones(B, q_len, dtype=torch.bool, device=query.device)
        if mask is not None:
            valid = mask[:, -q_len:].bool()
        q_pos = self.next_pos[:, None] + valid.long().cumsum(-1) - 1
        if q_len > 1 and not bool((self.positions >= 0).any()):
            # a prompt into an empty cache: the sparse kernels over the prompt itself
            out = _attend_prefill(
                query.transpose(1, 2),
                key.transpose(1, 2),
                value.transpose(1, 2),
                self.pattern,
                None if bool(valid.all()) else valid,
                None,
                scale,
            )
            self._store(key, value, q_pos, valid)
        else:
            self._store(key, value, q_pos, valid, evict=False)
            out = self._attend_slots(query, q_pos, valid, scale)
            self._evict()
        self.seen += q_len
        return out

    def _attend_slots(self, query, q_pos, valid, scale) -> torch.Tensor:
        keys, values = self.keys.to(query.dtype), self.values.to(query.dtype)
        return attend_at_positions(
            query, keys, values, self.pattern, q_pos, self.positions, self.positions >= 0, valid, scale
        )

    def _store(self, key, value, pos, valid, evict: bool = True) -> None:
        """Put the valid new tokens into free slots, in pieces that fit, freeing what the pattern drops between
        pieces (a preallocated cache never grows past its retention + slack)."""
        q_len, s = key.shape[2], 0
        while s < q_len:
            n = q_len - s
            if evict:
                room = int((self.positions < 0).sum(-1).min())
                n = min(n, room if self.initial_capacity and room > 0 else STORE_CHUNK)
            k, v = key[:, :, s : s + n], value[:, :, s : s + n]
            p = torch.where(valid[:, s : s + n], pos[:, s : s + n], -1)
            self._append(k, v, p)
            self.next_pos = self.next_pos + valid[:, s : s + n].sum(-1)
            if evict:
                self._evict()
            s += n

    def _append(self, k, v, p) -> None:
        B, H, n, d = k.shape
        free = (self.positions < 0).sum(-1)
        short = n - int(free.min())
        if short > 0:
            cap = self.positions.shape[-1]
            grow = max(short, 0 if self.initial_capacity else cap // 2, 16)
            self.keys = torch.cat([self.keys, self.keys.new_zeros(B, H, grow, d)], dim=2)
            self.values = torch.cat([self.values, self.values.new_zeros(B, H, grow, self.values.shape[-1])], dim=2)
            self.positions = torch.cat([self.positions, self.positions.new_full((B, H, grow), -1)], dim=2)
        slots = torch.argsort((self.positions >= 0).to(torch.int8), dim=-1, stable=True)[..., :n]  # free first
        self.keys.scatter_(2, slots[..., None].expand(-1, -1, -1, d), k.to(self.keys.dtype))
        self.values.scatter_(2, slots[..., None].expand(-1, -1, -1, v.shape[-1]), v.to(self.values.dtype))
        self.positions.scatter_(2, slots, p[:, None, :].expand(-1, H, -1))

    def _evict(self) -> None:
        """Free the slots the newest token of each row may not attend: no later token will (KV-cache efficiency)."""
        if isinstance(self.pattern, Full):
            return
        last = (self.next_pos - 1)[:, None, None]
        g = torch.arange(self.num_kv_heads, device=self.positions.device)[None, :, None]
        keep = self.pattern.allowed(last.clamp(min=0), self.positions.clamp(min=0), g, self.num_kv_heads)
        self.positions = torch.where(keep & (self.positions >= 0), self.positions, -1)


class HybridCache(Cache):
    """A transformers `Cache` for LongGen hybrids: pass it to ``model.generate(past_key_values=...)``.

    `max_length` (optional) preallocates every layer at the pattern's largest retention for that length plus
    `PREALLOC_SLACK` slots, so no memory is reallocated while generating; otherwise layers grow as needed.
    """

    def __init__(self, config: Any, max_length: int | None = None):
        if getattr(config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            raise ValueError(
                "HybridCache needs a model running attn_implementation='longgen' (load it with longgen.load_model)"
            )
        hkv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        layers = []
        for p in read_layout(config):
            cap = 0
            if max_length is not None:
                cap = max(p.kept_tokens(max_length, hkv)) + PREALLOC_SLACK
            layers.append(RetainedKVLayer(p, hkv, capacity=cap))
        super().__init__(layers=layers)

    def stored_tokens(self, layer_idx: int) -> torch.Tensor:
        """Tokens physically kept by layer `layer_idx`, ``(batch, kv_heads)``."""
        return self.layers[layer_idx].stored_tokens()

    def allocated_bytes(self) -> int:
        """Bytes of key/value storage allocated by all layers."""
        return sum(layer.allocated_bytes() for layer in self.layers)


def analytic_kv_bytes(config: Any, length: int, batch: int = 1, bytes_per_value: int = 2) -> int:
    """The pattern's minimum KV storage at `length` tokens (what `describe` reports), for comparisons."""
    from longgen.model.convert import describe

    rows, _ = describe(config, length, bytes_per_value)
    return batch * sum(r.kv_bytes for r in rows)


__all__ = ["HybridCache", "RetainedKVLayer", "analytic_kv_bytes"]
