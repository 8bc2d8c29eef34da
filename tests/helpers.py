"""Shared builders for tests: a real BPE tokenizer and a tiny Llama saved as plain and hybrid model folders."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def fresh_generator() -> torch.Generator:
    """A CPU generator with a fresh seed every run (inputs differ from run to run), printed so that pytest shows it
    with a failure; LONGGEN_TEST_SEED=N replays run N's inputs."""
    seed = int(os.environ.get("LONGGEN_TEST_SEED", torch.seed() % (2**31)))
    print(f"inputs from seed {seed} (replay: LONGGEN_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


def bpe_tokenizer(texts, vocab_size=400):
    """A byte-level BPE tokenizer trained on `texts`, as a transformers fast tokenizer (eos ``</s>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]")


def save_tiny_models(root: Path, tokenizer, max_len: int, pattern=None, **convert_kwargs):
    """A tiny random Llama saved with `tokenizer` as ``root/plain`` and, converted (default pattern
    ``SinkWindow(4, 32)``), as ``root/hybrid``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import longgen

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_len,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(root / "plain")
    tokenizer.save_pretrained(root / "plain")
    longgen.convert(model, pattern=pattern or longgen.SinkWindow(4, 32), **convert_kwargs)
    model.save_pretrained(root / "hybrid")
    tokenizer.save_pretrained(root / "hybrid")


def train_config(ws, out, **over):
    """A raw training config for the tiny hybrid in `ws` (``ws/hybrid``, ``ws/corpus``); ``section__key=value``
    overrides."""
    raw = {
        "model": {"path": str(ws / "hybrid"), "dtype": "float32", "activation_checkpointing": False},
        "data": {"sources": [str(ws / "corpus")], "seq_len": 128, "cache_dir": str(ws / "cache")},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "schedule": "constant"},
        "train": {
            "steps": 6,
            "batch_size": 2,
            "output_dir": str(out),
            "save_every": 2,
            "device": "cpu",
            "tensorboard": False,
            "progress": False,
            "loss_chunk": 50,
        },
    }
    for key, value in over.items():
        section, name = key.split("__")
        raw[section][name] = value
    return raw


def write_toml(path, raw):
    def lit(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {lit(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "final" / "model.safetensors"))


def run_cli(args, env_extra=None, nproc=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    if nproc:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "longgen",
            "train",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "longgen", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
