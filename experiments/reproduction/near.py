"""The near-question probe: look-ups whose facts all lie just before the question, within every sparse layer's
window, at every length; each trained variant as trained and with its full layers limited at inference to
SinkWindow(--sink, W) for each W of --near-windows (`longgen.eval.limit_full_layers`; for full attention that is
StreamingLLM with that window).

Why: in the recorded training runs every hybrid layout missed variable chains stated wholly near the question at
32K, which full attention, all sparse and StreamingLLM answered. Those were a handful of the evaluation's prompts;
here every prompt is one. If the full layers are what fails there (what they read from the distant context),
limiting them to a window brings the chains back; if it does not, the sparse layers have lost what all sparse
keeps. (It brought them back, in full attention too: results/probes/2026-12-07-near-question.)

Writes ``near.json`` (settings, each view's per-prompt outcomes, accuracies with Wilson intervals, paired
differences) and ``near.md`` into --out-dir.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from longgen.eval.stats import paired_difference

from .report import (
    accuracy_of,
    environment,
    far_lengths,
    length_label,
    markdown_table,
    outcome_strings,
    paired_record,
)
from .stages import Experiment, log, write_json

NEAR_TASKS = ("niah", "variable_tracking")  # a single fact (the control) and the two-hop chain
NEAR_DEFAULT = ("full", "hybrid_sinkwindow")


def near_settings(exp: Experiment, span: int | None, windows: Sequence[int] | None) -> dict[str, Any]:
    """The probe's settings: --near-span (default three quarters of --window, so that a whole chain and the
    question fit in one window) and --near-windows (default --window and 8 x --window)."""
    s = exp.s
    span = span if span is not None else s.window * 3 // 4
    windows = tuple(windows) if windows else (s.window, 8 * s.window)
    if not 0 < span < min(s.eval_lengths) - s.answer_room:
        raise ValueError(f"--near-span must lie between 0 and the shortest prompt "
                         f"({min(s.eval_lengths) - s.answer_room} tokens), got {span}")  # fmt: skip
    bad = [w for w in windows if w < 1]
    if bad:
        raise ValueError(f"--near-windows must be positive token counts, got {bad}")
    return {"span": span, "windows": list(windows), "sink": s.sink, "tasks": list(NEAR_TASKS),
            "lengths": list(s.eval_lengths), "prompts_per_task": s.prompts_per_task, "seed": s.seed}  # fmt: skip


def trained_model(exp: Experiment, variant: str) -> Path:
    """The trained model of `variant`; ValueError if the variant is evaluated on another's model or untrained."""
    trained, options = exp.model_of(variant)
    if options:
        raise ValueError(f"{variant} is {trained}'s model changed at inference; the probe takes trained variants "
                         "(full attention limited to --window is one of its views)")  # fmt: skip
    exp.variant_spec(trained)  # ValueError for a name that is no variant
    if not exp.current(f"extend-{trained}"):
        raise ValueError(f"{variant} is not trained in {exp.work} with these settings: run `all --variant "
                         f"{variant}` first")  # fmt: skip
    return Path(exp.result(f"extend-{trained}")["model"])


def run_near(exp: Experiment, variants: Sequence[str] | None, span: int | None, windows: Sequence[int] | None,
             commit: str, command: str) -> dict[str, Any]:  # fmt: skip
    """Evaluate the near-question prompts on every view of `variants` (default full and hybrid_sinkwindow) and
    write near.json and near.md into the experiment's out-dir."""
    import torch

    from longgen.eval import limit_full_layers, load_for_eval
    from longgen.model import load_tokenizer

    from .tasks import build_items, score_items

    s = exp.s
    settings = near_settings(exp, span, windows)
    variants = list(dict.fromkeys(variants or NEAR_DEFAULT))
    models = {v: trained_model(exp, v) for v in variants}
    tokenizer = load_tokenizer(models[variants[0]])  # the one tokenizer every variant was trained with
    pool, words = exp.haystack(tokenizer, Path(exp.result("prepare")["heldout_dir"]))
    items = build_items(tokenizer, pool, words, s.eval_lengths, s.prompts_per_task, s.answer_room, s.seed,
                        tasks=NEAR_TASKS, near=settings["span"])  # fmt: skip
    outcomes: dict[str, dict[str, str]] = {}
    seconds: dict[str, float] = {}
    for v in variants:
        for window in (None, *settings["windows"]):
            view = v if window is None else f"{v}@{window}"
            model, _ = load_for_eval(models[v], device=exp.device())  # its tokenizer is `tokenizer`
            if window is not None:
                limit_full_layers(model, s.sink, window)
            log(f"{view}: {len(items)} near-question prompts")
            t0 = time.perf_counter()
            outcomes[view] = outcome_strings(score_items(model, tokenizer, items, s.eval_lengths, log))
            seconds[view] = round(time.perf_counter() - t0, 1)
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    reaches: dict[str, list[int]] = {}
    for it in items:
        reaches.setdefault(f"{it.task}@{it.length}", []).append(it.reach)
    reach = {key: [min(r), max(r)] for key, r in reaches.items()}
    summary = {"commit": commit, "command": command, **environment(), "settings": settings, "reach": reach,
               "seconds": seconds, **near_tables(outcomes, settings)}  # fmt: skip
    exp.out.mkdir(parents=True, exist_ok=True)
    write_json(exp.out / "near.json", summary)
    text = format_near(summary)
    (exp.out / "near.md").write_text(text)
    print(text)
    return summary


def _views(outcomes: dict[str, dict[str, str]]) -> list[tuple[str, str, int | None]]:
    """(view, its variant, its window or None) for every view of `outcomes`."""
    out = []
    for view in outcomes:
        variant, _, window = view.partition("@")
        out.append((view, variant, int(window) if window else None))
    return out


def near_tables(outcomes: dict[str, dict[str, str]], settings: dict[str, Any]) -> dict[str, Any]:
    """Accuracies (Wilson intervals) of every view, task and length, and pooled over the lengths from 8K; the
    paired differences of every hybrid view against full attention as trained, and of every windowed view
    against its variant as trained (the same prompts)."""
    lengths = settings["lengths"]
    far = far_lengths(lengths)
    pooled = f">={length_label(far[0])}"
    groups = [(n, [n]) for n in lengths] + [(pooled, far)]

    def hits(view: str, task: str, group: list[int]) -> list[bool]:
        return [c == "1" for n in group for c in outcomes[view][f"{task}@{n}"]]

    rows, paired = [], []
    for view, variant, window in _views(outcomes):
        against = ["full"] if variant != "full" and "full" in outcomes else []
        against += [variant] if window is not None else []
        for task in settings["tasks"]:
            for name, group in groups:
                a = hits(view, task, group)
                rows.append({"view": view, "task": task, "length": name, "n": len(a), **accuracy_of(a)})
                for other in against:
                    p = paired_difference(a, hits(other, task, group))
                    paired.append({"view": view, "against": other, "task": task, "length": name, "n": p.n,
                                   **paired_record(p, "only_view", "only_against")})  # fmt: skip
    return {"pooled": pooled, "outcomes": outcomes, "rows": rows, "paired": paired}


def format_near(summary: dict[str, Any]) -> str:
    st = summary["settings"]
    keys = [*st["lengths"], summary["pooled"]]
    names = [*map(length_label, st["lengths"]), summary["pooled"]]
    lines = [
        "# The near-question probe",
        "",
        f"{summary['date']} · commit {summary['commit']} · {summary['device']} · torch {summary['torch']}",
        "",
        f"`{summary['command']}`",
        "",
        f"{st['prompts_per_task']} prompts a task and length; every needle within {st['span']} haystack tokens "
        f"before the question (the first needle starts {_reach(summary)} tokens before the prompt's end); views: "
        f"each model as trained, and with its full layers limited to SinkWindow({st['sink']}, W) for W in "
        f"{', '.join(map(str, st['windows']))} (`name@W`; full attention limited is StreamingLLM).",
        "",
        "## Accuracy (95% Wilson interval)",
        "",
    ]
    cell = {(r["view"], r["task"], r["length"]): r for r in summary["rows"]}
    views = list(summary["outcomes"])
    table = []
    for task in st["tasks"]:
        for view in views:
            table.append([task, view] + [
                f"{100 * c['accuracy']:.1f}% ({100 * c['ci_low']:.0f}-{100 * c['ci_high']:.0f})"
                for c in (cell[(view, task, k)] for k in keys)
            ])  # fmt: skip
    lines += markdown_table(["task", "view", *names], table, text_columns=2)
    lines += ["", "## Paired differences, points (95% interval; prompts only one side answered)", ""]
    pair = {(p["view"], p["against"], p["task"], p["length"]): p for p in summary["paired"]}
    table = []
    for task in st["tasks"]:
        for view, against in dict.fromkeys((p["view"], p["against"]) for p in summary["paired"]):
            table.append([task, f"{view} − {against}"] + [
                f"{100 * p['diff']:+.1f} ({100 * p['ci_low']:+.1f}, {100 * p['ci_high']:+.1f}; "
                f"{p['only_view']}/{p['only_against']})"
                for p in (pair[(view, against, task, k)] for k in keys)
            ])  # fmt: skip
    lines += markdown_table(["task", "difference", *names], table, text_columns=2)
    return "\n".join(lines) + "\n"


def _reach(summary: dict[str, Any]) -> str:
    spans = summary["reach"]
    return f"{min(v[0] for v in spans.values())}-{max(v[1] for v in spans.values())}"
