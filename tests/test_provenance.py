"""What results record about their run: the commit of the code and the machine."""

import re
import subprocess

from longgen.provenance import ROOT, cpu_name, git_commit


def test_git_commit_of_this_checkout_and_of_a_folder_without_git(tmp_path, monkeypatch):
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        assert git_commit() in (head.stdout.strip(), head.stdout.strip() + "+changes")
        assert re.fullmatch(r"[0-9a-f]{12}(\+changes)?", git_commit())
    monkeypatch.delenv("LONGGEN_COMMIT", raising=False)
    assert git_commit(tmp_path) == "unknown"
    monkeypatch.setenv("LONGGEN_COMMIT", "abc1234")
    assert git_commit(tmp_path) == "abc1234"  # a copy of the tree without .git, e.g. on a GPU machine


def test_cpu_name():
    name = cpu_name()
    assert re.search(r", \d+ cores, torch using \d+ threads$", name), name
