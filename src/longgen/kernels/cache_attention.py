"""Attention of new tokens over a compact KV cache (decoding and short appends): one op, two backends.

The serving cache of a layer holds, per KV head, K/V slots in any order (ring buffers) and the absolute position
of the token in each slot (``-1``: empty). `cache_attention` computes the pattern's exact attention of queries at
absolute positions over those slots; ``backend="triton"`` runs the flash-decoding kernels of
`longgen.kernels.triton_cache_attention` (imported lazily, like `triton_attention`), ``"reference"`` plain PyTorch.

Off CUDA (``backend="blocked"``, what ``"auto"`` picks there, as for `longgen.sparse_attention`), the reference runs
with less work: only the slots before the longest ``kv_len`` are read, and a Full layer's cache whose keys all
precede every query (decoding) goes to PyTorch SDPA without a mask.

`suffix_attention` is the long-append case (a prompt slice after the cached part of the prompt) when the keys can
be laid out in position order: the queries are the last positions of the key sequence, and the Triton prefill
kernels run it with a query offset (only the key tiles the pattern keeps are visited).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longgen.kernels.dispatch import choose_backend, triton_suits
from longgen.patterns import BlockLayout, Full, Pattern

__all__ = ["cache_attention", "cache_attention_blocked", "cache_attention_reference", "suffix_attention"]

BACKENDS = ("auto", "blocked", "reference", "triton")


def cache_attention(
    query: torch.Tensor,
    q_pos: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    k_pos: torch.Tensor,
    pattern: Pattern,
    *,
    scale: float | None = None,
    kv_len: torch.Tensor | None = None,
    num_splits: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Exact attention of queries at absolute positions over a compact KV cache.

    query ``(B, Q, H, d)`` (any strides); q_pos ``(B, Q)`` int32/int64 absolute positions; key_cache, value_cache
    ``(B, Hkv, S, d)`` with ``H % Hkv == 0`` (query head h reads KV head ``h // (H // Hkv)``); k_pos ``(B, Hkv, S)``
    int32/int64, the position held in each slot or -1 for an empty slot, in any order. kv_len (optional, int32 or
    int64 ``(B,)`` on the cache's device): only slots ``[0, kv_len[b])`` of row b are read. Returns
    ``(B, Q, H, d)`` in query's dtype: softmax(scale * q.k) v over the slots the pattern allows
    (`Pattern.allowed(q_pos, k_pos, kv_head)`, causality included); a query with no allowed slot gives zeros.

    num_splits: how many programs share one KV head's slots (flash-decoding); default from the cache size, the
    batch and the GPU's SM count (`triton_cache_attention.default_num_splits`). backend: ``"triton"`` (CUDA
    float16/bfloat16, or float16/float32 CPU tensors under ``TRITON_INTERPRET=1``; head_dim in TRITON_HEAD_DIMS),
    ``"reference"`` (PyTorch), ``"blocked"`` (the reference with less work, `cache_attention_blocked`), ``"auto"``
    (`longgen.kernels.dispatch.choose_backend`: Triton where it applies, the reference on other CUDA tensors,
    blocked off CUDA). The Triton path makes
    no host sync and launches a grid that depends only on shapes, so it can be captured in a CUDA graph. Positions
    past a BlockLayout's span see no key there (zeros); the reference raises instead.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    scale = _check_args(query, q_pos, key_cache, value_cache, k_pos, pattern, scale, kv_len, num_splits)
    backend = choose_backend(query, backend)
    if backend in ("reference", "blocked"):
        attend = cache_attention_reference if backend == "reference" else cache_attention_blocked
        return attend(query, q_pos, key_cache, value_cache, k_pos, pattern, scale=scale, kv_len=kv_len)
    from longgen.kernels.triton_cache_attention import triton_cache_attention

    p = pattern.resolve(key_cache.shape[1])
    return triton_cache_attention(query, q_pos, key_cache, value_cache, k_pos, p, scale, kv_len, num_splits)


def suffix_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pattern: Pattern,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of the last positions of a sequence over the whole of it (forward only).

    query ``(B, n, H, d)`` holds positions ``L - n .. L - 1`` of key, value ``(B, L, Hkv, d)`` (positions
    ``0 .. L - 1``); returns ``(B, n, H, d)``: the pattern's causal attention, exactly as the same rows of a full
    `sparse_attention` over the L positions. backend: ``"triton"`` (the prefill kernels with a query offset; CUDA
    float16/bfloat16 or float32 under ``TRITON_INTERPRET=1``; not BlockLayout), ``"reference"`` (`cache_attention`'s
    reference with the positions in order), ``"auto"`` (Full: PyTorch SDPA with a bottom-right causal mask, its fused
    kernels; other patterns: Triton where it applies, else the reference)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and query.dim() == key.dim() == 4):
        raise ValueError("query must be (batch, n, heads, head_dim) and key, value (batch, L, kv_heads, head_dim)")
    B, n, L = query.shape[0], query.shape[1], key.shape[1]
    if not 1 <= n <= L:
        raise ValueError(f"the {n} queries must be the last positions of the {L} keys (1 <= n <= L)")
    if key.shape[0] != B:
        raise ValueError(f"query and key must have the same batch size, got {B} and {key.shape[0]}")
    dev = query.device
    q_pos = torch.arange(L - n, L, device=dev).expand(B, n)
    k_pos = torch.arange(L, device=dev).expand(B, key.shape[2], L)
    kc, vc = key.transpose(1, 2), value.transpose(1, 2)
    scale = _check_args(query, q_pos, kc, vc, k_pos, pattern, scale, None, None)
    if backend == "auto" and isinstance(pattern, Full):
        from torch.nn.attention.bias import causal_lower_right

        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), kc.to(query.dtype), vc.to(query.dtype), attn_mask=causal_lower_right(n, L),
            scale=scale, enable_gqa=kc.shape[1] != query.shape[2],
        )  # fmt: skip
        return out.transpose(1, 2)
    layout = isinstance(pattern, BlockLayout)
    if backend == "triton" and layout:
        raise ValueError("suffix_attention has no Triton path for BlockLayout patterns; use backend='reference'")
    if backend == "reference" or (backend == "auto" and (layout or not triton_suits(query))):
        return cache_attention_reference(query, q_pos, kc, vc, k_pos, pattern, scale=scale)
    from longgen.kernels.inputs import AttentionShape
    from longgen.kernels.triton_attention import triton_suffix_attention

    hkv = key.shape[2]
    resolved = pattern.resolve(hkv)
    resolved._check_seq_len(L)
    shape = AttentionShape(
        pattern=resolved,
        num_heads=query.shape[2],
        num_kv_heads=hkv,
        head_dim=query.shape[3],
        scale=scale,
        varlen=False,
        padded=False,
        seq_lens=(L,) * B,
    )
    return triton_suffix_attention(query, key, value, shape)


def cache_attention_reference(
    query: torch.Tensor,
    q_pos: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    k_pos: torch.Tensor,
    pattern: Pattern,
    *,
    scale: float | None = None,
    kv_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """`cache_attention` in plain PyTorch: a boolean mask from `Pattern.allowed` over the slots, then SDPA.

    Slots with ``k_pos < 0`` or at or past ``kv_len`` are ignored; queries with no allowed slot give exact
    zeros.
    """
    H = query.shape[2]
    hkv, S = key_cache.shape[1], key_cache.shape[2]
    valid = k_pos >= 0
    if kv_len is not None:
        valid = valid & (torch.arange(S, device=k_pos.device) < kv_len[:, None, None])
    g = torch.arange(hkv, device=query.device)
    allowed = pattern.allowed(q_pos[:, None, :, None], k_pos[:, :, None, :].clamp(min=0), g[None, :, None, None], hkv)
    allowed = allowed & valid[:, :, None, :]  # (B, Hkv, Q, S)
    seen = allowed.any(-1, keepdim=True)
    allowed = allowed | ~seen  # a query that sees nothing: any row (zeroed below), never NaN
    G = H // hkv
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2),
        key_cache,
        value_cache,
        attn_mask=allowed.repeat_interleave(G, dim=1),
        scale=scale,
        enable_gqa=G > 1,
    )
    out = out * seen.repeat_interleave(G, dim=1)
    return out.transpose(1, 2)


def cache_attention_blocked(
    query: torch.Tensor,
    q_pos: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    k_pos: torch.Tensor,
    pattern: Pattern,
    *,
    scale: float | None = None,
    kv_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """`cache_attention_reference`'s result with less work (the path off CUDA): only the slots before the longest
    `kv_len` are read, and when the pattern is Full and every slot read holds a key at or before every query (a
    Full layer's cache while decoding), PyTorch SDPA runs without a mask."""
    if kv_len is not None:
        n = int(kv_len.max())
        key_cache, value_cache, k_pos = key_cache[:, :, :n], value_cache[:, :, :n], k_pos[:, :, :n]
        kv_len = None if bool((kv_len == n).all()) else kv_len
    if (
        kv_len is None
        and isinstance(pattern, Full)
        and k_pos.numel() > 0
        and bool((k_pos >= 0).all())
        and bool(k_pos.max() <= q_pos.min())
    ):
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key_cache, value_cache, scale=scale, enable_gqa=key_cache.shape[1] != query.shape[2]
        )
        return out.transpose(1, 2)
    return cache_attention_reference(query, q_pos, key_cache, value_cache, k_pos, pattern, scale=scale, kv_len=kv_len)


def _check_args(query, q_pos, key_cache, value_cache, k_pos, pattern, scale, kv_len, num_splits) -> float:
    """Validate a call (shared by both backends); returns the scale."""
    if not isinstance(pattern, Pattern):
        raise TypeError(
            f"pattern must be a longgen pattern (Full, SinkWindow, BlockSparse, BlockLayout), got {pattern!r}"
        )
    for name, x in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 4:
            raise ValueError(
                "query must be (batch, queries, heads, head_dim) and key_cache, value_cache "
                f"(batch, kv_heads, slots, head_dim); got {name} with shape {tuple(x.shape)}"
            )
    if not (query.dtype == key_cache.dtype == value_cache.dtype):
        raise TypeError(
            f"query, key_cache, value_cache must share one dtype, got {query.dtype}, {key_cache.dtype}, "
            f"{value_cache.dtype}"
        )
    B, Q, H, d = query.shape
    if key_cache.shape != value_cache.shape:
        raise ValueError(
            f"key_cache and value_cache must have the same shape, got {tuple(key_cache.shape)} and "
            f"{tuple(value_cache.shape)}"
        )
    hkv, S = key_cache.shape[1], key_cache.shape[2]
    if key_cache.shape[0] != B or key_cache.shape[3] != d:
        raise ValueError(
            f"key_cache (batch, kv_heads, slots, head_dim) = {tuple(key_cache.shape)} must match query's batch {B} "
            f"and head_dim {d} (query {tuple(query.shape)})"
        )
    if hkv < 1 or H % hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of the cache's kv_heads ({hkv})")
    _check_index(q_pos, "q_pos", (B, Q), "(batch, queries)")
    _check_index(k_pos, "k_pos", (B, hkv, S), "(batch, kv_heads, slots)")
    if kv_len is not None:
        _check_index(kv_len, "kv_len", (B,), "(batch,)")
    others = {"key_cache": key_cache, "value_cache": value_cache, "q_pos": q_pos, "k_pos": k_pos, "kv_len": kv_len}
    for name, x in others.items():
        if x is not None and x.device != query.device:
            raise ValueError(f"{name} is on {x.device} but query is on {query.device}; put all inputs on one device")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None (automatic), got {num_splits!r}")
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float or None (1/sqrt(head_dim)), got {scale!r}")
    return float(scale)


def _check_index(x, name: str, shape: tuple[int, ...], meaning: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got dtype {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {meaning} = {shape}, got {tuple(x.shape)}")
