"""Compile every attention kernel for sm_90a without a GPU, through longgen's own launch code, and hash the results.

    TRITON_DISABLE_LINE_INFO=1 PYTHONPATH=src python benchmarks/kernel_hashes.py --out hashes.json

A refactoring that should not change what runs on the GPU ("pure plumbing") is checked by running this before and
after it and comparing the hashes: every case launches the real host code (`triton_attention`, `suffix_attention`,
`cache_attention`, the Hopper Gluon kernels) on CPU tensors while a stand-in driver reports a CUDA capability 9.0
target, so each kernel launch becomes a compile (nothing runs). Per compiled kernel it prints the case, the kernel
name and short sha256 hashes of its PTX and of its SASS (the cubin disassembled by Triton's bundled cuobjdump).
Without line info (``TRITON_DISABLE_LINE_INFO=1``) the hashes do not depend on where the source lines are.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import subprocess
import sys
import tempfile

import torch
import triton
from common import git_commit, save_result
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

COMPILED: list = []


class _CompileOnlyDriver:
    """Reports an sm_90 target and device 0; everything else is a no-op (nothing is launched)."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _compile_instead_of_launch() -> None:
    driver.set_active(_CompileOnlyDriver())
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        COMPILED.append((self.fn.__name__, kernel))
        return kernel

    JITFunction.run = compile_only


def _sass(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return "\n".join(line for line in out.splitlines() if "Function" in line or line.strip().startswith("/*"))


def _digest(case: str) -> list[dict]:
    rows = []
    for name, k in COMPILED:
        ptx = hashlib.sha256(k.asm["ptx"].encode()).hexdigest()[:16]
        sass = hashlib.sha256(_sass(k.asm["cubin"]).encode()).hexdigest()[:16]
        rows.append(dict(case=case, kernel=name, ptx=ptx, sass=sass))
    COMPILED.clear()
    return rows


def cases():
    """(label, pattern name, pattern, call) for every case; `call()` launches through longgen's host code."""
    from longgen.kernels import dispatch
    from longgen.kernels import gluon_attention as ga
    from longgen.kernels import triton_attention as ta
    from longgen.kernels import triton_cache_attention as tca
    from longgen.kernels.cache_attention import cache_attention, suffix_attention
    from longgen.kernels.inputs import check_attention_args
    from longgen.patterns import BlockLayout, BlockSparse, Full, SinkWindow

    ta._check_supported = tca._check_supported = lambda *args: None  # CPU tensors stand in for CUDA ones
    ga._sm_count = lambda index: 132
    torch.cuda.current_device = lambda: 0
    gluon = {"on": False}
    dispatch.hopper_kernels = lambda q, k, v, plan, batched: frozenset(dispatch.PARTS) if gluon["on"] else frozenset()

    def attention(pattern, H, hkv, d, T, B=1, dlse=False, on=False, cu=None, off=0, total=None):
        def call():
            gluon["on"] = on
            dt = torch.bfloat16
            shapes = [(B, T, H, d), (B, T, hkv, d)] if cu is None else [(int(cu[-1]), H, d), (int(cu[-1]), hkv, d)]
            q = torch.randn(shapes[0], dtype=dt, requires_grad=True)
            k, v = (torch.randn(shapes[1], dtype=dt, requires_grad=True) for _ in range(2))
            shape = check_attention_args(q, k, v, pattern, cu, None, None, off, total)
            o, lse = ta.triton_attention(q, k, v, shape, cu, True)
            (o.float().sum() + (lse.sum() if dlse else 0)).backward()

        return call

    def suffix(pattern):
        return lambda: suffix_attention(
            torch.randn(1, 5, 8, 128, dtype=torch.bfloat16), *[torch.randn(1, 300, 2, 128, dtype=torch.bfloat16)] * 2,
            pattern, backend="triton",
        )  # fmt: skip

    def decode(pattern, Q, splits):
        kc = torch.randn(2, 2, 64, 128, dtype=torch.bfloat16)
        kp = torch.arange(64, dtype=torch.int32).expand(2, 2, 64).contiguous()
        qp = torch.arange(64 - Q, 64, dtype=torch.int32).expand(2, Q).contiguous()
        q = torch.randn(2, Q, 8, 128, dtype=torch.bfloat16)
        return lambda: cache_attention(q, qp, kc, kc, kp, pattern, backend="triton", num_splits=splits)

    patterns = {
        "full": Full(),
        "sw": SinkWindow(sink=64, window=256),
        "bs_dense": BlockSparse(block_size=64, local_blocks=4, stride=4, dense_kv_heads=1),
    }
    for name, p in patterns.items():
        yield "triton H8/2 d128 even", name, attention(p, 8, 2, 128, 512)
        yield "gluon H8/2 d128", name, attention(p, 8, 2, 128, 512, B=2, on=True)
        yield "gluon H4/4 d64 dlse", name, attention(p, 4, 4, 64, 256, on=True, dlse=True)
        yield "triton H4/4 d64 odd dlse", name, attention(p, 4, 4, 64, 300, dlse=True)
        yield "triton H6/2 d96 odd dlse", name, attention(p, 6, 2, 96, 300, dlse=True)  # G = 3: tiles split positions
        yield "triton varlen", name, attention(p, 8, 2, 64, 0, cu=torch.tensor([0, 100, 356], dtype=torch.int32))
        yield "triton kv slice", name, attention(p, 4, 2, 64, 256, off=2, total=4)
        yield "suffix", name, suffix(p)
        for Q, splits in ((1, 1), (3, 2)):
            yield f"cache Q{Q} s{splits}", name, decode(p, Q, splits)
    torch.manual_seed(0)
    lower = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    lay = BlockLayout(((lower & (torch.rand(8, 8) < 0.7)) | torch.eye(8, dtype=torch.bool))[None], block_size=64)
    yield "triton layout", "layout", attention(lay, 8, 2, 128, 512)
    yield "triton layout odd", "layout", attention(lay, 8, 2, 64, 300)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_DISABLE_LINE_INFO") != "1":
        print("note: without TRITON_DISABLE_LINE_INFO=1 the hashes depend on source line numbers", file=sys.stderr)
    _compile_instead_of_launch()
    rows = []
    for label, name, call in cases():
        call()
        for row in _digest(f"{label}:{name}"):
            rows.append(row)
            print(f"{row['case']:<32} {row['kernel']:<16} ptx {row['ptx']} sass {row['sass']}", flush=True)
    if args.out:
        meta = {
            "command": "TRITON_DISABLE_LINE_INFO=1 PYTHONPATH=src python " + " ".join(sys.argv),
            "device": "none: compiled for an sm_90a target (CUDA capability 9.0) on the CPU",
            "triton": triton.__version__,
            "commit": git_commit(),
            "date": datetime.date.today().isoformat(),
        }
        save_result(args.out, {**meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
