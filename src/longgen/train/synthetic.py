"""Synthetic retrieval documents: real text in which facts are stated at random places and asked for later.

A model pre-trained from scratch for minutes (the demo, the reproduction) has never been taught to look things
up in a long context; these documents teach it, so that what then separates full attention from a hybrid is
whether the attention can reach the fact, not whether the model knows the task. Three kinds of fact, each in
several wordings (the first wording of each is the one `longgen.eval`'s prompts use):

* ``passkey`` — "The pass key is 12345. ..." (at most one a document, so the question is never ambiguous);
* ``niah`` — magic numbers keyed by a word of the document ("The special magic number for lantern is: ...");
  several a document, so every other one is a distractor (multi-key retrieval);
* ``variable_tracking`` — a chain ``VAR A = 12345. ... VAR B = A. ...`` of 2 to ``chain_max`` names
  (``CHAIN_MAX``, 4, unless given), asked for by its last name.

and, only where `kinds` names it (``FACT_KINDS``; not in ``RETRIEVAL_KINDS``, the default):

* ``record`` — a number stated for a word and an attribute in one of many wordings, asked in one of many others,
  three of the ten repeating the statement itself: ``RECORD_ATTRIBUTES`` x ``RECORD_STATEMENTS`` x
  ``RECORD_QUESTIONS``, over 2,000 combinations, drawn at random. No template is taught: what can generalise is
  finding the earlier statement about a word, however worded, and copying its number, the skill an evaluation
  task in a template never trained on asks for. (In the quality experiment it carried to such a task within
  about 12K tokens of the question, not beyond 16K: ``experiments/results/probes/2026-12-07-record-facts``.)

Needles sit at uniformly random lines, including the first; half the questions come at the end of the document
(as in an evaluation prompt, so the needle-question distance covers the whole length), the others at a random
later line (so a piece of a document cut by packing still holds answerable questions). With ``far_share``, that
share of the facts is stated in the first eighth of the document and asked at its end: the longest distances,
rare under uniform placement. With ``near_share``, that share is stated wholly within the thirty-second of the
document's lines just before its question (asked at the end or at a random line): in a long document the shortest
distances, which uniform placement all but never gives a variable chain.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

RETRIEVAL_KINDS = ("passkey", "niah", "variable_tracking")  # the default kinds
FACT_KINDS = (*RETRIEVAL_KINDS, "record")  # every kind
CHAIN_MAX = 4  # names in the longest variable chain unless `chain_max` says otherwise
_FALLBACK_WORDS = ("apple", "river", "castle", "garden", "silver", "window", "thunder", "lantern", "meadow", "harbor")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

PASSKEY_NEEDLES = (
    "The pass key is {k}. Remember it. {k} is the pass key.",
    "Remember the pass key: {k}.",
    "The secret pass key is {k}; do not forget it.",
    "Pass key: {k}. Keep it in mind.",
)
PASSKEY_QUESTIONS = (
    "What is the pass key? The pass key is {k}.",
    "Recall the pass key. The pass key is {k}.",
    "Question: what was the pass key? Answer: {k}.",
)
NIAH_NEEDLES = (
    "The special magic number for {w} is: {v}.",
    "One of the special magic numbers for {w} is: {v}.",
    "The magic number of {w} is {v}.",
    "Note: the number for {w} is {v}.",
)
NIAH_QUESTIONS = (
    "What is the special magic number for {w} mentioned in the provided text? "
    "The special magic number for {w} mentioned in the provided text is {v}.",
    "What is the magic number for {w}? It is {v}.",
    "The number noted for {w} was {v}.",
)
VT_FIRST = ("VAR {a} = {v}.", "Let {a} be {v}.")
VT_HOP = ("VAR {b} = {a}.", "Let {b} be {a}.")
VT_QUESTIONS = ("What is the value of VAR {b}? The value of VAR {b} is {v}.", "Question: what is {b}? Answer: {v}.")
RECORD_ATTRIBUTES = (
    "code", "count", "price", "score", "level", "index", "serial", "balance", "rank", "total",
    "budget", "quota", "offset", "limit", "version", "port", "seat", "ticket", "room", "batch",
)  # fmt: skip
RECORD_STATEMENTS = (
    "The {a} of {w} is {v}.",
    "{w} has a {a} of {v}.",
    "{a} for {w}: {v}",
    "Set the {a} of {w} to {v}.",
    "[{w}] {a} = {v}",
    "Record {w} lists {a} {v}.",
    "Entry: {w}; {a}: {v}.",
    "Note that {w} carries {a} {v}.",
    "Under {w}, the {a} reads {v}.",
    "{w}/{a} -> {v}",
    "For the record, {w} got {a} {v}.",
    "{v} is the {a} of {w}.",
)
RECORD_QUESTIONS = (  # {s}: the statement again, the number included
    "What is the {a} of {w}? The {a} of {w} is {v}.",
    "Q: the {a} for {w}? A: {v}.",
    "Look up {w}. Its {a} is {v}.",
    "Recall the {a} of {w}: {v}.",
    "{w} {a}? {v}.",
    "Asked for the {a} under {w}, the answer is {v}.",
    "Which {a} was given for {w}? {v}.",
    "Repeat what was said of the {a} of {w}. {s}",
    "Quote the line on {w} and {a}: {s}",
    "Find {w} ({a}) above: {s}",
)


@dataclass(frozen=True)
class Fact:
    """Needle texts, stated in this order at increasing places, and the question (with its answer) after them."""

    needles: tuple[str, ...]
    question: str


def _pick(rng: random.Random, templates: Sequence[str]) -> str:
    """The evaluation's wording half of the time, another one otherwise."""
    return templates[0] if rng.random() < 0.5 else rng.choice(templates[1:])


def _number(rng: random.Random, digits: tuple[int, int]) -> str:
    n = rng.randint(*digits)
    return str(rng.randint(10 ** (n - 1), 10**n - 1))


def make_fact(kind: str, rng: random.Random, word: str, chain_max: int = CHAIN_MAX) -> Fact:
    """One fact of `kind` (see `RETRIEVAL_KINDS`); `word` keys the magic number of a ``niah`` fact; a
    ``variable_tracking`` chain has 2 to `chain_max` names."""
    if kind == "passkey":
        k = _number(rng, (4, 7))
        return Fact((_pick(rng, PASSKEY_NEEDLES).format(k=k),), _pick(rng, PASSKEY_QUESTIONS).format(k=k))
    if kind == "niah":
        v = _number(rng, (5, 8))
        return Fact((_pick(rng, NIAH_NEEDLES).format(w=word, v=v),), _pick(rng, NIAH_QUESTIONS).format(w=word, v=v))
    if kind == "variable_tracking":
        v, style = _number(rng, (4, 6)), rng.randrange(2)
        _check_chain_max(chain_max)
        names = ["".join(rng.choice(_LETTERS) for _ in range(5)) for _ in range(rng.randint(2, chain_max))]
        needles = [VT_FIRST[style].format(a=names[0], v=v)]
        needles += [VT_HOP[style].format(a=a, b=b) for a, b in itertools.pairwise(names)]
        return Fact(tuple(needles), VT_QUESTIONS[style].format(b=names[-1], v=v))
    if kind == "record":
        a, v = rng.choice(RECORD_ATTRIBUTES), _number(rng, (4, 8))
        statement = rng.choice(RECORD_STATEMENTS).format(a=a, w=word, v=v)
        return Fact((statement,), rng.choice(RECORD_QUESTIONS).format(a=a, w=word, v=v, s=statement))
    raise ValueError(f"unknown kind of fact {kind!r}; choose from {FACT_KINDS}")


def _check_chain_max(chain_max: int) -> None:
    if isinstance(chain_max, bool) or not isinstance(chain_max, int) or chain_max < 2:
        raise ValueError(f"chain_max (names in the longest variable chain) must be an integer >= 2, got {chain_max!r}")


def _distinct(found: list[str], n: int) -> list[str]:
    """`n` distinct keys: the words found, then numbered copies of them (or of a fixed list when none)."""
    base = found or list(_FALLBACK_WORDS)
    return [base[i % len(base)] + (str(i // len(base)) if i >= len(base) else "") for i in range(n)]


def _filler(rng: random.Random, texts: Sequence[str], chars: int) -> list[str]:
    """About `chars` characters of random pieces of `texts`, as lines."""
    parts, have = [], 0
    while have < chars:
        text = texts[rng.randrange(len(texts))]
        start = rng.randrange(len(text)) if len(text) > chars - have else 0
        parts.append(text[start : start + chars - have])
        have += len(parts[-1]) + 2
    return "\n\n".join(parts).split("\n") if parts else []


def retrieval_document(
    rng: random.Random,
    texts: Sequence[str],
    n_tokens: int,
    chars_per_token: float,
    facts_per_1k: float,
    kinds: Sequence[str] = RETRIEVAL_KINDS,
    far_share: float = 0.0,
    chain_max: int = CHAIN_MAX,
    near_share: float = 0.0,
) -> str:
    """About `n_tokens` tokens of `texts` with ``facts_per_1k`` facts per 1,024 tokens (at least one) of the
    given `kinds`, each stated at random lines and asked for later (see the module's docstring). `far_share`:
    the share of facts, on average, whose needles sit in the first eighth of the lines and whose question comes
    at the end: distances near the document's whole length, rare under uniform placement. `near_share`: the share
    whose needles all sit in the thirty-second of the lines just before their question: a whole variable chain
    near its question, which uniform placement all but never gives in a long document. `chain_max`: names in the
    longest variable chain (at least 2)."""
    if not texts:
        raise ValueError("retrieval documents need some filler text; got no texts")
    for name, share in (("far_share", far_share), ("near_share", near_share)):
        if not 0 <= share <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {share}")
    if far_share + near_share > 1:
        raise ValueError(f"far_share + near_share must be at most 1 (shares of the same facts), got "
                         f"{far_share} + {near_share}")  # fmt: skip
    unknown = [k for k in kinds if k not in FACT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be some of {FACT_KINDS}, got {list(kinds)}")
    _check_chain_max(chain_max)
    n_facts = max(1, round(n_tokens * facts_per_1k / 1024))
    lines = _filler(rng, texts, int(n_tokens * chars_per_token))
    found = list(dict.fromkeys(re.findall(r"\b[a-z]{4,10}\b", "\n".join(lines))))
    words = rng.sample(found, n_facts) if len(found) >= n_facts else _distinct(found, n_facts)
    choices = list(kinds)
    facts = []
    for i in range(n_facts):
        kind = rng.choice(choices)
        if kind == "passkey" and len(choices) > 1:
            choices.remove("passkey")  # one pass key a document
        facts.append(make_fact(kind, rng, words[i], chain_max))
    # fewer characters of filler for what the facts add
    extra = sum(len(n) + 2 for f in facts for n in f.needles) + sum(len(f.question) + 2 for f in facts)
    lines = lines[: max(1, len(lines) - extra // 40)]
    events = []  # (line slot, order, text): needles before their question, in chain order
    near = max(1, len(lines) // 32)  # lines of a near fact's span
    for j, fact in enumerate(facts):
        # one draw decides far, near or anywhere; none when both shares are 0, so such documents stay as they were
        u = rng.random() if far_share or near_share else 1.0
        if u < far_share:
            slots = sorted(rng.randint(0, len(lines) // 8) for _ in fact.needles)
            ask = len(lines)
        elif u < far_share + near_share:
            ask = len(lines) if rng.random() < 0.5 else rng.randint(near, len(lines))
            slots = sorted(rng.randint(max(0, ask - near), ask) for _ in fact.needles)
        else:
            slots = sorted(rng.randint(0, len(lines)) for _ in fact.needles)
            ask = len(lines) if rng.random() < 0.5 else rng.randint(slots[-1], len(lines))
        events += [
            (slot, 0, j, i, f"\n{text}\n") for i, (slot, text) in enumerate(zip(slots, fact.needles, strict=True))
        ]
        events.append((ask, 1, j, 0, f"\n{fact.question}\n"))
    events.sort()
    out, e = [], 0
    for slot in range(len(lines) + 1):
        while e < len(events) and events[e][0] == slot:
            out.append(events[e][4])
            e += 1
        if slot < len(lines):
            out.append(lines[slot] + "\n")
    return "".join(out)


def write_jsonl(path: str | os.PathLike, texts: Sequence[str]) -> None:
    """One ``{"text": ...}`` object a line (a `longgen.train` data source), written atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, path)


def write_retrieval_set(
    path: str | os.PathLike,
    texts: Sequence[str],
    total_tokens: int,
    lengths: tuple[int, int],
    chars_per_token: float,
    facts_per_1k: float,
    seed: int,
    kinds: Sequence[str] = RETRIEVAL_KINDS,
    count_tokens: Callable[[list[str]], list[int]] | None = None,
    far_share: float = 0.0,
    chain_max: int = CHAIN_MAX,
    near_share: float = 0.0,
) -> dict[str, int]:
    """Retrieval documents of uniformly random lengths in `lengths` (tokens) until about `total_tokens`, written
    as ``.jsonl`` to `path`; returns their count and planned tokens.

    Lengths are planned in characters (`chars_per_token` is an average, and numbers cost more tokens than prose),
    so a document may come out longer than planned; one longer than a training sequence is cut by packing, and
    the questions at its end lose their needles. With `count_tokens` (texts -> their token counts, e.g. a batch
    call of the tokenizer) a document longer than ``lengths[1]`` tokens is made again from a plan shortened by
    its measured excess, up to 10 times (``remade`` counts the documents made again, ``too_long`` those still
    longer after that: their facts alone do not fit), and ``tokens`` is the measured total. `far_share`,
    `near_share`, `chain_max`: see `retrieval_document`.
    """
    lo, hi = lengths
    if not 1 <= lo <= hi:
        raise ValueError(f"lengths must be (min, max) with 1 <= min <= max, got {lengths}")
    rng = random.Random(f"{seed}:retrieval:{Path(path).name}")
    planned, n_tokens = [], 0
    while n_tokens < total_tokens:
        planned.append(rng.randint(lo, hi))
        n_tokens += planned[-1]
    made = functools.partial(
        retrieval_document, rng, texts, chars_per_token=chars_per_token, facts_per_1k=facts_per_1k, kinds=kinds,
        far_share=far_share, chain_max=chain_max, near_share=near_share,
    )  # fmt: skip
    docs = [made(n_tokens=n) for n in planned]
    out: dict[str, int] = {"documents": len(docs), "planned_tokens": n_tokens}
    if count_tokens is None:
        write_jsonl(path, docs)
        return out
    counts, plans, remade = list(count_tokens(docs)), list(planned), 0
    for _ in range(10):  # a document's facts do not shrink with its plan: at most 10 attempts
        over = [i for i, n in enumerate(counts) if n > hi]
        if not over:
            break
        for i in over:
            plans[i] = max(1, int(plans[i] * planned[i] / counts[i] * 0.98))
            docs[i] = made(n_tokens=plans[i])
        for i, n in zip(over, count_tokens([docs[i] for i in over]), strict=True):
            counts[i] = n
        remade += len(over)
    write_jsonl(path, docs)
    return {**out, "tokens": sum(counts), "remade": remade, "too_long": sum(n > hi for n in counts)}
