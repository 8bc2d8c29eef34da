"""Perplexity of long documents as a function of token position and of context length.

Each document is run once through the model's base (hidden states of all positions), and the output layer and
cross entropy are applied to one bucket of positions at a time (`longgen.train.loss.chunked_lm_loss_sum`), so
the logits of a long sequence never exist at once. In a causal model the loss at position t does not depend on
later tokens, so the perplexity at context length L is the mean loss over positions < L of the same run.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from longgen.eval.baseline import load_for_eval
from longgen.eval.plots import loss_curve
from longgen.eval.prompts import named_texts
from longgen.eval.results import task_settings, write_result
from longgen.train.loss import chunked_lm_loss_sum


@torch.inference_mode()
def segment_loss_sums(model: Any, input_ids: torch.Tensor, cuts: Sequence[int], chunk: int = 4096) -> list[float]:
    """Summed next-token loss of each segment of target positions of one document.

    Args:
        input_ids: ``(seq,)`` token ids; position t predicts token t + 1, so positions 0 .. seq - 2 have targets.
        cuts: increasing positions ``0 = c0 < c1 < ... < ck = seq - 1``; segment i covers ``[c_i, c_{i+1})``.
        chunk: positions projected through the output layer at a time.
    """
    ids = input_ids.to(model.device)[None]
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    sums = []
    for s, e in itertools.pairwise(cuts):
        total, _ = chunked_lm_loss_sum(hidden[:, s : e + 1], head, ids[:, s : e + 1], chunk)
        sums.append(total.item())
    return sums


def ppl(
    path: str | os.PathLike,
    *,
    lengths: Sequence[int] = (1024, 2048, 4096),
    bucket: int = 256,
    documents: Sequence[str | os.PathLike] | None = None,
    num_documents: int = 4,
    chunk: int = 4096,
    seed: int = 0,
    out_dir: str | os.PathLike = "eval_results",
    progress: bool = True,
    **model_options: Any,
) -> dict[str, Any]:
    """Perplexity of `num_documents` documents with at least ``max(lengths)`` tokens each (their first
    ``max(lengths)`` tokens), per position bucket and per context length.

    `documents`: text files or folders (one document per file); default: the Python standard library's
    sources, one module per document, the longest first. Writes ``ppl.json`` and ``ppl.png`` (loss against
    position). `seed` is recorded only (the evaluation is deterministic).
    """
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in lengths):
        raise ValueError(f"lengths must be ints >= 2, got {list(lengths)}")
    for name, v in (("bucket", bucket), ("num_documents", num_documents), ("chunk", chunk)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    model, tokenizer = load_for_eval(path, **model_options)
    longest = max(lengths)
    if longest > model.config.max_position_embeddings:
        raise ValueError(
            f"length {longest} is longer than the model's max_position_embeddings "
            f"({model.config.max_position_embeddings}); sequences are never truncated silently"
        )
    if documents is None:
        sources = sorted(Path(os.path.dirname(os.__file__)).glob("*.py"), key=lambda p: -p.stat().st_size)
        texts = ((str(p), p.read_text(encoding="utf-8", errors="replace")) for p in sources)
    else:
        texts = named_texts(documents)
    docs = []
    for name, text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) >= longest:
            docs.append((name, torch.tensor(ids[:longest])))
        if len(docs) == num_documents:
            break
    if not docs:
        raise ValueError(f"no document has {longest} tokens; pass longer documents or shorter lengths")
    targets = longest - 1
    cuts = sorted({*range(0, targets, bucket), *(n - 1 for n in lengths), targets})
    records = []
    for name, ids in tqdm(docs, desc="ppl", disable=not progress):
        sums = segment_loss_sums(model, ids, cuts, chunk)
        segments = [(a, b, s) for (a, b), s in zip(itertools.pairwise(cuts), sums, strict=True)]
        records.append({"document": name, "tokens": len(ids), "segments": segments})

    def mean_loss(start: int, end: int) -> float:  # over all documents' targets of positions [start, end)
        total = sum(s for r in records for a, b, s in r["segments"] if start <= a and b <= end)
        return total / ((end - start) * len(records))

    by_position = []
    for start in range(0, targets, bucket):
        end = min(start + bucket, targets)
        loss = mean_loss(start, end)
        by_position.append({"start": start, "end": end, "loss": loss, "ppl": math.exp(loss)})
    by_length = {str(n): math.exp(mean_loss(0, n - 1)) for n in lengths}
    for r in records:
        r["bucket_loss"] = [sum(s for a, b, s in r["segments"] if p["start"] <= a and b <= p["end"]) /
                            (p["end"] - p["start"]) for p in by_position]  # fmt: skip
        del r["segments"]
    summary = {"ppl_by_length": by_length, "by_position": by_position, "documents": len(records)}
    settings = task_settings(
        "ppl", path, seed, model, model_options, lengths=list(lengths), bucket=bucket, chunk=chunk,
        num_documents=num_documents, documents=[str(d) for d in documents] if documents else "python standard library",
        lengths_used=[longest],
    )  # fmt: skip
    result = {"settings": settings, "summary": summary, "records": records}
    png = Path(out_dir) / "ppl.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    centers = [(b["start"] + b["end"]) / 2 for b in by_position]
    loss_curve(png, centers, [b["loss"] for b in by_position], f"loss vs position: {Path(path).name}")
    result["files"] = [str(write_result(result, out_dir, "ppl")), str(png)]
    return result
