"""Attention kernel benchmark: longgen's Triton kernels vs PyTorch SDPA (causal) and FlexAttention, one run.

    PYTHONPATH=src python benchmarks/attention.py [--seq-lens 8192 32768 65536 131072] [--kv-heads 32 8]

bf16, batch 1, 32 query heads, head dim 128. For each (pattern, seq_len, kv_heads): forward and forward+backward
median times of longgen (backend="triton"), SDPA causal (FlashAttention/cuDNN class kernels) and FlexAttention
with the identical mask (`Pattern.mask_mod`; block mask built with _compile=True; build and compile times reported
apart), and the sparsity-ideal time = SDPA causal fwd+bwd x (visited 64-blocks / causal 64-blocks). Rows are merged into
`--out` (JSON) keyed by (pattern, seq_len, kv_heads), and a markdown table is written beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import markdown_header, run_metadata, save_result

import longgen

HEADS, HEAD_DIM = 32, 128


def patterns(kv_heads: int) -> dict[str, longgen.Pattern]:
    return {
        "full": longgen.Full(),
        "sink_window(64,2048)": longgen.SinkWindow(64, 2048),
        f"block_sparse(64,16,{kv_heads})": longgen.BlockSparse(64, 16, kv_heads),
    }


def bench(fn, grad_to_none=None) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=50, rep=300, grad_to_none=grad_to_none, return_mode="median"))


def fwd_bwd(run, inputs, dout):
    def step():
        out = run()
        out.backward(dout)

    return bench(step, grad_to_none=inputs)


def run_case(T: int, kv_heads: int, flex, create_block_mask) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(T + kv_heads)
    dt = torch.bfloat16

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=dt, generator=gen)

    # longgen layout (batch, seq, heads, d); SDPA/Flex layout (batch, heads, seq, d): each in its native layout
    q, k, v, dout = (
        rnd(1, T, HEADS, HEAD_DIM),
        rnd(1, T, kv_heads, HEAD_DIM),
        rnd(1, T, kv_heads, HEAD_DIM),
        rnd(1, T, HEADS, HEAD_DIM),
    )
    qt, kt, vt, doutt = (x.transpose(1, 2).contiguous() for x in (q, k, v, dout))
    for x in (q, k, v, qt, kt, vt):
        x.requires_grad_()
    gqa = kv_heads != HEADS
    sdpa = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)  # noqa: E731
    sdpa_fwd = bench(sdpa)
    sdpa_fb = fwd_bwd(sdpa, [qt, kt, vt], doutt)
    print(f"  T={T} kv={kv_heads}: sdpa fwd {sdpa_fwd:.2f} ms, fwd+bwd {sdpa_fb:.2f} ms", flush=True)
    rows = []
    for name, pattern in patterns(kv_heads).items():
        ours = lambda p=pattern: longgen.sparse_attention(q, k, v, p, backend="triton")  # noqa: E731
        ms_fwd = bench(ours)
        ms_fb = fwd_bwd(ours, [q, k, v], dout)
        per_head = not isinstance(pattern, (longgen.Full, longgen.SinkWindow))  # the mask depends on the head
        mod = pattern.mask_mod(HEADS, kv_heads)
        t0 = time.perf_counter()
        bm = create_block_mask(mod, None, HEADS if per_head else None, T, T, device="cuda", _compile=True)
        torch.cuda.synchronize()
        build_s = time.perf_counter() - t0
        fl = lambda bm=bm: flex(qt, kt, vt, block_mask=bm, enable_gqa=gqa)  # noqa: E731
        t0 = time.perf_counter()
        fl().sum().backward()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        flex_fwd = bench(fl)
        flex_fb = fwd_bwd(fl, [qt, kt, vt], doutt)
        frac = pattern.block_fraction(T, kv_heads, 64)
        row = {
            "pattern": name,
            "seq_len": T,
            "heads": HEADS,
            "kv_heads": kv_heads,
            "head_dim": HEAD_DIM,
            "ms_fwd": round(ms_fwd, 3),
            "ms_fwd_bwd": round(ms_fb, 3),
            "sdpa_ms_fwd": round(sdpa_fwd, 3),
            "sdpa_ms_fwd_bwd": round(sdpa_fb, 3),
            "flex_ms_fwd": round(flex_fwd, 3),
            "flex_ms_fwd_bwd": round(flex_fb, 3),
            "ideal_ms_fwd_bwd": round(sdpa_fb * frac, 3),
            "block_fraction": round(frac, 5),
            "flex_block_mask_build_s": round(build_s, 2),
            "flex_compile_s": round(compile_s, 2),
        }
        rows.append(row)
        print(
            f"    {name:<24} ours fwd {ms_fwd:8.2f} fwd+bwd {ms_fb:8.2f} | flex {flex_fwd:8.2f} {flex_fb:8.2f} | "
            f"ideal {row['ideal_ms_fwd_bwd']:8.2f} (frac {frac:.4f})",
            flush=True,
        )
        del bm
    return rows


def markdown(result: dict) -> str:
    lines = [
        *markdown_header(
            "Attention kernels: longgen (Triton) vs SDPA causal vs FlexAttention",
            result,
            "bf16, batch 1, 32 query heads, head dim 128; times are medians in ms. ideal = SDPA causal fwd+bwd x "
            "visited/causal 64-blocks.",
        ),
        "| pattern | seq | kv | ours fwd | ours f+b | SDPA fwd | SDPA f+b | Flex fwd | Flex f+b | ideal f+b "
        "| ours/ideal | Flex/ours (f+b) | SDPA/ours (f+b) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = sorted(result["rows"], key=lambda r: (r["kv_heads"], r["seq_len"], r["pattern"]))
    for r in rows:
        lines.append(
            f"| {r['pattern']} | {r['seq_len']} | {r['kv_heads']} | {r['ms_fwd']:.2f} | {r['ms_fwd_bwd']:.2f} | "
            f"{r['sdpa_ms_fwd']:.2f} | {r['sdpa_ms_fwd_bwd']:.2f} | {r['flex_ms_fwd']:.2f} | "
            f"{r['flex_ms_fwd_bwd']:.2f} | {r['ideal_ms_fwd_bwd']:.2f} | "
            f"{r['ms_fwd_bwd'] / r['ideal_ms_fwd_bwd']:.2f} | {r['flex_ms_fwd_bwd'] / r['ms_fwd_bwd']:.2f} | "
            f"{r['sdpa_ms_fwd_bwd'] / r['ms_fwd_bwd']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    ap.add_argument("--out", default="benchmarks/results/attention_h100.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # one compile per (mask, shape); without a higher limit dynamo silently falls back to eager math attention
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    flex = torch.compile(flex_attention, dynamic=False)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"rows": []}
    result.update(run_metadata())
    for kv in args.kv_heads:
        for T in args.seq_lens:
            if T % 64 or math.gcd(HEADS, kv) != kv:
                raise ValueError("seq_len must be a multiple of 64 and kv_heads divide 32")
            rows = run_case(T, kv, flex, create_block_mask)
            keys = {(r["pattern"], r["seq_len"], r["kv_heads"]) for r in rows}
            result["rows"] = [r for r in result["rows"] if (r["pattern"], r["seq_len"], r["kv_heads"]) not in keys]
            result["rows"].extend(rows)
            save_result(out, result, markdown(result))
            torch.cuda.empty_cache()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
