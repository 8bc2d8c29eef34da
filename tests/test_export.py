"""`longgen export --format transformers`: a SinkWindow(0, W) hybrid becomes a folder stock transformers serves
without longgen, token-exact (logits, greedy generation) and with only the window cached on sliding layers."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

import longgen
from helpers import bpe_tokenizer
from longgen.cli import main
from longgen.infer import HybridCache, cache_kwargs
from longgen.model import convert_config, export_checkpoint, export_config

W = 16  # the sliding window: SinkWindow(0, W)
PROMPT, NEW = 40, 12  # prompt + new tokens well past the window
SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
ARCHS = {  # model type -> (config class, extra `longgen convert` options: RoPE changes must survive the export)
    "qwen2": (Qwen2Config, ["--target-length", "512", "--rope", "ntk"]),
    "qwen3": (Qwen3Config, []),
    "llama": (LlamaConfig, ["--target-length", "512", "--rope", "yarn"]),
    "mistral": (MistralConfig, []),
}
EXPORTED_CLASS = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "MinistralForCausalLM"}
EXPORTED_CLASS["mistral"] = "MinistralForCausalLM"
IMPLS = {name: ("sdpa", "eager") if name == "qwen2" else ("sdpa",) for name in ARCHS}  # attention paths checked

# Runs in a fresh interpreter that cannot import longgen: stock transformers loads each exported folder and
# records logits, greedy generations and the key tensor length of every layer of the returned cache.
STOCK = r"""
import importlib.abc, json, sys
class NoLonggen(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "longgen" or name.startswith("longgen."):
            raise ImportError("the exported folder must load without longgen")
sys.meta_path.insert(0, NoLonggen())
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
job = json.loads(sys.argv[1])
ids, prompt, padded, mask = (torch.tensor(job[k]) for k in ("ids", "prompt", "padded", "mask"))
results = {"transformers": transformers.__version__}
for name, folder in job["folders"].items():
    tok = AutoTokenizer.from_pretrained(folder)
    for impl in ("sdpa", "eager") if name == job["boundary"] else ("sdpa",):
        m = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=impl).eval()
        with torch.no_grad():
            logits = m(ids).logits
            out = m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=job["new"],
                             do_sample=False, return_dict_in_generate=True, pad_token_id=0)
            batch = m.generate(padded, attention_mask=mask, max_new_tokens=job["new"], do_sample=False,
                               pad_token_id=0)
            static = m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=job["new"],
                                do_sample=False, return_dict_in_generate=True, pad_token_id=0,
                                cache_implementation="static")
        cache = getattr(out, "cache", None) or out.past_key_values
        static_cache = getattr(static, "cache", None) or static.past_key_values
        results[f"{name}/{impl}"] = {
            "class": type(m).__name__,
            "logits": logits,
            "tokens": out.sequences,
            "batch": batch,
            "cached_keys": [layer.keys.shape[-2] for layer in cache.layers],
            "cache_layers": [type(layer).__name__ for layer in cache.layers],
            "static_tokens": static.sequences,
            "static_keys": [layer.keys.shape[-2] for layer in static_cache.layers],
            "encoded": tok("export me to the engines")["input_ids"],
        }
    if name == job["boundary"]:  # one token more or less of window must change the logits
        for w in (job["window"] - 1, job["window"] + 1):
            m = AutoModelForCausalLM.from_pretrained(folder, sliding_window=w).eval()
            with torch.no_grad():
                results[f"{name}/window={w}"] = m(ids).logits
assert not [k for k in sys.modules if k.split(".")[0] == "longgen"], "longgen was imported"
torch.save(results, job["out"])
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """For each architecture: a random model converted by `longgen convert --sink 0`, exported by `longgen
    export`, and what stock transformers computes with the export in a subprocess that cannot import longgen."""
    root = tmp_path_factory.mktemp("export")
    tok = bpe_tokenizer(["export me to the engines users already run " * 20, "sliding windows keep the tail"])
    folders = {}
    for name, (config_class, options) in ARCHS.items():
        extra = {"sliding_window": None} if config_class is MistralConfig else {}  # convert refuses Mistral's own
        config = config_class(vocab_size=len(tok), max_position_embeddings=128, **SHAPE, **extra)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(root / name / "plain")
        tok.save_pretrained(root / name / "plain")
        args = ["convert", str(root / name / "plain"), str(root / name / "hybrid"), "--pattern", "sink_window"]
        assert main([*args, "--sink", "0", "--window", str(W), *options]) == 0
        assert (
            main(["export", str(root / name / "hybrid"), str(root / name / "export"), "--format", "transformers"]) == 0
        )
        folders[name] = str(root / name / "export")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, len(tok), (2, 3 * W), generator=gen)
    prompt = torch.randint(2, len(tok), (1, PROMPT), generator=gen)
    padded = torch.randint(2, len(tok), (2, PROMPT), generator=gen)
    mask = torch.ones_like(padded)
    padded[1, :9], mask[1, :9] = 0, 0  # left padding: the second prompt is 9 tokens shorter
    job = {"folders": folders, "ids": ids.tolist(), "prompt": prompt.tolist(), "padded": padded.tolist()}
    job |= {"mask": mask.tolist(), "new": NEW, "window": W, "boundary": "qwen2", "out": str(root / "stock.pt")}
    r = subprocess.run(
        [sys.executable, "-c", STOCK, json.dumps(job)], capture_output=True, text=True, timeout=300, cwd=root
    )
    assert r.returncode == 0, r.stderr[-3000:]
    stock = torch.load(root / "stock.pt", weights_only=False)
    return root, stock, (ids, prompt, padded, mask)


@pytest.mark.parametrize("name", ARCHS)
def test_export_writes_layer_types_sliding_window_and_the_same_files(exported, name):
    root, _, _ = exported
    hybrid, export = root / name / "hybrid", root / name / "export"
    src, out = (json.loads((p / "config.json").read_text()) for p in (hybrid, export))
    assert "longgen" in src and "longgen" not in out and "attn_implementation" not in out
    assert out["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert out["sliding_window"] == W
    assert out["model_type"] == {"llama": "ministral", "mistral": "ministral"}.get(name, name)
    assert out["architectures"] == [EXPORTED_CLASS[name]]
    for key in ("rope_parameters", "max_position_embeddings", "vocab_size", "num_key_value_heads"):
        assert out[key] == src[key], key
    if name in ("qwen2", "llama"):  # the RoPE change made by convert is kept (ntk base / yarn scaling)
        assert out["max_position_embeddings"] == 512
        assert (
            out["rope_parameters"] != json.loads((root / name / "plain" / "config.json").read_text())["rope_parameters"]
        )
    files = sorted(p.name for p in hybrid.iterdir())
    assert sorted(p.name for p in export.iterdir()) == files
    for f in files:
        if f != "config.json":
            assert _sha(hybrid / f) == _sha(export / f), f  # weights, tokenizer, generation config unchanged


@pytest.mark.parametrize("name", ARCHS)
def test_stock_transformers_matches_longgen_token_for_token(exported, name):
    root, stock, (ids, prompt, padded, mask) = exported
    model = longgen.load_model(root / name / "hybrid").eval()
    tok = AutoTokenizer.from_pretrained(root / name / "hybrid")
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
            **cache_kwargs(HybridCache(model.config)),
        )
        batch = model.generate(padded, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    for impl in IMPLS[name]:
        s = stock[f"{name}/{impl}"]
        assert s["class"] == EXPORTED_CLASS[name]
        torch.testing.assert_close(s["logits"], logits, atol=2e-5, rtol=1e-5)
        assert torch.equal(s["tokens"], tokens), impl
        assert torch.equal(s["static_tokens"], tokens), impl
        assert torch.equal(s["batch"], batch), impl
        assert s["encoded"] == tok("export me to the engines")["input_ids"]


def test_the_window_boundary_is_the_same_as_sinkwindow(exported):
    """sliding_window = W reproduces SinkWindow(0, W); W - 1 or W + 1 would not (so the comparison can fail)."""
    root, stock, (ids, _, _, _) = exported
    model = longgen.load_model(root / "qwen2" / "hybrid").eval()
    with torch.no_grad():
        logits = model(ids).logits
    for w in (W - 1, W + 1):
        assert (stock[f"qwen2/window={w}"] - logits).abs().max() > 1e-3, w


@pytest.mark.parametrize("name", ARCHS)
def test_stock_cache_keeps_only_the_window_on_sliding_layers(exported, name):
    _, stock, _ = exported
    seen = PROMPT + NEW - 1  # tokens that went through the model (the last generated one never does)
    for impl in IMPLS[name]:
        s = stock[f"{name}/{impl}"]
        # measured: sliding layers hold W - 1 keys (the next query is the window's W-th), full layers all of them
        assert s["cached_keys"] == [W - 1, seen, W - 1], s["cache_layers"]
        assert s["cache_layers"][0] != s["cache_layers"][1]
        # cache_implementation="static" preallocates the window on sliding layers, the whole length on full ones
        assert s["static_keys"] == [W, seen, W]


def _hybrid_config(pattern, config_class=Qwen2Config, **kwargs):
    config = config_class(vocab_size=64, max_position_embeddings=128, **SHAPE, **kwargs)
    return convert_config(config, pattern=pattern)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (
            longgen.SinkWindow(4, W),
            "layer 0 uses SinkWindow(sink=4, window=16): transformers' sliding window has no sink tokens",
        ),
        (longgen.BlockSparse(16, 2), "block-sparse and custom block layouts cannot be exported"),
        (longgen.BlockLayout(torch.ones(2, 4, 4, dtype=torch.bool).tril(), 16), "custom block layouts"),
        ({0: longgen.SinkWindow(0, 8), 2: longgen.SinkWindow(0, 16)}, "different windows [8, 16]"),
    ],
    ids=["sink", "block_sparse", "custom_layout", "two_windows"],
)
def test_what_transformers_cannot_express_is_refused_with_what_would_work(pattern, message):
    with pytest.raises(ValueError) as e:
        export_config(_hybrid_config(pattern))
    assert message in str(e.value)
    assert "--pattern sink_window --sink 0" in str(e.value)


def test_other_refusals_say_why():
    with pytest.raises(ValueError, match="not a converted LongGen hybrid"):
        export_config(Qwen2Config(vocab_size=64, **SHAPE))
    with pytest.raises(ValueError, match="unknown export format 'gguf'; supported: transformers"):
        export_config(_hybrid_config(longgen.SinkWindow(0, W)), format="gguf")
    with pytest.raises(ValueError, match="attention_bias=True; it is exported as a ministral model"):
        export_config(_hybrid_config(longgen.SinkWindow(0, W), LlamaConfig, attention_bias=True))
    gpt2 = GPT2Config(n_layer=2)
    gpt2.longgen = {"layers": ["full_attention", {"type": "sink_window", "sink": 0, "window": W}]}
    with pytest.raises(ValueError, match="cannot export a 'gpt2' hybrid: export supports qwen2, qwen3, llama"):
        export_config(gpt2)


def test_export_command_refusals_and_force(exported, tmp_path, capsys):
    root, _, _ = exported
    dst = root / "qwen2" / "export"
    assert main(["export", str(root / "qwen2" / "hybrid"), str(dst)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    config = export_checkpoint(root / "qwen2" / "hybrid", dst, force=True, progress=False)
    assert config.layer_types[1] == "full_attention" and (dst / "config.json").is_file()
    sink = tmp_path / "sink"
    args = ["convert", str(root / "qwen2" / "plain"), str(sink), "--sink", "4", "--window", str(W)]
    assert main(args) == 0
    assert main(["export", str(sink), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longgen export: error: layer 0 uses SinkWindow(sink=4, window=16)")
    assert not (tmp_path / "out").exists()
