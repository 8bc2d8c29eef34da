"""The command line, run as users run it (a real subprocess of the installed entry point)."""

import subprocess
import sys

import longgen


def run(*args):
    return subprocess.run([sys.executable, "-m", "longgen", *args], capture_output=True, text=True, timeout=300)


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


def test_bad_argument_is_a_clear_error():
    r = run("patterns", "--block-size", "48")
    assert r.returncode == 2
    assert "power of two" in r.stderr
    r = run("patterns", "--kv-heads", "0")
    assert r.returncode == 2 and "positive integer" in r.stderr
