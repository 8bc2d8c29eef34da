"""`longgen demo`: the whole LongGen story, small enough to run on a laptop CPU in minutes, nothing downloaded.

1. a corpus of real long documents: the Python standard library's own source files;
2. a BPE tokenizer trained on it and a tiny Llama pre-trained at a short context;
3. two copies extended to `factor` x the context with the same budget: a LongGen hybrid (1/3 full layers in
   the middle, the rest SinkWindow) and a full-attention baseline (same RoPE change);
4. both evaluated: perplexity by position, pass-key retrieval, KV-cache bytes actually allocated, decoding
   speed; one comparison table, and JSON + plots in the output folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longgen.train.tokenizer import train_bpe_tokenizer

SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "turtledemo", "__pycache__", "lib2to3", "ensurepip"}


@dataclass
class DemoConfig:
    out_dir: str = "longgen-demo"
    device: str = "cpu"
    corpus_mb: float = 3.0  # of standard-library source text
    vocab_size: int = 2048
    hidden_size: int = 128
    layers: int = 6
    heads: int = 4
    kv_heads: int = 2
    short_len: int = 256  # pre-training context
    factor: int = 4  # context extension factor
    sink: int = 16
    window: int = 128
    batch_tokens: int = 4096  # tokens per optimizer step (pre-training and extension alike)
    pretrain_steps: int = 150
    extend_steps: int = 40
    lr: float = 2e-3
    seed: int = 0


TINY = DemoConfig(
    corpus_mb=0.25,
    vocab_size=320,
    hidden_size=64,
    layers=3,
    short_len=64,
    sink=4,
    window=32,
    batch_tokens=512,
    pretrain_steps=6,
    extend_steps=3,
)


def _stage(n: int, text: str) -> float:
    print(f"\n[{n}/5] {text}", flush=True)
    return time.perf_counter()


def build_corpus(out: Path, megabytes: float, held_out: int = 6) -> tuple[Path, list[Path]]:
    """Copy standard-library source files (sorted, up to `megabytes`) into ``out/corpus``; the last `held_out`
    long files go to ``out/heldout`` for evaluation instead."""
    root = Path(os.__file__).parent
    files = [
        p
        for p in sorted(root.rglob("*.py"))
        if not (set(p.relative_to(root).parts[:-1]) & SKIP_DIRS) and p.stat().st_size > 2000
    ]
    if not files:
        raise RuntimeError(f"no standard-library sources found under {root}")
    corpus, heldout = out / "corpus", out / "heldout"
    for d in (corpus, heldout):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    long_files = sorted((p for p in files if p.stat().st_size > 20000), key=lambda p: p.stat().st_size)
    evaluation = long_files[-held_out:]
    budget, used = megabytes * 2**20, 0
    for p in files:
        if p in evaluation or used >= budget:
            continue
        shutil.copyfile(p, corpus / "_".join(p.relative_to(root).parts))
        used += p.stat().st_size
    copies = []
    for p in evaluation:
        dst = heldout / "_".join(p.relative_to(root).parts)
        shutil.copyfile(p, dst)
        copies.append(dst)
    print(
        f"  {len(list(corpus.iterdir()))} files, {used / 2**20:.1f} MB of training text from {root}; "
        f"{len(copies)} held-out documents",
        flush=True,
    )
    return corpus, copies


def _train(cfg: DemoConfig, model_path: Path, corpus: Path, out: Path, seq_len: int, steps: int) -> dict:
    from longgen.train import load_config, train

    batch = max(1, cfg.batch_tokens // seq_len)
    raw = {
        "model": {
            "path": str(model_path),
            "dtype": "float32" if cfg.device == "cpu" else "bfloat16",
            "activation_checkpointing": False,
        },
        "data": {
            "sources": [str(corpus)],
            "seq_len": seq_len,
            "cache_dir": str(out.parent / "token-cache"),
            "upsample": [[seq_len, 2.0]],
            "seed": cfg.seed,
        },
        "optim": {"lr": cfg.lr, "warmup_steps": max(1, steps // 10), "schedule": "cosine"},
        "train": {
            "steps": steps,
            "batch_size": batch,
            "output_dir": str(out),
            "save_every": steps,
            "device": cfg.device,
            "tensorboard": False,
            "seed": cfg.seed,
            "loss_chunk": 2048,
        },
    }
    final = train(load_config(raw=raw))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows[1:]] or [rows[-1]["tokens_per_s"]]
    return {"final": final, "loss": rows[-1]["loss"], "train_tokens_per_s": sum(tps) / len(tps)}


def measure_inference(path: Path, length: int, device: str, new_tokens: int = 32) -> dict[str, float]:
    """KV bytes actually allocated by the hybrid cache for a `length`-token sequence, and decoding speed."""
    from longgen.infer import HybridCache, analytic_kv_bytes
    from longgen.model import load_model

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = load_model(path, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, length - new_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    cache = HybridCache(model.config, max_length=length)
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
        stored = sum(int(cache.stored_tokens(i).sum()) for i in range(model.config.num_hidden_layers))
        kv_bytes_per_token = 2 * model.config.head_dim * torch.finfo(dtype).bits // 8
        t0 = time.perf_counter()
        model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            past_key_values=HybridCache(model.config),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        elapsed = time.perf_counter() - t0
    return {
        "kv_bytes_stored": stored * kv_bytes_per_token,
        "kv_bytes_allocated": cache.allocated_bytes(),
        "kv_bytes_analytic": analytic_kv_bytes(model.config, length - new_tokens, bytes_per_value=dtype.itemsize),
        "generate_tokens_per_s": new_tokens / elapsed,
    }


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the pipeline; returns the summary (also written to ``out_dir/summary.json``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from longgen.eval import passkey, ppl
    from longgen.model import convert_checkpoint
    from longgen.patterns import SinkWindow

    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    long_len = cfg.short_len * cfg.factor
    start = time.perf_counter()

    t = _stage(1, "corpus and tokenizer: the Python standard library's sources")
    corpus, heldout = build_corpus(out, cfg.corpus_mb)
    tokenizer = train_bpe_tokenizer(corpus, cfg.vocab_size)
    print(f"  BPE tokenizer, {len(tokenizer)} tokens ({time.perf_counter() - t:.0f} s)", flush=True)

    t = _stage(2, f"pre-train a tiny Llama at {cfg.short_len} tokens ({cfg.pretrain_steps} steps)")
    init = out / "models" / "init"
    model_cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.hidden_size * 4,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.short_len,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(model_cfg).save_pretrained(init)
    tokenizer.save_pretrained(init)
    pre = _train(cfg, init, corpus, out / "runs" / "pretrain", cfg.short_len, cfg.pretrain_steps)
    print(f"  loss {pre['loss']:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)

    t = _stage(3, f"convert and extend both copies to {long_len} tokens ({cfg.extend_steps} steps each)")
    variants = {
        "longgen_hybrid": {"pattern": SinkWindow(cfg.sink, cfg.window)},
        "full_attention": {"full_fraction": 1.0},
    }
    results: dict[str, dict[str, Any]] = {}
    for name, kwargs in variants.items():
        converted = out / "models" / f"{name}-converted"
        convert_checkpoint(
            pre["final"], converted, force=True, progress=False, target_length=long_len, rope="ntk", **kwargs
        )
        ext = _train(cfg, converted, corpus, out / "runs" / name, long_len, cfg.extend_steps)
        results[name] = {
            "model": str(ext["final"]),
            "extension_loss": ext["loss"],
            "train_tokens_per_s": ext["train_tokens_per_s"],
        }
        print(f"  {name}: loss {ext['loss']:.3f}, {ext['train_tokens_per_s']:,.0f} training tokens/s", flush=True)
    print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)

    t = _stage(4, "evaluate: perplexity by position, pass-key retrieval, KV cache, decoding speed")
    for name, res in results.items():
        path = res["model"]
        evals = out / "eval" / name
        p = ppl(
            path,
            lengths=[long_len],
            bucket=max(16, long_len // 8),
            documents=[str(d) for d in heldout],
            num_documents=min(4, len(heldout)),
            out_dir=evals,
            progress=False,
            device=cfg.device,
        )
        # prompts from 128 tokens (the template takes ~80) up to the extended length, leaving room for the answer
        lengths = sorted({n for n in (cfg.short_len, long_len // 2, long_len - 16) if n >= 128})
        k = passkey(
            path,
            lengths=lengths,
            depths=[0.1, 0.5, 0.9],
            out_dir=evals,
            progress=False,
            seed=cfg.seed,
            device=cfg.device,
        )
        res["perplexity"] = p["summary"]
        res["passkey"] = k["summary"]
        res.update(measure_inference(Path(path), long_len, cfg.device))
    print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)

    _stage(5, "summary")
    summary = {"config": dataclasses.asdict(cfg), "variants": results, "seconds": time.perf_counter() - start}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(format_summary(summary))
    print(f"\nEverything (models, metrics, evaluation JSON and plots) is in {out}")
    return summary


def format_summary(summary: dict) -> str:
    v = summary["variants"]
    names = list(v)
    long_len = str(summary["config"]["short_len"] * summary["config"]["factor"])
    rows = [
        (f"perplexity over {long_len} tokens", lambda r: f"{r['perplexity']['ppl_by_length'][long_len]:.2f}"),
        ("pass-key accuracy", lambda r: f"{r['passkey']['accuracy']:.0%}"),
        ("KV cache allocated (KiB)", lambda r: f"{r['kv_bytes_allocated'] / 1024:,.0f}"),
        ("KV cache stored (KiB)", lambda r: f"{r['kv_bytes_stored'] / 1024:,.0f}"),
        ("training tokens/s (extension)", lambda r: f"{r['train_tokens_per_s']:,.0f}"),
        ("generation tokens/s", lambda r: f"{r['generate_tokens_per_s']:,.1f}"),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'':<{width}}" + "".join(f"{n:>18}" for n in names)]
    lines += [f"{label:<{width}}" + "".join(f"{fmt(v[n]):>18}" for n in names) for label, fmt in rows]
    return "\n".join(lines)
