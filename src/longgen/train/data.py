"""Long-context training data: documents -> cached tokens -> upsampled, packed sequences -> sharded batches.

The pipeline has four steps, each a small function or class with one job:

1. `iter_documents` reads text documents from directories, text files, ``.jsonl`` and ``.parquet`` files.
2. `tokenize_corpus` tokenizes them once into ``cache_dir/<fingerprint>/`` (a uint32 memmap of all tokens plus
   document offsets) and returns a `TokenCorpus`; a later call with the same inputs only loads the memmap.
3. `pack_documents` oversamples long documents (the long-context data recipe), shuffles them and cuts the
   stream into sequences of exactly ``seq_len`` tokens. The `PackedPlan` it returns is metadata only: which
   (document, start, length) pieces make each sequence. Pieces are separate attention segments.
4. `PackedLoader` turns the plan into batches (``input_ids``, ``position_ids`` restarting at 0 in every segment,
   ``labels`` and ``cu_seqlens``), shuffled per epoch, sharded across ranks, and resumable from a state dict.

`DataConfig` and `build_loader` put the steps together for the training loop.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longgen.sources import (
    CORPUS,
    CORPUS_FILES,
    DEFAULT_EXTENSIONS,
    NPY,
    SUPPORTED_SOURCES,
    classify_source,
    iter_documents,
    normalize_extensions,
    read_texts,
    source_files,
)

__all__ = [
    "DEFAULT_EXTENSIONS",
    "DataConfig",
    "PackedLoader",
    "PackedPlan",
    "TokenCorpus",
    "build_loader",
    "encode_texts",
    "iter_documents",
    "pack_documents",
    "tokenize_corpus",
]

CACHE_FORMAT = 1  # bump when the cache layout changes, so old caches are not read as new ones
IGNORE_INDEX = -100  # transformers' label value for "no loss here"
# ---------------------------------------------------------------------------------------------------------
# 1. Sources -> documents: longgen.sources (iter_documents, re-exported here)


# ---------------------------------------------------------------------------------------------------------
# 2. Tokenization with a disk cache


class TokenCorpus:
    """Documents as token ids: one flat uint32 array and document boundaries.

    tokens: (n_tokens,) uint32, usually a read-only memmap; offsets: (n_docs + 1,) int64, document ``i`` is
    ``tokens[offsets[i]:offsets[i + 1]]``.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, path: Path | None = None):
        offsets = np.asarray(offsets, dtype=np.int64)
        if (
            offsets.ndim != 1
            or len(offsets) < 1
            or offsets[0] != 0
            or offsets[-1] != len(tokens)
            or np.any(np.diff(offsets) < 0)
        ):
            raise ValueError(f"offsets must rise from 0 to len(tokens)={len(tokens)}, got {len(offsets)} offsets")
        self.tokens, self.offsets, self.path = tokens, offsets, path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokenCorpus:
        """Open a corpus directory written by `tokenize_corpus` (tokens are memory-mapped, not read)."""
        path = Path(path).expanduser()
        missing = [f for f in CORPUS_FILES if not (path / f).is_file()]
        if missing:
            raise ValueError(f"{path} is not a tokenized corpus: missing {', '.join(missing)}")
        size = (path / "tokens.bin").stat().st_size
        # np.memmap refuses empty files
        tokens = np.memmap(path / "tokens.bin", dtype=np.uint32, mode="r") if size else np.zeros(0, np.uint32)
        return cls(tokens, np.load(path / "offsets.npy"), path)

    @classmethod
    def from_documents(cls, docs: Iterable[Sequence[int] | np.ndarray]) -> TokenCorpus:
        """An in-memory corpus from token id sequences (for tests and small experiments)."""
        arrays = [np.asarray(d, dtype=np.uint32) for d in docs]
        lengths = [len(a) for a in arrays]
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.uint32)
        return cls(tokens, np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def doc_lengths(self) -> np.ndarray:
        """(n_docs,) int64."""
        return np.diff(self.offsets)

    def doc(self, i: int) -> np.ndarray:
        """Document ``i`` as a (length,) uint32 view, not a copy."""
        if not 0 <= i < self.n_docs:
            raise IndexError(f"document {i} out of range for a corpus of {self.n_docs} documents")
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def __len__(self) -> int:
        return self.n_docs

    def __repr__(self) -> str:
        return f"TokenCorpus(n_docs={self.n_docs}, n_tokens={self.n_tokens}, path={self.path})"


def _tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    identity = {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        identity["backend_sha256"] = hashlib.sha256(backend.to_str().encode()).hexdigest()
    return identity


def _fingerprint(inputs: dict[str, Any], files: list[list[Path]]) -> str:
    h = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode())
    for paths in files:
        h.update(b"\0source")
        for f in paths:
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read_tokens(kind: str, path: Path) -> Iterator[np.ndarray]:
    if kind == CORPUS:
        corpus = TokenCorpus.load(path)
        yield from (corpus.doc(i) for i in range(corpus.n_docs))
        return
    array = np.load(path, allow_pickle=False)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{path}: a token file must hold a 1-D integer array, got {array.ndim}-D {array.dtype}")
    if len(array) and (array.min() < 0 or array.max() >= 2**32):
        raise ValueError(f"{path}: token ids must lie in [0, 2**32), got [{array.min()}, {array.max()}]")
    yield array


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """The token ids of each of `texts`, without special tokens: what ``tokenizer(texts, add_special_tokens=False)``
    gives. A plain fast tokenizer (transformers' own class, or a subclass that changes none of its encoding methods)
    whose backend neither truncates nor pads encodes through the backend's ``encode_batch_fast``: no character
    offsets and no Python-side conversion: the same ids with less work. Any other tokenizer is called as usual."""
    texts = list(texts)
    if _backend_encodes_alone(tokenizer):
        return [
            encoding.ids for encoding in tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        ]
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


_ENCODING_METHODS = ("__call__", "_call_one", "encode_plus", "batch_encode_plus", "_encode_plus", "_batch_encode_plus")


def _backend_encodes_alone(tokenizer: Any) -> bool:
    """Whether ``tokenizer(texts, add_special_tokens=False)`` is the backend's ``encode_batch`` and nothing more."""
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        return False
    if any(
        getattr(type(tokenizer), m, None) is not getattr(PreTrainedTokenizerFast, m, None) for m in _ENCODING_METHODS
    ):
        return False  # a subclass with its own encoding (code_llama, layoutlm, ...)
    backend = tokenizer.backend_tokenizer
    return (
        hasattr(backend, "encode_batch_fast")
        and backend.truncation is None
        and backend.padding is None
        and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))
    )


def tokenize_corpus(
    sources: Sequence[str | os.PathLike],
    tokenizer: Any,
    cache_dir: str | os.PathLike,
    *,
    text_field: str = "text",
    add_eos: bool = True,
    extensions: Iterable[str] = DEFAULT_EXTENSIONS,
    batch_size: int = 256,
    progress: bool = True,
) -> TokenCorpus:
    """Tokenize `sources` once into ``cache_dir/<fingerprint>/`` and return the memory-mapped corpus.

    Text documents are encoded in batches without special tokens, each followed by ``tokenizer.eos_token_id``
    when `add_eos`. Pre-tokenized sources (``.npy`` 1-D integer arrays, one document each, and corpus directories
    written by this function) are taken as they are; `tokenizer` may be None when all sources are such.
    Documents of zero tokens are left out.

    The fingerprint covers each source file's resolved path, size and mtime, `text_field`, `add_eos` and the
    tokenizer (name, vocabulary size, eos id and a hash of its full definition), so a second call with the same
    inputs loads the cache without tokenizing. The corpus is written to a temporary directory inside
    `cache_dir` and renamed into place, so readers never see a partial cache; concurrent writers are safe.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    exts = normalize_extensions(extensions)
    classified = [classify_source(s, exts) for s in sources]
    if not classified:
        raise ValueError(f"no data sources given; supported sources: {SUPPORTED_SOURCES}")
    if len(classified) == 1 and classified[0][0] == CORPUS:
        return TokenCorpus.load(classified[0][1])
    files = [source_files(kind, path, exts) for kind, path in classified]
    for (_, path), paths in zip(classified, files, strict=True):
        if not paths:
            raise ValueError(f"directory {path} holds no file with a text suffix ({' '.join(sorted(exts))})")
    has_text = any(kind not in (NPY, CORPUS) for kind, _ in classified)
    if has_text and tokenizer is None:
        raise ValueError("text sources need a tokenizer; only .npy files and tokenized corpora can go without")
    if has_text and add_eos and tokenizer.eos_token_id is None:
        raise ValueError("add_eos=True but the tokenizer has no eos token: set tokenizer.eos_token or add_eos=False")

    inputs = {
        "format": CACHE_FORMAT,
        "sources": [str(p) for _, p in classified],
        "text_field": text_field,
        "add_eos": add_eos,
        "tokenizer": _tokenizer_identity(tokenizer) if has_text else None,
    }
    fingerprint = _fingerprint(inputs, files)
    cache_root = Path(cache_dir).expanduser()
    final = cache_root / fingerprint[:32]
    if (final / "meta.json").is_file():
        return TokenCorpus.load(final)

    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{fingerprint[:32]}-", dir=cache_root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a cache is for every user of cache_dir
        offsets = _write_tokens(
            tmp / "tokens.bin", classified, tokenizer, text_field, add_eos, exts, batch_size, progress
        )
        np.save(tmp / "offsets.npy", offsets)
        meta = {
            **inputs,
            "fingerprint": fingerprint,
            "n_docs": len(offsets) - 1,
            "n_tokens": int(offsets[-1]),
            "n_files": [len(f) for f in files],
            "dtype": "uint32",
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # lost a race to another writer: theirs is identical
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenCorpus.load(final)


def _write_tokens(
    out: Path,
    classified: list[tuple[str, Path]],
    tokenizer: Any,
    text_field: str,
    add_eos: bool,
    exts: frozenset[str],
    batch_size: int,
    progress: bool,
) -> np.ndarray:
    """Stream every document's tokens into `out`; return the (n_docs + 1,) int64 offsets."""
    from tqdm.auto import tqdm

    lengths: list[int] = []
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer is not None else []
    with out.open("wb") as f, tqdm(desc="tokenizing", unit=" docs", disable=not progress) as bar:

        def write(doc: Sequence[int] | np.ndarray) -> None:
            if len(doc):
                f.write(np.asarray(doc, dtype=np.uint32).tobytes())
                lengths.append(len(doc))
            bar.update(1)

        def flush(texts: list[str]) -> None:
            if texts:
                for doc in encode_texts(tokenizer, texts):
                    write(doc + eos)
                texts.clear()

        batch: list[str] = []
        for kind, path in classified:
            if kind in (NPY, CORPUS):
                flush(batch)
                for doc in _read_tokens(kind, path):
                    write(doc)
                continue
            for text in read_texts(kind, path, text_field, exts):
                batch.append(text)
                if len(batch) == batch_size:
                    flush(batch)
        flush(batch)
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# 3. Length upsampling and packing


def _check_upsample(upsample: Iterable[Sequence[float]]) -> list[tuple[int, float]]:
    """Rules as (min_length, factor) pairs, longest min_length first; ValueError for malformed ones."""
    rules = []
    for rule in upsample:
        if isinstance(rule, str) or not isinstance(rule, Sequence) or len(rule) != 2:
            raise ValueError(f"each upsample rule must be a pair [min_length, factor], got {rule!r}")
        min_length, factor = rule
        if isinstance(min_length, bool) or not isinstance(min_length, numbers.Integral) or min_length < 1:
            raise ValueError(f"upsample rule {list(rule)}: min_length must be an int >= 1, got {min_length!r}")
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not (0 < factor < math.inf):
            raise ValueError(
                f"upsample rule {list(rule)}: factor must be a finite number > 0 (< 1 downsamples), got {factor!r}"
            )
        rules.append((int(min_length), float(factor)))
    return sorted(rules, key=lambda r: -r[0])


@dataclass(frozen=True, eq=False)
class PackedPlan:
    """Which document pieces make each packed sequence; metadata only, no tokens.

    Piece ``p`` is ``corpus.doc(piece_doc[p])[piece_start[p] : piece_start[p] + piece_len[p]]``, placed at
    ``piece_offset[p]`` of its sequence. Sequence ``i`` is pieces ``seq_ptr[i] : seq_ptr[i + 1]``, in order,
    filling exactly ``seq_len`` tokens. All piece arrays are (n_pieces,) int64; `seq_ptr` is (n_seqs + 1,)
    int64; `repeats` is (n_docs,) int64, how many copies of each document went into the stream.
    """

    seq_len: int
    piece_doc: np.ndarray
    piece_start: np.ndarray
    piece_len: np.ndarray
    piece_offset: np.ndarray
    seq_ptr: np.ndarray
    repeats: np.ndarray
    dropped_tokens: int  # the final partial sequence, left out

    @property
    def n_seqs(self) -> int:
        return len(self.seq_ptr) - 1

    def __len__(self) -> int:
        return self.n_seqs

    def pieces(self, i: int) -> list[tuple[int, int, int]]:
        """The (doc, start, length) pieces of sequence ``i``, in order."""
        lo, hi = self.seq_ptr[i], self.seq_ptr[i + 1]
        return [
            (int(d), int(s), int(n))
            for d, s, n in zip(self.piece_doc[lo:hi], self.piece_start[lo:hi], self.piece_len[lo:hi], strict=True)
        ]


def pack_documents(
    corpus: TokenCorpus,
    seq_len: int,
    *,
    upsample: Iterable[Sequence[float]] = (),
    seed: int = 0,
    whole_min: int | None = None,
) -> PackedPlan:
    """Plan sequences of exactly `seq_len` tokens from `corpus`, oversampling long documents.

    `upsample` holds ``(min_length, factor)`` rules: a document of at least ``min_length`` tokens (first match,
    longest ``min_length`` first) enters the stream ``factor`` times in expectation, the integer part always and
    one more copy with probability equal to the fractional part; other documents enter once. The copies are
    shuffled with `seed`, concatenated and cut every `seq_len` tokens; a document crossing a cut is split into
    pieces, each its own attention segment. The final partial sequence is dropped (`PackedPlan.dropped_tokens`).
    Deterministic given (corpus, seq_len, upsample, seed, whole_min).

    `whole_min`: documents of ``whole_min`` to ``seq_len`` tokens are never cut: each starts a sequence at
    position 0 and the rest of that sequence is filled from the stream of the other documents (cut as usual). So a
    long document's distant tokens stay in one attention segment (long-range training signal); when the other
    documents run out, the whole documents left are cut like the rest.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if whole_min is not None and (isinstance(whole_min, bool) or not isinstance(whole_min, int) or whole_min < 1):
        raise ValueError(f"whole_min must be None or an int >= 1, got {whole_min!r}")
    rules = _check_upsample(upsample)
    rng = np.random.default_rng(seed)
    lengths = corpus.doc_lengths
    factors = np.ones(corpus.n_docs)
    matched = np.zeros(corpus.n_docs, dtype=bool)
    for min_length, factor in rules:  # longest min_length first, so the first matching rule wins
        hit = (lengths >= min_length) & ~matched
        factors[hit], matched[hit] = factor, True
    whole = np.floor(factors)
    repeats = (whole + (rng.random(corpus.n_docs) < factors - whole)).astype(np.int64)
    order = rng.permutation(np.repeat(np.arange(corpus.n_docs, dtype=np.int64), repeats))
    if whole_min is not None:
        return _pack_whole(order, lengths, seq_len, whole_min, repeats)

    # intersect each document copy's span of the stream with the sequence spans [i*seq_len, (i+1)*seq_len)
    doc_len = lengths[order]
    ends = np.cumsum(doc_len)
    total = int(ends[-1]) if len(ends) else 0
    n_seqs = total // seq_len
    usable = n_seqs * seq_len
    starts = ends - doc_len
    keep = (starts < usable) & (doc_len > 0)
    order, starts, ends = order[keep], starts[keep], np.minimum(ends[keep], usable)
    first = starts // seq_len
    counts = (ends - 1) // seq_len - first + 1
    owner = np.repeat(np.arange(len(order)), counts)
    within = np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)  # piece index within a copy
    piece_seq = first[owner] + within
    lo = np.maximum(piece_seq * seq_len, starts[owner])
    hi = np.minimum((piece_seq + 1) * seq_len, ends[owner])
    return PackedPlan(
        seq_len=seq_len,
        piece_doc=order[owner],
        piece_start=lo - starts[owner],
        piece_len=hi - lo,
        piece_offset=lo - piece_seq * seq_len,
        seq_ptr=np.searchsorted(piece_seq, np.arange(n_seqs + 1)).astype(np.int64),
        repeats=repeats,
        dropped_tokens=total - usable,
    )


def _pack_whole(order: np.ndarray, lengths: np.ndarray, seq_len: int, whole_min: int, repeats) -> PackedPlan:
    """`pack_documents` with documents of `whole_min`..`seq_len` tokens kept whole (see its docstring)."""
    is_whole = (lengths[order] >= whole_min) & (lengths[order] <= seq_len)
    whole, rest = order[is_whole], order[~is_whole & (lengths[order] > 0)]
    rest_tokens = int(lengths[rest].sum())
    pieces: list[tuple[int, int, int, int, int]] = []  # (sequence, doc, start, length, offset)
    stream = [(int(d), 0, int(lengths[d])) for d in rest]  # (doc, start, length) still to place
    at = 0  # next stream segment

    def fill(seq: int, offset: int, n: int) -> None:  # n tokens of the stream into sequence `seq` at `offset`
        nonlocal at
        while n > 0:
            d, start, length = stream[at]
            k = min(length, n)
            pieces.append((seq, d, start, k, offset))
            offset, n = offset + k, n - k
            if k < length:
                stream[at] = (d, start + k, length - k)
            else:
                at += 1

    n_seqs, left = 0, []
    for d in whole.tolist():
        gap = seq_len - int(lengths[d])
        if gap > rest_tokens:  # no filler left for it: it joins the stream and is cut like the others
            left.append((d, 0, int(lengths[d])))
            continue
        pieces.append((n_seqs, d, 0, int(lengths[d]), 0))
        fill(n_seqs, int(lengths[d]), gap)
        rest_tokens -= gap
        n_seqs += 1
    stream += left
    remaining = sum(length for _, _, length in stream[at:])
    for _ in range(remaining // seq_len):
        fill(n_seqs, 0, seq_len)
        n_seqs += 1
    cols = np.array(pieces, dtype=np.int64).reshape(-1, 5)
    return PackedPlan(
        seq_len=seq_len,
        piece_doc=cols[:, 1],
        piece_start=cols[:, 2],
        piece_len=cols[:, 3],
        piece_offset=cols[:, 4],
        seq_ptr=np.searchsorted(cols[:, 0], np.arange(n_seqs + 1)).astype(np.int64),
        repeats=repeats,
        dropped_tokens=remaining % seq_len,
    )


# ---------------------------------------------------------------------------------------------------------
# 4. Batches: shuffled per epoch, sharded across ranks, resumable


class PackedLoader:
    """Infinite iterator of packed batches for one rank.

    Each item is a dict of CPU tensors: ``input_ids``, ``position_ids`` and ``labels``, each (batch_size,
    seq_len) int64, and ``cu_seqlens``, (n_segments + 1,) int32 segment offsets over the flattened
    (batch_size * seq_len) tokens. ``position_ids`` restart at 0 in every segment; ``labels`` equal
    ``input_ids`` except -100 at each segment start that is not a row start, so no token is predicted from
    another segment (transformers shifts labels inside the model).

    Epoch ``e`` orders the sequences by a permutation seeded by (seed, e) and cuts it into global batches;
    rank ``r`` takes global batches r, r + world_size, ...; the remainder that would leave ranks uneven is
    dropped, so every rank has ``len(loader)`` batches per epoch. Iterating continues from the current state;
    `state_dict` / `load_state_dict` resume exactly (the state is the same on every rank).
    """

    def __init__(
        self,
        corpus: TokenCorpus,
        plan: PackedPlan,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        if len(plan.repeats) != corpus.n_docs:
            raise ValueError(f"the plan was made for {len(plan.repeats)} documents, the corpus has {corpus.n_docs}")
        self.corpus, self.plan, self.batch_size = corpus, plan, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batches_per_epoch = plan.n_seqs // batch_size // world_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{plan.n_seqs} packed sequences of {plan.seq_len} tokens are fewer than one batch per "
                f"rank (batch_size={batch_size} x world_size={world_size}): add data or shrink them"
            )
        self.epoch = 0
        self.batch_in_epoch = 0
        self._perm_epoch, self._perm = -1, np.zeros(0, np.int64)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            batch = self.batch(self.epoch, self.batch_in_epoch)
            self.batch_in_epoch += 1
            if self.batch_in_epoch == self.batches_per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            yield batch

    def sequence_indices(self, epoch: int, index: int) -> np.ndarray:
        """(batch_size,) plan sequence indices of this rank's batch `index` of `epoch`."""
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.plan.n_seqs)
            self._perm_epoch = epoch
        g = index * self.world_size + self.rank
        return self._perm[g * self.batch_size : (g + 1) * self.batch_size]

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """This rank's batch `index` (0 <= index < len(self)) of `epoch`, without changing the loader's state."""
        if not 0 <= index < self.batches_per_epoch:
            raise IndexError(f"batch {index} out of range for {self.batches_per_epoch} batches per epoch")
        plan, seq_len = self.plan, self.plan.seq_len
        input_ids = np.empty((self.batch_size, seq_len), dtype=np.int64)
        position_ids = np.empty_like(input_ids)
        starts = []
        for row, seq in enumerate(self.sequence_indices(epoch, index)):
            lo, hi = plan.seq_ptr[seq], plan.seq_ptr[seq + 1]
            offsets = self.corpus.offsets[plan.piece_doc[lo:hi]] + plan.piece_start[lo:hi]
            lens, where = plan.piece_len[lo:hi], plan.piece_offset[lo:hi]
            input_ids[row] = np.concatenate([self.corpus.tokens[o : o + n] for o, n in zip(offsets, lens, strict=True)])
            position_ids[row] = np.arange(seq_len) - np.repeat(where, lens)
            starts.append(row * seq_len + where)
        seg_starts = np.concatenate(starts)
        labels = input_ids.copy()
        labels.reshape(-1)[seg_starts[seg_starts % seq_len != 0]] = IGNORE_INDEX
        cu_seqlens = np.append(seg_starts, self.batch_size * seq_len).astype(np.int32)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "position_ids": torch.from_numpy(position_ids),
            "labels": torch.from_numpy(labels),
            "cu_seqlens": torch.from_numpy(cu_seqlens),
        }

    def state_dict(self) -> dict[str, int]:
        """Where iteration continues, plus what must match on restore (JSON-able ints)."""
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "n_seqs": self.plan.n_seqs,
            "seq_len": self.plan.seq_len,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state` (any rank's); ValueError if it came from a loader over other data or settings."""
        mine = self.state_dict()
        changed = [
            f"{k}: {state.get(k)} -> {mine[k]}"
            for k in mine
            if k not in ("epoch", "batch_in_epoch") and state.get(k) != mine[k]
        ]
        if changed:
            raise ValueError(
                f"loader state does not match this loader ({'; '.join(changed)}): "
                "resuming would not continue the same batch order"
            )
        if not 0 <= state["batch_in_epoch"] < self.batches_per_epoch or state["epoch"] < 0:
            raise ValueError(
                f"loader state out of range: epoch {state['epoch']}, batch {state['batch_in_epoch']} "
                f"of {self.batches_per_epoch}"
            )
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])


# ---------------------------------------------------------------------------------------------------------
# 5. Configuration


@dataclass
class DataConfig:
    """User-facing data settings. `validate` checks them before any tokenization (`build_loader` calls it).

    upsample: ``[[min_length, factor], ...]`` rules for `pack_documents`, e.g. ``[[32768, 4.0], [4096, 2.0]]``.
    """

    sources: list[str]
    seq_len: int
    text_field: str = "text"
    cache_dir: str = "~/.cache/longgen/tokens"
    upsample: list[list[float]] = field(default_factory=list)
    whole_min: int | None = None  # documents of whole_min..seq_len tokens are never cut (see pack_documents)
    extensions: list[str] = field(default_factory=lambda: list(DEFAULT_EXTENSIONS))
    seed: int = 0
    add_eos: bool = True

    def __post_init__(self) -> None:
        self.cache_dir = os.path.expanduser(self.cache_dir)

    def validate(self) -> None:
        """Raise ValueError/TypeError for a setting that cannot work: missing or unsupported sources, seq_len < 2,
        malformed upsample rules, an empty text_field."""
        if isinstance(self.sources, str | os.PathLike) or not self.sources:
            raise ValueError(f"sources must be a non-empty list of paths, got {self.sources!r}")
        exts = normalize_extensions(self.extensions)
        for source in self.sources:
            classify_source(source, exts)
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"seq_len must be an int >= 2, got {self.seq_len!r}")
        _check_upsample(self.upsample)
        if self.whole_min is not None and (
            isinstance(self.whole_min, bool) or not isinstance(self.whole_min, int) or self.whole_min < 1
        ):
            raise ValueError(f"whole_min must be unset or an integer >= 1, got {self.whole_min!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"text_field must be a non-empty string, got {self.text_field!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")


def build_loader(
    cfg: DataConfig, tokenizer: Any, batch_size: int, rank: int = 0, world_size: int = 1, progress: bool = True
) -> PackedLoader:
    """Validate `cfg`, tokenize (or load the cache), pack, and return this rank's `PackedLoader`."""
    cfg.validate()
    corpus = tokenize_corpus(
        cfg.sources,
        tokenizer,
        cfg.cache_dir,
        text_field=cfg.text_field,
        add_eos=cfg.add_eos,
        extensions=cfg.extensions,
        progress=progress,
    )
    plan = pack_documents(corpus, cfg.seq_len, upsample=cfg.upsample, seed=cfg.seed, whole_min=cfg.whole_min)
    return PackedLoader(corpus, plan, batch_size, rank=rank, world_size=world_size, seed=cfg.seed)
