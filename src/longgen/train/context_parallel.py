"""Context parallelism: train sequences too long for one GPU by sharding each one across ranks (Ulysses).

Everything outside attention (embeddings, norms, MLPs, the loss) runs on this rank's contiguous shard of the
sequence, ``T / cp`` tokens. Around attention one all-to-all trades the sequence shards of q, k, v for head
shards, so each rank runs the sparse kernels over *whole* sequences for ``H / cp`` of the heads, and a second
all-to-all trades the output back. The kernels see the global KV-head index (``kv_head_offset``), so per-head
patterns (BlockSparse's strided residues and dense heads, per-head BlockLayouts) stay exact, and packed
documents keep their ``cu_seqlens`` over the whole sequence. docs/context_parallel.md explains the choices.

Ranks form a 2-D grid (data x context): rank = dp_rank * cp + cp_rank. The loader shards batches over the
data dimension; the cp ranks of one data index share a batch and take its sequence shards in order. FSDP2
shards parameters over all ranks (data x context flattened, as torchtitan does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from longgen.model import attention
from longgen.model.attention import _attend_prefill
from longgen.patterns import Pattern
from longgen.train.loss import shift_labels

__all__ = [
    "ContextParallel",
    "all_to_all",
    "check_context_parallel",
    "context_parallel_attention",
    "kv_head_split",
    "setup_context_parallel",
    "shard_batch",
    "ulysses_attention",
]


@dataclass(frozen=True)
class ContextParallel:
    """This rank's place in the (data, context) grid of ranks."""

    group: Any  # process group of the ranks that share this rank's sequences; None without context parallelism
    rank: int  # this rank holds tokens [rank * T / size, (rank + 1) * T / size) of every sequence
    size: int
    dp_rank: int  # which batches this rank's loader yields
    dp_size: int
    mesh: Any = None  # the 2-D DeviceMesh ("dp", "cp") when size > 1


def setup_context_parallel(size: int, device_type: str = "cpu") -> ContextParallel:
    """Build the (dp, cp) device mesh over all ranks (after ``init_process_group``) and return this rank's place.

    With ``size == 1`` there is no mesh: every rank is its own data-parallel rank.
    """
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else 1
    check_context_parallel(size, world_size=world)
    if size == 1:
        return ContextParallel(None, 0, 1, dist.get_rank() if initialized else 0, world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (world // size, size), mesh_dim_names=("dp", "cp"))
    return ContextParallel(
        group=mesh["cp"].get_group(),
        rank=mesh["cp"].get_local_rank(),
        size=size,
        dp_rank=mesh["dp"].get_local_rank(),
        dp_size=world // size,
        mesh=mesh,
    )


def kv_head_split(num_heads: int, num_kv_heads: int, size: int) -> tuple[int, int]:
    """How `size` context ranks share the heads: ``(replicas, local_kv_heads)``.

    Each rank takes ``num_heads / size`` query heads (``size`` must divide ``num_heads``) and the KV heads they
    read. With ``size`` dividing ``num_kv_heads`` a rank takes ``num_kv_heads / size`` KV heads (replicas 1);
    with fewer KV heads than ranks (``size`` a multiple of ``num_kv_heads``), each KV head is replicated to the
    ``size / num_kv_heads`` ranks whose query heads use it, and a rank takes one. Rank r's first local KV head
    is global head ``r * local_kv_heads // replicas``.
    """
    if num_heads % size:
        raise ValueError(
            f"context_parallel_size={size} must divide the number of attention heads ({num_heads}): "
            "each rank attends for an equal share of the heads"
        )
    if num_kv_heads % size == 0:
        return 1, num_kv_heads // size
    if size % num_kv_heads == 0:
        return size // num_kv_heads, 1
    raise ValueError(
        f"context_parallel_size={size} must divide the number of KV heads ({num_kv_heads}) or be a multiple of it, "
        "so that every rank's query heads read whole KV heads"
    )


def check_context_parallel(
    size: int,
    *,
    world_size: int,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    seq_len: int | None = None,
) -> None:
    """Raise ValueError unless `size` context ranks fit the world size, the heads and the sequence length."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"context_parallel_size must be an int >= 1, got {size!r}")
    if world_size % size:
        raise ValueError(
            f"context_parallel_size={size} must divide the number of processes ({world_size}); launch with "
            f"torchrun --nproc-per-node N where N is a multiple of {size}"
        )
    if num_heads is not None:
        kv_head_split(num_heads, num_kv_heads or num_heads, size)
    if seq_len is not None and seq_len % size:
        raise ValueError(f"context_parallel_size={size} must divide the sequence length (data.seq_len={seq_len})")


def shard_batch(batch: dict[str, torch.Tensor], rank: int = 0, size: int = 1) -> dict[str, torch.Tensor]:
    """This rank's shard of a batch of ``(batch, seq)`` tensors: tokens ``[rank * seq / size, (rank + 1) * ...)``.

    Returns ``input_ids`` and ``position_ids`` (the absolute positions, for RoPE) of the shard, ``targets``
    (next-token labels, shifted before cutting so the shard's last token keeps its target; -100: no loss) and
    ``full_position_ids`` (the whole sequence's, from which the attention finds packed documents).
    """
    T = batch["input_ids"].shape[1]
    if T % size:
        raise ValueError(f"the sequence length {T} is not divisible by the context-parallel size {size}")
    n = T // size
    part = slice(rank * n, (rank + 1) * n)
    return {
        "input_ids": batch["input_ids"][:, part],
        "position_ids": batch["position_ids"][:, part],
        "targets": shift_labels(batch["labels"])[:, part],
        "full_position_ids": batch["position_ids"],
    }


class _AllToAll(torch.autograd.Function):
    """`all_to_all` with its inverse (the same exchange, dimensions swapped) as the backward."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _exchange(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def _exchange(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    size = dist.get_world_size(group)
    if x.shape[scatter_dim] % size:
        raise ValueError(f"all_to_all: dimension {scatter_dim} of {tuple(x.shape)} is not divisible by {size} ranks")
    send = torch.stack(x.chunk(size, dim=scatter_dim))  # (size, ...): chunk j goes to rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)  # chunk i came from rank i


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Differentiable all-to-all: split `x` into ``size`` chunks along `scatter_dim`, send chunk j to rank j
    of `group`, and concatenate the chunks received along `gather_dim` in rank order."""
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    group,
    *,
    position_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of this rank's sequence shard under `pattern`, computed over whole sequences across `group`.

    Args:
        q: ``(batch, seq / size, heads, head_dim)``, this rank's contiguous shard (rank r of `group` holds
            tokens ``[r * seq / size, (r + 1) * seq / size)``); k, v: ``(batch, seq / size, kv_heads, head_dim)``.
        pattern: the layer's pattern, for the global heads.
        position_ids: ``(batch, seq)`` of the *whole* sequence (restarting at 0 in every packed document), or
            None for one sequence per row.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.

    Returns:
        ``(batch, seq / size, heads, head_dim)``: this shard's rows of the single-process result.
    """
    B, n, H, d = q.shape
    if k.shape[1] != n:
        raise ValueError(f"context-parallel attention needs as many keys as queries, got {k.shape[1]} and {n}")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    hkv = k.shape[2]
    replicas, local_kv = kv_head_split(H, hkv, size)
    if replicas > 1:  # fewer KV heads than ranks: each rank receives the KV head its query heads read
        k, v = k.repeat_interleave(replicas, dim=2), v.repeat_interleave(replicas, dim=2)
    # one exchange for q, k, v: the j-th chunk of each one's heads goes to rank j
    qkv = torch.cat([x.reshape(B, n, size, -1, d) for x in (q, k, v)], dim=3).flatten(2, 3)
    qkv = all_to_all(qkv, group, scatter_dim=2, gather_dim=1)  # (B, seq, (H + 2 * kv) / size, d)
    q, k, v = qkv.split([H // size, local_kv, local_kv], dim=2)
    offset = rank * local_kv // replicas
    out = _attend_prefill(q, k, v, pattern, None, position_ids, scale, kv_head_offset=offset, num_kv_heads_total=hkv)
    return all_to_all(out, group, scatter_dim=1, gather_dim=2)


@contextlib.contextmanager
def context_parallel_attention(group, position_ids: torch.Tensor | None = None) -> Iterator[None]:
    """Within the block (forward *and* backward: activation checkpointing recomputes attention there), every
    ``"longgen"`` attention layer runs `ulysses_attention` over `group` with the whole sequence's
    `position_ids` ``(batch, seq)``. With ``group=None`` the block runs unchanged (no context parallelism)."""
    if group is None:
        yield
        return

    def attend(q, k, v, pattern, mask, scale):
        if mask is not None and not bool(mask.all()):
            raise ValueError(
                "context-parallel attention takes packed sequences (position_ids restarting at 0), not padding masks"
            )
        return ulysses_attention(q, k, v, pattern, group, position_ids=position_ids, scale=scale)

    previous = attention.CONTEXT_PARALLEL
    attention.CONTEXT_PARALLEL = attend
    try:
        yield
    finally:
        attention.CONTEXT_PARALLEL = previous
