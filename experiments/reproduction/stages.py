"""The stages: prepare, pretrain, extend (one per trained variant), eval (one per variant and task).

Each stage writes its outputs under the work folder and, when it finishes, a record ``state/<stage>.json`` with
a hash of everything that decides its result (its *key*: the settings it reads and the records of the stages it
builds on). A stage whose record has the current key is skipped; one whose key changed starts over; one that was
interrupted with the same key keeps its outputs, so a training run resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .corpus import file_name, select_documents
from .settings import (
    CHAIN_MAX,
    FRONTIER_ALIASES,
    FRONTIER_POINTS,
    RETRIEVAL_KINDS,
    TASKS,
    Settings,
    batch_shape,
    plan,
    train_seed,
    trained_for,
)

TRAINING_START_S = 60.0  # a training stage is not started closer to the deadline: loading and compiling come first


class DeadlineReached(BaseException):  # a BaseException, so that no `except Exception` in a library swallows it
    """--deadline-minutes passed; finished work is kept and the next call continues."""


class Deadline:
    """Raise `DeadlineReached` in the main thread `minutes` after entering (no deadline when None).

    A training run inside `Deadline.saving_training()` is instead asked to stop (`longgen.train.request_stop`, what
    SIGTERM does): it finishes its step, writes a checkpoint of it and stops, and that becomes `DeadlineReached`;
    so a call stopped at its deadline loses no training step. Should the run not stop within `GRACE_S` (a step or a
    checkpoint that hangs), `DeadlineReached` is raised where it is.
    """

    GRACE_S = 30.0
    _fired = False  # class-wide: the stages do not hold the Deadline
    _ends: float | None = None  # time.monotonic() at the deadline

    @staticmethod
    def seconds_left() -> float | None:
        """Seconds until the deadline of the call (None: no deadline)."""
        return None if Deadline._ends is None else Deadline._ends - time.monotonic()

    def __init__(self, minutes: float | None):
        self.minutes = minutes

    def _fire(self, signum, frame):
        loop = sys.modules.get("longgen.train.loop")  # not imported: no training runs
        if not Deadline._fired and loop is not None and loop.request_stop():
            Deadline._fired = True
            signal.setitimer(signal.ITIMER_REAL, self.GRACE_S)
            return
        raise DeadlineReached

    @staticmethod
    @contextlib.contextmanager
    def saving_training():
        """Around a `longgen.train.train` call: the stop the deadline asked for becomes `DeadlineReached`."""
        from longgen.train import TrainingInterrupted

        try:
            yield
        except TrainingInterrupted as e:
            if Deadline._fired and e.exit_code == 128 + signal.SIGTERM:
                raise DeadlineReached from e
            raise

    def __enter__(self):
        Deadline._fired = False
        if self.minutes:
            Deadline._ends = time.monotonic() + self.minutes * 60
            signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, self.minutes * 60)
        return self

    def __exit__(self, *exc):
        Deadline._ends = None
        if self.minutes:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: Path, obj: Any) -> None:
    """Write atomically: a reader (or the next call, after a kill) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def log(text: str) -> None:
    print(text, flush=True)


def interactive() -> bool:
    """Progress bars only on a terminal (the GPU machine's output is a log)."""
    return sys.stderr.isatty()


EVAL_STAGES = ("retrieval", "ppl")  # every variant's retrieval first


def retrieval_lengths(s: Settings, stage: str) -> tuple[int, int]:
    """Token lengths of the stage's synthetic retrieval documents: from a quarter of the context (pre-training)
    or from --extend-retrieval-min of it (extension; near the whole context by default, so that needle-question
    distances cover the whole extended context evenly), up to all of it."""
    if stage == "pretrain":
        return max(16, s.short_len // 4), s.short_len
    return max(16, int(s.long_len * s.extend_retrieval_min)), s.long_len


def far_share(s: Settings, stage: str) -> float:
    """Share of the stage's synthetic facts placed far apart (needles in a document's first eighth, the question at
    its end): --extend-far-share in the extension, where distances near the whole context are otherwise rare
    (`results/retrieval_data_check.json`); none in pre-training."""
    return s.extend_far_share if stage == "extend" else 0.0


def near_share(s: Settings, stage: str) -> float:
    """Share of the stage's synthetic facts stated wholly just before their question (within a thirty-second of the
    document): --extend-near-share in the extension, where a whole variable chain near its question is otherwise
    all but absent; none in pre-training, whose short documents have many."""
    return s.extend_near_share if stage == "extend" else 0.0


def chain_max(s: Settings, stage: str) -> int:
    """Names in the longest variable chain of the stage's synthetic documents: --extend-chain-max in the extension,
    the library's default in pre-training."""
    return s.extend_chain_max if stage == "extend" else CHAIN_MAX


def whole_min(s: Settings, stage: str) -> int | None:
    """`longgen.train`'s data.whole_min (None: off): documents from a quarter (pre-training) or an eighth
    (extension) of the context on are never cut by packing, the retrieval documents among them."""
    if not s.whole_docs:
        return None
    return min(retrieval_lengths(s, stage)[0], max(16, s.short_len // 4 if stage == "pretrain" else s.long_len // 8))


def extend_upsample(s: Settings) -> list[list[float]]:
    """Extension data: documents from long_len/8 tokens on keep their weight, shorter ones half of it."""
    return [[max(2, s.long_len // 8), 1.0], [1, 0.5]]


class Experiment:
    """The stages over one work folder; `run(name)` runs a stage unless it is finished for the current key."""

    def __init__(self, s: Settings, force: bool = False):
        self.s = s
        self.force = force
        self.work = Path(s.work_dir).resolve()
        self.out = Path(s.out_dir).resolve()
        self.state = self.work / "state"
        self.data = self.work / "data"
        self.tokenizer_dir = self.work / "tokenizer"
        self.plan = plan(s)

    # -- bookkeeping ---------------------------------------------------------------------------------------

    def stage_names(self, variants: Sequence[str] | None = None) -> list[str]:
        """The stages `all` runs for `variants` (default: the settings'), in its order: each variant's retrieval is
        evaluated as soon as its model is trained, so a call cut short still reports the variants it finished;
        perplexity comes last."""
        variants = list(variants or self.s.variants)
        names = ["prepare", "pretrain"]
        for v in variants:
            names += [f"extend-{t}" for t in trained_for([v]) if f"extend-{t}" not in names]
            names.append(f"eval-{v}-{EVAL_STAGES[0]}")
        return names + [f"eval-{v}-{t}" for t in EVAL_STAGES[1:] for v in variants]

    def done(self, name: str) -> dict | None:
        """The record of stage `name` when it finished (perhaps for other settings), else None."""
        return read_json(self.state / f"{name}.json")

    def result(self, name: str) -> dict:
        return self.done(name)["result"]

    def fingerprint(self, name: str) -> str:
        """Identity of a finished stage's result, for the keys of the stages built on it."""
        if not self.current(name):
            raise ValueError(f"stage {name!r} is not finished for these settings: run it first (or run `all`)")
        return digest(self.done(name))

    def key(self, name: str) -> dict[str, Any]:
        """Everything that decides stage `name`'s result; ValueError when a stage it builds on is not finished."""
        s = self.s

        def train(stage: str) -> dict[str, Any]:
            return {
                "batch": [s.batch_tokens, s.micro_batch_tokens],
                "seed": train_seed(s, stage),
                "device": self.device(),
                "activation_checkpointing": s.activation_checkpointing,
                "compile": s.compile,
                "whole_docs": s.whole_docs,
            }

        if name == "prepare":
            fields = ("seed", "sources", "corpus_mb", "tokenizer_mb", "vocab_size", "heldout_docs", "short_len",
                      "long_len", "retrieval_share_pretrain", "retrieval_share_extend", "extend_retrieval_min",
                      "extend_far_share", "facts_per_1k")  # fmt: skip
            key = {**{k: getattr(s, k) for k in fields}, "heldout_min_tokens": max(s.ppl_lengths), "format": 3}
            if s.extend_chain_max != CHAIN_MAX:  # the recipe's data keep the key they were made with
                key["extend_chain_max"] = s.extend_chain_max
            if s.extend_near_share:
                key["extend_near_share"] = s.extend_near_share
            if s.fact_kinds != RETRIEVAL_KINDS:
                key["fact_kinds"] = list(s.fact_kinds)
            return key
        if name == "pretrain":
            model = [s.hidden_size, s.layers, s.heads, s.kv_heads, s.intermediate_size, s.short_len]
            steps, lr = self.plan["pretrain_steps"], s.pretrain_lr
            prepared = self.fingerprint("prepare")
            return {"prepare": prepared, "model": model, "steps": steps, "lr": lr, **train("pretrain")}
        if name.startswith("extend-"):
            variant = name.removeprefix("extend-")
            spec = self.variant_spec(variant)
            return {
                "pretrain": self.fingerprint("pretrain"),
                "spec": None if spec is None else {k: _key_text(v) for k, v in spec.items()},
                "long_len": s.long_len,
                "rope": s.rope,
                "steps": self.plan["extend_steps"],
                "batch_tokens": s.batch_tokens,
                "lr": s.extend_lr,
                **train("extend"),
            }
        if name.startswith("eval-"):
            variant, task = name.removeprefix("eval-").rsplit("-", 1)
            trained, options = self.model_of(variant)
            what = {"lengths": s.ppl_lengths, "ppl": [s.ppl_docs, s.ppl_bucket]} if task == "ppl" else {
                "lengths": list(s.eval_lengths), "tasks": list(TASKS), "per_task": s.prompts_per_task,
                "answer_room": s.answer_room, "records": 2}  # fmt: skip
            return {"model": self.fingerprint(f"extend-{trained}"), "options": options, **what, "seed": s.seed,
                    "prepare": self.fingerprint("prepare"), "device": self.device()}  # fmt: skip
        raise ValueError(f"unknown stage {name!r}")

    def current(self, name: str) -> bool:
        """Whether stage `name` finished for the current settings and inputs."""
        record = self.done(name)
        if record is None:
            return False
        try:
            return record["key"] == digest(self.key(name))
        except ValueError:
            return False

    def outputs(self, name: str) -> list[Path]:
        """What a stage writes (cleared when it starts over)."""
        if name == "prepare":
            return [self.data, self.tokenizer_dir, self.work / "token-cache"]
        if name == "pretrain":
            return [self.work / "models" / "init", self.work / "runs" / "pretrain"]
        if name.startswith("extend-"):
            variant = name.removeprefix("extend-")
            return [self.work / "models" / f"{variant}-start", self.work / "runs" / variant]
        variant, task = name.removeprefix("eval-").rsplit("-", 1)
        return [self.work / "eval" / variant / task]

    def run(self, name: str) -> dict:
        """Run stage `name` unless finished for the current key (or --force); returns its result."""
        key = self.key(name)
        key_hash = digest(key)
        record, started = self.done(name), read_json(self.state / f"{name}.started")
        if record is not None and record["key"] == key_hash and not self.force:
            log(f"[{name}] finished earlier with these settings: skipped")
            return record["result"]
        left, need = Deadline.seconds_left(), self.seconds_to_start(name)
        if left is not None and left < need:
            log(f"[{name}] not started: it needs ~{need:.0f} s, {max(left, 0):.0f} s are left before the deadline")
            raise DeadlineReached
        earlier = 0.0  # seconds the stage ran in earlier calls that were stopped (it resumes from their work)
        if self.force or (started or {}).get("key") != key_hash:  # resume only what was started with this key
            for p in self.outputs(name):
                shutil.rmtree(p, ignore_errors=True)
        else:
            earlier = started.get("seconds", 0.0)
        (self.state / f"{name}.json").unlink(missing_ok=True)
        started_file = self.state / f"{name}.started"

        def mark_started(seconds: float) -> None:  # the key it runs with, and the seconds it ran so far
            write_json(started_file, {"key": key_hash, "settings": key, "seconds": seconds})

        mark_started(earlier)
        log(f"[{name}] running")
        t0 = time.perf_counter()
        try:
            if name == "prepare":
                result = self._prepare()
            elif name == "pretrain":
                result = self._pretrain()
            elif name.startswith("extend-"):
                result = self._extend(name.removeprefix("extend-"))
            else:
                result = self._evaluate(*name.removeprefix("eval-").rsplit("-", 1))
        except BaseException:  # stopped (the deadline, a signal, an error): the next call adds on to these seconds
            mark_started(earlier + time.perf_counter() - t0)
            raise
        now = time.perf_counter() - t0
        seconds = earlier + now
        record = {"key": key_hash, "result": result, "seconds": seconds, "finished": datetime.now(UTC).isoformat()}
        write_json(self.state / f"{name}.json", record)
        started_file.unlink(missing_ok=True)
        log(f"[{name}] finished in {now:.0f} s" + (f" ({seconds:.0f} s with the calls before)" if earlier else ""))
        return result

    def planned_seconds(self, name: str) -> float:
        """Planned seconds of stage `name` at the assumed throughput."""
        sec = self.plan["seconds"]
        if name in ("prepare", "pretrain"):
            return sec[name]
        if name.startswith("extend-"):
            return sec["extend"][name.removeprefix("extend-")]
        variant, task = name.removeprefix("eval-").rsplit("-", 1)
        each = sec["eval_full"] if variant == "full" else sec["eval_sparse"]
        return each * (0.9 if task == "retrieval" else 0.1)

    def seconds_to_start(self, name: str) -> float:
        """The time before the deadline a stage needs to be started: an evaluation its planned seconds (it cannot
        resume half-way), a training stage `TRAINING_START_S` (it checkpoints the step it is in at the deadline,
        but loading and compiling come first)."""
        return self.planned_seconds(name) if name.startswith("eval-") else TRAINING_START_S

    def remaining_seconds(self, variants: Sequence[str] | None = None) -> float:
        """Planned seconds of the stages `all` runs for `variants` that are not finished for the current settings."""
        return sum(self.planned_seconds(n) for n in self.stage_names(variants) if not self.current(n))

    def device(self) -> str:
        if self.s.device != "auto":
            return self.s.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    # -- prepare -------------------------------------------------------------------------------------------

    def _prepare(self) -> dict:
        import numpy as np
        from transformers import AutoTokenizer

        from longgen.train.data import encode_texts, tokenize_corpus
        from longgen.train.synthetic import write_jsonl, write_retrieval_set
        from longgen.train.tokenizer import train_bpe_tokenizer

        s = self.s
        t = time.perf_counter()
        heldout_min_bytes = 5 * max(s.ppl_lengths)  # >= 1.4x the longest evaluation at ~3.5 bytes a token
        sel = select_documents(s.sources, s.corpus_mb, s.heldout_docs, heldout_min_bytes, s.seed)
        texts = [text for _, text in sel.train]
        log(f"  {len(texts)} training documents ({sel.train_bytes / 2**20:.1f} MB), {len(sel.heldout)} held out, "
            f"from {len(sel.roots)} folders ({time.perf_counter() - t:.0f} s)")  # fmt: skip
        self.data.mkdir(parents=True, exist_ok=True)
        heldout_dir = self.data / "heldout"
        shutil.rmtree(heldout_dir, ignore_errors=True)
        heldout_dir.mkdir()
        for i, (name, text) in enumerate(sel.heldout):
            (heldout_dir / f"{i:02d}_{file_name(name)}.txt").write_text(text, encoding="utf-8")
        train_jsonl = self.data / "train.jsonl"
        write_jsonl(train_jsonl, texts)

        t = time.perf_counter()
        sample = self.data / "tokenizer-sample"  # longgen.demo's tokenizer training reads a folder of files
        shutil.rmtree(sample, ignore_errors=True)
        sample.mkdir()
        taken = 0
        for i, text in enumerate(texts):
            if taken >= s.tokenizer_mb * 2**20:
                break
            (sample / f"{i:06d}.txt").write_text(text, encoding="utf-8")
            taken += len(text.encode())
        tmp = self.work / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        train_bpe_tokenizer(sample, s.vocab_size).save_pretrained(tmp)
        shutil.rmtree(self.tokenizer_dir, ignore_errors=True)
        tmp.rename(self.tokenizer_dir)
        # loaded back the way the training loop loads it, so that the token caches made here are the ones it uses
        tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
        log(f"  BPE tokenizer, {len(tokenizer)} tokens, trained on {taken / 2**20:.1f} MB "
            f"({time.perf_counter() - t:.0f} s)")  # fmt: skip

        t = time.perf_counter()
        cache = self.work / "token-cache"
        base = tokenize_corpus([str(train_jsonl)], tokenizer, cache, progress=interactive())
        chars_per_token = sum(map(len, texts)) / max(1, base.n_tokens - base.n_docs)
        log(f"  {base.n_tokens:,} training tokens, {chars_per_token:.2f} characters a token "
            f"({time.perf_counter() - t:.0f} s)")  # fmt: skip

        t = time.perf_counter()

        def count_tokens(docs: list[str]) -> list[int]:  # none may exceed a training sequence (packing cuts it)
            return [len(ids) for ids in encode_texts(tokenizer, docs)]

        rules = extend_upsample(s)
        lengths = base.doc_lengths
        extend_tokens = float(np.where(lengths >= rules[0][0], lengths * rules[0][1], lengths * rules[1][1]).sum())
        sets = {}
        for stage, share, real, span in (
            ("pretrain", s.retrieval_share_pretrain, float(base.n_tokens), retrieval_lengths(s, "pretrain")),
            ("extend", s.retrieval_share_extend, extend_tokens, retrieval_lengths(s, "extend")),
        ):
            path = self.data / f"retrieval-{stage}.jsonl"
            total = int(share / (1 - share) * real)  # tokens that make `share` of what the loader draws from
            made = write_retrieval_set(path, texts, total, span, chars_per_token, s.facts_per_1k, s.seed,
                                       kinds=s.fact_kinds, count_tokens=count_tokens,
                                       far_share=far_share(s, stage), chain_max=chain_max(s, stage),
                                       near_share=near_share(s, stage))  # fmt: skip
            sources = [str(base.path), str(path)]
            combined = tokenize_corpus(sources, tokenizer, cache, progress=interactive())  # the loader's cache
            sets[stage] = {**made, "path": str(path), "sources": sources, "corpus_tokens": combined.n_tokens}
        log(f"  synthetic retrieval documents: {sets['pretrain']['documents']} for pre-training, "
            f"{sets['extend']['documents']} for extension; {sets['pretrain']['remade']} and "
            f"{sets['extend']['remade']} made again shorter, being longer than a sequence; "
            f"{sets['pretrain']['too_long']} and {sets['extend']['too_long']} still longer (packing cuts them) "
            f"({time.perf_counter() - t:.0f} s)")  # fmt: skip
        manifest = {
            **sel.manifest(),
            "training_tokens": base.n_tokens,
            "chars_per_token": chars_per_token,
            "heldout_dir": str(heldout_dir),
            "tokenizer": str(self.tokenizer_dir),
            "vocab": len(tokenizer),
            "base_corpus": str(base.path),
            "retrieval": sets,
        }
        write_json(self.data / "manifest.json", manifest)
        return manifest

    # -- training ------------------------------------------------------------------------------------------

    def _train(self, model: Path, sources: list[str], stage: str, lr: float, upsample, out: Path) -> dict:
        """One run of longgen's training loop for `stage` ("pretrain" or "extend"), resumed from `out`'s last
        checkpoint if any; returns its summary."""
        from longgen.train import load_config, train

        s = self.s
        device = self.device()
        seq_len = s.short_len if stage == "pretrain" else s.long_len
        steps = self.plan[f"{stage}_steps"]
        bs, accum = batch_shape(s, seq_len)
        raw = {
            "model": {
                "path": str(model),
                "tokenizer": str(self.tokenizer_dir),
                "dtype": "bfloat16" if device == "cuda" else "float32",
                "activation_checkpointing": s.activation_checkpointing,
                "compile": s.compile,
            },
            "data": {
                "sources": sources,
                "seq_len": seq_len,
                "cache_dir": str(self.work / "token-cache"),
                "upsample": upsample,
                "whole_min": whole_min(s, stage),
                "seed": train_seed(s, stage),
            },
            "optim": {"lr": lr, "warmup_steps": max(1, min(100, steps // 10)), "schedule": "cosine"},
            "train": {
                "steps": steps,
                "batch_size": bs,
                "grad_accum": accum,
                "output_dir": str(out),
                "save_every": self.plan[stage]["save_every"],
                "keep_checkpoints": 1,
                "device": device,
                "tensorboard": False,
                "progress": interactive(),
                "seed": train_seed(s, stage),
                "resume": True,
            },
        }
        with Heartbeat(out / "metrics.jsonl", steps), Deadline.saving_training():
            final = train(load_config(raw=raw))
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows]
        tps = [r["tokens_per_s"] for r in rows[1:]] or [rows[-1]["tokens_per_s"]]  # the first step warms up
        tail = losses[-max(1, len(losses) // 10) :]
        result = {
            "model": str(final),
            "steps": steps,
            "seq_len": seq_len,
            "tokens": steps * bs * accum * seq_len,
            "batch_size": bs,
            "grad_accum": accum,
            "lr": lr,
            "loss_first": losses[0],
            "loss_final": sum(tail) / len(tail),  # mean of the last tenth of the steps
            "tokens_per_s": sum(tps) / len(tps),
            "device": device,
        }
        log(f"  loss {result['loss_first']:.3f} -> {result['loss_final']:.3f}, {result['tokens_per_s']:,.0f} tokens/s")
        return result

    def _pretrain(self) -> dict:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

        s = self.s
        init, run = self.outputs("pretrain")
        if not (init / "model.safetensors").is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
            config = LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=s.hidden_size,
                intermediate_size=s.intermediate_size,
                num_hidden_layers=s.layers,
                num_attention_heads=s.heads,
                num_key_value_heads=s.kv_heads,
                max_position_embeddings=s.short_len,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id,
                bos_token_id=None,
                tie_word_embeddings=True,
            )
            torch.manual_seed(s.seed)
            model = AutoModelForCausalLM.from_config(config)
            log(f"  Llama, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {s.layers} layers")
            tmp = init.with_name(".init.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(init, ignore_errors=True)
            tmp.rename(init)
        sources = self.result("prepare")["retrieval"]["pretrain"]["sources"]
        result = self._train(init, sources, "pretrain", s.pretrain_lr, [], run)
        result["parameters"] = param_count(json.loads((init / "config.json").read_text()))
        return result

    def variant_spec(self, variant: str) -> dict[str, Any] | None:
        """How `variant` is made from the pre-trained model: `longgen.convert` arguments (None: stays plain)."""
        from longgen.patterns import BlockSparse, SinkWindow

        s = self.s
        sink_window = SinkWindow(s.sink, s.window)
        auto = {  # the full layers chosen by the pre-trained model's attention on training text
            "full_layers": "auto",
            "pattern": sink_window,
            "calibration": [str(self.data / "train.jsonl")],
            "calibration_length": s.short_len,
            "calibration_sequences": 8,
            "device": self.device(),
        }
        specs = {
            "full": None,
            "hybrid_sinkwindow": {"full_layers": "middle", "pattern": sink_window},
            "hybrid_blocksparse": {"full_layers": "middle", "pattern": BlockSparse(s.block_size, s.local_blocks)},
            # the same with the first block visible to every KV head, as SinkWindow's sink tokens
            "hybrid_blocksparse_sink": {"full_layers": "middle", "pattern": blocksparse_with_sink(s)},
            "all_sparse": {"full_fraction": 0.0, "pattern": sink_window},
            "hybrid_bottom": {"full_layers": "bottom", "pattern": sink_window},
            # one full layer in the middle of each of as many equal segments (12 layers: 1, 4, 7, 10)
            "hybrid_interleave": {"full_layers": "interleave", "pattern": sink_window},
            # a plain sliding window: what `longgen export --format transformers` can hand to other engines
            "hybrid_nosink": {"full_layers": "middle", "pattern": SinkWindow(0, s.window)},
            "hybrid_auto": auto,  # as many full layers as the middle third
            # the same, chosen by the loss increase with each layer alone sparse (score="loss")
            "hybrid_auto_loss": {**auto, "score": "loss"},
        }
        for name, placement, fraction in FRONTIER_POINTS:
            if name not in FRONTIER_ALIASES:
                where = auto if placement == "auto" else {"full_layers": "middle", "pattern": sink_window}
                specs[name] = {**where, "full_fraction": fraction}
        if variant not in specs:
            raise ValueError(f"{variant!r} is not trained; trained variants: {', '.join(specs)}")
        return specs[variant]

    def _extend(self, variant: str) -> dict:
        from longgen.model import convert_checkpoint

        s = self.s
        spec = self.variant_spec(variant)
        start, run = self.outputs(f"extend-{variant}")
        base = Path(self.result("pretrain")["model"])
        if not (start / "config.json").is_file():
            if spec is None:  # full attention stays a plain model: StreamingLLM is applied to it at inference
                extend_plain_checkpoint(base, start, s.long_len, s.rope)
            else:
                convert_checkpoint(base, start, force=True, progress=False, target_length=s.long_len, rope=s.rope,
                                   **spec)  # fmt: skip
        sources = self.result("prepare")["retrieval"]["extend"]["sources"]
        return self._train(start, sources, "extend", s.extend_lr, extend_upsample(s), run)

    # -- evaluation ----------------------------------------------------------------------------------------

    def model_of(self, variant: str) -> tuple[str, dict[str, Any]]:
        """(the trained variant whose model is evaluated, options for longgen.eval) for `variant`."""
        if variant == "streaming_llm":
            return "full", {"baseline": "streaming", "sink": self.s.sink, "window": self.s.window}
        return FRONTIER_ALIASES.get(variant, variant), {}

    def _evaluate(self, variant: str, task: str) -> dict:
        s = self.s
        trained, options = self.model_of(variant)
        model = Path(self.result(f"extend-{trained}")["model"])
        heldout = self.result("prepare")["heldout_dir"]
        out = self.outputs(f"eval-{variant}-{task}")[0]
        if task == "ppl":
            from longgen.eval import ppl

            r = ppl(model, lengths=s.ppl_lengths, bucket=s.ppl_bucket, documents=[heldout], num_documents=s.ppl_docs,
                    seed=s.seed, out_dir=out, progress=interactive(), device=self.device(), **options)  # fmt: skip
            log(f"  perplexity by length: {_rounded(r['summary']['ppl_by_length'], 2)}")
            return {"summary": r["summary"], "files": r["files"]}
        return self._retrieval(model, options, Path(heldout), out)

    @staticmethod
    def haystack(tokenizer: Any, heldout: Path) -> tuple[list[int], list[str]]:
        """The held-out documents as one pool of tokens the prompts' haystacks are cut from, and the words of it
        that key the magic numbers."""
        from .tasks import haystack_words

        texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(heldout.iterdir())]
        pool = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
        return pool, haystack_words(tokenizer, pool)

    def _retrieval(self, model_path: Path, options: dict[str, Any], heldout: Path, out: Path) -> dict:
        """Every task's prompts at every length, scored by `longgen.eval.forced.greedy_matches` (batched, no
        generation); writes ``records.json`` (one line per prompt: task, length, index, depth, correct)."""
        import torch

        from longgen.eval import load_for_eval

        from .tasks import build_items, score_items

        s = self.s
        model, tokenizer = load_for_eval(model_path, device=self.device(), **options)
        pool, words = self.haystack(tokenizer, heldout)
        items = build_items(tokenizer, pool, words, s.eval_lengths, s.prompts_per_task, s.answer_room, s.seed)
        t0 = time.perf_counter()
        records = score_items(model, tokenizer, items, s.eval_lengths, log)
        seconds = time.perf_counter() - t0
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "records.json", records)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        prompt_tokens = sum(len(it.input_ids) for it in items)
        return {"records": records, "seconds": seconds, "prompt_tokens_per_s": prompt_tokens / max(seconds, 1e-9)}


class Heartbeat:
    """While training runs without a progress bar (in a log), print its latest metrics every `seconds`."""

    def __init__(self, metrics: Path, steps: int, seconds: float = 60.0):
        self.metrics, self.steps, self.seconds = metrics, steps, seconds
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(self.seconds):
            try:
                last = json.loads(self.metrics.read_text().splitlines()[-1])
            except (OSError, IndexError, json.JSONDecodeError):
                continue
            log(f"  step {last['step']}/{self.steps}: loss {last['loss']:.3f}, {last['tokens_per_s']:,.0f} tokens/s")

    def __enter__(self):
        if not interactive():
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()


def _rounded(d: dict[str, float], digits: int) -> dict[str, float]:
    return {k: round(v, digits) for k, v in d.items()}


def _key_text(value: Any) -> str:
    """A conversion argument as a stage key holds it: its repr, and for a BlockLayout, whose repr gives only its
    shape, a digest of its blocks too."""
    from longgen.patterns import BlockLayout

    if isinstance(value, BlockLayout):
        return f"{value!r} {hashlib.sha256(value.layout.numpy().tobytes()).hexdigest()[:16]}"
    return repr(value)


def blocksparse_with_sink(s: Settings):
    """BlockSparse(--block-size, --local-blocks) with its first block visible to every KV head (BlockSparse alone
    shows it to the heads whose strided blocks include it, one of four here): a `longgen.patterns.BlockLayout` over
    --long-len, which the Triton kernels, the KV cache and the model's config take as they are. Built once per
    shape, since every stage key asks for the variants' conversion arguments."""
    return _blocksparse_with_sink(s.block_size, s.local_blocks, s.long_len, s.kv_heads)


@functools.lru_cache(maxsize=4)
def _blocksparse_with_sink(block_size: int, local_blocks: int, long_len: int, kv_heads: int):
    from longgen.patterns import BlockLayout, BlockSparse

    mask = BlockSparse(block_size, local_blocks).block_mask(long_len, kv_heads)
    mask[:, :, 0] = True
    return BlockLayout(mask, block_size=block_size)


def param_count(config: dict) -> int:
    """Parameters of a Llama config with tied embeddings, without building the model."""
    h, i, n, v = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
    return n * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + v * h + h


def extend_plain_checkpoint(src: Path, dst: Path, target_length: int, rope: str) -> None:
    """A copy of the plain model folder `src` with only its RoPE and maximum length changed: the full-attention
    baseline (`longgen.convert_checkpoint` would make it an all-Full hybrid, which StreamingLLM refuses)."""
    from transformers import AutoConfig

    from longgen.model import extend_rope

    config = AutoConfig.from_pretrained(src)
    extend_rope(config, target_length, rope)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("config.json"))
    config.save_pretrained(tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def eval_view(model: Path, view: Path, max_length: int) -> Path:
    """`model` itself, or, when its maximum length is below `max_length`, a folder of links to its files with
    ``max_position_embeddings`` raised and RoPE unchanged: evaluation beyond the trained length (extrapolation;
    longgen.eval refuses lengths above the maximum)."""
    config = json.loads((model / "config.json").read_text())
    if config["max_position_embeddings"] >= max_length:
        return model
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for f in model.iterdir():
        if f.is_file() and f.name != "config.json":
            (view / f.name).symlink_to(f.resolve())
    config["max_position_embeddings"] = max_length
    (view / "config.json").write_text(json.dumps(config, indent=2))
    return view
