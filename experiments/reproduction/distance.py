"""Answers by where a prompt's needles lie (`reproduce.py distance`), pooled over saved runs that asked the same
prompts (their ``reproduce.json``, read with --from; one run or more).

* **Variable chains by their hops longer than the variant's local window** (`settings.local_window`: what every
  head of its sparse layers sees just before a query). A chain ``VAR A = 12345.`` ... ``VAR B = A.`` ...
  ``VAR C = B.``, asked for C's value, has three hops: from the value's needle to the second name's, from there to
  the third's, and from there to the question. A hop within the window is one a sparse layer can make; a longer one
  only a full layer can (or, in BlockSparse, the KV head whose strided blocks hold it).
* **Single facts by their distance from the question** (pass key, needle, the asked key of the multi-key needle,
  the held-out task), in bins whose edges double from run 1's --window to the longest prompt.

Both are given **within each prompt length**, and for chains also pooled over the long lengths (`far_lengths`:
from 8K on) and over all: the share of chains with long hops grows with the length, and so does the hybrids'
deficit, so classes pooled over lengths compare lengths as much as hops. The contrast between chains with two or
more long hops and chains with at most one is therefore taken within each long length and averaged over them
(each length weighted by n1 n2 / (n1 + n2) of its two classes' prompts; lengths where a class has fewer than
`CONTRAST_MIN` prompts are left out and named).

Each variant (all but full attention, or those of --variant) is pooled over the runs that evaluated it, prompt by
prompt against the full attention of the same run, or of run 1 for a run that differs from it only in a sparse
pattern's settings (as `compare` measures it). Differences get 95% percentile bootstrap intervals over the prompts,
a prompt's pairs in every run resampled together and within its length (and, for the contrast, its class): they
cover the prompts' sampling with the training runs fixed.

Positions are recomputed from the seed (`tasks.needle_depths`): a needle at depth d of a length-n prompt lies about
(1 - d)(n - --answer-room) tokens before the question. The haystack is the prompt less its template, needles and
question (a few dozen tokens), so a distance is right to within that many tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from longgen.eval.stats import bootstrap_interval

from .report import far_lengths, length_label, markdown_table, ran_with
from .runs import RESAMPLES, check_same_prompts, full_attention_of, made_from, run_listing, write_outputs
from .settings import TASKS, VARIANTS, local_window
from .tasks import needle_gaps

FILES = ("distance.json", "distance.md")
CHAIN = "variable_tracking"
FACTS = tuple(t for t in TASKS if t != CHAIN)
CONTRAST_MIN = 10  # prompts each class needs for the contrast between them


def fact_bins(window: int, longest: int) -> list[int]:
    """The upper edges of the single facts' distance bins: `window`, then doubling until one reaches `longest`."""
    edges = [window]
    while edges[-1] < longest:
        edges.append(2 * edges[-1])
    return edges


def _distances(task: str, s: dict[str, Any]) -> np.ndarray:
    """Per prompt of `task` (lengths, then indices, as `_hits` orders them): its needles' gaps in tokens, in the order
    the answer reads them, the last one to the question; shape (prompts, needles)."""
    per_task = s["prompts_per_task"]
    return np.array([needle_gaps(task, s["seed"], n, i, per_task, s["answer_room"]) for n in s["eval_lengths"]
                     for i in range(per_task)])  # fmt: skip


def _hits(run: dict[str, Any], variant: str, task: str, lengths: Sequence[int]) -> np.ndarray:
    return np.array([c == "1" for n in lengths for c in run["outcomes"][variant][f"{task}@{n}"]])


def _pairs(saved: Sequence[dict[str, Any]], variant: str, task: str, runs: list[int], full_of: list[int],
           lengths: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The hits of `variant` in `runs` and of the full attention each is measured against, shape (runs, prompts)."""
    a = np.stack([_hits(saved[i], variant, task, lengths) for i in runs])
    return a, np.stack([_hits(saved[full_of[i]], "full", task, lengths) for i in runs])


def _row(a: np.ndarray, b: np.ndarray, mask: np.ndarray, length: np.ndarray) -> dict[str, Any]:
    """The pairs of the prompts in `mask`: `a` the variant's hits and `b` full attention's, shape (runs, prompts);
    `length` each prompt's length (the bootstrap's strata)."""
    a, b = a[:, mask], b[:, mask]
    prompts = int(mask.sum())
    row: dict[str, Any] = {"prompts": prompts, "n": int(a.size), "variant": int(a.sum()), "full": int(b.sum()),
                           "only_variant": int((a & ~b).sum()), "only_full": int((b & ~a).sum())}  # fmt: skip
    if not prompts:
        return row | {"diff": None, "ci_low": None, "ci_high": None}
    per_prompt = (a.astype(np.float64) - b).mean(axis=0)
    low, high = bootstrap_interval(lambda rows: per_prompt[rows].mean(axis=1), prompts, resamples=RESAMPLES,
                                   strata=length[mask])  # fmt: skip
    return row | {"diff": float(per_prompt.mean()), "ci_low": low, "ci_high": high}


def _contrast(a: np.ndarray, b: np.ndarray, high: np.ndarray, length: np.ndarray, far: Sequence[int]) -> dict:
    """The difference to full attention on the chains in `high` minus that on the others, within each length of
    `far` and averaged over them (weights n1 n2 / (n1 + n2) of the two classes' prompts), with its bootstrap interval
    (strata: length and class); the lengths used, and diff None when no length has `CONTRAST_MIN` prompts in
    both classes."""
    used = [n for n in far if min(((length == n) & high).sum(), ((length == n) & ~high).sum()) >= CONTRAST_MIN]
    if not used:
        return {"lengths": [], "diff": None, "ci_low": None, "ci_high": None}
    keep = np.isin(length, used)
    x = (a.astype(np.float64) - b).mean(axis=0)[keep]
    h, at = high[keep], length[keep]
    cells = [((at == n) & h, (at == n) & ~h) for n in used]
    weights = np.array([m1.sum() * m0.sum() / (m1.sum() + m0.sum()) for m1, m0 in cells])

    def gap(rows: np.ndarray) -> np.ndarray:  # stratified rows keep every position's length and class
        xs = x[rows]
        within = [xs[:, m1].mean(axis=1) - xs[:, m0].mean(axis=1) for m1, m0 in cells]
        return np.average(np.stack(within, axis=1), axis=1, weights=weights)

    low, up = bootstrap_interval(gap, len(x), resamples=RESAMPLES, strata=at * 2 + h)
    diff = float(gap(np.arange(len(x))[None, :])[0])
    return {"lengths": used, "diff": diff, "ci_low": low, "ci_high": up}


def _per_run(a: np.ndarray, b: np.ndarray, hops: np.ndarray, length: np.ndarray, far: Sequence[int]) -> dict:
    """One run's difference to full attention at the `far` lengths on all chains, those with at most one hop beyond
    the window and those with two or more (None for a class without prompts), and the contrast within lengths (`a`,
    `b`: that run's hits, shape (1, prompts))."""
    d = (a.astype(np.float64) - b)[0]
    at_far = np.isin(length, far)
    masks = {"any": at_far, "<= 1": at_far & (hops <= 1), ">= 2": at_far & (hops >= 2)}
    return {**{k: float(d[m].mean()) if m.any() else None for k, m in masks.items()},
            "contrast": _contrast(a, b, hops >= 2, length, far)}  # fmt: skip


def _window_of(saved: Sequence[dict[str, Any]], variant: str, runs: list[int]) -> int:
    windows = {i: local_window(ran_with(saved[i]), variant) for i in runs}
    first = windows[runs[0]]
    for i, w in windows.items():
        if w != first:
            raise ValueError(f"{variant} has a local window of {w} tokens in run {i + 1} and {first} in run "
                             f"{runs[0] + 1}: pool runs of one window (its hops are counted against it), or name "
                             "the variants to pool with --variant")  # fmt: skip
    return first


def answers_by_distance(saved: Sequence[dict[str, Any]], picked: Sequence[str] | None = None) -> dict[str, Any]:
    """The analysis of the module over the saved ``reproduce.json`` of one run or more; ValueError names what does not
    fit (other prompts, no full attention, a variant no run evaluated or with two windows, a task not evaluated)."""
    if not saved:
        raise ValueError("the distance analysis needs the report of at least one run")
    check_same_prompts(saved, "pooled")
    full_of = full_attention_of(saved)
    if full_of is None:
        raise ValueError("every run needs full attention to measure against: its own, or run 1's when it differs "
                         "from run 1 only in a sparse pattern's settings")  # fmt: skip
    if picked and "full" in picked:
        raise ValueError("--variant full: full attention is what every variant is measured against; name the others")
    evaluated = [v for v in VARIANTS if v != "full" and any(v in run["outcomes"] for run in saved)]
    for v in dict.fromkeys(picked or ()):
        if v not in evaluated:
            raise ValueError(f"--variant {v}: no run evaluated it besides full attention; the runs evaluated "
                             f"{', '.join(evaluated) or 'only full attention'}")  # fmt: skip
    variants = [v for v in evaluated if not picked or v in picked]
    if not variants:
        raise ValueError("no run evaluated a variant besides full attention")
    s = ran_with(saved[0])
    lengths = list(s["eval_lengths"])
    for i, run in enumerate(saved):
        for v in {*variants, "full"} & set(run["outcomes"]):
            if missing := [f"{t}@{n}" for t in TASKS for n in lengths if f"{t}@{n}" not in run["outcomes"][v]]:
                raise ValueError(f"run {i + 1} did not evaluate {v} on {', '.join(missing)}: the analysis reads "
                                 f"the tasks {', '.join(TASKS)}")  # fmt: skip
    gaps = {t: _distances(t, s) for t in TASKS}
    length = np.repeat(lengths, s["prompts_per_task"])  # each prompt's, in `_hits` order
    far = far_lengths(lengths)
    groups = {**{str(n): length == n for n in lengths}, "far": np.isin(length, far), "all": length > 0}
    edges = fact_bins(s["window"], max(lengths) - s["answer_room"])
    out: dict[str, Any] = {}
    for v in variants:
        runs = [i for i, run in enumerate(saved) if v in run["outcomes"]]
        window = _window_of(saved, v, runs)
        a, b = _pairs(saved, v, CHAIN, runs, full_of, lengths)
        hops = (gaps[CHAIN] > window).sum(axis=1)
        classes = {"any": hops >= 0, "0": hops == 0, "1": hops == 1, "2": hops == 2, "3": hops == 3,
                   "<= 1": hops <= 1, ">= 2": hops >= 2}  # fmt: skip
        chains = {g: [{"hops_beyond": k, **_row(a, b, m & c, length)} for k, c in classes.items()]
                  for g, m in groups.items()}  # fmt: skip
        facts = {}
        for task in FACTS:
            a_t, b_t = _pairs(saved, v, task, runs, full_of, lengths)
            place = np.searchsorted(edges, gaps[task][:, 0])  # bin k: edges[k - 1] < distance <= edges[k]
            cells = [(n, k, (length == n) & (place == k)) for n in lengths for k in range(len(edges))]
            facts[task] = [{"length": int(n), "distance": [edges[k - 1] if k else 0, edges[k]],
                            **_row(a_t, b_t, m, length)} for n, k, m in cells if m.any()]  # fmt: skip
        out[v] = {"runs": [i + 1 for i in runs], "full_of_runs": [full_of[i] + 1 for i in runs], "window": window,
                  "chains": chains, "contrast": _contrast(a, b, hops >= 2, length, far),
                  "per_run": [_per_run(a[[k]], b[[k]], hops, length, far) | {"run": i + 1} for k, i in enumerate(runs)],
                  "facts": facts}  # fmt: skip
    return {**made_from(saved), "runs": [run_listing(run) for run in saved], "lengths": lengths, "far_lengths": far,
            "prompts_per_task": s["prompts_per_task"], "resamples": RESAMPLES, "fact_bins": edges,
            "variants": out}  # fmt: skip


def _pts(row: dict[str, Any]) -> str:
    if row.get("diff") is None:
        return "–"
    return f"{100 * row['diff']:+.1f} ({100 * row['ci_low']:+.1f}, {100 * row['ci_high']:+.1f})"


def _signed(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f}"


def _bin_label(lo: int, hi: int) -> str:
    return f"≤ {length_label(hi)}" if lo == 0 else f"{length_label(lo)}-{length_label(hi)}"


def _group_label(group: str, far: Sequence[int]) -> str:
    if group == "far":
        return f"≥ {length_label(far[0])}" if len(far) > 1 else length_label(far[0])
    return "all lengths" if group == "all" else length_label(int(group))


def format_distance(summary: dict[str, Any]) -> str:
    runs, far = summary["runs"], summary["far_lengths"]
    far_label = _group_label("far", far)
    lines = ["# Answers by where the needles lie", "",
             f"{f'{len(runs)} runs, on the same prompts' if len(runs) > 1 else 'One run'} "
             f"({summary['prompts_per_task']} prompts a task and length at "
             f"{', '.join(length_label(n) for n in summary['lengths'])}); the command and each run's own are in "
             "distance.json, with every length and class.", ""]  # fmt: skip
    lines += [f"- run {i}: commit {r['commit']}, {r['device']}, {r['date']}" for i, r in enumerate(runs, 1)]
    lines += ["", "## Variable chains by their hops beyond the local window", "",
              "A chain's three hops (value to second name, to third name, to the question), counted when longer than "
              "the variant's local window; each variant pooled over the runs that evaluated it, against full "
              "attention of the same run, prompt by prompt (prompts x runs), at the long lengths and at each. Points, "
              "95% bootstrap interval over the prompts within lengths.", ""]  # fmt: skip
    rows = []
    groups = ["far", *(str(n) for n in far)] if len(far) > 1 else ["far"]
    for v, r in summary["variants"].items():
        for g in groups:
            for c in (c for c in r["chains"][g] if c["hops_beyond"] in ("any", "0", "1", ">= 2")):
                rows.append([f"{v} ({r['window']:,})", _group_label(g, far), c["hops_beyond"], f"{c['n']:,}",
                             f"{c['full']:,}", f"{c['variant']:,}", str(c["only_full"]), str(c["only_variant"]),
                             _pts(c)])  # fmt: skip
    header = ["variant (window)", "length", "hops beyond", "prompts x runs", "full", "variant", "only full",
              "only variant", "variant − full"]  # fmt: skip
    lines += markdown_table(header, rows, text_columns=3)
    lines += ["", f"Chains with two or more hops beyond the window minus those with at most one, within each length "
              f"({far_label}) and averaged over them (points; each run's own at {far_label}: all chains, at most one "
              "long hop, two or more, the contrast):", ""]  # fmt: skip
    for v, r in summary["variants"].items():
        each = "; ".join(f"run {x['run']} {_signed(x['any'])}, {_signed(x['<= 1'])}, {_signed(x['>= 2'])}, "
                         f"{_pts(x['contrast'])}" for x in r["per_run"])  # fmt: skip
        used = ", ".join(length_label(n) for n in r["contrast"]["lengths"]) or "none with enough prompts"
        lines.append(f"- {v}: {_pts(r['contrast'])} (lengths {used})" + (f"; {each}" if len(r["per_run"]) > 1 else ""))
    edges = summary["fact_bins"]
    bins = [_bin_label(edges[k - 1] if k else 0, e) for k, e in enumerate(edges)]
    lines += ["", f"## Single facts by their distance from the question, at {far_label}", "",
              "Answered by the variant / by full attention, of the prompts x runs in each bin.", ""]  # fmt: skip
    rows = []
    for v, r in summary["variants"].items():
        for task, cells in r["facts"].items():
            for n in far:
                at = {tuple(c["distance"]): c for c in cells if c["length"] == n}
                rows.append([v, task, length_label(n), *(
                    f"{at[e]['variant']} / {at[e]['full']} of {at[e]['n']}" if e in at else ""
                    for e in ((edges[k - 1] if k else 0, x) for k, x in enumerate(edges)))])  # fmt: skip
    lines += markdown_table(["variant", "task", "length", *bins], rows, text_columns=3)
    return "\n".join(lines) + "\n"


def write_distance(saved: Sequence[dict[str, Any]], out: Path, command: str,
                   picked: Sequence[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """`answers_by_distance` written into `out` as ``FILES`` (with `command`); prints the markdown."""
    summary = {**answers_by_distance(saved, picked), "command": command}
    return write_outputs(summary, format_distance(summary), out, FILES)
