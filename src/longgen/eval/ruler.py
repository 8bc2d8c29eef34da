"""RULER-style synthetic samples (Hsieh et al., *RULER: What's the Real Context Size of Your Long-Context
Language Models?*): needles, questions and expected answers for each sub-task, built at an exact length."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from longgen.eval.prompts import Haystack, Prompt, build_prompt

RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Sample:
    prompt: Prompt
    answers: list[str]
    info: dict[str, Any]


def _magic_number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _needle(key: str, value: str) -> str:
    return f" One of the special magic numbers for {key} is: {value}. "


def niah_sample(
    tokenizer, length, haystack: Haystack, rng: random.Random, *, keys: int = 1, values: int = 1, **kw
) -> Sample:
    """`keys` key-value needles (distractors: all but the asked one), the asked key holding `values` values."""
    words = haystack.words(200)
    names = rng.sample(words, keys)
    asked = names[0]
    answers = [_magic_number(rng) for _ in range(values)]
    needles = [_needle(asked, v) for v in answers] + [_needle(k, _magic_number(rng)) for k in names[1:]]
    rng.shuffle(needles)
    depths = [rng.random() for _ in needles]
    if values > 1:
        question = f"\nWhat are all the special magic numbers for {asked} mentioned in the provided text?"
        prefix = f"The special magic numbers for {asked} mentioned in the provided text are"
    else:
        question = f"\nWhat is the special magic number for {asked} mentioned in the provided text?"
        prefix = f"The special magic number for {asked} mentioned in the provided text is"
    prompt = build_prompt(tokenizer, length, haystack, needles, depths, question, prefix, **kw)
    return Sample(prompt, answers, {"key": asked, "keys": names, "depths": prompt.depths})


def vt_sample(tokenizer, length, haystack: Haystack, rng: random.Random, *, hops: int = 4, **kw) -> Sample:
    """Variable tracking: ``VAR A = 12345``, ``VAR B = A``, ... spread in order through the haystack."""
    value = str(rng.randint(10_000, 99_999))
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(_LETTERS) for _ in range(5))
        if name not in names:
            names.append(name)
    needles = [f" VAR {names[0]} = {value}. "] + [f" VAR {b} = {a}. " for a, b in itertools.pairwise(names)]
    depths = sorted(rng.random() for _ in needles)
    question = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
    prefix = (
        f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} variables "
        f"are assigned the value {value}, they are:"
    )
    prompt = build_prompt(tokenizer, length, haystack, needles, depths, question, prefix, **kw)
    return Sample(prompt, names, {"value": value, "depths": prompt.depths})


def cwe_sample(
    tokenizer, length, haystack: Haystack, rng: random.Random, *, common: int = 10, tries: int = 20, **kw
) -> Sample:
    """Common-words extraction: a numbered list of words in which `common` words repeat far more often than the
    others; the answer is those words. Counts scale with the length (RULER: 30 vs 3 at long lengths)."""
    question = f"\nQuestion: What are the {common} most common words in the above list?"
    prefix = f"Answer: The top {common} words that appear most often in the list are:"
    probe = build_prompt(tokenizer, length, [0] * length, question=question, answer_prefix=prefix, **kw)
    budget = probe.haystack_tokens
    per_entry = len(tokenizer(" 100. example", add_special_tokens=False)["input_ids"])
    entries = int(budget / per_entry * 1.2) + 1  # overfill, then trim to the exact budget
    common_freq = max(2, min(30, entries // (2 * common)))
    rare_freq = max(1, common_freq // 10)
    n_rare = max(1, (entries - common * common_freq) // rare_freq)
    words = haystack.words(common + n_rare)
    for _ in range(tries):
        chosen = rng.sample(words, common + n_rare)
        top, rare = chosen[:common], chosen[common:]
        listed = top * common_freq + rare * rare_freq
        rng.shuffle(listed)
        ids: list[int] = []
        kept: list[str] = []
        for i, w in enumerate(listed):
            if len(ids) >= budget:
                break
            ids += tokenizer(f" {i + 1}. {w}", add_special_tokens=False)["input_ids"]
            kept.append(w)
        if len(ids) < budget:
            continue
        counts = Counter(kept[:-1])  # the last entry may be cut
        rare_max = max((counts[w] for w in rare), default=0)
        if all(counts[w] > rare_max for w in top):
            prompt = build_prompt(tokenizer, length, ids[:budget], question=question, answer_prefix=prefix, **kw)
            return Sample(prompt, top, {"common_freq": common_freq, "rare_freq": rare_freq, "entries": len(kept)})
    raise ValueError(
        f"cannot fit a common-words list with {common} common words into {length} tokens; "
        "use a longer length or fewer common words"
    )


def ruler_sample(
    name: str, tokenizer, length: int, haystack: Haystack, rng: random.Random, *, cwe_words: int = 10, **kw
) -> Sample:
    """One sample of RULER sub-task `name` (see `RULER_TASKS`); `kw` goes to `build_prompt` (chat, max_length)."""
    if name == "niah_single":
        return niah_sample(tokenizer, length, haystack, rng, **kw)
    if name == "niah_multikey":
        return niah_sample(tokenizer, length, haystack, rng, keys=4, **kw)
    if name == "niah_multivalue":
        return niah_sample(tokenizer, length, haystack, rng, values=4, **kw)
    if name == "vt":
        return vt_sample(tokenizer, length, haystack, rng, **kw)
    if name == "cwe":
        return cwe_sample(tokenizer, length, haystack, rng, common=cwe_words, **kw)
    raise ValueError(f"unknown RULER task {name!r}; choose from {RULER_TASKS}")
