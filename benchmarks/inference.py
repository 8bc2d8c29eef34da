"""Inference benchmark: KV-cache bytes, prefill latency, decode speed and concurrency at a fixed KV budget.

    PYTHONPATH=src python benchmarks/inference.py [--layers 32] [--seq-lens 8192 32768 65536 131072]

A Llama-2-7B-shaped model (hidden 4096, 32 heads = 32 KV heads, head dim 128, MLP 11008, vocab 32000), random
bf16 weights, `--layers` layers with the 1/3 full-layer fraction (middle placement). Variants, all served by
`longgen.infer.ModelRunner` (compact caches, sparse prefill kernels, CUDA-graph decode step):
full attention (every layer Full), hybrid SinkWindow(64, 2048), hybrid BlockSparse(64, 16, 32). Outside
baseline: Hugging Face `generate()` on the full model with SDPA attention and a static cache.

Per (variant, prompt length), batch 1: KV bytes allocated by the runner (for prompt + 258 tokens) and the
pattern's analytic minimum at that length, prefill latency (median of `--repeats`; the logits of the last
prompt token), decode ms/token over `--decode-tokens` tokens (after one warm-up token), peak GPU memory during
prefill. With `--prefill-chunk`, an extra row per variant at the longest length prefills in pieces.
Concurrency: for each `--concurrency-len`, the number of sequences of that length a KV budget of `--budget-gb`
admits (`rows_for_budget`), then all of them decoding together: tokens/s.
Writes `--out` (JSON) and a markdown table beside it.
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
from longgen.infer import ModelRunner, analytic_kv_bytes, rows_for_budget

PATTERNS = {
    "full": None,
    "hybrid_sink_window": longgen.SinkWindow(64, 2048),
    "hybrid_block_sparse": longgen.BlockSparse(64, 16, 32),
}
HF = "hf_generate_sdpa_static"


def build(layers: int, max_len: int):
    from transformers import AutoModelForCausalLM

    cfg = llama2_7b_config(layers, max_len)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def set_variant(model, variant: str) -> None:
    """Re-convert the same weights: all-Full, or the hybrid with the variant's pattern (or back to plain SDPA)."""
    if hasattr(model.config, "longgen"):
        delattr(model.config, "longgen")
    if variant == "hf_sdpa_static":
        model.config._attn_implementation = "sdpa"
    elif PATTERNS[variant] is None:
        longgen.convert(model, full_fraction=1.0)
    else:
        longgen.convert(model, pattern=PATTERNS[variant])


def _sync_ms(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def run_ours(model, variant: str, T: int, args, prefill_chunk: int | None = None) -> dict:
    set_variant(model, variant)
    runner = ModelRunner(model, max_batch=1, max_len=T + args.decode_tokens + 2, prefill_chunk=prefill_chunk)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 32000, (T,), device="cuda", generator=gen)
    runner.prefill(0, ids)  # warm-up: compiles the prefill pieces and kernels for exactly these shapes
    times = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.repeats):
        times.append(_sync_ms(lambda: runner.prefill(0, ids)))
    peak = torch.cuda.max_memory_allocated() / 2**30
    tok = torch.zeros(1, dtype=torch.long, device="cuda")
    runner.decode(tok)  # captures the CUDA graph
    n = args.decode_tokens
    decode_ms = _sync_ms(lambda: [runner.decode(tok) for _ in range(n)]) / n
    row = {
        "variant": variant + (f"_chunk{prefill_chunk}" if prefill_chunk else ""),
        "seq_len": T,
        "kv_bytes": runner.allocated_bytes(),
        "kv_bytes_analytic": analytic_kv_bytes(model.config, T + n + 2),
        "prefill_ms": round(statistics.median(times), 1),
        "prefill_ms_all": [round(t, 1) for t in times],
        "decode_ms_per_token": round(decode_ms, 3),
        "prefill_peak_gb": round(peak, 2),
    }
    runner = None  # frees the cache before the next run
    _free()
    return row


def run_hf(model, T: int, args) -> dict:
    """Hugging Face generate(): SDPA, static cache; prefill = 1 new token, decode = the difference per token."""
    set_variant(model, "hf_sdpa_static")
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 32000, (1, T), device="cuda", generator=gen)
    n = args.decode_tokens

    def generate(k):
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=k,
            min_new_tokens=k,
            do_sample=False,
            cache_implementation="static",
            pad_token_id=0,
        )

    generate(2)  # warm-up (and compilation, if transformers compiles the static-cache decode step)
    prefill = [_sync_ms(lambda: generate(1)) for _ in range(args.repeats)]
    total = _sync_ms(lambda: generate(n + 1))
    p = statistics.median(prefill)
    row = {
        "variant": HF,
        "seq_len": T,
        "kv_bytes": 2 * model.config.num_hidden_layers * 32 * 128 * 2 * (T + n + 1),
        "kv_bytes_analytic": None,
        "prefill_ms": round(p, 1),
        "prefill_ms_all": [round(t, 1) for t in prefill],
        "decode_ms_per_token": round((total - p) / n, 3),
        "prefill_peak_gb": None,
    }
    _free()
    return row


def run_concurrency(model, variant: str, T: int, budget_gb: float, args) -> dict:
    set_variant(model, variant)
    max_len = T + args.decode_tokens + 2
    rows = rows_for_budget(model.config, max_len, int(budget_gb * 2**30))
    row = {"variant": variant, "seq_len": T, "budget_gb": budget_gb, "sequences": rows}
    if rows == 0:
        return row | {"decode_tokens_per_s": 0.0}
    runner = ModelRunner(model, max_batch=rows, max_len=max_len)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for r in range(rows):
        runner.prefill(r, torch.randint(0, 32000, (T,), device="cuda", generator=gen))
    tok = torch.zeros(rows, dtype=torch.long, device="cuda")
    runner.decode(tok)
    n = args.decode_tokens // 2
    ms = _sync_ms(lambda: [runner.decode(tok) for _ in range(n)]) / n
    row |= {"decode_ms_per_step": round(ms, 3), "decode_tokens_per_s": round(rows / ms * 1e3, 1)}
    row["kv_bytes"] = runner.allocated_bytes()
    runner = None  # frees the cache before the next run
    _free()
    return row


def markdown(res: dict) -> str:
    lines = [
        *markdown_header(
            "Inference: full attention vs LongGen hybrids (Llama-2-7B-shaped, batch 1)",
            res,
            f"{res['layers']} layers, bf16, random weights. KV = bytes the runner allocated for prompt + "
            f"{res['decode_tokens'] + 2} tokens; analytic = the pattern's minimum at that length. Decode: "
            f"{res['decode_tokens']} tokens, CUDA-graph step. Speedups are against our full-attention path.",
        ),
        "| variant | prompt | KV GiB | KV / analytic | KV saved vs full | prefill ms | prefill speedup | "
        "decode ms/token | decode speedup | prefill peak GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    full = {r["seq_len"]: r for r in res["rows"] if r["variant"] == "full"}
    for r in sorted(res["rows"], key=lambda r: (r["seq_len"], r["variant"])):
        f = full.get(r["seq_len"])
        ana = f"{r['kv_bytes'] / r['kv_bytes_analytic']:.3f}" if r.get("kv_bytes_analytic") else "-"
        saved = f"{1 - r['kv_bytes'] / f['kv_bytes']:.1%}" if f else "-"
        pre = f"{f['prefill_ms'] / r['prefill_ms']:.2f}" if f else "-"
        dec = f"{f['decode_ms_per_token'] / r['decode_ms_per_token']:.2f}" if f else "-"
        peak = f"{r['prefill_peak_gb']:.1f}" if r.get("prefill_peak_gb") else "-"
        lines.append(
            f"| {r['variant']} | {r['seq_len']} | {r['kv_bytes'] / 2**30:.2f} | {ana} | {saved} | "
            f"{r['prefill_ms']:.0f} | {pre} | {r['decode_ms_per_token']:.2f} | {dec} | {peak} |"
        )
    if res.get("concurrency"):
        lines += [
            "",
            "Concurrency at a fixed KV budget (all sequences decoding together):",
            "",
            "| variant | length | budget GiB | sequences | x full | decode ms/step | tokens/s | x full |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        base = {(c["seq_len"], c["budget_gb"]): c for c in res["concurrency"] if c["variant"] == "full"}
        for c in res["concurrency"]:
            b = base.get((c["seq_len"], c["budget_gb"]))
            xs = f"{c['sequences'] / b['sequences']:.2f}" if b and b["sequences"] else "-"
            xt = f"{c['decode_tokens_per_s'] / b['decode_tokens_per_s']:.2f}" if b and b["sequences"] else "-"
            lines.append(
                f"| {c['variant']} | {c['seq_len']} | {c['budget_gb']:.0f} | {c['sequences']} | {xs} | "
                f"{c.get('decode_ms_per_step', 0):.2f} | {c['decode_tokens_per_s']:,.0f} | {xt} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--variants", nargs="+", default=[*PATTERNS, HF], choices=[*PATTERNS, HF])
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="timed prefills per variant and length (median)")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="also time chunked prefill at the longest length")
    ap.add_argument("--seq-lens", type=int, nargs="*", default=[8192, 32768, 65536, 131072])
    ap.add_argument("--concurrency-len", type=int, nargs="*", default=[32768])
    ap.add_argument("--budget-gb", type=float, default=48.0)
    ap.add_argument("--out", default="benchmarks/results/inference.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/inference.py needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    res = {"rows": [], "concurrency": [], **res, **run_metadata(), "layers": args.layers}
    res["decode_tokens"] = args.decode_tokens
    lengths = [*args.seq_lens, *args.concurrency_len]
    model = build(args.layers, max(lengths) + args.decode_tokens + 2)

    def save(row: dict, key: str = "rows") -> None:
        same = ("variant", "seq_len", "budget_gb")
        res[key] = [r for r in res[key] if any(r.get(k) != row.get(k) for k in same)] + [row]
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all")}), flush=True)
        save_result(out, res, markdown(res))

    ours = [v for v in args.variants if v != HF]
    for T in args.seq_lens:
        for v in args.variants:
            save(run_hf(model, T, args) if v == HF else run_ours(model, v, T, args))
    if args.prefill_chunk:
        for v in ours:
            save(run_ours(model, v, max(args.seq_lens), args, prefill_chunk=args.prefill_chunk))
    for T in args.concurrency_len:
        for v in ours:
            save(run_concurrency(model, v, T, args.budget_gb, args), "concurrency")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
