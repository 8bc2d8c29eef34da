"""Patterns: masks equal the SPEC formulas; block iteration, retention and serialisation agree with masks."""

import json
import math
import random

import pytest
import torch

from longgen import BlockLayout, BlockSparse, Full, Pattern, SinkWindow, pattern_from_dict


# ---- brute-force SPEC formulas (written out independently of the implementation) ----
def spec_full(t, s, g, hkv):
    return s <= t


def spec_sink_window(sink, window):
    return lambda t, s, g, hkv: s <= t and (s < sink or t - s < window)


def spec_block_sparse(B, local, stride, dense):
    def f(t, s, g, hkv):
        st = stride if stride is not None else min(hkv, 64)
        step = max(1, st // hkv)
        i, j = t // B, s // B
        if s > t:
            return False
        if g >= hkv - dense:
            return True
        return i - j < local or (j + g * step) % st == 0

    return f


def brute_mask(formula, T, hkv):
    return torch.tensor(
        [[[formula(t, s, g, hkv) for s in range(T)] for t in range(T)] for g in range(hkv)], dtype=torch.bool
    )


def random_cases(n, seed=0):
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        hkv = rng.choice([1, 2, 3, 4, 8])
        T = rng.randint(1, 150)
        kind = rng.choice(["full", "sw", "bs"])
        if kind == "full":
            cases.append((Full(), spec_full, T, hkv))
        elif kind == "sw":
            sink, window = rng.randint(0, 20), rng.randint(1, 60)
            cases.append((SinkWindow(sink, window), spec_sink_window(sink, window), T, hkv))
        else:
            B = rng.choice([16, 32])
            local = rng.randint(1, 4)
            stride = rng.choice([None, 1, 2, 3, 5, 8])
            dense = rng.randint(0, hkv)
            cases.append((BlockSparse(B, local, stride, dense), spec_block_sparse(B, local, stride, dense), T, hkv))
    return cases


CASES = random_cases(60)


@pytest.mark.parametrize("pattern,formula,T,hkv", CASES, ids=[f"{c[0]}-T{c[2]}-h{c[3]}" for c in CASES])
def test_mask_equals_spec_formula(pattern, formula, T, hkv):
    assert torch.equal(pattern.mask(T, hkv), brute_mask(formula, T, hkv))


def random_layout(hkv, n, rng, efficient):
    lay = torch.zeros(hkv, n, n, dtype=torch.bool)
    for g in range(hkv):
        for j in range(n):
            # each column is a run starting on the diagonal (efficient); optionally re-opened later
            run = rng.randint(1, n - j)
            lay[g, j : j + run, j] = True
            if not efficient and j + run + 1 < n and rng.random() < 0.5:
                lay[g, j + run + 1 :, j] = True
    return lay


def test_block_layout_mask_equals_layout_lookup():
    rng = random.Random(1)
    for _ in range(10):
        hkv, n, B = rng.choice([1, 2, 4]), rng.randint(1, 6), rng.choice([16, 32])
        lay = random_layout(hkv, n, rng, efficient=rng.random() < 0.5)
        T = rng.randint(1, n * B)
        expected = brute_mask(lambda t, s, g, h, lay=lay, B=B: s <= t and bool(lay[g, t // B, s // B]), T, hkv)
        assert torch.equal(BlockLayout(lay, B).mask(T, hkv), expected)
    # a one-head layout applies to every KV head
    lay = random_layout(1, 3, rng, True)
    m = BlockLayout(lay, 16).mask(48, 4)
    assert all(torch.equal(m[0], m[g]) for g in range(4))


def tile_reduce(mask, B):
    """Brute force: a tile pair is visited iff it contains an allowed (t, s)."""
    hkv, T, _ = mask.shape
    n = math.ceil(T / B)
    out = torch.zeros(hkv, n, n, dtype=torch.bool)
    for a in range(n):
        for b in range(n):
            out[:, a, b] = mask[:, a * B : (a + 1) * B, b * B : (b + 1) * B].flatten(1).any(dim=1)
    return out


@pytest.mark.parametrize("tile", [None, 16, 32, 64])
def test_block_mask_and_key_blocks_agree_with_mask(tile):
    for pattern, _, T, hkv in CASES[:30]:
        m = pattern.mask(T, hkv)
        B = tile or pattern.natural_block_size
        bm = pattern.block_mask(T, hkv, tile)
        assert torch.equal(bm, tile_reduce(m, B)), pattern
        kb = pattern.key_blocks(T, hkv, tile)
        assert kb == [[torch.nonzero(r).flatten().tolist() for r in head] for head in tile_reduce(m, B)]
    rng = random.Random(2)
    lay = random_layout(2, 5, rng, efficient=False)
    p = BlockLayout(lay, 32)
    for T in (1, 40, 100, 160):
        assert torch.equal(p.block_mask(T, 2, tile), tile_reduce(p.mask(T, 2), tile or 32))


def retention_from_mask(pattern, T, hkv, horizon):
    """Positions s < T that a query at position >= T - 1 (up to `horizon`) may attend."""
    m = pattern.mask(horizon, hkv)
    return [torch.nonzero(m[g, T - 1 :, :T].any(dim=0)).flatten() for g in range(hkv)]


def test_retention_and_kept_tokens_agree_with_mask():
    for pattern, _, T, hkv in CASES:
        horizon = T + 64 * 8 + 16  # past the local window and a whole stride period of blocks
        expected = retention_from_mask(pattern, T, hkv, horizon)
        got = pattern.kv_retention(T, hkv)
        assert len(got) == hkv
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b), (pattern, T, hkv)
        assert pattern.kept_tokens(T, hkv) == [len(e) for e in expected]
    rng = random.Random(3)
    lay = random_layout(2, 6, rng, efficient=False)
    p = BlockLayout(lay, 16)
    for T in range(1, 97, 7):
        for a, b in zip(p.kv_retention(T, 2), retention_from_mask(p, T, 2, 96), strict=True):
            assert torch.equal(a, b)


def test_kept_token_counts_match_spec():
    # SinkWindow keeps sink + window once the sequence is long enough
    assert SinkWindow(64, 2048).kept_tokens(131072, 8) == [64 + 2048] * 8
    assert SinkWindow(64, 2048).kept_tokens(100, 1) == [100]
    # BlockSparse keeps local_blocks*B + about (T - local_blocks*B) / stride per KV head
    T, B, local, hkv = 65536, 64, 16, 8
    kept = BlockSparse(B, local, None).kept_tokens(T, hkv)
    approx = local * B + (T - local * B) / hkv
    assert all(abs(k - approx) <= 2 * B for k in kept)
    assert Full().kept_tokens(77, 3) == [77, 77, 77]


def test_built_in_patterns_are_kv_cache_efficient_and_inefficient_layout_detected():
    for pattern, _, T, hkv in CASES:
        assert pattern.is_kv_cache_efficient(hkv, T)
        pattern.check_kv_cache_efficient(hkv, T)
    # the generic check agrees on the built-in patterns' block masks
    from longgen.patterns import _column_efficient

    for p in (Full(), SinkWindow(64, 2048), BlockSparse(64, 4, 3), BlockSparse(16, 1, None, 2)):
        assert _column_efficient(p.block_mask(2048, 4))
    lay = torch.tensor([[[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]]], dtype=torch.bool)
    p = BlockLayout(lay, 16)  # block 0 dropped by row 1, attended again by row 2
    assert not p.is_kv_cache_efficient(1)
    with pytest.raises(ValueError, match="not KV-cache efficient"):
        p.check_kv_cache_efficient(1)
    assert BlockLayout(torch.eye(4, dtype=torch.bool)[None], 16).is_kv_cache_efficient(1)
    rng = random.Random(4)
    for _ in range(10):
        assert BlockLayout(random_layout(2, 6, rng, efficient=True), 16).is_kv_cache_efficient(2)


@pytest.mark.parametrize("hkv,stride", [(4, None), (8, None), (8, 4), (16, 8), (64, None), (80, None)])
def test_block_sparse_union_of_heads_covers_every_causal_block_pair(hkv, stride):
    p = BlockSparse(16, 2, stride)
    assert p.resolve(hkv).stride <= hkv
    bm = p.block_mask(16 * 200, hkv)
    n = bm.shape[-1]
    assert torch.equal(bm.any(dim=0), torch.ones(n, n, dtype=torch.bool).tril())


def test_block_sparse_partial_coverage_when_fewer_heads_than_stride():
    bm = BlockSparse(16, 1, 8).block_mask(16 * 40, 2)
    assert not torch.equal(bm.any(dim=0), torch.ones(40, 40, dtype=torch.bool).tril())


def test_block_sparse_stride_defaults_to_kv_heads_capped_at_64():
    assert BlockSparse().resolve(8).stride == 8
    assert BlockSparse().resolve(128).stride == 64
    assert BlockSparse(stride=5).resolve(8).stride == 5
    assert BlockSparse().stride is None  # unresolved until the head count is known


def test_block_fraction():
    assert Full().block_fraction(1000, 2) == pytest.approx(1.0)
    f = SinkWindow(64, 2048).block_fraction(131072, 1)
    assert 0.0 < f < 0.05
    n = 131072 // 64
    # BlockSparse(64, 16, 32) at 128K keeps about 1/32 of the distant blocks
    f = BlockSparse(64, 16, 32).block_fraction(131072, 32)
    assert f == pytest.approx((16 * n + (n * n / 2) / 32) / (n * n / 2), rel=0.05)


ALL = [
    Full(),
    SinkWindow(),
    SinkWindow(0, 7),
    BlockSparse(),
    BlockSparse(32, 3, 5, 1),
    BlockLayout(torch.ones(2, 3, 3, dtype=torch.bool).tril(), 32),
]


@pytest.mark.parametrize("pattern", ALL, ids=repr)
def test_to_dict_round_trip_through_json(pattern):
    d = json.loads(json.dumps(pattern.to_dict()))
    back = pattern_from_dict(d)
    assert back == pattern
    assert Pattern.from_dict(d) == pattern
    assert type(back) is type(pattern)


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: SinkWindow(-1, 10), ValueError, "sink must be >= 0"),
        (lambda: SinkWindow(4, 0), ValueError, "window must be >= 1"),
        (lambda: SinkWindow(4.0, 10), TypeError, "must be an int"),
        (lambda: BlockSparse(block_size=48), ValueError, "power of two"),
        (lambda: BlockSparse(block_size=8), ValueError, ">= 16"),
        (lambda: BlockSparse(local_blocks=0), ValueError, "local_blocks must be >= 1"),
        (lambda: BlockSparse(stride=0), ValueError, "stride must be >= 1"),
        (lambda: BlockSparse(dense_kv_heads=-1), ValueError, "dense_kv_heads must be >= 0"),
        (lambda: BlockSparse(dense_kv_heads=5).resolve(4), ValueError, "exceeds the number of KV heads"),
        (lambda: BlockLayout(torch.ones(2, 3, dtype=torch.bool), 16), ValueError, "shape"),
        (lambda: BlockLayout(torch.ones(1, 3, 4, dtype=torch.bool), 16), ValueError, "shape"),
        (lambda: BlockLayout(torch.ones(1, 3, 3, dtype=torch.bool), 16), ValueError, "not causal"),
        (lambda: BlockLayout(torch.zeros(1, 3, 3, dtype=torch.bool), 16), ValueError, "lacks the diagonal"),
        (lambda: BlockLayout(torch.full((1, 2, 2), 0.5).tril(), 16), TypeError, "bool"),
        (lambda: BlockLayout(torch.ones(1, 2, 2, dtype=torch.bool).tril(), 24), ValueError, "power of two"),
        (lambda: BlockLayout(torch.ones(3, 2, 2, dtype=torch.bool).tril(), 16).mask(32, 2), ValueError, "1 or 2"),
        (lambda: BlockLayout(torch.ones(1, 2, 2, dtype=torch.bool).tril(), 16).mask(33, 1), ValueError, "exceeds"),
        (lambda: Full().mask(0, 1), ValueError, "seq_len must be >= 1"),
        (lambda: Full().mask(4, 0), ValueError, "num_kv_heads must be >= 1"),
        (lambda: Full().block_mask(4, 1, 20), ValueError, "power of two"),
        (lambda: pattern_from_dict({"type": "nope"}), ValueError, "unknown pattern type"),
        (lambda: pattern_from_dict({"sink": 3}), ValueError, "'type'"),
        (lambda: pattern_from_dict({"type": "sink_window", "sinks": 3}), ValueError, "bad parameters"),
        (lambda: pattern_from_dict({"type": "block_layout", "layout": [["12"]]}), ValueError, "only '0' and '1'"),
    ],
)
def test_invalid_parameters_raise_clear_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_integer_layout_accepted_as_boolean():
    lay = torch.ones(1, 3, 3, dtype=torch.int64).tril()
    assert BlockLayout(lay, 16) == BlockLayout(lay.bool(), 16)


# ---- host-side helpers the cache and the benchmarks use ----
def _random_layout(hkv, n, seed):
    gen = torch.Generator().manual_seed(seed)
    lay = torch.rand(hkv, n, n, generator=gen) < 0.5
    return BlockLayout(lay.tril() | torch.eye(n, dtype=torch.bool), block_size=16)


@pytest.mark.parametrize("pattern,formula,T,hkv", CASES[:30], ids=[f"{c[0]}-T{c[2]}-h{c[3]}" for c in CASES[:30]])
def test_mask_mod_equals_mask(pattern, formula, T, hkv):
    """The FlexAttention mask_mod is the pattern, per query head (dense_kv_heads included)."""
    G = 2
    mod = pattern.mask_mod(hkv * G, hkv)
    pos = torch.arange(T)
    h = torch.arange(hkv * G)
    got = mod(0, h[:, None, None], pos[None, :, None], pos[None, None, :])
    assert torch.equal(got, pattern.mask(T, hkv).repeat_interleave(G, 0))


def test_mask_mod_checks_heads():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        Full().mask_mod(6, 4)


@pytest.mark.parametrize(
    "pattern,hkv",
    [(BlockSparse(16, 3, 4), 4), (BlockSparse(16, 2, None, 1), 3), (BlockSparse(32, 1, 8), 2), (None, 2), (None, 1)],
)
def test_last_query_block_is_the_last_row_of_each_block_mask_column(pattern, hkv):
    n = 12
    pattern = pattern or _random_layout(hkv, n, seed=hkv)
    bm = pattern.block_mask(n * pattern.block_size, hkv)
    rows = torch.arange(n)[None, :, None].expand_as(bm)
    assert torch.equal(pattern.last_query_block(hkv, n), torch.where(bm, rows, -1).amax(dim=1))


@pytest.mark.parametrize(
    "pattern,hkv", [(BlockSparse(16, 3, 4), 4), (BlockSparse(16, 1, 6), 2), (BlockSparse(16, 4, 3), 8)]
)
def test_live_blocks_are_the_kept_blocks_among_new_ones(pattern, hkv):
    """live_blocks(first, last) = the blocks in first..last that kv_retention keeps once block `last` is in."""
    B = pattern.block_size
    for first in range(0, 9):
        for last in range(first, first + 9):
            blocks = pattern.live_blocks(first, last, hkv)
            kept = pattern.kv_retention((last + 1) * B, hkv)
            for g in range(hkv):
                want = sorted({int(s) // B for s in kept[g] if first * B <= s})
                got = blocks[g][blocks[g] <= last].tolist()
                assert got == want, (first, last, g)
