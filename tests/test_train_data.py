"""The long-context data pipeline: sources, the token cache, upsampling and packing, the resumable loader."""

import json
import os
from collections import Counter
from itertools import pairwise

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from longgen.train.data import (
    DataConfig,
    PackedLoader,
    TokenCorpus,
    _backend_encodes_alone,
    build_loader,
    encode_texts,
    iter_documents,
    pack_documents,
    tokenize_corpus,
)

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "def add(x, y):\n    return x + y\n",
    "long context training packs documents into sequences",
    "naïve café ∂x/∂t — unicode",
]


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE trained here (nothing downloaded), wrapped as a transformers tokenizer."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["[UNK]", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXTS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]")


class CountingTokenizer:
    """Delegates to a tokenizer and counts how often it is asked to encode."""

    def __init__(self, tok, fail_after=None):
        self.tok, self.calls, self.fail_after = tok, 0, fail_after

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("tokenizer failed")
        return self.tok(*args, **kwargs)

    def __len__(self):
        return len(self.tok)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def unique_corpus(lengths):
    """Document i holds consecutive, globally unique token ids, so every token says where it came from."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return TokenCorpus.from_documents([np.arange(offsets[i], offsets[i + 1]) for i in range(len(lengths))])


def packed_rows(corpus, plan):
    """(n_seqs, seq_len) tokens of every planned sequence, and the segment starts of each."""
    rows, starts = [], []
    for i in range(plan.n_seqs):
        pieces = plan.pieces(i)
        rows.append(np.concatenate([corpus.doc(d)[s : s + n] for d, s, n in pieces]))
        starts.append(np.cumsum([0] + [n for _, _, n in pieces])[:-1])
    return np.array(rows), starts


# ------------------------------------------------------------------------------------------------ sources


def test_directory_recursion_filters_extensions_in_sorted_order(tmp_path):
    write(tmp_path / "b.txt", "bee")
    write(tmp_path / "a" / "z.py", "print(1)")
    write(tmp_path / "a" / "deep" / "x.md", "# mark")
    write(tmp_path / "a" / "image.png", "not text")
    write(tmp_path / "a" / "empty.txt", "")
    write(tmp_path / "noext", "no suffix")
    write(tmp_path / ".git" / "notes.txt", "hidden directory")
    write(tmp_path / "a" / ".hidden.md", "hidden file")
    assert list(iter_documents([tmp_path])) == ["# mark", "print(1)", "bee"]  # a/deep/x.md, a/z.py, b.txt
    assert list(iter_documents([tmp_path], extensions=["md"])) == ["# mark"]


def test_jsonl_single_files_and_order(tmp_path):
    jl = tmp_path / "docs.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"body": "x", "text": "two"}) + "\n")
    single = write(tmp_path / "single.rs", "fn main() {}")
    assert list(iter_documents([single, jl])) == ["fn main() {}", "one", "two"]
    jl2 = write(tmp_path / "other.jsonl", json.dumps({"content": "c"}) + "\n")
    assert list(iter_documents([jl2], text_field="content")) == ["c"]


@pytest.mark.parametrize("line, found", [({"body": "x"}, "missing"), ({"text": 3}, "3, not a string")])
def test_jsonl_bad_field_names_file_and_line(tmp_path, line, found):
    jl = tmp_path / "bad.jsonl"
    jl.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl, line 2: field 'text' is {found}"):
        list(iter_documents([jl]))


def test_missing_or_unsupported_source_fails_before_any_work(tmp_path, tokenizer):
    good = write(tmp_path / "a.txt", "text")
    with pytest.raises(ValueError, match=r"nope\.txt.*does not exist.*supported sources"):
        iter_documents([good, tmp_path / "nope.txt"])  # raises on the call, before iteration
    write(tmp_path / "data.csv", "a,b")
    with pytest.raises(ValueError, match=r"data\.csv.*unsupported file type '\.csv'.*\.jsonl") as e:
        iter_documents([good, tmp_path / "data.csv"])
    assert "a .npy file of token ids" in str(e.value) and "only" not in str(e.value)  # .npy sources train too
    (tmp_path / "images").mkdir()
    write(tmp_path / "images" / "a.png", "png")
    with pytest.raises(ValueError, match=r"images holds no file with a text suffix"):
        tokenize_corpus([tmp_path / "images"], tokenizer, tmp_path / "cache")
    calls = CountingTokenizer(tokenizer)
    with pytest.raises(ValueError, match="does not exist"):
        tokenize_corpus([good, tmp_path / "nope.txt"], calls, tmp_path / "cache")
    assert calls.calls == 0 and not (tmp_path / "cache").exists()


def test_parquet_source(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "docs.parquet"
    datasets.Dataset.from_dict({"text": ["alpha", "beta"], "n": [1, 2]}).to_parquet(str(path))
    assert list(iter_documents([path])) == ["alpha", "beta"]
    corpus = tokenize_corpus([path], tokenizer, tmp_path / "cache", progress=False)
    assert corpus.n_docs == 2


def test_pre_tokenized_sources_need_no_tokenizer(tmp_path, tokenizer):
    np.save(tmp_path / "a.npy", np.array([5, 6, 7], dtype=np.int64))
    np.save(tmp_path / "b.npy", np.array([9], dtype=np.int32))
    corpus = tokenize_corpus([tmp_path / "a.npy", tmp_path / "b.npy"], None, tmp_path / "cache", progress=False)
    assert corpus.n_docs == 2 and corpus.doc(0).tolist() == [5, 6, 7] and corpus.doc(1).tolist() == [9]
    # a cached corpus is itself a source: alone it is opened in place, mixed it is copied in order
    assert tokenize_corpus([corpus.path], None, tmp_path / "c2", progress=False).path == corpus.path
    write(tmp_path / "t.txt", "the lazy dog")
    mixed = tokenize_corpus([tmp_path / "t.txt", corpus.path], tokenizer, tmp_path / "c3", progress=False)
    assert mixed.doc_lengths[1:].tolist() == [3, 1] and mixed.doc(2).tolist() == [9]
    np.save(tmp_path / "bad.npy", np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="1-D integer array"):
        tokenize_corpus([tmp_path / "bad.npy"], None, tmp_path / "c4", progress=False)
    with pytest.raises(ValueError, match="need a tokenizer"):
        tokenize_corpus([tmp_path / "t.txt"], None, tmp_path / "c5", progress=False)
    with pytest.raises(ValueError, match="not text"):
        iter_documents([tmp_path / "a.npy"])


# ------------------------------------------------------------------------------------------------ the cache


def make_text_corpus(root):
    write(root / "src" / "pkg" / "mod.py", TEXTS[1])
    write(root / "src" / "notes.md", TEXTS[0])
    jl = root / "docs.jsonl"
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[2:]))
    return [root / "src", jl]


def test_tokenize_matches_tokenizer_and_appends_eos(tmp_path, tokenizer):
    sources = make_text_corpus(tmp_path)
    corpus = tokenize_corpus(sources, tokenizer, tmp_path / "cache", batch_size=2, progress=False)
    texts = list(iter_documents(sources))
    assert corpus.n_docs == len(texts) == len(corpus) == 4
    for i, text in enumerate(texts):
        expected = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert corpus.doc(i).tolist() == expected
    assert corpus.n_tokens == corpus.doc_lengths.sum() == len(corpus.tokens)
    assert isinstance(corpus.tokens, np.memmap) and corpus.tokens.dtype == np.uint32
    meta = json.loads((corpus.path / "meta.json").read_text())
    assert meta["n_docs"] == 4 and meta["n_tokens"] == corpus.n_tokens and meta["text_field"] == "text"
    no_eos = tokenize_corpus(sources, tokenizer, tmp_path / "cache", add_eos=False, progress=False)
    assert no_eos.path != corpus.path and (corpus.doc_lengths - no_eos.doc_lengths).tolist() == [1] * 4


def test_cache_is_reused_and_invalidated_by_source_changes(tmp_path, tokenizer):
    sources = make_text_corpus(tmp_path)
    cache = tmp_path / "cache"
    first_tok = CountingTokenizer(tokenizer)
    first = tokenize_corpus(sources, first_tok, cache, progress=False)
    assert first_tok.calls > 0

    again_tok = CountingTokenizer(tokenizer)
    again = tokenize_corpus(sources, again_tok, cache, progress=False)
    assert again_tok.calls == 0 and again.path == first.path
    assert np.array_equal(again.tokens, first.tokens) and np.array_equal(again.offsets, first.offsets)

    mod = tmp_path / "src" / "pkg" / "mod.py"
    st = mod.stat()
    os.utime(mod, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touch: same content, new mtime
    touched_tok = CountingTokenizer(tokenizer)
    touched = tokenize_corpus(sources, touched_tok, cache, progress=False)
    assert touched_tok.calls > 0 and touched.path != first.path
    assert np.array_equal(touched.tokens, first.tokens)

    write(mod, "def changed(): pass\n")
    changed = tokenize_corpus(sources, tokenizer, cache, progress=False)
    assert changed.path not in (first.path, touched.path) and changed.doc(1).tolist() != first.doc(1).tolist()
    assert sorted(p.name for p in cache.iterdir()) == sorted({first.path.name, touched.path.name, changed.path.name})


def test_tokenizer_identity_is_in_the_fingerprint(tmp_path, tokenizer):
    sources = make_text_corpus(tmp_path)
    a = tokenize_corpus(sources, tokenizer, tmp_path / "cache", progress=False)
    other = Tokenizer(models.BPE(unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.train_from_iterator(
        TEXTS,
        trainers.BpeTrainer(
            vocab_size=280, special_tokens=["[UNK]", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    other = PreTrainedTokenizerFast(tokenizer_object=other, eos_token="</s>", unk_token="[UNK]")
    assert tokenize_corpus(sources, other, tmp_path / "cache", progress=False).path != a.path


def test_failed_tokenization_leaves_no_temp_dir(tmp_path, tokenizer):
    sources = make_text_corpus(tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="tokenizer failed"):
        tokenize_corpus(sources, CountingTokenizer(tokenizer, fail_after=1), cache, batch_size=1, progress=False)
    assert list(cache.iterdir()) == []


def test_encode_texts_gives_the_tokenizers_own_ids_by_either_path(tokenizer):
    """`encode_texts` is ``tokenizer(texts, add_special_tokens=False)["input_ids"]``: through the backend's
    ``encode_batch_fast`` for a plain fast tokenizer, through the tokenizer's own call when its backend truncates,
    splits special tokens differently, or the tokenizer is a wrapper or a subclass with its own encoding."""
    texts = [*TEXTS, "", "a</s>b </s> c", " ".join(TEXTS) * 20]

    def own(tok):
        return tok(texts, add_special_tokens=False)["input_ids"]

    assert _backend_encodes_alone(tokenizer) and encode_texts(tokenizer, texts) == own(tokenizer)
    assert encode_texts(tokenizer, iter(texts)) == own(tokenizer)  # any iterable of strings

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.enable_truncation(3)  # kept by the backend, switched off by the tokenizer's own call
    truncating = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    assert not _backend_encodes_alone(truncating)
    assert encode_texts(truncating, texts) == own(tokenizer) and max(map(len, own(tokenizer))) > 3

    splitting = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="</s>")
    splitting.split_special_tokens = True  # "</s>" in the text is encoded as characters, not as the eos id
    assert not _backend_encodes_alone(splitting) and encode_texts(splitting, texts) == own(splitting)
    assert own(splitting)[5] != own(tokenizer)[5]

    class OwnEncoding(PreTrainedTokenizerFast):
        def _encode_plus(self, *args, **kwargs):
            return super()._encode_plus(*args, **kwargs)

    subclass = OwnEncoding(tokenizer_object=tokenizer.backend_tokenizer, eos_token="</s>")
    counting = CountingTokenizer(tokenizer)
    assert not _backend_encodes_alone(subclass) and not _backend_encodes_alone(counting)
    assert encode_texts(subclass, texts) == encode_texts(counting, texts) == own(tokenizer) and counting.calls == 1


def test_tokenizer_without_eos(tmp_path, tokenizer):
    write(tmp_path / "a.txt", "the dog")
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, unk_token="[UNK]")
    with pytest.raises(ValueError, match="no eos token"):
        tokenize_corpus([tmp_path / "a.txt"], no_eos, tmp_path / "cache", progress=False)
    corpus = tokenize_corpus([tmp_path / "a.txt"], no_eos, tmp_path / "cache", add_eos=False, progress=False)
    assert corpus.doc(0).tolist() == tokenizer("the dog", add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------ packing


def check_plan_against_corpus(corpus, plan):
    """Every planned segment is a contiguous slice of one document, laid out back to back."""
    assert np.all(plan.piece_len > 0)
    for i in range(plan.n_seqs):
        at = 0
        for d, s, n in plan.pieces(i):
            assert s >= 0 and s + n <= corpus.doc_lengths[d]
            at += n
        assert at == plan.seq_len
    assert np.array_equal(np.diff(plan.seq_ptr) > 0, np.ones(plan.n_seqs, dtype=bool))


@pytest.mark.parametrize("seq_len", [2, 7, 16, 64])
def test_packing_loses_and_duplicates_no_token(seq_len):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 40, size=50)
    corpus = unique_corpus(lengths)
    plan = pack_documents(corpus, seq_len, seed=3)
    check_plan_against_corpus(corpus, plan)
    rows, starts = packed_rows(corpus, plan)
    assert rows.shape == (plan.n_seqs, seq_len) == (corpus.n_tokens // seq_len, seq_len)
    packed = rows.reshape(-1)
    assert len(set(packed.tolist())) == len(packed) == corpus.n_tokens - plan.dropped_tokens
    assert 0 <= plan.dropped_tokens < seq_len
    # what is missing is the tail of the shuffled stream: each document keeps a prefix, at most one is cut
    kept = Counter(np.searchsorted(corpus.offsets, packed, side="right") - 1)
    partial = 0
    for d in range(corpus.n_docs):
        got = sorted(packed[np.searchsorted(corpus.offsets, packed, side="right") - 1 == d].tolist())
        assert got == corpus.doc(d)[: kept[d]].tolist()
        partial += 0 < kept[d] < lengths[d]
    assert partial <= 1
    # segments: a segment is one document's consecutive tokens; only a row's first/last may be partial
    for row, seg in zip(rows, starts, strict=True):
        bounds = [*seg.tolist(), seq_len]
        for k, (a, b) in enumerate(pairwise(bounds)):
            piece = row[a:b]
            assert np.all(np.diff(piece) == 1)
            d = np.searchsorted(corpus.offsets, piece[0], side="right") - 1
            starts_doc, ends_doc = piece[0] == corpus.offsets[d], piece[-1] == corpus.offsets[d + 1] - 1
            assert (starts_doc or k == 0) and (ends_doc or k == len(seg) - 1)


def test_exact_fit_drops_nothing_and_split_documents_continue():
    corpus = unique_corpus([10, 25, 5])
    plan = pack_documents(corpus, 8, seed=0)
    assert plan.n_seqs == 5 and plan.dropped_tokens == 0
    rows, _ = packed_rows(corpus, plan)
    assert sorted(rows.reshape(-1).tolist()) == list(range(40))
    assert pack_documents(unique_corpus([3]), 4).n_seqs == 0


def test_upsampling_follows_rules():
    lengths = np.array([150] * 300 + [50] * 2000 + [10] * 500)
    rules = [(20, 1.5), (100, 3.0)]  # unsorted on purpose: the longest min_length wins
    plan = pack_documents(unique_corpus(lengths), 64, upsample=rules, seed=0)
    r = plan.repeats
    assert np.all(r[:300] == 3) and np.all(r[2300:] == 1)
    assert set(r[300:2300].tolist()) == {1, 2} and abs(r[300:2300].mean() - 1.5) < 0.05
    # the packed stream holds exactly those copies: count the pieces that start a document
    starts = Counter(plan.piece_doc[plan.piece_start == 0].tolist())
    stream_tokens = int((r * lengths).sum())
    assert sum(plan.piece_len) + plan.dropped_tokens == stream_tokens
    short = [d for d in range(len(lengths)) if starts[d] != r[d]]
    assert len(short) <= 1 + 63 // 10  # only documents in the dropped tail can miss a copy


def test_downsampling_and_determinism():
    lengths = np.array([30] * 1000 + [5] * 1000)
    corpus = unique_corpus(lengths)
    plan = pack_documents(corpus, 32, upsample=[[25, 0.25]], seed=7)
    assert set(plan.repeats[:1000].tolist()) == {0, 1} and abs(plan.repeats[:1000].mean() - 0.25) < 0.05
    same = pack_documents(corpus, 32, upsample=[[25, 0.25]], seed=7)
    other = pack_documents(corpus, 32, upsample=[[25, 0.25]], seed=8)
    for name in ("piece_doc", "piece_start", "piece_len", "piece_offset", "seq_ptr", "repeats"):
        assert np.array_equal(getattr(plan, name), getattr(same, name))
    assert not np.array_equal(plan.repeats, other.repeats) and plan.pieces(0) != other.pieces(0)


@pytest.mark.parametrize("seq_len", [16, 64])
def test_whole_documents_start_a_sequence_and_are_never_cut(seq_len):
    rng = np.random.default_rng(2)
    lengths = np.concatenate([rng.integers(seq_len // 2, seq_len + 1, size=20), rng.integers(1, 12, size=200),
                              [3 * seq_len]])  # fmt: skip
    corpus = unique_corpus(lengths)
    plan = pack_documents(corpus, seq_len, seed=5, whole_min=seq_len // 2)
    check_plan_against_corpus(corpus, plan)
    rows, _ = packed_rows(corpus, plan)
    packed = rows.reshape(-1)
    assert len(set(packed.tolist())) == len(packed) == corpus.n_tokens - plan.dropped_tokens  # nothing twice
    assert 0 <= plan.dropped_tokens < seq_len
    for d in range(20):  # every long document is one piece at the start of its own sequence
        mine = [p for p in range(len(plan.piece_doc)) if plan.piece_doc[p] == d]
        assert len(mine) == 1 and plan.piece_start[mine[0]] == 0 and plan.piece_len[mine[0]] == lengths[d]
        assert plan.piece_offset[mine[0]] == 0
    # the same seed gives the same plan; without whole_min the long documents are cut somewhere
    again = pack_documents(corpus, seq_len, seed=5, whole_min=seq_len // 2)
    assert all(np.array_equal(getattr(plan, k), getattr(again, k)) for k in ("piece_doc", "piece_len", "seq_ptr"))
    cut = pack_documents(corpus, seq_len, seed=5)
    assert any(Counter(cut.piece_doc.tolist())[d] > 1 for d in range(20))
    # the loader reads such a plan as any other: a whole document's positions run 0 .. length-1 in its row
    batch = PackedLoader(corpus, plan, 1, seed=0).batch(0, 0)
    first = plan.pieces(int(PackedLoader(corpus, plan, 1, seed=0).sequence_indices(0, 0)[0]))[0]
    assert batch["input_ids"].shape == (1, seq_len)
    assert batch["position_ids"][0, : first[2]].tolist() == list(range(first[2]))


def test_whole_documents_without_filler_are_cut_like_the_rest():
    corpus = unique_corpus([6, 6, 6, 2])  # filler for one whole document only
    plan = pack_documents(corpus, 8, seed=0, whole_min=5)
    check_plan_against_corpus(corpus, plan)
    assert plan.n_seqs == 2 and plan.dropped_tokens == 4
    rows, _ = packed_rows(corpus, plan)
    assert len(set(rows.reshape(-1).tolist())) == 16


@pytest.mark.parametrize("kwargs, match", [
    ({"seq_len": 8, "whole_min": 0}, "whole_min must be None or an int >= 1"),
    ({"seq_len": 8, "whole_min": True}, "whole_min must be None or an int >= 1"),
    ({"seq_len": 1}, "seq_len must be an int >= 2"),
    ({"seq_len": 8.0}, "seq_len must be an int >= 2"),
    ({"seq_len": 8, "upsample": [(0, 2.0)]}, "min_length must be an int >= 1"),
    ({"seq_len": 8, "upsample": [(10, 0.0)]}, "factor must be a finite number > 0"),
    ({"seq_len": 8, "upsample": [(10, float("inf"))]}, "factor must be a finite number > 0"),
    ({"seq_len": 8, "upsample": [(10, 2.0, 3)]}, "pair"),
    ({"seq_len": 8, "upsample": [10, 2.0]}, "pair"),
])  # fmt: skip
def test_pack_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pack_documents(unique_corpus([10, 10]), **kwargs)


# ------------------------------------------------------------------------------------------------ the loader


def small_loader(**kwargs):
    corpus = unique_corpus(np.random.default_rng(0).integers(1, 30, size=60))
    plan = pack_documents(corpus, 16, seed=1)
    return corpus, plan, PackedLoader(corpus, plan, 4, **kwargs)


def test_batches_carry_segments_positions_labels_and_cu_seqlens():
    corpus, plan, loader = small_loader(seed=5)
    rows, starts = packed_rows(corpus, plan)
    for j in range(len(loader)):
        batch = loader.batch(0, j)
        seqs = loader.sequence_indices(0, j)
        ids, pos, labels, cu = (batch[k] for k in ("input_ids", "position_ids", "labels", "cu_seqlens"))
        assert ids.shape == pos.shape == labels.shape == (4, 16)
        assert ids.dtype == pos.dtype == labels.dtype == torch.int64 and cu.dtype == torch.int32
        assert np.array_equal(ids.numpy(), rows[seqs])
        expected_cu = [b * 16 + s for b, q in enumerate(seqs) for s in starts[q]] + [64]
        assert cu.tolist() == expected_cu
        for b, q in enumerate(seqs):
            bounds = [*starts[q].tolist(), 16]
            expected_pos = np.concatenate([np.arange(e - s) for s, e in pairwise(bounds)])
            assert pos[b].tolist() == expected_pos.tolist()
            masked = set(starts[q].tolist()) - {0}
            assert [i for i in range(16) if labels[b, i] == -100] == sorted(masked)
            keep = [i for i in range(16) if i not in masked]
            assert torch.equal(labels[b, keep], ids[b, keep])


def take(it, n):
    return [next(it) for _ in range(n)]


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_loader_is_deterministic_infinite_and_reshuffles_each_epoch():
    _, plan, loader = small_loader(seed=5)
    n = len(loader)
    assert n == plan.n_seqs // 4
    first = take(iter(loader), 2 * n + 1)
    again = take(iter(small_loader(seed=5)[2]), 2 * n + 1)
    assert same_batches(first, again)
    epoch0 = [loader.sequence_indices(0, j) for j in range(n)]
    epoch1 = [loader.sequence_indices(1, j) for j in range(n)]
    assert not np.array_equal(np.concatenate(epoch0), np.concatenate(epoch1))
    assert len(set(np.concatenate(epoch0).tolist())) == n * 4  # no sequence twice in an epoch
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["batch_in_epoch"] == 1
    assert not same_batches(take(iter(small_loader(seed=6)[2]), 1), first[:1])


@pytest.mark.parametrize("consumed", [0, 3, "epoch_end"])
def test_resume_yields_the_same_next_batches(consumed):
    corpus, plan, loader = small_loader(seed=2)
    consumed = len(loader) - 1 if consumed == "epoch_end" else consumed
    it = iter(loader)
    take(it, consumed)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
    expected = take(it, len(loader) + 2)  # runs across an epoch boundary
    restored = PackedLoader(corpus, plan, 4, seed=2)
    restored.load_state_dict(state)
    assert same_batches(take(iter(restored), len(loader) + 2), expected)


def test_load_state_dict_rejects_another_setup():
    corpus, plan, loader = small_loader(seed=2)
    with pytest.raises(ValueError, match="seed: 2 -> 3"):
        PackedLoader(corpus, plan, 4, seed=3).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="batch_size"):
        PackedLoader(corpus, plan, 2, seed=2).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="out of range"):
        loader.load_state_dict({**loader.state_dict(), "batch_in_epoch": len(loader)})


def test_ranks_are_disjoint_and_equal_length():
    corpus, plan, _ = small_loader()
    world = 3
    loaders = [PackedLoader(corpus, plan, 2, rank=r, world_size=world, seed=4) for r in range(world)]
    assert len({len(x) for x in loaders}) == 1 and len(loaders[0]) == plan.n_seqs // 2 // world
    per_rank = [np.concatenate([x.sequence_indices(0, j) for j in range(len(x))]).tolist() for x in loaders]
    flat = [q for seqs in per_rank for q in seqs]
    assert len(flat) == len(set(flat)) == world * len(loaders[0]) * 2
    for x, seqs in zip(loaders, per_rank, strict=True):  # the tensors are those sequences
        rows = torch.cat([b["input_ids"] for b in take(iter(x), len(x))])
        assert torch.equal(rows, torch.cat([x.batch(0, j)["input_ids"] for j in range(len(x))]))
        assert len(seqs) == rows.shape[0]
    with pytest.raises(ValueError, match="rank must lie"):
        PackedLoader(corpus, plan, 2, rank=3, world_size=3)
    with pytest.raises(ValueError, match="fewer than one batch per rank"):
        PackedLoader(corpus, plan, plan.n_seqs, world_size=2)


# ------------------------------------------------------------------------------------------------ the config


def test_build_loader_end_to_end(tmp_path, tokenizer):
    for i in range(30):
        write(tmp_path / "corpus" / f"d{i:02d}.txt", " ".join(TEXTS[: 1 + i % 4]) * (1 + i % 3))
    cfg = DataConfig(
        sources=[str(tmp_path / "corpus")], seq_len=32, cache_dir=str(tmp_path / "cache"), upsample=[[100, 2.0]], seed=1
    )
    loader = build_loader(cfg, tokenizer, batch_size=2, progress=False)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, 32) and int(batch["input_ids"].max()) < len(tokenizer)
    assert loader.plan.repeats.max() == 2
    counting = CountingTokenizer(tokenizer)
    build_loader(cfg, counting, batch_size=2, progress=False)
    assert counting.calls == 0


def test_data_config_expands_cache_dir():
    assert DataConfig(sources=["x"], seq_len=8).cache_dir == os.path.expanduser("~/.cache/longgen/tokens")


@pytest.mark.parametrize("change, error, match", [
    ({"sources": []}, ValueError, "non-empty list"),
    ({"sources": "corpus"}, ValueError, "non-empty list"),
    ({"sources": ["missing_dir"]}, ValueError, "missing_dir.*does not exist"),
    ({"seq_len": 1}, ValueError, "seq_len must be an int >= 2"),
    ({"upsample": [[4096]]}, ValueError, "pair"),
    ({"upsample": [[4096, -1.0]]}, ValueError, "factor must be"),
    ({"upsample": [[0.5, 2.0]]}, ValueError, "min_length must be"),
    ({"text_field": ""}, ValueError, "text_field"),
    ({"whole_min": 0}, ValueError, "whole_min must be unset or an integer >= 1"),
    ({"seed": "0"}, TypeError, "seed must be an int"),
])  # fmt: skip
def test_data_config_validation(tmp_path, tokenizer, change, error, match):
    (tmp_path / "corpus").mkdir()
    sources = change.pop("sources", [str(tmp_path / "corpus")])
    if sources == ["missing_dir"]:
        sources = [str(tmp_path / "missing_dir")]
    cfg = DataConfig(sources=sources, seq_len=change.pop("seq_len", 8), cache_dir=str(tmp_path / "cache"), **change)
    with pytest.raises(error, match=match):
        cfg.validate()
    counting = CountingTokenizer(tokenizer)
    with pytest.raises(error, match=match):
        build_loader(cfg, counting, batch_size=1, progress=False)
    assert counting.calls == 0 and not (tmp_path / "cache").exists()
