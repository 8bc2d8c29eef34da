"""`longgen demo --tiny`: the whole pipeline runs and every stage leaves its artefacts and sane numbers."""

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from longgen.demo import (
    TINY,
    VARIANTS,
    DemoConfig,
    format_summary,
    passkey_documents,
    passkey_lengths,
    passkey_prompts,
)
from longgen.train.tokenizer import train_bpe_tokenizer


@pytest.mark.slow
def test_demo_tiny_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run(
        # our own calls must not use APIs transformers has deprecated
        [sys.executable, "-W", "error::FutureWarning", "-m", "longgen", "demo", "--tiny", "--out-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[5/5] summary" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pretrain_len"] == TINY.short_len and summary["extended_len"] == TINY.short_len * TINY.factor
    assert 0 < summary["wall_s"] < 900
    assert summary["command"] == f"longgen demo --tiny --out-dir {out}" and "cores" in summary["device"]
    assert summary["date"] and summary["commit"]  # a commit hash here, "unknown" in a copy without .git
    variants = summary["variants"]
    assert sorted(variants) == sorted(VARIANTS)
    long_len = str(summary["extended_len"])
    for name in VARIANTS:
        v = variants[name]
        by_length = v["passkey_by_length"]
        assert long_len in by_length and list(by_length) == list(variants["full_attention"]["passkey_by_length"])
        for length, cell in by_length.items():
            assert cell["n"] == TINY.passkey_prompts and 0.0 <= cell["accuracy"] <= 1.0
            assert cell["accuracy"] == cell["correct"] / cell["n"] == sum(cell["outcomes"]) / cell["n"]
            if name == "full_attention":
                assert "vs_full" not in cell
                continue
            full = variants["full_attention"]["passkey_by_length"][length]
            d = cell["vs_full"]  # paired on the same prompts
            assert d["diff"] == pytest.approx(cell["accuracy"] - full["accuracy"])
            assert d["ci_low"] <= d["diff"] <= d["ci_high"] and 0 <= d["mcnemar_p"] <= 1
        assert math.isfinite(v["perplexity"]["ppl_by_length"][long_len])
        assert (out / "eval" / name / "ppl.json").is_file()
    hybrid, full = variants["longgen_hybrid"], variants["full_attention"]
    for v in (hybrid, full):
        assert math.isfinite(v["extension_loss"]) and v["extension_loss"] > 0
        assert v["generate_tokens_per_s"] > 0 and v["train_tokens_per_s"] > 0 and v["generate_batch"] == 4
        assert v["extension_tokens_per_s"] > 0  # the training loop's own median, beside the turn-taking measurement
    assert "kv_bytes" not in variants["streaming_llm"] and "train_tokens_per_s" not in variants["streaming_llm"]
    assert hybrid["kv_bytes_stored"] < full["kv_bytes_stored"]
    assert hybrid["kv_bytes"] < full["kv_bytes"]
    assert hybrid["kv_bytes_stored"] == hybrid["kv_bytes_analytic"]  # the cache keeps exactly the retention
    for model in ("longgen_hybrid", "full_attention"):
        assert (out / "runs" / model / "final" / "model.safetensors").is_file()
    assert (out / "corpus").is_dir() and (out / "models" / "init" / "tokenizer.json").is_file()
    for stage in ("lookup", "pretrain", "extend"):
        lines = (out / "passkey" / f"passkey-{stage}.jsonl").read_text().splitlines()
        assert lines and all("The pass key is" in json.loads(x)["text"] for x in lines[:5])
    assert set(summary["passkey_while_pretraining"]) == {"lookup", "pretrain"}
    figure = out / "demo.png"
    assert summary["figure"] == str(figure) and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tail = r.stdout.strip().splitlines()
    assert f"figure: {figure}" in tail
    assert str(out / "runs" / "longgen_hybrid" / "final") in tail[-1]  # the trained hybrid, not the converted copy
    assert format_summary(summary) in r.stdout


def test_passkey_lengths():
    assert passkey_lengths(256, 4) == [128, 256, 512, 1024]
    assert passkey_lengths(256, 6) == [128, 256, 512, 1024, 1536]
    assert passkey_lengths(64, 4, min_length=100) == [128, 256]


def test_passkey_prompts_are_exact_and_seeded(tmp_path):
    text = "the quick brown fox jumps over the lazy dog 0123456789. What is the pass key? Remember it.\n" * 40
    (tmp_path / "a.txt").write_text(text)
    tok = train_bpe_tokenizer(tmp_path, 300)
    haystack = tok(text * 4, add_special_tokens=False)["input_ids"]
    a = passkey_prompts(tok, haystack, [200, 400], 6, seed=1)
    assert a == passkey_prompts(tok, haystack, [200, 400], 6, seed=1)
    assert a != passkey_prompts(tok, haystack, [200, 400], 6, seed=2)
    for length, (prompts, answers) in a.items():
        assert len(prompts) == 6 and all(len(p) == length for p in prompts)
        for p, ans in zip(prompts, answers, strict=True):
            key = tok.decode(ans).strip()
            assert len(key) == 5 and key.isdigit() and f"The pass key is {key}." in tok.decode(p)
    with pytest.raises(ValueError, match="held-out text"):
        passkey_prompts(tok, haystack[:300], [400], 2, seed=0)


def test_passkey_documents_have_their_exact_lengths(tmp_path):
    """Training documents tokenize to exactly the asked length with the end-of-text token training appends, hold
    the evaluation's needle, question and answer, and differ (fresh keys and depths)."""
    import random

    text = "def f(x):\n    return x + 1  # the quick brown fox jumps over the lazy dog 0123456789\n" * 60
    (tmp_path / "a.txt").write_text(text)
    tok = train_bpe_tokenizer(tmp_path, 300)
    ids = tok(text * 4, add_special_tokens=False)["input_ids"]
    lengths = [128, 128, 160, 257, 400]  # this tokenizer spends ~90 tokens on the needle and question
    docs = passkey_documents(tok, ids, lengths, random.Random(0))
    assert [len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs] == lengths
    for d in docs:
        key = d.rsplit(" ", 1)[1].rstrip(".")
        assert len(key) == 5 and key.isdigit()
        assert f"The pass key is {key}. Remember it." in d
        assert d.endswith(f"What is the pass key? The pass key is {key}.")
    assert len(set(docs)) == len(docs)
    with pytest.raises(ValueError, match="training text"):
        passkey_documents(tok, ids[:300], [300], random.Random(0))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"passkey_share": 1.0}, "passkey_share"),
        ({"lookup_len": 2048}, "lookup_len"),
        ({"lookup_steps": -1}, "lookup_steps"),
        ({"init_std": 0.0}, "init_std"),
        ({"factor": 1}, "factor"),
        ({"window": 8192}, "window"),  # not below the extended length (1024 x 8)
        ({"short_len": 32}, "short_len"),
        ({"passkey_prompts": 0}, "passkey_prompts"),
        ({"device": "tpu"}, "device"),
        ({"rope": "ntk-aware"}, "rope must be one of"),
    ],
)
def test_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(DemoConfig(), **change).validate()


def test_help_shows_the_real_defaults():
    from longgen.cli import build_parser

    parser = build_parser()
    demo = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "demo")[1]
    d, fields = DemoConfig(), {f.name for f in dataclasses.fields(DemoConfig)}
    shown = [a for a in demo._actions if a.dest in fields]
    assert {a.dest for a in shown} >= {"corpus_mb", "short_len", "factor", "window", "extend_steps", "out_dir"}
    for action in shown:
        value = getattr(d, action.dest)
        text = f"{value:g}" if isinstance(value, float) else str(value)
        assert action.help.endswith(f"({text})"), (action.dest, action.help)
