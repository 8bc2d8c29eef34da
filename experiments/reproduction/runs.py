"""Saved runs set side by side on the same seeded prompts (their ``reproduce.json``, read with --from).

`replicas`: runs of one recipe that differ only in `--extend-replica` (every extension again from the same
pre-trained model, data and prompts, in another data order and seed): how much the comparison moves between
training runs. For each variant against full attention, by length, at >= 8K and over all lengths: each run's paired
difference (Newcombe's interval: the prompts' sampling only), the difference averaged over the runs, and each run's
difference minus the first run's. The last two have percentile bootstrap intervals over prompts, the same resampled
prompts for every run and model, so they too cover the prompts' sampling only: where the spread's interval excludes
0, the training runs differ by more than the prompts can explain. With three runs or more, the mean also gets a
Student-t interval with the runs as the unit (`mean_interval` over each run's difference, k - 1 degrees of freedom),
which covers how much the training runs move the difference on these prompts (not the prompts' sampling, which the
bootstrap covers). Runs that also differ in the sparse patterns' settings (`PATTERN_SETTINGS`: a pattern's two
training runs, each merged with its replica's full attention) are compared in the variants that read none of the
settings that differ (`pattern_settings_read`); the others are named as left out. With `against` (--against X) the
variants are measured against variant X of the same run instead of full attention: a change on the hybrids' side
against the recorded hybrid, where what a training run does to the hybrids of that run alike cancels (the hybrids'
target, which is against full attention, is then not applied).

`compare`: runs whose recipes may differ (a probe against the recorded run), as long as they asked the same prompts.
It names the settings that differ from run 1's, and for each variant that every run evaluated gives: its accuracy in
each run and each run minus run 1 on the same prompts (Newcombe); its difference to full attention in each run and
how far that moved from run 1's (bootstrap, as the spread of `replicas`), with the hybrids' target applied to each
run's; correct answers by task and length; the needles missed at the longest length, by depth. A run that did not
evaluate full attention is measured against run 1's when the two recipes differ only in settings full attention does
not read (`PATTERN_SETTINGS`: a probe of another sparse pattern needs no new full-attention model, since the one it
would train is run 1's: the same data, pre-training and extension from the same seed). A recipe's effect is only
told apart from a training run's own spread by the replicas' spread, which these intervals do not contain.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from longgen.eval.stats import bootstrap_interval, mean_interval, paired_difference

from .report import (
    RUN_CONTROL,
    accuracy_of,
    check_same_recipe,
    hybrid_target,
    length_label,
    markdown_table,
    paired_record,
    pooled_over,
    ran_with,
    recipe_differences,
    records_from_outcomes,
)
from .settings import LABELS, PATTERN_SETTINGS, TASKS, VARIANTS, pattern_settings_read
from .stages import write_json

RESAMPLES = 10_000
RUNS_AS_UNIT = 3  # from this many replicas on, the mean gets an interval over runs (two give one degree of freedom)
TARGETED = ("hybrid_sinkwindow", "hybrid_blocksparse")  # the variants the hybrids' target is about
FILES = ("replicas.json", "replicas.md")
COMPARE_FILES = ("compare.json", "compare.md")
MISSES_LISTED = 12  # compare.md lists the depths of at most this many missed needles a run (compare.json: all)
PROMPTS = ("seed", "sources", "corpus_mb", "tokenizer_mb", "vocab_size", "heldout_docs", "long_len", "eval_lengths",
           "prompts_per_task", "answer_room")  # fmt: skip  # the settings that decide the prompts and their haystacks


class _Runs:
    """The outcomes of saved runs that asked the same prompts: per-prompt hits of a variant pooled over lengths.
    `full_of[i]`: the run whose full attention run i's variants are measured against (default: its own)."""

    def __init__(self, saved: Sequence[dict[str, Any]], variants: Sequence[str], what: str,
                 full_of: Sequence[int] | None = None):  # fmt: skip
        shape = {k: len(bits) for k, bits in saved[0]["outcomes"][variants[0]].items()}
        for i, run in enumerate(saved):
            for v in (v for v in variants if v in run["outcomes"]):
                if {k: len(bits) for k, bits in run["outcomes"][v].items()} != shape:
                    raise ValueError(
                        f"run {i + 1} asked {v} other prompts than run 1 asked {variants[0]} (tasks, "
                        f"lengths or prompts per task differ): {what} answer the same prompts"
                    )
        self.lengths = sorted({int(k.rsplit("@", 1)[1]) for k in shape})
        far = [n for n in self.lengths if n >= 8192] or [self.lengths[-1]]
        self.groups = [[n] for n in self.lengths] + [far, self.lengths]
        self.per_task = saved[0]["settings"]["prompts_per_task"]
        self.records = [{v: {"records": records_from_outcomes(run["outcomes"][v], self.per_task)} for v in variants
                         if v in run["outcomes"]} for run in saved]  # fmt: skip
        self.full_of = list(full_of or range(len(saved)))

    def hits(self, i: int, variant: str, group: list[int]) -> np.ndarray:
        return np.array(pooled_over(self.records[i], variant, group))

    def against(self, v: str, group: list[int], ref: str = "full") -> tuple[np.ndarray, list[dict], list[dict]]:
        """Per run and prompt `v`'s hit minus `ref`'s (+1, 0 or -1; full attention's from run `full_of[i]`, another
        variant's from the same run); each run's paired difference (Newcombe, its discordant prompts as `only_variant`
        and `only_<ref>`); each later run's difference minus run 1's (bootstrap)."""
        a = np.stack([self.hits(i, v, group) for i in range(len(self.records))])
        b = np.stack([self.hits(j, ref, group) for j in (self.full_of if ref == "full" else range(len(a)))])
        d = a.astype(np.int8) - b.astype(np.int8)
        per_run = []
        for x, y in zip(a, b, strict=True):
            per_run.append(paired_record(paired_difference(x.tolist(), y.tolist()), "only_variant", f"only_{ref}"))
        moved = []
        for r in range(1, len(d)):
            gap = (d[r] - d[0]).astype(np.float32)
            lo, hi = bootstrap_interval(lambda rows, g=gap: g[rows].mean(axis=1), d.shape[1], resamples=RESAMPLES)
            moved.append({"diff": float((d[r] - d[0]).mean()), "ci_low": lo, "ci_high": hi})
        return d, per_run, moved


def run_listing(run: dict[str, Any]) -> dict[str, Any]:
    """Where a saved run came from: its commit, date, device and command; for a merged report (`merge`), every
    merged run's commit and GPU and the latest date, as `made_from` names them."""
    return {k: run.get(k) for k in ("commit", "date", "device", "command")} | made_from([run])


def made_from(saved: Sequence[dict[str, Any]]) -> dict[str, str]:
    """What a comparison was made from, as a merged report names it: every run's commit and GPU, the latest date;
    a saved report that is itself a merge counts as the runs it lists."""
    runs = [r for run in saved for r in (run.get("runs") or [run])]
    return {
        "commit": " + ".join(dict.fromkeys(str(run["commit"]) for run in runs)),
        "device": " + ".join(dict.fromkeys(str(run["device"]) for run in runs)),
        "date": max(str(run["date"]) for run in runs),
    }


def _shared_variants(saved: Sequence[dict[str, Any]]) -> list[str]:
    return [v for v in VARIANTS if all(v in run["outcomes"] for run in saved)]


def full_attention_of(saved: Sequence[dict[str, Any]]) -> list[int] | None:
    """For each run, the index of the run whose full attention its variants are measured against: its own; run 1's
    when it did not evaluate full attention and its recipe differs from run 1's only in `PATTERN_SETTINGS`; None
    when a run has neither."""
    if "full" not in saved[0]["outcomes"]:
        return None
    out = []
    for i, run in enumerate(saved):
        if "full" in run["outcomes"]:
            out.append(i)
        elif {d[0] for d in recipe_differences(saved[0], run, RUN_CONTROL)} <= PATTERN_SETTINGS:
            out.append(0)
        else:
            return None
    return out


def check_same_prompts(saved: Sequence[dict[str, Any]], what: str) -> None:
    """ValueError naming the first run that asked other prompts than run 1 (the `PROMPTS` settings differ): runs are
    `what` (compared, pooled) on the same prompts."""
    settings = [ran_with(run) for run in saved]
    for i, s in enumerate(settings[1:], start=2):
        if differ := [k for k in PROMPTS if s.get(k) != settings[0].get(k)]:
            raise ValueError(f"run {i} (commit {saved[i - 1]['commit']}) asked other prompts than run 1: they differ "
                             f"in {', '.join(differ)}; runs are {what} on the same prompts")  # fmt: skip


def _tolerances(run: dict[str, Any]) -> dict[str, float]:
    """The hybrids' target as the saved `run` states it (--tolerance, --ci-tolerance)."""
    return {k: ran_with(run)[k] for k in ("tolerance", "ci_tolerance")}


def _target_rule(summary: dict[str, Any]) -> str:
    return (f">= −{100 * summary['tolerance']:g} points at every length, interval lower end >= "
            f"−{100 * summary['ci_tolerance']:g}")  # fmt: skip


def _target_text(target: dict) -> str:
    worst, lowest = target["worst"], target["lowest"]
    verdict = "met" if target["met"] else "NOT met"
    return (f"{verdict}; worst {100 * worst['diff']:+.1f} at {length_label(worst['length'])}, "
            f"lowest end {100 * lowest['ci_low']:+.1f} at {length_label(lowest['length'])}")  # fmt: skip


def _lacking(saved: Sequence[dict[str, Any]], variant: str) -> str:
    """The runs (numbered from 1) that did not evaluate `variant`, as a message lists them; "" when none."""
    return ", ".join(str(i + 1) for i, run in enumerate(saved) if variant not in run["outcomes"])


def _picked(saved: Sequence[dict[str, Any]], shared: list[str], picked: Sequence[str] | None) -> list[str]:
    """`shared` (the variants every run evaluated), or only the `picked` ones (--variant) when given; ValueError names a
    picked variant that some run did not evaluate."""
    if not picked:
        return shared
    for v in dict.fromkeys(picked):
        if missing := _lacking(saved, v):
            raise ValueError(f"--variant {v}: run {missing} did not evaluate it; the runs "
                             f"evaluated {', '.join(shared) or 'no variant'} in common")  # fmt: skip
    return [v for v in shared if v in picked]


def compare_replicas(saved: Sequence[dict[str, Any]], picked: Sequence[str] | None = None,
                     against: str = "full") -> dict[str, Any]:  # fmt: skip
    """The comparison of the saved ``reproduce.json`` of two or more replicas of one recipe, in every variant they all
    evaluated or only in `picked`, each against `against` of the same run (full attention, or another variant: a
    hybrid change against the recorded hybrid, the training run's own effect on both cancelling); ValueError names
    what does not fit (too few runs, a replica given twice, another recipe, a variant or the reference missing)."""
    if len(saved) < 2:
        raise ValueError(f"comparing replicas needs the reports of at least two runs, got {len(saved)}")
    replicas = [ran_with(run)["extend_replica"] for run in saved]
    if len(set(replicas)) < len(replicas):
        raise ValueError(f"each run must be another --extend-replica; got replicas {replicas}")
    check_same_recipe(saved, RUN_CONTROL | {"extend_replica"} | PATTERN_SETTINGS, "compared as replicas (those that "
                      "differ in pattern settings, in the variants that read none of them)")  # fmt: skip
    if missing := _lacking(saved, against):
        raise ValueError(f"every run must have evaluated {against} (run {missing} did not): the differences are "
                         "against it")  # fmt: skip
    control = RUN_CONTROL | {"extend_replica"}
    differ = sorted({d[0] for run in saved[1:] for d in recipe_differences(saved[0], run, control)})

    def reads(v: str) -> str:  # the settings `v` reads among those in which the runs differ
        return ", ".join(sorted(set(differ) & pattern_settings_read(v)))

    if reads(against):
        raise ValueError(f"--against {against} reads {reads(against)}, where the runs differ: no replicas of it")
    if picked and against in picked:
        raise ValueError(f"--variant {against}: replicas measure each variant against {against} (--against), which "
                         "is always read")  # fmt: skip
    shared = _picked(saved, [v for v in _shared_variants(saved) if v != against], picked)
    variants = [v for v in shared if not reads(v)]
    left_out = [v for v in shared if v not in variants]
    if picked and left_out:
        raise ValueError(f"--variant {left_out[0]} reads {reads(left_out[0])}, where the runs differ: it has no "
                         "replicas here")  # fmt: skip
    if not variants:
        where = f" and reads none of {', '.join(differ)}, where the runs differ" if differ else ""
        raise ValueError(f"no variant besides {against} was evaluated by every run{where}")
    runs = _Runs(saved, [against, *variants], "replicas")

    out: dict[str, Any] = {}
    for v in variants:
        table = []
        for group in runs.groups:
            d, per_run, moved = runs.against(v, group, against)
            n = d.shape[1]
            mean = d.mean(axis=0, dtype=np.float32)
            low, high = bootstrap_interval(lambda rows, m=mean: m[rows].mean(axis=1), n, resamples=RESAMPLES)
            row = {"lengths": group, "n": n,
                   "per_run": [{"replica": r, **p} for r, p in zip(replicas, per_run, strict=True)],
                   "mean": {"diff": float(d.mean()), "ci_low": low, "ci_high": high},
                   "spread": [{"replica": r, "minus": replicas[0], **m}
                              for r, m in zip(replicas[1:], moved, strict=True)]}  # fmt: skip
            if len(saved) >= RUNS_AS_UNIT:
                diffs = [p["diff"] for p in per_run]
                mean_runs, lo_runs, hi_runs = mean_interval(diffs)
                row["runs_as_unit"] = {"diff": mean_runs, "ci_low": lo_runs, "ci_high": hi_runs,
                                       "sd": float(np.std(diffs, ddof=1))}  # fmt: skip
            table.append(row)
        out[v] = table
    listed = [run_listing(run) | {"extend_replica": r} for run, r in zip(saved, replicas, strict=True)]
    return {**made_from(saved), "runs": listed, "lengths": runs.lengths, "resamples": RESAMPLES,
            **_tolerances(saved[0]), **({"against": against} if against != "full" else {}), "variants": out,
            **({"pattern_differs": differ, "left_out": left_out} if differ else {})}  # fmt: skip


def compare_runs(saved: Sequence[dict[str, Any]], picked: Sequence[str] | None = None) -> dict[str, Any]:
    """The comparison of the saved ``reproduce.json`` of two or more runs that asked the same prompts, their recipes
    free to differ (see the module), in every variant they all evaluated or only in `picked`; ValueError names what
    does not fit (too few runs, other prompts, no variant evaluated by every run)."""
    if len(saved) < 2:
        raise ValueError(f"comparing runs needs the reports of at least two runs, got {len(saved)}")
    check_same_prompts(saved, "compared")
    variants = _picked(saved, _shared_variants(saved), picked)
    if not variants:
        raise ValueError("no variant was evaluated by every run")
    full_of = full_attention_of(saved)
    needed = [*variants, *(["full"] if full_of and "full" not in variants else [])]  # full: a run may borrow run 1's
    runs = _Runs(saved, needed, "compared runs", full_of)
    longest = runs.lengths[-1]
    tolerances = _tolerances(saved[0])

    out: dict[str, Any] = {}
    for v in variants:
        rows = []
        for group in runs.groups:
            hits = [runs.hits(i, v, group) for i in range(len(saved))]
            n = len(hits[0])
            minus_first = [paired_record(paired_difference(x.tolist(), hits[0].tolist()), "only_this", "only_first")
                           for x in hits[1:]]  # fmt: skip
            row: dict[str, Any] = {"lengths": group, "n": n, "accuracy": [accuracy_of(x.tolist()) for x in hits],
                                   "minus_first": minus_first}  # fmt: skip
            if v != "full" and full_of:
                _, per_run, moved = runs.against(v, group)
                row["against_full"] = {"per_run": per_run, "moved": moved}
            rows.append(row)
        target = None
        if v in TARGETED and full_of:
            single = [r for r in rows if len(r["lengths"]) == 1]
            target = [hybrid_target([(r["lengths"][0], r["against_full"]["per_run"][i]) for r in single], **tolerances)
                      for i in range(len(saved))]  # fmt: skip
        by_task = {f"{t}@{n}": [run["outcomes"][v][f"{t}@{n}"].count("1") for run in saved]
                   for t in TASKS for n in runs.lengths if f"{t}@{n}" in saved[0]["outcomes"][v]}  # fmt: skip
        missed = None
        if f"niah@{longest}" in saved[0]["outcomes"][v]:  # prompt i of n has its needle at depth i / (n - 1)
            missed = [[i / (runs.per_task - 1) for i, c in enumerate(run["outcomes"][v][f"niah@{longest}"]) if c == "0"]
                      for run in saved]  # fmt: skip
        extension = [run["variants"].get(v, {}).get("extension") or {} for run in saved]
        extension = [{k: e.get(k) for k in ("steps", "tokens", "loss_final")} for e in extension]
        out[v] = {"rows": rows, "by_task": by_task, "niah_missed": missed, "extension": extension, "target": target}
    listed = [run_listing(run) | {"differs": [list(d) for d in recipe_differences(saved[0], run, RUN_CONTROL)],
                              "full_of_run": None if full_of is None else full_of[i] + 1}
              for i, run in enumerate(saved)]  # fmt: skip
    return {**made_from(saved), "runs": listed, "lengths": runs.lengths, "per_task": runs.per_task,
            "resamples": RESAMPLES, **tolerances, "variants": out}  # fmt: skip


def _group_name(group: list[int], lengths: list[int]) -> str:
    if group == lengths:
        return "all lengths"
    if len(group) == 1:
        return length_label(group[0])
    return f">= {length_label(group[0])}"


def _pts(x: dict) -> str:
    return f"{100 * x['diff']:+.1f} ({100 * x['ci_low']:+.1f} to {100 * x['ci_high']:+.1f})"


def format_replicas(summary: dict[str, Any]) -> str:
    """The markdown of `compare_replicas`'s summary."""
    runs, lengths = summary["runs"], summary["lengths"]
    reps = [r["extend_replica"] for r in runs]
    resamples = f"{summary['resamples']:,}"
    ref = summary.get("against", "full")
    ref_name = "full attention" if ref == "full" else f"`{ref}`"
    lines = [
        "# The comparison across training runs (`--extend-replica`)",
        "",
        *(f"- replica {r['extend_replica']}: commit {r['commit']}, {r['date']}, {r['device']}" for r in runs),
        "",
        f"Each variant minus {ref_name}{'' if ref == 'full' else ' of the same replica'} on the same prompts, in "
        "points. Per replica: the paired difference with "
        "Newcombe's 95% interval. Mean: the difference averaged over the replicas; spread: a replica's difference "
        f"minus replica {reps[0]}'s; both with percentile bootstrap 95% intervals over prompts ({resamples} "
        "resamples, the same prompts for every replica and model). These intervals cover the prompts' sampling only; "
        "where the spread's excludes 0, the training runs differ by more than the prompts explain.",
    ]
    as_unit = len(runs) >= RUNS_AS_UNIT
    if as_unit:
        lines[-1] += (f" Runs as the unit: the mean over the {len(runs)} replicas with its Student-t 95% interval over "
                      f"their differences ({len(runs) - 1} degrees of freedom), which covers how much a training run "
                      "moves the difference on these prompts; sd: the standard deviation of the replicas' "
                      "differences.")  # fmt: skip
    if summary.get("pattern_differs"):
        left = summary["left_out"]
        lines += ["", f"The replicas differ in {', '.join(summary['pattern_differs'])}, which {ref_name} does not "
                      "read; compared are the variants that read none of them"
                      + (f" ({', '.join(left)} read some: left out)." if left else ".")]  # fmt: skip
    for v, rows in summary["variants"].items():
        head = ["lengths", "prompts", *(f"replica {r} − {ref}" for r in reps), f"mean − {ref}",
                *(["runs as the unit", "sd"] if as_unit else []),
                *(f"replica {r} − replica {reps[0]}" for r in reps[1:])]  # fmt: skip
        cells = [[_group_name(row["lengths"], lengths), str(row["n"]), *(_pts(p) for p in row["per_run"]),
                  _pts(row["mean"]),
                  *([_pts(row["runs_as_unit"]), f"{100 * row['runs_as_unit']['sd']:.1f}"] if as_unit else []),
                  *(_pts(s) for s in row["spread"])] for row in rows]  # fmt: skip
        lines += ["", f"## {LABELS[v]}", "", *markdown_table(head, cells)]
        if v not in TARGETED or ref != "full":  # the hybrids' target is against full attention
            continue
        single = [(row["lengths"][0], row["mean"]) for row in rows if len(row["lengths"]) == 1]
        target = hybrid_target(single, summary["tolerance"], summary["ci_tolerance"])
        lines += ["", f"The hybrids' target applied to the mean over replicas ({_target_rule(summary)}): "
                      f"{_target_text(target)}."]  # fmt: skip
        if as_unit:
            runs_unit = [(row["lengths"][0], row["runs_as_unit"]) for row in rows if len(row["lengths"]) == 1]
            lowest = hybrid_target(runs_unit, summary["tolerance"], summary["ci_tolerance"])["lowest"]
            lines[-1] += (f" With the runs as the unit, the lowest interval end is {100 * lowest['ci_low']:+.1f} at "
                          f"{length_label(lowest['length'])}.")  # fmt: skip
    return "\n".join(lines) + "\n"


def _setting(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def format_compare(summary: dict[str, Any]) -> str:
    """The markdown of `compare_runs`'s summary."""
    runs, lengths = summary["runs"], summary["lengths"]
    names = [f"run {i}" for i in range(1, len(runs) + 1)]
    lines = ["# Runs compared on the same prompts", ""]
    for name, run in zip(names, runs, strict=True):
        differs = "; ".join(f"{k} {_setting(a)} → {_setting(b)}" for k, a, b in run["differs"])
        what = "the reference" if name == "run 1" else f"differs from run 1 in {differs or 'nothing'}"
        if run.get("full_of_run") not in (None, int(name.split()[1])):
            what += (
                f"; did not evaluate full attention and is measured against run {run['full_of_run']}'s, the "
                "model it would have trained (the recipes differ only in settings full attention does not read)"
            )
        lines.append(f"- {name}: commit {run['commit']}, {run['date']}, {run['device']}; {what}")
    lines += [
        "",
        "Accuracy in % with the 95% Wilson interval, pooled over the tasks. `run k − run 1`: the same variant on the "
        "same prompts, in points, with Newcombe's 95% interval and the prompts only run k / only run 1 answered. "
        "`− full`: the variant minus full attention within a run (Newcombe). `moved`: run k's difference to full "
        f"attention minus run 1's, with a percentile bootstrap 95% interval over prompts ({summary['resamples']:,} "
        "resamples). The intervals cover the prompts' sampling only, not a training run's own spread: compare a move "
        "with the spread between replicas of one recipe (`reproduce.py replicas`).",
    ]

    def pct(a: dict) -> str:
        return f"{100 * a['accuracy']:.1f} ({100 * a['ci_low']:.0f}-{100 * a['ci_high']:.0f})"

    def paired(p: dict) -> str:
        return f"{_pts(p)}; {p['only_this']}/{p['only_first']}"

    for v, result in summary["variants"].items():
        rows = result["rows"]
        lines += ["", f"## {LABELS[v]}", ""]
        ext = [e for e in result["extension"] if e.get("steps")]
        if len(ext) == len(runs):
            lines += ["Extension: " + "; ".join(
                f"{name} {e['steps']} steps, {e['tokens'] / 1e6:.1f}M tokens, final loss {e['loss_final']:.3f}"
                for name, e in zip(names, ext, strict=True)) + ".", ""]  # fmt: skip
        head = ["lengths", "prompts", *names, *(f"{n} − run 1" for n in names[1:])]
        cells = [[_group_name(r["lengths"], lengths), str(r["n"]), *(pct(a) for a in r["accuracy"]),
                  *(paired(p) for p in r["minus_first"])] for r in rows]  # fmt: skip
        lines += markdown_table(head, cells)
        if all("against_full" in r for r in rows):
            head = ["lengths", *(f"{n} − full" for n in names), *(f"moved: {n} − run 1" for n in names[1:])]
            cells = [[_group_name(r["lengths"], lengths), *(_pts(p) for p in r["against_full"]["per_run"]),
                      *(_pts(m) for m in r["against_full"]["moved"])] for r in rows]  # fmt: skip
            lines += ["", *markdown_table(head, cells)]
        if result.get("target"):
            lines += ["", f"The hybrids' target ({_target_rule(summary)}): " + "; ".join(
                f"{n} {_target_text(x)}" for n, x in zip(names, result["target"], strict=True)) + "."]  # fmt: skip
        tasks = list(dict.fromkeys(key.rsplit("@", 1)[0] for key in result["by_task"]))
        cells = [[t, *(" / ".join(map(str, result["by_task"].get(f"{t}@{n}", []))) for n in lengths)] for t in tasks]
        lines += ["", f"Correct of {summary['per_task']} by task ({' / '.join(names)}):", "",
                  *markdown_table(["task", *(length_label(n) for n in lengths)], cells)]  # fmt: skip
        if result["niah_missed"] is not None:
            depths = [(", ".join(f"{100 * x:.0f}%" for x in m) or "none") if len(m) <= MISSES_LISTED
                      else f"{len(m)} of {summary['per_task']}" for m in result["niah_missed"]]  # fmt: skip
            lines += ["", f"Needles missed at {length_label(lengths[-1])}, by depth: "
                          + "; ".join(f"{n} {d}" for n, d in zip(names, depths, strict=True)) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_outputs(summary: dict[str, Any], text: str, out: Path, files: tuple[str, str]) -> dict[str, Any]:
    """`summary` and its markdown `text` written into `out` as `files` (the JSON's name, the markdown's); prints the
    markdown and returns `summary`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / files[1]).write_text(text)
    write_json(out / files[0], summary)
    print(text, flush=True)
    return summary


def write_replicas(saved: Sequence[dict[str, Any]], out: Path, command: str, picked: Sequence[str] | None = None,
                   against: str = "full") -> dict[str, Any]:  # fmt: skip
    """`compare_replicas` written into `out` as ``FILES`` (with `command`); prints the markdown."""
    summary = {**compare_replicas(saved, picked, against), "command": command}
    return write_outputs(summary, format_replicas(summary), out, FILES)


def write_compare(saved: Sequence[dict[str, Any]], out: Path, command: str,
                  picked: Sequence[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """`compare_runs` written into `out` as ``COMPARE_FILES`` (with `command`); prints the markdown."""
    summary = {**compare_runs(saved, picked), "command": command}
    return write_outputs(summary, format_compare(summary), out, COMPARE_FILES)
