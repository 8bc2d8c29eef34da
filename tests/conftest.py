"""Test-wide setup: Triton kernels run on CPU tensors through the interpreter when no GPU is present; the
process's first float64 exp is made here."""

import os

import torch

if not torch.cuda.is_available():
    # must be set before any @triton.jit function is created (the kernels module is imported lazily)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import longgen  # noqa: F401  (after the line above)

# Under pytest-xdist each worker gets its share of the cores for torch's own threads (two workers with two threads
# each on a 2-core machine spend their time switching)
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # as xdist
    torch.set_num_threads(max(1, _cores // _workers))

# With torch 2.13 on CPU, the first float64 exp of some processes that have imported longgen was seen to be off
# by about 3e-9 (relative); later exps were exact. Float64 tests compare two paths at 1e-10 (the first one to run
# failed that way in CI), so the process's first exp is made here; with it, no inexact exp was seen.
torch.exp(torch.randn(2, 1, 64, 64, dtype=torch.float64))
