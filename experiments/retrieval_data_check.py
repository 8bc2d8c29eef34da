"""Two checks of the synthetic retrieval training data, the numbers `results/RUN.md` quotes.

    PYTHONPATH=src python experiments/retrieval_data_check.py [--out experiments/results/retrieval_data_check.json]

1. Needle-question distances: the share of pairs more than 4K / 8K / 16K / 20K / 26K / 28K tokens apart for
   extension documents of 4K-32K tokens (the second recipe) and of 28K-32K (`--extend-retrieval-min 0.875`), the
   latter also with 1/8 and 1/4 of the facts far (`--extend-far-share`). A simulation of
   `longgen.train.synthetic.retrieval_document`'s placement rule in token units: 3 facts per 1K tokens, each
   needle at a uniform place, its question at the document's end half of the time, else at a uniform place after
   the needle; a far fact's needle in the first eighth and its question at the end.
2. Planned against actual length: documents planned at 4K-32K tokens at the corpus's characters per token,
   tokenized with a 16K-token BPE trained on 12 MB of the standard library (as `reproduce.py` trains its own).
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import tempfile
from pathlib import Path

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


def planned_vs_actual(seed: int = 0) -> list[dict[str, int | float]]:
    from reproduction.corpus import select_documents

    from longgen.train.synthetic import retrieval_document
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
    rng = random.Random(seed)
    rows = []
    for planned in (4096, 16384, 28672, 30000, 31000, 32768, 32768, 32768):
        doc = retrieval_document(rng, texts, planned, chars_per_token, 3.0)
        actual = len(tokenizer(doc, add_special_tokens=False)["input_ids"])
        rows.append({"planned": planned, "actual": actual, "ratio": actual / planned})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="experiments/results/retrieval_data_check.json")
    a = p.parse_args()
    from longgen.provenance import cpu_name, git_commit

    result = {
        "device": cpu_name(),
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "command": "PYTHONPATH=src python " + " ".join(sys.argv),
        "distances_4k_32k": distance_shares(4096, 32768),
        "distances_28k_32k": distance_shares(28672, 32768),
        **{f"distances_28k_32k_far_{f}": distance_shares(28672, 32768, f) for f in (0.125, 0.25)},
        "planned_vs_actual": planned_vs_actual(),
    }
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
