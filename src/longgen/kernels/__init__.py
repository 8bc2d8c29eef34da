"""Attention kernels: the PyTorch reference, the block-sparse PyTorch path and the Triton kernels, behind one op."""

from __future__ import annotations

import torch

from longgen.kernels.blocked import blocked_attention
from longgen.kernels.cache_attention import cache_attention, suffix_attention
from longgen.kernels.dispatch import BACKENDS, choose_backend
from longgen.kernels.inputs import check_attention_args
from longgen.kernels.reference import reference_attention
from longgen.patterns import Pattern

__all__ = [
    "BACKENDS",
    "blocked_attention",
    "cache_attention",
    "choose_backend",
    "reference_attention",
    "sparse_attention",
    "suffix_attention",
]


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    *,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    kv_head_offset: int = 0,
    num_kv_heads_total: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention restricted to `pattern`; the op every longgen model calls.

    Same arguments and result as `reference_attention`, plus `backend`: ``"reference"`` (plain PyTorch, simple
    and slow: whole query chunks against all their keys), ``"blocked"`` (plain PyTorch that visits only the key
    tiles the pattern keeps, `blocked_attention`; any device), ``"triton"`` (the Triton kernels: CUDA
    float16/bfloat16, or any float32 CPU tensor under ``TRITON_INTERPRET=1``; head_dim 16, 32, 64, 96 or 128) or
    ``"auto"`` (`choose_backend`). `kv_head_offset` and `num_kv_heads_total` run a slice of the KV heads (and
    their query heads) with the global head indices.
    """
    args = dict(cu_seqlens=cu_seqlens, scale=scale, return_lse=return_lse, seqlens=seqlens)
    heads = dict(kv_head_offset=kv_head_offset, num_kv_heads_total=num_kv_heads_total)
    backend = choose_backend(q, backend)
    if backend == "reference":
        return reference_attention(q, k, v, pattern, **args, **heads)
    if backend == "blocked":
        return blocked_attention(q, k, v, pattern, **args, **heads)
    from longgen.kernels.triton_attention import triton_attention

    shape = check_attention_args(q, k, v, pattern, cu_seqlens, scale, seqlens, kv_head_offset, num_kv_heads_total)
    return triton_attention(q, k, v, shape, cu_seqlens, return_lse)
