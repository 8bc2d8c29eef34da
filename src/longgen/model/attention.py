"""The ``"longgen"`` attention implementation for Hugging Face models.

Registered with transformers' attention interface (and its mask interface) by `register()`, which
``import longgen`` calls. Each attention layer of a converted hybrid reads its own pattern from
``config.longgen`` and calls `longgen.sparse_attention`:

* training / prefill without a cache: batched sequences, right-padded batches (``seqlens``), left/any padding
  (unpadded into packed sequences), and packed sequences whose ``position_ids`` restart at 0 (``cu_seqlens``);
  plain causal Full layers go to PyTorch SDPA (FlashAttention/cuDNN kernels), which is faster for them in
  training, or without gradients on an H100/H200 to longgen's Hopper forward, which is faster than cuDNN's
  (`longgen.kernels.dispatch.full_layer_backend`);
* queries shorter than the keys (decoding with a transformers cache): `longgen.kernels.cache_attention` over
  all the keys. The compact KV cache of `longgen.infer` keeps only the keys the pattern still needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from longgen.kernels import sparse_attention
from longgen.kernels.dispatch import full_layer_backend
from longgen.model.layout import LAYOUT_KEY, read_layout
from longgen.patterns import Full, Pattern

ATTN_IMPLEMENTATION = "longgen"

# Caches that must see padding and positions (longgen.infer.HybridCache) return the new key tensor from
# `Cache.update` and register a callable under id(key) here; the attention below hands that call over to them.
CACHE_HOOKS: dict[int, Any] = {}

# Set by longgen.train.context_parallel while training shards every sequence across ranks: called with this
# rank's (q, k, v) shards (B, T_local, heads, d), the layer's pattern, the padding mask and the scale, it runs
# `_attend_prefill` on whole sequences for a slice of the heads and returns the output shard (B, T_local, H, d).
CONTEXT_PARALLEL: Callable[..., torch.Tensor] | None = None


def layer_pattern(module: torch.nn.Module) -> Pattern:
    """The pattern of attention layer `module` (cached on the module, keyed by its layout entry)."""
    config = module.config
    entry = repr(getattr(config, LAYOUT_KEY, {}).get("layers", [None] * (module.layer_idx + 1))[module.layer_idx])
    cached = getattr(module, "_longgen_pattern", None)
    if cached is not None and cached[0] == entry:
        return cached[1]
    pattern = read_layout(config)[module.layer_idx]
    module._longgen_pattern = (entry, pattern)
    return pattern


@torch.compiler.disable  # opaque kernels and host-side checks: compiled layers run it as it is, between graphs
def longgen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q ``(B, H, q_len, d)``, k/v ``(B, Hkv, kv_len, d)`` -> ``(B, q_len, H, d)``.

    `attention_mask` is None or a 2-D boolean padding mask ``(B, kv_len)`` (True = real token).
    """
    if dropout and module.training:
        raise ValueError("longgen attention does not implement attention dropout; set config.attention_dropout = 0.0")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"longgen attention takes a 2-D padding mask (batch, kv_len), got shape {tuple(attention_mask.shape)}"
        )
    hook = CACHE_HOOKS.pop(id(key), None)
    if hook is not None:
        return hook(query, key, value, attention_mask, scaling), None
    pattern = layer_pattern(module)
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):  # RoPE hands back float32 q/k under autocast; v is already cast
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, T, heads, d) views
    if CONTEXT_PARALLEL is not None:
        return CONTEXT_PARALLEL(q, k, v, pattern, attention_mask, scaling), None
    if q.shape[1] == k.shape[1]:
        out = _attend_prefill(q, k, v, pattern, attention_mask, kwargs.get("position_ids"), scaling)
    else:
        out = _attend_masked(q, k, v, pattern, attention_mask, scaling)
    return out, None


def _attend_prefill(
    q, k, v, pattern: Pattern, mask, position_ids, scale, kv_head_offset: int = 0, num_kv_heads_total=None
) -> torch.Tensor:
    """q ``(B, T, H, d)``, k/v ``(B, T, Hkv, d)`` -> ``(B, T, H, d)``; the KV heads may be a slice of
    `num_kv_heads_total` starting at `kv_head_offset` (context parallelism), see `longgen.sparse_attention`."""
    B, T = q.shape[:2]
    heads = {"kv_head_offset": kv_head_offset, "num_kv_heads_total": num_kv_heads_total}
    if mask is not None and not bool(mask.all()):
        lens = mask.sum(-1, dtype=torch.int32)
        right_padded = bool((mask == (torch.arange(T, device=mask.device) < lens[:, None])).all())
        if right_padded:
            return sparse_attention(q, k, v, pattern, seqlens=lens, scale=scale, **heads)
        return _attend_unpadded(q, k, v, pattern, mask, scale, **heads)
    cu_seqlens = _packed_offsets(position_ids, B, T)
    if cu_seqlens is not None:
        flat = [x.reshape(B * T, *x.shape[2:]) for x in (q, k, v)]
        return sparse_attention(*flat, pattern, cu_seqlens=cu_seqlens, scale=scale, **heads).view(q.shape)
    if isinstance(pattern, Full) and full_layer_backend(q, k, v) == "sdpa":
        return _sdpa(q, k, v, scale, is_causal=True)
    return sparse_attention(q, k, v, pattern, scale=scale, **heads)


def _sdpa(q, k, v, scale, **kwargs) -> torch.Tensor:
    """PyTorch SDPA on (B, T, heads, d) tensors, GQA without repeating K/V."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        scale=scale,
        enable_gqa=k.shape[2] != q.shape[2],
        **kwargs,
    )
    return out.transpose(1, 2)


def _packed_offsets(position_ids: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
    """cu_seqlens of the packed sequences in `position_ids`, or None when every row is positions 0..T-1."""
    if position_ids is None:
        return None
    pos = position_ids.expand(B, T)
    arange = torch.arange(T, device=pos.device)
    if bool((pos == arange).all()):
        return None
    flat = pos.reshape(-1)
    prev = torch.cat([flat.new_full((1,), -1), flat[:-1]])
    starts = flat == 0
    row_start = torch.zeros_like(starts).view(B, T)
    row_start[:, 0] = True
    if not bool(((flat == prev + 1) | starts).all()) or not bool((starts | ~row_start.reshape(-1)).all()):
        raise ValueError(
            "longgen attention needs position_ids that count 0, 1, 2, ... within each sequence (packed sequences "
            "restart at 0, and every row starts a sequence); got other position_ids"
        )
    offsets = torch.nonzero(starts).flatten()
    return torch.cat([offsets, offsets.new_tensor([B * T])]).to(torch.int32)


def _attend_unpadded(q, k, v, pattern: Pattern, mask: torch.Tensor, scale, **heads) -> torch.Tensor:
    """Any padding: gather each row's real tokens into one packed sequence, attend, scatter back (zeros)."""
    B, T, H, d = q.shape
    idx = torch.nonzero(mask.reshape(-1)).flatten()
    lens = mask.sum(-1)
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(torch.int32)
    packed = [x.reshape(B * T, *x.shape[2:]).index_select(0, idx) for x in (q, k, v)]
    o = sparse_attention(*packed, pattern, cu_seqlens=cu, scale=scale, **heads)
    out = q.new_zeros(B * T, H, d).index_copy(0, idx, o)
    return out.view(B, T, H, d)


def _attend_masked(q, k, v, pattern: Pattern, mask, scale) -> torch.Tensor:
    """Exact attention for queries that are the last q_len of kv_len keys (decoding with a cache):
    `cache_attention` with every key's position (padding: -1). Positions count real tokens only (left padding
    does not shift them); padding queries get zeros."""
    from longgen.kernels import cache_attention

    q_len, S, hkv = q.shape[1], k.shape[1], k.shape[2]
    valid = torch.ones(q.shape[0], S, dtype=torch.bool, device=q.device) if mask is None else mask[:, -S:].bool()
    kpos = valid.long().cumsum(-1) - 1
    k_pos = torch.where(valid, kpos, -1).to(torch.int32)[:, None].expand(-1, hkv, -1)
    out = cache_attention(q, kpos[:, S - q_len :], k.transpose(1, 2), v.transpose(1, 2), k_pos, pattern, scale=scale)
    return out * valid[:, S - q_len :, None, None]


_REGISTERED = False


def register() -> None:
    """Make ``attn_implementation="longgen"`` known to transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, longgen_attention)
    # a 2-D padding mask (or None), as for FlashAttention: the patterns are applied inside the op
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)
    _REGISTERED = True
