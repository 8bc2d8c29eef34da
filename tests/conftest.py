"""Test-wide setup: Triton kernels run on CPU tensors through the interpreter when no GPU is present."""

import os

import torch

if not torch.cuda.is_available():
    # must be set before any @triton.jit function is created (the kernels module is imported lazily)
    os.environ.setdefault("TRITON_INTERPRET", "1")
