"""The corpus: Python source and documentation already on the machine, and synthetic retrieval documents.

Nothing is downloaded: the standard library and every site-packages folder hold hundreds of MB of real, long
documents. `select_documents` takes a seeded sample of them (every package contributes) and keeps a few long
ones out of training for evaluation. `write_retrieval_set` writes documents of real text in which facts are
stated and later asked for, in the words of longgen.eval's pass-key and needle tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
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


def write_jsonl(path: Path, texts: Sequence[str]) -> None:
    """One {"text": ...} object a line (longgen.train.data reads .jsonl sources), written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, path)


# Synthetic retrieval documents: training text with facts ("needles") stated at random places and asked for later,
# in the words of longgen.eval.tasks' pass-key and needle prompts. At this scale the skill has to be taught; what
# then differs between the variants is whether their attention reaches the fact.
NIAH_WORDS = (
    "apple",
    "river",
    "castle",
    "garden",
    "silver",
    "window",
    "thunder",
    "lantern",
    "meadow",
    "harbor",
    "anchor",
    "basket",
    "candle",
    "desert",
    "engine",
    "forest",
    "glacier",
    "hammer",
    "island",
    "jungle",
    "kettle",
    "ladder",
    "marble",
    "needle",
    "orchard",
    "pepper",
    "quarry",
    "rocket",
    "saddle",
    "tunnel",
    "valley",
    "walnut",
    "yellow",
    "zipper",
    "bridge",
    "canyon",
    "dragon",
    "falcon",
    "ginger",
    "helmet",
)  # fmt: skip  (the first ten are longgen.eval.niah's)


def facts(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """`n` (needle, question with its answer) pairs: at most one pass key, the rest magic numbers of distinct
    words, worded as longgen.eval's prompts (which end with the answer's prefix)."""
    out = []
    if rng.random() < 0.5:
        key = str(rng.randint(10_000, 99_999))
        needle = f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
        out.append((needle, f"\nWhat is the pass key? The pass key is {key}.\n"))
    for word in rng.sample(NIAH_WORDS, min(len(NIAH_WORDS), n - len(out))):
        value = str(rng.randint(1_000_000, 9_999_999))
        question = f"What is the special magic number for {word} mentioned in the provided text?"
        answer = f"The special magic number for {word} mentioned in the provided text is {value}."
        out.append((f"\nThe special magic number for {word} is: {value}.\n", f"\n{question} {answer}\n"))
    return out


def retrieval_document(
    rng: random.Random, texts: Sequence[str], n_tokens: int, chars_per_token: float, facts_per_1k: float
) -> str:
    """About `n_tokens` tokens of `texts` with facts stated at random lines and asked for at later ones.

    Half the documents end with a question, as evaluation prompts do. Questions spread over the document keep
    answerable ones in every piece when packing cuts a document between two training sequences."""
    pairs = facts(rng, max(1, round(n_tokens * facts_per_1k / 1024)))
    need = max(0, int(n_tokens * chars_per_token) - sum(len(a) + len(b) for a, b in pairs))
    parts, have = [], 0
    while have < need:
        text = texts[rng.randrange(len(texts))]
        start = rng.randrange(len(text)) if len(text) > need - have else 0
        parts.append(text[start : start + need - have])
        have += len(parts[-1]) + 2
    lines = "\n\n".join(parts).split("\n") if parts else []
    events = []  # (line slot, 0 = needle / 1 = question, fact, text): a needle always precedes its question
    for i, (needle, question) in enumerate(pairs):
        at = rng.randint(0, len(lines))
        ask = len(lines) if i == len(pairs) - 1 and rng.random() < 0.5 else rng.randint(at, len(lines))
        events += [(at, 0, i, needle), (ask, 1, i, question)]
    events.sort()
    out, e = [], 0
    for slot in range(len(lines) + 1):
        while e < len(events) and events[e][0] == slot:
            out.append(events[e][3])
            e += 1
        if slot < len(lines):
            out.append(lines[slot] + "\n")
    return "".join(out)


def write_retrieval_set(
    path: Path,
    texts: Sequence[str],
    total_tokens: int,
    lengths: tuple[int, int],
    chars_per_token: float,
    facts_per_1k: float,
    seed: int,
) -> dict[str, int]:
    """Retrieval documents of uniformly random lengths in `lengths` (tokens) until about `total_tokens`, as
    .jsonl; returns their count and planned tokens."""
    rng = random.Random(f"{seed}:retrieval:{path.name}")
    docs, n_tokens = [], 0
    while n_tokens < total_tokens:
        length = rng.randint(*lengths)
        docs.append(retrieval_document(rng, texts, length, chars_per_token, facts_per_1k))
        n_tokens += length
    write_jsonl(path, docs)
    return {"documents": len(docs), "planned_tokens": n_tokens}
