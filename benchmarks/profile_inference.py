"""Where the runner's time goes: torch.profiler over one prefill and a few decode steps, top CUDA kernels.

    PYTHONPATH=src python benchmarks/profile_inference.py [--layers 3] [--seq-len 131072] [--pattern sink_window]

A Llama-2-7B-shaped model with `--layers` layers (1/3 full, middle placement), random bf16 weights. Prints the
kernels with the most CUDA time for the prefill and for `--steps` decode steps (eager, so every launch shows),
plus the number of kernel launches per decode step, and for the prefill its wall time against the GPU's busy time
(idle gaps would mean host-side stalls).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch
from inference import PATTERNS, build, set_variant

from longgen.infer import ModelRunner


def gpu_timeline(prof, min_gap_ms: float = 0.5) -> tuple[float, float, float]:
    """(kernel busy ms, first-start to last-end ms, sum of idle gaps longer than `min_gap_ms`) of a profile."""
    events = sorted(
        (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e.time_range.start
    )
    if not events:
        return 0.0, 0.0, 0.0
    busy = sum(e.time_range.elapsed_us() for e in events) / 1e3
    span = (events[-1].time_range.end - events[0].time_range.start) / 1e3
    gaps = ((b.time_range.start - a.time_range.end) / 1e3 for a, b in itertools.pairwise(events))
    return busy, span, sum(g for g in gaps if g > min_gap_ms)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=131072)
    ap.add_argument("--variant", default="hybrid_sink_window", choices=list(PATTERNS))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    T = args.seq_len
    model = build(args.layers, T + args.steps + 8)
    set_variant(model, args.variant)
    runner = ModelRunner(model, max_len=T + args.steps + 8, cuda_graph=False)
    ids = torch.randint(0, 32000, (T,), device="cuda")
    runner.prefill(0, ids)  # compile and warm up
    tok = torch.zeros(1, dtype=torch.long, device="cuda")
    runner.decode(tok)
    torch.cuda.synchronize()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.prefill(0, ids)
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    print(f"== prefill, {args.variant}, {args.layers} layers, {T} tokens")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))
    busy, span, idle = gpu_timeline(prof)
    print(
        f"prefill wall {wall:.0f} ms; GPU span {span:.0f} ms, kernels busy {busy:.0f} ms, "
        f"idle gaps over 0.5 ms between kernels {idle:.0f} ms"
    )
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            runner.decode(tok)
        torch.cuda.synchronize()
    launches = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
    print(f"== decode, {args.steps} steps: {launches / args.steps:.0f} kernel launches per step")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
