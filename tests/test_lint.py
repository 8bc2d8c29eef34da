"""The code base stays ruff clean (pyproject.toml holds the rules)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is installed with the [test] extra")
def test_ruff_clean():
    dirs = [d for d in ("src", "tests", "benchmarks", "experiments") if (ROOT / d).is_dir()]
    r = subprocess.run(["ruff", "check", *dirs], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
