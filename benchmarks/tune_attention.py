"""Tile configurations of the Triton attention kernels: time per kernel (GPU; a tuning aid, not a target check).

    PYTHONPATH=src python benchmarks/tune_attention.py [--cases full:32768:32 sink_window:131072:32 ...]
        [--configs "fwd=128x64/w8s3 dq=128x64/w8s3 dkdv=32x64/w4s4" ...] [--baseline OLD_triton_attention.py]
        [--gluon 1 fwd,dkdv fwd 0] [--knobs "" bwd_stages=4] [--repeats 1] [--out results.json]

For every config and case (pattern[/parameters]:seq_len:kv_heads, see `parse_case`; bf16, batch 1, 32 query heads,
head dim 128) it prints the median forward and forward+backward time (`triton.testing.do_bench`) and the CUDA time of
each kernel (forward, dQ, dK/dV, everything else) from torch.profiler over 5 forward+backward calls, so one run tunes
the three kernels independently. A tile is BLOCK_MxBLOCK_N/wWARPSsSTAGES; BlockSparse clamps BLOCK_N to its block size.
`--baseline` also runs an older copy of `triton_attention.py` with its own default tiles (A/B of a kernel change);
`--gluon` runs every case under each LONGGEN_GLUON setting (1: the Hopper forward, dK/dV and dQ kernels where they
apply, 0: Triton only, or a comma-separated subset of fwd,dkdv,dq); `--knobs` runs each case under each launch
tuning (`longgen.kernels.plan.Tuning` fields, name=VALUE,...; "" = the defaults), passed to the kernels with the tiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import sys
from collections import defaultdict

import torch
from common import cuda_kernel_table, parse_tuning, run_metadata, save_result
from triton.testing import do_bench

import longgen
from longgen.kernels import dispatch
from longgen.kernels import triton_attention as current
from longgen.kernels.inputs import check_attention_args
from longgen.kernels.plan import Tiles

PATTERNS = {  # name -> (pattern from the KV-head count and parameters, default parameters)
    "full": (lambda kv: longgen.Full(), ()),
    "sink_window": (lambda kv, sink, window: longgen.SinkWindow(sink, window), (64, 2048)),
    "block_sparse": (lambda kv, block, local, stride=None: longgen.BlockSparse(block, local, stride or kv), (64, 16)),
}


def parse_case(case: str):
    """(pattern, seq_len, kv_heads) of "NAME[/P1,P2,...]:SEQ_LEN:KV_HEADS": the benchmark's patterns by default,
    e.g. "sink_window:131072:32" = SinkWindow(64, 2048), or with their parameters, e.g. "sink_window/64,8192:131072:32"
    or "block_sparse/64,16,8:131072:32" (BlockSparse's stride defaults to the KV-head count)."""
    parts = case.split(":")
    name, _, params = parts[0].partition("/")
    if len(parts) != 3 or name not in PATTERNS or not parts[1].isdigit() or not parts[2].isdigit():
        names = ", ".join(PATTERNS)
        raise ValueError(f"bad case {case!r}: expected NAME[/P1,P2,...]:SEQ_LEN:KV_HEADS, NAME one of {names}")
    make, defaults = PATTERNS[name]
    try:
        values = tuple(int(p) for p in params.split(",")) if params else defaults
        pattern = make(int(parts[2]), *values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bad case {case!r}: {e}") from e
    return pattern, int(parts[1]), int(parts[2])


KERNELS = ("_fwd_kernel", "_dq_kernel", "_dkdv_kernel", "_fwd_ws_kernel", "_dq_ws_kernel", "_dkdv_ws_kernel")
MODULE = "longgen.kernels.triton_attention"


def parse_config(text: str) -> dict:
    cfg = {}
    for part in text.split():
        name, tile = part.split("=")
        m = re.fullmatch(r"(\d+)x(\d+)/w(\d+)s(\d+)", tile)
        if name not in ("fwd", "dq", "dkdv") or m is None:
            raise ValueError(f"bad tile {part!r}: expected fwd|dq|dkdv=BMxBN/wWARPSsSTAGES")
        cfg[name] = Tiles(*map(int, m.groups()))
    return cfg


def kernel_times(fn, iters: int = 5) -> dict[str, float]:
    """ms per call of each attention kernel (and of everything else) over `iters` calls of fn."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = defaultdict(float)
    for name, (ms, _) in cuda_kernel_table(prof).items():
        out[next((k for k in KERNELS if k in name), "other")] += ms / iters
    return dict(out)


def measure(module, tuning, pattern, T: int, hkv: int, H: int = 32, d: int = 128, check=None, case=None) -> dict:
    """Time one case with `module` standing in for longgen's kernel module, launched with `tuning` (tiles and
    launch settings; None: an older module's own defaults). With `check` (a dict), the first configuration's
    gradients of `case` are kept there and later ones compared to them."""
    sys.modules[MODULE] = module  # longgen.sparse_attention imports the kernels lazily from here
    try:
        torch.manual_seed(T + hkv)  # the same inputs for every configuration of a case (see --check)
        q = torch.randn(1, T, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, T, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, T, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn_like(q)

        def fwd():
            if tuning is None:
                return longgen.sparse_attention(q, k, v, pattern, backend="triton")
            shape = check_attention_args(q, k, v, pattern, None, None, None, 0, None)
            return module.triton_attention(q, k, v, shape, None, False, tuning)

        def fwd_bwd():
            q.grad = k.grad = v.grad = None
            fwd().backward(do)

        out = {
            "ms_fwd": do_bench(fwd, return_mode="median"),
            "ms_fwd_bwd": do_bench(fwd_bwd, return_mode="median"),
            "kernels_ms": kernel_times(fwd_bwd),
        }
        if check is not None:
            fwd_bwd()
            grads = [q.grad, k.grad, v.grad]
            if case in check:  # worst gradient difference relative to the first configuration's largest entry
                out["max_rel_diff"] = max(
                    ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                    for a, b in zip(grads, check[case], strict=True)
                )
            else:
                check[case] = grads
        return out
    finally:
        sys.modules[MODULE] = current


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("triton_attention_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=["full:32768:32", "sink_window:131072:32", "block_sparse:131072:32"])
    ap.add_argument("--configs", nargs="*", default=[], help="tile sets; none = the current defaults")
    ap.add_argument("--baseline", default=None, help="an older triton_attention.py to A/B against")
    ap.add_argument(
        "--gluon",
        nargs="+",
        default=[os.environ.get("LONGGEN_GLUON", "1")],
        help="LONGGEN_GLUON settings: 1 (all Hopper kernels), 0 (none), or subsets such as fwd,dkdv",
    )
    ap.add_argument(
        "--knobs",
        nargs="+",
        default=[""],
        help='launch tunings (Tuning fields), each run as its own configuration, e.g. "" bwd_stages=4',
    )
    ap.add_argument("--repeats", type=int, default=1, help="run the whole sweep this many times (noise check)")
    ap.add_argument(
        "--check",
        action="store_true",
        help="compare every configuration's gradients with the first one's on the same inputs (max_rel_diff)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    for gluon in args.gluon:
        os.environ["LONGGEN_GLUON"] = gluon
        try:
            dispatch.gluon_parts()
        except ValueError as e:
            ap.error(str(e))
    try:
        tunings = {knobs: parse_tuning(knobs) for knobs in args.knobs}
    except ValueError as e:
        ap.error(str(e))
    try:
        cases = {case: parse_case(case) for case in args.cases}
    except ValueError as e:
        ap.error(str(e))
    if not torch.cuda.is_available():
        print("benchmarks/tune_attention.py needs a CUDA GPU", file=sys.stderr)
        return 2
    runs = [("current", current, parse_config(c), c) for c in args.configs] or [("current", current, None, "defaults")]
    if args.baseline:
        runs.insert(0, ("baseline", load_baseline(args.baseline), None, "defaults"))
    rows = []
    meta = run_metadata()
    check = {} if args.check else None
    for rep in range(args.repeats):
        for (label, module, cfg, cfg_text), gluon, knobs in (
            (r, g, kn) for r in runs for g in args.gluon for kn in args.knobs
        ):
            os.environ["LONGGEN_GLUON"] = gluon
            label = f"{label} gluon={gluon}" + (f" {knobs}" if knobs else "")
            tuning = None if label.startswith("baseline") else dataclasses.replace(tunings[knobs], tiles=cfg)
            for case, (pattern, T, hkv) in cases.items():
                try:
                    r = measure(module, tuning, pattern, T, hkv, check=check, case=case)
                except Exception as e:  # a config can exceed shared memory: report it and go on
                    print(f"{label} [{cfg_text}] {case}: failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                parts = " ".join(f"{k.strip('_')}={v:.2f}" for k, v in sorted(r["kernels_ms"].items()))
                if "max_rel_diff" in r:
                    parts += f" | grad diff {r['max_rel_diff']:.1e}"
                print(
                    f"{label} [{cfg_text}] {case}: fwd {r['ms_fwd']:.2f} fwd+bwd {r['ms_fwd_bwd']:.2f} | {parts}",
                    flush=True,
                )
                rows.append(dict(module=label, config=cfg_text, knobs=knobs, case=case, repeat=rep, **r))
                if args.out:  # after every row, so that a run cut short keeps what it measured
                    save_result(args.out, {**meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
