"""The block-sparse path on packed sequences: one split of the inputs, so the backward does not grow with the
number of sequences times the input size (a slice per sequence adds a zero-filled whole-input gradient each)."""

import torch

from longgen import Full, SinkWindow, reference_attention
from longgen.kernels import blocked_attention


def _backward_nodes(t: torch.Tensor) -> list[str]:
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def test_packed_sequences_split_once_and_match_the_reference():
    torch.manual_seed(0)
    lens = [5, 0, 40, 17, 1, 33]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lens), 4, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lens), 2, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lens), 2, 16, dtype=torch.float64, requires_grad=True)
    for pattern in (Full(), SinkWindow(2, 9)):
        out = blocked_attention(q, k, v, pattern, cu_seqlens=cu)
        nodes = _backward_nodes(out)
        assert "SliceBackward0" not in nodes and "SplitWithSizesBackward0" in nodes
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        ref = reference_attention(q, k, v, pattern, cu_seqlens=cu)
        ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
        torch.testing.assert_close(out, ref)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r)
