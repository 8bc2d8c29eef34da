"""The hybrid cache on the GPU (bf16): prefill through the Triton kernels, decode over the kept slots."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from longgen import BlockSparse, SinkWindow, convert
from longgen.infer import HybridCache, cache_kwargs
from longgen.model import read_layout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def bf16_model(pattern, hidden: int, kv_heads: int):
    """A random 6-layer Llama (8 heads, 1000 tokens) converted with `pattern` (None: every layer Full), bf16 on CUDA."""
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=kv_heads,
        max_position_embeddings=8192,
    )
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    m = convert(m, full_fraction=1.0) if pattern is None else convert(m, pattern=pattern)
    return m.to("cuda", torch.bfloat16)


@pytest.mark.parametrize("pattern", [SinkWindow(64, 512), BlockSparse(64, 4)], ids=repr)
def test_decode_logits_match_recomputation(pattern):
    m = bf16_model(pattern, hidden=512, kv_heads=4)
    seq = torch.randint(0, 1000, (1, 4000), device="cuda")
    cache = HybridCache(m.config, max_length=4016)
    layers = read_layout(m.config)
    with torch.no_grad():
        logits = m(seq, **cache_kwargs(cache), use_cache=True).logits[:, -1]
        for _ in range(16):
            ref = m(seq).logits[:, -1]  # whole sequence again, no cache
            err = ((logits.float() - ref.float()).norm() / ref.float().norm()).item()
            assert err < 2e-2, err
            n = seq.shape[1]
            for i, p in enumerate(layers):
                assert cache.stored_tokens(i)[0].tolist() == p.kept_tokens(n, 4)
            nxt = ref.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            logits = m(nxt, **cache_kwargs(cache), use_cache=True).logits[:, -1]


@pytest.mark.parametrize("pattern", [None, SinkWindow(64, 512), BlockSparse(64, 4)], ids=repr)
def test_runner_cuda_graph_decode_matches_recomputation(pattern):
    from longgen.infer import ModelRunner

    m = bf16_model(pattern, hidden=1024, kv_heads=2)
    runner = ModelRunner(m, max_batch=2, max_len=6000, prefill_chunk=None)
    assert runner.cuda_graph
    seqs = [torch.randint(0, 1000, (1, n), device="cuda") for n in (4000, 2500)]
    logits = torch.stack([runner.prefill(r, s[0]) for r, s in enumerate(seqs)])
    active = torch.tensor([True, True], device="cuda")
    with torch.no_grad():
        for step in range(12):
            if step == 6:
                active[1] = False
            for r, s in enumerate(seqs):
                if step >= 6 and r == 1:
                    continue
                ref = m(s).logits[0, -1].float()
                err = ((logits[r] - ref).norm() / ref.norm()).item()
                assert err < 2e-2, (step, r, err)
            nxt = logits.argmax(-1)
            for r in range(2):
                if active[r]:
                    seqs[r] = torch.cat([seqs[r], nxt[r].view(1, 1)], dim=1)
            logits = runner.decode(nxt, active)
    assert runner.lengths().tolist() == [s.shape[1] for s in seqs]
