"""Where the forward+backward time goes besides the attention kernels' own time (GPU only).

`benchmarks/attention.py` times a call with `triton.testing.do_bench` (L2 flushed before each call, CUDA events
around it); `tune_attention.py` also sums each kernel's profiled CUDA time. The two differ (e.g. SinkWindow 128K kv
32: 35.7 ms timed, 35.0 ms of kernels). This script splits the difference for one case into:

- `do_bench_ms`: as attention.py times it (median, L2 flushed);
- `back_to_back_ms`: CUDA events around `--iters` calls in a row, no flush, per call;
- `kernels_ms`: profiled kernel time per call (all kernels), `span_ms`: first kernel start to last kernel end of a
  call, `idle_ms`: span minus kernels (the GPU waiting inside a call), `between_ms`: idle time from one call's
  last kernel to the next call's first, and the gaps inside a call listed after the kernel they follow;
- `host_ms`: CPU time of one call (Python and launches; no synchronisation inside the call).

Usage: python host_gaps.py --cases sink_window:131072:32 [--iters 20] [--out results.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict

import torch
from common import run_metadata, save_result
from tune_attention import parse_case

import longgen


def _kernel_events(trace_path: str) -> list[tuple[float, float, str]]:
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    out = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") == "kernel"]
    return sorted(out)


def call_gaps(events: list[tuple[float, float, str]], first_kernel: str = "fwd") -> dict:
    """Per-call summary (medians, ms) of a sorted kernel timeline [(start_us, end_us, name)] of back-to-back calls,
    each starting with the first kernel whose name contains `first_kernel` (kernels before the first call are left
    out): kernel time, span, idle time inside a call, idle time between calls, and the idle time after each kernel."""
    first = next((name for _, _, name in events if first_kernel in name), None)
    if first is None:
        raise ValueError(f"no kernel named like {first_kernel!r} in the profiled timeline")
    calls: list[list[tuple[float, float, str]]] = []
    for e in events:
        if e[2] == first or not calls:
            calls.append([])
        calls[-1].append(e)
    calls = [c for c in calls if c[0][2] == first]
    gaps: dict[str, list[float]] = defaultdict(list)
    spans, busy, between = [], [], []
    for i, c in enumerate(calls):
        spans.append((c[-1][1] - c[0][0]) / 1e3)
        busy.append(sum(e1 - e0 for e0, e1, _ in c) / 1e3)
        for (_, a1, an), (b0, _, _) in itertools.pairwise(c):
            gaps[an[:60]].append(max(0.0, b0 - a1) / 1e3)
        if i + 1 < len(calls):
            between.append((calls[i + 1][0][0] - c[-1][1]) / 1e3)
    return dict(
        calls_profiled=len(calls),
        kernels_per_call=statistics.median(len(c) for c in calls),
        kernels_ms=statistics.median(busy),
        span_ms=statistics.median(spans),
        idle_ms=statistics.median(s - b for s, b in zip(spans, busy, strict=True)),
        between_ms=statistics.median(between) if between else 0.0,
        gaps_after_ms={name: statistics.median(g) for name, g in gaps.items()},
    )


def measure(pattern, T: int, hkv: int, iters: int, H: int = 32, d: int = 128) -> dict:
    from torch.profiler import ProfilerActivity, profile
    from triton.testing import do_bench

    torch.manual_seed(0)
    q = torch.randn(1, T, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, T, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, T, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)

    def call():
        q.grad = k.grad = v.grad = None
        longgen.sparse_attention(q, k, v, pattern, backend="triton").backward(do)

    res = {"do_bench_ms": do_bench(call, warmup=50, rep=300, return_mode="median")}
    call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        call()
    end.record()
    torch.cuda.synchronize()
    res["back_to_back_ms"] = start.elapsed_time(end) / iters

    host = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        host.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    res["host_ms"] = statistics.median(host)

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            call()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        ev = _kernel_events(path)
    res.update(call_gaps(ev))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", required=True, help="pattern:seq_len:kv_heads (as tune_attention.py)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args(argv)
    cases = [(case, *parse_case(case)) for case in args.cases]
    if not torch.cuda.is_available():
        raise SystemExit("host_gaps.py needs a CUDA GPU")
    rows = []
    for case, pattern, T, hkv in cases:
        row = {"case": case, **measure(pattern, T, hkv, args.iters)}
        rows.append(row)
        print(
            f"{case}: do_bench {row['do_bench_ms']:.2f} | back to back {row['back_to_back_ms']:.2f} | kernels "
            f"{row['kernels_ms']:.2f} span {row['span_ms']:.2f} idle {row['idle_ms']:.3f} between "
            f"{row['between_ms']:.3f} | host {row['host_ms']:.2f} ms | {row['kernels_per_call']} kernels",
            flush=True,
        )
        for name, ms in row["gaps_after_ms"].items():
            print(f"    gap after {name}: {ms * 1e3:.1f} us")
    if args.out:
        save_result(args.out, {**run_metadata(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
