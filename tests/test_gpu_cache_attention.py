"""Cache (decode) attention on the GPU at serving sizes (`pytest -m gpu tests/test_gpu_cache_attention.py`).

bf16/fp16, batch 2 with rows at different positions, 32 query heads, head dim 128. Full: a 128K-slot cache filled
from slot 0, read up to kv_len per row. SinkWindow / BlockSparse: compact caches holding the positions the pattern
retains of a ~100K-token sequence, in permuted slots. The allocator is poisoned with NaN before every call (so
unwritten outputs show); relative error against a float32 reference under 1e-2. Plus CUDA-graph capture and replay
with new query, position and kv_len contents.
"""

import functools

import pytest
import torch

from helpers import fresh_generator
from longgen import BlockSparse, Full, SinkWindow
from longgen.kernels import cache_attention
from test_gpu_kernels import poison_allocator, relerr

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HEADS, HEAD_DIM = 32, 128
FULL_SLOTS = 131072
LENS = (100_000, 97_531)  # tokens of each batch row, new queries included
SLACK = 64  # free slots of a compact cache beyond what it holds


@functools.cache
def retained(pattern, n_tokens: int, hkv: int) -> tuple[torch.Tensor, ...]:
    return tuple(pattern.kv_retention(n_tokens, hkv))


def build_cache(pattern, hkv: int, q_len: int, gen: torch.Generator):
    """k_pos (B, hkv, S) and kv_len (or None) of a cache that serves `q_len` new queries at the end of each row.

    Full: positions 0 .. len - 1 in slots 0 .. len - 1 of FULL_SLOTS, kv_len = len. Sparse: what the cache keeps
    for the first new query (its retention) plus the later new tokens, in random slots, the rest empty."""
    B = len(LENS)
    if isinstance(pattern, Full):
        k_pos = torch.full((B, hkv, FULL_SLOTS), -1, dtype=torch.int32)
        for b, n in enumerate(LENS):
            k_pos[b, :, :n] = torch.arange(n, dtype=torch.int32)
        return k_pos, torch.tensor(LENS, dtype=torch.int32)
    kept = []
    for n in LENS:
        first = n - q_len
        kept.append([torch.cat([r, torch.arange(first + 1, n)]) for r in retained(pattern, first + 1, hkv)])
    S = max(len(r) for row in kept for r in row) + SLACK
    k_pos = torch.full((B, hkv, S), -1, dtype=torch.int32)
    for b, row in enumerate(kept):
        for g, r in enumerate(row):
            k_pos[b, g, torch.randperm(S, generator=gen)[: len(r)]] = r.to(torch.int32)
    return k_pos, None


def reference(q, q_pos, k, v, k_pos, pattern, kv_len):
    """float32 reference, one batch row at a time (bounded memory at 128K slots)."""
    rows = []
    for b in range(q.shape[0]):
        kl = None if kv_len is None else kv_len[b : b + 1]
        args = (q[b : b + 1].float(), q_pos[b : b + 1], k[b : b + 1].float(), v[b : b + 1].float(), k_pos[b : b + 1])
        rows.append(cache_attention(*args, pattern, kv_len=kl, backend="reference"))
    return torch.cat(rows)


@pytest.mark.parametrize("q_len", [1, 16])
@pytest.mark.parametrize("hkv", [32, 8])
@pytest.mark.parametrize("pattern", [Full(), SinkWindow(64, 2048), BlockSparse(64, 16)], ids=repr)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matches_float32_reference(dtype, pattern, hkv, q_len):
    gen = fresh_generator()
    k_pos, kv_len = build_cache(pattern, hkv, q_len, gen)
    B, S = k_pos.shape[0], k_pos.shape[-1]
    q = torch.randn(B, HEADS, q_len, HEAD_DIM, generator=gen).to("cuda", dtype).transpose(1, 2)  # a (B, Q, H, d) view
    k = torch.randn(B, hkv, S, HEAD_DIM, device="cuda", dtype=dtype)
    v = torch.randn(B, hkv, S, HEAD_DIM, device="cuda", dtype=dtype)
    q_pos = torch.stack([torch.arange(n - q_len, n) for n in LENS]).cuda()
    k_pos = k_pos.cuda()
    kv_len = None if kv_len is None else kv_len.cuda()
    poison_allocator()
    out = cache_attention(q, q_pos, k, v, k_pos, pattern, kv_len=kv_len, backend="triton")
    ref = reference(q, q_pos, k, v, k_pos, pattern, kv_len)
    assert out.shape == (B, q_len, HEADS, HEAD_DIM) and out.dtype == dtype
    assert not torch.isnan(out).any(), "NaN in the output (unwritten or invalid)"
    err = relerr(out, ref)
    assert err < 1e-2, f"relative error {err:.2e}"


@pytest.mark.parametrize("num_splits", [1, 7])
def test_query_that_sees_nothing_gives_zeros(num_splits):
    k = torch.randn(2, 8, 4096, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k_pos = torch.arange(4096, device="cuda", dtype=torch.int32).expand(2, 8, -1) + 1000
    q = torch.randn(2, 1, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    q_pos = torch.tensor([[10], [3000]], device="cuda")  # row 0: every key in its future
    kv_len = torch.tensor([4096, 0], device="cuda", dtype=torch.int32)  # row 1: nothing cached
    poison_allocator()
    out = cache_attention(q, q_pos, k, k, k_pos, Full(), kv_len=kv_len, num_splits=num_splits, backend="triton")
    assert (out == 0).all()


def test_auto_backend_uses_triton_on_cuda():
    k = torch.randn(1, 8, 3000, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k_pos = torch.randperm(3000, device="cuda").expand(1, 8, -1)
    q = torch.randn(1, 1, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    q_pos = torch.tensor([[2999]], device="cuda")
    a = cache_attention(q, q_pos, k, k, k_pos, SinkWindow(64, 512))
    b = cache_attention(q, q_pos, k, k, k_pos, SinkWindow(64, 512), backend="triton")
    assert torch.equal(a, b)


@pytest.mark.parametrize("pattern", [Full(), SinkWindow(64, 2048)], ids=repr)
def test_cuda_graph_capture_and_replay(pattern):
    """One decode step captured in a CUDA graph; new contents (query, positions, kv_len, a stored token) replay."""
    gen = torch.Generator().manual_seed(0)
    hkv, S = 8, 16384
    k = torch.randn(2, hkv, S, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, hkv, S, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(2, 1, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    if isinstance(pattern, Full):  # grown from slot 0; kv_len says how far
        k_pos = torch.arange(S, dtype=torch.int32).expand(2, hkv, S).contiguous().cuda()
        kv_len = torch.tensor([5000, 9000], device="cuda", dtype=torch.int32)
        q_pos = (kv_len - 1)[:, None].long()
    else:  # a ring: positions 3000 .. 3000 + S - 1 (plus nothing else) in permuted slots
        k_pos = torch.stack([torch.randperm(S, generator=gen) for _ in range(2 * hkv)]).view(2, hkv, S) + 3000
        k_pos = k_pos.to("cuda", torch.int32)
        kv_len = None
        q_pos = torch.tensor([[S + 2999], [S + 1000]], device="cuda")

    def step():
        return cache_attention(q, q_pos, k, v, k_pos, pattern, kv_len=kv_len, backend="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    # the next step's contents, written in place
    q.copy_(torch.randn(q.shape, generator=gen).to(q))
    q_pos += 1
    if kv_len is not None:
        kv_len += torch.tensor([700, -3000], device="cuda", dtype=torch.int32)
        q_pos.copy_((kv_len - 1)[:, None])
    else:
        slot = 1234
        k_pos[:, :, slot] = q_pos.to(torch.int32)  # the new token overwrites the ring's slot
        k[:, :, slot] = torch.randn(2, hkv, HEAD_DIM, generator=gen).to(k)
        v[:, :, slot] = torch.randn(2, hkv, HEAD_DIM, generator=gen).to(v)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.isnan(out).any()
    assert torch.equal(out, step())  # the replay equals an eager call on the new contents
    err = relerr(out, reference(q, q_pos, k, v, k_pos, pattern, kv_len))
    assert err < 1e-2, f"relative error {err:.2e}"


@pytest.mark.parametrize("hkv", [32, 8])
@pytest.mark.parametrize("pattern", [Full(), SinkWindow(64, 2048), BlockSparse(64, 16)], ids=repr)
def test_suffix_attention_matches_float32_reference(pattern, hkv):
    """A prompt slice (the last 4096 of 16384 positions) through the prefill kernels with a query offset."""
    from longgen import sparse_attention
    from longgen.kernels import suffix_attention

    gen = torch.Generator(device="cuda").manual_seed(7)
    L, n = 16384, 4096
    q = torch.randn(2, n, HEADS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
    k, v = (torch.randn(2, L, hkv, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(2))
    poison_allocator()
    got = suffix_attention(q, k, v, pattern, backend="triton")
    assert not got.isnan().any()
    full_q = torch.cat([torch.zeros(2, L - n, HEADS, HEAD_DIM, device="cuda"), q.float()], dim=1)
    want = sparse_attention(full_q, k.float(), v.float(), pattern, backend="reference")[:, L - n :]
    assert relerr(got, want) < 1e-2
