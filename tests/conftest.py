"""Test-wide setup: Triton kernels run on CPU tensors through the interpreter when no GPU is present; the
process's first float64 exp is made here."""

import os

import torch

if not torch.cuda.is_available():
    # must be set before any @triton.jit function is created (the kernels module is imported lazily)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import longgen  # noqa: F401  (after the line above)

# With torch 2.13 on CPU, the first float64 exp of some processes that have imported longgen was seen to be off
# by about 3e-9 (relative); later exps were exact. Float64 tests compare two paths at 1e-10 (the first one to run
# failed that way in CI), so the process's first exp is made here; with it, no inexact exp was seen.
torch.exp(torch.randn(2, 1, 64, 64, dtype=torch.float64))
