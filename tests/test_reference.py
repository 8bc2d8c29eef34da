"""Reference attention: naive softmax equivalence, varlen, GQA, gradients, chunking and input errors."""

import pytest
import torch

import longgen.kernels.reference as ref_mod
from longgen import BlockLayout, BlockSparse, Full, SinkWindow, reference_attention, sparse_attention

PATTERNS = [
    Full(),
    SinkWindow(3, 9),
    SinkWindow(0, 1),
    BlockSparse(16, 1, 2),
    BlockSparse(16, 2, None, 1),
    BlockLayout(torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)[None], 16),
]


def naive(q, k, v, pattern, scale=None):
    """Per-head, per-batch softmax attention with the dense mask; q (B, T, H, d), k/v (B, T, Hkv, d)."""
    B, T, H, d = q.shape
    hkv = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    mask = pattern.mask(T, hkv)
    out = torch.empty(B, T, H, d, dtype=torch.float64)
    lse = torch.empty(B, H, T, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // hkv)
            s = (q[b, :, h].double() @ k[b, :, g].double().T) * scale
            s = s.masked_fill(~mask[g], float("-inf"))
            lse[b, h] = torch.logsumexp(s, -1)
            out[b, :, h] = torch.softmax(s, -1) @ v[b, :, g].double()
    return out, lse


def rand(B, T, H, hkv, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, d, generator=gen).to(dtype)
    k = torch.randn(B, T, hkv, d, generator=gen).to(dtype)
    v = torch.randn(B, T, hkv, d, generator=gen).to(dtype)
    return q, k, v


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
@pytest.mark.parametrize("H,hkv", [(2, 2), (4, 2), (4, 1)])
def test_equals_naive_softmax_attention(pattern, H, hkv):
    if isinstance(pattern, BlockLayout):
        hkv_l = pattern.layout.shape[0]
        if hkv_l not in (1, hkv):
            pytest.skip("layout heads")
    q, k, v = rand(2, 45, H, hkv, 8)
    out, lse = reference_attention(q, k, v, pattern, return_lse=True)
    exp_out, exp_lse = naive(q, k, v, pattern)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), exp_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), exp_lse, rtol=1e-5, atol=1e-5)
    assert lse.dtype == torch.float32


def test_custom_scale():
    q, k, v = rand(1, 20, 2, 2, 8)
    out = reference_attention(q, k, v, SinkWindow(2, 5), scale=0.3)
    torch.testing.assert_close(out.double(), naive(q, k, v, SinkWindow(2, 5), scale=0.3)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", PATTERNS[:5], ids=repr)
def test_varlen_equals_each_sequence_alone(pattern):
    lens = [5, 0, 33, 17, 1]
    total = sum(lens)
    q, k, v = (x[0] for x in rand(1, total, 4, 2, 8))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    out, lse = reference_attention(q, k, v, pattern, cu_seqlens=cu, return_lse=True)
    assert out.shape == q.shape and lse.shape == (4, total)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        if a == b:
            continue
        o1, l1 = reference_attention(q[None, a:b], k[None, a:b], v[None, a:b], pattern, return_lse=True)
        torch.testing.assert_close(out[a:b], o1[0])
        torch.testing.assert_close(lse[:, a:b], l1[0])


@pytest.mark.parametrize("pattern", PATTERNS[:5], ids=repr)
def test_gqa_equals_repeated_kv(pattern):
    q, k, v = rand(2, 40, 8, 2, 8)
    grouped = reference_attention(q, k, v, pattern)
    # repeating K/V changes the head count a pattern sees; heads of one group must see the same keys,
    # which holds for head-independent patterns and, for BlockSparse, when each group keeps its KV head's rule
    if isinstance(pattern, BlockSparse):
        for g in range(2):
            sub = reference_attention(
                q[:, :, 4 * g : 4 * g + 4],
                k[:, :, g : g + 1].expand(-1, -1, 4, -1).contiguous(),
                v[:, :, g : g + 1].expand(-1, -1, 4, -1).contiguous(),
                _single_head(pattern, g, 2),
            )
            torch.testing.assert_close(grouped[:, :, 4 * g : 4 * g + 4], sub)
        return
    rep = reference_attention(q, k.repeat_interleave(4, dim=2), v.repeat_interleave(4, dim=2), pattern)
    torch.testing.assert_close(grouped, rep)


@pytest.mark.parametrize("pattern", PATTERNS[:5], ids=repr)
def test_padded_batch_equals_each_row_prefix(pattern):
    q, k, v = (x.requires_grad_() for x in rand(3, 40, 4, 2, 8))
    lens = torch.tensor([40, 17, 0], dtype=torch.int32)
    out, lse = reference_attention(q, k, v, pattern, seqlens=lens, return_lse=True)
    out.sum().backward()
    for b, n in enumerate(lens.tolist()):
        if n:
            o1, l1 = reference_attention(q[b : b + 1, :n], k[b : b + 1, :n], v[b : b + 1, :n], pattern, return_lse=True)
            torch.testing.assert_close(out[b, :n], o1[0])
            torch.testing.assert_close(lse[b, :, :n], l1[0])
        assert (out[b, n:] == 0).all() and (lse[b, :, n:] == float("-inf")).all()
        assert (q.grad[b, n:] == 0).all() and (k.grad[b, n:] == 0).all() and (v.grad[b, n:] == 0).all()


def _single_head(pattern, g, hkv):
    """The pattern KV head `g` of `hkv` follows, as a one-head-per-query BlockLayout."""
    T = 64
    bm = pattern.block_mask(T, hkv)[g]
    return BlockLayout(bm[None], pattern.block_size)


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_gradcheck_float64(pattern):
    q, k, v = (x.requires_grad_() for x in rand(1, 35, 2, 1, 4, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda q, k, v: reference_attention(q, k, v, pattern), (q, k, v))


def test_gradcheck_varlen_and_lse():
    q, k, v = (x[0].requires_grad_() for x in rand(1, 20, 2, 2, 4, dtype=torch.float64))
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    pattern = SinkWindow(1, 4)
    assert torch.autograd.gradcheck(
        lambda q, k, v: reference_attention(q, k, v, pattern, cu_seqlens=cu, return_lse=True), (q, k, v)
    )


@pytest.mark.parametrize("pattern", [BlockSparse(16, 1, 2), SinkWindow(3, 9), SinkWindow(0, 5)], ids=repr)
def test_chunked_path_matches_unchunked_forward_and_backward(monkeypatch, pattern):
    q, k, v = rand(1, 70, 4, 2, 8)
    grads = []
    outs = []
    for elements in (1 << 26, 4 * 70 * 3):  # one chunk; chunks of 3 query rows
        monkeypatch.setattr(ref_mod, "_CHUNK_ELEMENTS", elements)
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out = reference_attention(qq, kk, vv, pattern)
        out.backward(torch.ones_like(out))
        outs.append(out.detach())
        grads.append([x.grad for x in (qq, kk, vv)])
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_any_float_dtype_output_in_input_dtype(dtype):
    q, k, v = rand(1, 30, 2, 2, 8, dtype=dtype)
    out, lse = reference_attention(q, k, v, SinkWindow(2, 8), return_lse=True)
    assert out.dtype == dtype
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    exp, _ = naive(q, k, v, SinkWindow(2, 8))
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(out.double(), exp, rtol=tol, atol=tol)


def test_sparse_attention_backends():
    q, k, v = rand(1, 30, 2, 2, 8)
    a = sparse_attention(q, k, v, Full())
    b = sparse_attention(q, k, v, Full(), backend="reference")
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse_attention(q, k, v, Full(), backend="flash")


def good():
    return rand(1, 16, 4, 2, 8)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda q, k, v: reference_attention(q, k, v, "full"), TypeError, "pattern must be"),
        (lambda q, k, v: reference_attention(q.long(), k, v, Full()), TypeError, "floating-point"),
        (lambda q, k, v: reference_attention(q.half(), k, v, Full()), TypeError, "one dtype"),
        (lambda q, k, v: reference_attention(q, k, v[..., :4], Full()), ValueError, "same shape"),
        (lambda q, k, v: reference_attention(q[0], k[0], v[0], Full()), ValueError, "batch, seq, heads"),
        (lambda q, k, v: reference_attention(q[:, :8], k, v, Full()), ValueError, "same batch and sequence"),
        (lambda q, k, v: reference_attention(q[..., :3, :], k, v, Full()), ValueError, "multiple"),
        (lambda q, k, v: reference_attention(q[..., :4], k, v, Full()), ValueError, "head_dim"),
        (lambda q, k, v: reference_attention(q, k, v, Full(), scale=-1.0), ValueError, "scale"),
        (lambda q, k, v: reference_attention(q, k, v, BlockSparse(dense_kv_heads=3)), ValueError, "dense_kv_heads"),
        (
            lambda q, k, v: reference_attention(q[0], k[0], v[0], Full(), cu_seqlens=torch.tensor([0, 16])),
            TypeError,
            "int32",
        ),
        (
            lambda q, k, v: reference_attention(
                q[0], k[0], v[0], Full(), cu_seqlens=torch.tensor([0, 15], dtype=torch.int32)
            ),
            ValueError,
            "end at total_tokens=16",
        ),
        (
            lambda q, k, v: reference_attention(
                q[0], k[0], v[0], Full(), cu_seqlens=torch.tensor([0, 10, 4, 16], dtype=torch.int32)
            ),
            ValueError,
            "non-decreasing",
        ),
        (
            lambda q, k, v: reference_attention(q, k, v, Full(), cu_seqlens=torch.tensor([0, 16], dtype=torch.int32)),
            ValueError,
            "total_tokens, heads",
        ),
        (
            lambda q, k, v: reference_attention(
                torch.cat([q, q], 1),
                torch.cat([k, k], 1),
                torch.cat([v, v], 1),
                BlockLayout(torch.ones(1, 1, 1, dtype=torch.bool), 16),
            ),
            ValueError,
            "exceeds",
        ),
        (lambda q, k, v: reference_attention(q, k, v, Full(), seqlens=torch.tensor([3])), TypeError, "int32"),
        (
            lambda q, k, v: reference_attention(q, k, v, Full(), seqlens=torch.tensor([17], dtype=torch.int32)),
            ValueError,
            r"\[0, seq_len=16\]",
        ),
        (
            lambda q, k, v: reference_attention(
                q[0],
                k[0],
                v[0],
                Full(),
                cu_seqlens=torch.tensor([0, 16], dtype=torch.int32),
                seqlens=torch.tensor([16], dtype=torch.int32),
            ),
            ValueError,
            "not both",
        ),
    ],
)
def test_bad_inputs_raise_documented_errors(call, exc, match):
    q, k, v = good()
    with pytest.raises(exc, match=match):
        call(q, k, v)
