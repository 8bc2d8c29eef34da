"""TMA reduce-add bandwidth on Hopper: how fast float32 tiles can be added from shared into global memory (GPU).

    PYTHONPATH=src python benchmarks/tma_reduce_bandwidth.py [--ctas-per-sm 1 2] [--iters 4000] [--out R.json]
    PYTHONPATH=src python benchmarks/tma_reduce_bandwidth.py --compile-only     (no GPU: sm_90a compile check)

Why: the one-pass attention backwards measured 2026-12-01 (docs/kernels/attention.md, "One-pass backward") added their
dQ tiles into a float32 accumulator with TMA reduce-adds and reached only 1.0-2.3 TB/s of reduced bytes, too slow
to beat the split backward; whether the limit was the TMA reduce path itself, the register -> shared-memory staging
or many programs adding into the same rows was not isolated. This measures each in isolation.

Each CTA (one warpgroup, no tensor work) repeats ITERS times: [STAGE: wait until the staging buffer's previous
operation has read it, store a register tile into it, fence], then one TMA operation of a ROWS x COLS float32 tile
from the buffer: a reduce-add, or a plain store for comparison. Row tiles by MODE: "spread" (every CTA its own
tiles, streaming through a 512 MiB accumulator, more than L2) or "shared" (all CTAs add into the same 32 row tiles
at the same time, as the concurrent programs of one head reduce into the same query rows). Prints the rate of moved
bytes (TB/s) per variant, the median of 3 launches after a 2 s warm-up, and checks the accumulator's sum (every
reduce adds 1.0 to each element of its tile).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from longgen.kernels.gluon_attention import _tma_store

ROWS, COLS = 64, 128  # the one-pass backward's dQ tile: 64 query rows x head dim 128
SPREAD_TILES = 512 * 2**20 // (ROWS * COLS * 4)  # 512 MiB accumulator
SHARED_TILES = 32
REPEATS = 3  # timed launches per variant; the median is reported


@builtin
def _tma_reduce_add_shim(tensor_desc, coord, src, _semantic=None):
    """`cp.reduce.async.bulk.tensor ... add`: Triton 3.6 has the operation but no Gluon wrapper on Hopper (later
    versions: `tma.async_atomic_add`)."""
    from triton._C.libtriton import ir

    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


_tma_reduce_add = getattr(tma, "async_atomic_add", None) or _tma_reduce_add_shim


@gluon.jit
def _reduce_kernel(
    acc_desc,
    iters,
    n_tiles,
    SHARED: gl.constexpr,
    STORE: gl.constexpr,
    STAGE: gl.constexpr,
    BUFS: gl.constexpr,
    R: gl.constexpr,
    C: gl.constexpr,
    num_warps: gl.constexpr,
):
    pid = gl.program_id(0)
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [num_warps, 1], [1, 0])
    buf = gl.allocate_shared_memory(gl.float32, [BUFS, R, C], acc_desc.layout)
    ones = gl.full([R, C], 1.0, gl.float32, layout)
    for k in gl.static_range(BUFS):
        buf.index(k).store(ones)
    fence_async_shared()
    for i in range(iters):
        src = buf.index(i % BUFS)
        if STAGE:
            tma.store_wait(pendings=BUFS - 1)  # the buffer's previous operation has read it
            src.store(ones)
            fence_async_shared()
        t = i % n_tiles if SHARED else (pid * iters + i) % n_tiles
        if STORE:
            _tma_store(acc_desc, [t * R, 0], src)
        else:
            _tma_reduce_add(acc_desc, [t * R, 0], src)
    tma.store_wait(pendings=0)


VARIANTS = [  # (mode, op, stage, bufs)
    (mode, op, stage, bufs)
    for mode, op, stage, bufs in itertools.product(("spread", "shared"), ("reduce", "store"), (0, 1), (1, 2))
    if not (stage == 0 and bufs == 2)  # without staging the buffers are only read: one is enough
]


def _constexprs(mode: str, op: str, stage: int, bufs: int) -> dict:
    return dict(SHARED=mode == "shared", STORE=op == "store", STAGE=bool(stage), BUFS=bufs, R=ROWS, C=COLS)


def _layout():
    return gl.NVMMASharedLayout.get_default_for([ROWS, COLS], gl.float32)


def measure(mode: str, op: str, stage: int, bufs: int, ctas: int, iters: int) -> dict:
    n_tiles = SHARED_TILES if mode == "shared" else SPREAD_TILES
    acc = torch.zeros(n_tiles * ROWS, COLS, device="cuda", dtype=torch.float32)
    desc = TensorDescriptor(acc, list(acc.shape), list(acc.stride()), [ROWS, COLS], _layout())

    def launch(n):
        _reduce_kernel[(ctas,)](desc, n, n_tiles, **_constexprs(mode, op, stage, bufs), num_warps=4)

    launch(2)  # compile
    times = []
    for _ in range(REPEATS):
        torch.cuda.synchronize()
        acc.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch(iters)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    ms = sorted(times)[len(times) // 2]
    moved = ctas * iters * ROWS * COLS * 4
    row = dict(mode=mode, op=op, stage=stage, bufs=bufs, ctas=ctas, iters=iters, ms=round(ms, 3))
    row["ms_all"] = [round(t, 3) for t in times]
    row["tb_per_s"] = round(moved / ms / 1e9, 3)
    if op == "reduce":  # every reduce (of the last repeat) added 1.0 to each element of one tile
        row["sum_ok"] = acc.double().sum().item() == moved / 4
    return row


def warm_up(seconds: float = 2.0) -> None:
    """Keep the GPU busy for a while first, so that no variant is timed at idle clocks. (Not what slowed the first
    run on 2026-12-02: there the first timed launch of every variant was 5-20x slower than the next ones even after
    this warm-up and an untimed launch, cause not found; hence the median of `REPEATS` launches.)"""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    while True:
        for _ in range(20):
            a @ a
        end.record()
        torch.cuda.synchronize()
        if start.elapsed_time(end) > seconds * 1e3:
            return


def compile_only() -> int:
    from gluon_resources import _compile, resources

    for mode, op, stage, bufs in VARIANTS:
        compiled = _compile(
            _reduce_kernel,
            {"acc_desc": (ROWS, COLS, torch.float32)},
            {"iters": "i32", "n_tiles": "i32"},
            dict(_constexprs(mode, op, stage, bufs), num_warps=4),
        )
        r = resources(compiled)
        reduces = compiled.asm["ptx"].count("cp.reduce.async.bulk.tensor")
        print(
            f"{mode:<6} {op:<6} stage {stage} bufs {bufs}: {r['regs']} regs, spills {r['spill_stores']} B, "
            f"smem {r['shared_kb']} KiB, TMA reduce instructions in the PTX: {reduces}",
            flush=True,
        )
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctas-per-sm", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--iters", type=int, default=4000, help="TMA operations per CTA")
    ap.add_argument("--compile-only", action="store_true", help="compile every variant for sm_90a (no GPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.compile_only:
        return compile_only()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("benchmarks/tma_reduce_bandwidth.py needs a Hopper GPU (or --compile-only)", file=sys.stderr)
        return 2
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    warm_up()
    rows = []
    for per_sm in args.ctas_per_sm:
        for variant in VARIANTS:
            r = measure(*variant, ctas=per_sm * sms, iters=args.iters)
            rows.append(r)
            print(json.dumps(r), flush=True)
    if args.out:
        from common import run_metadata

        with open(args.out, "w") as f:
            json.dump(dict(run_metadata(), command=" ".join(sys.argv), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
