"""Training-step benchmark: a Llama-2-7B-shaped model, full attention vs LongGen hybrids, one long sequence.

    PYTHONPATH=src python benchmarks/train_step.py [--layers 6] [--seq-lens 32768 65536 131072]

Hidden 4096, 32 heads, head dim 128, MLP 11008, vocab 32000, random weights; `--layers` layers with the 1/3
full-layer fraction (middle placement). Each step is the real training path: `CausalLMLoss` (chunked loss),
activation checkpointing, bf16 autocast over float32 parameters, AdamW. Variants: all layers full attention
(SDPA), hybrid SinkWindow(64, 2048), hybrid BlockSparse(64, 16, 32). Median step time over `--steps` after a
warm-up step; peak memory. Writes `--out` (JSON) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import llama2_7b_config, markdown_header, run_metadata, save_result

import longgen
from longgen.train.loss import CausalLMLoss


def build(layers: int, seq_len: int, variant: str, compile: bool = False):
    from transformers import AutoModelForCausalLM

    cfg = llama2_7b_config(layers, seq_len)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    patterns = {
        "full": None,
        "hybrid_sink_window": longgen.SinkWindow(64, 2048),
        "hybrid_block_sparse": longgen.BlockSparse(64, 16, 32),
    }
    if patterns[variant] is None:
        longgen.convert(model, full_fraction=1.0)
    else:
        longgen.convert(model, pattern=patterns[variant])
    model.config.use_cache = False
    longgen.model.enable_activation_checkpointing(model)
    if compile:  # what the train loop's `model.compile: true` does
        for layer in model.model.layers:
            layer.compile()
    return model


def run(layers: int, seq_len: int, variant: str, steps: int, compile: bool = False) -> dict:
    model = build(layers, seq_len, variant, compile)
    wrapped = CausalLMLoss(model, chunk=4096).train()
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-5, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 32000, (1, seq_len), device="cuda", generator=gen)
    pos = torch.arange(seq_len, device="cuda")[None]
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_sum, n = wrapped(ids, pos, ids)
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i > 0:  # the first step compiles kernels and allocates
            times.append((time.perf_counter() - t0) * 1e3)
        if not torch.isfinite(loss_sum):
            raise RuntimeError(f"non-finite loss in {variant}")
    step_ms = statistics.median(times)
    row = {
        "variant": variant,
        "seq_len": seq_len,
        "layers": layers,
        "compile": compile,
        "step_ms": round(step_ms, 1),
        "tokens_per_s": round(seq_len / step_ms * 1e3, 1),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "step_ms_all": [round(t, 1) for t in times],
    }
    del model, wrapped, opt
    gc.collect()
    torch.cuda.empty_cache()
    return row


def _key(row: dict) -> tuple:
    return row["variant"], row["seq_len"], row["layers"], row.get("compile", False)


def markdown(res: dict) -> str:
    lines = [
        *markdown_header(
            "Training step: full attention vs LongGen hybrids (Llama-2-7B-shaped layers)",
            res,
            "One sequence per step; activation checkpointing, bf16 autocast, float32 AdamW; median of the timed steps.",
        ),
        "| variant | seq | layers | compiled | step ms | tokens/s | peak GB | speedup vs full |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    full = {_key(r)[1:]: r["step_ms"] for r in res["rows"] if r["variant"] == "full"}
    for r in sorted(res["rows"], key=lambda r: (_key(r)[1:], r["variant"])):
        sp = full.get(_key(r)[1:])
        compiled = "yes" if r.get("compile") else "no"
        lines.append(
            f"| {r['variant']} | {r['seq_len']} | {r['layers']} | {compiled} | {r['step_ms']:.0f} | "
            f"{r['tokens_per_s']:,.0f} | "
            f"{r['peak_mem_gb']:.1f} | {sp / r['step_ms'] if sp else float('nan'):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 65536, 131072])
    ap.add_argument("--variants", nargs="+", default=["full", "hybrid_sink_window", "hybrid_block_sparse"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (train loop option)")
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/train_step.py needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {"rows": []}
    res.update(run_metadata())
    for T in args.seq_lens:
        for v in args.variants:
            row = run(args.layers, T, v, args.steps, args.compile)
            print(
                f"{v:<22} T={T:>6}: step {row['step_ms']:9.1f} ms  {row['tokens_per_s']:9,.0f} tok/s  "
                f"peak {row['peak_mem_gb']:.1f} GB",
                flush=True,
            )
            key = (v, T, args.layers, args.compile)
            res["rows"] = [r for r in res["rows"] if (*_key(r),) != key]
            res["rows"].append(row)
            save_result(out, res, markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
