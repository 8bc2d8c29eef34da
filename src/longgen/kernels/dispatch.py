"""Which kernels run a call: the one place that chooses between the backends.

* The op (`longgen.sparse_attention`, `choose_backend`): ``"triton"`` for CUDA float16/bfloat16 tensors with a
  head_dim the Triton kernels are built for, ``"reference"`` for other CUDA tensors, ``"blocked"`` off CUDA.
* Inside a Triton call (`hopper_kernels`): the Hopper Gluon kernels (`gluon_attention`) take the forward, dQ and
  dK/dV of calls in their scope on an H100/H200, as ``LONGGEN_GLUON`` allows.
* The model's plain causal Full layers (`full_layer_backend`): PyTorch SDPA (FlashAttention/cuDNN kernels, whose
  backward is faster for them in training), or without gradients the Hopper forward, which is faster than cuDNN's.

``LONGGEN_GLUON`` (read here only): 1 (default) all three Hopper kernels, 0 none, or a comma-separated subset of
fwd,dkdv,dq (e.g. "fwd,dkdv" runs the Triton dQ kernel).
"""

from __future__ import annotations

import functools
import os

import torch

from longgen.kernels.inputs import TRITON_HEAD_DIMS

BACKENDS = ("auto", "blocked", "reference", "triton")
PARTS = ("fwd", "dkdv", "dq")  # the Hopper kernels
GLUON_HEAD_DIMS = (64, 128)
GLUON_ROWS = 128  # the Hopper kernels' query rows per program: sequence lengths must be multiples of it


def choose_backend(q: torch.Tensor, backend: str = "auto") -> str:
    """The backend `sparse_attention` runs for queries `q`: `backend` itself, or for ``"auto"``: ``"triton"`` for
    CUDA float16/bfloat16 tensors with a supported head_dim, ``"reference"`` for other CUDA tensors, and
    ``"blocked"`` off CUDA (CPU, MPS, ...), where the Triton kernels cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if triton_suits(q):
        return "triton"
    return "reference" if isinstance(q, torch.Tensor) and q.device.type == "cuda" else "blocked"


def triton_suits(q: torch.Tensor) -> bool:
    """`backend="auto"` runs Triton (prefill and decoding) on CUDA half-precision tensors with a supported head_dim."""
    if not isinstance(q, torch.Tensor) or q.device.type != "cuda":
        return False
    return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in TRITON_HEAD_DIMS


def gluon_parts() -> frozenset[str]:
    """The Hopper kernels ``LONGGEN_GLUON`` allows (see the module docstring)."""
    flag = os.environ.get("LONGGEN_GLUON", "1")
    if flag == "1":
        return frozenset(PARTS)
    if flag == "0":
        return frozenset()
    parts = flag.split(",")
    if not all(p in PARTS for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(
            f"LONGGEN_GLUON must be 1 (default: all Hopper kernels), 0 (none) or a comma-separated subset of "
            f"{','.join(PARTS)}, got {flag!r}"
        )
    return frozenset(parts)


@functools.cache
def _gluon_available() -> bool:
    """A Triton with Gluon and the warp_specialize API of Triton 3.6 on."""
    try:
        from longgen.kernels import gluon_attention
    except ImportError:  # a Triton without Gluon
        return False
    return gluon_attention.NEW_WS_API


def _in_gluon_scope(q: torch.Tensor, head_dim: int, kind: int, block_size: int, seq_len: int) -> bool:
    """The device, dtype, head_dim, pattern and length conditions of the Hopper kernels."""
    from longgen.kernels.plan import K_BLOCK_SPARSE, K_FULL, K_SINK_WINDOW

    if not q.is_cuda or torch.cuda.get_device_capability(q.device) != (9, 0) or not _gluon_available():
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or head_dim not in GLUON_HEAD_DIMS:
        return False
    if kind not in (K_FULL, K_SINK_WINDOW, K_BLOCK_SPARSE) or (kind == K_BLOCK_SPARSE and block_size < 64):
        return False
    return seq_len > 0 and seq_len % GLUON_ROWS == 0


def hopper_kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan, batched: bool) -> frozenset[str]:
    """Which Hopper kernels ("fwd", "dq", "dkdv") run a Triton call with `plan` (`longgen.kernels.plan.Plan`) on
    flattened inputs ``(total, heads, head_dim)``: those ``LONGGEN_GLUON`` allows, for batches of equal-length
    sequences (no padding, no cu_seqlens, no query offset, all KV heads) of contiguous 16-byte aligned tensors in
    the kernels' scope (capability 9.0, float16/bfloat16, head_dim 64 or 128, Full / SinkWindow / BlockSparse with
    block_size >= 64, lengths a multiple of 128); none otherwise."""
    shape = plan.shape
    if not q.is_cuda or not batched or shape.padded or plan.q_offset != 0:
        return frozenset()
    if shape.kv_head_offset != 0 or shape.num_kv_heads != shape.global_kv_heads:  # context-parallel slices
        return frozenset()
    if not _in_gluon_scope(q, shape.head_dim, plan.kind, plan.pat.block, plan.max_len):
        return frozenset()
    if not all(x.is_contiguous() and x.data_ptr() % 16 == 0 for x in (q, k, v)):
        return frozenset()
    return gluon_parts()


def full_layer_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """How a model's plain causal Full layer runs ``(B, T, heads, head_dim)`` q, k, v: ``"gluon"`` (the Hopper
    forward through `sparse_attention`) for a forward with no gradient to compute in its scope, measured faster
    than cuDNN's forward on H100 and H200; else ``"sdpa"`` (PyTorch SDPA, whose backward is faster than the Triton
    one in training)."""
    from longgen.kernels.plan import K_FULL

    if not q.is_cuda or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return "sdpa"
    if "fwd" in gluon_parts() and _in_gluon_scope(q, q.shape[-1], K_FULL, 1, q.shape[1]):
        return "gluon"
    return "sdpa"
