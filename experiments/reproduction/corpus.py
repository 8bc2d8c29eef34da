"""The corpus: Python source and documentation already on the machine.

Nothing is downloaded: the standard library and every site-packages folder hold hundreds of MB of real, long
documents. `select_documents` takes a seeded sample of them (every package contributes) and keeps a few long
ones out of training for evaluation. The synthetic retrieval documents mixed into training are
`longgen.train.synthetic`'s.
"""

from __future__ import annotations

import hashlib
import os
import site
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".py", ".pyi", ".md", ".rst")
SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "node_modules"}  # site-packages: its own root
MAX_FILE_BYTES = 1 << 20  # larger files are mostly generated tables


def source_roots(kind: str) -> list[tuple[str, Path]]:
    """(label, folder) pairs: the standard library, and with kind "site" every site-packages folder."""
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]).resolve())]
    if kind == "site":
        found = [paths["purelib"], paths["platlib"], *site.getsitepackages()]
        roots += [("site", p) for p in dict.fromkeys(Path(x).resolve() for x in found) if p.is_dir()]
    return roots


def candidate_files(roots: Sequence[tuple[str, Path]]) -> list[tuple[str, Path, int]]:
    """(name, path, bytes) of every source or documentation file under `roots`."""
    out = []
    for label, root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
            for f in sorted(filenames):
                if not f.endswith(TEXT_SUFFIXES):
                    continue
                path = Path(dirpath, f)
                try:
                    size = path.stat().st_size
                except OSError:
                    continue
                if 500 <= size <= MAX_FILE_BYTES:
                    out.append((f"{label}/{path.relative_to(root)}", path, size))
    return out


def read_document(path: Path) -> str | None:
    """The file as text, or None for what is not prose or code (binary bytes, minified or generated lines)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    if "\x00" in text or max(map(len, text.splitlines()), default=0) > 4000:
        return None
    return text


@dataclass
class Selection:
    roots: list[tuple[str, Path]]
    heldout: list[tuple[str, str]]  # (name, text): long .py files for perplexity and haystacks
    train: list[tuple[str, str]]
    train_bytes: int

    def manifest(self) -> dict:
        return {
            "roots": [f"{label}:{root}" for label, root in self.roots],
            "training_documents": len(self.train),
            "training_bytes": self.train_bytes,
            "training_files_sha256": hashlib.sha256("\n".join(n for n, _ in self.train).encode()).hexdigest(),
            "heldout": [name for name, _ in self.heldout],
        }


def select_documents(sources: str, megabytes: float, heldout: int, heldout_min_bytes: int, seed: int) -> Selection:
    """A seeded sample of about `megabytes` of documents for training, and `heldout` long .py files of at least
    `heldout_min_bytes` kept out of it. The same machine and seed give the same selection."""
    roots = source_roots(sources)
    files = candidate_files(roots)
    files.sort(key=lambda f: hashlib.sha256(f"{seed}:{f[0]}".encode()).digest())  # every package contributes
    out = Selection(roots, [], [], 0)
    budget = megabytes * 2**20
    for name, path, size in files:
        want_heldout = len(out.heldout) < heldout and size >= heldout_min_bytes and name.endswith(".py")
        if not want_heldout and (out.train_bytes >= budget or (out.train and out.train_bytes + size > 1.5 * budget)):
            if out.train_bytes >= budget and len(out.heldout) == heldout:
                break
            continue
        text = read_document(path)
        if text is None:
            continue
        if want_heldout:
            out.heldout.append((name, text))
        else:
            out.train.append((name, text))
            out.train_bytes += len(text.encode())
    if len(out.heldout) < heldout or not out.train:
        raise RuntimeError(
            f"found {len(out.heldout)} .py files of >= {heldout_min_bytes} bytes for evaluation (need {heldout}) "
            f"and {len(out.train)} documents for training under {[str(r) for _, r in roots]}"
        )
    return out


def file_name(name: str) -> str:
    """A document name as a file name (letters, digits, '.', '_', '-')."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[-120:]
