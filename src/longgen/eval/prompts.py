"""Prompts of an exact token length: a haystack of real text, needles at chosen depths, a question at the end.

Prompts are built from token ids, never by re-encoding a finished string: every piece (chat-template head,
needles, question) is tokenized on its own with the model's tokenizer, the haystack's ids are trimmed to fill
the remaining budget, and the pieces are concatenated. The result therefore has exactly the requested length
and is passed to the model as ids. (Decoding and re-encoding the prompt may differ by a few tokens where two
pieces meet; the text stored in result files is for reading only.)
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONTEXT_MARKER = "\x00LONGGEN_CONTEXT\x00"  # stands for the context inside a rendered chat template

# The wording of the pass-key and needle tasks (`passkey`, `niah`), for every prompt built from them: format with
# k (the key), w (the word) and v (the value).
PASSKEY_NEEDLE = "\nThe pass key is {k}. Remember it. {k} is the pass key.\n"
PASSKEY_QUESTION, PASSKEY_ANSWER_PREFIX = "\nWhat is the pass key?", "The pass key is"
NIAH_NEEDLE = "\nThe special magic number for {w} is: {v}.\n"
NIAH_QUESTION = "\nWhat is the special magic number for {w} mentioned in the provided text?"
NIAH_ANSWER_PREFIX = "The special magic number for {w} mentioned in the provided text is"


def default_haystack_files() -> list[Path]:
    """The Python standard library's top-level modules (their docstrings are the default haystack)."""
    return sorted(Path(os.path.dirname(os.__file__)).glob("*.py"))


def _docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
    return "\n\n".join(d.strip() for d in docs if d and d.strip())


def named_texts(files: Sequence[str | os.PathLike] | None = None) -> Iterator[tuple[str, str]]:
    """(name, text) of each haystack source: the given text files as they are (a directory contributes its files,
    sorted, recursively), or by default the docstrings of each standard library module."""
    if files is None:
        for path in default_haystack_files():
            text = _docstrings(path)
            if text:
                yield str(path), text
        return
    for f in files:
        path = Path(f)
        if path.is_dir():
            inner = sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            inner = [path]
        else:
            raise ValueError(f"haystack file {path} does not exist")
        for p in inner:
            text = p.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield str(p), text


def haystack_texts(files: Sequence[str | os.PathLike] | None = None) -> Iterator[str]:
    """Texts of the haystack (see `named_texts`)."""
    return (text for _, text in named_texts(files))


class Haystack:
    """Token ids of the haystack text, tokenized lazily, as many as asked for (ValueError when the text runs out)."""

    def __init__(self, tokenizer: Any, files: Sequence[str | os.PathLike] | None = None):
        self.tokenizer = tokenizer
        self.files = None if files is None else [str(f) for f in files]
        self._texts = haystack_texts(files)
        self._ids: list[int] = []
        self._words: list[str] | None = None

    def tokens(self, n: int) -> list[int]:
        """The first `n` token ids of the haystack."""
        while len(self._ids) < n:
            text = next(self._texts, None)
            if text is None:
                source = "the standard library's docstrings" if self.files is None else f"{self.files}"
                raise ValueError(
                    f"the haystack ({source}) has only {len(self._ids)} tokens, {n} are needed; "
                    "pass more or longer text files"
                )
            self._ids += self.tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
        return self._ids[:n]

    def words(self, n: int) -> list[str]:
        """`n` distinct lowercase words (4 to 10 letters) of the haystack text, in order of first appearance."""
        if self._words is None:
            self._words, self._word_texts = [], haystack_texts(self.files)
        seen = set(self._words)
        while len(self._words) < n:
            text = next(self._word_texts, None)
            if text is None:
                raise ValueError(f"the haystack has only {len(self._words)} distinct words, {n} are needed")
            for w in re.findall(r"\b[a-z]{4,10}\b", text):
                if w not in seen:
                    seen.add(w)
                    self._words.append(w)
        return self._words[:n]


@dataclass
class Prompt:
    """A prompt as token ids, with where its needles went.

    `needle_starts[i]` is the token index of needle i in `input_ids`; `insert_at[i]` its position inside the
    haystack (0 = before the first haystack token, `haystack_tokens` = after the last); `depths` those
    positions divided by `haystack_tokens` (the depths actually used).
    """

    input_ids: list[int]
    needle_starts: list[int] = field(default_factory=list)
    insert_at: list[int] = field(default_factory=list)
    haystack_tokens: int = 0
    head_tokens: int = 0

    @property
    def depths(self) -> list[float]:
        return [p / self.haystack_tokens if self.haystack_tokens else 0.0 for p in self.insert_at]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _head_and_tail(tokenizer: Any, question: str, answer_prefix: str, chat: bool) -> tuple[list[int], list[int]]:
    if not chat:
        head = tokenizer("", add_special_tokens=True)["input_ids"]  # e.g. Llama's BOS
        tail = question + (" " + answer_prefix if answer_prefix else "")
        return head, _encode(tokenizer, tail)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True needs a tokenizer with a chat template; this tokenizer has none (use chat=False)")
    messages = [{"role": "user", "content": CONTEXT_MARKER + question}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if rendered.count(CONTEXT_MARKER) != 1:
        raise ValueError("the tokenizer's chat template does not render the user message as it is")
    before, after = rendered.split(CONTEXT_MARKER)
    return _encode(tokenizer, before), _encode(tokenizer, after + answer_prefix)


def build_prompt(
    tokenizer: Any,
    length: int,
    haystack: Haystack | Sequence[int],
    needles: Sequence[str] = (),
    depths: Sequence[float] = (),
    question: str = "",
    answer_prefix: str = "",
    *,
    chat: bool = False,
    max_length: int | None = None,
) -> Prompt:
    """A prompt of exactly `length` tokens: head, haystack with `needles` at `depths`, question, answer prefix.

    Args:
        tokenizer: the model's (Hugging Face) tokenizer.
        length: total tokens of the prompt.
        haystack: a `Haystack`, or token ids (at least as many as the haystack budget).
        needles: texts inserted into the haystack; `depths[i]` in [0, 1] places needle i (0.0: before the
            haystack, 1.0: after it, just before the question). Needles at equal depths keep their order.
        question, answer_prefix: the text after the context; with `chat=True` the question ends the user
            message and the answer prefix follows the assistant turn's start.
        chat: wrap the context and question in `tokenizer.apply_chat_template` (ValueError if it has none).
        max_length: the model's `max_position_embeddings`; a longer `length` raises ValueError.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if max_length is not None and length > max_length:
        raise ValueError(
            f"a prompt of {length} tokens is longer than the model's max_position_embeddings ({max_length}); "
            "ask for shorter lengths (prompts are never truncated)"
        )
    if len(needles) != len(depths):
        raise ValueError(f"got {len(needles)} needles but {len(depths)} depths")
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ValueError(f"depths must lie in [0, 1], got {bad}")
    head, tail = _head_and_tail(tokenizer, question, answer_prefix, chat)
    needle_ids = [_encode(tokenizer, n) for n in needles]
    budget = length - len(head) - len(tail) - sum(len(n) for n in needle_ids)
    if budget < 0:
        raise ValueError(
            f"{length} tokens cannot hold the prompt's fixed parts ({length - budget} tokens: template, needles, "
            "question); ask for a longer length"
        )
    hay = haystack.tokens(budget) if isinstance(haystack, Haystack) else list(haystack[:budget])
    if len(hay) < budget:
        raise ValueError(f"the haystack has {len(hay)} tokens, {budget} are needed")
    order = sorted(range(len(needles)), key=lambda i: (depths[i], i))
    ids = list(head)
    starts = [0] * len(needles)
    insert_at = [0] * len(needles)
    done = 0
    for i in order:
        at = round(depths[i] * budget)
        ids += hay[done:at]
        done = at
        starts[i], insert_at[i] = len(ids), at
        ids += needle_ids[i]
    ids += hay[done:] + tail
    if len(ids) != length:  # cannot happen: the budget arithmetic above is exact
        raise RuntimeError(f"built a prompt of {len(ids)} tokens instead of {length}")
    return Prompt(ids, starts, insert_at, budget, len(head))
