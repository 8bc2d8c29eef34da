"""Attention on a CPU: longgen's block-sparse PyTorch path against the reference, PyTorch SDPA and FlexAttention.

    PYTHONPATH=src python benchmarks/cpu_attention.py [--lengths 1024 2048 4096 8192 16384] [--threads N] [--no-flex]

float32, batch 1, 8 query heads, 4 KV heads, head dim 64 (a small model's layer). Per length: PyTorch SDPA causal
attention (its fused CPU kernel, GQA without repeating K/V), and for SinkWindow(64, 1024) and
BlockSparse(64, 16, stride 4): `sparse_attention(backend="blocked")` (the default off CUDA),
`backend="reference"` (up to `--reference-max`, 4K: it is >10x slower than SDPA), and FlexAttention with the same
mask (`torch.compile`d afresh for each case, forward only: it has no backward on a CPU; its block-mask build and
compile times are recorded). Times are wall-clock, the best of a few runs (one run for cases slower than 2 s),
forward (under `torch.no_grad`) and forward+backward (a weighted sum of the output). Ratios are SDPA's time over
each method's (above 1: faster than SDPA). Writes `--out` (JSON) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import cpu_run_metadata

import longgen

HEADS, KV_HEADS, HEAD_DIM = 8, 4, 64
PATTERNS = {
    "sink_window(64,1024)": longgen.SinkWindow(64, 1024),
    "block_sparse(64,16,4)": longgen.BlockSparse(64, 16, 4),
}


def best_ms(fn, reps: int = 3) -> float:
    """Best wall time of `reps` calls after one warm-up call; a single timed call when one takes over 2 s."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first > 2.0:
        return first * 1e3
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def timings(run, q, k, v) -> dict[str, float]:
    """run(q, k, v) -> output (1, T, H, d); forward and forward+backward ms."""
    weight = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            run(q, k, v)

    def fwd_bwd():
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        (run(*leaves) * weight).sum().backward()

    return {"fwd_ms": best_ms(fwd), "fwd_bwd_ms": best_ms(fwd_bwd)}


def sdpa_causal(q, k, v):
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    return out.transpose(1, 2)


def flex_mask_mod(pattern: longgen.Pattern):
    """The pattern's own rule (`Pattern.allowed`'s semantics) as a FlexAttention mask_mod over query heads."""
    resolved = pattern.resolve(KV_HEADS)
    group = HEADS // KV_HEADS

    def mask_mod(b, h, q_idx, kv_idx):
        return resolved._allowed(q_idx, kv_idx, h // group, KV_HEADS)

    return mask_mod


def flex_case(pattern: longgen.Pattern, q, k, v) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # a fresh static-shape compile per case: a recompile for a new length would otherwise switch to dynamic
    # shapes, whose CPU kernel is an order of magnitude slower
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False)
    T = q.shape[1]
    start = time.perf_counter()
    block_mask = create_block_mask(flex_mask_mod(pattern), 1, HEADS, T, T, device="cpu")
    mask_s = time.perf_counter() - start
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    start = time.perf_counter()
    with torch.no_grad():
        compiled(qt, kt, vt, block_mask=block_mask, enable_gqa=True)
    compile_s = time.perf_counter() - start

    def fwd():
        with torch.no_grad():
            compiled(qt, kt, vt, block_mask=block_mask, enable_gqa=True)

    row = {"fwd_ms": best_ms(fwd), "block_mask_s": round(mask_s, 2), "first_call_s": round(compile_s, 2)}
    try:
        leaves = [x.detach().requires_grad_(True) for x in (qt, kt, vt)]
        compiled(*leaves, block_mask=block_mask, enable_gqa=True).sum().backward()
        row["fwd_bwd_ms"] = None
        row["backward"] = "ran"
    except Exception as e:  # FlexAttention refuses gradients on a CPU
        row["backward"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return row


def chunk_primitives() -> list[dict]:
    """The per-chunk computation of the blocked path two ways, at its typical shape (SinkWindow(64, 1024) at
    256 queries per chunk: 4 KV heads x 2 query heads, 1344 keys): PyTorch SDPA with an additive bias (what the
    path runs) and matmul + bias + softmax + matmul (what it runs when the lse is asked for)."""
    gen = torch.Generator().manual_seed(0)
    hkv, group, rows, keys = KV_HEADS, HEADS // KV_HEADS, 256, 1344
    q = torch.randn(1, hkv, group, rows, HEAD_DIM, generator=gen)[0]
    k = torch.randn(1, hkv, 1, keys, HEAD_DIM, generator=gen)[0]
    v = torch.randn(1, hkv, 1, keys, HEAD_DIM, generator=gen)[0]
    t = torch.arange(1024, 1024 + rows)[:, None]
    s = torch.arange(keys)[None, :] + 64
    bias = torch.zeros(rows, keys).masked_fill(~((s <= t) & (t - s < 1024)), float("-inf"))[None, None]

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)

    def matmul_softmax(q, k, v):
        scores = torch.matmul(q, k.transpose(-1, -2)) * HEAD_DIM**-0.5 + bias
        return torch.matmul(torch.softmax(scores, dim=-1), v)

    rows_out = []
    for name, fn in (("chunk_sdpa_bias", sdpa), ("chunk_matmul_softmax", matmul_softmax)):
        row = {
            "length": rows,
            "pattern": f"one chunk: {hkv}x{group} heads, {rows} queries x {keys} keys",
            "method": name,
        }
        rows_out.append(row | timings(fn, q, k, v))
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--reference-max", type=int, default=4096, help="longest length to time the reference at")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="benchmarks/results/cpu_attention.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    result = cpu_run_metadata()
    result["shape"] = {"batch": 1, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "float32"}
    result["timing"] = "wall clock, best of 3 after a warm-up (1 run when over 2 s)"
    rows = []
    wall = time.perf_counter()
    for T in args.lengths:
        gen = torch.Generator().manual_seed(T)
        q = torch.randn(1, T, HEADS, HEAD_DIM, generator=gen)
        k = torch.randn(1, T, KV_HEADS, HEAD_DIM, generator=gen)
        v = torch.randn(1, T, KV_HEADS, HEAD_DIM, generator=gen)
        sdpa = timings(sdpa_causal, q, k, v)
        rows.append({"length": T, "pattern": "full", "method": "sdpa_causal", **sdpa})
        print(f"{T:>6} full sdpa_causal fwd {sdpa['fwd_ms']:9.1f} ms  fwd+bwd {sdpa['fwd_bwd_ms']:9.1f} ms", flush=True)
        for name, pattern in PATTERNS.items():
            methods = ["blocked", "reference"][: 2 if args.reference_max >= T else 1]
            for method in methods:

                def run(q, k, v, pattern=pattern, method=method):
                    return longgen.sparse_attention(q, k, v, pattern, backend=method)

                row = {"length": T, "pattern": name, "method": method, **timings(run, q, k, v)}
                rows.append(row)
            if not args.no_flex:
                flex = flex_case(pattern, q, k, v)
                rows.append({"length": T, "pattern": name, "method": "flex", **flex})
            for row in rows:
                if row["length"] == T and row["pattern"] == name:
                    for key in ("fwd", "fwd_bwd"):
                        ms = row.get(f"{key}_ms")
                        row[f"{key}_vs_sdpa"] = round(sdpa[f"{key}_ms"] / ms, 2) if ms else None
                    print(
                        f"{T:>6} {name} {row['method']:<9} fwd {row['fwd_ms']:9.1f} ms ({row['fwd_vs_sdpa']}x SDPA)"
                        + (
                            f"  fwd+bwd {row['fwd_bwd_ms']:9.1f} ms ({row['fwd_bwd_vs_sdpa']}x SDPA)"
                            if row.get("fwd_bwd_ms")
                            else f"  backward: {row.get('backward')}"
                        ),
                        flush=True,
                    )
        for name, pattern in PATTERNS.items():
            kept = pattern.block_fraction(T, KV_HEADS)
            rows.append({"length": T, "pattern": name, "method": "kept_causal_tiles", "fraction": round(kept, 4)})
    rows += chunk_primitives()
    result["wall_s"] = round(time.perf_counter() - wall, 1)
    result["load_average_at_end"] = list(os.getloadavg())
    result["rows"] = rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')} ({result['wall_s']} s)", file=sys.stderr)


def shared_note(result: dict) -> str:
    load = max(result["load_average_at_start"][0], result["load_average_at_end"][0])
    return (
        f"The CPU was shared with other jobs during this run (1-minute load average up to {load:.1f}), so absolute "
        "times are inflated and vary from run to run; compare the ratios at one length."
    )


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "# Attention on a CPU: block-sparse PyTorch path vs reference vs SDPA causal vs FlexAttention",
        "",
        f"Device: {result['device']}; torch {result['torch']}; commit {result['commit']}; {result['date']}; "
        f"load average (1 min) at start {result['load_average_at_start'][0]:.2f}, "
        f"at end {result['load_average_at_end'][0]:.2f}.",
        f"Command: `{result['command']}`",
        "",
        *([shared_note(result), ""] if result["load_average_at_start"][0] > 1 else []),
        "float32, batch 1, 8 heads, 4 KV heads, head dim 64. ms, " + result["timing"] + "; (x) = SDPA causal time "
        "over this one (above 1: faster). FlexAttention: forward only (no backward on a CPU).",
        "",
        "| tokens | pattern | kept tiles | method | fwd ms | fwd vs SDPA | fwd+bwd ms | fwd+bwd vs SDPA |",
        "|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    kept = {(r["length"], r["pattern"]): r["fraction"] for r in rows if r["method"] == "kept_causal_tiles"}
    for r in rows:
        if r["method"] == "kept_causal_tiles":
            continue
        share = kept.get((r["length"], r["pattern"]))
        fb = r.get("fwd_bwd_ms")
        lines.append(
            f"| {r['length']} | {r['pattern']} | {'' if share is None else f'{share:.0%}'} | {r['method']} | "
            f"{r['fwd_ms']:.1f} | {r.get('fwd_vs_sdpa') or ''} | {'' if fb is None else f'{fb:.1f}'} | "
            f"{r.get('fwd_bwd_vs_sdpa') or ''} |"
        )
    flex = [r for r in rows if r["method"] == "flex"]
    if flex:
        blocked = {(r["length"], r["pattern"]): r["fwd_ms"] for r in rows if r["method"] == "blocked"}
        speed = [blocked[r["length"], r["pattern"]] / r["fwd_ms"] for r in flex]  # above 1: Flex faster
        compile_s = [r["first_call_s"] for r in flex]
        lines += [
            "",
            "FlexAttention: block-mask build / first (compiling) call, seconds: "
            + "; ".join(f"{r['length']} {r['pattern']}: {r['block_mask_s']} / {r['first_call_s']}" for r in flex)
            + f". Backward: {flex[0]['backward']}",
            "",
            f"Finding: on this CPU FlexAttention cannot train (no backward), compiles for {min(compile_s)}-"
            f"{max(compile_s)} s per shape, and its forward runs at {min(speed):.2f}-{max(speed):.2f}x the blocked "
            "path's speed (above 1: Flex faster); so the blocked path (plain PyTorch, SDPA per chunk) is the default "
            "off CUDA.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
