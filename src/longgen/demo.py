"""`longgen demo`: the whole LongGen story, small enough to run on a laptop CPU in minutes, nothing downloaded.

1. a corpus of real long documents (the Python standard library's own source files), a BPE tokenizer trained on
   it, and pass-key documents made of that text (a 5-digit key stated at a random depth, asked for at the end, in
   the evaluation's wording; fresh ones for every training sequence that holds one);
2. a tiny Llama that first learns to look a key up in short documents (64 tokens: a model this small learns the
   copying there within minutes, and not at all at 1,024 tokens), then is pre-trained at a short context on the
   text and pass-key documents of that length;
3. two copies extended to `factor` x the context with the same budget: a LongGen hybrid (1/3 of the layers
   full, the rest SinkWindow) and a full-attention baseline, on the text and pass-key documents of the extended
   length. Both get the YaRN RoPE change (`rope`): it keeps the fast rotary frequencies that a look-up's copying
   rests on as they were trained; the NTK change alters them all and, in a model with 32-dimensional heads, costs
   most of the look-up before any training at the new length. The hybrid's full layers are those the pre-trained
   model's look-up needs, measured (`retrieval_layers`): in a model this small one layer at a random depth does
   it, not necessarily the middle ones that LongGen keeps in large models;
4. evaluation: pass-key retrieval by length (the same seeded prompts for every model, scored in batched
   forward passes by `longgen.eval.forced.greedy_matches`) for both and for StreamingLLM applied to the full
   model (no extra training), each against full attention on the same prompts (`compare_to_full`), perplexity
   by position, KV-cache bytes actually allocated, training speed, and prefill and generation speed through the
   serving runner (`longgen.infer.ModelRunner`);
5. one comparison table, ``summary.json`` and one figure (``demo.png``) in the output folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longgen.eval.prompts import PASSKEY_ANSWER_PREFIX, PASSKEY_NEEDLE, PASSKEY_QUESTION
from longgen.train.tokenizer import train_bpe_tokenizer

SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "turtledemo", "__pycache__", "lib2to3", "ensurepip"}
VARIANTS = ("full_attention", "longgen_hybrid", "streaming_llm")
LOSS_CHUNK = 2048  # positions a step whose logits training makes at once (train.loss_chunk)


@dataclass
class DemoConfig:
    out_dir: str = "longgen-demo"
    device: str = "cpu"
    corpus_mb: float = 3.0  # of standard-library source text
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 512  # MLP width
    layers: int = 6
    heads: int = 4
    kv_heads: int = 2
    short_len: int = 1024  # pre-training context
    factor: int = 8  # context extension factor (1024 -> 8192: attention dominates the work, as at long context)
    rope: str = "yarn"  # the RoPE change of the extension (`longgen.model.extend_rope`)
    sink: int = 16  # SinkWindow of the hybrid's sparse layers, and of StreamingLLM
    window: int = 128
    init_std: float = 0.15  # weight init (Llama's initializer_range): 0.02 needs ~2x the steps to learn look-ups
    lookup_len: int = 64  # first phase: pass-key documents of this many tokens only
    lookup_steps: int = 600
    lookup_batch_tokens: int = 2048
    lookup_lr: float = 3e-3  # constant after 10 warm-up steps
    batch_tokens: int = 4096  # tokens per optimizer step (pre-training and extension alike)
    pretrain_steps: int = 600
    extend_steps: int = 40
    lr: float = 2e-3
    passkey_share: float = 0.75  # about this share of pre-training and extension sequences hold a pass-key document
    passkey_prompts: int = 50  # pass-key prompts per length (the same for every model)
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError for settings the demo cannot run with."""
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if not 0.0 <= self.passkey_share < 1.0:
            raise ValueError(f"passkey_share must be in [0, 1), got {self.passkey_share}")
        if not 48 <= self.lookup_len <= self.short_len:
            raise ValueError(
                f"lookup_len must be from 48 (a pass-key document's fixed parts need ~40 tokens) to short_len "
                f"({self.short_len}), got {self.lookup_len}"
            )
        if self.lookup_batch_tokens < self.lookup_len:
            raise ValueError(f"lookup_batch_tokens ({self.lookup_batch_tokens}) must hold a lookup_len document")
        from longgen.model.rope import ROPE_CHOICES

        if self.rope not in ROPE_CHOICES:
            raise ValueError(f"rope must be one of {', '.join(ROPE_CHOICES)}, got {self.rope!r}")
        if self.factor < 2:
            raise ValueError(f"factor must be >= 2 (the demo extends the context), got {self.factor}")
        if self.short_len < 64:
            raise ValueError(f"short_len must be >= 64 (a pass-key prompt needs about 40 tokens), got {self.short_len}")
        if self.window >= self.short_len * self.factor:
            raise ValueError(
                f"window ({self.window}) must be below the extended length ({self.short_len * self.factor})"
            )
        if self.lookup_steps < 0:
            raise ValueError(f"lookup_steps must be >= 0 (0 skips the first phase), got {self.lookup_steps}")
        for name in ("corpus_mb", "init_std", "lr", "lookup_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.passkey_prompts < 1:
            raise ValueError(f"passkey_prompts must be >= 1, got {self.passkey_prompts}")


TINY = DemoConfig(
    corpus_mb=0.25,
    vocab_size=320,
    hidden_size=64,
    intermediate_size=256,
    layers=3,
    short_len=128,  # a 320-token vocabulary spends ~90 tokens on a pass key's needle and question
    factor=4,
    sink=4,
    window=32,
    lookup_len=112,
    lookup_steps=4,
    lookup_batch_tokens=224,
    batch_tokens=512,
    pretrain_steps=6,
    extend_steps=3,
    passkey_prompts=8,
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


def _passkey_prompt(tokenizer: Any, length: int, span: list[int], key: str, depth: float) -> list[int]:
    """A `length`-token pass-key prompt's ids: `span` (text token ids) with `key`'s needle at `depth`, then the
    question and the answer prefix, worded as `longgen eval passkey`."""
    from longgen.eval.prompts import build_prompt

    prompt = build_prompt(
        tokenizer,
        length,
        span,
        needles=[PASSKEY_NEEDLE.format(k=key)],
        depths=[depth],
        question=PASSKEY_QUESTION,
        answer_prefix=PASSKEY_ANSWER_PREFIX,
    )
    return prompt.input_ids


def passkey_documents(tokenizer: Any, text: list[int], lengths: list[int], rng: random.Random) -> list[str]:
    """One pass-key document per entry of `lengths`, each tokenizing to exactly that many tokens with the
    end-of-text token training appends: a span of `text` (token ids of training text) with a 5-digit key's needle
    at a random depth, then the question, the answer prefix and `` <key>.``, worded as the evaluation's prompts
    (`passkey_prompts`)."""
    from longgen.train.data import encode_texts

    if lengths and len(text) <= max(lengths):
        raise ValueError(f"the training text has {len(text)} tokens; {max(lengths)}-token documents need more")
    docs: list[str] = []
    todo = list(lengths)
    while todo:
        batch = []
        for length in todo:
            key = str(rng.randint(10_000, 99_999))
            answer = tokenizer(f" {key}.", add_special_tokens=False)["input_ids"]
            start = rng.randrange(len(text) - length)
            span = text[start : start + length]
            prompt = _passkey_prompt(tokenizer, length - 1 - len(answer), span, key, rng.random())
            batch.append(tokenizer.decode(prompt + answer))
        # decoding and tokenizing again almost always gives the same tokens; a document that does not is made anew
        counts = [len(ids) for ids in encode_texts(tokenizer, batch)]
        docs += [d for d, n, length in zip(batch, counts, todo, strict=True) if n == length - 1]
        todo = [length for n, length in zip(counts, todo, strict=True) if n != length - 1]
    return docs


def write_passkey_data(cfg: DemoConfig, corpus: Path, tokenizer: Any, out: Path) -> tuple[dict[str, Path], list[int]]:
    """The pass-key documents of each training stage as ``.jsonl`` (``{"lookup", "pretrain", "extend"}`` ->
    path) and the corpus's token ids. Fresh documents for every sequence that holds one. `lookup`: one of
    `cfg.lookup_len` tokens per sequence of that phase. `pretrain` and `extend`: lengths log-uniform from the
    previous stage's length to the stage's own (short ones teach the look-up, long ones carry it to the new
    length), each starting a sequence that the corpus's text fills up, as many as make about `cfg.passkey_share`
    of the stage's sequences hold one."""
    from longgen.train.synthetic import write_jsonl

    text = tokenizer(
        "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(corpus.iterdir())),
        add_special_tokens=False,
    )["input_ids"]
    rng = random.Random(f"{cfg.seed}:passkey-documents")
    long_len = cfg.short_len * cfg.factor
    plan = {"lookup": [cfg.lookup_len] * (cfg.lookup_steps * (cfg.lookup_batch_tokens // cfg.lookup_len))}
    for stage, lo, hi in (("pretrain", cfg.lookup_len, cfg.short_len), ("extend", cfg.short_len, long_len)):
        mean = (hi - lo) / math.log(hi / lo) if hi > lo else hi  # of the log-uniform lengths
        # `share` of the text fills the documents' sequences, the rest makes sequences of its own
        with_doc = cfg.passkey_share * len(text) / max(1.0, hi - mean)
        count = math.ceil(with_doc) if cfg.passkey_share else 0
        plan[stage] = [round(lo * (hi / lo) ** rng.random()) for _ in range(count)]
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for stage, lengths in plan.items():
        paths[stage] = out / f"passkey-{stage}.jsonl"
        write_jsonl(paths[stage], passkey_documents(tokenizer, text, lengths, rng))
        span = f"{min(lengths):,}-{max(lengths):,}" if lengths else "no"
        print(f"  {stage}: {len(lengths):,} pass-key documents of {span} tokens", flush=True)
    return paths, text


def _train(
    cfg: DemoConfig,
    model_path: Path,
    sources: list[Path],
    out: Path,
    seq_len: int,
    steps: int,
    *,
    batch_tokens: int | None = None,
    lr: float | None = None,
    schedule: str = "cosine",
    whole_min: int,
) -> dict[str, Any]:
    from longgen.train import load_config, train

    shutil.rmtree(out, ignore_errors=True)  # the demo's own run folder: a rerun starts over
    batch = max(1, (batch_tokens or cfg.batch_tokens) // seq_len)
    raw = {
        "model": {
            "path": str(model_path),
            "dtype": "float32" if cfg.device == "cpu" else "bfloat16",
            "activation_checkpointing": False,
        },
        "data": {
            "sources": [str(s) for s in sources],
            "seq_len": seq_len,
            "cache_dir": str(out.parent / "token-cache"),
            "whole_min": whole_min,  # pass-key documents are never cut: each starts a sequence
            "seed": cfg.seed,
        },
        "optim": {
            "lr": lr or cfg.lr,
            "warmup_steps": min(10, max(1, steps // 10)),
            "schedule": schedule,
        },
        "train": {
            "steps": steps,
            "batch_size": batch,
            "output_dir": str(out),
            "save_every": steps,
            "device": cfg.device,
            "tensorboard": False,
            "seed": cfg.seed,
            "loss_chunk": LOSS_CHUNK,
        },
    }
    final = train(load_config(raw=raw))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows[1:]] or [rows[-1]["tokens_per_s"]]  # the first step warms up
    # the median step: a few steps slowed by other work on the machine do not move it
    return {"final": final, "loss": rows[-1]["loss"], "train_tokens_per_s": statistics.median(tps)}


def measure_training_speed(
    paths: dict[str, Path], seq_len: int, device: str, rounds: int = 5, seed: int = 0, flush: bool = True
) -> dict[str, float]:
    """Training tokens/s of each model folder in `paths` at `seq_len` tokens: forward and backward of one sequence
    (random tokens) through the training loop's model and loss, the models taking turns, one warm-up step and then
    `rounds` timed steps each. Taking turns makes the ratio robust: a change in the machine's load slows every model
    alike. Subnormal floats count as zero, as in training (`longgen.train.loop.flush_denormals`; `flush` False:
    they do not). Returns ``{name: tokens/s}`` from each model's median step."""
    from longgen.train.loop import flush_denormals, load_training_model
    from longgen.train.loss import CausalLMLoss

    models = {name: CausalLMLoss(load_training_model(p, device)[0], LOSS_CHUNK).train() for name, p in paths.items()}
    vocab = next(iter(models.values())).lm.config.vocab_size
    ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(seed)).to(device)
    pos = torch.arange(seq_len, device=device)[None]
    times: dict[str, list[float]] = {name: [] for name in models}
    with flush_denormals(flush):
        for r in range(rounds + 1):
            for name, model in models.items():
                _sync(device)
                t0 = time.perf_counter()
                total, n = model(ids, pos, ids)
                (total / n).backward()
                _sync(device)
                if r:  # the first round warms up
                    times[name].append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
    return {name: seq_len / statistics.median(t) for name, t in times.items()}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_inference(
    path: Path, length: int, device: str, new_tokens: int = 32, batch: int = 4, repeats: int = 3
) -> dict[str, float]:
    """KV bytes the hybrid cache allocates for a `length`-token sequence, and speed at that length through the
    serving runner (`longgen.infer.ModelRunner`): prefill of a ``length - new_tokens``-token prompt (random tokens,
    one sequence), and generation: `batch` sequences with such prompts, each decoding `new_tokens` tokens greedily
    (tokens/s over all of them, the prefill not counted). Best of `repeats` runs."""
    from longgen.infer import HybridCache, ModelRunner, analytic_kv_bytes
    from longgen.infer.cache import cache_kwargs
    from longgen.model import load_model

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = load_model(path, dtype=dtype).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (batch, length - new_tokens), generator=gen).to(device)

    with torch.inference_mode():
        cache = HybridCache(model.config, max_length=length)
        model(prompts[:1], use_cache=True, **cache_kwargs(cache))
        stored = sum(int(cache.stored_tokens(i).sum()) for i in range(model.config.num_hidden_layers))
        runner = ModelRunner(model, max_batch=batch, max_len=length, compile=False)
        prefill, decode = [], []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            runner.prefill(0, prompts[0])
            _sync(device)
            prefill.append(time.perf_counter() - t0)
            logits = torch.stack([runner.prefill(row, prompts[row]) for row in range(batch)])
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                logits = runner.decode(logits.argmax(-1))
            _sync(device)
            decode.append(time.perf_counter() - t0)
    return {
        "kv_bytes": cache.allocated_bytes(),
        "kv_bytes_stored": stored * 2 * model.config.head_dim * dtype.itemsize,
        "kv_bytes_analytic": analytic_kv_bytes(model.config, length - new_tokens, bytes_per_value=dtype.itemsize),
        "prefill_tokens_per_s": prompts.shape[1] / min(prefill),
        "generate_tokens_per_s": batch * new_tokens / min(decode),
        "generate_batch": batch,
    }


def passkey_lengths(short_len: int, factor: int, min_length: int = 0) -> list[int]:
    """Prompt lengths for pass-key retrieval: half the pre-training context, then doubling up to `factor` x it;
    lengths below `min_length` (what the prompt's fixed parts need) are left out."""
    lengths, n = [short_len // 2], short_len
    while n < short_len * factor:
        lengths.append(n)
        n *= 2
    return [n for n in [*lengths, short_len * factor] if n >= min_length]


def passkey_prompts(
    tokenizer: Any, haystack: list[int], lengths: list[int], n: int, seed: int
) -> dict[int, tuple[list[list[int]], list[list[int]]]]:
    """`n` pass-key prompts of each length: ``{length: (prompts, answers)}`` as token ids.

    Each prompt is `length` tokens of held-out text starting at a seeded random offset of `haystack` (token ids),
    with a seeded 5-digit key's needle at depth ``(i + 0.5) / n`` (depths spread evenly over the context), the
    question and the answer prefix, worded as in `longgen eval passkey`; its answer is `` <key>``.
    """
    out = {}
    for length in lengths:
        if len(haystack) <= length:
            raise ValueError(f"the held-out text has {len(haystack)} tokens; {length}-token prompts need more")
        rng = random.Random(f"{seed}:passkey:{length}")
        prompts, answers = [], []
        for i in range(n):
            key = str(rng.randint(10_000, 99_999))
            start = rng.randrange(len(haystack) - length)
            prompts.append(_passkey_prompt(tokenizer, length, haystack[start : start + length], key, (i + 0.5) / n))
            answers.append(tokenizer(f" {key}", add_special_tokens=False)["input_ids"])
        out[length] = (prompts, answers)
    return out


def score_passkey(model: Any, tokenizer: Any, prompts: dict[int, tuple[list, list]]) -> dict[str, dict[str, Any]]:
    """Pass-key accuracy by length: whether greedy decoding gives exactly the key (and no further digit), decided
    by `greedy_matches` in batched forward passes. Returns ``{"<length>": {"n", "correct", "accuracy",
    "interval", "outcomes"}}`` with the 95% Wilson interval and each prompt's outcome (for paired comparisons)."""
    from longgen.eval.forced import greedy_matches
    from longgen.eval.stats import wilson_interval

    digits = {i for d in "0123456789" for i in tokenizer(d, add_special_tokens=False)["input_ids"]}
    result = {}
    for length, (ps, answers) in prompts.items():
        ok = greedy_matches(model, ps, answers, reject_next=digits, max_batch_tokens=16_384)
        correct = sum(ok)
        result[str(length)] = {
            "n": len(ok),
            "correct": correct,
            "accuracy": correct / len(ok),
            "interval": list(wilson_interval(correct, len(ok))),
            "outcomes": [bool(x) for x in ok],
        }
    return result


def _passkey_check(model_path: Path, tokenizer: Any, haystack: list[int], cfg: DemoConfig, length: int) -> str:
    """Pass-key accuracy of a training phase's model at `length` tokens (its own context), as progress output."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(cfg.device).eval()
    prompts = passkey_prompts(tokenizer, haystack, [length], cfg.passkey_prompts, cfg.seed + 1)
    cell = score_passkey(model, tokenizer, prompts)[str(length)]
    return f"pass key at {length} tokens {cell['correct']}/{cell['n']}"


def retrieval_layers(
    model_path: Path, tokenizer: Any, text: list[int], cfg: DemoConfig
) -> tuple[list[int], list[float]]:
    """The layers the pre-trained model's pass-key look-up needs, by `longgen.model.placement.loss_scores`: for
    each layer alone made SinkWindow(cfg.sink, cfg.window), the loss increase on the key's tokens of
    `cfg.passkey_prompts` prompts of `cfg.short_len` tokens made of `text` (training text, not the evaluation's);
    returns the third of the layers that lose most (LongGen's share of full layers), sorted, and the loss per layer
    (nats per key token)."""
    from transformers import AutoModelForCausalLM

    from longgen.model.placement import choose_full_layers, loss_scores
    from longgen.patterns import SinkWindow

    ps, answers = passkey_prompts(tokenizer, text, [cfg.short_len], cfg.passkey_prompts, cfg.seed + 2)[cfg.short_len]
    ids = torch.tensor([p + a for p, a in zip(ps, answers, strict=True)], device=cfg.device)
    targets = torch.zeros_like(ids, dtype=torch.bool)
    targets[:, -len(answers[0]) :] = True  # every key is a space and 5 digits
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(cfg.device).eval()
    scores = loss_scores(model, ids, SinkWindow(cfg.sink, cfg.window), targets=targets, progress=False)
    return choose_full_layers(scores.layers, max(1, round(cfg.layers / 3))), scores.layers


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the pipeline; returns the summary (also written to ``out_dir/summary.json``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from longgen.eval import ppl
    from longgen.eval.baseline import load_for_eval
    from longgen.model import convert_checkpoint
    from longgen.patterns import SinkWindow

    cfg.validate()
    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    long_len = cfg.short_len * cfg.factor
    start = time.perf_counter()

    t = _stage(1, "corpus, tokenizer and retrieval documents: the Python standard library's sources")
    corpus, heldout = build_corpus(out, cfg.corpus_mb)
    tokenizer = train_bpe_tokenizer(corpus, cfg.vocab_size)
    print(f"  BPE tokenizer, {len(tokenizer)} tokens", flush=True)
    passkey, train_text = write_passkey_data(cfg, corpus, tokenizer, out / "passkey")
    print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)

    t = _stage(
        2,
        f"pre-train a tiny Llama: {cfg.lookup_steps} steps on {cfg.lookup_len}-token pass-key documents, then "
        f"{cfg.pretrain_steps} steps at {cfg.short_len} tokens",
    )
    init = out / "models" / "init"
    model_cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.short_len,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        initializer_range=cfg.init_std,
    )
    AutoModelForCausalLM.from_config(model_cfg).save_pretrained(init)
    tokenizer.save_pretrained(init)
    runs = out / "runs"
    # held-out text for the pass-key prompts of every evaluation
    haystack = tokenizer("\n\n".join(p.read_text(encoding="utf-8") for p in heldout), add_special_tokens=False)
    start_from, progress = init, {}
    if cfg.lookup_steps:
        lookup = _train(cfg, init, [passkey["lookup"]], runs / "lookup", cfg.lookup_len, cfg.lookup_steps,
                        batch_tokens=cfg.lookup_batch_tokens, lr=cfg.lookup_lr, schedule="constant",
                        whole_min=cfg.lookup_len)  # fmt: skip
        start_from = lookup["final"]
        progress["lookup"] = _passkey_check(start_from, tokenizer, haystack["input_ids"], cfg, cfg.lookup_len)
        print(f"  look-up phase: loss {lookup['loss']:.3f}, {progress['lookup']}", flush=True)
    pre = _train(cfg, start_from, [corpus, passkey["pretrain"]], runs / "pretrain", cfg.short_len, cfg.pretrain_steps,
                 whole_min=cfg.lookup_len)  # fmt: skip
    progress["pretrain"] = _passkey_check(pre["final"], tokenizer, haystack["input_ids"], cfg, cfg.short_len)
    print(f"  loss {pre['loss']:.3f}, {progress['pretrain']} ({time.perf_counter() - t:.0f} s)", flush=True)

    t = _stage(3, f"convert and extend both copies to {long_len} tokens ({cfg.extend_steps} steps each)")
    full_layers, layer_loss = retrieval_layers(pre["final"], tokenizer, train_text, cfg)
    print(
        f"  pass-key loss when one layer alone is made SinkWindow({cfg.sink}, {cfg.window}), nats per key token: "
        + ", ".join(f"layer {i} {x:+.2f}" for i, x in enumerate(layer_loss))
        + f"; the hybrid keeps layers {full_layers} full",
        flush=True,
    )
    trained = {
        "full_attention": {"full_fraction": 1.0},
        "longgen_hybrid": {"pattern": SinkWindow(cfg.sink, cfg.window), "full_layers": full_layers},
    }
    results: dict[str, dict[str, Any]] = {}
    for name, kwargs in trained.items():
        converted = out / "models" / f"{name}-converted"
        convert_checkpoint(
            pre["final"], converted, force=True, progress=False, target_length=long_len, rope=cfg.rope, **kwargs
        )
        ext = _train(cfg, converted, [corpus, passkey["extend"]], runs / name, long_len, cfg.extend_steps,
                     whole_min=cfg.short_len)  # fmt: skip
        results[name] = {
            "model": str(ext["final"]),
            "extension_loss": ext["loss"],
            "extension_tokens_per_s": ext["train_tokens_per_s"],
        }
        print(f"  {name}: loss {ext['loss']:.3f}, {ext['train_tokens_per_s']:,.0f} tokens/s while training", flush=True)
    speed = measure_training_speed({name: Path(results[name]["model"]) for name in trained}, long_len, cfg.device)
    for name, tps in speed.items():
        results[name]["train_tokens_per_s"] = tps
    print(
        f"  training speed at {long_len} tokens, the models taking turns: "
        + ", ".join(f"{name} {tps:,.0f} tokens/s" for name, tps in speed.items()),
        flush=True,
    )
    results["streaming_llm"] = {"model": results["full_attention"]["model"], "applied_to": "full_attention"}
    print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)

    t = _stage(4, "evaluate: pass-key retrieval by length, perplexity by position, KV cache, generation speed")
    eval_tokenizer = AutoTokenizer.from_pretrained(results["full_attention"]["model"])
    fixed = len(
        eval_tokenizer(PASSKEY_NEEDLE.format(k=12345) + PASSKEY_QUESTION + " " + PASSKEY_ANSWER_PREFIX)["input_ids"]
    )
    lengths = passkey_lengths(cfg.short_len, cfg.factor, min_length=fixed + 32)
    prompts = passkey_prompts(eval_tokenizer, haystack["input_ids"], lengths, cfg.passkey_prompts, cfg.seed)
    for name, res in results.items():
        options = {"baseline": "streaming", "sink": cfg.sink, "window": cfg.window} if name == "streaming_llm" else {}
        model, tok = load_for_eval(res["model"], device=cfg.device, **options)
        res["passkey_by_length"] = score_passkey(model, tok, prompts)
        del model
        p = ppl(
            res["model"],
            lengths=[long_len],
            bucket=max(16, long_len // 8),
            documents=[str(d) for d in heldout],
            num_documents=min(4, len(heldout)),
            out_dir=out / "eval" / name,
            progress=False,
            device=cfg.device,
            **options,
        )
        res["perplexity"] = p["summary"]
        if name != "streaming_llm":
            res.update(measure_inference(Path(res["model"]), long_len, cfg.device))
        acc = ", ".join(f"{n}: {v['accuracy']:.0%}" for n, v in res["passkey_by_length"].items())
        print(f"  {name}: pass key by length {acc}", flush=True)
    compare_to_full(results)
    print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)

    _stage(5, "summary")
    summary = {
        **_run_record(cfg.device),
        "wall_s": time.perf_counter() - start,
        "pretrain_len": cfg.short_len,
        "extended_len": long_len,
        "config": dataclasses.asdict(cfg),
        "pretrain_loss": pre["loss"],
        "passkey_while_pretraining": progress,
        "hybrid_full_layers": full_layers,
        "layer_passkey_loss": layer_loss,
        "variants": results,
    }
    figure = out / "demo.png"
    draw_summary(summary, figure)
    summary["figure"] = str(figure)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(format_summary(summary))
    print(f"\nfigure: {figure}")
    print(
        f"The trained hybrid is {results['longgen_hybrid']['model']} (models/longgen_hybrid-converted is the "
        f"untrained conversion); models, metrics, evaluation JSON and summary.json are in {out}"
    )
    return summary


def _run_record(device: str) -> dict[str, str]:
    """Device, date, commit and command of this run, as every result of the project carries them."""
    import datetime
    import sys

    from longgen.provenance import cpu_name, git_commit

    argv = sys.argv
    command = ["longgen", *argv[1:]] if Path(argv[0]).name in ("longgen", "__main__.py") else argv
    return {
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name(),
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "command": " ".join(command),
    }


def compare_to_full(variants: dict[str, dict[str, Any]]) -> None:
    """Add to every pass-key cell of the variants other than full attention its difference to full attention on the
    same prompts (``"vs_full"``: accuracy difference, its 95% interval for paired proportions, McNemar's p)."""
    from longgen.eval.stats import paired_difference

    full = variants["full_attention"]["passkey_by_length"]
    for name, res in variants.items():
        if name == "full_attention":
            continue
        for length, cell in res["passkey_by_length"].items():
            d = paired_difference(cell["outcomes"], full[length]["outcomes"])
            cell["vs_full"] = {"diff": d.diff, "ci_low": d.ci_low, "ci_high": d.ci_high, "mcnemar_p": d.p_value}


def format_summary(summary: dict) -> str:
    """The closing table: one column per variant (`VARIANTS`), a row per measurement ("-" where none applies)."""
    v = summary["variants"]
    long_len = str(summary["extended_len"])
    lengths = list(v["full_attention"]["passkey_by_length"])
    batch = v["full_attention"].get("generate_batch", 1)

    def get(fmt: str, *keys: str):
        def cell(r: dict) -> str:
            for k in keys:
                if not isinstance(r, dict) or k not in r:
                    return "-"
                r = r[k]
            return fmt.format(r)

        return cell

    def versus(r: dict) -> str:
        d = r["passkey_by_length"][long_len].get("vs_full")
        return "-" if d is None else f"{d['diff']:+.0%} ({d['ci_low']:+.0%}, {d['ci_high']:+.0%})"

    rows = [(f"pass-key accuracy at {n}", get("{:.0%}", "passkey_by_length", n, "accuracy")) for n in lengths]
    rows += [
        (f"pass key minus full at {long_len} (95% CI)", versus),
        (f"perplexity over {long_len} tokens", get("{:.2f}", "perplexity", "ppl_by_length", long_len)),
        ("KV cache allocated (KiB)", lambda r: f"{r['kv_bytes'] / 1024:,.0f}" if "kv_bytes" in r else "-"),
        (f"training tokens/s at {long_len}", get("{:,.0f}", "train_tokens_per_s")),
        ("prefill tokens/s", get("{:,.0f}", "prefill_tokens_per_s")),
        (f"generation tokens/s ({batch} sequences)", get("{:,.1f}", "generate_tokens_per_s")),
    ]
    width = max(len(r[0]) for r in rows) + 2
    names = [n for n in VARIANTS if n in v]
    lines = [f"{'':<{width}}" + "".join(f"{n:>19}" for n in names)]
    lines += [f"{label:<{width}}" + "".join(f"{fmt(v[n]):>19}" for n in names) for label, fmt in rows]
    return "\n".join(lines)


def draw_summary(summary: dict, path: Path) -> None:
    """One PNG of the run: pass-key accuracy by length (all variants), loss by position, KV-cache bytes and
    tokens/s (the trained models)."""
    from longgen.eval.plots import _pyplot

    plt = _pyplot()
    v = summary["variants"]
    names = [n for n in VARIANTS if n in v]
    trained = [n for n in names if "kv_bytes" in v[n]]
    colors = {"full_attention": "tab:blue", "longgen_hybrid": "tab:orange", "streaming_llm": "tab:gray"}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ax = axes[0][0]
    for n in names:
        by = v[n]["passkey_by_length"]
        xs = [int(k) for k in by]
        ax.plot(xs, [by[k]["accuracy"] for k in by], marker="o", label=n, color=colors[n])
        lo, hi = zip(*(by[k]["interval"] for k in by), strict=True)
        ax.fill_between(xs, lo, hi, alpha=0.15, color=colors[n])
    ax.axvline(summary["pretrain_len"], ls="--", color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("prompt length (tokens); dashed: pre-training context")
    ax.set_ylabel("pass-key accuracy")
    ax.set_title(
        f"pass-key retrieval ({summary['config']['passkey_prompts']} prompts a length, 95% intervals)", fontsize=9
    )
    ax.legend(fontsize=8)
    ax = axes[0][1]
    for n in names:
        pos = v[n]["perplexity"]["by_position"]
        ax.plot([(b["start"] + b["end"]) / 2 for b in pos], [b["loss"] for b in pos], marker=".", label=n,
                color=colors[n])  # fmt: skip
    ax.axvline(summary["pretrain_len"], ls="--", color="k", lw=0.8)
    ax.set_xlabel("token position")
    ax.set_ylabel("mean loss (nats), held-out text")
    ax.set_title("loss by position", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[1][0]
    kib = [v[n]["kv_bytes"] / 1024 for n in trained]
    ax.bar(trained, kib, color=[colors[n] for n in trained])
    for i, x in enumerate(kib):
        ax.text(i, x, f"{x:,.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("KiB")
    ax.set_title(f"KV cache allocated for {summary['extended_len']} tokens", fontsize=9)
    ax = axes[1][1]
    width = 0.38
    speeds = ("train_tokens_per_s", "prefill_tokens_per_s", "generate_tokens_per_s")
    for j, key in enumerate(speeds):
        base = v["full_attention"][key]
        for i, n in enumerate(trained):
            ratio = v[n][key] / base
            ax.bar(j + (i - 0.5) * width, ratio, width, color=colors[n], label=n if j == 0 else None)
            ax.text(j + (i - 0.5) * width, ratio, f"{v[n][key]:,.0f}/s", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(speeds)), ["training", "prefill", "generation"])
    ax.set_ylabel("tokens/s relative to full attention")
    ax.set_title(f"speed at {summary['extended_len']} tokens", fontsize=9)
    ax.legend(fontsize=8)
    fig.suptitle(f"longgen demo: pre-trained at {summary['pretrain_len']}, extended to {summary['extended_len']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
