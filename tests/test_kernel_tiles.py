"""The tiles the kernels visit are the pattern's: for many shapes, the key tiles each query tile visits (forward,
dQ) and the query tiles each key tile visits (dK/dV), of both kernel families, equal `Pattern.block_mask`, and the
tiles they leave unmasked need no mask.

The range helpers are the kernels' own jit functions, run here as plain Python on integers with Triton's integer
semantics (division and remainder truncate toward zero), not copies of them."""

import types

import pytest
import torch

from longgen import BlockLayout, BlockSparse, Full, SinkWindow
from longgen.kernels import gluon_attention as ga
from longgen.kernels import plan as kplan
from longgen.kernels import triton_attention as ta


class CInt(int):
    """An int with C (Triton) division and remainder."""

    def _wrap(f):
        return lambda a, b: CInt(f(int(a), int(b)))

    __add__ = __radd__ = _wrap(lambda a, b: a + b)
    __sub__ = _wrap(lambda a, b: a - b)
    __rsub__ = _wrap(lambda a, b: b - a)
    __mul__ = __rmul__ = _wrap(lambda a, b: a * b)
    __floordiv__ = _wrap(lambda a, b: abs(a) // abs(b) * (1 if (a >= 0) == (b > 0) else -1))
    __rfloordiv__ = _wrap(lambda a, b: abs(b) // abs(a) * (1 if (b >= 0) == (a > 0) else -1))
    __mod__ = _wrap(lambda a, b: a - CInt(a).__floordiv__(b) * b)
    __rmod__ = _wrap(lambda a, b: b - CInt(b).__floordiv__(a) * a)

    def __neg__(self):
        return CInt(-int(self))


def _lang(real):
    shim = types.SimpleNamespace(
        where=lambda c, a, b: CInt(a) if c else CInt(b),
        minimum=lambda a, b: CInt(min(a, b)),
        maximum=lambda a, b: CInt(max(a, b)),
    )
    return types.SimpleNamespace(**{**{k: getattr(real, k) for k in ("constexpr",)}, **vars(shim)})


def _python(module):
    """Namespace of `module`'s jit functions as plain Python functions (constexpr globals unwrapped)."""
    ns = {}
    for name, value in vars(module).items():
        if isinstance(value, (ta.tl.constexpr, ga.gl.constexpr)):
            value = value.value
        ns[name] = value
    ns["tl"] = _lang(ta.tl)
    ns["gl"] = _lang(ga.gl)
    for name, value in list(ns.items()):
        fn = getattr(value, "fn", None)
        if isinstance(fn, types.FunctionType):
            ns[name] = types.FunctionType(fn.__code__, ns, name, fn.__defaults__)
    return types.SimpleNamespace(**ns)


TRITON = _python(ta)
GLUON = _python(ga)
PATTERNS = [
    Full(),
    SinkWindow(5, 20),
    SinkWindow(0, 1),
    SinkWindow(40, 3),
    SinkWindow(16, 32),
    SinkWindow(64, 48),
    BlockSparse(16, 2, None),
    BlockSparse(16, 1, 3, 1),
    BlockSparse(32, 1, 2),
    BlockSparse(32, 3, 4),
    BlockSparse(64, 2, 8, 2),
    BlockSparse(16, 4, 1),
]
SHAPES = [(hkv, L) for hkv in (1, 2, 4) for L in (16, 100, 256, 333)]


def _cases():
    for p in PATTERNS:
        for hkv, L in SHAPES:
            if isinstance(p, BlockSparse) and p.dense_kv_heads > hkv:
                continue
            yield p, hkv, L


CASES = list(_cases())


def _pat(p, hkv):
    return kplan.PatternParams.of(p.resolve(hkv), hkv)


def _full_tiles(p, hkv, L, q_tile, k_tile):
    """Bool (hkv, query tiles, key tiles): every pair of a query in the sequence with a key of the tile is allowed
    and the keys lie in the sequence (the tiles a kernel may leave unmasked)."""
    n = -(-L // min(q_tile, k_tile)) * max(q_tile, k_tile)
    m = torch.zeros(hkv, n, n, dtype=torch.bool)
    m[:, :L, :L] = p.mask(L, hkv)
    m[:, L:, :L] = True  # rows past the end are never stored
    return m.view(hkv, n // q_tile, q_tile, n // k_tile, k_tile).all(dim=4).all(dim=2)


def _tile_masks(p, hkv, L, tile):
    return p.block_mask(L, hkv, tile), _full_tiles(p, hkv, L, tile, tile)


@pytest.mark.parametrize("G,BM,BN", [(1, 16, 16), (2, 32, 16), (4, 64, 16), (1, 32, 32), (2, 64, 32)])
@pytest.mark.parametrize("p,hkv,L", CASES, ids=lambda x: repr(x)[:30])
def test_triton_forward_and_dq_visit_the_block_mask(p, hkv, L, G, BM, BN):
    """`_key_ranges` / `_far_tile` (forward and dQ kernels): far tiles, then [lo, hi) with [a, b) unmasked."""
    if isinstance(p, BlockSparse) and p.block_size < BN:
        pytest.skip("key tiles never straddle pattern blocks (the plan clamps BLOCK_N)")
    pat = _pat(p, hkv)
    want, full = _tile_masks(p, hkv, L, BN)
    for g in range(hkv):
        for m in range(-(-L * G // BM)):
            row0 = m * BM
            qs, qe = CInt(row0 // G), CInt(min((row0 + BM - 1) // G + 1, L))
            n_far, lo, a, b, hi = TRITON._key_ranges(CInt(g), qs, qe, tuple(pat), BN)
            far = [int(TRITON._far_tile(CInt(u), CInt(g), tuple(pat), BN)) for u in range(n_far)]
            visited = far + list(range(lo, hi))
            assert len(set(visited)) == len(visited), (g, m, visited)
            assert sorted(visited) == torch.nonzero(want[g, m]).flatten().tolist(), (g, m)
            unmasked = list(range(a, b)) + (far if pat.kind == kplan.K_BLOCK_SPARSE else [])
            assert all(full[g, m, kt] for kt in unmasked), (g, m, unmasked)


@pytest.mark.parametrize("G,BM,BN", [(1, 16, 16), (2, 32, 16), (4, 64, 16), (1, 32, 32)])
@pytest.mark.parametrize("p,hkv,L", CASES, ids=lambda x: repr(x)[:30])
def test_triton_dkdv_visits_the_block_mask(p, hkv, L, G, BM, BN):
    """`_key_tile_order` is a bijection onto the key tiles; `_query_ranges`: [m_lo, m_hi) with [d, e) unmasked."""
    if isinstance(p, BlockSparse) and p.block_size < BN:
        pytest.skip("key tiles never straddle pattern blocks")
    pat = _pat(p, hkv)
    want, full = _tile_masks(p, hkv, L, BN)
    n_tiles = -(-L // BN)
    n_blocks = -(-L // pat.block)
    n_launch = n_blocks * (pat.block // BN) if pat.kind == kplan.K_BLOCK_SPARSE else n_tiles
    for g in range(hkv):
        order = [
            int(TRITON._key_tile_order(CInt(pid), CInt(g), CInt(n_blocks), tuple(pat), BN)) for pid in range(n_launch)
        ]
        assert sorted(t for t in order if t < n_tiles) == list(range(n_tiles))
        for kt in range(n_tiles):
            ks = CInt(kt * BN)
            m_lo, d, e, m_hi = TRITON._query_ranges(ks, ks + BN, CInt(g), CInt(L), tuple(pat), G, BM)
            assert list(range(m_lo, m_hi)) == torch.nonzero(want[g, :, kt]).flatten().tolist(), (g, kt)
            assert all(full[g, m, kt] for m in range(d, e)), (g, kt)


@pytest.mark.parametrize("G,BM,BN", [(1, 16, 16), (2, 32, 16), (4, 64, 16)])
@pytest.mark.parametrize("hkv,L", SHAPES)
def test_triton_layout_index_is_the_block_mask(hkv, L, G, BM, BN):
    """BlockLayout: the host-built tile index (`plan.layout_index`) lists exactly the block mask's tiles, both ways."""
    gen = torch.Generator().manual_seed(hkv * 1000 + L)
    n = -(-L // 16)
    lay = (torch.rand(hkv, n, n, generator=gen) < 0.4).tril() | torch.eye(n, dtype=torch.bool)
    p = BlockLayout(lay, 16)
    want, _ = _tile_masks(p, hkv, L, BN)
    tiles = kplan.Tiles(BM, BN, 1, 1)
    for transpose in (False, True):
        idx, cnt = kplan.layout_index(p, hkv, L, G, tiles, "cpu", transpose=transpose)
        width = idx.shape[-1]
        n_rows = -(-L * G // BM)
        n_k = -(-L // BN)
        for g in range(hkv):
            for r in range(n_k if transpose else n_rows):
                row = g * (n_k if transpose else n_rows) + r
                got = sorted(idx.reshape(-1, width)[row, : cnt[row]].tolist())
                mask = want[g, :, r] if transpose else want[g, r]
                assert got == torch.nonzero(mask).flatten().tolist(), (transpose, g, r)


def test_a_layout_plan_reuses_the_device_tensors_of_the_same_layout_and_shape():
    """A BlockLayout call's layout and tile indices are built once per layout and shape, not at every call (a
    training step would rebuild them on the host for every sparse layer): an equal layout in another object reuses
    them, another layout or length gets its own, and each is `layout_index`'s."""
    from longgen.kernels.inputs import AttentionShape

    def plan(p, L):
        shape = AttentionShape(p, 4, 2, 64, 0.125, varlen=False, padded=False, seq_lens=(L, L))
        starts, lens = torch.tensor([0, L], dtype=torch.int32), torch.full((2,), L, dtype=torch.int32)
        return kplan.Plan(shape, starts, lens, torch.bfloat16)

    gen = torch.Generator().manual_seed(7)
    lay = (torch.rand(2, 8, 8, generator=gen) < 0.4).tril() | torch.eye(8, dtype=torch.bool)
    first = plan(BlockLayout(lay, 16), 128)
    again = plan(BlockLayout(lay.clone(), 16), 128)
    assert again.layout is first.layout and all(again.index[k] is first.index[k] for k in ("fwd", "dq", "dkdv"))
    other = lay.clone()
    other[:, 7, 0] = ~other[:, 7, 0]
    for p, L in ((BlockLayout(other, 16), 128), (BlockLayout(lay, 16), 96)):
        mine = plan(p, L)
        assert mine.index["fwd"][0] is not first.index["fwd"][0]
        for name, t in mine.tiles.items():
            want = kplan.layout_index(p, 2, L, 2, t, "cpu", transpose=name == "dkdv")
            assert all(torch.equal(a, b) for a, b in zip(mine.index[name], want, strict=True))
        assert torch.equal(mine.layout, p.layout.to(torch.int8))


@pytest.mark.parametrize("MR,BN", [(32, 32), (32, 16), (64, 32)])
@pytest.mark.parametrize("p,hkv,L", [c for c in CASES if not isinstance(c[0], BlockLayout)], ids=lambda x: repr(x)[:30])
def test_gluon_forward_and_dq_visit_the_block_mask(p, hkv, L, MR, BN):
    """`_visit_plan` / `_tile_of` (Hopper forward and dQ, query tiles of MR positions of one head) and
    `_needs_mask`: the visited key tiles are the block mask's; a tile left unmasked has every pair allowed."""
    if isinstance(p, BlockSparse) and p.block_size < BN:
        pytest.skip("key tiles never straddle pattern blocks")
    L = -(-L // MR) * MR  # whole query tiles (the kernels' scope)
    pat = _pat(p, hkv)
    want, _ = _tile_masks(p, hkv, L, BN)
    half_full = _full_tiles(p, hkv, L, MR // 2, BN)
    r = MR // BN
    for g in range(hkv):
        for m in range(L // MR):
            m0 = CInt(m * MR)
            n_far, lo, n_visit = GLUON._visit_plan(CInt(g), m0, MR, tuple(pat), BN)
            visited = [int(GLUON._tile_of(CInt(i), CInt(g), n_far, lo, tuple(pat), BN)) for i in range(n_visit)]
            assert len(set(visited)) == len(visited)
            assert sorted(visited) == torch.nonzero(want[g, m * r : (m + 1) * r].any(0)).flatten().tolist(), (g, m)
            for i, kt in enumerate(visited):
                for half in range(2):  # each consumer warpgroup: MR / 2 rows
                    mc = CInt(m * MR + half * MR // 2)
                    masked = GLUON._needs_mask(i < n_far, CInt(kt * BN), CInt(g), mc, MR // 2, tuple(pat), BN)
                    if not masked:
                        assert half_full[g, 2 * m + half, kt], (g, m, kt, half)


@pytest.mark.parametrize("TL", [16, 32])
@pytest.mark.parametrize("p,hkv,L", [c for c in CASES if not isinstance(c[0], BlockLayout)], ids=lambda x: repr(x)[:30])
def test_gluon_dkdv_visits_the_block_mask(p, hkv, L, TL):
    """`_key_tile_pair` covers every key tile once; `_query_range` is the block mask's column."""
    if isinstance(p, BlockSparse) and p.block_size < TL:
        pytest.skip("key tiles never straddle pattern blocks")
    L = -(-L // TL) * TL
    pat = _pat(p, hkv)
    want, _ = _tile_masks(p, hkv, L, TL)
    n_tiles = L // TL
    by_kind = pat.kind == kplan.K_BLOCK_SPARSE and pat.stride > 1
    n_pairs = (n_tiles + 1) // 2 + (pat.block // TL if by_kind else 0)
    for g in range(hkv):
        seen = []
        for lid in range(n_pairs):
            a, b = GLUON._key_tile_pair(CInt(lid), CInt(g), CInt(n_tiles), tuple(pat), by_kind, TL)
            seen += [int(t) for t in (a, b) if t < n_tiles]
        assert sorted(seen) == list(range(n_tiles)), g
        for kt in range(n_tiles):
            lo, hi, _ = GLUON._query_range(CInt(kt), CInt(g), CInt(n_tiles), tuple(pat), TL)
            assert list(range(lo, hi)) == torch.nonzero(want[g, :, kt]).flatten().tolist(), (g, kt)
