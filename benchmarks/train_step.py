"""Training-step benchmark: full attention vs LongGen hybrids, one long sequence or packed short ones.

    PYTHONPATH=src python benchmarks/train_step.py [--layers 6] [--seq-lens 32768 65536 131072]
    PYTHONPATH=src python benchmarks/train_step.py --shape repro --seq-lens 2048 --pack 32 --variants full \
        --checkpointing off [--compile] --out benchmarks/results/train_step_repro.json

`--shape llama2-7b` (default): hidden 4096, 32 heads, head dim 128, MLP 11008, vocab 32000, `--layers` layers (6).
`--shape repro`: the quality experiment's model (`experiments/reproduction/settings.py`: 12 layers, hidden 512,
8 heads of 64, 4 KV heads, SwiGLU 1536, vocab 16384, tied embeddings). Random weights; the 1/3 full-layer fraction
(middle placement). Each step is the real training path: `CausalLMLoss` (chunked loss), activation checkpointing
(`--checkpointing off` drops it, as the quality experiment does), bf16 autocast over float32 parameters, AdamW;
`--pack K` puts K sequences of each length in one row with positions restarting, as the training loop packs
documents. Variants: all layers full attention, hybrid SinkWindow, hybrid BlockSparse (7B shape: SinkWindow(64,
2048), BlockSparse(64, 16, 32); repro shape: SinkWindow(64, 1024), BlockSparse(64, 16, 4), the experiment's).
`--compile` compiles each decoder layer, as the training loop's `model.compile: true`. Median step time over
`--steps` after a warm-up step (which compiles); peak memory. Writes `--out` (JSON) and a markdown table beside it.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from reproduction.settings import DEFAULT as REPRO  # the `repro` shape: the quality experiment's model


def model_config(shape: str, layers: int | None, max_len: int):
    """The transformers config of `shape` (see the module's docstring) with `layers` layers (None: the shape's)."""
    from transformers import LlamaConfig

    if shape == "llama2-7b":
        return llama2_7b_config(layers or 6, max_len)
    return LlamaConfig(
        vocab_size=REPRO.vocab_size,
        hidden_size=REPRO.hidden_size,
        intermediate_size=REPRO.intermediate_size,
        num_hidden_layers=layers or REPRO.layers,
        num_attention_heads=REPRO.heads,
        num_key_value_heads=REPRO.kv_heads,
        tie_word_embeddings=True,
        max_position_embeddings=max_len,
    )


def patterns(shape: str) -> dict:
    if shape == "llama2-7b":
        sink_window, block_sparse = longgen.SinkWindow(64, 2048), longgen.BlockSparse(64, 16, 32)
    else:  # the experiment's (its stride: the number of KV heads)
        sink_window = longgen.SinkWindow(REPRO.sink, REPRO.window)
        block_sparse = longgen.BlockSparse(REPRO.block_size, REPRO.local_blocks, REPRO.kv_heads)
    return {"hybrid_sink_window": sink_window, "hybrid_block_sparse": block_sparse}


def build(cfg, variant: str, shape: str, compile: bool = False, checkpointing: bool = True):
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if variant == "full":
        longgen.convert(model, full_fraction=1.0)
    else:
        longgen.convert(model, pattern=patterns(shape)[variant])
    model.config.use_cache = False
    if checkpointing:
        longgen.model.enable_activation_checkpointing(model)
    if compile:  # what the train loop's `model.compile: true` does
        for layer in model.model.layers:
            layer.compile()
    return model


def run(
    layers: int | None,
    seq_len: int,
    variant: str,
    steps: int,
    compile: bool = False,
    shape: str = "llama2-7b",
    pack: int = 1,
    checkpointing: bool = True,
) -> dict:
    cfg = model_config(shape, layers, seq_len)
    model = build(cfg, variant, shape, compile, checkpointing)
    wrapped = CausalLMLoss(model, chunk=4096).train()
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-5, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len * pack), device="cuda", generator=gen)
    pos = torch.arange(seq_len, device="cuda").repeat(pack)[None]
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
        "layers": cfg.num_hidden_layers,
        "compile": compile,
        "shape": shape,
        "pack": pack,
        "checkpointing": checkpointing,
        "step_ms": round(step_ms, 1),
        "tokens_per_s": round(seq_len * pack / step_ms * 1e3, 1),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "step_ms_all": [round(t, 1) for t in times],
    }
    del model, wrapped, opt
    gc.collect()
    torch.cuda.empty_cache()
    return row


VARIANTS = ("full", "hybrid_sink_window", "hybrid_block_sparse")
RUN_KEYS = ("command", "commit", "date", "device")  # what each row records of the invocation that measured it


def _key(row: dict) -> tuple:
    """(variant, then what a speedup compares across): rows before `--shape` were the 7B shape, unpacked, with
    activation checkpointing."""
    return (
        row["variant"],
        row["seq_len"],
        row["layers"],
        row.get("compile", False),
        row.get("shape", "llama2-7b"),
        row.get("pack", 1),
        row.get("checkpointing", True),
    )


def markdown(res: dict) -> str:
    header = markdown_header(
        "Training step: full attention vs LongGen hybrids",
        res,
        "bf16 autocast, float32 AdamW; median of the timed steps. Shape `llama2-7b`: Llama-2-7B-shaped layers; "
        "`repro`: the quality experiment's 46M model. Packed: sequences of `seq` tokens a row. Speedups compare "
        "rows that differ only in the variant (vs full) or only in compilation (compiled vs eager).",
    )
    runs = list(dict.fromkeys((r["command"], r["commit"], r["date"]) for r in res["rows"] if "command" in r))
    if len(runs) > 1:  # rows of several invocations: each row records its own (RUN_KEYS) in the JSON
        at = next(i for i, line in enumerate(header) if line.startswith("Command: "))
        header[at : at + 1] = [
            "Commands (the rows' own, in the order they ran; device line: the last):",
            "",
            *(f"- `{c}` (commit {commit}, {date})" for c, commit, date in runs),
        ]
    lines = [
        *header,
        "| shape | variant | seq | packed | layers | checkpointing | compiled | step ms | tokens/s | peak GB "
        "| vs full | compiled vs eager |",
        "|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    ms = {_key(r): r["step_ms"] for r in res["rows"]}
    for r in sorted(res["rows"], key=lambda r: (_key(r)[4:], _key(r)[1:4], r["variant"])):
        k = _key(r)
        full = ms.get(("full", *k[1:]))
        eager = ms.get((*k[:3], False, *k[4:])) if r.get("compile") else None
        vs_eager = f"{eager / r['step_ms']:.2f}" if eager else ""
        lines.append(
            f"| {k[4]} | {r['variant']} | {r['seq_len']} | {k[5]} | {r['layers']} | {'on' if k[6] else 'off'} | "
            f"{'yes' if k[3] else 'no'} | {r['step_ms']:.0f} | {r['tokens_per_s']:,.0f} | "
            f"{r['peak_mem_gb']:.1f} | {full / r['step_ms'] if full else float('nan'):.2f} | "
            f"{vs_eager} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["llama2-7b", "repro"], default="llama2-7b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (the shape's: 6 for llama2-7b, 12)")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 65536, 131072])
    ap.add_argument("--pack", type=int, default=1, help="sequences of each length packed in one row (1)")
    ap.add_argument("--checkpointing", choices=["on", "off"], default="on", help="activation checkpointing (on)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (train loop option)")
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    args = ap.parse_args(argv)
    if args.pack < 1 or args.steps < 1 or (args.layers is not None and args.layers < 1):
        ap.error(f"--pack, --steps and --layers must be >= 1 (got {args.pack}, {args.steps}, {args.layers})")
    if not torch.cuda.is_available():
        print("benchmarks/train_step.py needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {"rows": []}
    res.update(run_metadata())
    checkpointing = args.checkpointing == "on"
    for T in args.seq_lens:
        for v in args.variants:
            row = run(args.layers, T, v, args.steps, args.compile, args.shape, args.pack, checkpointing)
            row.update({k: res[k] for k in RUN_KEYS})  # a file that gathers several invocations stays traceable
            print(
                f"{v:<22} T={T:>6} x{args.pack}: step {row['step_ms']:9.1f} ms  {row['tokens_per_s']:9,.0f} tok/s  "
                f"peak {row['peak_mem_gb']:.1f} GB",
                flush=True,
            )
            res["rows"] = [r for r in res["rows"] if _key(r) != _key(row)]
            res["rows"].append(row)
            save_result(out, res, markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
