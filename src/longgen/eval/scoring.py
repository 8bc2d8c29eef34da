"""Scoring: pure functions of a model's output text and the expected answers, each in [0, 1]."""

from __future__ import annotations

import re
from collections.abc import Sequence


def first_number(text: str) -> str | None:
    """The first run of digits in `text` ("... is 12345." -> "12345"), or None."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def passkey_score(output: str, passkey: str) -> float:
    """1.0 when the first number in the generated continuation is exactly the pass key, else 0.0."""
    return 1.0 if first_number(output) == str(passkey) else 0.0


def string_match_all(output: str, references: Sequence[str]) -> float:
    """RULER's recall: the fraction of expected strings found (case-insensitive) anywhere in the output."""
    if not references:
        raise ValueError("string_match_all needs at least one reference string")
    text = output.lower()
    return sum(r.lower() in text for r in references) / len(references)


def string_match_part(output: str, references: Sequence[str]) -> float:
    """RULER's score for QA-style tasks: 1.0 if any expected string is in the output, else 0.0."""
    if not references:
        raise ValueError("string_match_part needs at least one reference string")
    text = output.lower()
    return 1.0 if any(r.lower() in text for r in references) else 0.0


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
