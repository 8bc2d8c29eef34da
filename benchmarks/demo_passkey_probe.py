"""How fast the demo's model shape learns pass-key retrieval from short pass-key documents alone (CPU).

    PYTHONPATH=src python benchmarks/demo_passkey_probe.py --init-std 0.02 [--steps 400] [--seed 0] \
        [--out benchmarks/results/demo/passkey_probe_init0.02.json]

Outside the demo's pipeline: the demo's corpus, tokenizer (2,048-token BPE) and model shape (6 layers, hidden 128, 4
heads, 2 KV heads, MLP 512, tied embeddings), with the weights drawn at `--init-std` (Llama's
``initializer_range``). Each step trains on 64 rows of 64 tokens (`--max-len` L > 64: 4,096 // L rows of L tokens),
each row one pass-key document in the evaluation's wording (`longgen.eval.prompts`: training-corpus text with the
needle at a random depth, then the question, the answer prefix and the 5-digit key; 52 to 64 tokens, or log-uniform
from 52 to L; padding not scored), AdamW (betas 0.9/0.95, weight decay 0.1) at a constant `--lr` after 10 warm-up
steps, gradients clipped at 1. Every 50 steps: the demo's pass-key score (`longgen.demo.score_passkey`: exact greedy
key, 50 prompts of held-out text) at 64 and 256 tokens, and the share of the key's digits predicted right at 64
tokens (teacher-forced). `--then-max-len L2 --then-steps N`: N more steps as with `--max-len L2`. `--packed`: each
step's documents packed into one row with positions restarting at 0 in each, through longgen's attention with every
layer Full (what `longgen.train` does to a plain model), instead of one padded row a document. `--pool N`: the
documents of the first phase drawn from N made once (a data file's fixed set, seen many times) instead of fresh.
`--step-tokens N`: N tokens a step instead of 4,096 (rows of the same length, so fewer documents a step).
`--through-train`: `--steps` x 64 fresh documents through `longgen.train` with the same settings instead of the
probe's loop (rows of 128 tokens, documents kept whole), scored at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0, help="of the weights and the documents")
    p.add_argument("--max-len", type=int, default=64, help="> 64: documents of 52 to this many tokens, log-uniform")
    p.add_argument("--then-max-len", type=int, default=0, help="a second phase with this --max-len")
    p.add_argument("--then-steps", type=int, default=0, help="steps of the second phase")
    p.add_argument("--packed", action="store_true",
                   help="a step's documents in one row (positions restart at 0 in each), through longgen's "
                        "attention with every layer Full, as longgen.train runs a plain model")  # fmt: skip
    p.add_argument(
        "--pool",
        type=int,
        default=0,
        help="draw each step's documents from this many made once (0: a fresh document every time)",
    )
    p.add_argument(
        "--through-train",
        action="store_true",
        help="the same documents (fresh, --steps x 64) and settings through longgen.train (rows of 128 tokens, "
        "documents kept whole), scored once at the end",
    )
    p.add_argument("--step-tokens", type=int, default=4096, help="tokens a step (padding included)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.through_train and a.then_steps:
        p.error("--through-train runs one phase: leave out --then-steps")
    from transformers import LlamaConfig, LlamaForCausalLM

    from longgen.demo import build_corpus, passkey_prompts, score_passkey
    from longgen.eval.prompts import PASSKEY_ANSWER_PREFIX, PASSKEY_NEEDLE, PASSKEY_QUESTION, build_prompt
    from longgen.train.tokenizer import train_bpe_tokenizer

    torch.manual_seed(a.seed)
    rng = random.Random(a.seed + 1)
    work = Path(tempfile.mkdtemp(prefix="passkey-probe-"))
    corpus, heldout = build_corpus(work, 3.0)
    tok = train_bpe_tokenizer(corpus, 2048)
    text = tok("\n\n".join(f.read_text() for f in sorted(corpus.iterdir())), add_special_tokens=False)["input_ids"]
    hay = tok("\n\n".join(f.read_text() for f in heldout), add_special_tokens=False)["input_ids"]
    prompts = passkey_prompts(tok, hay, [64, 256], 50, 0)
    seq = max(64, a.max_len)
    rows = a.step_tokens // seq  # --step-tokens a step (padding included)

    def document(n: int) -> list[int]:
        key = str(rng.randint(10_000, 99_999))
        answer = tok(f" {key}.", add_special_tokens=False)["input_ids"]
        start = rng.randrange(len(text) - n)
        prompt = build_prompt(tok, n - len(answer), text[start : start + n], needles=[PASSKEY_NEEDLE.format(k=key)],
                              depths=[rng.random()], question=PASSKEY_QUESTION,
                              answer_prefix=PASSKEY_ANSWER_PREFIX)  # fmt: skip
        return prompt.input_ids + answer

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, initializer_range=a.init_std, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.eos_token_id, bos_token_id=None)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    if a.packed:
        from longgen import convert

        convert(model, full_fraction=1.0)  # what longgen.train does to a plain model: packed documents kept apart
    log, start, pool = [], time.perf_counter(), []
    if a.through_train:
        log.append(_through_train(a, model, tok, [document(rng.randint(52, 64)) for _ in range(a.steps * 64)],
                                  work, prompts, start))  # fmt: skip
        print(json.dumps(log[-1]), flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1, betas=(0.9, 0.95))
    for step in range(1, 0 if a.through_train else a.steps + a.then_steps + 1):  # the probe's own loop
        if step == a.steps + 1:
            seq = max(64, a.then_max_len)
            rows = a.step_tokens // seq
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, step / 10)
        if a.pool and seq == 64:  # a fixed set seen again and again, as a data file is
            if not pool:
                pool.extend(document(rng.randint(52, seq)) for _ in range(a.pool))
            docs = [rng.choice(pool) for _ in range(rows)]
        elif seq == 64:
            docs = [document(rng.randint(52, seq)) for _ in range(rows)]
        else:
            docs = [document(round(52 * (seq / 52) ** rng.random())) for _ in range(rows)]
        if a.packed:  # one row; no document predicts the next one's first token
            x = torch.tensor([[t for d in docs for t in d]])
            pos = torch.tensor([[i for d in docs for i in range(len(d))]])
            labels = torch.tensor([[t for d in docs for t in [-100, *d[1:]]]])
            model(input_ids=x, position_ids=pos, labels=labels).loss.backward()
        else:
            x = torch.tensor([d + [tok.eos_token_id] * (seq - len(d)) for d in docs])
            labels = torch.tensor([d + [-100] * (seq - len(d)) for d in docs])
            model(input_ids=x, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 50 == 0:
            model.eval()
            score = score_passkey(model, tok, prompts)
            with torch.no_grad():
                ps, answers = prompts[64]
                ids = torch.tensor([q + r for q, r in zip(ps, answers, strict=True)])
                n = len(answers[0])  # " " and 5 digits
                pred = model(input_ids=ids, logits_to_keep=n + 1).logits[:, :-1].argmax(-1)
                digits = (pred[:, 1:] == ids[:, -n + 1 :]).float().mean().item()
            model.train()
            log.append({"step": step, "seconds": round(time.perf_counter() - start),
                        "passkey_accuracy": {k: v["accuracy"] for k, v in score.items()},
                        "digit_accuracy_64": round(digits, 3)})  # fmt: skip
            print(json.dumps(log[-1]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "device": f"CPU, {torch.get_num_threads()} threads",
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "command": "PYTHONPATH=src python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "init_std": a.init_std,
        "seed": a.seed,
        "max_len": max(64, a.max_len),
        "then_max_len": a.then_max_len,
        "then_steps": a.then_steps,
        "lr": a.lr,
        "packed": a.packed,
        "pool": a.pool,
        "through_train": a.through_train,
        "log": log,
    }
    seed = (f"_seed{a.seed}" if a.seed else "") + (f"_len{a.max_len}" if a.max_len > 64 else "")
    seed += f"_then{a.then_max_len}" if a.then_steps else ""
    seed += "_packed" if a.packed else ""
    seed += f"_pool{a.pool}" if a.pool else ""
    seed += "_train" if a.through_train else ""
    out = Path(a.out or f"benchmarks/results/demo/passkey_probe_init{a.init_std:g}{seed}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")


def _through_train(a, model, tok, docs: list[list[int]], work: Path, prompts, start: float) -> dict:
    """Train `model` on `docs` with `longgen.train` as the probe trains (constant lr after 10 warm-up steps, 4,096
    tokens a step, AdamW 0.9/0.95, weight decay 0.1, clip 1) and score it: where the two differ is the loop."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from longgen.demo import score_passkey
    from longgen.train import train
    from longgen.train.config import load_config

    ids = work / "passkey-ids"  # a tokenized corpus directory: one document a probe document, eos after each
    ids.mkdir()
    rows = [np.asarray([*d, tok.eos_token_id], np.uint32) for d in docs]
    np.concatenate(rows).tofile(ids / "tokens.bin")
    np.save(ids / "offsets.npy", np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64))
    (ids / "meta.json").write_text("{}")
    model.save_pretrained(work / "init")
    tok.save_pretrained(work / "init")
    raw = {
        "model": {"path": str(work / "init"), "dtype": "float32"},
        "data": {"sources": [str(ids)], "seq_len": 128, "whole_min": 52, "cache_dir": str(work / "cache")},
        "optim": {"lr": a.lr, "warmup_steps": 10, "schedule": "constant"},
        "train": {"steps": a.steps, "batch_size": 32, "output_dir": str(work / "run"), "save_every": a.steps,
                  "device": "cpu", "tensorboard": False, "seed": a.seed},
    }  # fmt: skip
    final = train(load_config(raw=raw))
    trained = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    score = score_passkey(trained, tok, prompts)
    return {"step": a.steps, "seconds": round(time.perf_counter() - start), "documents": len(docs),
            "passkey_accuracy": {k: v["accuracy"] for k, v in score.items()}}  # fmt: skip


if __name__ == "__main__":
    main()
