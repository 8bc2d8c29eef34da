"""The hybrid KV cache: generation equals full recomputation, and what it stores is the pattern's retention."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from longgen import BlockLayout, BlockSparse, SinkWindow, convert
from longgen.infer import HybridCache, analytic_kv_bytes, cache_kwargs
from longgen.model import read_layout

EFFICIENT_LAYOUT = BlockLayout(
    torch.tensor(
        [[1 if (i - j) < 2 or j % 3 == 0 else 0 for j in range(16)] for i in range(16)], dtype=torch.bool
    ).tril()[None],
    16,
)
PATTERNS = {
    "sink_window": SinkWindow(2, 8),
    "block_sparse": BlockSparse(16, 1, None),
    "block_sparse_dense_head": BlockSparse(16, 1, 3, dense_kv_heads=1),
    "block_layout": EFFICIENT_LAYOUT,
}


def tiny_hybrid(pattern, full_fraction=1 / 3, seed=0):
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    m.generation_config.eos_token_id = None  # no early stop: generation runs its full length
    return convert(m, pattern=pattern, full_fraction=full_fraction)


def greedy_recompute(m, prompt, n):
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, m(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("name", list(PATTERNS))
def test_greedy_generation_with_the_cache_equals_recomputation(name):
    m = tiny_hybrid(PATTERNS[name])
    prompt = torch.randint(0, 128, (1, 37), generator=torch.Generator().manual_seed(1))
    out = m.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        **cache_kwargs(HybridCache(m.config)),
        max_new_tokens=20,
        do_sample=False,
        pad_token_id=0,
    )
    assert torch.equal(out, greedy_recompute(m, prompt, 20))


@pytest.mark.parametrize("name", ["sink_window", "block_sparse"])
def test_mixed_length_batch_left_padded(name):
    m = tiny_hybrid(PATTERNS[name])
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 128, (n,), generator=gen) for n in (41, 18, 30)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :], mask[b, T - len(p) :] = p, 1
    out = m.generate(
        ids,
        attention_mask=mask,
        **cache_kwargs(HybridCache(m.config)),
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=0,
    )
    for b, p in enumerate(prompts):
        alone = greedy_recompute(m, p[None], 12)[0]
        assert torch.equal(out[b, T - len(p) :], alone), b


@pytest.mark.parametrize("name", list(PATTERNS))
def test_stored_tokens_follow_the_retention_rule_at_every_step(name):
    m = tiny_hybrid(PATTERNS[name])
    layers = read_layout(m.config)
    cache = HybridCache(m.config)
    seq = torch.randint(0, 128, (1, 45), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = m(seq, **cache_kwargs(cache), use_cache=True).logits
        for _ in range(30):
            n = seq.shape[1]
            for i, p in enumerate(layers):
                stored = cache.stored_tokens(i)[0].tolist()
                assert stored == p.kept_tokens(n, 2), (i, n)
                retained = p.kv_retention(n, 2)
                for g in range(2):
                    assert torch.equal(cache.layers[i].stored_positions(0, g), retained[g]), (i, n, g)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            logits = m(nxt, **cache_kwargs(cache), use_cache=True).logits


def test_all_sparse_streaming_model_never_holds_more_than_sink_plus_window():
    m = tiny_hybrid(SinkWindow(4, 16), full_fraction=0.0)
    cache = HybridCache(m.config)
    seq = torch.randint(0, 128, (2, 50), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = m(seq, **cache_kwargs(cache), use_cache=True).logits
        for _ in range(25):
            assert all(int(cache.stored_tokens(i).max()) <= 20 for i in range(6))
            logits = m(logits[:, -1].argmax(-1, keepdim=True), **cache_kwargs(cache), use_cache=True).logits
    assert all(int(cache.stored_tokens(i).max()) == 20 for i in range(6))


def test_preallocated_cache_does_not_grow_and_stays_near_the_analytic_minimum():
    m = tiny_hybrid(SinkWindow(4, 16))
    L = 120
    cache = HybridCache(m.config, max_length=L)
    prompt = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(5))
    before = None
    with torch.no_grad():
        logits = m(prompt, **cache_kwargs(cache), use_cache=True).logits
        before = cache.allocated_bytes()
        for _ in range(L - 100):
            logits = m(logits[:, -1].argmax(-1, keepdim=True), **cache_kwargs(cache), use_cache=True).logits
    assert cache.allocated_bytes() == before  # preallocated: nothing reallocated while decoding
    stored = sum(int(cache.stored_tokens(i).sum()) for i in range(6)) * 2 * 16 * 4  # K+V, head_dim, float32
    assert stored == analytic_kv_bytes(m.config, L, bytes_per_value=4)


def test_inefficient_layout_is_refused_for_the_reduced_cache():
    lay = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)[None]
    m = tiny_hybrid(BlockLayout(lay, 16))
    with pytest.raises(ValueError, match="not KV-cache efficient"):
        HybridCache(m.config)


def test_cache_needs_the_longgen_attention():
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="attn_implementation='longgen'"):
        HybridCache(m.config)


@pytest.mark.slow
def test_generate_cli_streams_the_greedy_continuation(tmp_path):
    import subprocess
    import sys

    from longgen.model import convert_checkpoint, load_model
    from test_model import make_checkpoint  # a tiny Llama + WordLevel tokenizer saved as a folder

    make_checkpoint(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "hyb", pattern=SinkWindow(2, 8), progress=False)
    prompt = " ".join(f"w{i}" for i in range(3, 40))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "longgen",
            "generate",
            str(tmp_path / "hyb"),
            "--prompt-file",
            "-",
            "--max-new-tokens",
            "8",
            "--device",
            "cpu",
        ],
        input=prompt,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr, r.stderr  # no deprecation notice from our calls into transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "hyb")
    m = load_model(tmp_path / "hyb").eval()
    m.generation_config.eos_token_id = None
    ids = tok(prompt, return_tensors="pt").input_ids
    expected = tok.decode(greedy_recompute(m, ids, 8)[0, ids.shape[1] :], skip_special_tokens=True)
    assert r.stdout.split() == expected.split()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "longgen",
            "generate",
            str(tmp_path / "hyb"),
            "--prompt",
            "w1",
            "--max-new-tokens",
            "100000",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "exceeds the model's maximum length" in bad.stderr


def test_streaming_llm_baseline_cache_never_holds_more_than_sink_plus_window():
    from longgen.eval import streaming_llm

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    m = streaming_llm(AutoModelForCausalLM.from_config(cfg).eval(), sink=4, window=16)  # a plain full model
    cache = HybridCache(m.config)
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits = m(ids, **cache_kwargs(cache), use_cache=True).logits
        for _ in range(20):
            assert max(int(cache.stored_tokens(i).max()) for i in range(3)) <= 4 + 16
            logits = m(logits[:, -1].argmax(-1, keepdim=True), **cache_kwargs(cache), use_cache=True).logits
