"""Test-wide setup: Triton kernels run on CPU tensors through the interpreter when no GPU is present; the
process's first float64 exp is made here."""

import os

import torch

if not torch.cuda.is_available():
    # must be set before any @triton.jit function is created (the kernels module is imported lazily)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import longgen  # noqa: F401  (after the line above)

# With torch 2.13 on CPU, the first float64 exp of a process that has imported longgen was seen to be up to 3e-9
# off (relative) in about one process in 30; every later exp was exact. Float64 tests compare two paths at 1e-10
# (the first one to run failed that way in CI), so the process's first exp is made here. Measured on a fresh
# process each time: without this call 1 inexact exp in 60 processes, with it 0 in 150.
torch.exp(torch.randn(2, 1, 64, 64, dtype=torch.float64))
