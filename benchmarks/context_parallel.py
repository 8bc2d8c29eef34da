"""Context-parallel training benchmark: a Llama-2-7B-shaped model on one long sequence sharded over N GPUs.

    torchrun --nproc-per-node 4 benchmarks/context_parallel.py [--seq-lens 131072 65536] [--layers 32]
    torchrun --nproc-per-node 2 benchmarks/context_parallel.py --tiny --device cpu    # a tiny end-to-end check

Hidden 4096, 32 heads (32 KV heads), head dim 128, MLP 11008, vocab 32000, random weights (bf16 parameters by
default), 32 layers with the 1/3 full-layer fraction (middle placement) of `longgen.convert`. Each step is the
training path of `longgen.train`: FSDP2 over all N ranks, context parallelism over `--cp` ranks (default N:
every GPU holds 1/N of the sequence; `longgen.train.context_parallel`), activation checkpointing, the chunked
loss, AdamW. Variants: hybrid SinkWindow(64, 2048), hybrid BlockSparse(64, 16, 32), all layers full attention.
Median step time over `--steps` after `--warmup` steps, global tokens/s, peak memory per GPU (the largest over
ranks). A variant that runs out of memory is recorded as such and the run goes on. Rank 0 writes `--out`
(JSON) and a markdown table beside it, after every case.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from common import git_commit, llama2_7b_config, markdown_header, save_result

import longgen
from longgen.train.context_parallel import context_parallel_attention, setup_context_parallel, shard_batch
from longgen.train.loss import IGNORE_INDEX, CausalLMLoss

VARIANTS = ("hybrid_sink_window", "hybrid_block_sparse", "full")


def model_config(tiny: bool, layers: int, seq_len: int):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=seq_len,
        )
    return llama2_7b_config(layers, seq_len)


def patterns(tiny: bool) -> dict:
    if tiny:
        return {"hybrid_sink_window": longgen.SinkWindow(4, 32), "hybrid_block_sparse": longgen.BlockSparse(16, 2)}
    return {"hybrid_sink_window": longgen.SinkWindow(64, 2048), "hybrid_block_sparse": longgen.BlockSparse(64, 16, 32)}


def build(args, variant: str, seq_len: int, device: torch.device):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    with device:
        model = AutoModelForCausalLM.from_config(
            model_config(args.tiny, args.layers, seq_len), dtype=getattr(torch, args.param_dtype)
        )
    if variant == "full":
        longgen.convert(model, full_fraction=1.0)
    else:
        longgen.convert(model, pattern=patterns(args.tiny)[variant])
    model.config.use_cache = False
    longgen.model.enable_activation_checkpointing(model)
    wrapped = CausalLMLoss(model, chunk=args.loss_chunk).train()
    # FSDP2 over all ranks (data x context flattened), as longgen.train does
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, args.compute_dtype), reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(wrapped, mp_policy=mp)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-5)
    return wrapped, opt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(args, variant: str, seq_len: int, cp, device: torch.device) -> dict:
    """Time one (variant, seq_len); every rank returns the same row."""
    world = dist.get_world_size()
    wrapped, opt = build(args, variant, seq_len, device)
    vocab = wrapped.lm.config.vocab_size
    gen = torch.Generator().manual_seed(cp.dp_rank)  # the context ranks of one data rank share their sequence
    ids = torch.randint(0, vocab, (1, seq_len), generator=gen)
    batch = {"input_ids": ids, "position_ids": torch.arange(seq_len)[None], "labels": ids}
    b = {k: v.to(device) for k, v in shard_batch(batch, cp.rank, cp.size).items()}
    n_global = torch.tensor(float((b["targets"] != IGNORE_INDEX).sum()), device=device)
    dist.all_reduce(n_global)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        _sync(device)
        t0 = time.perf_counter()
        with context_parallel_attention(cp.group, b["full_position_ids"]):
            loss_sum, _ = wrapped(b["input_ids"], b["position_ids"], b["targets"], True)
            (loss_sum * (world / n_global)).backward()  # FSDP averages over ranks: the global token mean
        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= args.warmup:  # the first steps compile kernels and allocate
            times.append((time.perf_counter() - t0) * 1e3)
        if not torch.isfinite(loss_sum):
            raise RuntimeError(f"non-finite loss in {variant}")
    step = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(step, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank finishes
    step_ms = float(step)
    peak = None
    if device.type == "cuda":
        p = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=device)
        dist.all_reduce(p, op=dist.ReduceOp.MAX)
        peak = round(float(p), 2)
    return {
        "variant": variant,
        "seq_len": seq_len,
        "gpus": world,
        "cp": cp.size,
        "layers": args.layers,
        "status": "ok",
        "step_ms": round(step_ms, 1),
        "tokens_per_s": round(seq_len * cp.dp_size / step_ms * 1e3, 1),
        "peak_mem_gb": peak,
        "step_ms_all": [round(t, 1) for t in times],
    }


def run_case_safely(args, variant: str, seq_len: int, cp, device: torch.device) -> dict:
    """`run_case`, recording an out-of-memory as a row (status "oom") instead of stopping the run.

    Every rank does the same work on equal shards, so an OOM strikes all ranks at the same allocation; they
    then agree on the outcome through one all-reduce and go on to the next case."""
    row, failed = None, torch.zeros(1, device=device)
    try:
        row = run_case(args, variant, seq_len, cp, device)
    except torch.OutOfMemoryError as e:
        print(f"rank {dist.get_rank()}: {variant} T={seq_len}: out of memory ({str(e).splitlines()[0]})", flush=True)
        failed += 1
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item() or row is None:
        row = {"variant": variant, "seq_len": seq_len, "gpus": dist.get_world_size(), "cp": cp.size}
        row.update(layers=args.layers, status="oom", step_ms=None, tokens_per_s=None, peak_mem_gb=None)
    return row


def metadata(device: torch.device, world: int) -> dict:
    import triton

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{world} x {torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        name = f"CPU, {world} processes (gloo)"
    return {
        "command": f"PYTHONPATH=src torchrun --nproc-per-node {world} " + " ".join(sys.argv),
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
    }


def markdown(res: dict) -> str:
    lines = [
        *markdown_header(
            "Context-parallel training step (Llama-2-7B-shaped, FSDP2 + Ulysses context parallelism)",
            res,
            "One sequence per step sharded over the context ranks; activation checkpointing, chunked loss, AdamW; "
            "median of the timed steps; tokens/s over all GPUs; peak memory of the fullest GPU.",
        ),
        "| variant | seq | GPUs | cp | layers | step ms | tokens/s | peak GB/GPU | speedup vs full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = sorted(res["rows"], key=lambda r: (r["gpus"], r["seq_len"], r["variant"]))
    full = {(r["gpus"], r["seq_len"]): r["step_ms"] for r in rows if r["variant"] == "full" and r["step_ms"]}
    for r in rows:
        if r["status"] != "ok":
            lines.append(
                f"| {r['variant']} | {r['seq_len']} | {r['gpus']} | {r['cp']} | {r['layers']} | "
                f"{r['status']} | - | - | - |"
            )
            continue
        sp = full.get((r["gpus"], r["seq_len"]))
        speedup = f"{sp / r['step_ms']:.2f}" if sp else "-"
        peak = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}"
        lines.append(
            f"| {r['variant']} | {r['seq_len']} | {r['gpus']} | {r['cp']} | {r['layers']} | {r['step_ms']:.0f} | "
            f"{r['tokens_per_s']:,.0f} | {peak} | {speedup} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=None, help="default 131072 65536 (--tiny: 256)")
    ap.add_argument("--layers", type=int, default=None, help="default 32 (--tiny: 3)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--cp", type=int, default=None, help="context-parallel size (default: all ranks)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--loss-chunk", type=int, default=4096)
    ap.add_argument("--param-dtype", default=None, choices=("bfloat16", "float32"), help="default bfloat16")
    ap.add_argument("--compute-dtype", default=None, choices=("bfloat16", "float32"), help="default bfloat16")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="a tiny model (with --device cpu: a CPU check of the script)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/context_parallel.json")
    args = ap.parse_args(argv)
    float_default = "float32" if args.device == "cpu" else "bfloat16"  # gloo and CPU kernels: float32
    args.param_dtype = args.param_dtype or float_default
    args.compute_dtype = args.compute_dtype or float_default
    args.seq_lens = args.seq_lens or ([256] if args.tiny else [131072, 65536])
    args.layers = args.layers or (3 if args.tiny else 32)
    if args.out is None:
        tiny_out = Path(tempfile.gettempdir()) / "context_parallel_tiny.json"
        args.out = str(tiny_out) if args.tiny else "benchmarks/results/context_parallel.json"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if "WORLD_SIZE" not in os.environ:
        print("launch with torchrun: torchrun --nproc-per-node N benchmarks/context_parallel.py ...", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/context_parallel.py needs CUDA GPUs (or --tiny --device cpu)", file=sys.stderr)
        return 2
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=20))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    cp = setup_context_parallel(args.cp or world, device.type)
    out = Path(args.out)
    res = json.loads(out.read_text()) if rank == 0 and out.exists() else {"rows": []}
    res.update(metadata(device, world))
    for T in args.seq_lens:
        for v in args.variants:
            row = run_case_safely(args, v, T, cp, device)
            if rank != 0:
                continue
            if row["status"] == "ok":
                peak = "-" if row["peak_mem_gb"] is None else f"{row['peak_mem_gb']:.1f} GB"
                print(
                    f"{v:<20} T={T:>6} gpus={world} cp={cp.size}: step {row['step_ms']:9.1f} ms  "
                    f"{row['tokens_per_s']:9,.0f} tok/s  peak {peak}",
                    flush=True,
                )
            else:
                print(f"{v:<20} T={T:>6} gpus={world} cp={cp.size}: {row['status']}", flush=True)
            key = (v, T, world, args.layers)
            res["rows"] = [r for r in res["rows"] if (r["variant"], r["seq_len"], r["gpus"], r["layers"]) != key]
            res["rows"].append(row)
            save_result(out, res, markdown(res))
    if rank == 0:
        print(markdown(res))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
