"""Compile longgen's Hopper Gluon kernels for sm_90a without a GPU and print what ptxas made of them.

    PYTHONPATH=src python benchmarks/gluon_resources.py [--kernels fwd dkdv] [--patterns full sink_window
        block_sparse] [--head-dims 128 64] [--groups 1 4] [--set bwd_stages=2]

For each kernel and case it prints the registers ptxas allocated at launch (the partitions then rebalance them with
setmaxnreg), spilled bytes, shared memory, the number of HGMMA instructions and of `WARPGROUP.DEPBAR` waits in the
SASS, and whether ptxas serialised the wgmma chain ("insufficient register resources": a wait after every HGMMA).
A tuning aid for the kernels' register and shared memory budget that costs no GPU time; it needs only Triton with
its bundled ptxas and cuobjdump. Timings still need the GPU (benchmarks/tune_attention.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from common import parse_tuning
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import mangle_type

from longgen.kernels import gluon_attention as ga
from longgen.kernels.dispatch import GLUON_HEAD_DIMS
from longgen.kernels.plan import K_BLOCK_SPARSE, K_FULL, K_SINK_WINDOW, PatternParams, Tuning

PATTERNS = {  # name -> pattern parameters (the benchmark's patterns, 32 KV heads)
    "full": PatternParams(K_FULL, dense_from=32),
    "sink_window": PatternParams(K_SINK_WINDOW, sink=64, window=2048, dense_from=32),
    "block_sparse": PatternParams(K_BLOCK_SPARSE, block=64, local=16, stride=32, step=1, dense_from=32),
}
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _ptxas() -> str:
    """The ptxas Triton itself uses for sm_90 (its bundled ones differ between Triton versions)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(90).path


def _desc_type(rows: int, d: int, dtype: torch.dtype = torch.bfloat16) -> str:
    gl_dtype = {torch.bfloat16: gl.bfloat16, torch.float32: gl.float32}[dtype]
    layout = gl.NVMMASharedLayout.get_default_for([rows, d], gl_dtype)
    t = torch.empty(1024, 4096, dtype=dtype)
    return mangle_type(TensorDescriptor(t, list(t.shape), list(t.stride()), [rows, d], layout))


def _compile(kernel, descs: dict[str, tuple], scalars: dict[str, str], constexprs: dict):
    """Compile `kernel` for sm_90a: descs maps a descriptor argument to its tile (rows, cols[, torch dtype])."""
    sig = {name: _desc_type(*shape) for name, shape in descs.items()} | scalars
    sig |= dict.fromkeys(constexprs, "constexpr")
    # the launcher's specialisation at the benchmark shapes: pointers (torch allocations) and the integer
    # arguments (lengths, head counts: multiples of 16 there) divisible by 16
    attrs = {(kernel.arg_names.index(k),): [["tt.divisibility", 16]] for k, t in scalars.items() if t != "fp32"}
    src = GluonASTSource(
        kernel, sig, constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()}, attrs=attrs
    )
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def compile_case(kernel: str, pattern: str, d: int, G: int, tuning: Tuning):
    """Compiled kernel ("fwd", "dq" or "dkdv") for one case, launched as longgen launches it."""
    pat = PATTERNS[pattern]
    cx = dict(PAT=tuple(pat), G=G, D=d, num_warps=4)
    if kernel == "fwd":
        bn, stages = ga.forward_tiles(pat.kind, pat.block, tuning.fwd_stages)
        cx |= dict(BM=ga.ROWS, BN=bn, STAGES=stages)
        descs = {"q_desc": (ga.ROWS, d), "k_desc": (bn, d), "v_desc": (bn, d)}
        scalars = {"o_ptr": "*bf16", "lse_ptr": "*fp32", "T": "i32", "H": "i32", "n_work": "i32", "qk_scale": "fp32"}
        return _compile(ga._fwd_ws_kernel, descs, scalars, cx)
    if kernel == "dq":
        bn, stages = ga.dq_tiles(pat.kind, pat.block)
        cx |= dict(HAS_DLSE=False, BM=ga.ROWS, BN=bn, STAGES=stages)
        descs = dict.fromkeys(("q_desc", "do_desc", "dq_desc"), (ga.ROWS, d)) | dict.fromkeys(
            ("k_desc", "v_desc"), (bn, d)
        )
        scalars = {"o_ptr": "*bf16", "do_ptr": "*bf16", "lse_ptr": "*fp32", "dlse_ptr": "*fp32", "delta_ptr": "*fp32"}
        scalars |= {"T": "i32", "H": "i32", "qk_scale": "fp32", "sm_scale": "fp32"}
        return _compile(ga._dq_ws_kernel, descs, scalars, cx)
    cx |= dict(BY_KIND=pattern == "block_sparse", TL=ga.BWD_TILE, STAGES=tuning.bwd_stages)
    cx |= dict(DESCEND=ga.dkdv_descends(G, pat.kind))
    names = ("q_desc", "do_desc", "k_desc", "v_desc", "dk_desc", "dv_desc")
    scalars = {"lse_ptr": "*fp32", "delta_ptr": "*fp32", "T": "i32", "H": "i32", "HKV": "i32", "SH": "i32"}
    scalars |= {"NP": "i32", "LEAD": "i32"}
    scalars |= {"qk_scale": "fp32", "sm_scale": "fp32"}
    return _compile(ga._dkdv_ws_kernel, dict.fromkeys(names, (ga.BWD_TILE, d)), scalars, cx)


def resources(compiled) -> dict:
    """Registers, spills, shared memory, HGMMA / wait counts and the serialisation flag of a compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        ptxas = subprocess.run(
            [_ptxas(), "-v", "--gpu-name", "sm_90a", ptx, "-o", os.devnull],
            capture_output=True,
            text=True,
        ).stderr
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout

    def number(pattern: str) -> int:
        m = re.search(pattern, ptxas)
        return int(m.group(1)) if m else 0

    return {
        "regs": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "shared_kb": round(compiled.metadata.shared / 1024, 1),
        "hgmma": sass.count("HGMMA"),
        "waits": sass.count("WARPGROUP.DEPBAR"),
        "serialised": "serialized" in ptxas,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernels", nargs="+", default=["fwd", "dq", "dkdv"], choices=["fwd", "dq", "dkdv"])
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    ap.add_argument("--head-dims", type=int, nargs="+", default=[128, 64], choices=list(GLUON_HEAD_DIMS))
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 4], help="query heads per KV head")
    ap.add_argument("--json", action="store_true", help="one JSON object per case instead of a table")
    ap.add_argument("--set", default="", help="launch tuning (longgen.kernels.plan.Tuning), e.g. bwd_stages=4")
    args = ap.parse_args(argv)
    try:
        tuning = parse_tuning(args.set)
    except ValueError as e:
        ap.error(str(e))
    for kernel in args.kernels:
        for pattern in args.patterns:
            for d in args.head_dims:
                for G in args.groups:
                    r = resources(compile_case(kernel, pattern, d, G, tuning))
                    if args.json:
                        print(json.dumps(dict(kernel=kernel, pattern=pattern, head_dim=d, group=G, **r)), flush=True)
                        continue
                    print(
                        f"{kernel:<5} {pattern:<13} d {d:<3} G {G}: {r['regs']} regs (launch), "
                        f"spills {r['spill_stores']} B stored / {r['spill_loads']} B loaded, "
                        f"smem {r['shared_kb']} KiB, "
                        f"HGMMA {r['hgmma']}, waits {r['waits']}{', SERIALISED' if r['serialised'] else ''}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
