"""Automatic placement of the full layers (``full_layers="auto"``): the score, the choice, the record, the CLI."""

import copy

import pytest
import torch
from transformers import AutoConfig

from longgen import BlockSparse, Full, SinkWindow
from longgen.model import convert, convert_config, is_hybrid, load_model, read_layout
from longgen.model.placement import (
    SCORE_NAMES,
    attention_mass_outside,
    choose_full_layers,
    full_layer_count,
    loss_scores,
    score_layers,
)
from test_model import tiny as tiny_model

PATTERNS = [SinkWindow(3, 8), SinkWindow(0, 5), BlockSparse(16, 1, 2), BlockSparse(16, 1, 3, dense_kv_heads=1)]


def tiny(layers=4, **kw):
    """A tiny random Llama (test_model's builder), 4 layers by default."""
    return tiny_model("llama", layers=layers, **kw)


def shape_attention(model, layer, kind, heads=None):
    """Make query heads `heads` (default all) of `layer` attend "uniform"ly over all earlier tokens (zero queries),
    or "local"ly (constant queries and keys: after RoPE the score peaks at distance 0 and falls by >= 8 logits)."""
    attn = model.model.layers[layer].self_attn
    cfg = model.config
    d, group = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    const = torch.zeros(d)
    const[: d // 2] = 8.0  # one unit-weight component per RoPE frequency pair (rotate_half pairs i, i + d/2)
    with torch.no_grad():
        for h in range(cfg.num_attention_heads) if heads is None else heads:
            rows = slice(h * d, (h + 1) * d)
            attn.q_proj.weight[rows] = 0
            attn.q_proj.bias[rows] = 0 if kind == "uniform" else const
            if kind == "local":
                kv = slice(h // group * d, (h // group + 1) * d)
                attn.k_proj.weight[kv] = 0
                attn.k_proj.bias[kv] = const
    return model


def synthetic(distant=(0, 3), local=(2,)):
    """A random Llama whose layers `distant` attend uniformly, layers `local` locally, and layer 1 has one uniform
    head (0) among local ones."""
    model = tiny(attention_bias=True)
    for i in distant:
        shape_attention(model, i, "uniform")
    for i in local:
        shape_attention(model, i, "local")
    shape_attention(model, 1, "local", heads=[1, 2, 3])
    return shape_attention(model, 1, "uniform", heads=[0])


def explicit_outside(q, k, pattern, scale=None):
    """The outside mass from explicit attention matrices: q (B, T, H, d), k (B, T, Hkv, d) -> (B, H, T)."""
    _, T, H, d = q.shape
    hkv = k.shape[2]
    kk = k.repeat_interleave(H // hkv, dim=2)
    logits = torch.einsum("bthd,bshd->bhts", q.double(), kk.double()) * (scale or d**-0.5)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    allowed = pattern.mask(T, hkv).repeat_interleave(H // hkv, dim=0)  # (H, T, T)
    return (probs * (causal & ~allowed)).sum(-1)


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
@pytest.mark.parametrize("backend", ["blocked", "reference"])
def test_outside_mass_from_the_kernels_equals_explicit_attention(pattern, backend):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 80, 4, 16, generator=g) * 2  # sharp enough that the masses differ between queries
    k = torch.randn(2, 80, 2, 16, generator=g)
    got = attention_mass_outside(q, k, pattern, backend=backend)
    want = explicit_outside(q, k, pattern)
    assert got.shape == (2, 4, 80)
    assert want.max() > 0.3  # the pattern drops real mass here, so the comparison means something
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)


def eager_scores(model, ids, pattern):
    """Per-layer, per-head outside mass from the eager attention weights transformers returns."""
    eager = tiny(layers=model.config.num_hidden_layers, attention_bias=True)
    eager.load_state_dict(model.state_dict())
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        attn = eager(ids, output_attentions=True).attentions  # per layer (B, H, T, T)
    T = ids.shape[1]
    hkv = model.config.num_key_value_heads
    H = model.config.num_attention_heads
    drop = ~pattern.mask(T, hkv).repeat_interleave(H // hkv, dim=0)
    return torch.stack([(a.double() * drop).sum(-1).mean(dim=(0, 2)) for a in attn])  # (L, H)


def test_model_scores_equal_the_eager_attention_weights():
    model = synthetic(distant=(0,), local=(3,))  # layer 2 stays random
    ids = torch.randint(0, 128, (3, 64), generator=torch.Generator().manual_seed(1))
    pattern = SinkWindow(2, 9)
    scores = score_layers(model, ids, pattern, progress=False)
    want = eager_scores(model, ids, pattern)
    torch.testing.assert_close(torch.tensor(scores.heads, dtype=torch.float64), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(scores.layers, dtype=torch.float64), want.mean(-1), atol=1e-5, rtol=0)
    assert (scores.sequences, scores.length) == (3, 64)
    assert model.config._attn_implementation == "sdpa"  # restored


def test_choice_and_count():
    assert choose_full_layers([0.1, 0.5, 0.2, 0.5], 2) == [1, 3]
    assert choose_full_layers([0.3, 0.3, 0.3], 1) == [0]
    assert full_layer_count(32, None, None) == 11  # as many as "middle" keeps
    assert full_layer_count(32, 0.25, None) == 8
    assert full_layer_count(32, None, 5) == 5
    with pytest.raises(ValueError, match="not both"):
        full_layer_count(32, 0.25, 5)
    with pytest.raises(ValueError, match=r"full_count must be an int in \[0, 32\]"):
        full_layer_count(32, None, 33)
    with pytest.raises(ValueError, match=r"full_fraction must be a number in \[0, 1\]"):
        full_layer_count(32, 1.5, None)


def test_scoring_refuses_patterns_that_drop_nothing():
    model = tiny()
    ids = torch.zeros(1, 32, dtype=torch.long)
    with pytest.raises(ValueError, match="drops nothing"):
        score_layers(model, ids, Full(), progress=False)
    with pytest.raises(ValueError, match="keeps every key at the calibration length 32"):
        score_layers(model, ids, SinkWindow(16, 16), progress=False)
    assert model.config._attn_implementation == "sdpa"


def test_the_layers_that_attend_far_are_chosen():
    model = synthetic()
    ids = torch.randint(0, 128, (2, 128), generator=torch.Generator().manual_seed(2))
    scores = score_layers(model, ids, SinkWindow(4, 16), progress=False)
    s = scores.layers
    assert min(s[0], s[3]) > 0.5 > s[1] > s[2]
    assert s[2] < 0.01
    assert scores.heads[1][0] > 0.5 and max(scores.heads[1][1:]) < 0.01
    assert choose_full_layers(s, full_layer_count(4, 0.5, None)) == [0, 3]  # "middle" would keep [1, 2]


def test_loss_scores_equal_the_losses_of_the_converted_models():
    """Layer i's loss score is the loss of the model converted with layer i alone sparse, minus the plain model's:
    over every token but the first, and over `targets` (here each row's last token)."""
    model = synthetic().eval()
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(3))
    pattern = SinkWindow(2, 8)
    last = torch.zeros_like(ids, dtype=torch.bool)
    last[:, -1] = True
    scores = loss_scores(model, ids, pattern, progress=False, chunk=7)
    on_last = loss_scores(model, ids, pattern, targets=last, progress=False)
    assert scores.heads is None and scores.score == "loss" and (scores.sequences, scores.length) == (2, 48)
    assert model.config._attn_implementation == "sdpa"  # restored

    def losses(m):
        with torch.no_grad():
            logp = m(ids).logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        return -logp.mean().item(), -logp[:, -1].mean().item()

    base = losses(model)
    for i in range(4):
        sparse = copy.deepcopy(model)
        convert(sparse, full_layers=[j for j in range(4) if j != i], pattern=pattern)
        every, final = losses(sparse)
        assert scores.layers[i] == pytest.approx(every - base[0], abs=2e-5)
        assert on_last.layers[i] == pytest.approx(final - base[1], abs=2e-5)
    assert min(abs(x) for x in (scores.layers[0], scores.layers[3])) > 1e-4  # well above the tolerance: they matter


def test_loss_score_through_convert_and_its_errors():
    model = synthetic().eval()
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(4))
    first = torch.zeros_like(ids, dtype=torch.bool)
    with pytest.raises(ValueError, match="targets must mark at least one token"):
        loss_scores(model, ids, SinkWindow(2, 8), targets=first, progress=False)
    first[0, 0] = True
    with pytest.raises(ValueError, match="not a sequence's first"):
        loss_scores(model, ids, SinkWindow(2, 8), targets=first, progress=False)
    with pytest.raises(ValueError, match="bool tensor of the shape of input_ids"):
        loss_scores(model, ids, SinkWindow(2, 8), targets=first[:, 1:], progress=False)
    with pytest.raises(ValueError, match="score must be one of outside, loss"):
        convert(copy.deepcopy(model), full_layers="auto", score="kl", calibration=ids, pattern=SinkWindow(2, 8))
    with pytest.raises(ValueError, match="targets: only for score='loss'"):
        convert(copy.deepcopy(model), full_layers="auto", targets=first, calibration=ids, pattern=SinkWindow(2, 8))
    want = loss_scores(model, ids, SinkWindow(2, 8), progress=False).layers
    convert(model, full_layers="auto", score="loss", full_count=1, calibration=ids, pattern=SinkWindow(2, 8),
            progress=False)  # fmt: skip
    rec = model.config.longgen["placement_scores"]
    assert rec["score"] == SCORE_NAMES["loss"] and "heads" not in rec
    assert rec["layers"] == pytest.approx(want, abs=1e-6)
    assert [i for i, p in enumerate(read_layout(model.config)) if isinstance(p, Full)] == choose_full_layers(want, 1)


def word_tokenizer():
    """A whitespace WordLevel tokenizer over w0..w126 ([UNK] = 127), as `longgen convert` would load it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(127)} | {"[UNK]": 127}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def write_words(path, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    path.write_text(" ".join(f"w{i}" for i in torch.randint(0, 127, (n,), generator=g).tolist()))
    return path


def test_convert_auto_makes_the_distant_layers_full_and_records_why(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    write_words(docs / "a.txt", 150)
    write_words(docs / "b.md", 200, seed=1)
    (docs / "skipped.bin").write_bytes(b"\0")  # not a text suffix: skipped, as `longgen train` skips it
    model = synthetic()
    options = dict(calibration=docs, tokenizer=word_tokenizer(), calibration_length=100, calibration_sequences=3)
    convert(model, full_layers="auto", full_fraction=0.5, pattern=SinkWindow(4, 16), progress=False, **options)
    assert [i for i, p in enumerate(read_layout(model.config)) if isinstance(p, Full)] == [0, 3]
    rec = model.config.longgen
    assert rec["placement"] == "auto"
    scores = rec["placement_scores"]
    assert scores["pattern"] == {"type": "sink_window", "sink": 4, "window": 16}
    assert (scores["calibration"], scores["calibration_length"]) == ([str(docs)], 100)
    assert (scores["sequences"], scores["tokens"]) == (3, 300)
    assert scores["layers"][2] < 0.01 < scores["layers"][1] < 0.3 < scores["layers"][0]
    assert len(scores["heads"]) == 4 and len(scores["heads"][1]) == 4
    assert model.config._attn_implementation == "longgen"
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(100)[None]).logits).all()  # the hybrid runs


def test_auto_counts_like_middle_and_by_full_count():
    ids = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(3))
    model = synthetic(distant=(0, 3), local=(2,))
    convert(model, full_layers="auto", full_count=1, pattern=SinkWindow(2, 8), calibration=ids, progress=False)
    assert [isinstance(p, Full) for p in read_layout(model.config)] == [True, False, False, False]
    model = tiny(layers=6)  # default fraction 1/3: as many full layers as "middle" (2 of 6)
    convert(model, full_layers="auto", pattern=SinkWindow(2, 8), calibration=ids, progress=False)
    assert sum(isinstance(p, Full) for p in read_layout(model.config)) == 2


def test_default_calibration_is_the_standard_library():
    from longgen.model.placement import calibration_ids, stdlib_sources

    tok = word_tokenizer()
    ids = calibration_ids(tok, None, 512, 2)
    assert ids.shape == (2, 512) and ids.dtype == torch.long
    largest = stdlib_sources()[0]  # the first document is the largest module
    assert largest.stat().st_size >= max(p.stat().st_size for p in largest.parent.glob("*.py"))
    want = tok(largest.read_text(encoding="utf-8"))["input_ids"][:1024]
    assert ids.flatten().tolist() == want


def cli(capsys, *args):
    """Run the command line in this process (as `longgen ...`): (exit code, stdout, stderr)."""
    from longgen.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The synthetic model (layers 0 and 3 attend far) saved with a word tokenizer, and calibration text."""
    root = tmp_path_factory.mktemp("placement")
    synthetic().save_pretrained(root / "src")
    word_tokenizer().save_pretrained(root / "src")
    return root / "src", write_words(root / "words.txt", 400)


def test_cli_convert_auto_inspect_and_load_back(checkpoint, tmp_path, capsys):
    src, words = checkpoint
    dst = tmp_path / "dst"
    args = ["--full-layers", "auto", "--calibration", words, "--calibration-length", 128, "--device", "cpu"]
    code, out, err = cli(capsys, "convert", src, dst, *args, "--calibration-sequences", 3, "--full-fraction", 0.5,
                         "--sink", 4, "--window", 16)  # fmt: skip
    assert code == 0, err
    config = AutoConfig.from_pretrained(dst)
    assert [i for i, p in enumerate(read_layout(config)) if isinstance(p, Full)] == [0, 3]
    scores = config.longgen["placement_scores"]
    assert (scores["calibration"], scores["sequences"], scores["tokens"]) == ([str(words)], 3, 384)
    code, out, err = cli(capsys, "inspect", dst)
    assert code == 0, err
    assert "4 layers, 2 full (auto)" in out and "3 calibration sequences of 128 tokens" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"], ["3"])]
    assert [row[1] for row in rows] == ["full_attention", "{'type':", "{'type':", "full_attention"]
    assert [float(row[-1]) for row in rows] == pytest.approx(scores["layers"], abs=1e-4)
    assert float(rows[0][-1]) > 0.3 > float(rows[1][-1]) > float(rows[2][-1])
    model = load_model(dst)  # the saved hybrid loads back and runs
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(128)[None]).logits).all()
    code, out, err = cli(capsys, "convert", src, tmp_path / "by_loss", *args, "--calibration-sequences", 1,
                         "--placement-score", "loss", "--sink", 4, "--window", 16, "--full-count", 1)  # fmt: skip
    assert code == 0, err
    scores = AutoConfig.from_pretrained(tmp_path / "by_loss").longgen["placement_scores"]
    assert scores["score"] == SCORE_NAMES["loss"] and len(scores["layers"]) == 4 and "heads" not in scores


def test_errors(checkpoint, tmp_path, capsys):
    src, words = checkpoint
    dst = tmp_path / "dst"
    auto = ["--full-layers", "auto", "--calibration-length", 128, "--window", 16, "--device", "cpu"]
    errors = [
        (["--calibration", words, "--calibration-sequences", 4], "has 400 tokens; 4 sequences of 128 tokens need 512"),
        (["--calibration", tmp_path], "has 0 tokens"),  # a folder without text files
        (["--calibration", words, "--full-count", 5], "full_count must be an int in [0, 4]"),
        (["--calibration", words, "--full-fraction", 1.5], "full_fraction must be a number in [0, 1]"),
        (["--calibration", words, "--window", 200], "keeps every key at the calibration length 128"),
        (["--calibration", words, "--calibration-length", 512], "exceeds the model's max_position_embeddings (256)"),
    ]
    for extra, message in errors:
        code, _, err = cli(capsys, "convert", src, dst, *auto, *extra)
        assert code == 2 and message in err, (extra, err)
    code, _, err = cli(capsys, "convert", src, dst, "--calibration", words)
    assert code == 2 and "calibration: only for full_layers='auto'" in err, err
    code, _, err = cli(capsys, "convert", src, dst, "--full-count", 2)
    assert code == 2 and "full_count: only for full_layers='auto'" in err, err
    code, _, err = cli(capsys, "convert", src, dst, "--placement-score", "loss")
    assert code == 2 and "score: only for full_layers='auto'" in err, err
    assert not dst.exists()
    model = tiny()
    ids = torch.zeros(1, 64, dtype=torch.long)
    with pytest.raises(ValueError, match="one pattern for all of them"):
        convert(model, full_layers="auto", pattern={0: SinkWindow(2, 8)}, calibration=ids)
    with pytest.raises(ValueError, match="drops nothing"):
        convert(model, full_layers="auto", pattern=Full(), calibration=ids)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        convert(model, full_layers="auto", pattern=SinkWindow(2, 8))
    with pytest.raises(ValueError, match="so it needs the model"):
        convert_config(model.config, full_layers="auto")
    with pytest.raises(ValueError, match="calibration set is empty"):
        convert(model, full_layers="auto", pattern=SinkWindow(2, 8), calibration=[], tokenizer=word_tokenizer())
    assert not is_hybrid(model.config) and model.config._attn_implementation == "sdpa"
