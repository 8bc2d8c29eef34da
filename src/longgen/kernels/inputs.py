"""Argument checking shared by every attention backend, so they all accept and refuse the same inputs."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from longgen.patterns import Pattern

TRITON_HEAD_DIMS = (16, 32, 64, 96, 128)  # head dims the Triton kernels are built for


@dataclass(frozen=True)
class AttentionShape:
    """What the backends need to know about a validated call."""

    pattern: Pattern  # resolved for num_kv_heads
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    varlen: bool
    padded: bool  # a batch row holds padding after its valid tokens
    seq_lens: tuple[int, ...]  # length of every sequence (batch rows, or packed sequences)
    kv_head_offset: int = 0  # global index of local KV head 0 (a rank holding a slice of the heads)
    num_kv_heads_total: int | None = None  # KV heads the pattern is resolved for (None: num_kv_heads)

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def global_kv_heads(self) -> int:
        """The number of KV heads the pattern's per-head rules see (all heads, not only the local slice)."""
        return self.num_kv_heads if self.num_kv_heads_total is None else self.num_kv_heads_total


def check_attention_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    cu_seqlens: torch.Tensor | None,
    scale: float | None,
    seqlens: torch.Tensor | None = None,
    kv_head_offset: int = 0,
    num_kv_heads_total: int | None = None,
) -> AttentionShape:
    """Validate an attention call and return its shape; raises `TypeError`/`ValueError` on bad input.

    Layouts: ``q (batch, seq, heads, head_dim)``, ``k, v (batch, seq, kv_heads, head_dim)``, optionally
    right-padded with ``seqlens`` (int32 ``[batch]``, valid tokens per row); or packed
    ``(total_tokens, heads, head_dim)`` with ``cu_seqlens`` (int32, ``[n_seqs + 1]``, from 0 to total_tokens).
    ``kv_head_offset`` / ``num_kv_heads_total``: the KV heads given are heads ``kv_head_offset ..
    kv_head_offset + kv_heads - 1`` of ``num_kv_heads_total`` (default: all of them), e.g. one rank's heads
    under context parallelism; per-head patterns are resolved and evaluated with these global head indices.
    """
    if not isinstance(pattern, Pattern):
        raise TypeError(
            f"pattern must be a longgen pattern (Full, SinkWindow, BlockSparse, BlockLayout), got {pattern!r}"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")

    if cu_seqlens is None:
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(
                "without cu_seqlens, q must be (batch, seq, heads, head_dim) and k, v "
                f"(batch, seq, kv_heads, head_dim); got q {tuple(q.shape)}, k {tuple(k.shape)} "
                "(pass cu_seqlens for packed (total_tokens, heads, head_dim) inputs)"
            )
        if q.shape[:2] != k.shape[:2]:
            raise ValueError(
                f"q and k must have the same batch and sequence length, got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        seq_lens = (q.shape[1],) * q.shape[0]
        if seqlens is not None:
            seq_lens = _check_seqlens(seqlens, q.shape[0], q.shape[1], q.device)
    else:
        if q.dim() != 3 or k.dim() != 3:
            raise ValueError(
                "with cu_seqlens, q must be (total_tokens, heads, head_dim) and k, v "
                f"(total_tokens, kv_heads, head_dim); got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"q and k must have the same number of tokens, got {q.shape[0]} and {k.shape[0]}")
        if seqlens is not None:
            raise ValueError("pass either cu_seqlens (packed sequences) or seqlens (padded batch), not both")
        seq_lens = _check_cu_seqlens(cu_seqlens, q.shape[0], q.device)

    num_heads, head_dim = q.shape[-2], q.shape[-1]
    num_kv_heads = k.shape[-2]
    if k.shape[-1] != head_dim:
        raise ValueError(f"q and k must have the same head_dim, got {head_dim} and {k.shape[-1]}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"the number of query heads ({num_heads}) must be a positive multiple of the number of KV heads "
            f"({num_kv_heads})"
        )
    if scale is None:
        scale = head_dim**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number or None (1/sqrt(head_dim)), got {scale!r}")
    total = _check_head_slice(kv_head_offset, num_kv_heads_total, num_kv_heads)
    resolved = pattern.resolve(total)
    longest = max(seq_lens, default=0)
    if longest:
        resolved._check_seq_len(longest)
    return AttentionShape(
        pattern=resolved,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        scale=float(scale),
        varlen=cu_seqlens is not None,
        padded=seqlens is not None and any(n != q.shape[1] for n in seq_lens),
        seq_lens=tuple(seq_lens),
        kv_head_offset=kv_head_offset,
        num_kv_heads_total=None if num_kv_heads_total is None else total,
    )


def _check_head_slice(offset: int, total: int | None, local: int) -> int:
    """Check that KV heads ``offset .. offset + local - 1`` exist among `total`; returns `total` (default local)."""
    total = local if total is None else total
    for name, value in (("kv_head_offset", offset), ("num_kv_heads_total", total)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if offset < 0 or offset + local > total:
        raise ValueError(
            f"kv_head_offset={offset} with {local} local KV heads needs heads {offset} .. {offset + local - 1}, "
            f"but num_kv_heads_total={total}; the offset must lie in [0, {total - local}]"
        )
    return total


def _check_seqlens(seqlens: torch.Tensor, batch: int, T: int, device: torch.device) -> tuple[int, ...]:
    if not isinstance(seqlens, torch.Tensor) or seqlens.dtype != torch.int32 or seqlens.shape != (batch,):
        got = f"{seqlens.dtype} {tuple(seqlens.shape)}" if isinstance(seqlens, torch.Tensor) else seqlens
        raise TypeError(f"seqlens must be an int32 tensor [batch={batch}] of valid lengths, got {got}")
    if seqlens.device != device:
        raise ValueError(f"seqlens must be on the same device as q ({device}), got {seqlens.device}")
    lens = tuple(seqlens.tolist())
    if lens and (min(lens) < 0 or max(lens) > T):
        raise ValueError(f"seqlens must lie in [0, seq_len={T}], got values in [{min(lens)}, {max(lens)}]")
    return lens


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> tuple[int, ...]:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        got = f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens
        raise TypeError(f"cu_seqlens must be a 1-D int32 tensor [n_seqs + 1], got {got}")
    if cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must hold at least two offsets ([0, total_tokens] for one sequence)")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on the same device as q ({device}), got {cu_seqlens.device}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != total:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at total_tokens={total}, got {offsets[0]} ... {offsets[-1]}"
        )
    lens = tuple(b - a for a, b in itertools.pairwise(offsets))
    if min(lens) < 0:
        raise ValueError("cu_seqlens must be non-decreasing")
    return lens
