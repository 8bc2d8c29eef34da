"""The report: accuracies with intervals, paired differences against full attention, the targets checked, the
cost-quality frontier; markdown, JSON (`reproduce.json`, and `quality_summary.json` for tools) and plots.

Only results that are current for the settings count; a variant not evaluated yet is left out, and the targets
that need it read "not evaluated".
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from longgen.eval.stats import PairedDifference, paired_difference, wilson_interval

from .settings import (
    CHAIN_MAX,
    FRONTIER_ALIASES,
    FRONTIER_POINTS,
    HELD_OUT_TASK,
    LABELS,
    PATTERN_SETTINGS,
    PLACEMENTS,
    RETRIEVAL_KINDS,
    TASKS,
    VARIANTS,
    Settings,
    pattern_settings_read,
)
from .stages import Experiment, log, write_json

FILES = ("reproduce.json", "quality_summary.json", "reproduce.md", "retrieval_by_length.png", "frontier.png",
         "niah_heatmaps.png", "ppl_by_position.png")  # fmt: skip


def build_report(exp: Experiment, commit: str = "unknown", command: str = "") -> dict[str, Any]:
    """Collect the current results, check them, write ``FILES`` into the output folder and print the markdown;
    returns the JSON summary."""
    variants = {v: r for v in VARIANTS if (r := variant_record(exp, v)) is not None}
    prepare, pretrain = (exp.done(n) if exp.current(n) else None for n in ("prepare", "pretrain"))
    meta = {
        "plan": exp.plan,
        "environment": environment(),
        "commit": commit,
        "command": command,
        "corpus": prepare and prepare["result"],
        "pretrain": pretrain and {**pretrain["result"], "seconds": pretrain["seconds"]},
        "stage_seconds": {n: exp.done(n)["seconds"] for n in exp.stage_names(list(variants)) if exp.current(n)},
    }
    summary = write_report(exp.s, variants, meta, exp.out)
    log(f"work files: {exp.work}")
    return summary


# settings added after runs were recorded, and what those runs did instead (a saved reproduce.json lacking one ran so)
BEFORE_THE_SETTING = {
    "extend_retrieval_min": 0.125, "extend_far_share": 0.0, "extend_replica": 0, "extend_chain_max": CHAIN_MAX,
    "fact_kinds": list(RETRIEVAL_KINDS), "extend_near_share": 0.0,
}  # fmt: skip


def ran_with(saved: dict[str, Any]) -> dict[str, Any]:
    """The settings a saved run ran with: a run older than a setting ran without it (`BEFORE_THE_SETTING`)."""
    return {**BEFORE_THE_SETTING, **saved["settings"]}


def rebuild_report(saved: dict[str, Any], out: Path, **changes: Any) -> dict[str, Any]:
    """The report again from a saved ``reproduce.json`` (its settings, variants and per-prompt outcomes), without
    the work folder: for new tables or plots of a finished run. `changes` replace top-level entries of `saved`
    first (e.g. ``outcomes``, ``commit``, ``command``)."""
    saved = {**saved, **changes}
    fields = {f.name for f in dataclasses.fields(Settings)}
    given = ran_with(saved)
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if k in fields})
    variants = {}
    for v, r in saved["variants"].items():
        if not saved_has_own_result(saved, v):
            continue  # recorded before such a variant was left out
        if v in saved["outcomes"]:
            r = {**r, "records": records_from_outcomes(saved["outcomes"][v], s.prompts_per_task)}
        variants[v] = r
    meta = {k: saved[k] for k in ("plan", "environment", "commit", "command", "corpus", "pretrain", "stage_seconds")}
    if saved.get("runs"):  # a merged report keeps where each variant came from
        meta["runs"] = saved["runs"]
    return write_report(s, variants, meta, out)


# settings that steer a run, not what it trains or asks: runs that differ only in these can be merged
RUN_CONTROL = frozenset({
    "work_dir", "out_dir", "device", "variants", "budget_minutes", "assume_pretrain_tps", "assume_extend_tps",
    "assume_eval_tps", "checkpoints_per_run", "compile", "pretrain_steps", "extend_steps",
})  # fmt: skip  # the steps themselves are compared as planned (given, or derived from the budget)


def load_reports(paths: Sequence[str]) -> list[dict[str, Any]]:
    """The saved ``reproduce.json`` at `paths` (--from); ValueError for one that cannot be read or is not one."""
    import json

    saved = []
    for path in paths:
        try:
            saved.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--from {path}: not a readable reproduce.json ({e})") from None
        needed = {"settings", "plan", "variants", "outcomes", "commit"}
        if not isinstance(saved[-1], dict) or not needed <= set(saved[-1]):
            raise ValueError(f"--from {path}: not a report of experiments/reproduce.py (no settings or outcomes)")
    return saved


def recipe_differences(first: dict[str, Any], run: dict[str, Any], may_differ: frozenset[str]) -> list[tuple]:
    """How the saved `run`'s recipe differs from `first`'s: ``(name, first's value, run's value)`` for each setting
    outside `may_differ` and each planned training step count (named ``plan pretrain_steps`` / ``plan
    extend_steps``). A run recorded before a setting existed counts as what it ran (`ran_with`)."""
    a, b = ran_with(first), ran_with(run)
    differ = [(k, a.get(k), b.get(k)) for k in sorted((set(a) | set(b)) - may_differ) if a.get(k) != b.get(k)]
    plans = [(f"plan {k}", first["plan"][k], run["plan"][k]) for k in ("pretrain_steps", "extend_steps")]
    return differ + [p for p in plans if p[1] != p[2]]


def check_same_recipe(saved: Sequence[dict[str, Any]], may_differ: frozenset[str], what: str) -> None:
    """ValueError naming the first run whose recipe is not run 1's (`recipe_differences` outside `may_differ`)."""
    first = saved[0]
    for i, run in enumerate(saved[1:], start=1):
        if differ := [d[0] for d in recipe_differences(first, run, may_differ)]:
            raise ValueError(
                f"run {i + 1} (commit {run['commit']}) is not the recipe of run 1 (commit {first['commit']}): they "
                f"differ in {', '.join(differ)}; only runs that differ in {', '.join(sorted(may_differ))} can be {what}"
            )


def _differs(run: dict[str, Any]) -> str:
    """How a merged run's recipe differs from the first run's, as its line in the report ends ("" when it does not)."""
    if not run.get("differs"):
        return ""
    text = "; its recipe differs in " + ", ".join(f"{k} {a} → {b}" for k, a, b in run["differs"])
    return text + (f", which {', '.join(run['left_out'])} read: left out" if run["left_out"] else "")


def merge_reports(saved: Sequence[dict[str, Any]], out: Path, command: str) -> dict[str, Any]:
    """One report from the saved ``reproduce.json`` of runs of the same recipe that evaluated different variants
    (the main comparison one day, the frontier another, pre-training repeated from the same seed), written into
    `out`. A variant evaluated by several runs is taken from the first that has it. The runs must agree on every
    setting that decides the models and the prompts (all but `RUN_CONTROL`) and on the planned training steps;
    ValueError names what differs. One exception: a run may differ from run 1 in the sparse patterns' settings
    (`PATTERN_SETTINGS`) too; from it only the variants that read none of the settings that differ
    (`pattern_settings_read`) are taken: full attention always (a recipe that changes a pattern keeps its full
    attention), the BlockSparse hybrids when only the sink or window differ. Its other variants are left out. The report
    lists each run (commit, date, device, command) with the variants taken from it, and for such a run the settings
    that differ and the variants left out."""
    if len(saved) < 2:
        raise ValueError(f"merging needs the reports of at least two runs, got {len(saved)}")
    check_same_recipe(saved, RUN_CONTROL | PATTERN_SETTINGS, "merged (from a run that differs in "
                      f"{', '.join(sorted(PATTERN_SETTINGS))}, only the variants that read none of those that "
                      "differ, such as full attention)")  # fmt: skip
    first = saved[0]
    variants: dict[str, dict] = {}
    outcomes: dict[str, str] = {}
    runs = []
    for run in saved:
        taken = [v for v in run["variants"] if v not in variants and saved_has_own_result(run, v)]
        differs = recipe_differences(first, run, RUN_CONTROL)
        differ = {d[0] for d in differs}
        left_out = [v for v in taken if differ & pattern_settings_read(v)]  # they read settings that differ
        taken = [v for v in taken if v not in left_out]
        for v in taken:  # each variant keeps the device its throughput was measured on
            variants[v] = {**run["variants"][v], "device": run["variants"][v].get("device", run["device"])}
            if v in run["outcomes"]:
                outcomes[v] = run["outcomes"][v]
        runs.append({k: run[k] for k in ("commit", "date", "device", "command")} | {"variants": taken}
                    | ({"differs": [list(d) for d in differs], "left_out": left_out} if differs else {}))  # fmt: skip
    settings = {**first["settings"], "variants": [v for v in VARIANTS if v in variants]}
    commit = " + ".join(dict.fromkeys(run["commit"] for run in saved))  # each commit once, in the runs' order
    return rebuild_report(
        first, out, variants=variants, outcomes=outcomes, settings=settings, commit=commit, command=command, runs=runs
    )


def write_report(s: Settings, variants: dict[str, dict], meta: dict[str, Any], out: Path) -> dict[str, Any]:
    """Accuracies, paired differences, frontier and targets of `variants` (each with its per-prompt ``records``
    when evaluated), written as ``FILES`` into `out`; prints the markdown and returns the JSON summary."""
    rows, pooled, paired, by_task = accuracy_rows(s, variants)
    run = {"device": meta["environment"]["device"], "date": meta["environment"]["date"][:10]}
    summary = {
        "title": "LongGen quality: a 16x context extension, full attention against the hybrids",
        **run,
        "settings": dataclasses.asdict(s),
        **meta,
        "variants": {v: {k: x for k, x in r.items() if k != "records"} for v, r in variants.items()},
        "accuracy": rows,
        "pooled": pooled,
        "paired": paired,
        "paired_by_task": by_task,
        "frontier": frontier(s, variants, run["device"]),
        "placement": placement(s, variants),
        "targets": targets(s, rows, paired, variants),
        "outcomes": {v: outcome_strings(r["records"]) for v, r in variants.items() if r.get("records")},
    }
    out.mkdir(parents=True, exist_ok=True)
    # the sweep's 0 and 1/3 points are all_sparse and the main hybrids: their rows again, under the names of the
    # points the frontier shows (no auto series, no frontier_auto_0)
    aliases = [(f["variant"], f["model"]) for f in summary["frontier"] if f["variant"] != f["model"]]
    rows_out = rows + [{**r, "variant": a} for a, v in aliases for r in rows if r["variant"] == v]
    paired_out = paired + [{**p, "variant": a} for a, v in aliases for p in paired if p["variant"] == v]
    quality = {
        **run,
        "commit": meta["commit"],
        "command": meta["command"],
        "pretrain_len": s.short_len,
        "extended_len": s.long_len,
        "rows": [
            {k: r[k] for k in ("variant", "task", "length", "n", "correct", "accuracy", "ci_low", "ci_high")}
            for r in rows_out
        ],
        "paired": [
            {k: p[k] for k in ("variant", "length", "n", "diff_vs_full", "diff_ci_low", "diff_ci_high")}
            for p in paired_out
        ],
    }
    write_json(out / "quality_summary.json", quality)
    table = format_report(summary, s)
    (out / "reproduce.md").write_text(table + "\n")
    write_plots(out, s, variants, summary)
    summary["files"] = [str(out / f) for f in FILES]
    write_json(out / "reproduce.json", summary)
    print(table, flush=True)
    log(f"\nresults: {out} ({', '.join(FILES)})")
    return summary


def has_own_result(variant: str, model_of: str, evaluated: bool) -> bool:
    """Whether a variant with a trained model belongs in the report: one trained for itself always; one evaluated
    on another variant's model (StreamingLLM on `full`'s) once it is evaluated."""
    return model_of == variant or evaluated


def saved_has_own_result(saved: dict[str, Any], variant: str) -> bool:
    """`has_own_result` for a variant of a saved ``reproduce.json``."""
    record = saved["variants"][variant]
    return has_own_result(variant, record["model_of"], variant in saved["outcomes"] or bool(record.get("ppl")))


def variant_record(exp: Experiment, variant: str) -> dict[str, Any] | None:
    """Everything current about `variant`, or None when it has no result of its own yet (nothing trained for
    it, or, for a variant evaluated on another one's model, nothing evaluated)."""
    s = exp.s
    trained, options = exp.model_of(variant)
    ext_name = f"extend-{trained}"
    ext = exp.done(ext_name) if exp.current(ext_name) else None
    if ext is None:
        return None
    record: dict[str, Any] = {"label": LABELS[variant], "model_of": trained, "eval_options": options}
    record["extension"] = {**ext["result"], "seconds": ext["seconds"]}
    start = exp.outputs(ext_name)[0]
    if (start / "config.json").is_file():
        record.update(layout_record(start, options, [s.long_len]))
    for task in ("retrieval", "ppl"):
        name = f"eval-{variant}-{task}"
        record[task] = exp.result(name) if exp.current(name) else None
    if not has_own_result(variant, trained, record["retrieval"] is not None or record["ppl"] is not None):
        return None
    record["records"] = (record.pop("retrieval") or {}).get("records")
    if record["ppl"]:
        record["ppl"] = record["ppl"]["summary"]
    return record


def layout_record(model: Path, options: dict, lengths: Sequence[int]) -> dict[str, Any]:
    """Full layers, sparse pattern and analytic KV-cache bytes (bf16, batch 1) of a model folder as evaluated
    (`options` with the StreamingLLM baseline: every layer SinkWindow(sink, window))."""
    from transformers import AutoConfig

    from longgen.infer import analytic_kv_bytes
    from longgen.model import convert_config, is_hybrid, read_layout
    from longgen.patterns import Full, SinkWindow

    config = AutoConfig.from_pretrained(model)
    if options.get("baseline") == "streaming":
        convert_config(config, full_fraction=0.0, pattern=SinkWindow(options["sink"], options["window"]))
    elif not is_hybrid(config):
        convert_config(config, full_fraction=1.0)
    layers = read_layout(config)
    return {
        "full_layers": [i for i, p in enumerate(layers) if isinstance(p, Full)],
        "sparse_pattern": ", ".join(sorted({repr(p) for p in layers if not isinstance(p, Full)})) or None,
        "kv_bytes": {str(n): analytic_kv_bytes(config, n) for n in lengths},
    }


def accuracy_rows(s: Settings, variants: dict[str, dict]) -> tuple[list, list, list, list]:
    """(rows per variant x task x length, pooled rows per variant x length, paired differences vs full pooled over
    the tasks, the same by task)."""
    rows, pooled, paired, by_task = [], [], [], []

    def versus_full(variant: str, length: int, d, **task: str) -> dict[str, Any]:
        return {"variant": variant, **task, "length": length, "n": d.n, "diff_vs_full": d.diff, "diff_ci_low": d.ci_low,
                "diff_ci_high": d.ci_high, "only_variant": d.a_only, "only_full": d.b_only,
                "mcnemar_p": d.p_value}  # fmt: skip

    def row(variant: str, task: str, length: int, hits: list[bool]) -> dict[str, Any]:
        return {"variant": variant, "task": task, "length": length, "n": len(hits), **accuracy_of(hits)}

    def outcomes(records: list[dict], length: int, tasks: Sequence[str] = TASKS) -> list[bool]:
        keyed = {(r["task"], r["index"]): r["correct"] for r in records if r["length"] == length}
        return [keyed[t, i] for t in tasks for i in range(s.prompts_per_task) if (t, i) in keyed]

    full = (variants.get("full") or {}).get("records")
    for v, r in variants.items():
        if not r.get("records"):
            continue
        for n in s.eval_lengths:
            for t in TASKS:
                rows.append(row(v, t, n, outcomes(r["records"], n, [t])))
            pooled.append(row(v, "all", n, outcomes(r["records"], n)))
            if full and v != "full":
                paired.append(versus_full(v, n, paired_difference(outcomes(r["records"], n), outcomes(full, n))))
                for t in TASKS:
                    d = paired_difference(outcomes(r["records"], n, [t]), outcomes(full, n, [t]))
                    by_task.append(versus_full(v, n, d, task=t))
    return rows, pooled, paired, by_task


def accuracy_of(hits: Sequence[bool]) -> dict[str, Any]:
    """Correct answers of the prompts `hits`, their share and its 95% Wilson interval."""
    correct = int(sum(hits))
    lo, hi = wilson_interval(correct, len(hits))
    return {"correct": correct, "accuracy": correct / len(hits), "ci_low": lo, "ci_high": hi}


def paired_record(p: PairedDifference, only_a: str, only_b: str) -> dict[str, Any]:
    """A paired difference as the JSON gives it, its discordant prompts under the names `only_a` and `only_b`."""
    return {"diff": p.diff, "ci_low": p.ci_low, "ci_high": p.ci_high, only_a: p.a_only, only_b: p.b_only}


def outcome_strings(records: list[dict]) -> dict[str, str]:
    """Per-prompt results, compactly: ``{"<task>@<length>": "0110..."}``, character i for prompt index i (the
    prompts are a function of the seed, so these are enough to redo any paired comparison)."""
    out: dict[str, list[str]] = {}
    for r in sorted(records, key=lambda r: (r["task"], r["length"], r["index"])):
        out.setdefault(f"{r['task']}@{r['length']}", []).append("1" if r["correct"] else "0")
    return {k: "".join(v) for k, v in out.items()}


def records_from_outcomes(outcomes: dict[str, str], per_task: int) -> list[dict[str, Any]]:
    """The per-prompt records that `outcome_strings` wrote (depth i / (per_task - 1), as `tasks.build_items`)."""
    records = []
    for key, bits in outcomes.items():
        task, length = key.rsplit("@", 1)
        records += [{"task": task, "length": int(length), "index": i, "depth": i / (per_task - 1),
                     "correct": b == "1"} for i, b in enumerate(bits)]  # fmt: skip
    return records


def far_lengths(lengths: Sequence[int]) -> list[int]:
    """The lengths the long-context verdicts pool over: from 8K on (the longest alone if none is)."""
    return [n for n in lengths if n >= 8192] or [max(lengths)]


def _far(s: Settings) -> list[int]:
    return far_lengths(s.eval_lengths)


def pooled_over(variants: dict, v: str, lengths: Sequence[int]) -> list[bool]:
    keyed = {(r["task"], r["length"], r["index"]): r["correct"] for r in variants[v]["records"]}
    return [keyed[k] for k in sorted(keyed) if k[1] in lengths]


def frontier(s: Settings, variants: dict[str, dict], device: str) -> list[dict[str, Any]]:
    """SinkWindow hybrids by share of full layers, placed in the middle or by `auto` (a placement with at least one
    hybrid evaluated; all sparse starts each series): accuracy pooled over tasks and lengths >= 8K (Wilson
    interval), analytic KV bytes at the extended length, measured extension tokens/s and the device that measured
    it (a merged run's variant keeps its own run's; `device` for the others)."""
    out = []
    for name, where, fraction in FRONTIER_POINTS:
        v = FRONTIER_ALIASES.get(name, name)
        r = variants.get(v)
        if not r or not r.get("records"):
            continue
        hits = pooled_over(variants, v, _far(s))
        acc = accuracy_of(hits)
        out.append({"variant": name, "model": v, "placement": where, "full_fraction": fraction,
                    "full_layers": r["full_layers"],
                    "accuracy_far": acc["accuracy"], "ci_low": acc["ci_low"], "ci_high": acc["ci_high"], "n": len(hits),
                    "kv_bytes": r["kv_bytes"][str(s.long_len)],
                    "extension_tokens_per_s": r["extension"]["tokens_per_s"],
                    "device": r.get("device", device)})  # fmt: skip
    # all sparse starts both series: a placement none of whose hybrids was evaluated has no series
    shown = {f["placement"] for f in out if f["model"] != "all_sparse"}
    return [f for f in out if f["placement"] in shown]


def placement(s: Settings, variants: dict[str, dict]) -> list[dict[str, Any]]:
    """The variants that change one thing of a hybrid with full layers in the middle, against it on the same
    prompts: bottom, interleaved and auto placement, and no sink tokens (what exporting to engines that know only
    sliding windows costs), against `hybrid_sinkwindow`; a sink block, against `hybrid_blocksparse`; along the
    frontier, auto against middle placement of as many full layers (`frontier_auto_<f>` against `frontier_<f>`, one
    run's models). The paired difference by length and over all lengths, with Newcombe's interval."""
    pairs = [(v, "hybrid_sinkwindow") for v in ("hybrid_bottom", "hybrid_interleave", "hybrid_auto", "hybrid_auto_loss",
                                                 "hybrid_nosink")]  # fmt: skip
    pairs.append(("hybrid_blocksparse_sink", "hybrid_blocksparse"))
    middle = {f: name for name, where, f in FRONTIER_POINTS if where == "middle"}
    pairs += [
        (name, middle[f]) for name, where, f in FRONTIER_POINTS if where == "auto" and middle[f] not in FRONTIER_ALIASES
    ]
    out = []
    for v, against in pairs:
        if not all((variants.get(x) or {}).get("records") for x in (v, against)):
            continue
        for lengths in [[n] for n in s.eval_lengths] + [list(s.eval_lengths)]:
            mine, theirs = (pooled_over(variants, x, lengths) for x in (v, against))
            d = paired_difference(mine, theirs)
            out.append({"variant": v, "against": against, "lengths": lengths, "n": d.n, "diff_vs_middle": d.diff,
                        "diff_ci_low": d.ci_low, "diff_ci_high": d.ci_high, "mcnemar_p": d.p_value})  # fmt: skip
    return out


EXACT = 1e-9  # accuracies are counts over a few thousand prompts at most: a difference this close to a bound is on it


def at_least(x: float, bound: float) -> bool:
    """Whether `x` >= `bound`, where x is a difference of two accuracies (counts over prompts): 338/400 − 346/400 is
    −0.02 exactly, though float subtraction gives −0.020000000000000018."""
    return x >= bound - EXACT


def hybrid_target(single: Sequence[tuple[int, dict[str, float]]], tolerance: float, ci_tolerance: float) -> dict:
    """The hybrids' target applied to one series of differences to full attention, ``(length, {"diff", "ci_low"})``
    a length: every difference at least -tolerance and every interval's lower end at least -ci_tolerance; with the
    worst difference and the lowest end, each with its length."""
    worst = min(single, key=lambda x: x[1]["diff"])
    lowest = min(single, key=lambda x: x[1]["ci_low"])
    met = all(at_least(p["diff"], -tolerance) and at_least(p["ci_low"], -ci_tolerance) for _, p in single)
    return {"met": met, "worst": {"length": worst[0], "diff": worst[1]["diff"]},
            "lowest": {"length": lowest[0], "ci_low": lowest[1]["ci_low"]}}  # fmt: skip


def targets(s: Settings, rows: list, paired: list, variants: dict) -> list[dict[str, Any]]:
    """The issue's targets, each `met` True/False, or None when a variant it needs was not evaluated."""
    checks = []

    def add(text: str, needs: Sequence[str], test) -> None:
        missing = [v for v in needs if not (variants.get(v) or {}).get("records")]
        met, detail = (None, f"not evaluated: {', '.join(missing)}") if missing else test()
        checks.append({"target": text, "met": met, "detail": detail})

    def full_retrieves() -> tuple[bool, str]:
        mine = [r for r in rows if r["variant"] == "full" and r["task"] in ("passkey", "niah")]
        worst = min(mine, key=lambda r: r["accuracy"])
        return all(at_least(r["accuracy"], s.retrieval_target) for r in mine), (
            f"lowest {worst['accuracy']:.1%} ({worst['task']} at {length_label(worst['length'])}, {worst['correct']}/"
            f"{worst['n']}, 95% CI {worst['ci_low']:.1%}-{worst['ci_high']:.1%})"
        )

    add(f"full attention >= {s.retrieval_target:.0%} on passkey and niah at every length", ["full"], full_retrieves)
    for v in ("hybrid_sinkwindow", "hybrid_blocksparse"):

        def near(v=v) -> tuple[bool, str]:
            mine = {p["length"]: p for p in paired if p["variant"] == v}
            t = hybrid_target([(n, {"diff": p["diff_vs_full"], "ci_low": p["diff_ci_low"]}) for n, p in mine.items()],
                              s.tolerance, s.ci_tolerance)  # fmt: skip
            worst, low = t["worst"], t["lowest"]
            return t["met"], (
                f"worst difference {100 * worst['diff']:+.1f} points at {length_label(worst['length'])}; "
                f"lowest interval end {100 * low['ci_low']:+.1f} points at {length_label(low['length'])} "
                f"({mine[low['length']]['n']} paired prompts a length)"
            )

        add(f"{LABELS[v]}: paired difference vs full >= {-100 * s.tolerance:+.0f} points at every length, interval "
            f"lower end >= {-100 * s.ci_tolerance:+.0f}", [v, "full"], near)  # fmt: skip
    for v in ("all_sparse", "streaming_llm"):

        def far(v=v) -> tuple[bool, str]:
            mine, full = (pooled_over(variants, x, _far(s)) for x in (v, "full"))
            d = paired_difference(mine, full)
            return at_least(-d.diff, s.far_below), (
                f"{sum(mine) / len(mine):.1%} vs {sum(full) / len(full):.1%} "
                f"over {', '.join(map(length_label, _far(s)))} "
                f"(difference {100 * d.diff:+.1f} points, 95% CI {100 * d.ci_low:+.1f} to {100 * d.ci_high:+.1f})"
            )

        add(f"{LABELS[v]} >= {100 * s.far_below:.0f} points below full attention at >= 8K", [v, "full"], far)

    def middle_vs_bottom() -> tuple[bool, str]:
        mid, bottom = (pooled_over(variants, x, s.eval_lengths) for x in ("hybrid_sinkwindow", "hybrid_bottom"))
        d = paired_difference(mid, bottom)
        return at_least(d.diff, 0.0), (
            f"{sum(mid) / len(mid):.1%} vs {sum(bottom) / len(bottom):.1%} over all lengths (difference "
            f"{100 * d.diff:+.1f} points, 95% CI {100 * d.ci_low:+.1f} to {100 * d.ci_high:+.1f})"
        )

    add("full layers in the middle at least as good as at the bottom", ["hybrid_sinkwindow", "hybrid_bottom"],
        middle_vs_bottom)  # fmt: skip
    return checks


def environment() -> dict[str, Any]:
    import torch
    import transformers

    env = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpu_threads": torch.get_num_threads(),
    }
    if importlib.util.find_spec("triton") is not None:
        import triton

        env["triton"] = triton.__version__
    return env


def length_label(n: int | str) -> str:
    n = int(n)
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> list[str]:
    """A markdown table: the first `text_columns` columns left-aligned, the numbers right-aligned."""
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    return ["| " + " | ".join(r) + " |" for r in (header, align, *rows)]


def _ci(lo: float, hi: float) -> str:
    return f"{100 * lo:.0f}-{100 * hi:.0f}"


def format_report(summary: dict, s: Settings) -> str:
    """The comparison as markdown: targets, pooled retrieval with intervals, paired differences, per task,
    frontier, perplexity, layout/training/KV cache."""
    variants, pre, env = summary["variants"], summary["pretrain"], summary["environment"]
    lines = [f"# {summary['title']}", ""]
    if pre:
        lines += [
            f"Llama, {pre['parameters'] / 1e6:.0f}M parameters ({s.layers} layers, hidden {s.hidden_size}, {s.heads} "
            f"heads, {s.kv_heads} KV heads), pre-trained on {pre['tokens'] / 1e6:.1f}M tokens at "
            f"{length_label(s.short_len)}; each variant extended to {length_label(s.long_len)} "
            f"({s.long_len // s.short_len}x, RoPE change {s.rope}) on the "
            f"same {summary['plan']['extend_tokens_per_variant'] / 1e6:.1f}M tokens. {env['device']}, torch "
            f"{env['torch']}, commit {summary['commit']}, {env['date']}.",
            "",
        ]
    if summary.get("runs"):
        lines += [f"Merged from {len(summary['runs'])} runs of this recipe (the pre-training repeated from the same "
                  "seed in each; a variant's paired difference against full attention from another run compares "
                  "models of two pre-trainings):", ""]  # fmt: skip
        lines += [f"- commit {r['commit']}, {r['date']}, {r['device']}: {', '.join(r['variants']) or 'nothing new'} "
                  f"(`{r['command']}`){_differs(r)}" for r in summary["runs"]]  # fmt: skip
        lines += [""]
    verdict = {True: "met", False: "NOT met", None: "not evaluated"}
    lines += ["## Targets", "", "| target | verdict | numbers |", "| --- | --- | --- |"]
    lines += [f"| {c['target']} | {verdict[c['met']]} | {c['detail']} |" for c in summary["targets"]]
    per = len(TASKS) * s.prompts_per_task
    lines += ["", f"## Retrieval accuracy by length, pooled over the {len(TASKS)} tasks ({per} prompts a length; "
              "95% Wilson interval)", ""]  # fmt: skip
    pooled = {(r["variant"], r["length"]): r for r in summary["pooled"]}
    rows = [[LABELS[v], *(f"{100 * p['accuracy']:.1f} ({_ci(p['ci_low'], p['ci_high'])})" if (p := pooled.get((v, n)))
                          else "—" for n in s.eval_lengths)] for v in variants]  # fmt: skip
    lines += markdown_table(["variant", *map(length_label, s.eval_lengths)], rows)
    lines += ["", "## Paired difference against full attention on the same prompts (points; 95% interval, "
              "Newcombe; discordant prompts variant-only / full-only)", ""]  # fmt: skip
    paired = {(p["variant"], p["length"]): p for p in summary["paired"]}
    rows = [[LABELS[v], *(f"{100 * p['diff_vs_full']:+.1f} ({100 * p['diff_ci_low']:+.1f} to "
                          f"{100 * p['diff_ci_high']:+.1f}; {p['only_variant']}/{p['only_full']})"
                          if (p := paired.get((v, n))) else "—" for n in s.eval_lengths)]
            for v in variants if v != "full"]  # fmt: skip
    lines += markdown_table(["variant", *map(length_label, s.eval_lengths)], rows)
    lines += ["", f"## Accuracy by task and length ({s.prompts_per_task} prompts each; `{HELD_OUT_TASK}` is held out "
              "of training)", ""]  # fmt: skip
    by = {(r["variant"], r["task"], r["length"]): r for r in summary["accuracy"]}
    rows = [[LABELS[v], t, *(f"{100 * r['accuracy']:.0f}" if (r := by.get((v, t, n))) else "—" for n in s.eval_lengths)]
            for v in variants for t in TASKS]  # fmt: skip
    lines += markdown_table(["variant", "task", *map(length_label, s.eval_lengths)], rows, text_columns=2)
    if summary["paired_by_task"]:  # empty without full attention
        lines += ["", "## Paired difference against full attention by task (points; discordant prompts variant-only / "
                  f"full-only of {s.prompts_per_task})", ""]  # fmt: skip
        by = {(p["variant"], p["task"], p["length"]): p for p in summary["paired_by_task"]}
        rows = [[LABELS[v], t, *(f"{100 * p['diff_vs_full']:+.1f} ({p['only_variant']}/{p['only_full']})"
                                 if (p := by.get((v, t, n))) else "—" for n in s.eval_lengths)]
                for v in variants if v != "full" and any(key[0] == v for key in by) for t in TASKS]  # fmt: skip
        lines += markdown_table(["variant", "task", *map(length_label, s.eval_lengths)], rows, text_columns=2)
    if summary.get("placement"):
        title = "Against full layers in the middle (as many full layers), same prompts"
        lines += ["", f"## {title} (points; 95% interval, Newcombe)", ""]
        by = {(p["variant"], tuple(p["lengths"])): p for p in summary["placement"]}
        rows = [[LABELS[v], LABELS[against], *(f"{100 * p['diff_vs_middle']:+.1f} ({100 * p['diff_ci_low']:+.1f} to "
                                              f"{100 * p['diff_ci_high']:+.1f})" if (p := by.get((v, key))) else "—"
                                              for key in [(n,) for n in s.eval_lengths] + [tuple(s.eval_lengths)])]
                for v, against in dict.fromkeys((p["variant"], p["against"]) for p in summary["placement"])
                ]  # fmt: skip
        lines += markdown_table(["variant", "against", *map(length_label, s.eval_lengths), "all"], rows, text_columns=2)
    devices = len({r["device"] for r in summary.get("runs", [])}) > 1  # merged runs on several GPUs: name each
    if summary["frontier"]:
        lines += ["", "## Cost-quality frontier: SinkWindow hybrids by share of full layers (middle or auto)", ""]
        rows = [[f["variant"], ",".join(map(str, f["full_layers"])) or "none",
                 f"{100 * f['accuracy_far']:.1f} ({_ci(f['ci_low'], f['ci_high'])})", f"{f['kv_bytes'] / 2**20:,.1f}",
                 f"{f['extension_tokens_per_s']:,.0f}" + (f" ({f['device']})" if devices else "")]
                for f in summary["frontier"]]  # fmt: skip
        header = [
            "variant",
            "full layers",
            f"accuracy >= 8K, % (n = {summary['frontier'][0]['n']})",
            f"KV MiB @{length_label(s.long_len)}",
            "extension tokens/s" + (" (device)" if devices else ""),
        ]
        lines += markdown_table(header, rows, text_columns=2)
    lines += ["", "## Perplexity of held-out documents by context length", ""]
    rows = []
    for v, r in variants.items():
        by_len = (r.get("ppl") or {}).get("ppl_by_length", {})
        rows.append([LABELS[v], *(f"{by_len[str(n)]:.2f}" if str(n) in by_len else "—" for n in s.ppl_lengths)])
    lines += markdown_table(["variant", *map(length_label, s.ppl_lengths)], rows)
    lines += ["", "## Layout, extension training, KV cache (bf16, batch 1, analytic)", ""]
    rows = []
    for v, r in variants.items():
        ext, kv = r["extension"], r.get("kv_bytes", {})
        tps = f"{ext['tokens_per_s']:,.0f}" if r["model_of"] == v else f"({LABELS[r['model_of']].split('.')[0]}'s)"
        tps += f" ({r['device']})" if devices and r["model_of"] == v else ""
        rows.append([LABELS[v], ",".join(map(str, r.get("full_layers", []))) or "none", r.get("sparse_pattern") or
                     "none", f"{ext['loss_final']:.3f}", tps, f"{kv[str(s.long_len)] / 2**20:,.1f}"])  # fmt: skip
    lines += markdown_table(["variant", "full layers", "sparse layers", "extension loss",
                     "tokens/s" + (" (device)" if devices else ""), f"KV MiB @{length_label(s.long_len)}"], rows,
                    text_columns=3)  # fmt: skip
    return "\n".join(lines)


def _legend_beside(ax) -> None:
    """The legend to the right of the axes, where it hides no curve (none when nothing was evaluated yet)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _style(i: int) -> dict[str, Any]:
    """Line style of the `i`-th variant: ten colours, then the same colours dashed with squares, so that no two of
    up to twenty variants look alike."""
    return {"color": f"C{i % 10}", "ls": "-" if i < 10 else "--", "marker": "o" if i < 10 else "s"}


def write_plots(out: Path, s: Settings, variants: dict[str, dict], summary: dict) -> None:
    """retrieval_by_length.png (pooled accuracy with 95% intervals), frontier.png (accuracy at >= 8K against KV
    bytes), niah_heatmaps.png (single-needle accuracy by depth and length) and ppl_by_position.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    for i, v in enumerate(variants):
        pts = [r for r in summary["pooled"] if r["variant"] == v]
        if pts:
            x = [r["length"] for r in pts]
            y = [r["accuracy"] for r in pts]
            err = [[max(0.0, a - r["ci_low"]) for a, r in zip(y, pts, strict=True)],
                   [max(0.0, r["ci_high"] - a) for a, r in zip(y, pts, strict=True)]]  # fmt: skip
            ax.errorbar(x, y, yerr=err, capsize=3, label=LABELS[v], **_style(i))
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(s.eval_lengths), [length_label(n) for n in s.eval_lengths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel(f"retrieval accuracy, {len(TASKS)} tasks pooled (95% CI)")
    ax.set_ylim(-0.03, 1.03)
    _legend_beside(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "retrieval_by_length.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    if summary["frontier"]:
        labelled: set[str] = set()
        for where in PLACEMENTS:
            pts = [f for f in summary["frontier"] if f["placement"] == where]
            if not pts:
                continue
            x = [f["kv_bytes"] / 2**20 for f in pts]
            y = [f["accuracy_far"] for f in pts]
            err = [[max(0.0, a - f["ci_low"]) for a, f in zip(y, pts, strict=True)],
                   [max(0.0, f["ci_high"] - a) for a, f in zip(y, pts, strict=True)]]  # fmt: skip
            ax.errorbar(x, y, yerr=err, marker="o" if where == "middle" else "s", capsize=3,
                        label=f"full layers: {where}")  # fmt: skip
            for j, (f, xi, yi) in enumerate(zip(pts, x, y, strict=True)):
                if where == "middle":  # below and above in turn, so that neighbours' labels do not run together
                    ax.annotate(f"{f['full_fraction']:.0%} full", (xi, yi), textcoords="offset points",
                                xytext=(4, (-12, 6)[j % 2]), fontsize=8)  # fmt: skip
                elif f["model"] not in labelled:  # the others name their layers, up and to the left
                    layers = ",".join(map(str, f["full_layers"])) or "none"
                    ax.annotate(f"layers {layers}", (xi, yi), textcoords="offset points", xytext=(-4, 6),
                                ha="right", fontsize=8)  # fmt: skip
                labelled.add(f["model"])  # a model two series share (all sparse) is labelled once
        full = variants.get("full")
        if full and full.get("records"):
            hits = pooled_over(variants, "full", _far(s))
            ax.scatter([full["kv_bytes"][str(s.long_len)] / 2**20], [sum(hits) / len(hits)], marker="*", s=120,
                       color="black", label="full attention", zorder=3)  # fmt: skip
        ax.legend(fontsize=8, loc="lower right")  # high KV, low accuracy: the empty corner
    ax.set_xlabel(f"KV cache at {length_label(s.long_len)} tokens (MiB, bf16, batch 1)")
    ax.set_ylabel("retrieval accuracy at >= 8K (95% CI)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=110)
    plt.close(fig)

    bins, per_row = 5, 6
    shown = [v for v in variants if variants[v].get("records")]
    panels = max(1, len(shown))
    rows, cols = -(-panels // per_row), min(per_row, panels)
    fig, axes = plt.subplots(rows, cols, figsize=(2 + 2.3 * cols, 0.4 + 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(shown) :]:
        ax.set_visible(False)
    for k, v in enumerate(shown):
        ax = axes[k // per_row][k % per_row]
        grid = [[[] for _ in s.eval_lengths] for _ in range(bins)]
        for r in variants[v]["records"]:
            if r["task"] == "niah":
                grid[min(bins - 1, int(r["depth"] * bins))][s.eval_lengths.index(r["length"])].append(r["correct"])
        acc = [[sum(c) / len(c) if c else float("nan") for c in line] for line in grid]
        ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, line in enumerate(acc):
            for j, a in enumerate(line):
                ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(s.eval_lengths)), [length_label(n) for n in s.eval_lengths], fontsize=7)
        ax.set_yticks(range(bins), [f"{i / bins:.0%}-{(i + 1) / bins:.0%}" for i in range(bins)], fontsize=6)
        ax.set_title(textwrap.fill(LABELS[v], 26), fontsize=8)  # long labels on two lines, inside the panel
    fig.supxlabel("prompt length (tokens)")
    fig.supylabel("needle depth")
    fig.suptitle("needle in a haystack (single needle)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "niah_heatmaps.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    for i, (v, r) in enumerate(variants.items()):
        by = (r.get("ppl") or {}).get("by_position")
        if by:
            style = {**_style(i), "marker": None}
            ax.plot([(b["start"] + b["end"]) / 2 for b in by], [b["loss"] for b in by], lw=1, label=LABELS[v], **style)
    for x in (s.short_len, s.long_len):
        ax.axvline(x, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("token position; dashed: pre-training and extended context")
    ax.set_ylabel("mean loss (nats)")
    _legend_beside(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "ppl_by_position.png", dpi=110)
    plt.close(fig)
