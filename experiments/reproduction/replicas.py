"""How much the comparison moves between training runs: runs of one recipe that differ only in `--extend-replica`
(every extension again from the same pre-trained model, data and prompts, in another data order and seed).

For each variant against full attention, by length, at >= 8K and over all lengths: each run's paired difference
(Newcombe's interval: the prompts' sampling only), the difference averaged over the runs, and each run's difference
minus the first run's. The last two have percentile bootstrap intervals over prompts, the same resampled prompts
for every run and model, so they too cover the prompts' sampling only: where the spread's interval excludes 0, the
training runs differ by more than the prompts can explain.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from longgen.eval.stats import bootstrap_interval, paired_difference

from .report import BEFORE_THE_SETTING, RUN_CONTROL, _k, _pooled_over, check_same_recipe, records_from_outcomes
from .settings import LABELS, VARIANTS
from .stages import write_json

RESAMPLES = 10_000
TARGETED = ("hybrid_sinkwindow", "hybrid_blocksparse")  # the variants the hybrids' target is about
FILES = ("replicas.json", "replicas.md")


def compare_replicas(saved: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The comparison of the saved ``reproduce.json`` of two or more replicas of one recipe; ValueError names what
    does not fit (too few runs, a replica given twice, another recipe, a variant or full attention missing)."""
    if len(saved) < 2:
        raise ValueError(f"comparing replicas needs the reports of at least two runs, got {len(saved)}")
    replicas = [{**BEFORE_THE_SETTING, **run["settings"]}["extend_replica"] for run in saved]
    if len(set(replicas)) < len(replicas):
        raise ValueError(f"each run must be another --extend-replica; got replicas {replicas}")
    check_same_recipe(saved, RUN_CONTROL | {"extend_replica"}, "compared as replicas")
    if not all("full" in run["outcomes"] for run in saved):
        raise ValueError("every run must have evaluated full attention (`full`): the differences are against it")
    variants = [v for v in VARIANTS if v != "full" and all(v in run["outcomes"] for run in saved)]
    if not variants:
        raise ValueError("no variant besides full attention was evaluated by every run")
    shape = {k: len(bits) for k, bits in saved[0]["outcomes"]["full"].items()}
    for i, run in enumerate(saved):
        for v in ("full", *variants):
            if {k: len(bits) for k, bits in run["outcomes"][v].items()} != shape:
                raise ValueError(f"run {i + 1} asked {v} other prompts than run 1 asked full attention (tasks, "
                                 "lengths or prompts per task differ): replicas answer the same prompts")  # fmt: skip
    lengths = sorted({int(k.rsplit("@", 1)[1]) for k in shape})
    groups = [[n] for n in lengths] + [[n for n in lengths if n >= 8192] or [lengths[-1]], lengths]

    per_task = saved[0]["settings"]["prompts_per_task"]
    records = [{v: {"records": records_from_outcomes(run["outcomes"][v], per_task)} for v in ("full", *variants)}
               for run in saved]  # fmt: skip

    def hits(i: int, variant: str, group: list[int]) -> np.ndarray:
        return np.array(_pooled_over(records[i], variant, group))

    out: dict[str, Any] = {}
    for v in variants:
        table = []
        for group in groups:
            a = np.stack([hits(i, v, group) for i in range(len(saved))])
            b = np.stack([hits(i, "full", group) for i in range(len(saved))])
            d = a.astype(np.int8) - b.astype(np.int8)  # per run and prompt: +1, 0 or -1
            n = d.shape[1]
            per_run = []
            for r, (x, y) in enumerate(zip(a, b, strict=True)):
                p = paired_difference(x.tolist(), y.tolist())
                per_run.append({"replica": replicas[r], "diff": p.diff, "ci_low": p.ci_low, "ci_high": p.ci_high,
                                "only_variant": p.a_only, "only_full": p.b_only})  # fmt: skip
            mean = d.mean(axis=0, dtype=np.float32)
            low, high = bootstrap_interval(lambda rows, m=mean: m[rows].mean(axis=1), n, resamples=RESAMPLES)
            spread = []
            for r in range(1, len(saved)):
                gap = (d[r] - d[0]).astype(np.float32)
                lo, hi = bootstrap_interval(lambda rows, g=gap: g[rows].mean(axis=1), n, resamples=RESAMPLES)
                spread.append({"replica": replicas[r], "minus": replicas[0], "diff": float((d[r] - d[0]).mean()),
                               "ci_low": lo, "ci_high": hi})  # fmt: skip
            table.append({"lengths": group, "n": n, "per_run": per_run,
                          "mean": {"diff": float(d.mean()), "ci_low": low, "ci_high": high},
                          "spread": spread})  # fmt: skip
        out[v] = table
    runs = [{k: run.get(k) for k in ("commit", "date", "device", "command")} | {"extend_replica": r}
            for run, r in zip(saved, replicas, strict=True)]  # fmt: skip
    made = {  # what the comparison was made from, as a merged report names it: every run's commit and GPU
        "commit": " + ".join(str(run["commit"]) for run in runs),
        "device": " + ".join(dict.fromkeys(str(run["device"]) for run in runs)),
        "date": max(str(run["date"]) for run in runs),
    }
    return {**made, "runs": runs, "lengths": lengths, "resamples": RESAMPLES, "variants": out}


def _group_name(group: list[int], lengths: list[int]) -> str:
    if group == lengths:
        return "all lengths"
    if len(group) == 1:
        return _k(group[0])
    return f">= {_k(group[0])}"


def _pts(x: dict) -> str:
    return f"{100 * x['diff']:+.1f} ({100 * x['ci_low']:+.1f} to {100 * x['ci_high']:+.1f})"


def format_replicas(summary: dict[str, Any]) -> str:
    """The markdown of `compare_replicas`'s summary."""
    runs, lengths = summary["runs"], summary["lengths"]
    reps = [r["extend_replica"] for r in runs]
    resamples = f"{summary['resamples']:,}"
    lines = [
        "# The comparison across training runs (`--extend-replica`)",
        "",
        *(f"- replica {r['extend_replica']}: commit {r['commit']}, {r['date']}, {r['device']}" for r in runs),
        "",
        "Each variant minus full attention on the same prompts, in points. Per replica: the paired difference with "
        "Newcombe's 95% interval. Mean: the difference averaged over the replicas; spread: a replica's difference "
        f"minus replica {reps[0]}'s; both with percentile bootstrap 95% intervals over prompts ({resamples} "
        "resamples, the same prompts for every replica and model). All intervals cover the prompts' sampling only; "
        "where the spread's excludes 0, the training runs differ by more than the prompts explain.",
    ]
    for v, rows in summary["variants"].items():
        head = ["lengths", "prompts", *(f"replica {r} − full" for r in reps), "mean − full",
                *(f"replica {r} − replica {reps[0]}" for r in reps[1:])]  # fmt: skip
        lines += ["", f"## {LABELS[v]}", "", "| " + " | ".join(head) + " |",
                  "| --- | " + " | ".join("---:" for _ in head[1:]) + " |"]  # fmt: skip
        for row in rows:
            cells = [_group_name(row["lengths"], lengths), str(row["n"]), *(_pts(p) for p in row["per_run"]),
                     _pts(row["mean"]), *(_pts(s) for s in row["spread"])]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        if v not in TARGETED:
            continue
        single = [row for row in rows if len(row["lengths"]) == 1]
        worst = min(single, key=lambda row: row["mean"]["diff"])
        lowest = min(single, key=lambda row: row["mean"]["ci_low"])
        met = worst["mean"]["diff"] >= -0.02 and lowest["mean"]["ci_low"] >= -0.05
        lines += ["", f"The hybrids' target applied to the mean over replicas (>= −2 points at every length, interval "
                      f"lower end >= −5): {'met' if met else 'NOT met'}; worst {100 * worst['mean']['diff']:+.1f} at "
                      f"{_k(worst['lengths'][0])}, lowest end {100 * lowest['mean']['ci_low']:+.1f} at "
                      f"{_k(lowest['lengths'][0])}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_replicas(saved: Sequence[dict[str, Any]], out: Path, command: str) -> dict[str, Any]:
    """`compare_replicas` written into `out` as ``FILES`` (with `command`); prints the markdown."""
    summary = {**compare_replicas(saved), "command": command}
    out.mkdir(parents=True, exist_ok=True)
    text = format_replicas(summary)
    (out / "replicas.md").write_text(text)
    write_json(out / "replicas.json", summary)
    print(text, flush=True)
    return summary
