"""Triton kernels against the PyTorch reference on CPU (TRITON_INTERPRET=1): forward, dq, dk, dv, lse."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longgen import BlockLayout, BlockSparse, Full, SinkWindow, reference_attention, sparse_attention

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU interpreter tests (GPU runs use tests/test_gpu_kernels.py)"
)

LAYOUT = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
PATTERNS = [
    Full(),
    SinkWindow(5, 20),
    SinkWindow(0, 1),
    SinkWindow(40, 3),
    BlockSparse(16, 2, None),
    BlockSparse(16, 1, 3, 1),
    BlockSparse(32, 1, 2),
    BlockLayout(LAYOUT[None], 16),
    BlockLayout(torch.stack([LAYOUT, torch.eye(4, dtype=torch.bool) | LAYOUT.tril(-2)]), 16),
]


def relerr(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def run_both(q, k, v, pattern, cu_seqlens=None, lse_weight=0.5, seqlens=None):
    """Forward + backward of (out, lse) through both backends; returns (triton results, reference results)."""
    results = []
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(q.shape, generator=g).to(q.dtype)
    for backend in ("triton", "reference"):
        qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
        if backend == "reference":  # float32 reference on upcast inputs
            qq, kk, vv = (x.detach().float().requires_grad_() for x in (q, k, v))
        out, lse = sparse_attention(
            qq, kk, vv, pattern, cu_seqlens=cu_seqlens, seqlens=seqlens, return_lse=True, backend=backend
        )
        ((out.float() * dout.float()).sum() + lse_weight * lse.sum()).backward()
        results.append([out, lse, qq.grad, kk.grad, vv.grad])
    return results


def check(q, k, v, pattern, tol, **kw):
    tri, ref = run_both(q, k, v, pattern, **kw)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), tri, ref, strict=True):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        assert relerr(a, b) < tol, (name, relerr(a, b))
    assert tri[0].dtype == q.dtype and tri[2].dtype == q.dtype


def rand(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
# GQA groups of 1, 2 and 3 (3: query rows that are not whole positions of a tile); groups of 4 run on the GPU
# (tests/test_gpu_kernels.py), where they cost nothing, not under the interpreter, where they cost a minute of CI
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (6, 2)])
def test_batched_matches_reference_float32(pattern, heads, kv_heads):
    if isinstance(pattern, BlockLayout) and pattern.layout.shape[0] not in (1, kv_heads):
        pytest.skip("layout head count")
    T = 61 if pattern.natural_block_size <= 16 else 77  # not a multiple of the block size
    q = rand((2, T, heads, 16), torch.float32, 0)
    k = rand((2, T, kv_heads, 16), torch.float32, 1)
    v = rand((2, T, kv_heads, 16), torch.float32, 2)
    check(q, k, v, pattern, tol=1e-5)


@pytest.mark.parametrize("pattern", [Full(), SinkWindow(3, 17), BlockSparse(16, 1, None, 0)], ids=repr)
def test_float16_and_head_dim_32(pattern):
    q = rand((1, 50, 6, 32), torch.float16, 3)
    k = rand((1, 50, 3, 32), torch.float16, 4)
    v = rand((1, 50, 3, 32), torch.float16, 5)
    check(q, k, v, pattern, tol=5e-3)


RAGGED = [17, 1, 0, 64, 30]
# every length a whole number of tiles (16 under the interpreter): the kernels' EVEN path, whose loads skip the
# length tests; the last sequence is shorter than the longest, so a tile index built for the longest must not send
# the dK/dV kernel past the end of the tensor
WHOLE_TILES = [32, 0, 64, 16]
VARLEN_CASES = [
    *((p, RAGGED) for p in (Full(), SinkWindow(4, 9), BlockSparse(16, 1, 2), BlockLayout(LAYOUT[None], 16))),
    *((p, WHOLE_TILES) for p in PATTERNS),
]


@pytest.mark.parametrize("pattern,lens", VARLEN_CASES, ids=lambda x: repr(x)[:48])
def test_varlen_packed_sequences(pattern, lens):
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    total = int(cu[-1])
    q = rand((total, 4, 16), torch.float32, 6)
    k = rand((total, 2, 16), torch.float32, 7)
    v = rand((total, 2, 16), torch.float32, 8)
    check(q, k, v, pattern, tol=1e-5, cu_seqlens=cu)


@pytest.mark.parametrize("lens", [WHOLE_TILES, RAGGED], ids=["whole_tiles", "ragged"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_nothing_read_past_the_inputs(pattern, lens):
    """q, k, v and the output gradient end right before NaN rows: a kernel that loads a tile past the last sequence
    (e.g. a BlockLayout index built for the longest sequence, followed without a length test) gets NaN."""
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    total = int(cu[-1])

    def poisoned_tail(x):  # a view of the first rows of a buffer whose remaining rows are NaN
        buf = torch.full((total + 64, *x.shape[1:]), float("nan"))
        buf[:total] = x
        return buf[:total]

    q, k, v = (poisoned_tail(rand((total, h, 16), torch.float32, 20 + h)) for h in (4, 2, 2))
    for x in (q, k, v):
        x.requires_grad_()
    dout = poisoned_tail(rand((total, 4, 16), torch.float32, 30))
    out = sparse_attention(q, k, v, pattern, cu_seqlens=cu, backend="triton")
    out.backward(dout)
    ref_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*ref_in, pattern, cu_seqlens=cu)
    ref.backward(dout.clone())
    for a, b in zip((out, q.grad, k.grad, v.grad), (ref, *(x.grad for x in ref_in)), strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "pattern", [Full(), SinkWindow(4, 9), BlockSparse(16, 1, 2), BlockLayout(LAYOUT[None], 16)], ids=repr
)
def test_padded_batch(pattern):
    q = rand((3, 50, 4, 16), torch.float32, 13)
    k = rand((3, 50, 2, 16), torch.float32, 14)
    v = rand((3, 50, 2, 16), torch.float32, 15)
    lens = torch.tensor([50, 23, 0], dtype=torch.int32)
    tri, ref = run_both(q, k, v, pattern, seqlens=lens, lse_weight=0.0)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), tri, ref, strict=True):
        assert torch.equal(a.isinf(), b.isinf()), name  # -inf lse exactly on the padding
        fin = ~b.isinf()
        assert relerr(a[fin], b[fin]) < 1e-5, name
    assert (tri[0][1, 23:] == 0).all() and (tri[2][1, 23:] == 0).all() and (tri[3][2] == 0).all()


def test_non_contiguous_inputs():
    qkv = rand((1, 40, 2, 3, 16), torch.float32, 9)  # q, k, v as views of one fused projection
    q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    assert not q.is_contiguous()
    check(q, k, v, SinkWindow(2, 11), tol=1e-5)


def test_custom_scale_and_no_lse():
    q, k, v = (rand((1, 33, 2, 16), torch.float32, s) for s in (10, 11, 12))
    a = sparse_attention(q, k, v, BlockSparse(16, 1, 2), scale=0.7, backend="triton")
    b = reference_attention(q, k, v, BlockSparse(16, 1, 2), scale=0.7)
    assert relerr(a, b) < 1e-5


@pytest.mark.parametrize("used", ["out", "lse"])
def test_gradient_through_one_output(used):
    """Only the output or only the lse reaches the loss: the other gets no gradient tensor at all."""
    q, k, v = (rand((1, 37, 4, 16), torch.float32, s) for s in (13, 14, 15))
    grads = []
    for backend in ("triton", "reference"):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out, lse = sparse_attention(qq, kk, vv, SinkWindow(3, 9), return_lse=True, backend=backend)
        (out.sin().sum() if used == "out" else lse.cos().sum()).backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads, strict=True):
        b = torch.zeros_like(a) if b is None else b  # the lse does not depend on v
        assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item())


def test_unsupported_inputs_are_clear_errors():
    q = rand((1, 16, 2, 24), torch.float32, 0)
    with pytest.raises(ValueError, match="head_dim"):
        sparse_attention(q, q, q, Full(), backend="triton")
    q = rand((1, 16, 2, 16), torch.float64, 0)
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        sparse_attention(q, q, q, Full(), backend="triton")
    # auto never picks Triton for CPU tensors: float64 runs on the reference
    out = sparse_attention(q, q, q, Full())
    assert out.dtype == torch.float64


def test_hopper_forward_module_imports_and_declines_cpu_calls():
    """The Gluon module imports with this Triton (the CI one), and only CUDA capability 9.0 calls reach it."""
    from longgen.kernels import dispatch, gluon_attention  # noqa: F401

    q = torch.randn(1, 256, 2, 64)
    assert dispatch.full_layer_backend(q, q, q) == "sdpa"


@pytest.mark.parametrize(
    "flag,parts",
    [
        (None, {"fwd", "dkdv", "dq"}),
        ("1", {"fwd", "dkdv", "dq"}),
        ("0", set()),
        ("fwd", {"fwd"}),
        ("fwd,dkdv", {"fwd", "dkdv"}),
        ("dq,dkdv", {"dq", "dkdv"}),
    ],
)
def test_hopper_kernels_switch(flag, parts, monkeypatch):
    """LONGGEN_GLUON: unset or 1 = all three Hopper kernels, 0 = none, else the comma-separated subset."""
    from longgen.kernels import dispatch

    if flag is None:
        monkeypatch.delenv("LONGGEN_GLUON", raising=False)
    else:
        monkeypatch.setenv("LONGGEN_GLUON", flag)
    assert dispatch.gluon_parts() == parts


def test_launch_rules():
    """The measured launch rules: the dK/dV kernel descends for Full without GQA and BlockSparse with GQA, and
    launches a head's pairs together for Full and BlockSparse with GQA; the forward runs persistent for the sparse
    patterns."""
    from longgen.kernels import gluon_attention as ga
    from longgen.kernels.plan import K_BLOCK_SPARSE, K_FULL, K_SINK_WINDOW

    sparse = (K_SINK_WINDOW, K_BLOCK_SPARSE)
    assert [ga.dkdv_descends(g, K_FULL) for g in (1, 2, 4)] == [True, False, False]
    assert [ga.dkdv_descends(g, K_BLOCK_SPARSE) for g in (1, 2, 4)] == [False, True, True]
    assert not any(ga.dkdv_descends(g, K_SINK_WINDOW) for g in (1, 4))
    assert all(ga.dkdv_pairs_first(g, K_FULL) for g in (1, 4))
    assert [ga.dkdv_pairs_first(g, K_BLOCK_SPARSE) for g in (1, 2, 4)] == [False, True, True]
    assert not any(ga.dkdv_pairs_first(g, K_SINK_WINDOW) for g in (1, 4))
    assert not ga.fwd_persistent(K_FULL) and all(ga.fwd_persistent(kind) for kind in sparse)


def test_persistent_forward_takes_at_most_one_program_per_sm(monkeypatch):
    """A persistent forward has min(work items, SMs or Tuning.persistent_programs) programs; otherwise one per
    item; the tuning refuses negative counts."""
    from longgen.kernels import gluon_attention as ga
    from longgen.kernels.plan import K_BLOCK_SPARSE, K_FULL, K_SINK_WINDOW, Tuning

    monkeypatch.setattr(ga, "_sm_count", lambda device_index: 132)
    dev, tuning = torch.device("cuda", 0), Tuning()
    assert ga._fwd_programs(K_FULL, 4096, dev, tuning) == 4096
    assert ga._fwd_programs(K_SINK_WINDOW, 4096, dev, tuning) == ga._fwd_programs(K_BLOCK_SPARSE, 4096, dev, tuning)
    assert ga._fwd_programs(K_SINK_WINDOW, 4096, dev, tuning) == 132
    assert ga._fwd_programs(K_SINK_WINDOW, 100, dev, tuning) == 100
    assert ga._fwd_programs(K_SINK_WINDOW, 4096, dev, Tuning(persistent_programs=3)) == 3
    with pytest.raises(ValueError, match="persistent_programs must be an integer >= 0"):
        Tuning(persistent_programs=-1)
    with pytest.raises(ValueError, match="bwd_stages must be an integer >= 1"):
        Tuning(bwd_stages=0)


def test_dkdv_launch_leads_with_every_heads_long_pairs():
    """Launched pairs first, the dK/dV programs start with the long pairs of every head (heads innermost): SinkWindow's
    sink tiles, BlockSparse's strided tiles (as many as the head with the most has); Full has none. With the heads
    innermost throughout, every pair index leads."""
    from longgen.kernels import gluon_attention as ga
    from longgen.kernels.plan import K_BLOCK_SPARSE, K_FULL, K_SINK_WINDOW, PatternParams

    def sink_window(sink):
        return PatternParams(K_SINK_WINDOW, sink=sink)

    def block_sparse(pb, stride):
        return PatternParams(K_BLOCK_SPARSE, block=pb, stride=stride)

    n_tiles = 131072 // ga.BWD_TILE
    strided = block_sparse(64, 8)  # 256 strided tiles
    assert ga.dkdv_lead_pairs(4, strided, n_tiles, 1100) == 128  # by the rule: pairs first
    assert ga.dkdv_lead_pairs(1, strided, n_tiles, 1100) == 1100  # heads innermost
    assert ga.dkdv_lead_pairs(1, PatternParams(K_FULL), n_tiles, 1100) == 0  # pairs first, no long pairs
    assert ga.dkdv_lead_pairs(4, sink_window(64), n_tiles, 1100) == 1100  # SinkWindow: heads innermost
    cases = [
        (PatternParams(K_FULL), 0),
        (sink_window(64), 1),  # one sink tile: pair (0, 1)
        (sink_window(200), 2),  # four sink tiles
        (sink_window(0), 0),
        (block_sparse(64, 32), 32),  # 2048 blocks, every 32nd strided: 64 tiles
        (block_sparse(128, 8), 128),  # 1024 blocks of 2 tiles, 128 strided
        (block_sparse(64, 1), 0),  # every block strided: Full-like
    ]
    for pat, lead in cases:
        assert ga._long_pairs(pat, n_tiles) == lead, pat
    assert ga.dkdv_lead_pairs(4, block_sparse(64, 32), 64, 10) == 1  # 64 blocks: 2 strided tiles
    assert ga.dkdv_lead_pairs(4, block_sparse(64, 8), n_tiles, 100) == 100  # never more than there are


def test_hopper_tiles_clamp_to_blocksparse_blocks():
    """The dQ kernel's key tile: 64 keys in 4 stages, never wider than a BlockSparse block. The forward's: 128 keys
    in 3 stages, 64 in 4 for BlockSparse with 64-blocks (a tile must not straddle two blocks); a tuning's stages
    override."""
    from longgen.kernels import gluon_attention as ga
    from longgen.kernels.plan import K_BLOCK_SPARSE, K_FULL, K_SINK_WINDOW

    assert {ga.dq_tiles(kind, 64) for kind in (K_FULL, K_SINK_WINDOW, K_BLOCK_SPARSE)} == {(64, 4)}
    assert ga.dq_tiles(K_BLOCK_SPARSE, 256) == (64, 4)
    assert ga.forward_tiles(K_FULL, 1) == ga.forward_tiles(K_SINK_WINDOW, 1) == (128, 3)
    assert ga.forward_tiles(K_BLOCK_SPARSE, 64) == (64, 4) and ga.forward_tiles(K_BLOCK_SPARSE, 256) == (128, 3)
    assert ga.forward_tiles(K_FULL, 1, stages=6) == (128, 6)


@pytest.mark.parametrize("flag", ["off", "all", "fwd,", "fwd,fwd", "dk"])
def test_hopper_kernels_switch_rejects_unknown_values(flag, monkeypatch):
    from longgen.kernels import dispatch

    monkeypatch.setenv("LONGGEN_GLUON", flag)
    with pytest.raises(ValueError, match=rf"LONGGEN_GLUON must be 1 .* subset of fwd,dkdv,dq, got '{flag}'"):
        dispatch.gluon_parts()


def _sm90_compile_script(*args: str, script: str = "gluon_resources.py") -> subprocess.CompletedProcess:
    """A benchmarks/ script that compiles Gluon kernels for sm_90a (default gluon_resources.py), in a process of
    its own (Triton's interpreter mode, which these tests set, cannot compile Gluon); skips where Triton has no
    bundled ptxas for sm_90."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, str(root / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if run.returncode != 0 and "ptxas" in run.stderr:
        pytest.skip(f"no ptxas for sm_90: {run.stderr[-300:]}")
    return run


def test_hopper_kernels_compile_for_sm90_without_serialised_wgmma():
    """The Gluon kernels compile for sm_90a on this (GPU-less) machine, and ptxas keeps their wgmma chains
    asynchronous: a register budget overrun, or a register operand carried around a loop, serialises them (every
    HGMMA waited for), as the first dK/dV version did."""
    args = ["--kernels", "fwd", "dq", "dkdv", "--patterns", "block_sparse", "--head-dims", "128", "--groups", "4"]
    run = _sm90_compile_script(*args, "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [r["kernel"] for r in rows] == ["fwd", "dq", "dkdv"]
    for r in rows:
        assert not r["serialised"], r
        assert r["hgmma"] > 0 and r["waits"] < r["hgmma"], r
        assert r["shared_kb"] <= 227, r  # the H100/H200 per-block limit


@pytest.mark.slow
def test_gluon_resources_applies_tuning_constants_and_rejects_unknown_ones():
    """`--set` (a launch tuning, as tune_attention.py --knobs takes it) changes what is compiled: one Q / dO stage
    fewer is 2 x 16 KiB (plus its LSE and delta rows) less shared memory at head dim 128; a misspelt name is an
    error, not a silent default run."""
    args = ["--kernels", "dkdv", "--patterns", "full", "--head-dims", "128", "--groups", "1", "--json"]
    kb = []
    for knobs in ("", "bwd_stages=2"):
        run = _sm90_compile_script(*args, "--set", knobs)
        assert run.returncode == 0, run.stderr[-3000:]
        kb.append(json.loads(run.stdout.splitlines()[-1])["shared_kb"])
    assert kb[0] - kb[1] == pytest.approx(32.5, abs=0.5)
    bad = _sm90_compile_script(*args, "--set", "bwd_stags=2")
    assert bad.returncode == 2 and "bad knob 'bwd_stags=2'" in bad.stderr


def test_host_gaps_splits_a_timeline_into_calls(monkeypatch):
    """benchmarks/host_gaps.py's timeline summary: calls start at the forward kernel, idle time inside and between
    calls and after each kernel, kernels before the first call left out."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from host_gaps import call_gaps

    ev = [(0, 5, "fill")]  # before the first call
    for t0 in (10, 60):  # two calls of 30 us kernels with a 2 us and a 3 us gap, 20 us apart
        ev += [(t0, t0 + 10, "_fwd_ws_kernel"), (t0 + 12, t0 + 22, "_dq_ws_kernel"), (t0 + 25, t0 + 35, "_dkdv")]
    got = call_gaps(ev)
    assert got["calls_profiled"] == 2 and got["kernels_per_call"] == 3
    assert got["kernels_ms"] == pytest.approx(0.030) and got["span_ms"] == pytest.approx(0.035)
    assert got["idle_ms"] == pytest.approx(0.005) and got["between_ms"] == pytest.approx(0.015)
    assert got["gaps_after_ms"] == pytest.approx({"_fwd_ws_kernel": 0.002, "_dq_ws_kernel": 0.003})
    with pytest.raises(ValueError, match="no kernel named like 'fwd'"):
        call_gaps([(0, 1, "fill")])


def test_tune_attention_cases_take_pattern_parameters(monkeypatch):
    """benchmarks/tune_attention.py cases: the benchmark's patterns by default, their parameters after a slash,
    and a clear error for anything else."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from tune_attention import parse_case

    assert parse_case("full:32768:32") == (Full(), 32768, 32)
    assert parse_case("sink_window:131072:8") == (SinkWindow(64, 2048), 131072, 8)
    assert parse_case("sink_window/0,8192:4096:4") == (SinkWindow(0, 8192), 4096, 4)
    assert parse_case("block_sparse:8192:8") == (BlockSparse(64, 16, 8), 8192, 8)
    assert parse_case("block_sparse/128,4,3:8192:8") == (BlockSparse(128, 4, 3), 8192, 8)
    for bad in ("sink_window:131072", "window:1024:8", "full:1k:8", "sink_window/64:1024:8", "block_sparse/4,4:64:8"):
        with pytest.raises(ValueError, match="bad case"):
            parse_case(bad)


def test_tuning_tiles_reach_the_kernels():
    """`Tuning.tiles` (what benchmarks/tune_attention.py passes) replaces the tile table for every kernel, and the
    results stay the reference's."""
    from longgen.kernels.inputs import check_attention_args
    from longgen.kernels.plan import Plan, Tiles, Tuning, seq_tensors
    from longgen.kernels.triton_attention import triton_attention

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 96, h, 16, generator=g) for h in (4, 2, 2))
    pattern = SinkWindow(5, 40)
    tiles = {"fwd": Tiles(32, 16, 1, 1), "dq": Tiles(32, 16, 1, 1), "dkdv": Tiles(16, 32, 1, 1)}
    shape = check_attention_args(q, k, v, pattern, None, None, None, 0, None)
    plan = Plan(shape, *seq_tensors(shape, None, 96, "cpu"), q.dtype, tuning=Tuning(tiles=tiles))
    assert plan.tiles == tiles
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = triton_attention(*xs, shape, None, False, Tuning(tiles=tiles))
    out.sum().backward()
    ys = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*ys, pattern)
    ref.sum().backward()
    assert relerr(out, ref) < 1e-5
    for a, b in zip(xs, ys, strict=True):
        assert relerr(a.grad, b.grad) < 1e-5
