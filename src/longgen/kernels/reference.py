"""Attention under a pattern in plain PyTorch: slow, memory-safe, and certainly right.

Every fast path is tested against this. It evaluates the pattern's exact semantics (`Pattern.allowed`) on
query chunks, so no ``seq x seq`` tensor is ever built; under autograd each chunk is recomputed in the
backward pass (activation checkpointing), so memory stays bounded there too.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from longgen.kernels.inputs import AttentionShape, check_attention_args
from longgen.patterns import Pattern

# per-chunk score elements (query rows x keys x heads); ~256 MB of float32 scores at most
_CHUNK_ELEMENTS = 1 << 26


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    *,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    seqlens: torch.Tensor | None = None,
    kv_head_offset: int = 0,
    num_kv_heads_total: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention restricted to `pattern`, computed in plain PyTorch.

    Args:
        q: ``(batch, seq, heads, head_dim)``, or ``(total_tokens, heads, head_dim)`` with `cu_seqlens`.
        k, v: ``(batch, seq, kv_heads, head_dim)`` or ``(total_tokens, kv_heads, head_dim)``; `heads` must be
            a multiple of `kv_heads` (GQA: query head ``h`` uses KV head ``h // (heads // kv_heads)``).
        pattern: what each KV head may see; positions restart at 0 in every sequence.
        cu_seqlens: int32 ``[n_seqs + 1]`` offsets of packed sequences; attention never crosses them.
        seqlens: int32 ``[batch]``: valid (leading) tokens of each row of a right-padded batch. Padded
            positions attend nothing: their output is 0, their lse -inf, and they receive no gradient.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        return_lse: also return the log-sum-exp of the scaled scores, float32 (float64 for float64 inputs),
            ``(batch, heads, seq)`` or ``(heads, total_tokens)``.
        kv_head_offset, num_kv_heads_total: `k`, `v` hold KV heads ``kv_head_offset .. kv_head_offset +
            kv_heads - 1`` of ``num_kv_heads_total`` (default: all heads); per-head patterns (BlockSparse,
            per-head BlockLayout) are resolved for the total and evaluated at the global head index, so a slice
            of the heads gives exactly the matching slice of the all-heads result (context parallelism).

    Returns:
        The output, same shape and dtype as `q` (accumulated in float32 or wider); with `return_lse`,
        ``(out, lse)``.
    """
    shape = check_attention_args(q, k, v, pattern, cu_seqlens, scale, seqlens, kv_head_offset, num_kv_heads_total)
    out, lse = attend_each_sequence(q, k, v, shape, cu_seqlens, _attend_sequence, True)
    return (out, lse) if return_lse else out


# attend(q (T, H, d), k, v (T, Hkv, d), shape, need_lse) -> (out (T, H, d), lse (H, T), or None without need_lse)
SequenceAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, AttentionShape, bool], tuple[torch.Tensor, torch.Tensor | None]
]


def attend_each_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shape: AttentionShape,
    cu_seqlens: torch.Tensor | None,
    attend: SequenceAttention,
    need_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run `attend` on every sequence of a batch (its valid tokens, padding gets zeros) or of a packed input,
    and put the results back together: out like `q`, lse ``(batch, heads, seq)`` / ``(heads, total)`` or None."""
    if cu_seqlens is None:
        results = [_attend_padded(q[b], k[b], v[b], n, shape, attend, need_lse) for b, n in enumerate(shape.seq_lens)]
        out = torch.stack([o for o, _ in results]) if results else torch.empty_like(q)
        if not need_lse:
            return out, None
        lse = torch.stack([lse for _, lse in results]) if results else empty_lse(q, (0, shape.num_heads, 0))
    else:
        offsets = cu_seqlens.tolist()
        results = [attend(q[a:b], k[a:b], v[a:b], shape, need_lse) for a, b in itertools.pairwise(offsets)]
        out = torch.cat([o for o, _ in results])
        if not need_lse:
            return out, None
        lse = torch.cat([lse for _, lse in results], dim=-1)
    return out, lse


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def empty_lse(q: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """An empty lse tensor of `size` with the accumulation dtype of `q`."""
    return torch.empty(size, dtype=_acc_dtype(q.dtype), device=q.device)


def _attend_padded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n: int,
    shape: AttentionShape,
    attend: SequenceAttention,
    need_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch row whose first `n` tokens are valid."""
    T = q.shape[0]
    if n == T:
        return attend(q, k, v, shape, need_lse)
    out, lse = attend(q[:n], k[:n], v[:n], shape, need_lse)
    out = torch.cat([out, out.new_zeros(T - n, *out.shape[1:])])
    if lse is not None:
        lse = torch.cat([lse, lse.new_full((lse.shape[0], T - n), float("-inf"))], dim=-1)
    return out, lse


def _attend_sequence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape, need_lse: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: q ``(T, H, d)``, k/v ``(T, Hkv, d)`` -> out ``(T, H, d)``, lse ``(H, T)`` (always)."""
    T = q.shape[0]
    if T == 0:
        return torch.empty_like(q), empty_lse(q, (shape.num_heads, 0))
    rows = max(1, min(T, _CHUNK_ELEMENTS // (T * shape.num_heads)))
    if shape.pattern._query_chunk() is not None:  # chunks the pattern can prune keys for (SinkWindow)
        rows = min(rows, shape.pattern._query_chunk())
    # recompute chunks in the backward only when there are several: one chunk is already within the budget
    needs_grad = rows < T and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    outs, lses = [], []
    for t0 in range(0, T, rows):
        t1 = min(T, t0 + rows)
        keys = shape.pattern._key_candidates(t0, t1)
        if keys is None:
            args = (q[t0:t1], k[:t1], v[:t1], t0, shape, None)
        else:
            keys = keys.to(q.device)
            args = (q[t0:t1], k.index_select(0, keys), v.index_select(0, keys), t0, shape, keys)
        if needs_grad:
            o, lse = checkpoint(_attend_chunk, *args, use_reentrant=False)
        else:
            o, lse = _attend_chunk(*args)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=-1)


def _attend_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t0: int, shape: AttentionShape, key_pos: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries at positions ``t0 .. t0 + len(q) - 1`` against keys at `key_pos` (default ``0 .. len(k) - 1``)."""
    c, S = q.shape[0], k.shape[0]
    hkv, grp, d = shape.num_kv_heads, shape.group, shape.head_dim
    acc = _acc_dtype(q.dtype)
    qf = q.to(acc).view(c, hkv, grp, d).permute(1, 2, 0, 3)  # (Hkv, G, c, d)
    kf = k.to(acc).permute(1, 0, 2)  # (Hkv, S, d)
    vf = v.to(acc).permute(1, 0, 2)
    scores = torch.matmul(qf, kf.unsqueeze(1).transpose(-1, -2)) * shape.scale  # (Hkv, G, c, S)
    t = torch.arange(t0, t0 + c, device=q.device)
    s = torch.arange(S, device=q.device) if key_pos is None else key_pos
    g = torch.arange(hkv, device=q.device) + shape.kv_head_offset
    allowed = shape.pattern._allowed(t[None, :, None], s[None, None, :], g[:, None, None], shape.global_kv_heads)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # every row sees at least its own position
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.matmul(probs, vf.unsqueeze(1))  # (Hkv, G, c, d)
    out = out.permute(2, 0, 1, 3).reshape(c, hkv * grp, d).to(q.dtype)
    return out, lse.reshape(hkv * grp, c)
