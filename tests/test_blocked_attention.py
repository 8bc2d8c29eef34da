"""The block-sparse PyTorch path: outputs, lse and gradients equal the reference's; the patterns' tile helpers it
reads agree with the dense masks; `sparse_attention` picks it off CUDA, and a hybrid's sparse layers run it."""

import math

import pytest
import torch

import longgen
import longgen.kernels as kernels
import longgen.kernels.blocked as blocked_mod
from longgen import BlockLayout, BlockSparse, Full, SinkWindow, reference_attention, sparse_attention
from longgen.kernels import blocked_attention, choose_backend

LAYOUT = torch.tensor(
    [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
        [1, 0, 0, 1, 1, 0],
        [0, 0, 1, 0, 1, 1],
    ],
    dtype=torch.bool,
)
PATTERNS = [
    Full(),
    SinkWindow(3, 9),
    SinkWindow(0, 20),  # no sink
    SinkWindow(5, 37),  # window not a multiple of the tile
    SinkWindow(40, 24),  # sink wider than a tile
    BlockSparse(16, 1, 2),
    BlockSparse(16, 2, 3),
    BlockSparse(16, 1, None),
    BlockSparse(32, 1, 5),
    BlockSparse(16, 2, None, 1),  # the last KV head dense
    BlockLayout(LAYOUT[None], 16),
    BlockLayout(torch.stack([LAYOUT, torch.ones(6, 6, dtype=torch.bool).tril()]), 16),  # per head, one dense
]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 32 query tokens, so that tiny sequences span several chunks."""
    monkeypatch.setattr(blocked_mod, "QUERY_CHUNK", 32)


def layout_heads(pattern, hkv):
    return not isinstance(pattern, BlockLayout) or pattern.layout.shape[0] in (1, hkv)


def rand(shape_q, shape_kv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*shape_q, generator=gen).to(dtype).requires_grad_(True)
    k = torch.randn(*shape_kv, generator=gen).to(dtype).requires_grad_(True)
    v = torch.randn(*shape_kv, generator=gen).to(dtype).requires_grad_(True)
    return q, k, v


def outputs_and_grads(fn, q, k, v, pattern, **kw):
    out, lse = fn(q, k, v, pattern, return_lse=True, **kw)
    gen = torch.Generator().manual_seed(7)
    w_out = torch.randn(out.shape, generator=gen).to(out.dtype)
    w_lse = torch.randn(lse.shape, generator=gen).to(lse.dtype)
    finite = torch.isfinite(lse)
    loss = (out * w_out).sum() + (lse.where(finite, 0) * w_lse).sum()
    return (out, lse, *torch.autograd.grad(loss, (q, k, v)))


def assert_same(a, b, dtype):
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    names = ("out", "lse", "dq", "dk", "dv")
    for name, x, y in zip(names, a, b, strict=True):
        torch.testing.assert_close(x, y, **tol, msg=lambda m, name=name: f"{name}: {m}")


CASES = [(p, H, hkv, torch.float64) for p in PATTERNS for H, hkv in ((2, 2), (4, 2), (4, 1)) if layout_heads(p, hkv)]
CASES += [(p, 4, 2, torch.float32) for p in PATTERNS[::2]]


@pytest.mark.parametrize("pattern,H,hkv,dtype", CASES, ids=[f"{c[0]}-H{c[1]}-kv{c[2]}-{c[3]}" for c in CASES])
def test_outputs_lse_and_gradients_equal_the_reference(pattern, H, hkv, dtype):
    """GQA groups of 1, 2 and 4; a length that is not a multiple of the tile."""
    q, k, v = rand((1, 61, H, 8), (1, 61, hkv, 8), dtype)
    ref = outputs_and_grads(reference_attention, q, k, v, pattern)
    got = outputs_and_grads(blocked_attention, q, k, v, pattern)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert_same(got, ref, dtype)


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_without_lse_gives_the_same_output_and_gradients(pattern):
    """The path without lse (PyTorch SDPA per chunk, SDPA causal for dense heads), with and without autograd."""
    q, k, v = rand((1, 53, 4, 8), (1, 53, 2, 8), torch.float64)
    out = blocked_attention(q, k, v, pattern)
    ref = reference_attention(q, k, v, pattern)
    with torch.no_grad():  # gathers chunk by chunk
        torch.testing.assert_close(blocked_attention(q, k, v, pattern), ref, rtol=1e-10, atol=1e-10)
    w = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grads, ref_grads = (torch.autograd.grad((x * w).sum(), (q, k, v)) for x in (out, ref))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_packed_sequences(pattern):
    lens = [5, 0, 70, 1, 17]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = rand((sum(lens), 4, 8), (sum(lens), 2, 8), torch.float64, seed=1)
    ref = outputs_and_grads(reference_attention, q, k, v, pattern, cu_seqlens=cu)
    got = outputs_and_grads(blocked_attention, q, k, v, pattern, cu_seqlens=cu)
    assert_same(got, ref, torch.float64)


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_right_padded_batch(pattern):
    seqlens = torch.tensor([64, 0, 37], dtype=torch.int32)
    q, k, v = rand((3, 64, 4, 8), (3, 64, 2, 8), torch.float64, seed=2)
    ref = outputs_and_grads(reference_attention, q, k, v, pattern, seqlens=seqlens)
    got = outputs_and_grads(blocked_attention, q, k, v, pattern, seqlens=seqlens)
    assert_same(got, ref, torch.float64)
    assert bool((got[0][1] == 0).all()) and bool((got[0][2, 37:] == 0).all())
    assert bool(torch.isneginf(got[1][2, :, 37:]).all())


@pytest.mark.parametrize("pattern", [BlockSparse(16, 1, 3, 1), SinkWindow(3, 9)], ids=repr)
def test_a_slice_of_the_kv_heads_equals_that_slice_of_all_heads(pattern):
    q, k, v = rand((1, 50, 8, 8), (1, 50, 4, 8), torch.float64, seed=3)
    whole, lse = blocked_attention(q, k, v, pattern, return_lse=True)
    part, part_lse = blocked_attention(
        q[:, :, 4:6], k[:, :, 2:3], v[:, :, 2:3], pattern, return_lse=True, kv_head_offset=2, num_kv_heads_total=4
    )
    torch.testing.assert_close(part, whole[:, :, 4:6])
    torch.testing.assert_close(part_lse, lse[:, 4:6])


def test_long_sequence_with_default_chunks_and_bfloat16(monkeypatch):
    monkeypatch.setattr(blocked_mod, "QUERY_CHUNK", 256)
    q, k, v = rand((1, 700, 4, 16), (1, 700, 2, 16), torch.float32, seed=4)
    for pattern in (SinkWindow(64, 200), BlockSparse(64, 2, None)):
        ref = reference_attention(q, k, v, pattern)
        torch.testing.assert_close(blocked_attention(q, k, v, pattern), ref, rtol=2e-5, atol=2e-5)
        out = blocked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), pattern)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_bad_input_raises_the_shared_errors():
    q, k, v = rand((1, 16, 4, 8), (1, 16, 3, 8), torch.float32)
    with pytest.raises(ValueError, match="multiple of the number of KV heads"):
        blocked_attention(q, k, v, Full())
    with pytest.raises(TypeError, match="pattern must be a longgen pattern"):
        blocked_attention(q, k, v, "full")


# ---- the pattern helpers the path reads ----
def tile_cases():
    return [
        (p, T, hkv, tile)
        for p in PATTERNS
        for T, hkv in ((1, 2), (37, 2), (64, 1), (100, 4))
        for tile in (16, 32, 64)
        if layout_heads(p, hkv) and not (isinstance(p, BlockLayout) and T > 96)
    ]


def test_full_block_mask_marks_exactly_the_tiles_with_every_pair_allowed():
    for pattern, T, hkv, tile in tile_cases():
        mask = pattern.mask(T, hkv)
        full = pattern.full_block_mask(T, hkv, tile)
        n = math.ceil(T / tile)
        assert full.shape == (hkv, n, n)
        assert not bool((full & ~pattern.block_mask(T, hkv, tile)).any())
        for i in range(n):
            for j in range(n):
                q_rows, k_cols = slice(i * tile, (i + 1) * tile), slice(j * tile, (j + 1) * tile)
                every = mask[:, q_rows, k_cols].flatten(1).all(1) & (j < i)
                if (i + 1) * tile <= T:  # complete tiles: exact; the last, partial row may be marked conservatively
                    assert torch.equal(full[:, i, j], every), (pattern, T, hkv, tile, i, j)
                else:
                    assert not bool((full[:, i, j] & ~every).any()), (pattern, T, hkv, tile, i, j)


def test_dense_heads_are_the_heads_whose_mask_is_causal():
    for pattern, T, hkv, _ in tile_cases():
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        expected = (pattern.mask(T, hkv) == causal).flatten(1).all(1)
        assert torch.equal(pattern.dense_heads(T, hkv), expected), (pattern, T, hkv)
    assert SinkWindow(4, 10).dense_heads(14, 1).item() and not SinkWindow(4, 10).dense_heads(15, 1).item()


# ---- dispatch ----
def test_auto_chooses_the_blocked_path_off_cuda(monkeypatch):
    q, k, v = rand((1, 40, 4, 8), (1, 40, 2, 8), torch.float32)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert choose_backend(q.to(dtype)) == "blocked"
    assert choose_backend(q, "reference") == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend(q, "flex")
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[3])
        return blocked_attention(*args, **kwargs)

    monkeypatch.setattr(kernels, "blocked_attention", spy)
    out = sparse_attention(q, k, v, SinkWindow(3, 9))
    assert calls == [SinkWindow(3, 9)]
    torch.testing.assert_close(out, reference_attention(q, k, v, SinkWindow(3, 9)))
    sparse_attention(q, k, v, SinkWindow(3, 9), backend="reference")
    assert len(calls) == 1


def test_a_hybrid_runs_its_sparse_layers_through_the_blocked_path_on_cpu(monkeypatch):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    longgen.convert(model, pattern=SinkWindow(4, 16), full_fraction=1 / 3)
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[3])
        return blocked_attention(*args, **kwargs)

    monkeypatch.setattr(kernels, "blocked_attention", spy)
    ids = torch.randint(0, 64, (1, 80), generator=torch.Generator().manual_seed(0))
    model(ids).logits.sum().backward()
    assert calls == [SinkWindow(4, 16)] * 2  # the two sparse layers; the full layer runs SDPA
