"""The serving runner: compact caches for several rows, layer-wise and chunked prefill, static decode steps."""

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from longgen import BlockSparse, SinkWindow
from longgen.infer import CompactKV, ModelRunner, row_kv_bytes, rows_for_budget, sample_tokens
from longgen.model import read_layout
from test_infer import PATTERNS, greedy_recompute, tiny_hybrid


def prompts(lengths, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("name", list(PATTERNS))
def test_batched_greedy_generation_equals_recomputation(name):
    m = tiny_hybrid(PATTERNS[name])
    ps = prompts((41, 18, 30))
    out = ModelRunner(m, max_batch=3, max_len=120).generate(ps, 12)
    for p, o in zip(ps, out, strict=True):
        assert o == greedy_recompute(m, torch.tensor([p]), 12)[0, len(p) :].tolist()


@pytest.mark.parametrize("name", list(PATTERNS))
def test_chunked_prefill_gives_the_same_tokens(name):
    m = tiny_hybrid(PATTERNS[name])
    ps = prompts((53,), seed=5)
    whole = ModelRunner(m, max_len=100).generate(ps, 10)
    logits = ModelRunner(m, max_len=100).prefill(0, ps[0])
    for chunk in (1, 7, 16):
        assert ModelRunner(m, max_len=100, prefill_chunk=chunk).generate(ps, 10) == whole, chunk
        sliced = ModelRunner(m, max_len=100, prefill_chunk=chunk).prefill(0, ps[0])
        torch.testing.assert_close(sliced, logits, rtol=1e-4, atol=1e-4)  # every key each slice needs, no other


@pytest.mark.parametrize("name", list(PATTERNS))
def test_prefill_in_slices_between_decode_steps_equals_one_prefill(name):
    """A scheduler's view: row 1's prompt goes in as slices (`start`) while row 0 decodes in between."""
    m = tiny_hybrid(PATTERNS[name])
    a, b = prompts((12, 47), seed=11)
    alone = ModelRunner(m, max_batch=2, max_len=100).generate([a, b], 6)
    r = ModelRunner(m, max_batch=2, max_len=100)
    logits, got_a = r.prefill(0, a), []
    cuts = [0, 1, 5, 6, 30, 47]  # a slice that starts inside the sink (start 1 < sink 2) too
    for lo, hi in itertools.pairwise(cuts):
        last = r.prefill(1, b[lo:hi], start=lo)
        tok = int(logits.argmax())
        got_a.append(tok)
        logits = r.decode([tok, 0], [True, False])[0]
    got_b = []
    for _ in range(6):
        tok = int(last.argmax())
        got_b.append(tok)
        last = r.decode([0, tok], [False, True])[1]
    assert got_a == alone[0][: len(cuts) - 1] and got_b == alone[1]
    with pytest.raises(ValueError, match="row 1 holds 53 tokens: a prefill that goes on must start there, not at 40"):
        r.prefill(1, [1, 2], start=40)
    with pytest.raises(ValueError, match="got 60 tokens from position 47"):
        r.prefill(1, list(range(60)), start=47)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_rows_store_the_retention_of_their_own_sequence_at_every_step(name):
    m = tiny_hybrid(PATTERNS[name])
    layers = read_layout(m.config)
    r = ModelRunner(m, max_batch=2, max_len=96)
    ps = prompts((30, 9), seed=3)
    logits = torch.stack([r.prefill(0, ps[0]), r.prefill(1, ps[1])])
    lengths = [30, 9]
    active = torch.tensor([True, True])
    for step in range(40):
        if step == 20:
            active[1] = False  # a finished row stops storing
        for i, p in enumerate(layers):
            for row in range(2):
                kv = r.kv[i].rows(row)
                assert kv.stored_tokens()[0].tolist() == p.kept_tokens(lengths[row], 2), (i, row, step)
                ret = p.kv_retention(lengths[row], 2)
                for g in range(2):
                    assert torch.equal(kv.stored_positions(0, g), ret[g])
        logits = r.decode(logits.argmax(-1), active)
        lengths = [n + int(a) for n, a in zip(lengths, active, strict=True)]
    assert r.lengths().tolist() == lengths


def test_released_row_is_reused_for_a_new_sequence():
    m = tiny_hybrid(PATTERNS["sink_window"])
    r = ModelRunner(m, max_batch=2, max_len=80)
    a, b = prompts((20, 25), seed=7)
    alone = ModelRunner(m, max_len=80).generate([b], 8)[0]
    r.prefill(0, a)
    r.prefill(1, a)
    r.decode([1, 2])
    r.release(1)
    logits = r.prefill(1, b)
    got = []
    for _ in range(8):
        tok = int(logits.argmax())
        got.append(tok)
        logits = r.decode([0, tok], [False, True])[1]
    assert got == alone


def test_capacity_is_the_retention_rounded_to_blocks_and_budget_arithmetic():
    m = tiny_hybrid(BlockSparse(16, 2, 2))
    L = 256
    r = ModelRunner(m, max_batch=2, max_len=L)
    for kv, p in zip(r.kv, read_layout(m.config), strict=True):
        most = max(p.kept_tokens(L, 2))
        assert most <= kv.capacity <= most + 16  # + the partial block at the end
    assert r.allocated_bytes() == 2 * row_kv_bytes(m.config, L, torch.float32)
    per_row = row_kv_bytes(m.config, L, torch.float32)
    assert rows_for_budget(m.config, L, 3 * per_row + 1, torch.float32) == 3
    sw = CompactKV(SinkWindow(4, 16), 2, 8, max_len=1000)
    assert sw.capacity == 20 and sw.map.kind == "ring"


def test_runner_errors_are_clear():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=64)  # fmt: skip
    plain = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="attn_implementation='longgen'"):
        ModelRunner(plain)
    m = tiny_hybrid(PATTERNS["sink_window"])
    with pytest.raises(ValueError, match=r"max_len must be in \[1, 256\]"):
        ModelRunner(m, max_len=1000)
    r = ModelRunner(m, max_batch=2, max_len=32)
    with pytest.raises(ValueError, match="1 to 32 tokens"):
        r.prefill(0, list(range(40)))
    with pytest.raises(ValueError, match=r"row must be in \[0, 2\)"):
        r.prefill(2, [1, 2])
    with pytest.raises(ValueError, match=r"one token per row: shape \(2,\)"):
        r.decode([1, 2, 3])
    with pytest.raises(ValueError, match="exceeds max_len 32"):
        r.generate([list(range(30))], 5)


def test_sample_tokens_greedy_and_nucleus():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0], [1.0, 0.0, 0.0, 0.5]])
    zero = torch.zeros(2)
    assert sample_tokens(logits, zero, torch.ones(2)).tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        tok = sample_tokens(logits, torch.ones(2), torch.tensor([0.5, 1.0]), gen)
        assert tok[0] == 1  # token 1 alone holds more than half the mass
        seen.add(int(tok[1]))
    assert seen == {0, 1, 2, 3}  # top_p 1: every token can be drawn


@pytest.mark.parametrize(
    "pattern,hkv",
    [
        (BlockSparse(16, 2, 4), 2),
        (BlockSparse(16, 1, 3), 4),
        (BlockSparse(32, 2, 2), 2),
        (BlockSparse(16, 2, None), 4),
    ],
)
@pytest.mark.parametrize("cuts", [(0, 300), (0, 37, 120, 121, 300), (0, 16, 47, 48, 260, 300)])
def test_slot_table_prompt_write_without_host_sync_equals_the_masked_write(pattern, hkv, cuts):
    """A BlockSparse prompt (or prompt slices) stored with a known start (`_write_new`, built from host arithmetic)
    leaves every slot as the boolean-masked write does: same keys, values and positions, slices starting and ending
    inside blocks included."""
    gen = torch.Generator().manual_seed(3)
    fast, masked = (CompactKV(pattern, hkv, 8, max_len=320, batch=2) for _ in range(2))
    assert fast.map.kind == "table"
    for lo, hi in itertools.pairwise(cuts):
        n = hi - lo
        key, value = torch.randn(2, hkv, n, 8, generator=gen), torch.randn(2, hkv, n, 8, generator=gen)
        pos = torch.arange(lo, hi).view(1, 1, n).expand(2, 1, n)
        keep = torch.ones(2, 1, n, dtype=torch.bool)
        last = torch.full((2,), hi - 1)
        fast._write_new(key, value, pos, keep, lo, last)
        masked._write_new(key, value, pos, keep, None, last)
        cap = fast.capacity
        assert torch.equal(fast.positions[..., :cap], masked.positions[..., :cap])
        assert torch.equal(fast.keys[..., :cap, :], masked.keys[..., :cap, :])
        assert torch.equal(fast.values[..., :cap, :], masked.values[..., :cap, :])
        assert (fast.positions[..., cap] == -1).all()
        assert torch.equal(fast.stored_tokens(), masked.stored_tokens())
