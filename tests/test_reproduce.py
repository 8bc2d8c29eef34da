"""experiments/reproduce.py --tiny: every stage runs on a CPU and leaves its artefacts; finished stages are
skipped; the same seed gives the same pre-training losses; stages resume after being stopped."""

import dataclasses
import functools
import itertools
import json
import math
import os
import re
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
# the recorded main comparison, one run (experiments/results is it merged with the frontier's run)
MAIN_RUN = EXPERIMENTS / "results" / "runs" / "3485a18_main.json"


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


QUALITY_KEYS = {"device", "date", "commit", "command", "pretrain_len", "extended_len", "rows", "paired"}
ROW_KEYS = {"variant", "task", "length", "n", "correct", "accuracy", "ci_low", "ci_high"}
PAIRED_KEYS = {"variant", "length", "n", "diff_vs_full", "diff_ci_low", "diff_ci_high"}


@pytest.mark.slow
def test_tiny_end_to_end(reproduce, tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "results"
    variants = (
        "full,hybrid_sinkwindow,hybrid_blocksparse,all_sparse,streaming_llm,hybrid_bottom,hybrid_interleave,"
        "hybrid_blocksparse_sink,hybrid_nosink,hybrid_auto,hybrid_auto_loss,frontier_0.5,frontier_auto_0.5"
    )
    args = ["--tiny", "--work-dir", str(work), "--out-dir", str(out), "--variants", variants]
    assert reproduce.main(["all", *args, "--commit", "abc123"]) == 0
    printed = capsys.readouterr().out
    assert "## Targets" in printed and "5. StreamingLLM on model 1" in printed

    # every stage left its artefacts
    assert (work / "tokenizer" / "tokenizer.json").is_file()
    assert (work / "data" / "train.jsonl").is_file() and len(list((work / "data" / "heldout").iterdir())) == 2
    trained = ("full", "hybrid_sinkwindow", "hybrid_blocksparse", "all_sparse", "hybrid_bottom", "hybrid_interleave",
               "hybrid_blocksparse_sink", "hybrid_nosink", "hybrid_auto", "hybrid_auto_loss", "frontier_0.5",
               "frontier_auto_0.5")  # fmt: skip
    for run in ("pretrain", *trained):
        assert (work / "runs" / run / "final" / "model.safetensors").is_file()
        assert all(math.isfinite(x) and x > 0 for x in _losses(work / "runs" / run))
    for name in ("reproduce.md", "retrieval_by_length.png", "frontier.png", "niah_heatmaps.png", "ppl_by_position.png"):
        assert (out / name).stat().st_size > 0
    assert "| 1. full attention |" in (out / "reproduce.md").read_text()

    # the summary for tools, in exactly the documented shape
    quality = json.loads((out / "quality_summary.json").read_text())
    assert set(quality) == QUALITY_KEYS and quality["commit"] == "abc123"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", quality["date"]) and quality["device"] == "cpu"
    saved = json.loads((out / "reproduce.json").read_text())
    assert {k: saved[k] for k in ("device", "date", "commit")} == {k: quality[k] for k in ("device", "date", "commit")}
    assert quality["pretrain_len"] == 64 and quality["extended_len"] == 512
    assert quality["command"].startswith("python experiments/reproduce.py all --tiny")
    tasks = {"passkey", "niah", "niah_multikey", "variable_tracking", "parcel_weight"}
    aliases = ["frontier_0", "frontier_0.333", "frontier_auto_0", "frontier_auto_0.333"]  # all_sparse, the hybrids
    evaluated = [*trained[:4], "streaming_llm", *trained[4:], *aliases]
    assert {r["variant"] for r in quality["rows"]} == set(evaluated)
    assert {r["task"] for r in quality["rows"]} == tasks and {r["length"] for r in quality["rows"]} == {320, 512}
    assert len(quality["rows"]) == len(evaluated) * len(tasks) * 2
    alias = [{**r, "variant": "x"} for r in quality["rows"] if r["variant"] == "frontier_0"]
    assert alias == [{**r, "variant": "x"} for r in quality["rows"] if r["variant"] == "all_sparse"]
    for r in quality["rows"]:
        assert set(r) == ROW_KEYS and r["n"] == 3 and 0 <= r["correct"] <= 3
        assert r["accuracy"] == r["correct"] / r["n"] and r["ci_low"] <= r["accuracy"] <= r["ci_high"]
    assert len(quality["paired"]) == (len(evaluated) - 1) * 2
    for p in quality["paired"]:
        assert set(p) == PAIRED_KEYS and p["n"] == 15 and p["variant"] != "full"
        assert p["diff_ci_low"] <= p["diff_vs_full"] <= p["diff_ci_high"]

    # the full report: targets, the frontier (0 and 1/3 are all_sparse and hybrid_sinkwindow), per-prompt outcomes
    summary = json.loads((out / "reproduce.json").read_text())
    assert [t["met"] in (True, False) for t in summary["targets"]] == [True] * 6
    points = [*aliases[:2], "frontier_0.5", *aliases[2:], "frontier_auto_0.5"]
    assert [f["variant"] for f in summary["frontier"]] == points
    assert [f["full_layers"] for f in summary["frontier"]][:3] == [[], [2, 3], [1, 2, 3]]
    auto = summary["frontier"][3:]
    assert [f["placement"] for f in auto] == ["auto"] * 3 and [len(f["full_layers"]) for f in auto] == [0, 2, 3]
    assert auto[1]["full_layers"] == summary["variants"]["hybrid_auto"]["full_layers"]
    # bottom, interleaved and auto placement, and no sink tokens, against the SinkWindow hybrid on the same prompts,
    # a sink block against the BlockSparse hybrid, and auto against middle along the frontier: each length, then all
    changed = ["hybrid_bottom", "hybrid_interleave", "hybrid_auto", "hybrid_auto_loss", "hybrid_nosink"]
    assert set(changed) <= set(trained)
    against = [*((v, "hybrid_sinkwindow") for v in changed), ("hybrid_blocksparse_sink", "hybrid_blocksparse"),
               ("frontier_auto_0.5", "frontier_0.5")]  # fmt: skip
    assert [(p["variant"], p["against"], p["lengths"]) for p in summary["placement"]] == [
        (v, a, lengths) for v, a in against for lengths in ([320], [512], [320, 512])
    ]
    assert all(p["n"] == 15 * len(p["lengths"]) for p in summary["placement"])
    hits = {
        v: sum(s.count("1") for s in summary["outcomes"][v].values()) for v in ("frontier_auto_0.5", "frontier_0.5")
    }
    assert summary["placement"][-1]["diff_vs_middle"] == pytest.approx(
        (hits["frontier_auto_0.5"] - hits["frontier_0.5"]) / 30
    )
    report = (out / "reproduce.md").read_text()
    assert "## Against full layers in the middle (as many full layers), same prompts" in report
    # the paired difference by task: each variant's discordant prompts per task add up to its pooled ones
    by_task = summary["paired_by_task"]
    assert len(by_task) == len(summary["paired"]) * len(tasks) and {p["task"] for p in by_task} == tasks
    for pooled in summary["paired"]:
        parts = [p for p in by_task if (p["variant"], p["length"]) == (pooled["variant"], pooled["length"])]
        assert all(p["n"] == 3 for p in parts) and len(parts) == len(tasks)
        for key in ("only_variant", "only_full"):
            assert sum(p[key] for p in parts) == pooled[key]
        assert sum(p["diff_vs_full"] for p in parts) == pytest.approx(pooled["diff_vs_full"] * len(tasks))
    sw, full = (summary["outcomes"][v]["niah@512"] for v in ("hybrid_sinkwindow", "full"))
    variant_only = sum(a == "1" and b == "0" for a, b in zip(sw, full, strict=True))
    (row,) = [p for p in by_task if (p["variant"], p["task"], p["length"]) == ("hybrid_sinkwindow", "niah", 512)]
    assert row["only_variant"] == variant_only
    assert "## Paired difference against full attention by task" in report
    assert "| SinkWindow hybrid, 50% full (auto) | SinkWindow hybrid, 50% full (middle) |" in report
    assert len(summary["outcomes"]["full"]["passkey@320"]) == 3
    variants_out = summary["variants"]
    kv = {name: v["kv_bytes"]["512"] for name, v in variants_out.items()}
    assert kv["hybrid_sinkwindow"] < kv["full"] and kv["streaming_llm"] < kv["hybrid_sinkwindow"]
    assert variants_out["hybrid_bottom"]["full_layers"] == [0, 1]
    assert variants_out["hybrid_interleave"]["full_layers"] == [1, 4]  # the middle of each half of 6 layers
    assert variants_out["hybrid_nosink"]["sparse_pattern"] == "SinkWindow(sink=0, window=32)"
    layout = "BlockLayout(kv_heads=2, n_blocks=32, block_size=16)"  # BlockSparse's blocks at 512 tokens, a sink block
    assert variants_out["hybrid_blocksparse_sink"]["sparse_pattern"] == layout
    assert len(variants_out["hybrid_auto"]["full_layers"]) == 2  # as many as the middle third, chosen by score
    assert len(variants_out["hybrid_auto_loss"]["full_layers"]) == 2
    for v in variants_out.values():
        assert all(math.isfinite(p) and p > 1 for p in v["ppl"]["ppl_by_length"].values())

    # the report again from the saved JSON alone: the same summary for tools
    from reproduction.report import rebuild_report

    rebuild_report(summary, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "quality_summary.json").read_text()) == quality

    # answers by where the needles lie, on the tiny run: every trained variant against full attention
    assert reproduce.main(["distance", "--from", str(out / "reproduce.json"), "--out-dir", str(tmp_path / "d")]) == 0
    by_distance = json.loads((tmp_path / "d" / "distance.json").read_text())
    assert set(by_distance["variants"]) == set(summary["outcomes"]) - {"full"}
    for v, r in by_distance["variants"].items():
        rows = {c["hops_beyond"]: c for c in r["chains"]["all"]}
        assert r["window"] == 32 and rows["<= 1"]["n"] + rows[">= 2"]["n"] == 2 * 3  # two lengths, three prompts
        assert sum(c["n"] for c in r["facts"]["passkey"]) == 6
        answered = sum(summary["outcomes"][v][f"variable_tracking@{n}"].count("1") for n in (320, 512))
        assert rows["<= 1"]["variant"] + rows[">= 2"]["variant"] == answered
    assert "## Variable chains by their hops beyond the local window" in (tmp_path / "d" / "distance.md").read_text()

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
    assert "finished: 2/40 stages; next: extend-full" in capsys.readouterr().out
    # with --variant, what `all --variant ...` has left: its extension, retrieval and perplexity
    assert reproduce.main(["plan", "--variant", "hybrid_bottom", *args]) == 0
    assert "finished: 2/5 stages; next: extend-hybrid_bottom" in capsys.readouterr().out

    # another extension run (--extend-replica 1): the same pre-trained model, data and prompts, another data order
    # and seed for the extension alone; its results replace the recorded extension's in the work folder
    from reproduction.settings import TINY

    full_losses = _losses(work / "runs" / "full")
    asked = json.loads((out / "reproduce.json").read_text())["outcomes"]["full"]
    assert reproduce.main(["all", "--variant", "full", "--extend-replica", "1", *args]) == 0
    printed = capsys.readouterr().out
    assert "[prepare] finished earlier" in printed and "[pretrain] finished earlier" in printed
    assert "[extend-full] running" in printed and "no checkpoint in" in printed  # started over, nothing resumed
    replica = _losses(work / "runs" / "full")
    assert len(replica) == len(full_losses) and replica != full_losses
    again = json.loads((out / "reproduce.json").read_text())
    assert again["settings"]["extend_replica"] == 1 and again["outcomes"]["full"].keys() == asked.keys()
    with pytest.raises(ValueError, match="--extend-replica must be >= 0"):
        dataclasses.replace(TINY, extend_replica=-1).validate()
    with pytest.raises(ValueError, match=r"--assume-extend-tps must be >= 0 \(0: the H100's\)"):
        dataclasses.replace(TINY, assume_extend_tps=-1.0).validate()


@pytest.mark.slow
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
    before = json.loads((work / "state" / "pretrain.started").read_text())["seconds"]
    assert before > 0
    monkeypatch.setattr(loop, "save_checkpoint", save)
    capsys.readouterr()
    assert reproduce.main(["pretrain", *args]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and " s with the calls before)" in printed
    # the stage's seconds are both calls' (the report's stage_seconds and a variant's extension seconds)
    assert json.loads((work / "state" / "pretrain.json").read_text())["seconds"] > before
    rows = (work / "runs" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in rows] == [1, 2, 3, 4]  # steps 3-4 logged after the resume, once


@pytest.mark.slow
def test_the_deadline_lets_training_checkpoint_its_current_step(reproduce, tmp_path, monkeypatch, capsys):
    """The deadline's alarm (sent here during pre-training's step 3 of 8, checkpoints every 4 steps) stops the run
    after that step with a checkpoint of it and exit code 75; the next call resumes from step 3, losing no step."""
    import longgen.train.loop as loop

    work = tmp_path / "work"
    args = ["--tiny", "--work-dir", str(work), "--out-dir", str(tmp_path / "out"), "--pretrain-steps", "8"]
    real_shard, calls = loop.shard_batch, []

    def shard_with_alarm(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # the first micro-batch of step 3
            os.kill(os.getpid(), signal.SIGALRM)
        return real_shard(*a, **k)

    assert reproduce.main(["prepare", *args]) == 0
    monkeypatch.setattr(loop, "shard_batch", shard_with_alarm)
    assert reproduce.main(["pretrain", *args, "--deadline-minutes", "10"]) == reproduce.EXIT_UNFINISHED
    assert "stopped at the deadline" in capsys.readouterr().out
    assert [s for s, _ in loop.list_checkpoints(work / "runs" / "pretrain")] == [3]
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    monkeypatch.setattr(loop, "shard_batch", real_shard)
    assert reproduce.main(["pretrain", *args]) == 0
    assert "(step 3)" in capsys.readouterr().out
    rows = (work / "runs" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in rows] == list(range(1, 9))


@pytest.mark.slow
def test_a_stage_that_cannot_finish_before_the_deadline_is_not_started(reproduce, tmp_path, capsys):
    """An evaluation (it cannot resume half-way) starts only with its planned seconds left before the deadline, a
    training stage with a minute; otherwise the call stops at once with exit code 75 and the next one runs it."""
    from reproduction.settings import TINY
    from reproduction.stages import TRAINING_START_S, Experiment

    work = tmp_path / "work"
    args = ["--tiny", "--work-dir", str(work), "--out-dir", str(tmp_path / "out")]
    for stage in (["prepare"], ["pretrain"], ["extend", "--variant", "full"]):
        assert reproduce.main([*stage, *args]) == 0
    exp = Experiment(dataclasses.replace(TINY, work_dir=str(work)))
    need = exp.seconds_to_start("eval-full-retrieval")
    assert need == exp.planned_seconds("eval-full-retrieval") > 6 and exp.seconds_to_start("pretrain") == 60
    capsys.readouterr()
    assert reproduce.main(["eval", "--variant", "full", *args, "--deadline-minutes", "0.1"]) == 75
    printed = capsys.readouterr().out
    assert f"[eval-full-retrieval] not started: it needs ~{need:.0f} s, " in printed and "running" not in printed
    assert not exp.current("eval-full-retrieval")
    assert reproduce.main(["extend", "--variant", "hybrid_sinkwindow", *args, "--deadline-minutes", "0.5"]) == 75
    assert f"needs ~{TRAINING_START_S:.0f} s" in capsys.readouterr().out
    assert reproduce.main(["eval", "--variant", "full", *args, "--deadline-minutes", "5"]) == 0
    assert exp.current("eval-full-retrieval")
    # a deadline already past (a wrapper's minutes left, gone negative) is an error that says so, not a traceback
    for minutes in ("0", "-0.01"):
        assert reproduce.main(["eval", "--variant", "full", *args, "--deadline-minutes", minutes]) == 2
        assert "--deadline-minutes must be more than 0 (minutes from now)" in capsys.readouterr().err


def test_all_evaluates_each_variant_as_soon_as_it_is_trained(reproduce, tmp_path):
    """A call cut short still has results: `all` evaluates each variant's retrieval right after its extension
    (StreamingLLM right after `full`, which it needs), perplexity last."""
    from reproduction.settings import DEFAULT
    from reproduction.stages import Experiment

    exp = Experiment(dataclasses.replace(DEFAULT, work_dir=str(tmp_path)))
    assert exp.stage_names(["streaming_llm", "hybrid_sinkwindow"]) == [
        "prepare", "pretrain", "extend-full", "eval-streaming_llm-retrieval", "extend-hybrid_sinkwindow",
        "eval-hybrid_sinkwindow-retrieval", "eval-streaming_llm-ppl", "eval-hybrid_sinkwindow-ppl",
    ]  # fmt: skip
    names = exp.stage_names()  # the main comparison
    assert names[2:6] == ["extend-full", "eval-full-retrieval", "extend-hybrid_sinkwindow",
                          "eval-hybrid_sinkwindow-retrieval"]  # fmt: skip
    assert len(names) == 2 + 4 + 5 * 2 and names.count("extend-full") == 1


@pytest.mark.slow
def test_streaming_llm_alone_trains_model_1_and_is_evaluated(reproduce, tmp_path, capsys):
    """`all --variant streaming_llm` evaluates only StreamingLLM, on `full`'s model (model 1 at inference);
    `extend --variant streaming_llm` is refused before any work is done. Until it is evaluated, StreamingLLM
    is not in the report, though the model it would run on is trained."""
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--tiny", "--work-dir", str(work), "--out-dir", str(out)]
    assert reproduce.main(["extend", "--variant", "full", "--variant", "streaming_llm", *args]) == 2
    assert "streaming_llm is not trained" in capsys.readouterr().err
    assert not (work / "state").exists()  # refused before prepare
    for stage in (["prepare"], ["pretrain"], ["extend", "--variant", "full"], ["report"]):
        assert reproduce.main([*stage, *args]) == 0
    assert list(json.loads((out / "reproduce.json").read_text())["variants"]) == ["full"]
    assert reproduce.main(["all", "--variant", "streaming_llm", *args]) == 0
    done = sorted(p.stem for p in (work / "state").iterdir())
    assert done == ["eval-streaming_llm-ppl", "eval-streaming_llm-retrieval", "extend-full", "prepare", "pretrain"]
    assert list(json.loads((out / "reproduce.json").read_text())["variants"]) == ["full", "streaming_llm"]


@pytest.mark.slow
def test_a_report_times_the_stages_of_the_variants_it_reports(reproduce, tmp_path):
    """`all --variant X` for a variant outside the settings' list (a probe's): the report's stage_seconds has X's
    extension and evaluations beside preparation and pre-training."""
    out = tmp_path / "out"
    args = ["--tiny", "--work-dir", str(tmp_path / "work"), "--out-dir", str(out)]
    assert reproduce.main(["all", "--variant", "hybrid_nosink", *args]) == 0
    saved = json.loads((out / "reproduce.json").read_text())
    assert "hybrid_nosink" not in saved["settings"]["variants"] and list(saved["variants"]) == ["hybrid_nosink"]
    assert list(saved["stage_seconds"]) == ["prepare", "pretrain", "extend-hybrid_nosink",
                                            "eval-hybrid_nosink-retrieval", "eval-hybrid_nosink-ppl"]  # fmt: skip
    assert all(x > 0 for x in saved["stage_seconds"].values())


@functools.cache
def _source_tokenizer() -> tuple[Any, list[int]]:
    """A small BPE tokenizer trained on 30 of the package's source files, and those files' tokens (a haystack)."""
    from longgen.train.tokenizer import train_bpe_tokenizer

    corpus = Path(__file__).resolve().parents[1] / "src" / "longgen"
    texts = [p.read_text() for p in sorted(corpus.rglob("*.py"))[:30]]
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(texts):
            Path(tmp, f"{i}.txt").write_text(text)
        tokenizer = train_bpe_tokenizer(tmp, 600)
    return tokenizer, tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]


def test_each_record_holds_its_own_prompts_outcome(reproduce):
    """Prompts are scored length by length; each record must carry the outcome of its own prompt. Here every
    other prompt's answer is what the model itself generates (True), the rest a wrong answer (False)."""
    import torch
    from reproduction.tasks import build_items, digit_ids, score_items
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer, pool = _source_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=1024)).eval()  # fmt: skip
    lengths = (384, 512)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    items = build_items(tokenizer, pool, words, lengths, 3, 16, seed=0)
    digits = set(digit_ids(tokenizer))
    expected = {}
    for k, it in enumerate(items):
        own = model.generate(torch.tensor([it.input_ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        own = own[0, len(it.input_ids) :].tolist()
        cut = next(i for i in range(1, 8) if own[i] not in digits)  # the answer must not be followed by a digit
        answer = own[:cut] if k % 2 else [(own[0] + 1) % len(tokenizer)]
        items[k] = dataclasses.replace(it, answer_ids=answer)
        expected[it.task, it.length, it.index] = bool(k % 2)
    records = score_items(model, tokenizer, items, lengths, log=lambda _: None)
    assert len(records) == len(items)
    assert {(r["task"], r["length"], r["index"]): r["correct"] for r in records} == expected


def test_retrieval_document_lengths_and_whole_documents(reproduce, tmp_path):
    """Extension retrieval documents span --extend-retrieval-min of the extended context up to all of it (so
    needle-question distances cover it evenly); packing keeps documents from an eighth of it on whole; far facts,
    near facts and longer variable chains are the extension's settings."""
    from reproduction.settings import DEFAULT
    from reproduction.stages import Experiment, chain_max, far_share, near_share, retrieval_lengths, whole_min

    assert retrieval_lengths(DEFAULT, "pretrain") == (512, 2048)
    assert retrieval_lengths(DEFAULT, "extend") == (28672, 32768)
    assert whole_min(DEFAULT, "pretrain") == 512 and whole_min(DEFAULT, "extend") == 4096
    wide = dataclasses.replace(DEFAULT, extend_retrieval_min=0.125)
    assert retrieval_lengths(wide, "extend") == (4096, 32768) and whole_min(wide, "extend") == 4096
    assert whole_min(dataclasses.replace(DEFAULT, whole_docs=False), "extend") is None
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="--extend-retrieval-min must lie in"):
            dataclasses.replace(DEFAULT, extend_retrieval_min=bad).validate()
    # a quarter of the extension's facts far apart, none in pre-training
    assert far_share(DEFAULT, "extend") == 0.25 and far_share(DEFAULT, "pretrain") == 0.0
    with pytest.raises(ValueError, match=r"--extend-far-share must lie in \[0, 1\], got -0.1"):
        dataclasses.replace(DEFAULT, extend_far_share=-0.1).validate()
    # variable chains of 2-4 names unless --extend-chain-max says more, in the extension only; the default keeps
    # the data key the recorded runs were made with
    longer = dataclasses.replace(DEFAULT, extend_chain_max=6)
    assert [chain_max(s, st) for s in (DEFAULT, longer) for st in ("pretrain", "extend")] == [4, 4, 4, 6]
    keys = [Experiment(dataclasses.replace(s, work_dir=str(tmp_path))).key("prepare") for s in (DEFAULT, longer)]
    assert "extend_chain_max" not in keys[0] and keys[1] == {**keys[0], "extend_chain_max": 6}
    with pytest.raises(ValueError, match=r"--extend-chain-max must be >= 2 .*, got 1"):
        dataclasses.replace(DEFAULT, extend_chain_max=1).validate()
    # no near facts unless --extend-near-share says so, in the extension only, and the default keeps the data key;
    # far and near are shares of the same facts
    near = dataclasses.replace(DEFAULT, extend_near_share=0.125)
    assert [near_share(s, st) for s in (DEFAULT, near) for st in ("pretrain", "extend")] == [0.0, 0.0, 0.0, 0.125]
    key = Experiment(dataclasses.replace(near, work_dir=str(tmp_path))).key("prepare")
    assert "extend_near_share" not in keys[0] and key == {**keys[0], "extend_near_share": 0.125}
    with pytest.raises(ValueError, match=r"--extend-near-share must lie in \[0, 1 - --extend-far-share\]"):
        dataclasses.replace(DEFAULT, extend_near_share=0.8).validate()


def test_record_facts_reach_the_training_data_and_the_held_out_wording_never_does(reproduce, tmp_path):
    """--fact-kinds with ``record`` mixes facts in many wordings into both stages' synthetic documents; no wording
    of them is the held-out task's (`parcel_weight`: a parcel, its weight in grams), in the templates or in the
    documents made. The default kinds keep the data key the recorded runs were made with; the settings' copies of
    the library's constants are the library's."""
    from reproduction.settings import CHAIN_MAX, DEFAULT, FACT_KINDS, RETRIEVAL_KINDS
    from reproduction.stages import Experiment

    import longgen.train.synthetic as synthetic

    assert (CHAIN_MAX, RETRIEVAL_KINDS, FACT_KINDS) == (synthetic.CHAIN_MAX, synthetic.RETRIEVAL_KINDS,
                                                       synthetic.FACT_KINDS)  # fmt: skip
    held_out = re.compile(r"parcel|weigh|heavy|gram", re.I)
    templates = (*synthetic.RECORD_ATTRIBUTES, *synthetic.RECORD_STATEMENTS, *synthetic.RECORD_QUESTIONS)
    assert not [x for x in templates if held_out.search(x)]
    kinds = "passkey,niah,variable_tracking,record"
    args = ["--tiny", "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out"), "--fact-kinds", kinds]
    assert reproduce.main(["prepare", *args]) == 0
    for stage in ("pretrain", "extend"):
        path = tmp_path / "work" / "data" / f"retrieval-{stage}.jsonl"
        text = "\n".join(json.loads(line)["text"] for line in path.read_text().splitlines())
        records = re.findall(r"^(?:Repeat what was said of the|Which) (\w+) (?:of|was given for) (\w+)", text, re.M)
        assert len(records) > 5, stage
        assert not re.search(r"parcel weighs|How heavy is|\d grams\.", text)
    records = dataclasses.replace(DEFAULT, fact_kinds=tuple(kinds.split(",")), work_dir=str(tmp_path))
    keys = [Experiment(dataclasses.replace(DEFAULT, work_dir=str(tmp_path))).key("prepare"),
            Experiment(records).key("prepare")]  # fmt: skip
    assert "fact_kinds" not in keys[0] and keys[1] == {**keys[0], "fact_kinds": kinds.split(",")}
    for bad in ((), ("passkey", "parcel"), ("niah", "niah")):
        with pytest.raises(ValueError, match="--fact-kinds must name some of passkey, niah, variable_tracking, record"):
            dataclasses.replace(DEFAULT, fact_kinds=bad).validate()


def test_the_recorded_run_rebuilds_to_its_committed_summary(reproduce, tmp_path):
    """The committed results rebuild from their (merged) reproduce.json alone to the committed quality_summary.json,
    and a setting missing from a saved run (recorded before it existed) reads as what such runs did (no far facts)."""
    from reproduction.report import rebuild_report

    results = EXPERIMENTS / "results"
    saved = json.loads((results / "reproduce.json").read_text())
    saved["settings"].pop("extend_far_share", None)
    summary = rebuild_report(saved, tmp_path)
    assert summary["settings"]["extend_far_share"] == 0.0
    # the middle series from all sparse to half the layers full, then the auto-placed one to a third
    frontier = ["frontier_0", "frontier_0.167", "frontier_0.25", "frontier_0.333", "frontier_0.5"]
    auto = ["frontier_auto_0", "frontier_auto_0.167", "frontier_auto_0.333"]
    assert [(f["variant"], f["model"]) for f in summary["frontier"]] == [
        (frontier[0], "all_sparse"), *((v, v) for v in frontier[1:3]), (frontier[3], "hybrid_sinkwindow"),
        (frontier[4], frontier[4]), (auto[0], "all_sparse"), (auto[1], auto[1]), (auto[2], "hybrid_auto")
    ]  # fmt: skip
    assert [f["full_layers"] for f in summary["frontier"][-2:]] == [[0, 11], [0, 7, 10, 11]]
    # quality_summary.json names the frontier's points as the frontier does: both series, no auto point not run
    named = {r["variant"] for r in json.loads((tmp_path / "quality_summary.json").read_text())["rows"]}
    assert set(frontier + auto) <= named and not {"frontier_auto_0.25", "frontier_auto_0.5"} & named
    assert json.loads((tmp_path / "quality_summary.json").read_text()) == json.loads(
        (results / "quality_summary.json").read_text()
    )


def test_the_recorded_replicas_rebuild_to_their_committed_comparison(reproduce, tmp_path):
    """The committed second and third training runs rebuild from their reproduce.json to their committed summaries,
    and `replicas` over the three committed runs gives the committed replicas.json: the hybrids' mean differences at
    32K and their intervals as RUN.md quotes them, over prompts and with the runs as the unit."""
    from reproduction.report import rebuild_report

    replicas = EXPERIMENTS / "results" / "replicas"
    for name in ("replica1", "replica2"):
        run = replicas / name
        rebuild_report(json.loads((run / "reproduce.json").read_text()), tmp_path / name)
        rebuilt = json.loads((tmp_path / name / "quality_summary.json").read_text())
        assert rebuilt == json.loads((run / "quality_summary.json").read_text())
    committed = json.loads((replicas / "replicas.json").read_text())
    froms = [
        "experiments/results/runs/3485a18_main.json",
        "experiments/results/replicas/replica1/reproduce.json",
        "experiments/results/replicas/replica2/reproduce.json",
    ]
    assert committed["command"] == (
        "python experiments/reproduce.py replicas " + " ".join(f"--from {f}" for f in froms)
        + " --out-dir experiments/results/replicas"
    )  # fmt: skip
    again = _rerun(reproduce, committed["command"], tmp_path / "cmp")
    assert {k: v for k, v in again.items() if k != "command"} == {k: v for k, v in committed.items() if k != "command"}
    quoted = {  # points: mean over the three runs with its bootstrap interval, and with the runs as the unit
        "hybrid_sinkwindow": ([-4.9, -7.1, -2.9], [-12.1, 2.3]),
        "hybrid_blocksparse": ([-4.4, -6.6, -2.4], [-14.3, 5.4]),
    }
    for variant, (mean, unit) in quoted.items():
        (row,) = [r for r in committed["variants"][variant] if r["lengths"] == [32768]]
        assert [round(100 * row["mean"][k], 1) for k in ("diff", "ci_low", "ci_high")] == mean
        assert [round(100 * row["runs_as_unit"][k], 1) for k in ("ci_low", "ci_high")] == unit
        assert [p["replica"] for p in row["per_run"]] == [0, 1, 2]
    # replica 1 is a merge of two runs on two GPUs: it is listed as both, with the later date
    assert {k: committed["runs"][1][k] for k in ("commit", "date", "device")} == {
        "commit": "d89aa38 + c7fe8fe",
        "date": "2026-12-07",
        "device": "NVIDIA H200 + NVIDIA H100 80GB HBM3",
    }
    assert committed["commit"] == "3485a18 + d89aa38 + c7fe8fe + c70b0c0"


def test_the_candidates_training_runs_rebuild_to_their_committed_comparisons(reproduce, tmp_path):
    """The interleaved layout's second and third training runs and the sink block's second (replicas/candidates):
    each merge with its replica of the recorded recipe, and the three comparisons, rebuild from their recorded
    commands; the numbers RUN.md quotes: the interleaved layout against full attention at 32K, against the middle
    four and the sink block against the BlockSparse hybrid at >= 8K, with the spread each has over training runs."""
    from reproduction.report import ran_with

    folder = EXPERIMENTS / "results" / "replicas" / "candidates"
    for name in ("replica1", "replica2"):
        committed = json.loads((folder / name / "reproduce.json").read_text())
        again = _rerun(reproduce, committed["command"], tmp_path / name)
        # a setting added since the merge was written appears at the value the runs ran with (`ran_with`)
        assert {k: v for k, v in again.items() if k not in ("command", "files")} == {
            **{k: v for k, v in committed.items() if k not in ("command", "files")},
            "settings": ran_with(committed),
        }
    assert [r["variants"] for r in committed["runs"]] == [
        ["full", "hybrid_sinkwindow", "hybrid_blocksparse"],
        ["hybrid_interleave"],
    ]
    quoted = {  # folder: variant, lengths, mean over runs with its bootstrap interval, runs as the unit and sd
        ".": ("hybrid_interleave", [32768], [-5.3, -7.5, -3.3], [-14.7, 4.0, 3.8]),
        "interleave_vs_middle": ("hybrid_interleave", [8192, 16384, 32768], [-0.9, -1.6, -0.2], [-2.5, 0.8, 0.7]),
        "sink_vs_blocksparse": ("hybrid_blocksparse_sink", [8192, 16384, 32768], [0.5, -0.1, 1.0], None),
    }
    for sub, (variant, lengths, mean, unit) in quoted.items():
        committed = json.loads((folder / sub / "replicas.json").read_text())
        again = _rerun(reproduce, committed["command"], tmp_path / sub)
        assert again == {**committed, "command": again["command"]}
        assert list(committed["variants"]) == [variant]
        (row,) = [r for r in committed["variants"][variant] if r["lengths"] == lengths]
        assert [round(100 * row["mean"][k], 1) for k in ("diff", "ci_low", "ci_high")] == mean
        if unit:
            assert [round(100 * row["runs_as_unit"][k], 1) for k in ("ci_low", "ci_high", "sd")] == unit
        else:
            assert "runs_as_unit" not in row  # two runs
    assert json.loads((folder / "replicas.json").read_text()).get("against") is None
    assert json.loads((folder / "interleave_vs_middle" / "replicas.json").read_text())["against"] == "hybrid_sinkwindow"


def _rerun(reproduce, command: str, out: Path) -> dict:
    """A recorded `reproduce.py` command (merge or replicas) run again from the repository's files into `out`: the
    JSON it writes (reproduce.json or replicas.json)."""
    args = command.split()
    assert args[:2] == ["python", "experiments/reproduce.py"] and args[-2] == "--out-dir"
    given = [str(EXPERIMENTS.parent / a) if a.endswith(".json") else a for a in args[2:-2]]
    assert reproduce.main([*given, "--out-dir", str(out)]) == 0
    return json.loads((out / ("replicas.json" if args[2] == "replicas" else "reproduce.json")).read_text())


def test_the_wider_windows_two_training_runs_rebuild_to_their_committed_mean(reproduce, tmp_path):
    """The wider window's two training runs, each with the full attention of its replica of the recorded recipe
    (merge takes it, and in replica 1 the BlockSparse hybrid too, which reads no window), compared as replicas: the
    committed merges and replicas.json rebuild from their recorded commands; the replicas differ in the local blocks
    (the first probe doubled them), so the BlockSparse hybrid is left out; the SinkWindow hybrid's mean at 32K is
    what RUN.md quotes."""
    from reproduction.report import ran_with

    folder = PROBES / "2026-12-07-wider-window-replica"
    merged = {}
    for name in ("replica0", "replica1"):
        committed = json.loads((folder / name / "reproduce.json").read_text())
        again = _rerun(reproduce, committed["command"], tmp_path / name)
        # settings added since count as what the runs did (`ran_with`)
        assert {k: v for k, v in again.items() if k not in ("command", "files")} == {
            **{k: v for k, v in committed.items() if k not in ("command", "files")},
            "settings": ran_with(committed),
        }
        merged[name] = committed
    assert [r["variants"] for r in merged["replica0"]["runs"]] == [
        ["hybrid_sinkwindow", "hybrid_blocksparse"],
        ["full"],
    ]
    assert [r["variants"] for r in merged["replica1"]["runs"]] == [
        ["hybrid_sinkwindow"],
        ["full", "hybrid_blocksparse"],
    ]
    assert merged["replica1"]["runs"][1]["differs"] == [["window", 2048, 1024]]
    committed = json.loads((folder / "replicas.json").read_text())
    again = _rerun(reproduce, committed["command"], tmp_path / "replicas")
    assert {k: v for k, v in again.items() if k != "command"} == {k: v for k, v in committed.items() if k != "command"}
    assert committed["pattern_differs"] == ["local_blocks"] and committed["left_out"] == ["hybrid_blocksparse"]
    assert list(committed["variants"]) == ["hybrid_sinkwindow"]
    (row,) = [r for r in committed["variants"]["hybrid_sinkwindow"] if r["lengths"] == [32768]]
    assert [round(100 * row["mean"][k], 1) for k in ("diff", "ci_low", "ci_high")] == [-3.2, -5.4, -1.3]
    text = (folder / "replicas.md").read_text()
    assert "The replicas differ in local_blocks, which full attention does not read" in text


@pytest.mark.parametrize(
    ("folder", "names"),
    [  # in RUN.md's order, main run first
        ("archive/2026-12-06-fifth-recipe", ["e24dd0b_main.json", "515bc58_frontier.json", "679ae98_auto.json"]),
        (
            ".",
            [
                "3485a18_main.json",
                "0d6986e_frontier.json",
                "0140326_frontier_bottom.json",
                "c7fe8fe_auto.json",
                "c4ab611_interleave.json",
                "d33db79_blocksparse_sink.json",
            ],
        ),
        ("replicas/replica1", ["d89aa38_full_sinkwindow.json", "c7fe8fe_blocksparse.json"]),
    ],
)
def test_merged_results_are_the_merge_of_their_runs(reproduce, tmp_path, folder, names):
    """Results merged from several runs (the recorded ones, the fifth recipe's archived ones) are the merge of the
    runs kept beside them in runs/: merging them again gives the committed quality_summary.json (all but the command,
    which names the output folder) and report."""
    results = EXPERIMENTS / "results" / folder
    assert sorted(p.name for p in (results / "runs").glob("*.json")) == sorted(names)
    runs = [results / "runs" / name for name in names]
    out = tmp_path / "merged"
    assert reproduce.main(["merge", *(a for p in runs for a in ("--from", str(p))), "--out-dir", str(out)]) == 0
    merged, committed = (json.loads((d / "quality_summary.json").read_text()) for d in (out, results))
    assert {k: v for k, v in merged.items() if k != "command"} == {k: v for k, v in committed.items() if k != "command"}
    assert committed["command"].startswith("python experiments/reproduce.py merge --from ")
    assert [a.rsplit("/", 1)[-1] for a in committed["command"].split() if a.endswith(".json")] == names
    body = [(d / "reproduce.md").read_text().split("\n## Targets", 1)[1] for d in (out, results)]
    assert body[0] == body[1]


PROBES = EXPERIMENTS / "results" / "probes"


@pytest.mark.parametrize(
    ("probe", "line"),
    [
        ("2026-12-06-extension-tokens", "| niah | 40 / 40 | 39 / 39 | 40 / 40 | 40 / 40 | 36 / 39 |"),
        ("2026-12-07-longer-chains", "| 16K | -0.2 (-2.9 to +2.4) | -7.3 (-10.3 to -4.5) | -7.0 (-11.2 to -3.0) |"),
        ("2026-12-07-deeper-model", "| 16K | -0.2 (-2.9 to +2.4) | -3.8 (-5.9 to -1.6) | -3.5 (-6.8 to -0.5) |"),
        ("2026-12-07-wider-window", "| 16K | -0.2 (-2.9 to +2.4) | -2.0 (-4.2 to +0.1) | -1.8 (-4.3 to +0.7) |"),
        (
            "2026-12-07-wider-window-replica",
            "| 32K | -3.2 (-5.8 to -0.8) | -4.7 (-7.6 to -2.0) | -1.5 (-3.5 to +0.5) |",
        ),
        ("2026-12-07-record-facts", "| 32K | -3.2 (-6.2 to -0.4) | +0.2 (-2.3 to +2.8) | +3.5 (+0.0 to +7.2) |"),
        (
            "2026-12-07-near-share",
            "| parcel_weight | 43 / 31 / 50 / 45 / 60 | 38 / 28 / 50 / 38 / 63 | 34 / 29 / 48 / 33 / 60 | "
            "26 / 21 / 34 / 28 / 45 | 9 / 9 / 12 / 11 / 20 |",
        ),
        (
            "2026-12-08-near-share-sinkwindow",
            "| 32K | -3.2 (-6.2 to -0.4) | -3.2 (-5.8 to -0.8) | -8.2 (-11.3 to -5.3) | -2.7 (-5.4 to -0.2) | "
            "-4.0 (-6.6 to -1.5) |",
        ),
    ],
)
def test_the_probes_compare_to_their_committed_tables(reproduce, tmp_path, probe, line):
    """A probe's compare.json and compare.md are what its recorded `compare` command makes of the committed reports
    (the reference run first), and hold the line its RUN.md quotes."""
    folder = PROBES / probe
    committed = json.loads((folder / "compare.json").read_text())
    args = committed["command"].split()
    assert args[:3] == ["python", "experiments/reproduce.py", "compare"]
    froms = [args[i + 1] for i, a in enumerate(args) if a == "--from"]
    assert froms[-1] == f"experiments/results/probes/{probe}/reproduce.json"
    given = [x for f in froms for x in ("--from", str(EXPERIMENTS.parent / f))]
    assert reproduce.main(["compare", *given, "--out-dir", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "compare.json").read_text())
    assert {k: v for k, v in again.items() if k != "command"} == {k: v for k, v in committed.items() if k != "command"}
    text = (tmp_path / "compare.md").read_text()
    assert text == (folder / "compare.md").read_text()
    assert line in text


def _recorded_and_sinkwindow_tracking_all(tmp_path: Path, commit: str, **settings) -> tuple[dict, dict, int]:
    """The recorded run's reproduce.json, and a copy with `commit` and `settings` in which the SinkWindow hybrid
    answers every variable-tracking prompt at 32K (written as a.json and b.json in `tmp_path`); and how many of
    those it gained."""
    saved = json.loads(MAIN_RUN.read_text())
    other = json.loads(json.dumps(saved))
    other["commit"] = commit
    other["settings"].update(settings)
    sw = other["outcomes"]["hybrid_sinkwindow"]
    gained = sw["variable_tracking@32768"].count("0")
    assert gained > 0
    sw["variable_tracking@32768"] = "1" * len(sw["variable_tracking@32768"])
    (tmp_path / "a.json").write_text(json.dumps(saved))
    (tmp_path / "b.json").write_text(json.dumps(other))
    return saved, other, gained


def test_compare_sets_runs_of_different_recipes_side_by_side(reproduce, tmp_path, capsys):
    """`reproduce.py compare`: the recorded run against a copy made with longer variable chains in which the
    SinkWindow hybrid answers every variable-tracking prompt at 32K and full attention loses one needle. The
    setting that differs is named; each variant is paired with itself across the runs and against full attention
    within each; runs that asked other prompts, a single run and runs with no variant in common are refused."""
    saved, other, gained = _recorded_and_sinkwindow_tracking_all(tmp_path, "ccccccc", extend_chain_max=6)
    recorded = {(p["variant"], p["length"]): p for p in saved["paired"]}
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "cmp"
    needles = other["outcomes"]["full"]["niah@32768"]
    lost = needles.index("1")  # and full attention misses one more needle
    other["outcomes"]["full"]["niah@32768"] = needles[:lost] + "0" + needles[lost + 1 :]
    b.write_text(json.dumps(other))
    assert reproduce.main(["compare", "--from", str(a), "--from", str(b), "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert (out / "compare.md").read_text() in text
    assert "- run 2: commit ccccccc," in text and "differs from run 1 in extend_chain_max 4 → 6" in text
    summary = json.loads((out / "compare.json").read_text())
    assert summary["commit"] == f"{saved['commit']} + ccccccc" and summary["device"] == saved["device"]
    assert summary["runs"][0]["differs"] == [] and summary["runs"][1]["differs"] == [["extend_chain_max", 4, 6]]
    assert list(summary["variants"]) == ["full", "hybrid_sinkwindow", "hybrid_blocksparse", "all_sparse",
                                         "streaming_llm"]  # fmt: skip
    rows = {v: {tuple(r["lengths"]): r for r in s["rows"]} for v, s in summary["variants"].items()}
    row = rows["hybrid_sinkwindow"][(32768,)]
    first, second = row["accuracy"]
    assert second["correct"] - first["correct"] == gained
    (change,) = row["minus_first"]
    assert change["diff"] == pytest.approx(gained / row["n"]) and (change["only_this"], change["only_first"]) == (
        gained, 0)  # fmt: skip
    against = row["against_full"]
    assert against["per_run"][0]["diff"] == pytest.approx(recorded["hybrid_sinkwindow", 32768]["diff_vs_full"])
    assert against["per_run"][1]["diff"] == pytest.approx(against["per_run"][0]["diff"] + (gained + 1) / row["n"])
    (moved,) = against["moved"]
    assert moved["diff"] == pytest.approx((gained + 1) / row["n"]) and moved["ci_low"] > 0
    assert "against_full" not in rows["full"][(32768,)]
    untouched = rows["hybrid_blocksparse"][(2048,)]
    assert untouched["minus_first"][0] | {"ci_low": 0, "ci_high": 0} == {"diff": 0.0, "ci_low": 0, "ci_high": 0,
                                                                         "only_this": 0, "only_first": 0}  # fmt: skip
    full = summary["variants"]["full"]
    per_task = summary["per_task"]
    assert full["by_task"]["niah@32768"] == [needles.count("1"), needles.count("1") - 1]
    assert full["niah_missed"][1] == sorted([*full["niah_missed"][0], lost / (per_task - 1)])
    assert f"{100 * lost / (per_task - 1):.0f}%" in text
    # refused: other prompts, one run, no variant in common
    other["settings"]["prompts_per_task"] = per_task + 1
    b.write_text(json.dumps(other))
    assert reproduce.main(["compare", "--from", str(a), "--from", str(b), "--out-dir", str(out)]) == 2
    assert "asked other prompts than run 1: they differ in prompts_per_task;" in capsys.readouterr().err
    other["settings"]["prompts_per_task"] = per_task
    other["outcomes"]["full"]["niah@32768"] += "1"
    b.write_text(json.dumps(other))
    assert reproduce.main(["compare", "--from", str(a), "--from", str(b), "--out-dir", str(out)]) == 2
    assert "run 2 asked full other prompts than run 1 asked full" in capsys.readouterr().err
    assert reproduce.main(["compare", "--from", str(a), "--out-dir", str(out)]) == 2
    assert "at least two runs, got 1" in capsys.readouterr().err
    only_full = {**saved, "outcomes": {"full": saved["outcomes"]["full"]}}
    only_sw = {**saved, "outcomes": {"hybrid_sinkwindow": saved["outcomes"]["hybrid_sinkwindow"]}}
    a.write_text(json.dumps(only_full))
    b.write_text(json.dumps(only_sw))
    assert reproduce.main(["compare", "--from", str(a), "--from", str(b), "--out-dir", str(out)]) == 2
    assert "no variant was evaluated by every run" in capsys.readouterr().err


def test_replicas_and_compare_set_side_by_side_only_the_variants_asked_for(reproduce, tmp_path, capsys):
    """`--variant` with `replicas` and `compare`: only those variants are compared, each the same as without it; a
    variant some run did not evaluate, full attention as a replica's variant, one that reads a pattern setting where
    replicas differ, and `--variant` with `merge` are refused, saying why and writing nothing."""
    _recorded_and_sinkwindow_tracking_all(tmp_path, "bbbbbbb", extend_replica=1)
    runs = ["--from", str(tmp_path / "a.json"), "--from", str(tmp_path / "b.json")]
    for stage, name in (("replicas", "replicas.json"), ("compare", "compare.json")):
        assert reproduce.main([stage, *runs, "--out-dir", str(tmp_path / stage)]) == 0
        every = json.loads((tmp_path / stage / name).read_text())["variants"]
        picked = ["--variant", "hybrid_blocksparse", "--variant", "hybrid_sinkwindow"]
        assert reproduce.main([stage, *runs, *picked, "--out-dir", str(tmp_path / f"{stage}-two")]) == 0
        two = json.loads((tmp_path / f"{stage}-two" / name).read_text())["variants"]
        assert list(two) == ["hybrid_sinkwindow", "hybrid_blocksparse"]  # in the variants' order
        assert two == {v: every[v] for v in two}
        text = (tmp_path / f"{stage}-two" / name.replace(".json", ".md")).read_text()
        assert "SinkWindow" in text and "all sparse" not in text.lower()
    capsys.readouterr()
    without_bs = json.loads((tmp_path / "b.json").read_text())
    del without_bs["outcomes"]["hybrid_blocksparse"]
    (tmp_path / "c.json").write_text(json.dumps(without_bs))
    refused = [
        (["replicas", "--variant", "hybrid_blocksparse"], "c.json",
         "--variant hybrid_blocksparse: run 2 did not evaluate it; the runs evaluated hybrid_sinkwindow, "),
        (["compare", "--variant", "hybrid_blocksparse"], "c.json", "--variant hybrid_blocksparse: run 2 did not"),
        (["replicas", "--variant", "full"], "b.json", "--variant full: replicas measure each variant against full"),
        (["merge", "--variant", "full"], "b.json", "--variant goes with replicas and compare here"),
    ]  # fmt: skip
    for args, second, says in refused:
        out = tmp_path / "refused"
        given = [args[0], "--from", str(tmp_path / "a.json"), "--from", str(tmp_path / second), *args[1:]]
        assert reproduce.main([*given, "--out-dir", str(out)]) == 2
        assert says in capsys.readouterr().err and not out.exists()
    wider = json.loads((tmp_path / "b.json").read_text())
    wider["settings"]["window"] = 2048
    (tmp_path / "w.json").write_text(json.dumps(wider))
    given = ["replicas", "--from", str(tmp_path / "a.json"), "--from", str(tmp_path / "w.json")]
    assert reproduce.main([*given, "--variant", "hybrid_sinkwindow", "--out-dir", str(tmp_path / "refused")]) == 2
    assert "--variant hybrid_sinkwindow reads window, where the runs differ" in capsys.readouterr().err


def test_replicas_against_another_variant_of_the_same_run(reproduce, tmp_path, capsys):
    """`replicas --against X`: each variant minus X of the same replica on the same prompts, as `paired_difference`
    gives it from the two variants' outcomes, the spread from the gained prompts; no hybrids' target (that is
    against full attention). A reference some run lacks, a reference that reads a setting where the replicas
    differ, the reference as a --variant, and --against with another stage are refused."""
    from reproduction.settings import TASKS

    from longgen.eval.stats import paired_difference

    saved, other, gained = _recorded_and_sinkwindow_tracking_all(tmp_path, "bbbbbbb", extend_replica=1)
    runs = ["--from", str(tmp_path / "a.json"), "--from", str(tmp_path / "b.json")]
    out = tmp_path / "against"
    given = [*runs, "--against", "hybrid_blocksparse", "--variant", "hybrid_sinkwindow", "--out-dir", str(out)]
    assert reproduce.main(["replicas", *given]) == 0
    summary = json.loads((out / "replicas.json").read_text())
    assert summary["against"] == "hybrid_blocksparse" and list(summary["variants"]) == ["hybrid_sinkwindow"]
    (row,) = [r for r in summary["variants"]["hybrid_sinkwindow"] if r["lengths"] == [32768]]
    for run, paired in zip((saved, other), row["per_run"], strict=True):
        hits = {v: [c == "1" for t in TASKS for c in run["outcomes"][v][f"{t}@32768"]]
                for v in ("hybrid_sinkwindow", "hybrid_blocksparse")}  # fmt: skip
        expected = paired_difference(hits["hybrid_sinkwindow"], hits["hybrid_blocksparse"])
        assert paired["diff"] == pytest.approx(expected.diff) and paired["ci_low"] == pytest.approx(expected.ci_low)
        assert (paired["only_variant"], paired["only_hybrid_blocksparse"]) == (expected.a_only, expected.b_only)
    assert row["spread"][0]["diff"] == pytest.approx(gained / row["n"])
    text = (out / "replicas.md").read_text()
    assert "Each variant minus `hybrid_blocksparse` of the same replica" in text
    assert "| replica 0 − hybrid_blocksparse |" in text and "target" not in text
    capsys.readouterr()
    without_bs = {**other, "outcomes": {k: v for k, v in other["outcomes"].items() if k != "hybrid_blocksparse"}}
    (tmp_path / "c.json").write_text(json.dumps(without_bs))
    wider = {**other, "settings": {**other["settings"], "window": 2048}}
    (tmp_path / "w.json").write_text(json.dumps(wider))
    refused = [
        ("c.json", ["--against", "hybrid_blocksparse"], "every run must have evaluated hybrid_blocksparse (run 2 did"),
        ("w.json", ["--against", "hybrid_sinkwindow"], "--against hybrid_sinkwindow reads window, where the runs"),
        ("b.json", ["--against", "all_sparse", "--variant", "all_sparse"], "--variant all_sparse: replicas measure"),
    ]  # fmt: skip
    for second, args, says in refused:
        given = ["replicas", "--from", str(tmp_path / "a.json"), "--from", str(tmp_path / second), *args]
        assert reproduce.main([*given, "--out-dir", str(tmp_path / "refused")]) == 2
        assert says in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert reproduce.main(["compare", *runs, "--against", "all_sparse", "--out-dir", str(tmp_path / "refused")]) == 2
    assert "--against goes with the replicas stage; compare does not read it" in capsys.readouterr().err


def test_each_variant_reads_the_pattern_settings_it_is_said_to(reproduce, tmp_path, monkeypatch):
    """What `compare`, `merge` and `replicas` rely on to share a model between runs whose pattern settings differ:
    with one of PATTERN_SETTINGS changed, the stage keys that decide a variant's model and answers change exactly for
    the variants that `pattern_settings_read` says read it. Full attention reads none, so a pattern probe is measured
    against run 1's; the BlockSparse hybrids do not read the window, the SinkWindow ones not the local blocks."""
    from reproduction.settings import PATTERN_SETTINGS, TINY, VARIANTS, pattern_settings_read
    from reproduction.stages import Experiment

    monkeypatch.setattr(Experiment, "fingerprint", lambda self, name: f"finished {name}")
    base = dataclasses.replace(TINY, work_dir=str(tmp_path), out_dir=str(tmp_path))
    trained = [v for v in VARIANTS if v != "streaming_llm"]
    names = ["prepare", "pretrain", *(f"extend-{v}" for v in trained), "eval-streaming_llm-retrieval"]

    def keys(s) -> dict[str, str]:
        exp = Experiment(s)
        return {name: json.dumps(exp.key(name), sort_keys=True) for name in names}

    before = keys(base)
    assert pattern_settings_read("full") == frozenset()
    for setting in sorted(PATTERN_SETTINGS):
        after = keys(dataclasses.replace(base, **{setting: 2 * getattr(base, setting)}))
        assert before["prepare"] == after["prepare"] and before["pretrain"] == after["pretrain"]
        for v in VARIANTS:
            name = "eval-streaming_llm-retrieval" if v == "streaming_llm" else f"extend-{v}"
            assert (before[name] != after[name]) == (setting in pattern_settings_read(v)), (setting, v)


def _run_on(reproduce, capsys, stage: str, runs: list[dict], tmp_path: Path) -> tuple[str, dict]:
    """`reproduce.py <stage> --from ...` on the saved `runs` (written into `tmp_path`): what it printed, and the JSON
    it wrote (compare.json, or merge's reproduce.json)."""
    given = []
    for i, run in enumerate(runs):
        (tmp_path / f"run{i}.json").write_text(json.dumps(run))
        given += ["--from", str(tmp_path / f"run{i}.json")]
    assert reproduce.main([stage, *given, "--out-dir", str(tmp_path / stage)]) == 0
    name = "compare.json" if stage == "compare" else "reproduce.json"
    return capsys.readouterr().out, json.loads((tmp_path / stage / name).read_text())


def _wider_window_probe(saved: dict, lost: int, n: int = 16384) -> dict:
    """`saved` as a run of the two hybrids alone with twice the window and local blocks, in which the SinkWindow
    hybrid answers what full attention answers but `lost` prompts at length `n`."""
    probe = _split(saved, ["hybrid_sinkwindow", "hybrid_blocksparse"], "ddddddd")
    probe["settings"] = {**saved["settings"], "window": 2048, "local_blocks": 32}
    out = dict(saved["outcomes"]["full"])
    flipped = 0
    for key in (k for k in out if k.endswith(f"@{n}")):
        bits = list(out[key])
        for i, bit in enumerate(bits):
            if bit == "1" and flipped < lost:
                bits[i], flipped = "0", flipped + 1
        out[key] = "".join(bits)
    assert flipped == lost
    probe["outcomes"]["hybrid_sinkwindow"] = out
    return probe


def test_compare_measures_a_pattern_probe_against_run_1s_full_attention(reproduce, tmp_path, capsys):
    """A run of the hybrids alone whose recipe differs from run 1's only in the sparse patterns' settings (another
    window) is measured against run 1's full attention, the model it would have trained; the hybrids' target is
    applied to each run, a difference of exactly -2 points meeting it though float subtraction lands below -0.02.
    A run without full attention that differs in anything else gets no difference to full attention."""
    from longgen.eval.stats import paired_difference

    saved = json.loads(MAIN_RUN.read_text())
    n = 16384
    probe = _wider_window_probe(saved, 8, n)
    text, summary = _run_on(reproduce, capsys, "compare", [saved, probe], tmp_path)
    assert [r["full_of_run"] for r in summary["runs"]] == [1, 1]
    assert summary["runs"][1]["differs"] == [["local_blocks", 16, 32], ["window", 1024, 2048]]
    assert "did not evaluate full attention and is measured against run 1's" in text
    assert list(summary["variants"]) == ["hybrid_sinkwindow", "hybrid_blocksparse"]
    recorded = {(p["variant"], p["length"]): p for p in saved["paired"]}
    for v in ("hybrid_sinkwindow", "hybrid_blocksparse"):
        for row in (r for r in summary["variants"][v]["rows"] if len(r["lengths"]) == 1):
            first, second = row["against_full"]["per_run"]
            assert first["diff"] == pytest.approx(recorded[v, row["lengths"][0]]["diff_vs_full"])
            if v == "hybrid_blocksparse":  # the same outcomes in both runs, against the same full attention
                assert second == first
            else:
                expected = -8 / 400 if row["lengths"] == [n] else 0.0
                assert second["diff"] == pytest.approx(expected) and second["only_variant"] == 0
    full, sw = (saved["outcomes"]["full"], probe["outcomes"]["hybrid_sinkwindow"])
    hits = [[b == "1" for k in full if k.endswith(f"@{n}") for b in o[k]] for o in (sw, full)]
    assert paired_difference(*hits).diff < -0.02  # the float a plain comparison would reject
    sw_target = summary["variants"]["hybrid_sinkwindow"]["target"]
    assert [t["met"] for t in sw_target] == [False, True]
    assert sw_target[1]["worst"] == {"length": n, "diff": pytest.approx(-0.02)}
    assert "run 1 NOT met; worst -3.2 at 32K, lowest end -6.2 at 32K; run 2 met; worst -2.0 at 16K" in text
    # one prompt more is below the target; a probe that changed anything else gets no full attention of run 1
    probe = _wider_window_probe(saved, 9, n)
    text, summary = _run_on(reproduce, capsys, "compare", [saved, probe], tmp_path)
    assert [t["met"] for t in summary["variants"]["hybrid_sinkwindow"]["target"]] == [False, False]
    assert "run 2 NOT met; worst -2.2 at 16K" in text
    probe["settings"]["extend_chain_max"] = 6
    text, summary = _run_on(reproduce, capsys, "compare", [saved, probe], tmp_path)
    assert "measured against run 1's" not in text
    assert [r["full_of_run"] for r in summary["runs"]] == [None, None]
    assert all("against_full" not in r for s in summary["variants"].values() for r in s["rows"])
    assert summary["variants"]["hybrid_sinkwindow"]["target"] is None


def _split(saved: dict, variants: list[str], commit: str) -> dict:
    """`saved` as if a run had evaluated only `variants` (a report keeps every variant's record and outcomes; a
    merged one also where each variant ran, which a single run's does not)."""
    return {
        **{k: x for k, x in saved.items() if k != "runs"},
        "commit": commit,
        "variants": {v: {k: x for k, x in saved["variants"][v].items() if k != "device"} for v in variants},
        "outcomes": {v: saved["outcomes"][v] for v in variants if v in saved["outcomes"]},
    }


def test_merge_of_two_runs_equals_the_run_that_had_them_all(reproduce, tmp_path, capsys):
    """The recorded main run cut into two runs (the second with another commit) and merged with `reproduce.py
    merge` gives the main run's rows and paired differences; the report names each run and its variants; a variant
    evaluated in both runs comes from the first, one listed but not evaluated in the first from the second."""
    from reproduction.report import rebuild_report

    saved = json.loads(MAIN_RUN.read_text())
    names = list(saved["variants"])
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    assert "full" in first and second
    run_b = {**_split(saved, [*second, first[-1]], "bbbbbbb"), "device": "another GPU"}
    run_b["outcomes"][first[-1]] = {k: v.replace("0", "x").replace("1", "0").replace("x", "1")
                                    for k, v in saved["outcomes"][first[-1]].items()}  # fmt: skip
    run_a = _split(saved, first, "aaaaaaa")
    # as a run recorded before a variant not evaluated was left out of the report: StreamingLLM, with `full`
    # trained, listed without outcomes; the merge takes it from the run that evaluated it
    run_a["variants"]["streaming_llm"] = {**run_b["variants"]["streaming_llm"], "ppl": None}
    files = []
    for i, run in enumerate([run_a, run_b]):
        files.append(tmp_path / f"run{i}.json")
        files[-1].write_text(json.dumps(run))
    out = tmp_path / "merged"
    code = reproduce.main(["merge", "--from", str(files[0]), "--from", str(files[1]), "--out-dir", str(out)])
    assert code == 0
    merged = json.loads((out / "quality_summary.json").read_text())
    rebuild_report(saved, tmp_path / "main")
    recorded = json.loads((tmp_path / "main" / "quality_summary.json").read_text())
    assert merged["commit"] == "aaaaaaa + bbbbbbb" and merged["command"].startswith("python experiments/reproduce.py")
    assert merged["rows"] == recorded["rows"] and merged["paired"] == recorded["paired"]
    report = (out / "reproduce.md").read_text()
    assert "Merged from 2 runs" in report
    assert f"commit aaaaaaa, {saved['date']}, {saved['device']}: {', '.join(first)}" in report
    assert f"commit bbbbbbb, {saved['date']}, another GPU: {', '.join(second)}" in report
    summary = json.loads((out / "reproduce.json").read_text())
    assert [r["variants"] for r in summary["runs"]] == [first, second]
    # throughput measured on two GPUs: each variant, frontier point and table row names the one that timed it
    assert {v: r["device"] for v, r in summary["variants"].items()} == {
        **dict.fromkeys(first, saved["device"]), **dict.fromkeys(second, "another GPU")}  # fmt: skip
    frontier = summary["frontier"]
    assert [f["device"] for f in frontier] == [
        "another GPU" if f["model"] in second else saved["device"] for f in frontier
    ]
    timed_b = [f for f in frontier if f["model"] in second]
    assert timed_b and len(timed_b) < len(frontier)
    v = timed_b[0]["model"]
    tps = f"{saved['variants'][v]['extension']['tokens_per_s']:,.0f} (another GPU)"
    # in the frontier table (once per point it is) and the layout table
    assert report.count(tps) == 1 + sum(f["model"] == v for f in frontier)
    assert "extension tokens/s (device)" in report
    # the merged report rebuilds to itself, runs included
    from reproduction.report import rebuild_report

    again = rebuild_report(summary, tmp_path / "again")
    assert again["runs"] == summary["runs"]
    assert json.loads((tmp_path / "again" / "quality_summary.json").read_text()) == merged


def test_the_plan_scales_the_measured_speeds_to_another_model_by_multiply_adds(reproduce, capsys):
    """The H100's speeds hold for the model they were measured with; for a deeper model or a longer context the
    plan scales them by multiply-adds per token (hand-computed here), keeps speeds given with --assume-*-tps, and
    says that it scaled."""
    from reproduction.settings import DEFAULT, H100, extend_cost, plan, shape_cost

    same = shape_cost(DEFAULT)
    assert (same.pretrain, same.extend, same.not_attention) == pytest.approx((1, 1, H100[True].not_attention))
    deep = dataclasses.replace(DEFAULT, layers=18)
    # weights: 12 or 18 layers x 3,145,728 (q, o 512x512; k, v 512x256; MLP 3x512x1536) + 8,388,608 (output layer);
    # attention at 2K: 12 or 18 layers x 512 x 2048
    cost = shape_cost(deep)
    assert cost.pretrain == pytest.approx((18 * 3_145_728 + 8_388_608 + 18 * 512 * 2048) / 58_720_256)
    weights = 0.47 * (18 * 3_145_728 + 8_388_608) / 46_137_344
    assert cost.extend == pytest.approx(weights + 0.53 * 1.5)
    assert cost.not_attention == pytest.approx(weights / cost.extend)
    assert extend_cost(deep, "full") == 1 and extend_cost(deep, "all_sparse") < 1
    base, p = plan(DEFAULT), plan(deep)
    assert p["assumptions"]["pretrain_tokens_per_s"] == pytest.approx(550_000 / cost.pretrain)
    assert p["assumptions"]["extend_tokens_per_s_full"] == pytest.approx(250_000 / cost.extend)
    overhead = 15
    ratio = (p["seconds"]["extend"]["full"] - overhead) / (base["seconds"]["extend"]["full"] - overhead)
    assert ratio == pytest.approx(cost.extend)
    longer = shape_cost(dataclasses.replace(DEFAULT, long_len=65536))
    assert longer.extend == pytest.approx(0.47 + 0.53 * 2) and longer.pretrain == pytest.approx(1)
    given = dataclasses.replace(deep, assume_pretrain_tps=1e6, assume_extend_tps=2e5)
    assert plan(given)["assumptions"]["extend_tokens_per_s_full"] == 2e5
    assert reproduce.main(["plan", "--layers", "18"]) == 0
    assert "scaled by multiply-adds per token: pre-training x1.43" in capsys.readouterr().out
    assert reproduce.main(["plan"]) == 0
    assert "scaled by multiply-adds" not in capsys.readouterr().out


def test_the_sink_block_variant_is_blocksparse_with_the_first_block_seen_by_every_kv_head(reproduce):
    """`hybrid_blocksparse_sink`'s pattern: the BlockSparse hybrid's block mask at --long-len, plus the first key
    block for every KV head and query block (one head of four saw it before, through its strided blocks), and still
    KV-cache efficient, so the compact cache serves it."""
    import torch
    from reproduction.settings import DEFAULT
    from reproduction.stages import blocksparse_with_sink

    from longgen.patterns import BlockSparse

    s = DEFAULT
    pattern = blocksparse_with_sink(s)
    n = s.long_len // s.block_size
    mine = pattern.block_mask(s.long_len, s.kv_heads)
    plain = BlockSparse(s.block_size, s.local_blocks).block_mask(s.long_len, s.kv_heads)
    assert mine.shape == plain.shape == (s.kv_heads, n, n)
    assert bool(mine[:, :, 0].all()) and torch.equal(mine[:, :, 1:], plain[:, :, 1:])
    assert plain[:, s.local_blocks :, 0].sum(dim=1).tolist() == [n - s.local_blocks, 0, 0, 0]
    assert pattern.is_kv_cache_efficient(s.kv_heads)
    with pytest.raises(ValueError, match="exceeds the BlockLayout's span"):
        pattern.kv_retention(s.long_len + 1, s.kv_heads)


def test_the_plan_costs_a_sparse_layer_by_the_pairs_its_pattern_keeps():
    """A sparse layer's planned attention time is the share of causal pairs its pattern keeps at --long-len
    (hand-counted here) times the time per pair fitted to the H100 runs, so the recorded patterns keep their fitted
    7% and 35%; a wider window, no sink tokens or fewer KV heads (BlockSparse's stride) change it accordingly."""
    from reproduction.settings import DEFAULT, H100, extend_cost, kept_share

    pairs = 32768 * 32769 // 2
    # last 1,024 keys of each query, plus the first 64 of those queries more than 1,024 tokens in
    window = 1024 * 1025 // 2 + (32768 - 1024) * 1024
    sink = 64 * 65 // 2 + (32768 - 1024 - 64) * 64
    assert kept_share(DEFAULT, "hybrid_sinkwindow") == pytest.approx((window + sink) / pairs)
    assert kept_share(DEFAULT, "hybrid_nosink") == pytest.approx(window / pairs)
    # 512 blocks: 16 local a row (fewer in the first rows), and every 4th (4 KV heads) of the 496 x 497 / 2 others
    blocks = 16 * 17 // 2 + (512 - 16) * 16 + 496 * 497 / 2 / 4
    assert kept_share(DEFAULT, "hybrid_blocksparse") == pytest.approx(blocks / (512 * 513 / 2))
    # a sink block: the first block for the 3 KV heads of 4 whose strided blocks miss it, in the 496 rows past it
    sink_block = blocks + 496 * 3 / 4
    assert kept_share(DEFAULT, "hybrid_blocksparse_sink") == pytest.approx(sink_block / (512 * 513 / 2))
    other = H100[True].not_attention
    assert extend_cost(DEFAULT, "all_sparse") == pytest.approx(other + (1 - other) * 0.07, rel=1e-5)
    hybrid = extend_cost(DEFAULT, "hybrid_blocksparse")
    assert hybrid == pytest.approx(other + (1 - other) * (4 / 12 + 8 / 12 * 0.35), rel=1e-5)
    # the sink-block run (Triton kernels) at its measured 212.6K tokens/s against full attention's 254.2K: slower
    assert 254.2 / extend_cost(DEFAULT, "hybrid_blocksparse_sink") == pytest.approx(212.6, rel=1e-3)
    wider = dataclasses.replace(DEFAULT, window=2048)
    assert kept_share(wider, "all_sparse") > 1.9 * kept_share(DEFAULT, "all_sparse")
    assert extend_cost(wider, "all_sparse") > extend_cost(DEFAULT, "all_sparse")
    three = dataclasses.replace(DEFAULT, heads=6, kv_heads=3, hidden_size=384)
    assert kept_share(three, "hybrid_blocksparse") > kept_share(DEFAULT, "hybrid_blocksparse")
    whole = dataclasses.replace(DEFAULT, window=32768)
    assert kept_share(whole, "all_sparse") == pytest.approx(1) and extend_cost(whole, "all_sparse") <= 1


def test_the_plan_keeps_the_recipes_steps_and_fills_the_budget_only_where_they_are_zero(reproduce):
    """The default steps are the recorded run's (1,636 and 1,118, whatever the budget or the assumed speeds); with
    steps 0 they are derived from --budget-minutes, and the planned main comparison then fills the budget to within
    a step of each kind, eager or compiled, at the H100's speed or at the one given."""
    from reproduction.settings import DEFAULT, MAIN_TRAINED, assumed_tps, extend_cost, plan

    for s in (DEFAULT, dataclasses.replace(DEFAULT, budget_minutes=40.0, assume_extend_tps=1e6)):
        assert (plan(s)["pretrain_steps"], plan(s)["extend_steps"]) == (1636, 1118)
    derived = []
    for minutes, compiled, tps in ((20.5, True, 0), (30.0, True, 0), (30.0, False, 0), (30.0, False, 400_000)):
        s = dataclasses.replace(DEFAULT, pretrain_steps=0, extend_steps=0, budget_minutes=minutes, compile=compiled,
                                assume_extend_tps=tps)  # fmt: skip
        p = plan(s)
        pre_tps, ext_tps = assumed_tps(s)
        assert p["assumptions"]["extend_tokens_per_s_full"] == ext_tps == (tps or (250_000 if compiled else 200_000))
        pre_step = p["pretrain"]["tokens_per_step"] / pre_tps
        ext_step = p["extend"]["tokens_per_step"] / ext_tps * sum(extend_cost(s, v) for v in MAIN_TRAINED)
        assert -(pre_step + ext_step) < p["seconds"]["main_total"] - minutes * 60 <= 1e-6
        derived.append((p["pretrain_steps"], p["extend_steps"]))
    # more minutes, more steps; compiled layers, more steps in the same minutes; so does a faster assumed extension
    assert derived[1][0] > derived[0][0] and derived[1][1] > derived[0][1]
    assert derived[1][0] > derived[2][0] and derived[1][1] > derived[2][1]
    assert derived[3][1] > derived[2][1]
    # a compiled step spends a larger share in attention, so sparse layers save more of it
    assert extend_cost(DEFAULT, "all_sparse") < extend_cost(dataclasses.replace(DEFAULT, compile=False), "all_sparse")


def test_merge_takes_only_full_attention_from_a_run_of_another_pattern(reproduce, tmp_path, capsys):
    """A run of the hybrids with another window merged with the recorded run: full attention, which reads no
    pattern setting, comes from the recorded run; all sparse and StreamingLLM, which read the window, are left out
    and the report says so; the hybrids' paired differences are those against the recorded full attention."""
    saved = json.loads(MAIN_RUN.read_text())
    probe = _wider_window_probe(saved, 8)
    text, merged = _run_on(reproduce, capsys, "merge", [probe, saved], tmp_path)
    assert list(merged["variants"]) == ["hybrid_sinkwindow", "hybrid_blocksparse", "full"]
    assert merged["settings"]["window"] == 2048 and merged["outcomes"]["full"] == saved["outcomes"]["full"]
    assert merged["runs"][1]["variants"] == ["full"]
    assert merged["runs"][1]["left_out"] == ["all_sparse", "streaming_llm"]
    assert "its recipe differs in local_blocks 32 → 16, window 2048 → 1024, which all_sparse, streaming_llm read: " \
           "left out" in text  # fmt: skip
    recorded = {(p["variant"], p["length"]): p for p in saved["paired"]}
    for p in merged["paired"]:
        if p["variant"] == "hybrid_blocksparse":
            assert p == recorded["hybrid_blocksparse", p["length"]]
    (sw,) = [p for p in merged["paired"] if (p["variant"], p["length"]) == ("hybrid_sinkwindow", 16384)]
    assert sw["diff_vs_full"] == pytest.approx(-0.02)
    (target,) = [c for c in merged["targets"] if c["target"].startswith("2. LongGen hybrid, SinkWindow")]
    assert target["met"] is True  # exactly -2 points at 16K, 0 elsewhere
    # a run that differs in anything else is still refused
    saved["settings"]["extend_lr"] = 1e-3
    (tmp_path / "run1.json").write_text(json.dumps(saved))
    runs = ["--from", str(tmp_path / "run0.json"), "--from", str(tmp_path / "run1.json")]
    assert reproduce.main(["merge", *runs, "--out-dir", str(tmp_path / "refused")]) == 2
    assert "they differ in extend_lr;" in capsys.readouterr().err


def test_merge_refuses_runs_of_another_recipe_and_bad_input(reproduce, tmp_path, capsys):
    saved = json.loads(MAIN_RUN.read_text())
    other = _split(saved, ["hybrid_blocksparse"], "bbbbbbb")
    other["settings"] = {**saved["settings"], "extend_lr": 1e-3, "budget_minutes": 30.0, "work_dir": "/elsewhere",
                         "compile": False}  # fmt: skip
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_split(saved, ["full"], "aaaaaaa")))
    b.write_text(json.dumps(other))
    out = tmp_path / "merged"
    assert reproduce.main(["merge", "--from", str(a), "--from", str(b), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "they differ in extend_lr;" in err  # budget, compiling and work_dir steer a run: not a difference
    other["settings"]["extend_lr"] = saved["settings"]["extend_lr"]
    # another extension run of the same recipe is other models of the same variants: not merged
    other["settings"]["extend_replica"] = 1
    b.write_text(json.dumps(other))
    assert reproduce.main(["merge", "--from", str(a), "--from", str(b), "--out-dir", str(out)]) == 2
    assert "they differ in extend_replica;" in capsys.readouterr().err
    other["settings"]["extend_replica"] = 0  # the recorded run predates the setting: it ran as 0
    other["plan"] = {**saved["plan"], "extend_steps": saved["plan"]["extend_steps"] + 1}
    b.write_text(json.dumps(other))
    assert reproduce.main(["merge", "--from", str(a), "--from", str(b), "--out-dir", str(out)]) == 2
    assert "differ in plan extend_steps" in capsys.readouterr().err
    assert reproduce.main(["merge", "--from", str(a), "--out-dir", str(out)]) == 2
    assert "at least two runs" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert reproduce.main(["merge", "--from", str(a), "--from", str(tmp_path / "bad.json")]) == 2
    assert "not a readable reproduce.json" in capsys.readouterr().err
    assert reproduce.main(["merge", "--from", str(a), "--from", str(tmp_path / "missing.json")]) == 2
    assert "not a readable reproduce.json" in capsys.readouterr().err
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    assert reproduce.main(["merge", "--from", str(a), "--from", str(tmp_path / "other.json")]) == 2
    assert "not a report of experiments/reproduce.py" in capsys.readouterr().err
    assert reproduce.main(["merge"]) == 2
    assert "--from goes with the merge, replicas, compare and distance" in capsys.readouterr().err
    assert reproduce.main(["plan", "--from", str(a)]) == 2 and "--from goes with" in capsys.readouterr().err
    assert not out.exists()


def test_replicas_compare_training_runs_on_the_same_prompts(reproduce, tmp_path, capsys):
    """`reproduce.py replicas`: the recorded run as replica 0 and, as replica 1, the same run with the SinkWindow
    hybrid answering every variable-tracking prompt at 32K. Per replica the paired differences are each run's own;
    the mean is their average and the spread their difference, with bootstrap intervals; a variant that answered
    alike in both runs has no spread at all. Runs that are not replicas of one recipe are refused."""
    saved, other, gained = _recorded_and_sinkwindow_tracking_all(tmp_path, "bbbbbbb", extend_replica=1)
    recorded = {(p["variant"], p["length"]): p for p in saved["paired"]}
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "replicas"
    assert reproduce.main(["replicas", "--from", str(a), "--from", str(b), "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "## 2. LongGen hybrid, SinkWindow" in text and "replica 1 − replica 0" in text
    summary = json.loads((out / "replicas.json").read_text())
    assert summary["command"].startswith("python experiments/reproduce.py replicas --from ")
    assert summary["commit"] == f"{saved['commit']} + bbbbbbb" and summary["device"] == saved["device"]
    assert summary["date"] == saved["date"]
    assert (out / "replicas.md").read_text() in text
    by = {v: {tuple(r["lengths"]): r for r in rows} for v, rows in summary["variants"].items()}
    assert set(by) == {"hybrid_sinkwindow", "hybrid_blocksparse", "all_sparse", "streaming_llm"}
    row = by["hybrid_sinkwindow"][(32768,)]
    first, second = row["per_run"]
    assert first["diff"] == pytest.approx(recorded["hybrid_sinkwindow", 32768]["diff_vs_full"])
    assert first["ci_low"] == pytest.approx(recorded["hybrid_sinkwindow", 32768]["diff_ci_low"])
    assert second["diff"] == pytest.approx(first["diff"] + gained / row["n"])
    assert row["mean"]["diff"] == pytest.approx((first["diff"] + second["diff"]) / 2)
    assert row["mean"]["ci_low"] < row["mean"]["diff"] < row["mean"]["ci_high"]
    (spread,) = row["spread"]
    assert spread["diff"] == pytest.approx(gained / row["n"]) and spread["ci_low"] > 0  # more than the prompts explain
    same = by["hybrid_blocksparse"][(8192, 16384, 32768)]
    assert same["spread"][0] | {"replica": 0} == {"replica": 0, "minus": 0, "diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert same["per_run"][0]["diff"] == pytest.approx(same["mean"]["diff"])
    assert text.count("target applied to the mean over replicas") == 2  # the two hybrids, not the baselines
    # a third replica (the recorded run again): the mean of three, and each later replica's spread from replica 0
    third = {**saved, "commit": "ccccccc", "settings": {**saved["settings"], "extend_replica": 2}}
    (tmp_path / "c.json").write_text(json.dumps(third))
    three = ["--from", str(a), "--from", str(b), "--from", str(tmp_path / "c.json")]
    assert reproduce.main(["replicas", *three, "--out-dir", str(tmp_path / "three")]) == 0
    rows = json.loads((tmp_path / "three" / "replicas.json").read_text())["variants"]["hybrid_sinkwindow"]
    (row3,) = [r for r in rows if r["lengths"] == [32768]]
    assert [p["diff"] for p in row3["per_run"]] == pytest.approx([first["diff"], second["diff"], first["diff"]])
    assert row3["mean"]["diff"] == pytest.approx((2 * first["diff"] + second["diff"]) / 3)
    assert [(s["replica"], s["minus"]) for s in row3["spread"]] == [(1, 0), (2, 0)] and row3["spread"][1]["diff"] == 0
    # with three runs the mean also has a Student-t interval over the runs' differences (t(0.95, 2) = 4.3027): the
    # runs differ by `gained` prompts in one of three, so sd = gained / n / sqrt(3)
    unit, n = row3["runs_as_unit"], row3["n"]
    assert unit["diff"] == pytest.approx(row3["mean"]["diff"])
    assert unit["sd"] == pytest.approx(gained / n / math.sqrt(3))
    assert unit["ci_high"] - unit["diff"] == pytest.approx(4.302653 * unit["sd"] / math.sqrt(3), rel=1e-6)
    assert unit["ci_low"] < row3["mean"]["ci_low"]  # wider than the prompts' interval: the runs moved it
    assert "runs_as_unit" not in row  # two runs: one degree of freedom, no such interval
    text = (tmp_path / "three" / "replicas.md").read_text()
    assert "| runs as the unit | sd |" in text and "(2 degrees of freedom)" in text
    assert text.count("With the runs as the unit, the lowest interval end is") == 2
    # a replica with another window: the variants that read it are left out, the BlockSparse hybrid is compared
    wider = {**other, "settings": {**other["settings"], "window": 2048}}
    (tmp_path / "w.json").write_text(json.dumps(wider))
    assert reproduce.main(["replicas", "--from", str(a), "--from", str(tmp_path / "w.json"),
                           "--out-dir", str(tmp_path / "wider")]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "wider" / "replicas.json").read_text())
    assert list(summary["variants"]) == ["hybrid_blocksparse"] and summary["pattern_differs"] == ["window"]
    assert summary["left_out"] == ["hybrid_sinkwindow", "all_sparse", "streaming_llm"]
    assert "(hybrid_sinkwindow, all_sparse, streaming_llm read some: left out)" in capsys.readouterr().out
    # not replicas of one recipe, or not replicas at all
    other["settings"]["extend_lr"] = 1e-3
    b.write_text(json.dumps(other))
    assert reproduce.main(["replicas", "--from", str(a), "--from", str(b), "--out-dir", str(out)]) == 2
    assert "they differ in extend_lr;" in capsys.readouterr().err
    assert reproduce.main(["replicas", "--from", str(a), "--from", str(a), "--out-dir", str(out)]) == 2
    assert "each run must be another --extend-replica; got replicas [0, 0]" in capsys.readouterr().err
    assert reproduce.main(["replicas", "--out-dir", str(out)]) == 2
    assert "--from goes with the merge, replicas, compare and distance stages" in capsys.readouterr().err


@pytest.mark.slow
def test_the_near_question_probe_views_each_model_with_its_full_layers_limited(reproduce, tmp_path, capsys):
    """`reproduce.py near`: prompts whose needles all lie within --near-span haystack tokens before the question,
    on each trained variant as trained and with its full layers limited to SinkWindow(--sink, W). A window longer
    than every prompt changes nothing; the tables are the outcomes' own accuracies and paired differences; untrained
    or inference-only variants and misplaced arguments are refused."""
    from reproduction.settings import TINY
    from reproduction.stages import Experiment
    from reproduction.tasks import _rng, _spec, build_items

    from longgen.eval import build_prompt
    from longgen.eval.stats import paired_difference
    from longgen.model import load_tokenizer

    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--tiny", "--work-dir", str(work), "--out-dir", str(out)]
    assert reproduce.main(["near", *args]) == 2
    assert "full is not trained in" in capsys.readouterr().err
    assert reproduce.main(["all", "--variant", "full", "--variant", "hybrid_sinkwindow", *args]) == 0
    capsys.readouterr()
    refusals = {
        ("near", "--variant", "streaming_llm"): "streaming_llm is full's model changed at inference",
        ("near", "--variant", "hybrid_blocksparse"): "hybrid_blocksparse is not trained in",
        ("near", "--near-span", "400"): "--near-span must lie between 0 and the shortest prompt (304 tokens)",
        ("near", "--near-windows", "0,32"): "--near-windows must be positive token counts, got [0]",
        ("report", "--near-span", "10"): "--near-span and --near-windows go with the near stage",
    }
    for argv, message in refusals.items():
        assert reproduce.main([*argv, *args]) == 2
        assert message in capsys.readouterr().err
    assert not (out / "near.json").exists()

    assert reproduce.main(["near", "--near-windows", "16,4096", "--commit", "abc123", *args]) == 0
    summary = json.loads((out / "near.json").read_text())
    assert summary["commit"] == "abc123" and "## Paired differences" in (out / "near.md").read_text()
    outcomes = summary["outcomes"]
    views = ["full", "full@16", "full@4096", "hybrid_sinkwindow", "hybrid_sinkwindow@16", "hybrid_sinkwindow@4096"]
    assert list(outcomes) == views
    assert summary["settings"]["span"] == 24 and summary["settings"]["windows"] == [16, 4096]  # 3/4 of 32
    for v in ("full", "hybrid_sinkwindow"):  # a window past every prompt is the full layer itself
        assert outcomes[f"{v}@4096"] == outcomes[v]
    assert all(set(o) == {f"{t}@{n}" for t in ("niah", "variable_tracking") for n in (320, 512)} for o in
               outcomes.values())  # fmt: skip
    hits = {v: [c == "1" for k in ("variable_tracking@512",) for c in outcomes[v][k]] for v in views}
    (row,) = [r for r in summary["rows"] if (r["view"], r["task"], r["length"]) ==
              ("hybrid_sinkwindow@16", "variable_tracking", 512)]  # fmt: skip
    assert (row["n"], row["correct"]) == (3, sum(hits["hybrid_sinkwindow@16"]))
    pairs = {(p["view"], p["against"]) for p in summary["paired"] if (p["task"], p["length"]) == ("niah", ">=512")}
    assert pairs == {("full@16", "full"), ("full@4096", "full"), ("hybrid_sinkwindow", "full"),
                     ("hybrid_sinkwindow@16", "full"), ("hybrid_sinkwindow@16", "hybrid_sinkwindow"),
                     ("hybrid_sinkwindow@4096", "full"), ("hybrid_sinkwindow@4096", "hybrid_sinkwindow")}  # fmt: skip
    (p,) = [p for p in summary["paired"] if (p["view"], p["against"], p["task"], p["length"]) ==
            ("hybrid_sinkwindow@16", "hybrid_sinkwindow", "variable_tracking", 512)]  # fmt: skip
    expected = paired_difference(hits["hybrid_sinkwindow@16"], hits["hybrid_sinkwindow"])
    assert (p["diff"], p["only_view"], p["only_against"]) == (expected.diff, expected.a_only, expected.b_only)

    # every needle lies within the span: the haystack tokens from the first needle to the question are at most it
    exp = Experiment(dataclasses.replace(TINY, work_dir=str(work), out_dir=str(out)))
    tokenizer = load_tokenizer(exp.result("extend-full")["model"])
    pool, words = exp.haystack(tokenizer, Path(exp.result("prepare")["heldout_dir"]))
    items = build_items(tokenizer, pool, words, (320, 512), 3, 16, seed=0, tasks=("niah", "variable_tracking"), near=24)
    spans = []
    for it in items:
        needles, _, question, prefix, _ = _spec(it.task, _rng(0, "near", it.task, it.length, it.index), 0.0, words)
        fixed = build_prompt(tokenizer, 4000, [0] * 4000, needles, [1.0] * len(needles), question, prefix)
        spans.append(it.reach - (4000 - fixed.haystack_tokens - fixed.head_tokens))
    assert min(spans) >= 0 and max(spans) <= 24 and max(spans) > 12
    with pytest.raises(ValueError, match="near must lie between 0 and the shortest prompt"):
        build_items(tokenizer, pool, words, (320,), 3, 16, seed=0, near=304)


def _committed_near(folder: Path) -> dict:
    """A committed near probe's near.json, after checking that its tables and near.md come again from its outcomes."""
    from reproduction.near import format_near, near_tables

    committed = json.loads((folder / "near.json").read_text())
    assert {**committed, **near_tables(committed["outcomes"], committed["settings"])} == committed
    assert format_near(committed) == (folder / "near.md").read_text()
    return committed


def _committed_run(folder: Path, out: Path) -> dict:
    """A committed run's reproduce.json, after checking that its report rebuilds to its quality_summary.json."""
    from reproduction.report import rebuild_report

    saved = json.loads((folder / "reproduce.json").read_text())
    rebuild_report(saved, out)
    assert json.loads((out / "quality_summary.json").read_text()) == json.loads(
        (folder / "quality_summary.json").read_text()
    )
    return saved


def test_the_near_question_probe_and_the_fourth_run_rebuild_to_their_committed_files(reproduce, tmp_path):
    """The near-question probe's tables and markdown come again from its committed outcomes, with the numbers its
    RUN.md quotes; the fourth training run rebuilds to its summary and, with the three before it, to the committed
    four-run comparison of the SinkWindow hybrid."""
    committed = _committed_near(PROBES / "2026-12-07-near-question")
    assert committed["settings"]["span"] == 768 and committed["settings"]["windows"] == [1024, 8192]
    assert max(high for _, high in committed["reach"].values()) < 1024  # every prompt's tail fits one window
    acc = {(r["view"], r["task"], r["length"]): round(100 * r["accuracy"], 1) for r in committed["rows"]}
    chains = {v: acc[(v, "variable_tracking", 32768)] for v in committed["outcomes"]}
    assert chains == {"full": 65.0, "full@1024": 98.8, "full@8192": 90.0, "hybrid_sinkwindow": 55.0,
                      "hybrid_sinkwindow@1024": 97.5, "hybrid_sinkwindow@8192": 81.2}  # fmt: skip
    assert {acc[(v, "niah", n)] for v in committed["outcomes"] for n in committed["settings"]["lengths"]} == {98.8, 100}
    paired = {(p["view"], p["against"], p["task"], p["length"]): [round(100 * p[k], 1) for k in
              ("diff", "ci_low", "ci_high")] for p in committed["paired"]}  # fmt: skip
    assert paired[("hybrid_sinkwindow", "full", "variable_tracking", ">=8K")] == [-6.7, -13.2, -0.1]
    assert paired[("hybrid_sinkwindow", "full", "niah", ">=8K")] == [0.0, -1.9, 1.9]
    assert paired[("hybrid_sinkwindow@1024", "hybrid_sinkwindow", "variable_tracking", ">=8K")] == [26.7, 21.3, 32.6]
    assert paired[("hybrid_sinkwindow@8192", "hybrid_sinkwindow", "variable_tracking", ">=8K")] == [12.1, 8.0, 16.4]
    assert paired[("full@1024", "full", "variable_tracking", ">=8K")] == [20.0, 15.0, 25.6]

    saved = _committed_run(EXPERIMENTS / "results" / "replicas" / "replica3", tmp_path / "replica3")
    assert saved["settings"]["extend_replica"] == 3 and list(saved["variants"]) == ["full", "hybrid_sinkwindow"]
    four = json.loads((EXPERIMENTS / "results" / "replicas" / "four" / "replicas.json").read_text())
    again = _rerun(reproduce, four["command"], tmp_path / "four")
    assert again == {**four, "command": again["command"]}
    rows = {tuple(r["lengths"]): r for r in four["variants"]["hybrid_sinkwindow"]}
    assert [round(100 * rows[(32768,)]["mean"][k], 1) for k in ("diff", "ci_low", "ci_high")] == [-4.4, -6.3, -2.6]
    assert [round(100 * rows[(32768,)]["runs_as_unit"][k], 1) for k in ("ci_low", "ci_high", "sd")] == [-8.5, -0.2, 2.6]
    assert [p["replica"] for p in rows[(32768,)]["per_run"]] == [0, 1, 2, 3]


def _held_out_by_distance(outcomes: dict) -> list[int]:
    """Held-out prompts answered by the fact's distance before the question (0-4K, 4-8K, 8-12K, 12-16K, beyond),
    over the five lengths: the fact's depth in prompt `i` of 80 is `i / 79`, as the probes' RUN.md count it."""
    count = [0] * 5
    for n in (2048, 4096, 8192, 16384, 32768):
        for i, c in enumerate(outcomes[f"parcel_weight@{n}"]):
            count[min(int((1 - i / 79) * n // 4096), 4)] += c == "1"
    return count


def _near_chains_against_the_near_question_probe(near: dict, variant: str) -> tuple[list[int], list[list[float]]]:
    """Near variable chains of `variant` in a near probe and in the near-question probe, on the same prompts: how
    many each answered at 32K, and the paired difference (points, with its 95% interval) at 32K and at >= 8K."""
    from longgen.eval.stats import paired_difference

    before = json.loads((PROBES / "2026-12-07-near-question" / "near.json").read_text())
    assert near["reach"] == before["reach"]  # the same prompts
    far = (8192, 16384, 32768)
    chains = {n: [d["outcomes"][variant][f"variable_tracking@{n}"] for d in (near, before)] for n in far}
    diffs = []
    for lengths in ((32768,), far):
        a, b = ("".join(chains[n][k] for n in lengths) for k in (0, 1))
        d = paired_difference([c == "1" for c in a], [c == "1" for c in b])
        diffs.append([round(100 * x, 1) for x in (d.diff, d.ci_low, d.ci_high)])
    return [c.count("1") for c in chains[32768]], diffs


def test_the_near_share_run_rebuilds_with_the_numbers_its_run_md_quotes(reproduce, tmp_path):
    """Full attention extended with near facts (`--extend-near-share 0.125`): its report and near probe rebuild from
    the committed outcomes; the rules' numbers, the near chains paired with the near-question probe's on the same
    prompts, and the held-out task by distance (none beyond 16K, in any run of either recipe) are what RUN.md says."""

    probe = PROBES / "2026-12-07-near-share"
    saved = _committed_run(probe, tmp_path)
    assert saved["settings"]["extend_near_share"] == 0.125 and list(saved["variants"]) == ["full"]
    full = saved["outcomes"]["full"]
    assert min(full[f"{t}@{n}"].count("1") for t in ("passkey", "niah") for n in (2048, 4096, 8192, 16384, 32768)) == 79
    assert sum(full[f"variable_tracking@{n}"].count("1") for n in (8192, 16384, 32768)) == 232  # rule 3: >= 225

    near = _committed_near(probe)
    counts, diffs = _near_chains_against_the_near_question_probe(near, "full")
    assert counts == [77, 52]  # rule 2: 96.2% >= 95%, against 65.0%
    assert diffs == [[31.2, 21.2, 41.8], [20.0, 15.2, 25.5]]
    paired = {(p["view"], p["task"], p["length"]): p for p in near["paired"]}
    limited = paired[("full@1024", "variable_tracking", ">=8K")]
    assert [round(100 * limited[k], 1) for k in ("diff", "ci_low", "ci_high")] == [0.8, -1.2, 3.2]

    runs = ["runs/3485a18_main.json", *(f"replicas/replica{k}/reproduce.json" for k in (1, 2, 3)),
            "probes/2026-12-07-record-facts/reproduce.json"]  # fmt: skip
    recorded = [_held_out_by_distance(json.loads((EXPERIMENTS / "results" / r).read_text())["outcomes"]["full"])
                for r in runs]  # fmt: skip
    assert recorded == [[122, 22, 5, 1, 0], [95, 19, 3, 1, 0], [148, 35, 8, 3, 0], [124, 24, 5, 2, 0],
                        [172, 44, 11, 4, 0]]  # fmt: skip
    assert _held_out_by_distance(full) == [182, 51, 11, 4, 0]


def test_the_near_share_sinkwindow_run_decides_by_the_rules_its_run_md_quotes(reproduce, tmp_path):
    """The SinkWindow hybrid on the near-share data: its own report and near probe rebuild from the committed
    outcomes, the merge with the near-share probe's full attention is what its recorded command makes, and the
    numbers of the three rules, the hybrids' target and the held-out task by distance are what RUN.md says."""
    from reproduction.settings import TASKS

    from longgen.eval.stats import paired_difference

    probe = PROBES / "2026-12-08-near-share-sinkwindow"
    own = _committed_run(probe / "sinkwindow", tmp_path / "own")
    assert own["settings"]["extend_near_share"] == 0.125 and list(own["variants"]) == ["hybrid_sinkwindow"]
    merged = _committed_run(probe, tmp_path / "merged")
    args = merged["command"].split()
    assert args[:3] == ["python", "experiments/reproduce.py", "merge"]
    froms = [args[i + 1] for i, a in enumerate(args) if a == "--from"]
    R = "experiments/results/probes/"
    assert froms == [
        R + "2026-12-07-near-share/reproduce.json",
        R + "2026-12-08-near-share-sinkwindow/sinkwindow/reproduce.json",
    ]
    given = [x for f in froms for x in ("--from", str(EXPERIMENTS.parent / f))]
    assert reproduce.main(["merge", *given, "--out-dir", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "quality_summary.json").read_text())
    assert {**again, "command": ""} == {**json.loads((probe / "quality_summary.json").read_text()), "command": ""}

    paired = {p["length"]: [round(100 * p[k], 1) for k in ("diff_vs_full", "diff_ci_low", "diff_ci_high")]
              for p in again["paired"] if p["variant"] == "hybrid_sinkwindow"}  # fmt: skip
    assert paired == {2048: [1.5, -0.7, 3.8], 4096: [0.2, -1.8, 2.3], 8192: [-0.5, -3.2, 2.2],
                      16384: [-2.0, -4.5, 0.4], 32768: [-4.0, -6.6, -1.5]}  # fmt: skip  # the target: not met at 32K
    far = (8192, 16384, 32768)
    hybrid, full = (merged["outcomes"][v] for v in ("hybrid_sinkwindow", "full"))
    pooled = [[c == "1" for t in TASKS for n in far for c in o[f"{t}@{n}"]] for o in (hybrid, full)]
    d = paired_difference(*pooled)
    assert [round(100 * x, 1) for x in (d.diff, d.ci_low, d.ci_high)] == [-2.2, -3.6, -0.7]  # rule 3: >= -6.8

    near = _committed_near(probe / "sinkwindow")
    assert near["settings"]["windows"] == [1024]
    counts, diffs = _near_chains_against_the_near_question_probe(near, "hybrid_sinkwindow")
    assert counts == [80, 44]  # rule 2: 100% >= 95%, against 55.0%
    assert diffs == [[45.0, 33.6, 55.9], [27.9, 22.4, 33.9]]
    assert {r["accuracy"] for r in near["rows"]} == {1.0}  # both views, both tasks, every length

    counted = [sum(hybrid[f"{t}@{n}"].count("1") for n in far) for t in ("variable_tracking", "parcel_weight")]
    assert counted == [224, 109]
    assert _held_out_by_distance(hybrid) == [180, 45, 10, 1, 0]


def test_needle_depths_place_each_needle_where_the_built_prompt_has_it(reproduce):
    """`tasks.needle_depths`, recomputed from the seed without the haystack (what `reproduce.py distance` reads),
    gives the depths `build_items` drew with the haystack's words, and (1 - depth)(n - answer_room) is each such
    needle's distance from the end of the built prompt to within the prompt's template, needles and question."""
    from reproduction.tasks import _rng, _spec, build_items, needle_depths

    tokenizer, pool = _source_tokenizer()
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    per_task, room, seed = 5, 32, 3
    items = build_items(tokenizer, pool, words, (1024, 4096), per_task, room, seed=seed)
    checked = 0
    for it in items:
        depths = needle_depths(it.task, seed, it.length, it.index, per_task)
        needles, drawn, *_ = _spec(it.task, _rng(seed, it.task, it.length, it.index), it.depth, words)
        assert depths == drawn[: len(depths)]  # a chain's three; the asked needle first in the other tasks
        for needle, depth in zip(needles, depths, strict=False):
            ids = tokenizer(needle, add_special_tokens=False)["input_ids"]
            starts = [k for k in range(len(it.input_ids)) if it.input_ids[k : k + len(ids)] == ids]
            assert len(starts) == 1
            distance = len(it.input_ids) - starts[0]
            assert abs((1 - depth) * (it.length - room) - distance) <= 120  # this tokenizer's fixed parts: < 120
            checked += 1
    assert checked == 5 * 2 * per_task + 2 * 2 * per_task  # one needle a prompt, a chain's two more
    with pytest.raises(ValueError, match="prompt index 5 out of range: 5 prompts per task"):
        needle_depths("niah", seed, 1024, 5, per_task)
    with pytest.raises(ValueError, match="unknown task 'kv_lookup'"):
        needle_depths("kv_lookup", seed, 1024, 0, per_task)


DISTANCE = EXPERIMENTS / "results" / "distance"


@pytest.mark.parametrize(
    "folder", ["recorded", "near-share", "layouts", "deeper-model", "wider-window", "longer-chains", "record-facts"]
)
def test_the_distance_analyses_rebuild_from_their_recorded_commands(reproduce, tmp_path, folder):
    """Each committed `distance` analysis is what its recorded command makes of the committed reports."""
    committed = json.loads((DISTANCE / folder / "distance.json").read_text())
    args = committed["command"].split()
    assert args[:3] == ["python", "experiments/reproduce.py", "distance"]
    assert args[-2:] == ["--out-dir", f"experiments/results/distance/{folder}"]
    given = [str(EXPERIMENTS.parent / a) if a.endswith(".json") else a for a in args[2:-2]]
    assert reproduce.main([*given, "--out-dir", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "distance.json").read_text())
    assert {**again, "command": ""} == {**committed, "command": ""}
    assert (tmp_path / "distance.md").read_text() == (DISTANCE / folder / "distance.md").read_text()


def _chains_by_hops(files: list[str], variant: str, window: int = 1024) -> dict[str, list[int]]:
    """Counted here on their own, from the committed outcomes: for the chains at 8K-32K with no hop longer than
    `window`, one, and two or more, how many pairs (prompts x runs), answered only by full attention, and only by
    `variant`; hops from `_spec`'s depths, the question at depth 1, a length-n prompt n - 32 tokens."""
    from reproduction.tasks import _rng, _spec

    counts = {"0": [0, 0, 0], "1": [0, 0, 0], ">= 2": [0, 0, 0]}
    for f in files:
        outcomes = json.loads((EXPERIMENTS / "results" / f).read_text())["outcomes"]
        for n in (8192, 16384, 32768):
            key = f"variable_tracking@{n}"
            for i, (h, full) in enumerate(zip(outcomes[variant][key], outcomes["full"][key], strict=True)):
                _, depths, *_ = _spec("variable_tracking", _rng(0, "variable_tracking", n, i), i / 79, [])
                at = [*depths, 1.0]
                long = sum((at[k + 1] - at[k]) * (n - 32) > window for k in range(3))
                c = counts[str(long) if long < 2 else ">= 2"]
                c[0] += 1
                c[1] += full == "1" and h == "0"
                c[2] += h == "1" and full == "0"
    return counts


def _points(row: dict) -> list[float]:
    return [round(100 * row[k], 1) for k in ("diff", "ci_low", "ci_high")]


def test_within_a_length_the_hybrids_lose_chains_whatever_their_hops(reproduce):
    """The numbers the distance analysis's RUN.md quotes: over the recorded recipe's training runs, both hybrids lose
    variable chains at 8K-32K in every class of hops beyond their window, and within each length those with two or
    more long hops no more than the others; the pair counts agree with a count made here on its own; at 32K the
    chains with no long hop are lost most; single facts at 8K-32K; the analysis finds a missing reach where there is
    one (all layers sparse, StreamingLLM)."""
    summary = json.loads((DISTANCE / "recorded" / "distance.json").read_text())
    assert summary["far_lengths"] == [8192, 16384, 32768]
    runs = ["runs/3485a18_main.json", *(f"replicas/replica{k}/reproduce.json" for k in (1, 2, 3))]
    quoted = {  # variant: (its runs, all chains at >= 8K, the contrast within lengths, all chains in each run)
        "hybrid_sinkwindow": (runs, [-8.3, -11.2, -5.5], [4.0, -2.6, 10.6], [-10.8, -4.2, -12.9, -5.4]),
        "hybrid_blocksparse": (runs[:3], [-7.4, -10.3, -4.6], [-0.4, -6.8, 6.3], [-4.6, -4.2, -13.3]),
    }
    for v, (files, chains, contrast, each) in quoted.items():
        result = summary["variants"][v]
        assert result["window"] == 1024 and result["runs"] == list(range(1, len(files) + 1))
        rows = {r["hops_beyond"]: r for r in result["chains"]["far"]}
        assert _points(rows["any"]) == chains and _points(result["contrast"]) == contrast
        assert result["contrast"]["lengths"] == [8192, 16384, 32768]
        assert [round(100 * r["any"], 1) for r in result["per_run"]] == each
        counted = {k: [rows[k][x] for x in ("n", "only_full", "only_variant")] for k in ("0", "1", ">= 2")}
        assert counted == _chains_by_hops(files, v)
    chains_of = {v: summary["variants"][v]["chains"] for v in quoted}
    by_length = {v: [round(100 * next(r for r in c[str(n)] if r["hops_beyond"] == "any")["diff"], 1)
                     for n in (2048, 4096, 8192, 16384, 32768)] for v, c in chains_of.items()}  # fmt: skip
    assert by_length == {"hybrid_sinkwindow": [4.1, 1.9, -5.3, -6.6, -13.1],
                         "hybrid_blocksparse": [2.5, 0.0, -4.2, -5.0, -12.9]}  # fmt: skip
    sw = {r["hops_beyond"]: r for r in summary["variants"]["hybrid_sinkwindow"]["chains"]["far"]}
    assert [_points(sw[k]) for k in ("0", "1", ">= 2")] == [[-12.1, -21.4, -3.6], [-6.8, -12.5, -1.7],
                                                            [-7.9, -11.5, -4.8]]  # fmt: skip
    at_32k = {v: {r["hops_beyond"]: r for r in summary["variants"][v]["chains"]["32768"]}["0"] for v in quoted}
    assert {v: [r["n"], r["only_full"], r["only_variant"]] for v, r in at_32k.items()} == {
        "hybrid_sinkwindow": [24, 12, 0], "hybrid_blocksparse": [18, 8, 0]}  # fmt: skip
    exact = [r["any"] for r in summary["variants"]["hybrid_sinkwindow"]["per_run"]]
    pairs = [100 * (x + y) / 2 for x, y in itertools.combinations(exact, 2)]  # two runs pooled, as rule 2 reads them
    assert (round(min(pairs), 1), round(max(pairs), 1)) == (-11.9, -4.8)

    facts = summary["variants"]["hybrid_sinkwindow"]["facts"]
    far = {t: [sum(c[k] for c in cells if c["length"] >= 8192) for k in ("variant", "full", "n")]
           for t, cells in facts.items()}  # fmt: skip
    assert far["passkey"] == [949, 954, 960] and far["niah"] == [946, 948, 960]
    assert far["niah_multikey"] == [943, 945, 960]
    held = {(c["length"], c["distance"][0]): [c["variant"], c["full"], c["n"]] for c in facts["parcel_weight"]}
    assert [sum(x[k] for (n, _), x in held.items() if n == length) for length in (8192, 16384, 32768)
            for k in (0, 1)] == [138, 144, 79, 109, 28, 41]  # fmt: skip
    assert held[(16384, 1024)] == [5, 17, 20] and held[(16384, 8192)] == [6, 21, 160]
    assert held[(32768, 16384)] == [0, 0, 160]

    layouts = json.loads((DISTANCE / "layouts" / "distance.json").read_text())["variants"]
    reach = {v: _points(layouts[v]["contrast"])[0] for v in ("all_sparse", "streaming_llm", "frontier_0.167",
                                                             "frontier_0.25")}  # fmt: skip
    assert reach == {"all_sparse": -8.5, "streaming_llm": -21.8, "frontier_0.167": -10.1, "frontier_0.25": -8.8}
    retrieving = ("hybrid_sinkwindow", "hybrid_blocksparse", "hybrid_auto", "hybrid_interleave",
                  "hybrid_blocksparse_sink", "frontier_0.5")  # fmt: skip
    assert (min(_points(layouts[v]["contrast"])[0] for v in retrieving),
            max(_points(layouts[v]["contrast"])[0] for v in retrieving)) == (2.5, 9.5)  # fmt: skip


def test_distance_pools_runs_against_their_full_attention_and_refuses_what_does_not_fit(reproduce, tmp_path, capsys):
    """A run that differs from run 1 only in a sparse pattern's settings borrows run 1's full attention, as compare
    does; a variant with another local window in some run, runs that asked other prompts, no full attention, a
    variant no run evaluated and a missing task are refused with what is wrong."""
    saved = json.loads(MAIN_RUN.read_text())
    sink = json.loads(json.dumps(saved))
    sink["settings"]["sink"] = 128  # another sparse-pattern setting, the same local window
    del sink["outcomes"]["full"], sink["variants"]["full"]
    wider = {**json.loads(json.dumps(sink)), "settings": {**sink["settings"], "window": 2048}}
    seeded = {**json.loads(json.dumps(saved)), "settings": {**saved["settings"], "seed": 1}}
    lacking = json.loads(json.dumps(saved))
    del lacking["outcomes"]["hybrid_sinkwindow"]["parcel_weight@4096"]
    paths = {}
    for name, run in (("main", saved), ("sink", sink), ("wider", wider), ("seeded", seeded), ("lacking", lacking)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(run))

    def distance(*names: str, variant: str | None = None) -> int:
        froms = [x for n in names for x in ("--from", str(paths[n]))]
        picked = ["--variant", variant] if variant else []
        return reproduce.main(["distance", *froms, *picked, "--out-dir", str(tmp_path / "out")])

    assert distance("main", "sink", variant="hybrid_sinkwindow") == 0
    result = json.loads((tmp_path / "out" / "distance.json").read_text())
    assert list(result["variants"]) == ["hybrid_sinkwindow"]
    sw = result["variants"]["hybrid_sinkwindow"]
    assert sw["runs"] == [1, 2] and sw["full_of_runs"] == [1, 1]
    one = {r["hops_beyond"]: r for r in sw["chains"]["all"]}
    assert distance("main", variant="hybrid_sinkwindow") == 0
    alone = {r["hops_beyond"]: r for r in json.loads((tmp_path / "out" / "distance.json").read_text())["variants"][
        "hybrid_sinkwindow"]["chains"]["all"]}  # fmt: skip
    for k, r in one.items():  # the same run twice: twice the pairs, the same difference
        assert (r["n"], r["only_full"], r["diff"]) == (2 * alone[k]["n"], 2 * alone[k]["only_full"], alone[k]["diff"])
    capsys.readouterr()
    refusals = {
        ("main", "wider"): "hybrid_sinkwindow has a local window of 2048 tokens in run 2 and 1024 in run 1",
        ("main", "seeded"): "run 2 (commit 3485a18) asked other prompts than run 1: they differ in seed; runs are "
        "pooled on the same prompts",
        ("sink", "main"): "every run needs full attention to measure against",
        ("lacking",): "run 1 did not evaluate hybrid_sinkwindow on parcel_weight@4096",
    }
    for names, message in refusals.items():
        assert distance(*names) == 2
        assert message in capsys.readouterr().err
    assert distance("main", "wider", variant="hybrid_blocksparse") == 0  # BlockSparse reads no window
    assert distance("main", variant="hybrid_nosink") == 2
    assert "--variant hybrid_nosink: no run evaluated it besides full attention" in capsys.readouterr().err
    assert distance("main", variant="full") == 2
    assert "--variant full: full attention is what every variant is measured against" in capsys.readouterr().err

    # a difference of lengths alone: the hybrid wrong on every chain at 32K and as full attention elsewhere. Pooled
    # over lengths the chains with two or more long hops (mostly at 32K) look worse; within each length they are not
    outcomes = json.loads(json.dumps(saved))["outcomes"]
    for n in (2048, 4096, 8192, 16384, 32768):
        key = f"variable_tracking@{n}"
        outcomes["full"][key] = "1" * 80 if n == 32768 else outcomes["full"][key]
        outcomes["hybrid_sinkwindow"][key] = "0" * 80 if n == 32768 else outcomes["full"][key]
    paths["length"] = tmp_path / "length.json"
    paths["length"].write_text(json.dumps({**saved, "outcomes": outcomes}))
    assert distance("length", variant="hybrid_sinkwindow") == 0
    sw = json.loads((tmp_path / "out" / "distance.json").read_text())["variants"]["hybrid_sinkwindow"]
    pooled = {r["hops_beyond"]: r["diff"] for r in sw["chains"]["all"]}
    assert pooled[">= 2"] < pooled["<= 1"] - 0.2
    assert [sw["contrast"][k] for k in ("diff", "ci_low", "ci_high")] == [0.0, 0.0, 0.0]
    at_32k = {r["hops_beyond"]: r["diff"] for r in sw["chains"]["32768"]}
    assert at_32k["<= 1"] == at_32k[">= 2"] == -1.0


def test_the_distance_run_md_quotes_its_analyses(reproduce):
    """The chains table of the distance RUN.md is what the committed analyses hold at 8K-32K."""
    text = (DISTANCE / "RUN.md").read_text()

    def pts(r: dict) -> str:
        return " ".join(f"{100 * r[k]:+.1f}" for k in ("diff", "ci_low", "ci_high")).replace("-", "−")

    folders = {"recorded recipe": "recorded", "near-share data": "near-share", "wider window": "wider-window",
               "18-layer model": "deeper-model", "longer chains": "longer-chains",
               "`record` facts": "record-facts"}  # fmt: skip
    quoted = 0
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 8 or cells[0].split(",")[0] not in folders:
            continue
        folder = folders[cells[0].split(",")[0]]
        variant = "hybrid_blocksparse" if cells[1].startswith("BlockSparse") else "hybrid_sinkwindow"
        result = json.loads((DISTANCE / folder / "distance.json").read_text())["variants"][variant]
        rows = {r["hops_beyond"]: r for r in result["chains"]["far"]}
        runs = len(result["runs"])
        assert cells[1].endswith(f"({result['window']:,})") and cells[0].endswith(f"{runs} run{'s' * (runs > 1)}")
        for cell, row in zip(cells[2:7], (rows["any"], rows["0"], rows["1"], rows[">= 2"], result["contrast"]),
                             strict=True):  # fmt: skip
            numbers = re.sub(r"[(),*]", " ", cell.split("), ")[0] + ")").split()
            assert " ".join(numbers[:3]) == pts(row), (cell, row)
            if "n" in row:
                assert cell.endswith((f", {row['n']:,}", f", {row['n']:,} pairs"))
        each = [f"{100 * r['any']:+.1f}".replace("-", "−") for r in result["per_run"]]
        assert cells[7] == (", ".join(each) if len(each) > 1 else "")
        quoted += 1
    assert quoted == 7


def test_the_distance_run_md_plans_its_candidate_as_quoted(reproduce, tmp_path, capsys):
    """The candidate the distance RUN.md writes rules for: its first command is a valid recipe, planned at the
    minutes quoted; the second differs from it only in the extension replica and the output folder."""
    text = (DISTANCE / "RUN.md").read_text()
    block = re.search(r"```bash\n(  python3 experiments/reproduce.py all .*?)```", text, re.S).group(1)
    commands = [c.split() for c in block.replace("\\\n", " ").splitlines() if c.strip()][:2]
    first, second = ([str(tmp_path) if a == "W" else a.replace("W/", f"{tmp_path}/") for a in c[2:]] for c in commands)
    assert reproduce.main(["plan", *first[1:]]) == 0
    assert "finished: 0/8 stages; next: prepare; ~14.7 min of planned work left" in capsys.readouterr().out
    assert "14.7 minutes of work" in " ".join(text.split())
    extra = [a for a in second if a not in first]
    assert extra == ["--extend-replica", "1", f"{tmp_path}/results_rn1"]


def test_the_training_chain_check_finds_every_chain_of_a_synthetic_document():
    """`retrieval_data_check.document_chains` (the training chains' hops that the distance RUN.md quotes) finds each
    variable chain `retrieval_document` states, value first and its question last, in token order; the evaluation's
    chains with two or more long hops are those `distance` counts."""
    import random

    sys.path.insert(0, str(EXPERIMENTS))
    try:
        import retrieval_data_check as check
    finally:
        sys.path.remove(str(EXPERIMENTS))
    from longgen.train.synthetic import retrieval_document

    tokenizer, _ = _source_tokenizer()
    texts = [p.read_text() for p in sorted((EXPERIMENTS.parent / "src" / "longgen").rglob("*.py"))[:30]]
    rng = random.Random(0)
    found = 0
    for tokens in (2048, 8192):
        doc = retrieval_document(rng, texts, tokens, 3.0, 3.0, kinds=("variable_tracking",))
        starts = [s for s, _ in tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
        chains = check.document_chains(doc, starts)
        assert len(chains) == round(tokens * 3 / 1024)  # every fact a chain, each found
        for places in chains:
            assert 3 <= len(places) <= 5 and places == sorted(places)  # 2-4 names and the question
            assert doc[starts[places[0]] :].lstrip().startswith(("VAR", "Let"))
            assert doc[starts[places[-1]] :].lstrip().startswith(("What is the value", "Question:"))
        found += len(chains)
    assert found == 6 + 24
    evaluation = check.evaluation_chains(1024)
    recorded = json.loads((DISTANCE / "recorded" / "distance.json").read_text())["variants"]["hybrid_sinkwindow"]
    rows = {r["hops_beyond"]: r for r in recorded["chains"]["all"]}
    assert sum(e["two_or_more"] for e in evaluation.values()) * 4 == rows[">= 2"]["n"]  # four runs
    assert evaluation["32768"] == {"chains": 80, "two_or_more": 68}
    committed = json.loads((DISTANCE / "training_chains.json").read_text())
    assert committed["evaluation"] == evaluation and committed["window"] == 1024 and committed["documents"] == 100
    three = {r: committed["training"][r]["3 names"] for r in ("recorded", "near_share_0.125")}
    assert {r: (x["chains"], round(100 * x["share_two_or_more"], 1)) for r, x in three.items()} == {
        "recorded": (1484, 91.1), "near_share_0.125": (1486, 79.5)}  # fmt: skip
    for x in three.values():
        assert sum(x["by_long_hops"].values()) == x["chains"]
    assert [three[r]["by_long_hops"]["0"] for r in three] == [1, 119]  # no hop beyond the window
