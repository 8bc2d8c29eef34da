"""Where a training step's time goes: torch.profiler over forward, backward and optimizer of one step.

    PYTHONPATH=src python benchmarks/profile_train_step.py [--layers 3] [--seq-len 131072] [--variant full]

The model and step are exactly `train_step.py`'s (Llama-2-7B-shaped layers, 1/3 full, chunked loss, activation
checkpointing, bf16 autocast over float32 parameters, fused AdamW). After one warm-up step, each phase of the next
step is profiled on its own. Prints, per phase, the CUDA time by category (GEMM, attention, everything else) and
the kernels with the most CUDA time.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch
from common import cuda_kernel_table
from train_step import build

from longgen.train.loss import CausalLMLoss

ATTENTION = ("flash", "fmha", "cudnn", "sdpa", "_fwd_kernel", "_dq_kernel", "_dkdv_kernel")
GEMM = ("gemm", "nvjet", "cutlass", "xmma", "cublas")


def category(kernel: str) -> str:
    name = kernel.lower()
    if any(k in name for k in ATTENTION):
        return "attention"
    if any(k in name for k in GEMM):
        return "gemm"
    return "other"


def report(phase: str, table: dict[str, tuple[float, int]], rows: int) -> None:
    total = sum(ms for ms, _ in table.values())
    cats: dict[str, float] = defaultdict(float)
    for name, (ms, _) in table.items():
        cats[category(name)] += ms
    split = ", ".join(f"{c} {ms:.1f} ms ({ms / total:.0%})" for c, ms in sorted(cats.items(), key=lambda x: -x[1]))
    print(f"== {phase}: {total:.1f} ms of CUDA time: {split}")
    for name, (ms, n) in sorted(table.items(), key=lambda x: -x[1][0])[:rows]:
        print(f"  {ms:9.2f} ms  {n:5d}x  [{category(name):9s}] {name[:110]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=131072)
    ap.add_argument("--variant", default="hybrid_sink_window")
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (train loop option)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/profile_train_step.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.profiler import ProfilerActivity, profile

    T = args.seq_len
    model = build(args.layers, T, args.variant, args.compile)
    wrapped = CausalLMLoss(model, chunk=4096).train()
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, 32000, (1, T), device="cuda")
    pos = torch.arange(T, device="cuda")[None]

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_sum, n = wrapped(ids, pos, ids)
        return loss_sum / n

    def optimizer():
        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up steps: kernels compile, memory is allocated
        forward().backward()
        optimizer()
    torch.cuda.synchronize()
    print(f"{args.variant}, {args.layers} layers, {T} tokens, compile={args.compile}")
    tables = {}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss = forward()
        torch.cuda.synchronize()
    tables["forward"] = cuda_kernel_table(prof)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss.backward()
        torch.cuda.synchronize()
    tables["backward (with the checkpointed recomputation)"] = cuda_kernel_table(prof)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        optimizer()
        torch.cuda.synchronize()
    tables["optimizer (clip + AdamW)"] = cuda_kernel_table(prof)
    for phase, table in tables.items():
        report(phase, table, args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
