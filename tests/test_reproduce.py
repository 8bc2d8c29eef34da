"""experiments/reproduce.py --tiny: every stage runs on a CPU and leaves its artefacts; finished stages are
skipped; the same seed gives the same pre-training losses; stages resume after being stopped."""

import json
import math
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def reproduce():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        import reproduce

        yield reproduce
    finally:
        sys.path.remove(str(EXPERIMENTS))


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_end_to_end(reproduce, tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "results"
    args = ["--tiny", "--work-dir", str(work), "--out-dir", str(out)]
    assert reproduce.main(["all", *args]) == 0
    printed = capsys.readouterr().out
    assert "What the paper leads us to expect" in printed and "6. StreamingLLM on model 1" in printed

    # every stage left its artefacts
    assert (work / "tokenizer" / "tokenizer.json").is_file()
    assert (work / "data" / "train.jsonl").is_file() and len(list((work / "data" / "heldout").iterdir())) == 2
    trained = ("full", "hybrid_sinkwindow", "hybrid_blocksparse", "all_sparse", "hybrid_bottom")
    for run in ("pretrain", *trained):
        assert (work / "runs" / run / "final" / "model.safetensors").is_file()
        assert list((work / "runs" / run / "checkpoints").glob("step-*"))
        assert all(math.isfinite(x) and x > 0 for x in _losses(work / "runs" / run))
    summary = json.loads((out / "reproduce.json").read_text())
    for name in ("reproduce.md", "retrieval_heatmaps.png", "retrieval_by_length.png", "ppl_by_position.png"):
        assert (out / name).stat().st_size > 0
    assert (work / "eval" / "hybrid_sinkwindow" / "niah" / "niah.png").is_file()
    assert "| 1. full attention |" in (out / "reproduce.md").read_text()

    # six variants, sane numbers
    variants = summary["variants"]
    assert list(variants) == [*trained, "streaming_llm"]
    for v in variants.values():
        assert all(0.0 <= a <= 1.0 for a in v["retrieval_by_length"].values())
        for task in ("passkey", "niah"):
            assert 0.0 <= v[task]["accuracy"] <= 1.0
        assert all(math.isfinite(p) and p > 1 for p in v["ppl"]["ppl_by_length"].values())
        assert math.isfinite(v["extension"]["loss_final"]) and v["extension"]["tokens_per_s"] > 0
    kv = {name: v["kv_bytes"]["256"] for name, v in variants.items()}
    assert kv["hybrid_sinkwindow"] < kv["full"] and kv["streaming_llm"] < kv["hybrid_sinkwindow"]
    assert variants["all_sparse"]["full_layers"] == [] and variants["hybrid_bottom"]["full_layers"] == [0]
    assert variants["hybrid_sinkwindow"]["full_layers"] == [1]
    assert len(summary["expectations"]) == 5 and all(c["met"] in (True, False) for c in summary["expectations"])

    # a finished stage is skipped
    metrics = work / "runs" / "pretrain" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    assert reproduce.main(["pretrain", *args]) == 0
    assert "[pretrain] finished earlier with these settings: skipped" in capsys.readouterr().out
    assert metrics.stat().st_mtime_ns == before

    # the same seed gives the same losses; the forced re-run makes the stages built on it stale
    first = _losses(work / "runs" / "pretrain")
    assert reproduce.main(["pretrain", "--force", *args]) == 0
    assert _losses(work / "runs" / "pretrain") == first
    capsys.readouterr()
    assert reproduce.main(["plan", *args]) == 0
    assert "finished: 2/25 stages; next: extend-full" in capsys.readouterr().out


def test_stopped_stage_resumes(reproduce, tmp_path, monkeypatch, capsys):
    """A training stage stopped at the deadline (here: right after its first checkpoint) exits with 75 and the
    next call resumes it from that checkpoint."""
    from reproduction.stages import DeadlineReached

    import longgen.train.loop as loop

    work = tmp_path / "work"
    args = ["--tiny", "--work-dir", str(work), "--out-dir", str(tmp_path / "out"), "--pretrain-steps", "4"]
    save = loop.save_checkpoint

    def save_then_stop(*a, **k):
        save(*a, **k)
        raise DeadlineReached

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    assert reproduce.main(["all", *args]) == reproduce.EXIT_UNFINISHED
    assert (work / "state" / "prepare.json").is_file() and not (work / "state" / "pretrain.json").exists()
    monkeypatch.setattr(loop, "save_checkpoint", save)
    capsys.readouterr()
    assert reproduce.main(["pretrain", *args]) == 0
    assert "resumed from" in capsys.readouterr().out
    rows = (work / "runs" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in rows] == [1, 2, 3, 4]  # steps 3-4 logged after the resume, once
