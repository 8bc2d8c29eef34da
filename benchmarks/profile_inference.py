"""Where the runner's time goes: torch.profiler over one prefill and a few decode steps, top CUDA kernels.

    PYTHONPATH=src python benchmarks/profile_inference.py [--layers 3] [--seq-len 131072] [--pattern sink_window]

A Llama-2-7B-shaped model with `--layers` layers (1/3 full, middle placement), random bf16 weights. Prints the
kernels with the most CUDA time for the prefill and for `--steps` decode steps (eager, so every launch shows),
plus the number of kernel launches per decode step.
"""

from __future__ import annotations

import argparse
import sys

import torch
from inference import PATTERNS, build, set_variant

from longgen.infer import ModelRunner


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
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.prefill(0, ids)
        torch.cuda.synchronize()
    print(f"== prefill, {args.variant}, {args.layers} layers, {T} tokens")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))
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
