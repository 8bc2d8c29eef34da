"""Attention kernels: the PyTorch reference and the Triton kernels, behind one public op."""

from __future__ import annotations

import torch

from longgen.kernels.reference import reference_attention
from longgen.patterns import Pattern

__all__ = ["BACKENDS", "reference_attention", "sparse_attention"]

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
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention restricted to `pattern`; the op every longgen model calls.

    Same arguments and result as `reference_attention`, plus `backend`: ``"reference"`` (plain PyTorch),
    ``"triton"`` (the Triton kernels) or ``"auto"`` (Triton for CUDA tensors when it is available, the
    reference elsewhere).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        raise NotImplementedError(
            "backend='triton' is not available yet in this version of longgen; use backend='reference' or 'auto'"
        )
    return reference_attention(q, k, v, pattern, cu_seqlens=cu_seqlens, scale=scale, return_lse=return_lse)
