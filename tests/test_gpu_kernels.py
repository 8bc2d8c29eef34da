"""Triton kernels on the GPU at real sizes (run on the device: `pytest -m gpu tests/test_gpu_kernels.py`).

bf16/fp16 inputs drawn fresh each run, the CUDA allocator poisoned with NaN before every call (so unwritten
outputs show), relative error against a float32 reference under 1e-2 for the output and all gradients.
"""

import pytest
import torch

from helpers import fresh_generator
from longgen import BlockLayout, BlockSparse, Full, SinkWindow, reference_attention, sparse_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def poison_allocator():
    """Fill the caching allocator's free memory with NaN so that torch.empty() hands out NaNs."""
    free, _ = torch.cuda.mem_get_info()
    n = int(free * 0.5) // 4
    x = torch.full((n,), float("nan"), device="cuda")
    del x


def relerr(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def check_forward_backward(pattern, q, k, v, dout):
    """Run the Triton backend (poisoned allocator) and compare output, LSE and gradients with the float32
    reference: relative error < 1e-2, no NaN. Returns the output."""
    poison_allocator()
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = sparse_attention(qq, kk, vv, pattern, backend="triton", return_lse=True)
    (out * dout).sum().backward()
    rq, rk, rv = (x.float().requires_grad_() for x in (q, k, v))
    ref, ref_lse = reference_attention(rq, rk, rv, pattern, return_lse=True)
    (ref * dout.float()).sum().backward()
    for name, a, b in (
        ("out", out, ref),
        ("lse", lse, ref_lse),
        ("dq", qq.grad, rq.grad),
        ("dk", kk.grad, rk.grad),
        ("dv", vv.grad, rv.grad),
    ):
        assert not torch.isnan(a).any(), f"{name} has NaN (unwritten or invalid)"
        err = relerr(a, b)
        assert err < 1e-2, f"{name}: relative error {err:.2e}"
    return out


def random_layout(hkv, n, gen):
    """Random causal, KV-cache-efficient layout: each column is a run from the diagonal, plus a few strided."""
    lay = torch.zeros(hkv, n, n, dtype=torch.bool)
    runs = torch.randint(1, 6, (hkv, n), generator=gen)
    for g in range(hkv):
        for j in range(n):
            lay[g, j : j + int(runs[g, j]), j] = True
            if j % 7 == 3:
                lay[g, j:, j] = True
    return BlockLayout(lay, 64)


CASES = [
    # (pattern, seq_len, heads, kv_heads, head_dim, dtype)
    (Full(), 4097, 8, 8, 128, torch.bfloat16),
    (Full(), 4096, 8, 2, 64, torch.float16),
    (SinkWindow(64, 2048), 8191, 8, 8, 128, torch.bfloat16),
    (SinkWindow(64, 2048), 32768, 32, 8, 128, torch.bfloat16),
    (SinkWindow(3, 100), 5000, 6, 2, 96, torch.float16),
    (SinkWindow(1, 3), 2048, 4, 4, 64, torch.bfloat16),  # (0, 1) makes dq exactly 0: no relative error
    (BlockSparse(64, 16), 8200, 8, 8, 128, torch.bfloat16),
    (BlockSparse(64, 16), 32768, 32, 8, 128, torch.bfloat16),
    (BlockSparse(16, 8, None, 1), 6000, 8, 4, 128, torch.float16),
    (BlockSparse(128, 4, 8), 10000, 16, 16, 64, torch.bfloat16),
    (BlockSparse(32, 2, 3), 3000, 12, 4, 96, torch.bfloat16),
    ("layout", 8192, 8, 4, 128, torch.bfloat16),
    # whole tiles (the kernels' EVEN path) with a padded head dim and GQA
    (SinkWindow(64, 512), 4096, 8, 4, 96, torch.float16),
    (BlockSparse(64, 4), 8192, 16, 4, 96, torch.bfloat16),
]


@pytest.mark.parametrize("pattern,T,H,hkv,d,dtype", CASES, ids=lambda x: repr(x)[:40])
def test_matches_float32_reference(pattern, T, H, hkv, d, dtype):
    gen = fresh_generator()
    if pattern == "layout":
        pattern = random_layout(hkv, T // 64, gen)
    q, k, v, dout = (
        torch.randn(shape, generator=gen).to("cuda", dtype)
        for shape in ((1, T, H, d), (1, T, hkv, d), (1, T, hkv, d), (1, T, H, d))
    )
    check_forward_backward(pattern, q, k, v, dout)


@pytest.mark.parametrize("lens", [[3000, 1, 65, 5000, 777], [1024, 4096, 256]], ids=["ragged", "whole_tiles"])
@pytest.mark.parametrize("pattern", [Full(), SinkWindow(64, 512), BlockSparse(64, 4)], ids=repr)
def test_varlen_matches_reference(pattern, lens):
    gen = fresh_generator()
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    total = sum(lens)
    q = torch.randn(total, 16, 128, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(total, 4, 128, generator=gen).to("cuda", torch.bfloat16)
    v = torch.randn(total, 4, 128, generator=gen).to("cuda", torch.bfloat16)
    poison_allocator()
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    out = sparse_attention(qq, kk, vv, pattern, cu_seqlens=cu, backend="triton")
    out.float().square().sum().backward()
    rq, rk, rv = (x.float().requires_grad_() for x in (q, k, v))
    ref = reference_attention(rq, rk, rv, pattern, cu_seqlens=cu)
    ref.square().sum().backward()
    for a, b in ((out, ref), (qq.grad, rq.grad), (kk.grad, rk.grad), (vv.grad, rv.grad)):
        assert not torch.isnan(a).any()
        assert relerr(a, b) < 1e-2


def test_auto_backend_uses_triton_on_cuda():
    q = torch.randn(1, 256, 4, 64, device="cuda", dtype=torch.bfloat16)
    a = sparse_attention(q, q, q, SinkWindow(4, 64))
    b = sparse_attention(q, q, q, SinkWindow(4, 64), backend="triton")
    assert torch.equal(a, b)


@pytest.mark.parametrize("pattern", [SinkWindow(64, 512), BlockSparse(64, 4)], ids=repr)
def test_padded_batch_matches_reference(pattern):
    gen = fresh_generator()
    q = torch.randn(3, 4096, 8, 128, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    k = torch.randn(3, 4096, 4, 128, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    v = torch.randn(3, 4096, 4, 128, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    lens = torch.tensor([4096, 1000, 3], dtype=torch.int32, device="cuda")
    poison_allocator()
    out = sparse_attention(q, k, v, pattern, seqlens=lens, backend="triton")
    out.float().square().sum().backward()
    rq, rk, rv = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = reference_attention(rq, rk, rv, pattern, seqlens=lens)
    ref.square().sum().backward()
    for a, b in ((out, ref), (q.grad, rq.grad), (k.grad, rk.grad), (v.grad, rv.grad)):
        assert not torch.isnan(a).any()
        assert relerr(a, b) < 1e-2
    assert (out[1, 1000:] == 0).all() and (q.grad[2, 3:] == 0).all()


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


GLUON_CASES = [
    # (pattern, seq_len, heads, kv_heads, head_dim, dtype, batch): shapes in the Hopper kernels' scope
    (Full(), 1024, 4, 4, 128, torch.bfloat16, 1),
    (Full(), 4096, 8, 2, 64, torch.float16, 2),
    (SinkWindow(64, 2048), 8192, 8, 8, 128, torch.bfloat16, 1),
    (SinkWindow(0, 100), 2048, 4, 2, 128, torch.bfloat16, 2),
    (SinkWindow(100, 300), 2048, 4, 4, 64, torch.float16, 1),
    (SinkWindow(1, 3), 1024, 4, 4, 128, torch.bfloat16, 1),
    (BlockSparse(64, 16), 16384, 8, 8, 128, torch.bfloat16, 1),
    (BlockSparse(64, 4, 8), 8192, 16, 4, 128, torch.bfloat16, 1),
    (BlockSparse(64, 2, 8), 4224, 8, 8, 128, torch.bfloat16, 1),  # local ranges of paired tiles apart
    (BlockSparse(64, 3, 5), 3200, 4, 4, 64, torch.float16, 2),  # odd stride, far tiles not a whole pair
    (BlockSparse(128, 2, 3), 4096, 8, 8, 64, torch.float16, 2),
    (BlockSparse(64, 16, None, 1), 8192, 8, 4, 128, torch.bfloat16, 1),
    (BlockSparse(256, 1, 2), 2304, 4, 2, 128, torch.bfloat16, 1),  # key tiles of one block in one pair
    (BlockSparse(512, 1, 2), 1664, 4, 2, 64, torch.bfloat16, 1),  # a last block past the sequence end
]


def _count_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.skipif(not _hopper(), reason="the Gluon kernels run on CUDA capability 9.0 only")
@pytest.mark.parametrize("pattern,T,H,hkv,d,dtype,B", GLUON_CASES, ids=lambda x: repr(x)[:40])
def test_gluon_kernels_match_reference_and_triton(pattern, T, H, hkv, d, dtype, B, monkeypatch):
    """The Hopper forward and dK/dV kernels take these calls (checked) and match the float32 reference (outputs
    and all gradients); the Triton backward (LONGGEN_GLUON=fwd) and forward (LONGGEN_GLUON=0) give the same."""
    from longgen.kernels import gluon_attention

    fwd_calls = _count_calls(monkeypatch, gluon_attention, "forward")
    bwd_calls = _count_calls(monkeypatch, gluon_attention, "dkdv")
    gen = fresh_generator()
    q, k, v, dout = (
        torch.randn(shape, generator=gen).to("cuda", dtype)
        for shape in ((B, T, H, d), (B, T, hkv, d), (B, T, hkv, d), (B, T, H, d))
    )
    out = check_forward_backward(pattern, q, k, v, dout)
    assert fwd_calls and bwd_calls, "the Gluon kernels did not take a call in their scope"
    grads = []
    for flag in ("1", "fwd"):
        monkeypatch.setenv("LONGGEN_GLUON", flag)
        kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
        (sparse_attention(q, kk, vv, pattern, backend="triton") * dout).sum().backward()
        grads.append((kk.grad, vv.grad))
    assert len(bwd_calls) == 2, "LONGGEN_GLUON=fwd still ran the Gluon dK/dV kernel"
    for a, b in zip(*grads, strict=True):
        assert relerr(a, b) < 1e-2
    monkeypatch.setenv("LONGGEN_GLUON", "0")
    n = len(fwd_calls)
    with torch.no_grad():
        tri = sparse_attention(q, k, v, pattern, backend="triton")
    assert len(fwd_calls) == n
    assert relerr(out, tri) < 1e-2


@pytest.mark.skipif(not _hopper(), reason="the Gluon kernels run on CUDA capability 9.0 only")
@pytest.mark.parametrize("lse_grad", [False, True])
@pytest.mark.parametrize("pattern,T,H,hkv,d,dtype,B", GLUON_CASES, ids=lambda x: repr(x)[:40])
def test_gluon_dq_matches_reference_and_triton(pattern, T, H, hkv, d, dtype, B, lse_grad, monkeypatch):
    """The Hopper dQ kernel takes these calls (default LONGGEN_GLUON=1), matches the float32 reference (dq, and
    dk, dv through the delta it writes), with and without a gradient on the returned LSE, and equals the
    Triton dQ kernel (LONGGEN_GLUON=fwd,dkdv)."""
    from longgen.kernels import gluon_attention

    calls = _count_calls(monkeypatch, gluon_attention, "dq_delta")
    gen = fresh_generator()
    q, k, v, dout = (
        torch.randn(shape, generator=gen).to("cuda", dtype)
        for shape in ((B, T, H, d), (B, T, hkv, d), (B, T, hkv, d), (B, T, H, d))
    )
    dl = torch.randn(B, H, T, generator=gen).to("cuda") if lse_grad else None

    def grads(backend, x, y, z, flag=None):
        if flag is not None:
            monkeypatch.setenv("LONGGEN_GLUON", flag)
        xs = [t.detach().clone().requires_grad_() for t in (x, y, z)]
        out, lse = (
            sparse_attention(*xs, pattern, backend="triton", return_lse=True)
            if backend == "triton"
            else reference_attention(*xs, pattern, return_lse=True)
        )
        loss = (out.float() * dout.float()).sum() + ((lse.float() * dl).sum() if lse_grad else 0.0)
        loss.backward()
        return [t.grad for t in xs]

    poison_allocator()
    got = grads("triton", q, k, v, "1")
    assert calls, "the Gluon dQ kernel did not take a call in its scope"
    ref = grads("reference", q.float(), k.float(), v.float())
    for name, a, b in zip(("dq", "dk", "dv"), got, ref, strict=True):
        assert not torch.isnan(a).any(), f"{name} has NaN"
        assert relerr(a, b) < 1e-2, f"{name}: relative error {relerr(a, b):.2e}"
    n = len(calls)
    tri = grads("triton", q, k, v, "fwd,dkdv")
    assert len(calls) == n, "LONGGEN_GLUON=fwd,dkdv ran the Gluon dQ kernel"
    for a, b in zip(got, tri, strict=True):
        assert relerr(a, b) < 1e-2


@pytest.mark.skipif(not _hopper(), reason="the Gluon kernels run on CUDA capability 9.0 only")
@pytest.mark.parametrize("pattern,T,H,hkv,d,dtype,B", GLUON_CASES, ids=lambda x: repr(x)[:40])
def test_gluon_launch_choices_give_identical_results(pattern, T, H, hkv, d, dtype, B, monkeypatch):
    """How the forward is launched (persistent with one program per SM, or a few programs taking many work items
    each, `Tuning.persistent_programs`) and the dK/dV ring depth (`Tuning.bwd_stages`) change no arithmetic: output,
    LSE and all gradients are bitwise those of the defaults."""
    from longgen.kernels.inputs import check_attention_args
    from longgen.kernels.plan import Tuning
    from longgen.kernels.triton_attention import triton_attention

    gen = fresh_generator()
    q, k, v, dout = (
        torch.randn(shape, generator=gen).to("cuda", dtype)
        for shape in ((B, T, H, d), (B, T, hkv, d), (B, T, hkv, d), (B, T, H, d))
    )

    def run(tuning):
        poison_allocator()
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        shape = check_attention_args(*xs, pattern, None, None, None, 0, None)
        out, lse = triton_attention(*xs, shape, None, True, tuning)
        (out * dout).sum().backward()
        return [out, lse] + [x.grad for x in xs]

    rule = run(Tuning())
    for tuning in (Tuning(persistent_programs=3), Tuning(bwd_stages=2)):
        got = run(tuning)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, rule, strict=True):
            assert torch.equal(a, b), f"{name} differs with {tuning}"


@pytest.mark.skipif(not _hopper(), reason="the Gluon forward runs on CUDA capability 9.0 only")
def test_full_layer_forward_without_grad_uses_hopper_kernel(monkeypatch):
    """A Full layer's forward with no gradient to compute runs the Hopper kernel (equal to SDPA); training keeps
    SDPA."""
    from longgen.kernels import gluon_attention
    from longgen.model.attention import _attend_prefill

    calls = _count_calls(monkeypatch, gluon_attention, "forward")
    q, k, v = (torch.randn(2, 2048, h, 128, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    with torch.no_grad():
        out = _attend_prefill(q, k, v, Full(), None, None, None)
    assert len(calls) == 1 and relerr(out, ref) < 1e-2
    qq = q.clone().requires_grad_()
    _attend_prefill(qq, k, v, Full(), None, None, None)
    assert len(calls) == 1
