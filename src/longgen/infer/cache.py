"""The hybrid KV cache for Hugging Face `generate()`: every layer keeps only what its pattern can still see.

Each layer is a `longgen.infer.kv.CompactKV` (slots computed from positions: full layers keep everything,
SinkWindow layers the sink plus a ring of `window` slots, block patterns their live blocks; see that module),
wrapped as a transformers cache layer. Keys are cached already rotated at their absolute positions (static
positions: nothing is ever re-rotated). Positions count real tokens, so left padding in a batch of prompts of
different lengths does not shift them.

transformers' `Cache.update` sees neither padding nor positions, so `update` registers the new key tensor in
`longgen.model.attention.CACHE_HOOKS` and the ``"longgen"`` attention hands the call back to `attend` here.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from longgen.infer.kv import CompactKV
from longgen.model.attention import ATTN_IMPLEMENTATION, CACHE_HOOKS
from longgen.model.layout import read_layout
from longgen.patterns import BlockLayout, Pattern

INITIAL_LENGTH = 256  # a growing cache starts with room for this many tokens (or the first input) and doubles


class RetainedKVLayer(CacheLayerMixin):
    """One attention layer's cache under `pattern`: a `CompactKV` that grows (doubling its length) unless
    `max_length` fixes it."""

    is_sliding = False
    is_croppable = False

    def __init__(self, pattern: Pattern, num_kv_heads: int, max_length: int | None = None):
        super().__init__()
        pattern = pattern.resolve(num_kv_heads)
        pattern.check_kv_cache_efficient(num_kv_heads)
        self.pattern = pattern
        self.num_kv_heads = num_kv_heads
        self.max_length = max_length
        self.kv: CompactKV | None = None
        self.seen = 0  # tokens passed through, padding included: transformers' sequence length

    # -- transformers' CacheLayerMixin ---------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, heads, n, d = key_states.shape
        if heads != self.num_kv_heads:
            raise ValueError(f"cache built for {self.num_kv_heads} KV heads, the model gives {heads}")
        self.dtype, self.device = key_states.dtype, key_states.device
        length = self.max_length or self._limit(max(INITIAL_LENGTH, 2 * n))
        self.kv = self._new(B, d, value_states.shape[-1], length)
        self.is_initialized = True

    def _limit(self, length: int) -> int:
        p = self.pattern
        return min(length, p.n_blocks * p.block_size) if isinstance(p, BlockLayout) else length

    def _new(self, batch: int, d: int, dv: int, length: int) -> CompactKV:
        return CompactKV(
            self.pattern, self.num_kv_heads, d, max_len=length, batch=batch, dtype=self.dtype, device=self.device,
            value_dim=dv,
        )  # fmt: skip

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
        self.kv = None
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._map_rows(lambda t: t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def _map_rows(self, fn) -> None:
        for name in ("keys", "values", "positions", "next_pos"):
            setattr(self.kv, name, fn(getattr(self.kv, name)))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the longgen hybrid cache drops keys as it goes and cannot be cropped")

    # -- what the cache holds ------------------------------------------------------------------------------
    def stored_tokens(self) -> torch.Tensor:
        """Tokens a present or future query can attend, ``(batch, kv_heads)``."""
        return self.kv.stored_tokens()

    def stored_positions(self, row: int, head: int) -> torch.Tensor:
        return self.kv.stored_positions(row, head)

    def allocated_bytes(self) -> int:
        return self.kv.allocated_bytes() if self.is_initialized else 0

    # -- attention with the cache --------------------------------------------------------------------------
    def attend(self, query, key, value, mask, scale) -> torch.Tensor:
        """q ``(B, H, q, d)``, new k/v ``(B, Hkv, q, d)``, 2-D padding mask over all tokens or None.

        Returns ``(B, q, H, d)``: attention of the new queries over the kept keys and the new ones."""
        device_type = query.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        q_len = query.shape[2]
        valid = None if mask is None or bool(mask[:, -q_len:].all()) else mask[:, -q_len:].bool()
        steps = torch.ones_like(query[:, 0, :, 0], dtype=torch.long) if valid is None else valid.long()
        q_pos = self.kv.next_pos[:, None] + steps.cumsum(-1) - 1
        needed = int(q_pos.max()) + 1
        if needed > self.kv.max_len:
            self._grow(needed)
        out = self.kv.attend(query, key, value, q_pos, valid, scale, empty=self.seen == 0)
        self.seen += q_len
        return out

    def _grow(self, needed: int) -> None:
        if self.max_length is not None or self._limit(needed) < needed:
            raise ValueError(f"the cache holds at most {self.kv.max_len} tokens per sequence; this step needs {needed}")
        old = self.kv
        self.kv = self._new(old.keys.shape[0], old.keys.shape[-1], old.values.shape[-1], self._limit(2 * needed))
        self.kv.copy_from(old)


@functools.cache
def _cache_keyword() -> str:
    from transformers.generation.utils import GenerationMixin

    parameters = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(cache: Cache) -> dict[str, Cache]:
    """``{keyword: cache}`` to hand `cache` to ``model.generate(...)`` or a model's forward: transformers calls it
    ``cache`` from 5.24 on and ``past_key_values`` before (the old name warns there and goes in 6.0)."""
    return {_cache_keyword(): cache}


class HybridCache(Cache):
    """A transformers `Cache` for LongGen hybrids: pass it to ``model.generate(cache=...)`` (transformers < 5.24:
    ``past_key_values=...``; `cache_kwargs` picks the keyword).

    `max_length` (optional) preallocates every layer for sequences of up to that many tokens, so no memory is
    reallocated while generating; otherwise layers grow (doubling) as needed.
    """

    def __init__(self, config: Any, max_length: int | None = None):
        if getattr(config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            raise ValueError(
                "HybridCache needs a model running attn_implementation='longgen' (load it with longgen.load_model)"
            )
        hkv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        layers = []
        for p in read_layout(config):
            layers.append(RetainedKVLayer(p, hkv, max_length=max_length))
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
