"""How long `--full-layers auto` takes: placement scores of a Llama-2-7B-shaped model at 32K tokens on one GPU.

    PYTHONPATH=src python benchmarks/placement.py [--layers 32] [--length 32768] [--sequences 4]

The whole model (32 layers, hidden 4096, 32 heads = KV heads, MLP 11008, random weights) in bf16 on the GPU runs
`longgen.model.placement.score_layers` over `--sequences` calibration sequences of `--length` tokens, as
`longgen convert --full-layers auto` does: one sequence per forward pass, each layer's attention scored by the
sparse and the full kernels' log-sum-exp (no seq x seq matrix). Random token ids stand in for text (the time does
not depend on the tokens). Records the seconds per sequence (the first, with kernel compilation, apart), the
scored tokens/s and the peak memory. Writes `--out` (JSON) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import llama2_7b_config, markdown_header, run_metadata, save_result

import longgen
from longgen.model.placement import choose_full_layers, full_layer_count, score_layers


def run(layers: int, length: int, sequences: int, pattern: longgen.SinkWindow) -> dict:
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(llama2_7b_config(layers, length), dtype=torch.bfloat16).eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (sequences + 1, length), device="cuda", generator=gen)
    torch.cuda.synchronize()
    t = time.perf_counter()
    score_layers(model, ids[:1], pattern, progress=False)  # compiles the kernels
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    scores = score_layers(model, ids[1:], pattern, progress=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    return {
        "layers": layers,
        "length": length,
        "sequences": sequences,
        "pattern": repr(pattern),
        "parameters": sum(p.numel() for p in model.parameters()),
        "first_sequence_s": first_s,
        "seconds": seconds,
        "seconds_per_sequence": seconds / sequences,
        "tokens_per_s": sequences * length / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "layer_scores": scores.layers,
        "full_layers_chosen": choose_full_layers(scores.layers, full_layer_count(layers)),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--sequences", type=int, default=4, help="timed calibration sequences (after one untimed)")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--out", default="benchmarks/results/placement.json")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/placement.py times the GPU path: it needs a CUDA GPU")
    if a.layers < 1 or a.sequences < 1 or a.length <= a.sink + a.window:
        raise SystemExit("--layers and --sequences must be >= 1, and --length longer than --sink + --window")
    row = run(a.layers, a.length, a.sequences, longgen.SinkWindow(a.sink, a.window))
    result = {**run_metadata(), "rows": [row]}
    lines = markdown_header(
        "Placement scores (`--full-layers auto`) of a Llama-2-7B-shaped model",
        result,
        "Random weights, bf16, the whole model on one GPU; one sequence per forward pass. The first sequence "
        "(kernel compilation) is timed apart.",
    )
    lines += [
        "| layers | tokens a sequence | sequences | pattern | s a sequence | scored tokens/s | first sequence, s "
        "| peak GiB |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
        f"| {row['layers']} | {row['length']:,} | {row['sequences']} | {row['pattern']} | "
        f"{row['seconds_per_sequence']:.2f} | {row['tokens_per_s']:,.0f} | {row['first_sequence_s']:.1f} | "
        f"{row['peak_memory_gib']:.1f} |",
    ]
    save_result(a.out, result, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
