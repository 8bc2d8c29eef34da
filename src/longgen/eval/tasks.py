"""The evaluation tasks: passkey, needle in a haystack, RULER-style synthetic tasks.

Each task loads the model at `path` (a LongGen hybrid or a plain Hugging Face model, optionally turned into the
StreamingLLM baseline), builds prompts of exact token lengths, greedily generates an answer per prompt, scores
it, and writes ``<out_dir>/<task>.json``: the settings (model path, seed, lengths actually used, ...), one
record per sample, and a summary of accuracy per length (and depth). Prompts are run one at a time.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from longgen.eval.baseline import load_for_eval
from longgen.eval.plots import accuracy_heatmap
from longgen.eval.prompts import (
    NIAH_ANSWER_PREFIX,
    NIAH_NEEDLE,
    NIAH_QUESTION,
    PASSKEY_ANSWER_PREFIX,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    Haystack,
    build_prompt,
)
from longgen.eval.results import task_settings, write_result
from longgen.eval.ruler import RULER_TASKS, ruler_sample
from longgen.eval.scoring import mean, passkey_score, string_match_all
from longgen.model.layout import is_hybrid

DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _check_room(lengths: Sequence[int], new_tokens: int, max_len: int) -> None:
    """Prompt + answer must fit the model: a prompt is never truncated, and generation never runs past the end."""
    too_long = [n for n in lengths if n + new_tokens > max_len]
    if too_long:
        raise ValueError(
            f"prompts of {too_long} tokens plus up to {new_tokens} generated tokens exceed the model's "
            f"max_position_embeddings ({max_len}); ask for lengths up to {max_len - new_tokens}"
        )


def _check_grid(lengths: Sequence[int], depths: Sequence[float] | None, samples: int) -> None:
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"lengths must be positive ints, got {list(lengths)}")
    if depths is not None and (not depths or any(not 0.0 <= d <= 1.0 for d in depths)):
        raise ValueError(f"depths must be numbers in [0, 1], got {list(depths)}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")


def _rng(*parts: object) -> random.Random:
    return random.Random(":".join(map(str, parts)))  # a str seed is hashed with SHA-512: stable across runs


KV_CACHES = ("auto", "hybrid", "dynamic")


def _cache_kind(model: Any, kv_cache: str) -> str:
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
    hybrid = is_hybrid(model.config)
    if kv_cache == "hybrid" and not hybrid:
        raise ValueError("kv_cache='hybrid' needs a LongGen hybrid (or the streaming baseline); this model is plain")
    if kv_cache == "auto":
        return "hybrid" if hybrid else "dynamic"
    return kv_cache


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, input_ids: Sequence[int], max_new_tokens: int, kv_cache: str = "auto") -> str:
    """Greedy continuation of one prompt given as token ids, decoded (special tokens dropped).

    `kv_cache`: "hybrid" uses `longgen.infer.HybridCache` (each layer keeps only what its pattern still sees: for
    the StreamingLLM baseline, sink + window tokens), "dynamic" transformers' default cache, "auto" the hybrid
    cache for LongGen models and the default one otherwise. Greedy outputs are the same either way.
    """
    x = torch.tensor([list(input_ids)], device=model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs: dict[str, Any] = {}
    if _cache_kind(model, kv_cache) == "hybrid":
        from longgen.infer.cache import HybridCache, cache_kwargs

        kwargs = cache_kwargs(HybridCache(model.config, max_length=x.shape[1] + max_new_tokens))
    out = model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        **kwargs,
    )
    return tokenizer.decode(out[0, x.shape[1] :], skip_special_tokens=True)


def _load(path, model_options: dict[str, Any]):
    model, tokenizer = load_for_eval(path, **model_options)
    return model, tokenizer, model.config.max_position_embeddings


def _grid_summary(records: list[dict[str, Any]], lengths, depths) -> dict[str, Any]:
    by_cell = defaultdict(list)
    for r in records:
        by_cell[r["length"], r["depth"]].append(r["score"])
    return {
        "accuracy": mean([r["score"] for r in records]),
        "accuracy_by_length": {str(n): mean([r["score"] for r in records if r["length"] == n]) for n in lengths},
        "accuracy_by_length_depth": {str(n): {f"{d:g}": mean(by_cell[n, d]) for d in depths} for n in lengths},
    }


def _needle_grid(
    task: str,
    path,
    make_sample,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int,
    seed: int,
    max_new_tokens: int,
    chat: bool,
    haystack: Sequence[str | os.PathLike] | None,
    progress: bool,
    kv_cache: str,
    model_options: dict[str, Any],
) -> dict[str, Any]:
    _check_grid(lengths, depths, samples)
    model, tokenizer, max_len = _load(path, model_options)
    _check_room(lengths, max_new_tokens, max_len)
    cache = _cache_kind(model, kv_cache)
    hay = Haystack(tokenizer, haystack)
    records = []
    grid = [(n, d, i) for n in lengths for d in depths for i in range(samples)]
    for n, d, i in tqdm(grid, desc=task, disable=not progress):
        needle, question, prefix, answers = make_sample(_rng(seed, task, n, d, i))
        prompt = build_prompt(tokenizer, n, hay, [needle], [d], question, prefix, chat=chat, max_length=max_len)
        output = generate(model, tokenizer, prompt.input_ids, max_new_tokens, cache)
        score = passkey_score(output, answers[0]) if task == "passkey" else string_match_all(output, answers)
        records.append(
            {
                "length": n,
                "depth": d,
                "depth_used": prompt.depths[0],
                "sample": i,
                "prompt_tokens": len(prompt.input_ids),
                "answers": answers,
                "output": output,
                "score": score,
            }
        )
    settings = task_settings(
        task,
        path,
        seed,
        model,
        model_options,
        lengths=list(lengths),
        depths=list(depths),
        samples=samples,
        max_new_tokens=max_new_tokens,
        chat=chat,
        kv_cache=cache,
        haystack=hay.files or "python standard library docstrings",
        lengths_used=sorted({r["prompt_tokens"] for r in records}),
    )
    return {"settings": settings, "summary": _grid_summary(records, lengths, depths), "records": records}


def passkey(
    path: str | os.PathLike,
    *,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    samples: int = 1,
    seed: int = 0,
    max_new_tokens: int = 8,
    chat: bool = False,
    haystack: Sequence[str | os.PathLike] | None = None,
    kv_cache: str = "auto",
    out_dir: str | os.PathLike = "eval_results",
    progress: bool = True,
    **model_options: Any,
) -> dict[str, Any]:
    """Pass-key retrieval: a random 5-digit key hidden at each depth of filler text of each length.

    Score: 1 when the first number of the greedy continuation of "... The pass key is" is the key.
    `model_options` go to `load_for_eval` (baseline, sink, window, device, dtype, tokenizer_path); `kv_cache`
    to `generate`.
    Writes ``passkey.json``; returns the result dict (settings, summary, records).
    """

    def make(rng: random.Random):
        key = str(rng.randint(10_000, 99_999))
        return PASSKEY_NEEDLE.format(k=key), PASSKEY_QUESTION, PASSKEY_ANSWER_PREFIX, [key]

    result = _needle_grid(
        "passkey", path, make, lengths=lengths, depths=depths, samples=samples, seed=seed,
        max_new_tokens=max_new_tokens, chat=chat, haystack=haystack, progress=progress, kv_cache=kv_cache,
        model_options=model_options,
    )  # fmt: skip
    result["files"] = [str(write_result(result, out_dir, "passkey"))]
    return result


def niah(
    path: str | os.PathLike,
    *,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    samples: int = 1,
    seed: int = 0,
    max_new_tokens: int = 16,
    chat: bool = False,
    haystack: Sequence[str | os.PathLike] | None = None,
    kv_cache: str = "auto",
    out_dir: str | os.PathLike = "eval_results",
    progress: bool = True,
    **model_options: Any,
) -> dict[str, Any]:
    """Needle in a haystack of real text, over a lengths x depths grid.

    The needle is "The special magic number for <word> is: <7 digits>." and the question asks for it; the score
    is RULER's string-match recall. Writes ``niah.json`` and the accuracy heatmap ``niah.png``.
    """
    words = ("apple", "river", "castle", "garden", "silver", "window", "thunder", "lantern", "meadow", "harbor")

    def make(rng: random.Random):
        key, value = rng.choice(words), str(rng.randint(1_000_000, 9_999_999))
        needle, question = NIAH_NEEDLE.format(w=key, v=value), NIAH_QUESTION.format(w=key)
        return needle, question, NIAH_ANSWER_PREFIX.format(w=key), [value]

    result = _needle_grid(
        "niah", path, make, lengths=lengths, depths=depths, samples=samples, seed=seed,
        max_new_tokens=max_new_tokens, chat=chat, haystack=haystack, progress=progress, kv_cache=kv_cache,
        model_options=model_options,
    )  # fmt: skip
    table = result["summary"]["accuracy_by_length_depth"]
    acc = [[table[str(n)][f"{d:g}"] for n in lengths] for d in depths]
    png = Path(out_dir) / "niah.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    accuracy_heatmap(png, list(lengths), list(depths), acc, f"needle in a haystack: {Path(path).name}")
    result["files"] = [str(write_result(result, out_dir, "niah")), str(png)]
    return result


def ruler(
    path: str | os.PathLike,
    *,
    tasks: Sequence[str] = RULER_TASKS,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    samples: int = 4,
    seed: int = 0,
    max_new_tokens: dict[str, int] | None = None,
    cwe_words: int = 10,
    chat: bool = False,
    haystack: Sequence[str | os.PathLike] | None = None,
    kv_cache: str = "auto",
    out_dir: str | os.PathLike = "eval_results",
    progress: bool = True,
    **model_options: Any,
) -> dict[str, Any]:
    """RULER-style tasks (`RULER_TASKS`) at each length: `samples` prompts per task and length, needles at
    random (seeded) depths. Score: RULER's string-match recall (fraction of expected strings in the output).

    `max_new_tokens` overrides the per-task generation budget ({"niah_single": 32, ...}).
    Writes ``ruler.json`` with the score per task and length and the mean over tasks per length.
    """
    unknown = [t for t in tasks if t not in RULER_TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown RULER tasks {unknown or tasks}; choose from {RULER_TASKS}")
    _check_grid(lengths, None, samples)
    budgets = {"niah_single": 32, "niah_multikey": 32, "niah_multivalue": 64, "vt": 40, "cwe": 12 * cwe_words}
    budgets.update(max_new_tokens or {})
    model, tokenizer, max_len = _load(path, model_options)
    _check_room(lengths, max(budgets[t] for t in tasks), max_len)
    cache = _cache_kind(model, kv_cache)
    hay = Haystack(tokenizer, haystack)
    records = []
    grid = [(t, n, i) for t in tasks for n in lengths for i in range(samples)]
    for t, n, i in tqdm(grid, desc="ruler", disable=not progress):
        s = ruler_sample(t, tokenizer, n, hay, _rng(seed, t, n, i), cwe_words=cwe_words, chat=chat, max_length=max_len)
        output = generate(model, tokenizer, s.prompt.input_ids, budgets[t], cache)
        records.append(
            {
                "task": t,
                "length": n,
                "sample": i,
                "prompt_tokens": len(s.prompt.input_ids),
                "answers": s.answers,
                "output": output,
                "score": string_match_all(output, s.answers),
                **s.info,
            }
        )
    scores = {t: {str(n): mean([r["score"] for r in records if r["task"] == t and r["length"] == n]) for n in lengths}
              for t in tasks}  # fmt: skip
    summary = {
        "score_by_task_length": scores,
        "score_by_length": {str(n): mean([scores[t][str(n)] for t in tasks]) for n in lengths},
        "score": mean([r["score"] for r in records]),
    }
    settings = task_settings(
        "ruler", path, seed, model, model_options, tasks=list(tasks), lengths=list(lengths), samples=samples,
        max_new_tokens={t: budgets[t] for t in tasks}, cwe_words=cwe_words, chat=chat, kv_cache=cache,
        haystack=hay.files or "python standard library docstrings",
        lengths_used=sorted({r["prompt_tokens"] for r in records}),
    )  # fmt: skip
    result = {"settings": settings, "summary": summary, "records": records}
    result["files"] = [str(write_result(result, out_dir, "ruler"))]
    return result
