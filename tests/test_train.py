"""The training loop on CPU: loss goes down, FSDP2 over 2 gloo processes equals 1 process, kill-and-resume,
checkpoints, non-finite loss, config errors. Real tiny models, a real tokenizer and a real corpus."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import bpe_tokenizer, losses, run_cli, save_tiny_models, weights, write_toml
from helpers import train_config as config
from longgen.train import NonFiniteLossError, load_config, train
from longgen.train.checkpoint import latest_checkpoint, list_checkpoints
from longgen.train.loss import CausalLMLoss


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A corpus of real documents (the json package's sources), a BPE tokenizer, a hybrid and a plain model."""

    root = tmp_path_factory.mktemp("train")
    corpus = root / "corpus"
    shutil.copytree(Path(json.__file__).parent, corpus, ignore=shutil.ignore_patterns("__pycache__"))
    texts = [p.read_text() for p in sorted(corpus.rglob("*.py"))]
    save_tiny_models(root, bpe_tokenizer(texts), max_len=128, target_length=256, rope="ntk")
    return root


def test_loss_goes_down_on_a_real_corpus(workspace, tmp_path):
    cfg = load_config(
        raw=config(workspace, tmp_path / "run", train__steps=30, train__batch_size=4, train__save_every=30)
    )
    final = train(cfg)
    ls = losses(tmp_path / "run")
    assert len(ls) == 30 and all(map(torch.isfinite, torch.tensor(ls)))
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.3, ls  # about 5.9 -> 5.4 in 30 steps
    import longgen

    m = longgen.load_model(final)  # the export is a hybrid folder load_model opens
    assert m.config.longgen["layers"][1] == "full_attention"


@pytest.mark.slow
def test_compiled_layers_train_like_eager_ones(workspace, tmp_path):
    """`model.compile` (torch.compile per decoder layer; attention runs between the compiled graphs) with
    activation checkpointing gives the eager run's losses, in one process and under FSDP2 over 2 processes."""
    over = dict(model__activation_checkpointing=True, train__steps=3, train__save_every=3)
    train(load_config(raw=config(workspace, tmp_path / "eager", model__compile=False, **over)))
    train(load_config(raw=config(workspace, tmp_path / "compiled", model__compile=True, **over)))
    two = write_toml(
        tmp_path / "two.toml",
        config(workspace, tmp_path / "two", model__compile=True, train__batch_size=1, **over),
    )
    r = run_cli([str(two)], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    eager = torch.tensor(losses(tmp_path / "eager"))
    assert len(eager) == 3
    for run in ("compiled", "two"):
        torch.testing.assert_close(torch.tensor(losses(tmp_path / run)), eager, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_layers_share_a_few_graphs_whatever_the_depth(tmp_path):
    """Compiling each decoder layer of a 12-layer hybrid (full and SinkWindow layers) makes a few graphs for all of
    them, not graphs per layer: the layers run the same code, attention runs between the graphs, so a compiled
    run's warm-up does not grow with depth and no layer falls back to eager at the recompile limit."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    import longgen
    from longgen.train.loop import load_training_model

    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=12,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    longgen.convert(model, pattern=longgen.SinkWindow(4, 32))
    model.save_pretrained(tmp_path / "hybrid")
    compiled, _ = load_training_model(tmp_path / "hybrid", "cpu", compile=True)
    torch._dynamo.reset()
    counters.clear()
    x = torch.randint(0, 256, (1, 128), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        compiled(input_ids=x, labels=x).loss.backward()
    assert 1 <= counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])


def test_chunked_loss_equals_transformers_loss(workspace):
    import longgen

    m = longgen.load_model(workspace / "hybrid").eval()
    x = torch.randint(0, 400, (2, 100), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(100).expand(2, 100)
    with torch.no_grad():
        total, n = CausalLMLoss(m, chunk=7)(x, pos, x)
        ref = m(x, labels=x).loss
    torch.testing.assert_close(total / n, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_two_process_fsdp_equals_one_process(workspace, tmp_path):
    one = write_toml(tmp_path / "one.toml", config(workspace, tmp_path / "one", train__steps=3))
    two = write_toml(tmp_path / "two.toml", config(workspace, tmp_path / "two", train__steps=3, train__batch_size=1))
    r1 = run_cli([str(one)])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_cli([str(two)], nproc=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    torch.testing.assert_close(
        torch.tensor(losses(tmp_path / "two")), torch.tensor(losses(tmp_path / "one")), rtol=1e-4, atol=1e-5
    )
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_multi_process_run_ends_without_the_interpreters_shutdown(workspace, tmp_path):
    """gloo's threads outlive `destroy_process_group` and could abort a finished run during the interpreter's
    shutdown, so each rank of `longgen train` under torchrun leaves without it (an atexit handler never runs), its
    output written and its exit code kept."""

    def run(name: str, launch: list[str]) -> subprocess.CompletedProcess:
        raw = config(workspace, tmp_path / name, train__steps=1, train__batch_size=1)
        code = (
            "import atexit, sys; from longgen.cli import main; "
            "atexit.register(lambda: print('interpreter shutdown ran', flush=True)); "
            f"sys.exit(main(['train', {str(write_toml(tmp_path / f'{name}.toml', raw))!r}]))"
        )
        env = dict(os.environ, OMP_NUM_THREADS="1")
        return subprocess.run([*launch, sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                              env=env)  # fmt: skip

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python"]
    two = run("two", torchrun)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count(f"done: {tmp_path / 'two' / 'final'}") == 2, two.stdout[-3000:]
    assert "interpreter shutdown ran" not in two.stdout
    one = run("one", [])  # one process ends as usual
    assert one.returncode == 0 and "interpreter shutdown ran" in one.stdout, one.stderr[-3000:]


@pytest.mark.slow
def test_kill_and_resume_ends_with_the_same_weights(workspace, tmp_path):
    steps = dict(train__steps=7, train__save_every=2)
    full = write_toml(tmp_path / "full.toml", config(workspace, tmp_path / "full", **steps))
    cut = write_toml(tmp_path / "cut.toml", config(workspace, tmp_path / "cut", **steps))
    assert run_cli([str(full)]).returncode == 0
    killed = run_cli([str(cut)], env_extra={"LONGGEN_FAULT_KILL_AFTER_STEP": "5"})
    assert killed.returncode == -9  # SIGKILL after step 5: the step-4 checkpoint is the last one
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [2, 4]
    assert not (tmp_path / "cut" / "final").exists()
    resumed = run_cli([str(cut), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, 8)
    )
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"), rel=1e-6)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(workspace, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = CausalLMLoss.forward

    def poisoned(self, *a):
        calls["n"] += 1
        total, n = real(self, *a)
        return (total * float("nan") if calls["n"] >= 3 else total), n

    monkeypatch.setattr(CausalLMLoss, "forward", poisoned)
    cfg = load_config(raw=config(workspace, tmp_path / "nan", train__steps=6))
    with pytest.raises(NonFiniteLossError, match=r"at step 3.*step-00000002"):
        train(cfg)
    assert [s for s, _ in list_checkpoints(tmp_path / "nan")] == [2]


def test_checkpoints_are_atomic_and_pruned(workspace, tmp_path):
    out = tmp_path / "ck"
    train(load_config(raw=config(workspace, out, train__steps=6, train__keep_checkpoints=2)))
    assert [s for s, _ in list_checkpoints(out)] == [4, 6]
    (out / "checkpoints" / ".step-00000099.tmp").mkdir()  # a write that was killed midway
    assert latest_checkpoint(out).name == "step-00000006"


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.steps=0", "train.steps must be >= 1"),
        ("train.stepz=5", r"unknown keys in \[train\]"),
        ("model.dtype='fp8'", "model.dtype must be one of"),
        ("optim.lr=-1.0", "optim.lr must be > 0"),
        ("optim.schedule='linear'", "optim.schedule must be one of"),
        ("data.sources=['/nonexistent/corpus']", "/nonexistent/corpus"),
        ("model.path='/nonexistent/model'", "not a Hugging Face model folder"),
        ("train.batch_size='two'", "train.batch_size must be an integer, got 'two'"),
        ("optim.lr='high'", "optim.lr must be a number"),
        ("train.resume=1", "train.resume must be true or false"),
        ("nosection.x=1", "unknown config section"),
    ],
)
def test_bad_config_values_are_clear_errors_before_any_work(workspace, tmp_path, override, match):
    path = write_toml(tmp_path / "c.toml", config(workspace, tmp_path / "bad"))
    with pytest.raises(ValueError, match=match):
        load_config(path, [override])


def test_a_config_file_with_a_syntax_error_is_named(workspace, tmp_path):
    path = write_toml(tmp_path / "c.toml", config(workspace, tmp_path / "bad"))
    path.write_text(path.read_text().replace("steps = 6", "steps = = 6"))
    with pytest.raises(ValueError, match=rf"config file {re.escape(str(path))} is not valid TOML: .*line"):
        load_config(path)
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("train: [unclosed\n")
    with pytest.raises(ValueError, match=rf"config file {re.escape(str(yaml_path))} is not valid YAML"):
        load_config(yaml_path)


def test_cli_reports_config_errors_before_any_work(workspace, tmp_path):
    path = write_toml(tmp_path / "c.toml", config(workspace, tmp_path / "bad"))
    r = run_cli([str(path), "data.sources=['/nonexistent/corpus']"])
    assert r.returncode == 2 and "/nonexistent/corpus" in r.stderr
    assert not (tmp_path / "bad").exists()  # nothing started


@pytest.mark.parametrize("flush", [True, False])
def test_training_counts_subnormals_as_zero_only_while_it_runs(workspace, tmp_path, monkeypatch, flush):
    """`train.flush_denormals` (the default): on a CPU every step runs with subnormal floats counted as zero, and
    the process's own setting is back afterwards; off, nothing changes."""
    from longgen.train.loop import flushing_denormals

    seen, forward = [], CausalLMLoss.forward

    def recording(self, *args, **kwargs):
        seen.append(flushing_denormals())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CausalLMLoss, "forward", recording)
    assert not flushing_denormals()
    train(load_config(raw=config(workspace, tmp_path / "run", train__steps=2, train__flush_denormals=flush)))
    assert len(seen) == 2 and all(s == flush for s in seen)
    assert not flushing_denormals()


def test_flush_denormals_restores_the_setting_it_found():
    from longgen.train.loop import flush_denormals, flushing_denormals

    try:
        for before in (False, True):
            torch.set_flush_denormal(before)
            with flush_denormals():
                assert flushing_denormals() and float(torch.tensor([1e-39]).mul(1.0)[0]) == 0.0
            assert flushing_denormals() == before
            with flush_denormals(False):
                assert flushing_denormals() == before
    finally:
        torch.set_flush_denormal(False)
    assert float(torch.tensor([1e-39]).mul(1.0)[0]) > 0.0


def test_plain_model_baseline_trains_and_exports_as_plain(workspace, tmp_path):
    final = train(
        load_config(raw=config(workspace, tmp_path / "base", model__path=str(workspace / "plain"), train__steps=2))
    )
    saved = json.loads((final / "config.json").read_text())
    assert "longgen" not in saved and saved.get("attn_implementation") != "longgen"


def test_grad_accumulation_equals_a_larger_batch(workspace, tmp_path):
    train(load_config(raw=config(workspace, tmp_path / "big", train__steps=2, train__batch_size=2)))
    train(
        load_config(raw=config(workspace, tmp_path / "acc", train__steps=2, train__batch_size=1, train__grad_accum=2))
    )
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "big"), rel=1e-5)
    a, b = weights(tmp_path / "big"), weights(tmp_path / "acc")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_yaml_config_and_shipped_example_configs(workspace, tmp_path):
    import yaml

    raw = config(workspace, tmp_path / "y")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert load_config(tmp_path / "c.yaml").data.seq_len == 128
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("llama2-7b-128k.toml", "tiny-cpu.toml"):  # point the paths at real folders; all else as shipped
        cfg = load_config(
            root / name, [f"model.path='{workspace / 'hybrid'}'", f"data.sources=['{workspace / 'corpus'}']"]
        )
        assert cfg.train.steps > 0
    assert (
        load_config(
            root / "llama2-7b-128k.toml",
            [f"model.path='{workspace / 'hybrid'}'", f"data.sources=['{workspace / 'corpus'}']"],
        ).data.seq_len
        == 131072
    )


def _snapshot(folder):
    """Every file under `folder` with its size and modification time: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def earlier_run(workspace, tmp_path_factory):
    """A finished 4-step run (checkpoints at steps 2 and 4, metrics, final/) to start other runs over."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    train(load_config(raw=config(workspace, out, train__steps=4)))
    return out


def test_fresh_run_into_an_earlier_runs_folder_stops_before_any_work(workspace, earlier_run, tmp_path):
    before = _snapshot(earlier_run)
    path = write_toml(tmp_path / "c.toml", config(workspace, earlier_run, train__steps=2))
    r = run_cli([str(path)])
    assert r.returncode == 2
    message = r.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(earlier_run) in message and "--resume" in message and "--overwrite" in message
    assert "step-00000004" in message and "metrics.jsonl" in message
    assert _snapshot(earlier_run) == before  # metrics not truncated, final/ and checkpoints untouched


def test_overwrite_deletes_the_earlier_run_and_starts_over(workspace, earlier_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(earlier_run, out)
    path = write_toml(tmp_path / "c.toml", config(workspace, out, train__steps=2, train__save_every=5))
    r = run_cli([str(path), "--overwrite"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(out)] == [2]  # the old step-2 and step-4 checkpoints are gone
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "change,match",
    [
        ({"train__steps": 6}, r"train.steps=4, this one has train.steps=6; pass --change-steps"),
        ({"train__steps": 3, "train__change_steps": True}, r"at step 4, past train.steps=3"),
        ({"data__seq_len": 64}, r"belongs to another run: data.seq_len: 128 -> 64"),
        ({"model__path": "plain"}, r"belongs to another run: model.path: .*hybrid -> .*plain"),
        ({"data__sources": "copy"}, r"belongs to another run: data \(sources"),
    ],
)
def test_resume_refuses_a_checkpoint_of_another_run(workspace, earlier_run, tmp_path, change, match):
    before = _snapshot(earlier_run)
    if change.get("model__path") == "plain":
        change["model__path"] = str(workspace / "plain")
    if change.get("data__sources") == "copy":  # the same files elsewhere: other data as far as a run can tell
        shutil.copytree(workspace / "corpus", tmp_path / "corpus")
        change["data__sources"] = [str(tmp_path / "corpus")]
    cfg = load_config(raw=config(workspace, earlier_run, **{"train__steps": 4, "train__resume": True, **change}))
    with pytest.raises(ValueError, match=match):
        train(cfg)
    assert _snapshot(earlier_run) == before


def test_resume_with_change_steps_continues_the_run_to_a_new_total(workspace, earlier_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(earlier_run, out)
    path = write_toml(tmp_path / "c.toml", config(workspace, out, train__steps=6))
    r = run_cli([str(path), "--resume", "--change-steps"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step-00000004 (step 4)" in r.stdout
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))
    assert losses(out)[:4] == losses(earlier_run)


def test_resume_and_overwrite_exclude_each_other(workspace, tmp_path):
    path = write_toml(tmp_path / "c.toml", config(workspace, tmp_path / "run"))
    r = run_cli([str(path), "--resume", "--overwrite"])
    assert r.returncode == 2 and "exclude each other" in r.stderr
    r = run_cli([str(path), "--change-steps"])
    assert r.returncode == 2 and "applies only when resuming" in r.stderr


def _stopped_by(sig, workspace, tmp_path):
    """Start a 1000-step `longgen train` in a subprocess, send it `sig` once step 3 is logged; returns the exit code,
    stdout, stderr and the run's folder."""
    out = tmp_path / "run"
    path = write_toml(tmp_path / "c.toml", config(workspace, out, train__steps=1000, train__save_every=2))
    proc = subprocess.Popen(
        [sys.executable, "-m", "longgen", "train", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal: Python raises Ctrl-C
    )
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, stdout, stderr.strip(), out


def test_ctrl_c_prints_one_line_with_the_step_and_the_last_checkpoint(workspace, tmp_path):
    code, _, stderr, out = _stopped_by(signal.SIGINT, workspace, tmp_path)
    assert code == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    message = stderr.splitlines()[-1]  # the lines before it are the tokenizing and loading progress bars
    step, path = list_checkpoints(out)[-1]
    assert re.fullmatch(
        rf"longgen train: interrupted during step \d+ of 1000; last checkpoint: step {step} "
        rf"\({re.escape(str(path))}\); continue with --resume",
        message,
    ), message


def test_ctrl_c_during_a_checkpoint_save_finishes_the_save_then_stops(workspace, tmp_path, monkeypatch):
    """Ctrl-C while torch.distributed.checkpoint writes (it would wrap the KeyboardInterrupt in a
    CheckpointException: a traceback, exit code 1, a lost checkpoint) is held until the save is done."""
    import longgen.train.loop as loop

    real_save = loop.save_checkpoint

    def save_with_ctrl_c(out, step, *args, **kwargs):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the checkpoint of step 4 is being written
        return real_save(out, step, *args, **kwargs)

    monkeypatch.setattr(loop, "save_checkpoint", save_with_ctrl_c)
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(loop.TrainingInterrupted) as stopped:
        train(load_config(raw=config(workspace, out, train__steps=8)))
    assert stopped.value.exit_code == 130
    assert str(stopped.value) == (
        f"interrupted during step 4 of 8; last checkpoint: step 4 ({list_checkpoints(out)[-1][1]}); continue with "
        "--resume"
    )
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    assert signal.getsignal(signal.SIGINT) is before


def test_request_stop_checkpoints_the_current_step_and_stops(workspace, tmp_path, monkeypatch):
    """`request_stop` (here from inside step 3, as a time limit's signal handler would) does what SIGTERM does: the
    step finishes, a checkpoint of it is written, `TrainingInterrupted` says so with exit code 143; with no
    training loop running it does nothing and says so."""
    import longgen.train.loop as loop
    from longgen.train import request_stop

    assert request_stop() is False
    real_shard, calls, answers = loop.shard_batch, [], []

    def shard_and_ask_to_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the first micro-batch of step 3
            answers.append(request_stop())
        return real_shard(*args, **kwargs)

    monkeypatch.setattr(loop, "shard_batch", shard_and_ask_to_stop)
    out = tmp_path / "run"
    with pytest.raises(loop.TrainingInterrupted) as stopped:
        train(load_config(raw=config(workspace, out, train__steps=8, train__save_every=5)))
    assert answers == [True] and stopped.value.exit_code == 143
    assert [s for s, _ in list_checkpoints(out)] == [3]  # the step it was in, not a save_every multiple
    assert str(stopped.value) == (
        f"stopped by request_stop() after step 3 of 8; wrote checkpoint {list_checkpoints(out)[-1][1]}; continue "
        "with --resume"
    )
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()][-1] == 3
    assert request_stop() is False  # the loop is gone


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_of_the_current_step_and_resume_continues_from_it(workspace, tmp_path):
    code, _, stderr, out = _stopped_by(signal.SIGTERM, workspace, tmp_path)
    assert code == 143
    assert "Traceback" not in stderr, stderr
    assert "torch.distributed is disabled" not in stderr  # one process saving its checkpoint is no news
    message = stderr.splitlines()[-1]
    step = int(
        re.fullmatch(r"longgen train: stopped by SIGTERM after step (\d+) of 1000; wrote checkpoint .*", message)[1]
    )
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step
    assert list_checkpoints(out)[-1][0] == step  # the step it was in, not the last save_every multiple
    assert f"step-{step:08d}" in message
    path = write_toml(tmp_path / "more.toml", config(workspace, out, train__steps=step + 1, train__save_every=2))
    r = run_cli([str(path), "--resume", "--change-steps"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"(step {step})" in r.stdout
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, step + 2))
