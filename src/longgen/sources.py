"""Where documents come from: directories of text or code files, text files, ``.jsonl`` and ``.parquet`` files
(and, for tokenizing only, ``.npy`` token arrays and tokenized corpus folders).

The one reader of text sources, below the layers that use it: training data (`longgen.train.data`) and the
calibration text of `longgen.convert(full_layers="auto")`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

DEFAULT_EXTENSIONS: tuple[str, ...] = (
    ".txt", ".md", ".rst", ".tex", ".py", ".pyi", ".ipynb", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".cuh",
    ".java", ".kt", ".scala", ".js", ".jsx", ".ts", ".tsx", ".go", ".rs", ".rb", ".php", ".swift", ".cs", ".lua",
    ".r", ".jl", ".sql", ".json", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".xml", ".html", ".css", ".sh",
)  # fmt: skip
CORPUS_FILES = ("tokens.bin", "offsets.npy", "meta.json")
TEXT, JSONL, PARQUET, NPY, CORPUS = "text", "jsonl", "parquet", "npy", "corpus"
SUPPORTED_SOURCES = (
    "a directory of text files (suffixes in `extensions`), a text file with such a suffix, a .jsonl or .parquet "
    "file (documents in `text_field`), a .npy file of token ids (one document), or a tokenized corpus directory "
    "(tokens.bin, offsets.npy, meta.json)"
)


def normalize_extensions(extensions: Iterable[str]) -> frozenset[str]:
    """File suffixes as lowercase ``.ext`` strings; TypeError for a single string."""
    if isinstance(extensions, str):
        raise TypeError(f"extensions must be a list of suffixes like ['.txt', '.py'], got the string {extensions!r}")
    return frozenset(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)


def classify_source(source: str | os.PathLike, extensions: frozenset[str]) -> tuple[str, Path]:
    """The kind of a source and its resolved path; ValueError for missing or unsupported ones."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(f"data source {str(source)!r} does not exist; supported sources: {SUPPORTED_SOURCES}")
    path = path.resolve()
    if path.is_dir():
        return (CORPUS if all((path / f).is_file() for f in CORPUS_FILES) else TEXT), path
    suffix = path.suffix.lower()
    kind = {".jsonl": JSONL, ".parquet": PARQUET, ".npy": NPY}.get(suffix)
    if kind is None and suffix in extensions:
        kind = TEXT
    if kind is None:
        raise ValueError(
            f"data source {str(source)!r}: unsupported file type {suffix or '(no suffix)'!r}; "
            f"supported sources: {SUPPORTED_SOURCES}; text suffixes: {' '.join(sorted(extensions))}"
        )
    return kind, path


def source_files(kind: str, path: Path, extensions: frozenset[str]) -> list[Path]:
    """The files a source reads, in reading order."""
    if kind == CORPUS:
        return [path / f for f in CORPUS_FILES]
    if not path.is_dir():
        return [path]
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git, .venv, caches: not documents
        files += [Path(root, n) for n in names if not n.startswith(".") and Path(n).suffix.lower() in extensions]
    return sorted(files)


def read_texts(kind: str, path: Path, text_field: str, extensions: frozenset[str]) -> Iterator[str]:
    """The text documents of one classified source (see `classify_source`), in reading order."""
    if kind == TEXT:
        for file in source_files(kind, path, extensions):
            text = file.read_text(encoding="utf-8", errors="replace")
            if text:
                yield text
    elif kind == JSONL:
        with path.open(encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {line_no}: not valid JSON ({e})") from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    found = "missing" if text is None else f"{text!r}, not a string"
                    raise ValueError(
                        f"{path}, line {line_no}: field {text_field!r} is {found}; each line must be "
                        f"a JSON object with a string {text_field!r} (set text_field to change it)"
                    )
                yield text
    elif kind == PARQUET:
        try:
            import datasets
        except ImportError as e:
            raise ImportError(f"reading {path} needs Hugging Face datasets: pip install datasets") from e
        table = datasets.load_dataset("parquet", data_files=str(path), split="train")
        if text_field not in table.column_names:
            raise ValueError(f"{path}: no column {text_field!r} (columns: {table.column_names}); set text_field")
        for row, text in enumerate(table[text_field]):
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{path}, row {row}: column {text_field!r} holds {text!r}, not text")
            if text:
                yield text
    else:
        raise ValueError(f"{path} holds tokens, not text: pass it to tokenize_corpus instead of iter_documents")


def iter_documents(
    sources: Sequence[str | os.PathLike],
    text_field: str = "text",
    extensions: Iterable[str] = DEFAULT_EXTENSIONS,
) -> Iterator[str]:
    """Text documents from `sources`, in the order given.

    A directory yields each file whose suffix is in `extensions`, in sorted path order, skipping hidden files
    and directories (names starting with "."); a text file is one document; a ``.jsonl`` file yields the
    `text_field` of each line, a ``.parquet`` file its `text_field` column (needs ``pip install datasets``).

    Every source is checked before the first document is read: a missing path or an unsupported file type
    raises ValueError naming it. Empty documents are skipped.
    """
    exts = normalize_extensions(extensions)
    classified = [classify_source(s, exts) for s in sources]
    for kind, path in classified:
        if kind in (NPY, CORPUS):
            raise ValueError(f"{path} holds tokens, not text: pass it to tokenize_corpus instead of iter_documents")
    return (text for kind, path in classified for text in read_texts(kind, path, text_field, exts))
