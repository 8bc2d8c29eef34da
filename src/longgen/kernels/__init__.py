"""Attention kernels: the PyTorch reference and the Triton kernels, behind one public op."""

from __future__ import annotations

import torch

from longgen.kernels.cache_attention import cache_attention, suffix_attention
from longgen.kernels.inputs import check_attention_args
from longgen.kernels.reference import reference_attention
from longgen.patterns import Pattern

__all__ = ["BACKENDS", "cache_attention", "reference_attention", "sparse_attention", "suffix_attention"]

BACKENDS = ("auto", "reference", "triton")


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

    Same arguments and result as `reference_attention`, plus `backend`: ``"reference"`` (plain PyTorch),
    ``"triton"`` (the Triton kernels: CUDA float16/bfloat16, or any float32 CPU tensor under
    ``TRITON_INTERPRET=1``; head_dim 16, 32, 64, 96 or 128) or ``"auto"`` (Triton for CUDA float16/bfloat16
    tensors with a supported head_dim, the reference for everything else). `kv_head_offset` and
    `num_kv_heads_total` run a slice of the KV heads (and their query heads) with the global head indices.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference" or (backend == "auto" and not _triton_suits(q)):
        return reference_attention(
            q,
            k,
            v,
            pattern,
            cu_seqlens=cu_seqlens,
            scale=scale,
            return_lse=return_lse,
            seqlens=seqlens,
            kv_head_offset=kv_head_offset,
            num_kv_heads_total=num_kv_heads_total,
        )
    from longgen.kernels.triton_attention import triton_attention

    shape = check_attention_args(q, k, v, pattern, cu_seqlens, scale, seqlens, kv_head_offset, num_kv_heads_total)
    return triton_attention(q, k, v, shape, cu_seqlens, return_lse)


def _triton_suits(q: torch.Tensor) -> bool:
    """`backend="auto"` runs Triton on CUDA half-precision tensors with a supported head_dim."""
    from longgen.kernels.inputs import TRITON_HEAD_DIMS

    if not isinstance(q, torch.Tensor) or q.device.type != "cuda":
        return False
    return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in TRITON_HEAD_DIMS
