"""Cache (decode) attention: the reference against brute force, the Triton kernels (TRITON_INTERPRET=1) against it."""

import math
import os

import pytest
import torch

from longgen import BlockLayout, BlockSparse, Full, SinkWindow
from longgen.kernels import cache_attention

interpret = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU interpreter tests (GPU runs: tests/test_gpu_cache_attention.py)",
)

LAYOUT = torch.ones(8, 8, dtype=torch.bool).tril() & ~torch.ones(8, 8, dtype=torch.bool).tril(-3)  # 3-block band
LAYOUT[:, 0] = True
PATTERNS = [
    Full(),
    SinkWindow(3, 10),
    BlockSparse(16, 2, 2),
    BlockSparse(16, 2, 2, dense_kv_heads=1),
    BlockLayout(torch.stack([LAYOUT, torch.eye(8, dtype=torch.bool) | LAYOUT.tril(-4)]), 16),
]
MAX_POS = 8 * 16  # positions stay inside the BlockLayout's span


def rand(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def slot_cache(B, hkv, S, d, dtype, seed, filled=0.8, pos_dtype=torch.int64):
    """Caches with random positions in [0, MAX_POS) in random slots of each (row, head), some slots empty."""
    gen = torch.Generator().manual_seed(seed)
    k_pos = torch.full((B, hkv, S), -1, dtype=pos_dtype)
    n = int(S * filled)
    for b in range(B):
        for g in range(hkv):
            slots = torch.randperm(S, generator=gen)[:n]
            k_pos[b, g, slots] = torch.randperm(MAX_POS, generator=gen)[:n].to(pos_dtype)
    return rand((B, hkv, S, d), dtype, seed + 1), rand((B, hkv, S, d), dtype, seed + 2), k_pos


def relerr(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


# ---------------------------------------------------------------------------------------------------------------
# the reference
@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_reference_matches_brute_force_on_a_contiguous_cache(pattern):
    B, Q, H, hkv, d, T = 2, 3, 4, 2, 8, 100
    q = rand((B, Q, H, d), torch.float64, 0)
    k, v = rand((B, hkv, T, d), torch.float64, 1), rand((B, hkv, T, d), torch.float64, 2)
    k_pos = torch.arange(T).expand(B, hkv, T)
    q_pos = torch.tensor([[97, 98, 99], [20, 41, 60]])
    out = cache_attention(q, q_pos, k, v, k_pos, pattern, backend="reference")
    mask = pattern.mask(T, hkv)  # (hkv, T, T)
    G = H // hkv
    for b in range(B):
        for i in range(Q):
            t = int(q_pos[b, i])
            for h in range(H):
                m = mask[h // G, t]
                p = torch.softmax((k[b, h // G] @ q[b, i, h]) / math.sqrt(d) + torch.where(m, 0.0, -math.inf), 0)
                torch.testing.assert_close(out[b, i, h], p @ v[b, h // G], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# the Triton kernels
CASES = [  # (group, queries, num_splits, dtype, head_dim)
    (1, 1, 1, torch.float32, 16),
    (2, 5, 3, torch.float32, 16),
    (4, 5, 2, torch.float16, 32),
]


@interpret
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"G{c[0]}-Q{c[1]}-split{c[2]}-{str(c[3])[6:]}-d{c[4]}")
@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_triton_matches_reference(pattern, case):
    G, Q, splits, dtype, d = case
    B, hkv, S = 2, 2, 70
    H = G * hkv
    k, v, k_pos = slot_cache(B, hkv, S, d, dtype, 10 + G, pos_dtype=torch.int64 if G == 2 else torch.int32)
    q = rand((B, H, Q, d), dtype, 5).transpose(1, 2)  # (B, Q, H, d) view, as attention modules hold it
    q_pos = torch.stack([torch.arange(MAX_POS - Q, MAX_POS), torch.arange(60, 60 + Q)]).to(torch.int32)
    kv_len = torch.tensor([S, S - 13], dtype=torch.int32)
    out = cache_attention(q, q_pos, k, v, k_pos, pattern, kv_len=kv_len, num_splits=splits, backend="triton")
    ref = cache_attention(q.float(), q_pos, k.float(), v.float(), k_pos, pattern, kv_len=kv_len, backend="reference")
    assert out.shape == (B, Q, H, d) and out.dtype == dtype
    assert torch.isfinite(out).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@interpret
@pytest.mark.parametrize("splits", [1, 4])
def test_triton_query_that_sees_nothing_gives_exact_zeros(splits):
    B, H, hkv, d, S = 3, 4, 2, 16, 40
    k, v, _ = slot_cache(B, hkv, S, d, torch.float32, 20)
    k_pos = torch.arange(50, 50 + S).expand(B, hkv, S).contiguous()  # every key at position >= 50
    q = rand((B, 2, H, d), torch.float32, 21)
    q_pos = torch.tensor([[60, 61], [10, 70], [100, 101]])  # row 1, query 0: every key in its future
    kv_len = torch.tensor([0, S, S], dtype=torch.int32)  # row 0: nothing cached
    pattern = SinkWindow(0, 5)  # row 2: the window has passed every key
    for backend in ("triton", "reference"):
        out = cache_attention(q, q_pos, k, v, k_pos, pattern, kv_len=kv_len, num_splits=splits, backend=backend)
        assert (out[0] == 0).all() and (out[1, 0] == 0).all() and (out[2] == 0).all(), backend
        assert out[1, 1].abs().sum() > 0, backend


@interpret
def test_triton_default_splits_full_cache_and_int64_kv_len():
    B, Q, H, hkv, d, S = 1, 1, 2, 1, 16, 300  # 300 slots: the default is one split on a CPU
    k, v = rand((B, hkv, S, d), torch.float32, 30), rand((B, hkv, S, d), torch.float32, 32)
    k_pos = torch.arange(S).expand(B, hkv, S)  # a Full layer's cache, grown from slot 0, as a strided view
    q = rand((B, Q, H, d), torch.float32, 31)
    q_pos = torch.tensor([[S - 1]])
    for kv_len in (None, torch.tensor([S + 5])):  # kv_len past S reads all S slots
        out = cache_attention(q, q_pos, k, v, k_pos, Full(), kv_len=kv_len, backend="triton")
        ref = cache_attention(q, q_pos, k, v, k_pos, Full(), backend="reference")
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_default_num_splits():
    from longgen.kernels.triton_cache_attention import default_num_splits

    assert default_num_splits(131072, 8, 132) == 33  # batch 1, 8 KV heads, one row tile: 264 programs
    assert default_num_splits(131072, 32, 132) == 9
    assert default_num_splits(131072, 256, 132) == 2
    assert default_num_splits(2112, 8, 132) == 8  # each split keeps >= 256 slots
    assert default_num_splits(256, 1, 132) == 1  # small caches: one split, no combine kernel
    assert default_num_splits(10**7, 1, 132) == 128


def test_scan_tiles_are_an_argument_not_a_module_setting():
    from longgen.kernels.plan import Tiles
    from longgen.kernels.triton_cache_attention import SCAN_TILES, tile_config

    assert tile_config(8, False) == Tiles(16, *SCAN_TILES)  # 8 packed rows -> BLOCK_M 16 (tl.dot's minimum)
    assert tile_config(200, False, (32, 8, 2)) == Tiles(64, 32, 8, 2)  # what decode_attention.py --tiles sweeps
    assert tile_config(8, True, (32, 8, 2)) == Tiles(16, 16, 1, 1)  # the interpreter's tiles stay small


# ---------------------------------------------------------------------------------------------------------------
# arguments
def test_bad_arguments_are_clear_errors():
    B, Q, H, hkv, d, S = 1, 2, 4, 2, 16, 8
    q = torch.zeros(B, Q, H, d)
    k = torch.zeros(B, hkv, S, d)
    q_pos = torch.zeros(B, Q, dtype=torch.int32)
    k_pos = torch.zeros(B, hkv, S, dtype=torch.int32)

    def call(**kw):
        args = dict(query=q, q_pos=q_pos, key_cache=k, value_cache=k, k_pos=k_pos, pattern=Full())
        backend = kw.pop("backend", "reference")
        args.update(kw)
        return cache_attention(**args, backend=backend)

    cases = [
        (TypeError, "pattern must be", dict(pattern="full")),
        (ValueError, r"query must be \(batch, queries, heads, head_dim\)", dict(query=q[0])),
        (TypeError, "share one dtype", dict(key_cache=k.half(), value_cache=k.half())),
        (TypeError, "floating-point", dict(query=q.long())),
        (ValueError, "same shape", dict(value_cache=k[:, :, :4])),
        (ValueError, "match query's batch", dict(key_cache=k[:, :, :, :8], value_cache=k[:, :, :, :8])),
        (ValueError, "multiple of the cache's kv_heads", dict(query=torch.zeros(B, Q, 3, d))),
        (ValueError, r"q_pos must have shape \(batch, queries\)", dict(q_pos=q_pos[0])),
        (TypeError, "q_pos must be an int32 or int64", dict(q_pos=q_pos.float())),
        (ValueError, r"k_pos must have shape \(batch, kv_heads, slots\)", dict(k_pos=k_pos[:, :1])),
        (ValueError, r"kv_len must have shape \(batch,\)", dict(kv_len=torch.zeros(B, 1, dtype=torch.int32))),
        (TypeError, "kv_len must be a torch.Tensor", dict(kv_len=3)),
        (ValueError, "k_pos is on meta", dict(k_pos=k_pos.to("meta"))),
        (ValueError, "num_splits must be a positive int", dict(num_splits=0)),
        (ValueError, "scale must be a positive finite float", dict(scale=float("nan"))),
        (ValueError, "backend must be one of", dict(backend="cuda")),
    ]
    for error, message, kw in cases:
        with pytest.raises(error, match=message):
            call(**kw)
    if os.environ.get("TRITON_INTERPRET") == "1":
        with pytest.raises(ValueError, match=r"head_dim in \(16, 32, 64, 96, 128\)"):
            k24 = torch.zeros(B, hkv, S, 24)
            call(query=torch.zeros(B, Q, H, 24), key_cache=k24, value_cache=k24, backend="triton")
        with pytest.raises(TypeError, match=r"float16 or torch\.float32 on cpu"):
            call(query=q.double(), key_cache=k.double(), value_cache=k.double(), backend="triton")
    out = call(query=q.double(), key_cache=k.double(), value_cache=k.double(), backend="auto")  # CPU: reference
    assert out.dtype == torch.float64


@interpret
@pytest.mark.parametrize("pattern", PATTERNS[:4], ids=repr)
@pytest.mark.parametrize("case", [(2, 4, 2, 45, 13, torch.float32), (1, 2, 2, 70, 64, torch.float16)])
def test_suffix_attention_equals_the_last_rows_of_full_attention(pattern, case):
    """Queries at the last n positions (a prompt slice after cached keys in position order): the prefill kernels
    with a query offset, against the same rows of attention over all L positions."""
    from longgen import sparse_attention
    from longgen.kernels import suffix_attention

    B, H, hkv, L, n, dtype = case
    q, k, v = rand((B, L, H, 32), dtype, 1), rand((B, L, hkv, 32), dtype, 2), rand((B, L, hkv, 32), dtype, 3)
    want = sparse_attention(q.float(), k.float(), v.float(), pattern, backend="reference")[:, L - n :]
    for backend in ("triton", "reference", "auto"):  # auto on CPU: SDPA for Full, else the reference
        got = suffix_attention(q[:, L - n :], k, v, pattern, backend=backend)
        assert got.shape == (B, n, H, 32) and got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3)


def test_suffix_attention_errors():
    from longgen.kernels import suffix_attention

    q, k = rand((1, 9, 2, 16), torch.float32, 0), rand((1, 5, 2, 16), torch.float32, 1)
    with pytest.raises(ValueError, match="9 queries must be the last positions of the 5 keys"):
        suffix_attention(q, k, k, Full())
    with pytest.raises(ValueError, match="no Triton path for BlockLayout"):
        suffix_attention(q[:, :3], k, k, PATTERNS[4], backend="triton")
