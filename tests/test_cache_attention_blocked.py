"""Cache attention off CUDA (`cache_attention_blocked`, what backend="auto" runs there): the reference's result."""

import sys

import torch

from longgen import BlockSparse, Full, SinkWindow
from longgen.kernels import cache_attention
from longgen.kernels.cache_attention import cache_attention_blocked, cache_attention_reference


def _cache(B, hkv, S, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, hkv, S, d, generator=g, dtype=torch.float64), torch.randn(
        B, hkv, S, d, generator=g, dtype=torch.float64
    )


def test_blocked_equals_the_reference():
    B, H, hkv, d, S = 3, 4, 2, 8, 40
    k, v = _cache(B, hkv, S, d, 0)
    q = torch.randn(B, 2, H, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    in_order = torch.arange(S).expand(B, hkv, S)
    shuffled = in_order[..., torch.randperm(S, generator=torch.Generator().manual_seed(2))]
    holes = torch.where(torch.rand(B, hkv, S, generator=torch.Generator().manual_seed(3)) < 0.3, -1, shuffled)
    cases = [
        (in_order, torch.tensor([[40, 41]] * B), None),  # decoding over keys in order: SDPA without a mask
        (in_order, torch.tensor([[40, 41]] * B), torch.tensor([25, 25, 25])),  # the same, fewer slots read
        (in_order, torch.tensor([[30, 31]] * B), torch.tensor([31, 20, 40])),  # rows of different lengths
        (in_order, torch.tensor([[10, 39], [0, 5], [20, 21]]), None),  # some keys after some queries
        (shuffled, torch.tensor([[40, 41]] * B), None),
        (holes, torch.tensor([[12, 41]] * B), torch.tensor([40, 33, 7])),
    ]
    for pattern in (Full(), SinkWindow(2, 9), BlockSparse(16, 1, 2)):
        for k_pos, q_pos, kv_len in cases:
            args = (q, q_pos, k, v, k_pos, pattern)
            want = cache_attention_reference(*args, kv_len=kv_len)
            torch.testing.assert_close(cache_attention_blocked(*args, kv_len=kv_len), want)
            torch.testing.assert_close(cache_attention(*args, kv_len=kv_len), want)  # auto on a CPU: blocked
            torch.testing.assert_close(cache_attention(*args, kv_len=kv_len, backend="blocked"), want)


def test_auto_runs_blocked_off_cuda(monkeypatch):
    mod = sys.modules["longgen.kernels.cache_attention"]

    calls = []
    monkeypatch.setattr(mod, "cache_attention_blocked", lambda *a, **kw: calls.append(1) or torch.zeros(()))
    k, v = _cache(1, 1, 4, 8, 0)
    cache_attention(torch.zeros(1, 1, 2, 8, dtype=torch.float64), torch.tensor([[4]]), k, v,
                    torch.arange(4).view(1, 1, 4), Full())  # fmt: skip
    assert calls == [1]
