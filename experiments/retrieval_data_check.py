"""Checks of the synthetic retrieval training data, the numbers `results/RUN.md` and `results/distance/RUN.md` quote.

    PYTHONPATH=src python experiments/retrieval_data_check.py [--out experiments/results/retrieval_data_check.json]
    PYTHONPATH=src python experiments/retrieval_data_check.py --chains \
        [--out experiments/results/distance/training_chains.json]

1. Needle-question distances: the share of pairs more than 4K / 8K / 16K / 20K / 26K / 28K tokens apart for
   extension documents of 4K-32K tokens (the second recipe) and of 28K-32K (`--extend-retrieval-min 0.875`), the
   latter also with 1/8 and 1/4 of the facts far (`--extend-far-share`). A simulation of
   `longgen.train.synthetic.retrieval_document`'s placement rule in token units: 3 facts per 1K tokens, each
   needle at a uniform place, its question at the document's end half of the time, else at a uniform place after
   the needle; a far fact's needle in the first eighth and its question at the end.
2. Planned against actual length: documents planned at 4K-32K tokens at the corpus's characters per token,
   tokenized with a 16K-token BPE trained on 12 MB of the standard library (as `reproduce.py` trains its own).

With `--chains`, instead: the variable chains of extension documents as the recorded recipe makes them (28K-32K
tokens, 3 facts per 1K, a quarter of them far) and as the adopted one does (an eighth of them near as well), made by
`retrieval_document` itself and tokenized with that BPE: each chain's hops (value to each next name, the last name
to the question) in tokens, and how many are longer than the sparse layers' 1,024-token window, beside the same
count for the evaluation's chains (`results/distance/RUN.md`).
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import itertools
import json
import random
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def distance_shares(lo: int, hi: int, far_share: float = 0.0, docs: int = 20_000, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    bounds = (4096, 8192, 16384, 20480, 26000, 28672)
    over, total = dict.fromkeys(bounds, 0), 0
    for _ in range(docs):
        length = rng.randint(lo, hi)
        for _ in range(max(1, round(length * 3 / 1024))):
            if far_share and rng.random() < far_share:  # `retrieval_document(far_share=...)`: first eighth, end
                needle, ask = rng.uniform(0, length / 8), length
            else:
                needle = rng.uniform(0, length)
                ask = length if rng.random() < 0.5 else rng.uniform(needle, length)
            total += 1
            for b in bounds:
                over[b] += ask - needle > b
    return {f">{b}": over[b] / total for b in bounds}


def _texts_and_tokenizer(seed: int = 0) -> tuple[list[str], Any, float]:
    """12 MB of the standard library's files, a 16K-token BPE trained on 400 of them, and their characters a token."""
    from reproduction.corpus import select_documents

    from longgen.train.tokenizer import train_bpe_tokenizer

    texts = [t for _, t in select_documents("stdlib", 12, 2, 100_000, seed).train]
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(texts[:400]):
            Path(tmp, f"{i}.txt").write_text(text)
        tokenizer = train_bpe_tokenizer(tmp, 16384)
    sample = texts[:300]
    chars_per_token = sum(map(len, sample)) / sum(
        len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in sample
    )
    return texts, tokenizer, chars_per_token


def planned_vs_actual(seed: int = 0) -> list[dict[str, int | float]]:
    from longgen.train.synthetic import retrieval_document

    texts, tokenizer, chars_per_token = _texts_and_tokenizer(seed)
    rng = random.Random(seed)
    rows = []
    for planned in (4096, 16384, 28672, 30000, 31000, 32768, 32768, 32768):
        doc = retrieval_document(rng, texts, planned, chars_per_token, 3.0)
        actual = len(tokenizer(doc, add_special_tokens=False)["input_ids"])
        rows.append({"planned": planned, "actual": actual, "ratio": actual / planned})
    return rows


_VALUE = re.compile(r"(?:VAR|Let) ([A-Z]{5}) (?:=|be) \d+\.")  # synthetic.VT_FIRST
_HOP = re.compile(r"(?:VAR|Let) ([A-Z]{5}) (?:=|be) ([A-Z]{5})\.")  # synthetic.VT_HOP
_ASKED = re.compile(r"What is the value of VAR ([A-Z]{5})\?|Question: what is ([A-Z]{5})\?")  # VT_QUESTIONS


def document_chains(doc: str, starts: list[int]) -> list[list[int]]:
    """Each variable chain of a synthetic document as the token indices of its statements, value first, then its
    question's (`starts`: each token's first character); chains whose names repeat are left out."""
    at = {}  # name -> its statements: (character, the name it is set to, or None for the value)
    for m in _VALUE.finditer(doc):
        at.setdefault(m.group(1), []).append((m.start(), None))
    for m in _HOP.finditer(doc):
        at.setdefault(m.group(1), []).append((m.start(), m.group(2)))
    chains = []
    for m in _ASKED.finditer(doc):
        name, places = m.group(1) or m.group(2), [m.start()]
        while name is not None and len(at.get(name, ())) == 1:
            char, name = at[name][0]
            places.append(char)
        if name is None:  # reached the value: a whole chain, each name stated once
            chains.append([bisect.bisect_right(starts, c) - 1 for c in reversed(places)])
    return chains


def chain_hops(texts: list[str], tokenizer: Any, chars_per_token: float, window: int, docs: int, seed: int,
               **shares: float) -> dict[str, Any]:  # fmt: skip
    """Hops of the variable chains in `docs` extension documents of 28K-32K tokens (`shares`: far_share and
    near_share of `retrieval_document`): per number of names, the chains and how many have 0, 1, 2, ... hops longer
    than `window` tokens."""
    from longgen.train.synthetic import retrieval_document

    rng = random.Random(seed)
    counts: dict[int, Counter] = {}
    for _ in range(docs):
        doc = retrieval_document(rng, texts, rng.randint(28672, 32768), chars_per_token, 3.0, **shares)
        starts = [s for s, _ in tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
        for places in document_chains(doc, starts):
            long = sum(b - a > window for a, b in itertools.pairwise(places))
            counts.setdefault(len(places) - 1, Counter())[long] += 1
    out = {}
    for names, c in sorted(counts.items()):
        n = sum(c.values())
        out[f"{names} names"] = {"chains": n, "by_long_hops": {str(k): c[k] for k in sorted(c)},
                                 "share_two_or_more": sum(v for k, v in c.items() if k >= 2) / n}  # fmt: skip
    return out


def evaluation_chains(window: int) -> dict[str, Any]:
    """The evaluation's variable chains (three names, the GPU preset's prompts) with two or more hops longer than
    `window`, per length."""
    from reproduction.settings import DEFAULT as s
    from reproduction.tasks import needle_gaps

    out = {}
    for n in s.eval_lengths:
        gaps = [needle_gaps("variable_tracking", s.seed, n, i, s.prompts_per_task, s.answer_room)
                for i in range(s.prompts_per_task)]  # fmt: skip
        out[str(n)] = {"chains": s.prompts_per_task, "two_or_more": sum(sum(g > window for g in x) >= 2 for x in gaps)}
    return out


def chains_check(docs: int = 100, window: int = 1024, seed: int = 0) -> dict[str, Any]:
    texts, tokenizer, chars_per_token = _texts_and_tokenizer(seed)
    recipes = {"recorded": {"far_share": 0.25}, "near_share_0.125": {"far_share": 0.25, "near_share": 0.125}}
    return {"window": window, "documents": docs, "chars_per_token": chars_per_token,
            "training": {name: chain_hops(texts, tokenizer, chars_per_token, window, docs, seed, **shares)
                         for name, shares in recipes.items()},
            "evaluation": evaluation_chains(window)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chains", action="store_true", help="the variable chains' hops instead (see above)")
    p.add_argument("--out", help="the JSON written (default experiments/results/retrieval_data_check.json, with "
                   "--chains experiments/results/distance/training_chains.json)")  # fmt: skip
    a = p.parse_args()
    from longgen.provenance import cpu_name, git_commit

    result = {
        "device": cpu_name(),
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "command": "PYTHONPATH=src python " + " ".join(sys.argv),
    }
    if a.chains:
        result |= chains_check()
        out = a.out or "experiments/results/distance/training_chains.json"
    else:
        result |= {
            "distances_4k_32k": distance_shares(4096, 32768),
            "distances_28k_32k": distance_shares(28672, 32768),
            **{f"distances_28k_32k_far_{f}": distance_shares(28672, 32768, f) for f in (0.125, 0.25)},
            "planned_vs_actual": planned_vs_actual(),
        }
        out = a.out or "experiments/results/retrieval_data_check.json"
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
