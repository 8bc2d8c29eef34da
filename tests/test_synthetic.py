"""longgen.train.synthetic (retrieval training documents) and longgen.train.tokenizer."""

import hashlib
import json
import random
import re

import pytest

from longgen.train.synthetic import make_fact, retrieval_document, write_retrieval_set
from longgen.train.tokenizer import train_bpe_tokenizer

FILLER = ["def f(x):\n    return x + 1\n" * 40, "Some prose about rivers and mountains.\n" * 60, "import os\n" * 30]


def _lines(doc, pattern):
    return [i for i, line in enumerate(doc.split("\n")) if re.search(pattern, line)]


def test_every_question_follows_its_needles_with_the_same_answer():
    for seed in range(20):
        doc = retrieval_document(random.Random(seed), FILLER, 3000, 3.5, 4.0)
        lines = doc.split("\n")
        # magic numbers: each word keyed once, asked after it is stated, with the stated value
        stated = {}
        for i, line in enumerate(lines):
            m = re.search(r"(?:number(?:s)? (?:for|of) (\w+)(?: is:?| is) )(\d+)\.$", line)
            if m and not line.startswith(("What", "The number noted")):
                assert m.group(1) not in stated, "a key stated twice"
                stated[m.group(1)] = (i, m.group(2))
        asked = [(i, m) for i, line in enumerate(lines) if (m := re.search(
            r"(?:mentioned in the provided text is|\? It is|number noted for \w+ was) (\d+)\.$", line))]  # fmt: skip
        assert asked
        for i, m in asked:
            word = re.search(r"for (\w+)", lines[i]).group(1)
            at, value = stated[word]
            assert at < i and value == m.group(1)
        # at most one pass key, stated before it is asked
        keys = _lines(doc, r"pass key is \d+\. Remember|Remember the pass key|secret pass key|^Pass key:")
        assert len(keys) <= 1
        for q in _lines(doc, r"pass key\? The pass key is|what was the pass key"):
            assert keys and keys[0] < q


def test_variable_chains_resolve_to_the_asked_value():
    rng = random.Random(3)
    for _ in range(50):
        fact = make_fact("variable_tracking", rng, "unused")
        values = {}
        for needle in fact.needles:
            m = re.fullmatch(r"(?:VAR (\w+) = |Let (\w+) be )(\w+)\.", needle)
            name, value = m.group(1) or m.group(2), m.group(3)
            values[name] = values.get(value, value)  # a name resolves to its value, a number to itself
        last = re.findall(r"[A-Z]{5}", fact.question)[0]
        assert fact.question.endswith(f" {values[last]}.")


def test_record_facts_vary_their_wording_and_answer_with_the_stated_number():
    """A ``record`` fact states a number for a word and an attribute in one of many wordings and asks for it in
    one of many others; every wording, attribute and pairing of the two comes up, and the answer is the number
    stated. In a document each word keys one fact, so every question has one answer."""
    from longgen.train.synthetic import RECORD_ATTRIBUTES, RECORD_QUESTIONS, RECORD_STATEMENTS

    rng = random.Random(11)
    seen = set()
    for _ in range(20_000):
        fact = make_fact("record", rng, "lantern")
        (statement,) = fact.needles
        value = re.search(r"\d+", statement).group()
        assert "lantern" in statement and "lantern" in fact.question
        assert fact.question.endswith((f" {value}.", f" {value}", statement)), (statement, fact.question)
        attribute = next(a for a in RECORD_ATTRIBUTES if re.search(rf"\b{a}\b", statement))
        s = next(i for i, f in enumerate(RECORD_STATEMENTS) if statement == f.format(a=attribute, w="lantern", v=value))
        q = next(i for i, f in enumerate(RECORD_QUESTIONS)
                 if fact.question == f.format(a=attribute, w="lantern", v=value, s=statement))  # fmt: skip
        seen.add((attribute, s, q))
    assert len(RECORD_ATTRIBUTES) * len(RECORD_STATEMENTS) * len(RECORD_QUESTIONS) > 2000
    assert len({(s, q) for _, s, q in seen}) == len(RECORD_STATEMENTS) * len(RECORD_QUESTIONS)
    assert {a for a, _, _ in seen} == set(RECORD_ATTRIBUTES)
    # in documents: a word is stated once and asked after it, with the number stated
    for seed in range(10):
        doc = retrieval_document(random.Random(seed), FILLER, 3000, 3.0, 4.0, kinds=["record", "passkey"])
        lines = [line for line in doc.split("\n") if line]
        stated = {}
        for i, line in enumerate(lines):
            for f in RECORD_STATEMENTS:
                pattern = re.escape(f).replace(r"\{a\}", r"(?P<a>\w+)").replace(r"\{w\}", r"(?P<w>\w+)")
                if (m := re.fullmatch(pattern.replace(r"\{v\}", r"(?P<v>\d+)"), line)) and i not in stated:
                    stated[i] = m
        assert stated
        for i, m in stated.items():
            asked = [j for j, line in enumerate(lines) if j != i and m["w"] in line and m["v"] in line]
            assert asked and min(asked) > i, (m.group(), asked)


def _chain_lengths(doc: str) -> list[int]:
    """Names in each variable chain of a document: a chain starts where a name is set to a number."""
    starts = len(re.findall(r"^(?:VAR [A-Z]{5} = |Let [A-Z]{5} be )\d+\.$", doc, re.M))
    hops = len(re.findall(r"^(?:VAR [A-Z]{5} = |Let [A-Z]{5} be )[A-Z]{5}\.$", doc, re.M))
    return [starts, hops]


def test_longer_chains_with_chain_max_and_the_default_unchanged(tmp_path):
    """`chain_max` sets the longest variable chain (2 names at least); the default is 4, drawing the same documents
    as before the setting; the chains of a set with 6 are longer on average."""
    docs = "".join(retrieval_document(random.Random(seed), FILLER, 3000, 3.0, 4.0) for seed in range(3))
    assert hashlib.sha256(docs.encode()).hexdigest()[:16] == "bfe94f99ca3635ed"  # the documents of before
    rng = random.Random(5)
    names = {
        m: [len(make_fact("variable_tracking", rng, "w", chain_max=m).needles) for _ in range(300)] for m in (2, 6)
    }
    assert set(names[2]) == {2} and set(names[6]) == {2, 3, 4, 5, 6}
    averages = []
    for m in (4, 6):
        write_retrieval_set(tmp_path / f"{m}.jsonl", FILLER, 20_000, (1000, 2000), 3.0, 4.0, seed=1,
                            kinds=["variable_tracking"], chain_max=m)  # fmt: skip
        text = "\n".join(json.loads(x)["text"] for x in (tmp_path / f"{m}.jsonl").read_text().splitlines())
        starts, hops = _chain_lengths(text)
        averages.append((starts + hops) / starts)
    assert 2.8 < averages[0] < 3.2 and 3.7 < averages[1] < 4.3  # uniform over 2-4 names: 3; over 2-6: 4


def test_documents_are_reproducible_and_about_the_asked_length(tmp_path):
    a = retrieval_document(random.Random(7), FILLER, 2000, 3.0, 3.0)
    assert a == retrieval_document(random.Random(7), FILLER, 2000, 3.0, 3.0)
    assert 0.8 * 2000 * 3.0 < len(a) < 1.2 * 2000 * 3.0
    made = write_retrieval_set(tmp_path / "r.jsonl", FILLER, 10_000, (500, 1500), 3.0, 3.0, seed=1)
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(rows) == made["documents"] and made["planned_tokens"] >= 10_000
    assert all(set(r) == {"text"} and r["text"] for r in rows)


def test_far_facts_are_stated_in_the_first_eighth_and_asked_at_the_end():
    question = r"(?:mentioned in the provided text is|\? It is|number noted for \w+ was) \d+\.$"  # every wording
    needle = r"^(?!What|The number noted).*numbers? (?:for|of) \w+ is:? \d+\.$"
    for seed in range(5):
        doc = retrieval_document(random.Random(seed), FILLER, 4000, 3.0, 3.0, kinds=["niah"], far_share=1.0)
        lines = doc.split("\n")
        stated, asked = _lines(doc, needle), _lines(doc, question)
        assert len(stated) == len(asked) == round(4000 * 3.0 / 1024)
        assert max(stated) < len(lines) / 8 + 2 * len(stated)  # the first eighth of the filler lines
        filler_after = [i for i, line in enumerate(lines) if line and i > min(asked) and not re.search(question, line)]
        assert not filler_after  # every question after the last filler line
        # the same document without far facts spreads them out
        spread = _lines(retrieval_document(random.Random(seed), FILLER, 4000, 3.0, 3.0, kinds=["niah"]), needle)
        assert max(spread) > len(lines) / 2


def _chain_spans(doc: str) -> list[tuple[int, int]]:
    """(line of a variable chain's first statement, line of its question) for every chain of `doc`."""
    first, spans = {}, []
    for i, line in enumerate(doc.split("\n")):
        if m := re.fullmatch(r"(?:VAR ([A-Z]+) = ([A-Z0-9]+)|Let ([A-Z]+) be ([A-Z0-9]+))\.", line):
            name, value = (m[1], m[2]) if m[1] else (m[3], m[4])
            first[name] = i if value.isdigit() else first[value]
        elif m := re.match(r"(?:What is the value of VAR ([A-Z]+)\?|Question: what is ([A-Z]+)\?)", line):
            spans.append((first[m[1] or m[2]], i))
    return spans


def test_near_facts_are_stated_just_before_their_question():
    """With near_share=1 every chain lies within the thirty-second of the filler lines before its question; without
    it the same documents spread their chains out; the shares of one fact add up to at most 1."""
    for seed in range(5):
        doc = retrieval_document(random.Random(seed), FILLER, 8000, 3.0, 3.0, kinds=["variable_tracking"],
                                 near_share=1.0)  # fmt: skip
        lines = doc.split("\n")
        filler = [bool(line) and not re.match(r"VAR |Let |What is the value|Question: what", line) for line in lines]
        spans = _chain_spans(doc)
        assert len(spans) == round(8000 * 3.0 / 1024)
        for start, ask in spans:
            assert sum(filler[start:ask]) <= sum(filler) // 32 + 1
        spread = _chain_spans(retrieval_document(random.Random(seed), FILLER, 8000, 3.0, 3.0,
                                                 kinds=["variable_tracking"]))  # fmt: skip
        assert max(ask - start for start, ask in spread) > len(lines) / 4
    with pytest.raises(ValueError, match=r"far_share \+ near_share must be at most 1"):
        retrieval_document(random.Random(0), FILLER, 100, 3.0, 3.0, far_share=0.5, near_share=0.6)
    with pytest.raises(ValueError, match=r"near_share must lie in \[0, 1\], got -0.1"):
        retrieval_document(random.Random(0), FILLER, 100, 3.0, 3.0, near_share=-0.1)


def test_without_near_facts_documents_are_those_the_recorded_runs_were_trained_on():
    """near_share=0 draws nothing: the documents, with and without far facts, are byte for byte those of the
    generator before near facts existed (the digest below was taken from it, commit 9036b92)."""
    import hashlib

    h = hashlib.sha256()
    for far in (0.0, 0.25):
        for seed in range(3):
            h.update(retrieval_document(random.Random(seed), FILLER, 3000, 3.0, 3.0, far_share=far).encode())
    assert h.hexdigest() == "dc6e2d86ba0c76cedb4a85b1231fd4147bde5fc35a20a3c295f575c6faa4b169"


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown kind of fact 'x'"):
        make_fact("x", random.Random(0), "w")
    with pytest.raises(ValueError, match="kinds must be some of"):
        retrieval_document(random.Random(0), FILLER, 100, 3.0, 3.0, kinds=["nope"])
    with pytest.raises(ValueError, match="no texts"):
        retrieval_document(random.Random(0), [], 100, 3.0, 3.0)
    with pytest.raises(ValueError, match=r"far_share must lie in \[0, 1\], got 1.5"):
        retrieval_document(random.Random(0), FILLER, 100, 3.0, 3.0, far_share=1.5)
    for bad in (1, 2.5, True):
        with pytest.raises(ValueError, match=rf"chain_max .* must be an integer >= 2, got {bad!r}"):
            retrieval_document(random.Random(0), FILLER, 100, 3.0, 3.0, chain_max=bad)
    with pytest.raises(ValueError, match="1 <= min <= max"):
        write_retrieval_set(tmp_path / "r.jsonl", FILLER, 10, (50, 10), 3.0, 3.0, seed=0)


def test_tokenizer_splits_digits_and_round_trips(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(FILLER):
        (corpus / f"{i}.txt").write_text(text + "The pass key is 12345. 2024 was a year.\n")
    tok = train_bpe_tokenizer(corpus, 320)
    text = "The pass key is 4827193. Remember it."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    pieces = [tok.decode([i]) for i in ids]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("4827193")
    assert tok.eos_token == "</s>" and tok.pad_token == "</s>"
    with pytest.raises(ValueError, match="vocab_size must be an int >= 300"):
        train_bpe_tokenizer(corpus, 100)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        train_bpe_tokenizer(tmp_path / "empty", 400)


def test_the_first_wording_is_the_evaluations():
    from longgen.eval.prompts import NIAH_NEEDLE, PASSKEY_NEEDLE
    from longgen.train.synthetic import NIAH_NEEDLES, PASSKEY_NEEDLES

    assert PASSKEY_NEEDLES[0] == PASSKEY_NEEDLE.strip("\n")
    assert NIAH_NEEDLES[0] == NIAH_NEEDLE.strip("\n")


def test_count_tokens_keeps_every_document_within_the_longest_length(tmp_path):
    """Lengths are planned in characters; with a token counter no document is longer than lengths[1] tokens."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(FILLER):
        (corpus / f"{i}.txt").write_text(text)
    tokenizer = train_bpe_tokenizer(corpus, 300)

    def count(docs):
        return [len(ids) for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]

    # 6 characters a token is far more than this tokenizer's: planned documents come out about twice too long
    args = (FILLER, 6_000, (300, 600), 6.0, 3.0)
    plain = write_retrieval_set(tmp_path / "plain.jsonl", *args, seed=2)
    texts = [json.loads(x)["text"] for x in (tmp_path / "plain.jsonl").read_text().splitlines()]
    assert max(count(texts)) > 600 and "remade" not in plain
    fitted = write_retrieval_set(tmp_path / "fit.jsonl", *args, seed=2, count_tokens=count)
    texts = [json.loads(x)["text"] for x in (tmp_path / "fit.jsonl").read_text().splitlines()]
    assert max(count(texts)) <= 600 and fitted["remade"] > 0 and fitted["too_long"] == 0
    assert fitted["tokens"] == sum(count(texts)) and fitted["documents"] == len(texts) == plain["documents"]
