"""longgen.eval: scoring on known answers, exact-length prompts with needles at their depths, every task end to
end on a tiny random model saved to a folder, the StreamingLLM baseline, and the `eval` CLI parser."""

import argparse
import json
import math
import random

import pytest
import torch

from helpers import bpe_tokenizer, save_tiny_models
from longgen.eval import (
    RULER_TASKS,
    Haystack,
    build_prompt,
    first_number,
    limit_full_layers,
    niah,
    passkey,
    passkey_score,
    ppl,
    ruler,
    ruler_sample,
    streaming_llm,
    string_match_all,
    string_match_part,
)
from longgen.eval.cli import add_eval_parser

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A BPE tokenizer trained on the standard library's docstrings, a plain tiny Llama and its hybrid."""

    from longgen.eval.prompts import haystack_texts

    root = tmp_path_factory.mktemp("eval")
    texts = [t for _, t in zip(range(40), haystack_texts(), strict=False)]
    tokenizer = bpe_tokenizer(texts)
    save_tiny_models(root, tokenizer, max_len=512)
    return root, tokenizer


FAST = {"progress": False, "device": "cpu"}


# --- scoring on known answers ----------------------------------------------------------------------------------


def test_passkey_scoring():
    assert first_number(" 12345. Remember") == "12345"
    assert first_number("no digits") is None
    assert passkey_score(" 12345. It is 12345", "12345") == 1.0  # right
    assert passkey_score(" 54321 and then 12345", "12345") == 0.0  # wrong: the first number counts
    assert passkey_score(" 123456", "12345") == 0.0  # a longer number is not the key
    assert passkey_score(" 1234", "12345") == 0.0  # partially right is wrong
    assert passkey_score("", "12345") == 0.0


def test_string_match_scoring():
    refs = ["1234567", "7654321", "1111111", "2222222"]
    assert string_match_all("numbers: 1234567, 7654321, 1111111 and 2222222", refs) == 1.0
    assert string_match_all("none of them", refs) == 0.0
    assert string_match_all("1234567 and 2222222", refs) == 0.5  # partially right
    assert string_match_all("ABCDE, fghij", ["abcde", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)  # case-insensitive
    assert string_match_part("it is 7654321", refs) == 1.0
    assert string_match_part("it is 0", refs) == 0.0
    with pytest.raises(ValueError):
        string_match_all("x", [])


def test_ruler_answers_score_right_wrong_partial(workspace):
    _, tokenizer = workspace
    hay = Haystack(tokenizer)
    for name in RULER_TASKS:
        kw = {"cwe_words": 3} if name == "cwe" else {}
        s = ruler_sample(name, tokenizer, 256, hay, random.Random(1), max_length=512, **kw)
        assert len(s.prompt.input_ids) == 256
        right = " ".join(s.answers)
        assert string_match_all(right, s.answers) == 1.0, name
        assert string_match_all("nothing relevant", s.answers) == 0.0, name
        if len(s.answers) > 1:
            assert string_match_all(s.answers[0], s.answers) == pytest.approx(1 / len(s.answers)), name
        text = tokenizer.decode(s.prompt.input_ids)
        if name.startswith("niah") or name == "vt":
            assert all(a in text for a in s.answers), name  # the needles made it into the prompt
    # variable tracking: a chain of assignments from the value through every answer variable
    s = ruler_sample("vt", tokenizer, 256, hay, random.Random(2), max_length=512)
    text = tokenizer.decode(s.prompt.input_ids)
    assert f"VAR {s.answers[0]} = {s.info['value']}" in text
    assert all(f"VAR {b} = {a}" in text for a, b in zip(s.answers, s.answers[1:], strict=False))
    # common words: the expected words are the most frequent in the list
    s = ruler_sample("cwe", tokenizer, 256, hay, random.Random(3), max_length=512, cwe_words=3)
    words = tokenizer.decode(s.prompt.input_ids).split("Question")[0].split()
    counts = {w: words.count(w) for w in set(words) if w.isalpha()}
    assert min(counts[a] for a in s.answers) > max(c for w, c in counts.items() if w not in s.answers)


# --- prompts ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [64, 100, 256, 511])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_prompt_exact_length_and_depth(workspace, length, depth):
    _, tokenizer = workspace
    hay = Haystack(tokenizer)
    needle = "\nThe pass key is 12345. Remember it. 12345 is the pass key.\n"
    p = build_prompt(tokenizer, length, hay, [needle], [depth], "\nWhat is the pass key?", "The pass key is",
                     max_length=512)  # fmt: skip
    assert len(p.input_ids) == length
    needle_ids = tokenizer(needle, add_special_tokens=False)["input_ids"]
    start = p.needle_starts[0]
    assert p.input_ids[start : start + len(needle_ids)] == needle_ids
    assert abs((start - p.head_tokens) - depth * p.haystack_tokens) <= 1  # position inside the haystack
    assert abs(p.depths[0] - depth) <= 1 / p.haystack_tokens
    question = tokenizer("\nWhat is the pass key? The pass key is", add_special_tokens=False)["input_ids"]
    assert p.input_ids[-len(question) :] == question
    assert p.input_ids[p.head_tokens : start] == hay.tokens(p.haystack_tokens)[: start - p.head_tokens]


def test_prompt_several_needles_and_chat(workspace):
    _, tokenizer = workspace
    hay = Haystack(tokenizer)
    needles = [" first needle. ", " second needle. ", " third needle. "]
    p = build_prompt(tokenizer, 200, hay, needles, [0.8, 0.2, 0.5], "\nQ?", "A:")
    assert len(p.input_ids) == 200
    assert p.needle_starts[1] < p.needle_starts[2] < p.needle_starts[0]
    with pytest.raises(ValueError, match="chat template"):
        build_prompt(tokenizer, 200, hay, needles, [0.1] * 3, "\nQ?", "A:", chat=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        p = build_prompt(tokenizer, 200, hay, needles, [0.1] * 3, "\nQ?", "A:", chat=True)
    finally:
        tokenizer.chat_template = None
    text = tokenizer.decode(p.input_ids)
    assert len(p.input_ids) == 200
    assert text.lstrip().startswith("<|user|>") and text.endswith("<|assistant|>\nA:")


def test_prompt_errors(workspace):
    _, tokenizer = workspace
    hay = Haystack(tokenizer)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        build_prompt(tokenizer, 513, hay, ["x"], [0.5], "q", max_length=512)
    with pytest.raises(ValueError, match="fixed parts"):
        build_prompt(tokenizer, 5, hay, ["a long needle that does not fit"], [0.5], "q")
    with pytest.raises(ValueError, match="depths"):
        build_prompt(tokenizer, 100, hay, ["x"], [1.5], "q")
    with pytest.raises(ValueError, match="haystack"):
        build_prompt(tokenizer, 100, [1, 2, 3], ["x"], [0.5], "q")


# --- tasks end to end ------------------------------------------------------------------------------------------


def _read(path):
    return json.loads(open(path).read())


def test_passkey_end_to_end_and_deterministic(workspace, tmp_path):
    root, _ = workspace
    kw = dict(lengths=[64, 128], depths=[0.0, 0.5, 1.0], max_new_tokens=4, **FAST)
    res = passkey(root / "hybrid", out_dir=tmp_path / "a", seed=3, **kw)
    saved = _read(tmp_path / "a" / "passkey.json")
    assert saved["settings"]["model"] == str(root / "hybrid") and saved["settings"]["seed"] == 3
    assert saved["settings"]["lengths_used"] == [64, 128] and saved["settings"]["dtype"] == "torch.float32"
    assert len(saved["records"]) == 6 and all(r["prompt_tokens"] == r["length"] for r in saved["records"])
    assert 0.0 <= saved["summary"]["accuracy"] <= 1.0
    assert set(saved["summary"]["accuracy_by_length_depth"]["64"]) == {"0", "0.5", "1"}
    again = passkey(root / "hybrid", out_dir=tmp_path / "b", seed=3, **kw)
    assert again["records"] == res["records"]
    other = passkey(root / "hybrid", out_dir=tmp_path / "c", seed=4, **kw)
    assert [r["answers"] for r in other["records"]] != [r["answers"] for r in res["records"]]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        passkey(root / "hybrid", lengths=[1024], out_dir=tmp_path / "d", **FAST)
    with pytest.raises(ValueError, match=r"plus up to 8 generated tokens .* lengths up to 504"):
        passkey(root / "hybrid", lengths=[510], max_new_tokens=8, out_dir=tmp_path / "d", **FAST)
    # longgen's hybrid KV cache (the default for hybrids) and transformers' cache generate the same tokens
    assert res["settings"]["kv_cache"] == "hybrid"
    dynamic = passkey(root / "hybrid", out_dir=tmp_path / "e", seed=3, kv_cache="dynamic", **kw)
    assert [r["output"] for r in dynamic["records"]] == [r["output"] for r in res["records"]]


def test_oracle_model_scores_one(workspace, tmp_path, monkeypatch):
    """A 'model' that reads the needle from the prompt scores 1.0: needles reach the prompt, scoring is right."""
    import re

    import longgen.eval.tasks as tasks

    root, _ = workspace

    def oracle(model, tok, input_ids, max_new_tokens, kv_cache="auto"):
        text = tok.decode(input_ids)
        key = re.search(r"pass key is (\d+)", text) or re.search(r"magic number for \w+ is: (\d+)", text)
        return f" {key.group(1)}. The rest"

    monkeypatch.setattr(tasks, "generate", oracle)
    res = passkey(root / "plain", lengths=[128, 200], depths=[0.0, 0.3, 1.0], samples=2, out_dir=tmp_path, **FAST)
    assert res["summary"]["accuracy"] == 1.0
    res = niah(root / "plain", lengths=[128, 200], depths=[0.0, 0.6, 1.0], out_dir=tmp_path, **FAST)
    assert res["summary"]["accuracy"] == 1.0


def test_niah_end_to_end(workspace, tmp_path):
    root, _ = workspace
    hay = tmp_path / "hay.txt"
    hay.write_text(" ".join(f"Line {i} of a user's haystack file." for i in range(400)))
    res = niah(root / "plain", lengths=[96, 160], depths=[0.0, 1.0], samples=2, max_new_tokens=4,
               haystack=[hay], out_dir=tmp_path, **FAST)  # fmt: skip
    assert (tmp_path / "niah.json").is_file() and (tmp_path / "niah.png").stat().st_size > 0
    assert res["settings"]["haystack"] == [str(hay)]
    assert len(res["records"]) == 8
    table = res["summary"]["accuracy_by_length_depth"]
    assert all(0.0 <= v <= 1.0 for row in table.values() for v in row.values())


def test_ruler_all_tasks_end_to_end(workspace, tmp_path):
    root, _ = workspace
    res = ruler(root / "hybrid", lengths=[256, 384], samples=1, cwe_words=3, out_dir=tmp_path,
                max_new_tokens=dict.fromkeys(RULER_TASKS, 6), **FAST)  # fmt: skip
    saved = _read(tmp_path / "ruler.json")
    assert set(saved["summary"]["score_by_task_length"]) == set(RULER_TASKS)
    assert len(saved["records"]) == 2 * len(RULER_TASKS)
    assert all(0.0 <= r["score"] <= 1.0 for r in saved["records"])
    assert all(r["prompt_tokens"] == r["length"] for r in saved["records"])
    assert 0.0 <= res["summary"]["score"] <= 1.0 and set(res["summary"]["score_by_length"]) == {"256", "384"}


def test_ppl_end_to_end(workspace, tmp_path):
    root, _ = workspace
    res = ppl(root / "hybrid", lengths=[100, 256], bucket=64, num_documents=2, chunk=40, out_dir=tmp_path, **FAST)
    assert (tmp_path / "ppl.json").is_file() and (tmp_path / "ppl.png").stat().st_size > 0
    summary = res["summary"]
    assert summary["documents"] == 2
    assert [b["start"] for b in summary["by_position"]] == [0, 64, 128, 192]
    assert all(math.isfinite(b["ppl"]) and b["ppl"] > 1 for b in summary["by_position"])
    assert all(math.isfinite(v) for v in summary["ppl_by_length"].values())
    # a random model over a 400-token vocabulary: perplexity near the vocabulary size
    assert 100 < summary["ppl_by_length"]["256"] < 1600
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"doc{i}.txt").write_text(f"Document {i}. " + "Some words of a user document. " * (40 + i))
    (docs / "short.txt").write_text("too short")
    res = ppl(root / "plain", lengths=[64], bucket=16, documents=[docs], num_documents=5, out_dir=tmp_path, **FAST)
    assert [r["document"] for r in res["records"]] == [str(docs / f"doc{i}.txt") for i in range(3)]
    assert res["settings"]["lengths_used"] == [64] and len(res["records"][0]["bucket_loss"]) == 4
    with pytest.raises(ValueError, match="no document"):
        ppl(root / "plain", lengths=[500], documents=[docs / "short.txt"], out_dir=tmp_path / "v", **FAST)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ppl(root / "plain", lengths=[600], out_dir=tmp_path / "w", **FAST)


def test_ppl_segments_match_full_logits(workspace):
    """The chunked, bucketed losses equal cross entropy computed from the full logits."""
    from transformers import AutoModelForCausalLM

    from longgen.eval import segment_loss_sums

    root, _ = workspace
    model = AutoModelForCausalLM.from_pretrained(root / "plain").eval()
    ids = torch.randint(0, 400, (90,), generator=torch.Generator().manual_seed(0))
    sums = segment_loss_sums(model, ids, [0, 30, 31, 89], chunk=7)
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1]
    per_token = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
    expected = [per_token[0:30].sum(), per_token[30:31].sum(), per_token[31:89].sum()]
    assert sums == pytest.approx([e.item() for e in expected], rel=1e-4)


# --- the StreamingLLM baseline ---------------------------------------------------------------------------------


def test_streaming_llm_converts_every_layer(workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    root, _ = workspace
    model = streaming_llm(AutoModelForCausalLM.from_pretrained(root / "plain"), sink=4, window=16)
    layers = model.config.longgen["layers"]
    assert len(layers) == 3
    assert all(layer == {"type": "sink_window", "sink": 4, "window": 16} for layer in layers)
    with pytest.raises(ValueError, match="hybrid"):
        streaming_llm(model, sink=4, window=16)
    res = passkey(root / "plain", lengths=[96], depths=[0.5], max_new_tokens=3, baseline="streaming", sink=4,
                  window=16, out_dir=tmp_path, **FAST)  # fmt: skip
    assert res["settings"]["baseline"] == "streaming" and res["settings"]["window"] == 16
    assert res["settings"]["kv_cache"] == "hybrid"  # the cache keeps only sink + window tokens per layer
    assert 0.0 <= res["summary"]["accuracy"] <= 1.0
    with pytest.raises(ValueError, match="hybrid"):
        passkey(root / "hybrid", lengths=[96], baseline="streaming", out_dir=tmp_path, **FAST)


def test_streaming_llm_applies_to_a_conversion_whose_layers_are_all_full(workspace, tmp_path):
    """A model converted with every layer full (the demo's full-attention model) is a full-attention model."""
    from transformers import AutoModelForCausalLM

    import longgen

    root, tokenizer = workspace
    full = longgen.convert(AutoModelForCausalLM.from_pretrained(root / "plain"), full_fraction=1.0)
    assert full.config.longgen["layers"] == ["full_attention"] * 3
    full.save_pretrained(tmp_path / "full")
    tokenizer.save_pretrained(tmp_path / "full")
    streaming_llm(full, sink=4, window=16)
    assert full.config.longgen["layers"] == [{"type": "sink_window", "sink": 4, "window": 16}] * 3
    res = passkey(tmp_path / "full", lengths=[96], depths=[0.5], max_new_tokens=3, baseline="streaming", sink=4,
                  window=16, out_dir=tmp_path / "out", **FAST)  # fmt: skip
    assert res["settings"]["baseline"] == "streaming" and res["settings"]["kv_cache"] == "hybrid"


def test_limit_full_layers_keeps_the_sparse_layers_and_cuts_the_full_ones_reach(workspace):
    """A hybrid's full layer limited to SinkWindow(4, 16): the sparse layers' entries stay as they were, and the
    last token's logits no longer depend on tokens beyond every layer's reach (sink + layers x window), which they
    do with the full layer as trained."""
    from longgen.model import load_model

    root, _ = workspace
    hybrid = load_model(root / "hybrid", dtype=torch.float32).eval()
    layers = list(hybrid.config.longgen["layers"])
    assert layers.count("full_attention") == 1
    torch.manual_seed(1)
    ids = torch.randint(5, hybrid.config.vocab_size, (1, 200))
    changed = ids.clone()
    changed[0, 20:100] = torch.randint(5, hybrid.config.vocab_size, (80,))  # past the sink, out of 3 x 32 reach

    def last(model, x):
        with torch.no_grad():
            return model(x).logits[0, -1]

    assert not torch.allclose(last(hybrid, ids), last(hybrid, changed))  # the full layer reads them
    assert limit_full_layers(hybrid, sink=4, window=16) is hybrid
    window = {"type": "sink_window", "sink": 4, "window": 16}
    assert hybrid.config.longgen["layers"] == [window if e == "full_attention" else e for e in layers]
    torch.testing.assert_close(last(hybrid, ids), last(hybrid, changed))


# --- the CLI parser --------------------------------------------------------------------------------------------


def test_eval_cli_parses_and_runs(workspace, tmp_path, capsys):
    root, _ = workspace
    parser = argparse.ArgumentParser(prog="longgen")
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["eval", "passkey", str(root / "plain"), "--lengths", "64,128", "--depths", "0,0.5,1", "--samples", "1",
         "--seed", "7", "--max-new-tokens", "3", "--baseline", "streaming", "--sink", "2", "--window", "24",
         "--device", "cpu", "--out", str(tmp_path), "--no-progress"]
    )  # fmt: skip
    assert args.lengths == [64, 128] and args.depths == [0.0, 0.5, 1.0] and args.window == 24
    assert args.func(args) == 0
    saved = _read(tmp_path / "passkey.json")
    assert saved["settings"]["seed"] == 7 and saved["settings"]["sink"] == 2 and len(saved["records"]) == 6
    assert "accuracy" in capsys.readouterr().out
    args = parser.parse_args(
        [
            "eval",
            "ruler",
            str(root / "hybrid"),
            "--ruler-tasks",
            "vt,cwe",
            "--cwe-words",
            "3",
            "--lengths",
            "320",
            "--max-new-tokens",
            "4",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    assert set(_read(tmp_path / "ruler.json")["summary"]["score_by_task_length"]) == {"vt", "cwe"}
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"doc{i}.txt").write_text(f"Document {i}. " + "Some words of a user document. " * 40)
    ppl_args = ["eval", "ppl", str(root / "plain"), "--lengths", "64", "--bucket", "16", "--device", "cpu",
                "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    args = parser.parse_args([*ppl_args, "--documents", str(docs), "--num-documents", "2"])
    assert args.func(args) == 0
    assert [r["document"] for r in _read(tmp_path / "ppl.json")["records"]] == [str(docs / "doc0.txt"),
                                                                               str(docs / "doc1.txt")]  # fmt: skip
    args = parser.parse_args([*ppl_args, "--haystack", str(docs)])
    with pytest.raises(ValueError, match="--documents"):
        args.func(args)
    for bad in (["--lengths", "a,b"], ["--depths", "1.5"], ["--ruler-tasks", "qa"], ["--baseline", "h2o"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["eval", "passkey", "x", *bad])
