"""Block-sparse attention in plain PyTorch: the fast exact path wherever the Triton kernels cannot run.

Queries go in chunks of a few tiles; each chunk attends only the key tiles its pattern keeps
(`Pattern.block_mask`), gathered per KV head, and the pattern's own rule masks the pairs inside them, so the
result is the reference's. KV heads that see every earlier key (Full, `dense_kv_heads`) run PyTorch SDPA
causal attention. Differentiable through autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longgen.kernels.inputs import AttentionShape, check_attention_args
from longgen.kernels.reference import attend_each_sequence, empty_lse
from longgen.patterns import Pattern, SinkWindow

QUERY_CHUNK = 256  # query tokens per chunk: larger chunks mean fewer, bigger matmuls but more masked keys


def blocked_attention(
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
    """Softmax attention restricted to `pattern`, visiting only the key tiles the pattern keeps.

    Same contract as `reference_attention`:

    Args:
        q: ``(batch, seq, heads, head_dim)``, or ``(total_tokens, heads, head_dim)`` with `cu_seqlens`.
        k, v: ``(batch, seq, kv_heads, head_dim)`` or ``(total_tokens, kv_heads, head_dim)``; GQA without
            repeating K/V (query head ``h`` uses KV head ``h // (heads // kv_heads)``).
        pattern: what each KV head may see; positions restart at 0 in every sequence.
        cu_seqlens: int32 ``[n_seqs + 1]`` offsets of packed sequences; attention never crosses them.
        seqlens: int32 ``[batch]`` valid (leading) tokens of each row of a right-padded batch; padded
            positions get output 0, lse -inf and no gradient.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        return_lse: also return the log-sum-exp of the scaled scores (float32, float64 for float64 inputs),
            ``(batch, heads, seq)`` or ``(heads, total_tokens)``; differentiable.
        kv_head_offset, num_kv_heads_total: `k`, `v` hold KV heads ``kv_head_offset ..`` of
            ``num_kv_heads_total``; per-head patterns are evaluated at the global head index.

    Returns:
        The output, same shape and dtype as `q` (scores accumulated in float32 or wider); with `return_lse`,
        ``(out, lse)``.
    """
    shape = check_attention_args(q, k, v, pattern, cu_seqlens, scale, seqlens, kv_head_offset, num_kv_heads_total)
    if cu_seqlens is None:
        out, lse = attend_each_sequence(q, k, v, shape, cu_seqlens, _attend_sequence, return_lse)
    else:
        out, lse = _attend_packed(q, k, v, shape, cu_seqlens, return_lse)
    return (out, lse) if return_lse else out


def _attend_packed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape, cu_seqlens: torch.Tensor, need_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Packed sequences, each attended on its own. They are cut with one `torch.split`, whose backward
    concatenates the gradients once (a slice per sequence would add a zero-filled gradient of the whole input per
    sequence: quadratic in the number of sequences, most of a training step on a CPU)."""
    sizes = torch.diff(cu_seqlens).tolist()
    pieces = zip(q.split(sizes), k.split(sizes), v.split(sizes), strict=True)
    results = [_attend_sequence(*qkv, shape, need_lse) for qkv in pieces]
    out = torch.cat([o for o, _ in results]) if results else torch.empty_like(q)
    if not need_lse:
        return out, None
    return out, torch.cat([lse for _, lse in results], dim=-1) if results else empty_lse(q, (shape.num_heads, 0))


def tile_size(pattern: Pattern) -> int:
    """Key tile the blocked path gathers: the pattern's own block, smaller for short windows (less waste)."""
    if not isinstance(pattern, SinkWindow):
        return pattern.natural_block_size
    return max(16, min(pattern.natural_block_size, 1 << max(0, (pattern.window // 8).bit_length() - 1)))


def _attend_sequence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape, need_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One sequence: q ``(T, H, d)``, k/v ``(T, Hkv, d)`` -> out ``(T, H, d)``, lse ``(H, T)`` or None."""
    T, hkv = q.shape[0], shape.num_kv_heads
    if T == 0:
        return torch.empty_like(q), empty_lse(q, (shape.num_heads, 0))
    heads = slice(shape.kv_head_offset, shape.kv_head_offset + hkv)
    dense = shape.pattern.dense_heads(T, shape.global_kv_heads)[heads]  # (Hkv,)
    if bool(dense.all()) and not need_lse:
        return _causal(q, k, v, shape), None
    tile = tile_size(shape.pattern)
    visited = shape.pattern.block_mask(T, shape.global_kv_heads, tile)[heads]  # (Hkv, n, n)
    full = shape.pattern.full_block_mask(T, shape.global_kv_heads, tile)[heads]
    tiles = visited.to(torch.int8) + full.to(torch.int8)  # 0: skipped, 1: masked inside, 2: all pairs allowed
    g = torch.arange(hkv) + shape.kv_head_offset
    if bool(dense.all()) or not bool(dense.any()):
        return _attend_heads(q, k, v, shape, tiles, tile, g, bool(dense.all()), need_lse)
    # some heads dense (BlockSparse.dense_kv_heads): run them apart so the sparse heads keep their speed-up
    G = shape.group
    outs, lses, order = [], [], []
    for group_dense in (False, True):
        kv_idx = torch.nonzero(dense == group_dense).flatten()
        q_idx = (kv_idx[:, None] * G + torch.arange(G)).flatten()
        dev_kv, dev_q = kv_idx.to(q.device), q_idx.to(q.device)
        o, lse = _attend_heads(
            q.index_select(1, dev_q),
            k.index_select(1, dev_kv),
            v.index_select(1, dev_kv),
            shape,
            tiles[kv_idx],
            tile,
            g[kv_idx],
            group_dense,
            need_lse,
        )
        outs.append(o)
        lses.append(lse)
        order.append(q_idx)
    back = torch.argsort(torch.cat(order)).to(q.device)
    out = torch.cat(outs, dim=1).index_select(1, back)
    lse = torch.cat(lses).index_select(0, back) if need_lse else None
    return out, lse


def _attend_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shape: AttentionShape,
    tiles: torch.Tensor,
    tile: int,
    g: torch.Tensor,
    dense: bool,
    need_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Some KV heads of one sequence: q ``(T, hkv * G, d)``, k/v ``(T, hkv, d)``; `tiles` ``(hkv, n, n)`` their
    tiles of `tile` tokens (0 skipped, 1 masked inside, 2 all allowed), `g` their global KV-head indices;
    `dense`: the heads see every earlier key."""
    T, hkv, d = k.shape
    G = shape.group
    if dense and not need_lse:
        return _causal(q, k, v, shape), None
    acc = torch.promote_types(q.dtype, torch.float32)
    dev = q.device
    n = tiles.shape[-1]
    r = max(1, QUERY_CHUNK // tile)  # query tiles per chunk
    nc = math.ceil(n / r)
    rows = F.pad(tiles, (0, 0, 0, nc * r - n)).view(hkv, nc, r, n)
    visited = rows.any(2)  # (hkv, nc, n): key tiles some query of the chunk attends
    counts = visited.sum(-1)  # (hkv, nc)
    order = torch.argsort((~visited).to(torch.int8), dim=-1, stable=True)  # visited key tiles first, ascending
    head_base = (torch.arange(hkv) * n)[:, None]
    sels = [order[:, c, : int(counts[:, c].max())] for c in range(nc)]  # (hkv, m) key tiles, padded with unvisited
    index = [(sel + head_base).to(dev) for sel in sels]  # (hkv, m) rows of the tile tables below
    # (hkv * n, tile * d): K and V by tiles; positions past T (last tile) are masked by causality
    kt, vt = (F.pad(x.to(acc).transpose(0, 1), (0, 0, 0, n * tile - T)).reshape(hkv * n, tile * d) for x in (k, v))
    if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
        # one gather for all chunks, then split views: the backward scatters once instead of once per chunk
        sizes, every = [sel.shape[1] * tile for sel in sels], torch.cat(index, 1).flatten()
        k_chunks, v_chunks = (x.index_select(0, every).view(hkv, 1, -1, d).split(sizes, 2) for x in (kt, vt))
    else:  # gathered chunk by chunk, each freed after use
        k_chunks = v_chunks = None
    qc = q.to(acc).transpose(0, 1).reshape(hkv, G, T, d).split(r * tile, dim=2)  # query heads by KV head
    outs, lses = [], []
    for c, sel in enumerate(sels):
        if k_chunks is None:
            kc, vc = (x.index_select(0, index[c].flatten()).view(hkv, 1, -1, d) for x in (kt, vt))
        else:
            kc, vc = k_chunks[c], v_chunks[c]
        bias = _chunk_bias(shape, rows[:, c], sel, c * r, tile, g, acc)[:, :, : qc[c].shape[2]].to(dev)
        o, lse = _softmax_attention(qc[c], kc, vc, bias, shape.scale, need_lse)
        outs.append(o)
        lses.append(lse)
    out = torch.cat(outs, dim=2).permute(2, 0, 1, 3).reshape(T, hkv * G, d).to(q.dtype)
    lse = torch.cat(lses, dim=2).reshape(hkv * G, T) if need_lse else None
    return out, lse


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    """PyTorch SDPA causal attention: q ``(T, H, d)``, k/v ``(T, Hkv, d)`` -> ``(T, H, d)``."""
    q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q, k, v))  # 4-D: PyTorch's fused CPU kernel needs it
    out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=shape.scale, enable_gqa=shape.group > 1)
    return out[0].transpose(0, 1)


def _chunk_bias(
    shape: AttentionShape,
    rows: torch.Tensor,
    sel: torch.Tensor,
    i0: int,
    tile: int,
    g: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive bias ``(hkv or 1, 1, r * tile, m * tile)`` of query tiles ``i0 .. i0 + r - 1`` (classes `rows`
    ``(hkv, r, n)``) against key tiles `sel` ``(hkv, m)``: 0 where allowed, -inf elsewhere; one head when all
    heads have the same."""
    hkv, r = rows.shape[:2]
    m = sel.shape[1]
    cls = torch.gather(rows, 2, sel[:, None, :].expand(hkv, r, m))  # (hkv, r, m)
    # tiles masked inside: the pattern's own rule on each of their pairs
    h, i, j = torch.nonzero(cls == 1, as_tuple=True)
    within = torch.arange(tile)
    t = (i0 + i)[:, None, None] * tile + within[:, None]
    s = (sel[h, j][:, None] * tile + within)[:, None, :]
    inside = torch.where(shape.pattern._allowed(t, s, g[h][:, None, None], shape.global_kv_heads), 0.0, -math.inf)
    if hkv > 1 and bool((cls == cls[:1]).all()) and bool((sel == sel[:1]).all()):
        per_head = inside.view(hkv, -1, tile, tile)
        if bool((per_head == per_head[:1]).all()):
            cls, sel, inside = cls[:1], sel[:1], per_head[0]
            h, i, j = h[: len(inside)], i[: len(inside)], j[: len(inside)]
    by_class = torch.tensor([-math.inf, 0.0, 0.0], dtype=dtype)
    bias = by_class[cls.long()][:, :, None, :, None].expand(-1, r, tile, m, tile).contiguous()
    bias.permute(0, 1, 3, 2, 4)[h, i, j] = inside.to(dtype)
    return bias.view(-1, 1, r * tile, m * tile)


def _softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float, need_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q ``(hkv, G, c, d)``, k/v ``(hkv, 1, S, d)``, additive bias ``(hkv, 1, c, S)`` -> ``(hkv, G, c, d)``, lse.

    Without lse, PyTorch SDPA (its fused CPU kernel takes the bias, broadcasts K/V over the group and has a
    fused backward); with it, the same math unfused, as SDPA does not return the lse."""
    if not need_lse:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=True), None
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale + bias
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v), lse
