"""Decode attention benchmark: longgen's cache attention kernel against the memory-bandwidth ideal and PyTorch SDPA.

    PYTHONPATH=src python benchmarks/decode_attention.py [--batch 1 8] [--kv-heads 32 8] [--peak-gbps 3350]

bf16, 32 query heads, head dim 128, one new query per row (`--q-len`). Cases: Full over 8K/32K/128K cached tokens,
SinkWindow(64, 2048) and BlockSparse(64, 16, stride=kv_heads) over the compact caches they keep at 128K (their
retained positions in permuted slots, plus 64 free slots). Per case: median time per call (triton.testing.do_bench,
L2 flushed between calls), the bytes the kernel must read (K and V of the slots the query may attend, the positions
of every scanned slot, the query and the output), achieved GB/s and the fraction of the ideal bytes / peak
bandwidth, and PyTorch SDPA (query of length 1, `enable_gqa`) over a contiguous cache of the same number of slots.
Rows are merged into `--out` (JSON) keyed by (pattern, tokens, batch, kv_heads), with a markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import markdown_header, run_metadata, save_result

import longgen
from longgen.kernels import cache_attention

HEADS, HEAD_DIM = 32, 128
SLACK = 64  # free slots of a compact cache


def cases(full_lens: list[int], sparse_len: int, kv_heads: int) -> list[tuple[str, longgen.Pattern, int]]:
    out: list[tuple[str, longgen.Pattern, int]] = [("full", longgen.Full(), T) for T in full_lens]
    out.append(("sink_window(64,2048)", longgen.SinkWindow(64, 2048), sparse_len))
    out.append((f"block_sparse(64,16,{kv_heads})", longgen.BlockSparse(64, 16, kv_heads), sparse_len))
    return out


def compact_positions(pattern: longgen.Pattern, tokens: int, batch: int, kv_heads: int, q_len: int) -> torch.Tensor:
    """k_pos (batch, kv_heads, slots) of the cache serving `q_len` new queries at the end of `tokens` tokens.

    Full: positions in order (a cache grown from slot 0). Sparse: the retention of the first new query plus the
    later new tokens, in permuted slots, with SLACK free slots."""
    if isinstance(pattern, longgen.Full):
        return torch.arange(tokens, dtype=torch.int32).expand(batch, kv_heads, tokens).contiguous()
    first = tokens - q_len
    kept = [torch.cat([r, torch.arange(first + 1, tokens)]) for r in pattern.kv_retention(first + 1, kv_heads)]
    slots = max(len(r) for r in kept) + SLACK
    gen = torch.Generator().manual_seed(tokens + kv_heads)
    k_pos = torch.full((batch, kv_heads, slots), -1, dtype=torch.int32)
    for b in range(batch):
        for g, r in enumerate(kept):
            k_pos[b, g, torch.randperm(slots, generator=gen)[: len(r)]] = r.to(torch.int32)
    return k_pos


def bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def run_case(name, pattern, tokens, batch, kv_heads, q_len, num_splits, peak_gbps, scan=None) -> dict:
    """Time one case; `scan` (BLOCK_N, warps, stages) replaces the kernel's measured scan tiles."""
    from longgen.kernels import triton_cache_attention as kernels

    dt, dev = torch.bfloat16, "cuda"
    k_pos = compact_positions(pattern, tokens, batch, kv_heads, q_len).to(dev)
    slots = k_pos.shape[-1]
    q = torch.randn(batch, q_len, HEADS, HEAD_DIM, device=dev, dtype=dt)
    k = torch.randn(batch, kv_heads, slots, HEAD_DIM, device=dev, dtype=dt)
    v = torch.randn(batch, kv_heads, slots, HEAD_DIM, device=dev, dtype=dt)
    q_pos = torch.arange(tokens - q_len, tokens, device=dev).expand(batch, q_len).contiguous()

    # bytes the kernel must read: K/V of the slots some query may attend, positions of all scanned slots, q; out
    g = torch.arange(kv_heads, device=dev)
    allowed = pattern.allowed(
        q_pos[:, None, :, None], k_pos[:, :, None, :].clamp(min=0), g[None, :, None, None], kv_heads
    )
    read_slots = int((allowed & (k_pos >= 0)[:, :, None, :]).any(2).sum())
    del allowed
    kv_bytes = read_slots * 2 * HEAD_DIM * k.element_size()
    total_bytes = kv_bytes + k_pos.numel() * k_pos.element_size() + 2 * q.numel() * q.element_size()

    if scan is None:
        ours = lambda: cache_attention(q, q_pos, k, v, k_pos, pattern, num_splits=num_splits, backend="triton")  # noqa: E731
    else:  # the same kernels with other scan tiles (the public function always uses the measured ones)
        p, scale = pattern.resolve(kv_heads), HEAD_DIM**-0.5
        ours = lambda: kernels.triton_cache_attention(q, q_pos, k, v, k_pos, p, scale, None, num_splits, scan)  # noqa: E731
    ms = bench(ours)
    qt = q.transpose(1, 2).contiguous()  # SDPA's (B, H, q, d); a causal-free decode over every slot
    sdpa = lambda: F.scaled_dot_product_attention(qt, k, v, enable_gqa=kv_heads != HEADS)  # noqa: E731
    sdpa_ms = bench(sdpa)
    sdpa_bytes = 2 * k.numel() * k.element_size() + 2 * q.numel() * q.element_size()

    splits = num_splits or kernels.launch_splits(batch, q_len, HEADS, kv_heads, slots, q.device)
    ideal_ms = total_bytes / (peak_gbps * 1e9) * 1e3
    row = {
        "pattern": name,
        "tokens": tokens,
        "batch": batch,
        "kv_heads": kv_heads,
        "q_len": q_len,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "slots": slots,
        "read_slots": read_slots,
        "num_splits": splits,
        "tiles": ",".join(map(str, scan or kernels.SCAN_TILES)),  # BLOCK_N, warps, stages
        "bytes": total_bytes,
        "ms": round(ms, 4),
        "gbps": round(total_bytes / ms / 1e6, 1),
        "ideal_ms": round(ideal_ms, 4),
        "fraction_of_ideal": round(ideal_ms / ms, 3),
        "sdpa_ms": round(sdpa_ms, 4),
        "sdpa_gbps": round(sdpa_bytes / sdpa_ms / 1e6, 1),
    }
    print(
        f"  {name:<22} T={tokens:<6} B={batch} kv={kv_heads:<2} slots={slots:<6} splits={splits:<3} "
        f"{ms * 1e3:8.1f} us {row['gbps']:7.0f} GB/s ({row['fraction_of_ideal']:.2f} of ideal) | "
        f"SDPA {sdpa_ms * 1e3:8.1f} us {row['sdpa_gbps']:7.0f} GB/s",
        flush=True,
    )
    return row


def markdown(result: dict) -> str:
    lines = [
        *markdown_header(
            "Decode attention: longgen cache attention (Triton) vs the bandwidth ideal and SDPA",
            result,
            f"bf16, 32 query heads, head dim 128; median us per call (L2 flushed). ideal = bytes read / "
            f"{result['peak_gbps']} GB/s; bytes = K+V of the attended slots + positions of the scanned slots + q + "
            "out. SDPA: the same query over a contiguous cache of the same number of slots.",
        ),
        "| pattern | tokens | B | kv | q | slots | splits | MB read | ours us | GB/s | of ideal | SDPA us | SDPA GB/s "
        "| SDPA/ours |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = sorted(result["rows"], key=lambda r: (r["batch"], r["kv_heads"], r["q_len"], r["pattern"], r["tokens"]))
    for r in rows:
        lines.append(
            f"| {r['pattern']} | {r['tokens']} | {r['batch']} | {r['kv_heads']} | {r['q_len']} | {r['slots']} | "
            f"{r['num_splits']} | {r['bytes'] / 1e6:.1f} | {r['ms'] * 1e3:.1f} | {r['gbps']:.0f} | "
            f"{r['fraction_of_ideal']:.2f} | {r['sdpa_ms'] * 1e3:.1f} | {r['sdpa_gbps']:.0f} | "
            f"{r['sdpa_ms'] / r['ms']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    ap.add_argument("--full-lens", type=int, nargs="+", default=[8192, 32768, 131072], help="Full cache lengths")
    ap.add_argument("--sparse-len", type=int, default=131072, help="tokens behind the SinkWindow/BlockSparse caches")
    ap.add_argument("--q-len", type=int, default=1, help="new queries per row (1: decoding)")
    ap.add_argument("--peak-gbps", type=float, default=3350.0, help="memory bandwidth peak (H100 SXM: 3350)")
    ap.add_argument("--num-splits", type=int, default=None, help="override the kernel's split heuristic")
    ap.add_argument("--tiles", default=None, metavar="BLOCK_N,WARPS,STAGES", help="override the GPU tile settings")
    ap.add_argument("--out", default="benchmarks/results/decode_attention.json")
    args = ap.parse_args(argv)
    if args.tiles is not None:
        try:
            args.tiles = tuple(int(x) for x in args.tiles.split(","))
        except ValueError:
            args.tiles = ()
        if len(args.tiles) != 3:
            ap.error(f"--tiles takes BLOCK_N,WARPS,STAGES (e.g. 64,4,3), got {args.tiles!r}")
    for name in ("batch", "kv_heads", "full_lens"):
        if min(getattr(args, name)) < 1:
            ap.error(f"--{name.replace('_', '-')} values must be positive")
    if any(HEADS % kv for kv in args.kv_heads):
        ap.error(f"--kv-heads must divide {HEADS}")
    if args.q_len < 1 or args.q_len > min([*args.full_lens, args.sparse_len]):
        ap.error("--q-len must be between 1 and the shortest cache length")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/decode_attention.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from longgen.kernels import triton_cache_attention as kernels

    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"rows": []}
    tiles = dict(zip(("block_n", "num_warps", "num_stages"), args.tiles or kernels.SCAN_TILES, strict=True))
    result.update(run_metadata(), peak_gbps=args.peak_gbps, tiles=tiles)
    for batch in args.batch:
        for kv in args.kv_heads:
            for name, pattern, tokens in cases(args.full_lens, args.sparse_len, kv):
                row = run_case(
                    name, pattern, tokens, batch, kv, args.q_len, args.num_splits, args.peak_gbps, args.tiles
                )
                key = (row["pattern"], row["tokens"], row["batch"], row["kv_heads"], row["q_len"])
                result["rows"] = [
                    r
                    for r in result["rows"]
                    if (r["pattern"], r["tokens"], r["batch"], r["kv_heads"], r["q_len"]) != key
                ]
                result["rows"].append(row)
                save_result(out, result, markdown(result))
                torch.cuda.empty_cache()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
