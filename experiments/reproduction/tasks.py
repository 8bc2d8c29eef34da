"""The retrieval prompts: five tasks, each a prompt of an exact length and the answer greedy decoding must give.

Prompts are built by `longgen.eval.build_prompt` from a haystack of held-out text (a random window of it per
prompt) and are a function of (seed, task, length, index) only, so every variant answers the same prompts. The
needle depth of prompt i of n is i / (n - 1): depths evenly cover the context from its start to its end.

* ``passkey``, ``niah`` — worded exactly as `longgen.eval.passkey` / `longgen.eval.niah`;
* ``niah_multikey`` — four magic-number needles keyed by different words of the haystack, one asked for;
* ``variable_tracking`` — ``VAR A = 12345.`` ... ``VAR B = A.`` ... ``VAR C = B.``, asked for C's value (two hops);
* ``parcel_weight`` (held out) — ``The lantern parcel weighs 4821733 grams.``, asked ``How heavy is the lantern
  parcel?``: a fact in a template the training data never contains (its synthetic documents state pass keys,
  magic numbers and variables in their own wordings), so answering shows that the model finds a stated fact in
  the distant context, not that it memorised a question's template. (The first held-out task, ``kv_lookup``, a
  Python dict literal asked for as a doctest line, was answered by no model, full attention included: it
  separated nothing.)
"""

from __future__ import annotations

import itertools
import random
import re
import time
from dataclasses import dataclass
from typing import Any

from longgen.eval import build_prompt
from longgen.eval.forced import greedy_matches
from longgen.eval.prompts import (
    NIAH_ANSWER_PREFIX,
    NIAH_NEEDLE,
    NIAH_QUESTION,
    PASSKEY_ANSWER_PREFIX,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
)

from .settings import TASKS


@dataclass(frozen=True)
class Item:
    task: str
    length: int
    index: int
    depth: float
    input_ids: list[int]
    answer: str  # the text greedy decoding must continue the prompt with
    answer_ids: list[int]
    reach: int = 0  # tokens from the first needle's start to the prompt's end


def _rng(*parts: object) -> random.Random:
    return random.Random(":".join(map(str, parts)))


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randint(10 ** (n - 1), 10**n - 1))


def haystack_words(tokenizer: Any, pool: list[int], n: int = 400) -> list[str]:
    """Distinct lowercase words (5-10 letters) of the haystack: the keys of the magic numbers."""
    text = tokenizer.decode(pool[:200_000])
    return list(dict.fromkeys(re.findall(r"\b[a-z]{5,10}\b", text)))[:n]


def _spec(task: str, rng: random.Random, depth: float, words: list[str]):
    """(needles, their depths, question, answer prefix, answer) of one prompt."""
    if task == "passkey":
        k = _digits(rng, 5)
        return [PASSKEY_NEEDLE.format(k=k)], [depth], PASSKEY_QUESTION, PASSKEY_ANSWER_PREFIX, f" {k}"
    if task in ("niah", "niah_multikey"):
        keys = rng.sample(words, 4 if task == "niah_multikey" else 1)
        values = [_digits(rng, 7) for _ in keys]
        needles = [NIAH_NEEDLE.format(w=w, v=v) for w, v in zip(keys, values, strict=True)]
        depths = [depth] + [rng.random() for _ in keys[1:]]
        prefix = NIAH_ANSWER_PREFIX.format(w=keys[0])
        return needles, depths, NIAH_QUESTION.format(w=keys[0]), prefix, f" {values[0]}"
    if task == "variable_tracking":
        v = _digits(rng, 5)
        names: list[str] = []
        while len(names) < 3:
            name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if name not in names:
                names.append(name)
        needles = [
            f"\nVAR {names[0]} = {v}.\n",
            f"\nVAR {names[1]} = {names[0]}.\n",
            f"\nVAR {names[2]} = {names[1]}.\n",
        ]
        depths = [depth, *sorted(depth + (1 - depth) * rng.random() for _ in range(2))]
        return needles, depths, f"\nWhat is the value of VAR {names[2]}?", f"The value of VAR {names[2]} is", f" {v}"
    if task == "parcel_weight":
        w, v = rng.choice(words), _digits(rng, 7)
        needle = f"\nThe {w} parcel weighs {v} grams.\n"
        return [needle], [depth], f"\nHow heavy is the {w} parcel?", f"The {w} parcel weighs", f" {v}"
    raise ValueError(f"unknown task {task!r}; tasks: {TASKS}")


def needle_depths(task: str, seed: int, length: int, index: int, per_task: int) -> list[float]:
    """The depths of the needles that prompt `index` of (task, length) of the standard evaluation (not the near
    probe's) needs for its answer, as `build_items` draws them: the asked needle's, and a variable chain's three in
    order (its value, then each name). Recomputed from the seed without the haystack, which only the distractor
    needles of ``niah_multikey`` read (their keys are the haystack's words), and they are not among them."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {TASKS}")
    if not 0 <= index < per_task:
        raise ValueError(f"prompt index {index} out of range: {per_task} prompts per task")
    depth = index / (per_task - 1)
    if task == "variable_tracking":  # the chain's later needles are drawn after its value and names
        return _spec(task, _rng(seed, task, length, index), depth, [])[1]
    return [depth]


def needle_gaps(task: str, seed: int, length: int, index: int, per_task: int, answer_room: int) -> list[float]:
    """The tokens between the needles `needle_depths` gives, in that order, the last gap to the question: a needle at
    depth d of a length-n prompt lies about (1 - d)(n - answer_room) tokens before the question (the haystack is the
    prompt less its template, needles and question, so to within those few dozen tokens)."""
    at = [*needle_depths(task, seed, length, index, per_task), 1.0]
    return [(b - a) * (length - answer_room) for a, b in itertools.pairwise(at)]


def build_items(tokenizer: Any, pool: list[int], words: list[str], lengths, per_task: int, answer_room: int,
                seed: int, tasks=TASKS, near: int | None = None) -> list[Item]:  # fmt: skip
    """Every prompt of the evaluation: `per_task` per (task, length); a length-n prompt has n - answer_room tokens
    (the answer and the token after it fit within n).

    `near` (the near-question probe's prompts, another set drawn from the same seed): every needle lies within
    `near` haystack tokens before the question instead, at uniformly drawn distances, the first needle farthest
    (a variable chain keeps its order); `Item.reach` says how far back the first one starts."""
    if near is not None and not 0 < near < min(lengths) - answer_room:
        raise ValueError(f"near must lie between 0 and the shortest prompt ({min(lengths) - answer_room}), got {near}")
    items = []
    for task in tasks:
        for n in lengths:
            size = n - answer_room
            for i in range(per_task):
                rng = _rng(seed, task, n, i) if near is None else _rng(seed, "near", task, n, i)
                depth = i / (per_task - 1)
                needles, depths, question, prefix, answer = _spec(task, rng, depth, words)
                if near is not None:
                    depths = sorted(1 - rng.uniform(0, near) / size for _ in needles)
                    depth = depths[0]
                if len(pool) < size:
                    raise ValueError(f"the haystack has {len(pool)} tokens; prompts of {size} tokens need more")
                start = rng.randrange(len(pool) - size + 1)
                prompt = build_prompt(tokenizer, size, pool[start : start + size], needles, depths, question, prefix)
                answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
                reach = len(prompt.input_ids) - min(prompt.needle_starts)
                items.append(Item(task, n, i, depth, prompt.input_ids, answer, answer_ids, reach))
    return items


def score_items(model: Any, tokenizer: Any, items: list[Item], lengths, log=print) -> list[dict[str, Any]]:
    """One record per item (task, length, index, depth, answer, correct), scored by `greedy_matches` one length
    at a time (`log` gets each length's accuracy); records come in the order they were scored."""
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for n in lengths:
        group = [it for it in items if it.length == n]
        correct = greedy_matches(model, [it.input_ids for it in group], [it.answer_ids for it in group],
                                 reject_next=digit_ids(tokenizer), pad_id=tokenizer.eos_token_id)  # fmt: skip
        records += [{"task": it.task, "length": it.length, "index": it.index, "depth": it.depth, "answer": it.answer,
                     "correct": ok} for it, ok in zip(group, correct, strict=True)]  # fmt: skip
        seconds = time.perf_counter() - t0
        log(f"  {n:>6} tokens: {sum(correct) / len(group):.1%} of {len(group)} prompts ({seconds:.0f} s)")
    return records


def digit_ids(tokenizer: Any) -> list[int]:
    """Token ids that are a single digit: a number's answer must not be followed by one."""
    ids = [tokenizer.convert_tokens_to_ids(d) for d in "0123456789"]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]
