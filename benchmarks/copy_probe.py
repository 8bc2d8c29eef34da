"""How fast the demo's model shape learns to copy, outside the demo's pipeline (CPU).

    PYTHONPATH=src python benchmarks/copy_probe.py [--layers 6] [--out benchmarks/results/demo/copy_probe.json]

A random-weight Llama of the demo's shape (hidden 128, 4 heads, 2 KV heads, MLP 512, vocabulary 2048) trained on
rows ``[r, r]``: r is 64 uniformly random token ids, 64 rows a step (8,192 tokens), AdamW at a constant 3e-3,
gradients clipped at 1. Every 25 steps: the loss and the share of the repeat's tokens predicted right (argmax).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default="benchmarks/results/demo/copy_probe.json")
    a = p.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab, half, rows = 2048, 64, 64
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=a.layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    log, start = [], time.perf_counter()
    for step in range(1, a.steps + 1):
        r = torch.randint(0, vocab, (rows, half))
        x = torch.cat([r, r], 1)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 25 == 0:
            acc = (out.logits[:, half:-1].argmax(-1) == x[:, half + 1 :]).float().mean().item()
            log.append({"step": step, "loss": out.loss.item(), "repeat_accuracy": acc,
                        "seconds": time.perf_counter() - start})  # fmt: skip
            print(log[-1], flush=True)
    result = {
        "device": f"CPU, {torch.get_num_threads()} threads",
        "date": datetime.date.today().isoformat(),
        "command": "PYTHONPATH=src python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "layers": a.layers,
        "log": log,
    }
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
