"""The command line, run as users run it (a real subprocess of the installed entry point)."""

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import longgen


def run(*args):
    return subprocess.run([sys.executable, "-m", "longgen", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_help_and_version():
    r = run("--help")
    assert r.returncode == 0 and "patterns" in r.stdout
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"longgen {longgen.__version__}"


def test_patterns_command_reports_each_pattern():
    r = run("patterns", "--seq-len", "8192", "--kv-heads", "4", "--window", "256", "--run-len", "512")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for name in ("full", "sink_window", "block_sparse"):
        assert sum(line.split()[:1] == [name] for line in lines) == 2, name  # table row + run row
    assert "stride=4" in r.stdout


@pytest.mark.slow
def test_bad_argument_is_a_clear_error():
    r = run("patterns", "--block-size", "48")
    assert r.returncode == 2
    assert "power of two" in r.stderr
    r = run("patterns", "--kv-heads", "0")
    assert r.returncode == 2 and "positive integer" in r.stderr


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """A tiny converted hybrid with its tokenizer (a WordLevel vocabulary w0..w126)."""
    from longgen.model import convert_checkpoint
    from test_model import make_checkpoint

    root = tmp_path_factory.mktemp("cli")
    make_checkpoint(root / "src")
    convert_checkpoint(root / "src", root / "hybrid", pattern=longgen.SinkWindow(2, 8), progress=False)
    return root / "hybrid"


def one_line_error(r, *needles):
    """The command failed with exit code 2 and one line on stderr holding every needle (no traceback)."""
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_damaged_model_folders_are_one_line_errors(hybrid, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(hybrid, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    r = run("generate", str(damaged), "--prompt", "w1 w2", "--max-new-tokens", "2", "--device", "cpu")
    one_line_error(r, "longgen generate: error:", str(weights), "damaged or incomplete")
    r = run("serve", str(damaged), "--port", str(free_port()), "--device", "cpu")
    one_line_error(r, "longgen serve: error:", str(weights), "damaged or incomplete")

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(hybrid, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    r = run("generate", str(no_tokenizer), "--prompt", "w1 w2", "--max-new-tokens", "2", "--device", "cpu")
    one_line_error(r, str(no_tokenizer), "no tokenizer files", "tokenizer.json")

    r = run("inspect", str(tmp_path / "nope"))
    one_line_error(r, "longgen inspect: error: no model folder at", str(tmp_path / "nope"))


def test_serve_on_a_busy_port_fails_before_loading_the_model(hybrid, tmp_path):
    damaged = tmp_path / "damaged"  # were the model loaded first, its damaged weights would be the error
    shutil.copytree(hybrid, damaged)
    (damaged / "model.safetensors").write_bytes(b"")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run("serve", str(damaged), "--port", str(port), "--device", "cpu")
    one_line_error(r, f"cannot listen on 127.0.0.1:{port}", "--port")


@pytest.mark.slow
def test_argument_errors_say_what_is_allowed_not_internal_names(hybrid):
    for args in (["patterns", "--kv-heads", "abc"], ["eval", "passkey", str(hybrid), "--samples", "abc"]):
        r = run(*args)
        assert r.returncode == 2 and "must be a positive integer, got 'abc'" in r.stderr, r.stderr
        assert "_positive" not in r.stderr
    r = run("generate", str(hybrid), "--prompt", "w1", "--top-p", "0", "--device", "cpu")
    one_line_error(r, "top_p must be in (0, 1]", "got 0.0")
    r = run("generate", str(hybrid), "--prompt", "w1", "--temperature", "-1", "--device", "cpu")
    one_line_error(r, "temperature must be >= 0", "got -1.0")


def test_the_demo_folder_is_git_ignored():
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "check-ignore", "-q", "longgen-demo/models/init"], cwd=root)
    assert r.returncode == 0, "longgen demo writes its default --out-dir longgen-demo/ (models: >100 MB) into the clone"
