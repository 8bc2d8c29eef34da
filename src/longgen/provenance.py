"""What a result says about the run that made it: the commit of the code, and the machine."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository, for a source checkout (src/longgen/...)


def git_commit(root: Path = ROOT) -> str:
    """HEAD of the repository at `root`, with "+changes" when tracked files differ from it; without a repository
    there (an installed package, or a copy of the tree without .git as on a GPU machine) the LONGGEN_COMMIT
    environment variable, else "unknown"."""

    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()
        except OSError:  # no git on this machine, or no such folder
            return ""

    head = run("rev-parse", "--short=12", "HEAD") if (root / ".git").exists() else ""
    if not head:
        return os.environ.get("LONGGEN_COMMIT", "unknown")
    return head + ("+changes" if run("status", "--porcelain", "--untracked-files=no") else "")


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), its cores, and the threads torch uses."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, torch using {torch.get_num_threads()} threads"
