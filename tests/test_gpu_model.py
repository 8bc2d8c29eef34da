"""A converted hybrid on the GPU: bf16, Triton kernels inside a real transformers model (`pytest -m gpu`)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from longgen import BlockSparse, SinkWindow, convert

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("pattern", [SinkWindow(64, 512), BlockSparse(64, 4)], ids=repr)
def test_bf16_hybrid_on_cuda_matches_float32_reference(pattern):
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    m = convert(AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval(), pattern=pattern)
    x = torch.randint(0, 1000, (2, 3000))
    with torch.no_grad():
        ref = m(x).logits.float()  # CPU float32: reference attention
        out = m.to("cuda", torch.bfloat16)(x.cuda()).logits.float().cpu()  # CUDA bf16: Triton kernels
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 3e-2, err
    # training step: gradients flow through the kernels
    m.train()
    loss = m(x[:1, :2048].cuda(), labels=x[:1, :2048].cuda()).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
