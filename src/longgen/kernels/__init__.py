"""Attention kernels: the PyTorch reference, the block-sparse PyTorch path and the Triton kernels, behind one op."""

from __future__ import annotations

import torch

from longgen.kernels.blocked import blocked_attention
from longgen.kernels.cache_attention import cache_attention, suffix_attention
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

BACKENDS = ("auto", "blocked", "reference", "triton")


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


def choose_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """The backend `sparse_attention` runs for queries `q`: `backend` itself, or for ``"auto"``: ``"triton"`` for
    CUDA float16/bfloat16 tensors with a supported head_dim, ``"reference"`` for other CUDA tensors, and
    ``"blocked"`` off CUDA (CPU, MPS, ...), where the Triton kernels cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if _triton_suits(q):
        return "triton"
    return "reference" if isinstance(q, torch.Tensor) and q.device.type == "cuda" else "blocked"


def _triton_suits(q: torch.Tensor) -> bool:
    """`backend="auto"` runs Triton on CUDA half-precision tensors with a supported head_dim."""
    from longgen.kernels.inputs import TRITON_HEAD_DIMS

    if not isinstance(q, torch.Tensor) or q.device.type != "cuda":
        return False
    return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in TRITON_HEAD_DIMS
