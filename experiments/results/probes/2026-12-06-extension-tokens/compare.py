"""Full attention extended on twice the tokens (this probe) against the main run's full attention, same prompts.

Both runs pre-trained from the same seed on the same data (1,636 steps; loss 9.848 -> 1.469 in both) and answered
the same 1,000 seeded prompts (40 a task and length); the probe extended for 1,118 steps (73.3M tokens) instead of
559 (36.6M). Writes `compare.md` beside this file:

    python experiments/results/probes/2026-12-06-extension-tokens/compare.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parents[1]
FIFTH = RESULTS / "archive" / "2026-12-06-fifth-recipe"  # the fifth recipe's runs, the main one among them
sys.path[:0] = [str(RESULTS.parents[1] / "src"), str(RESULTS.parent)]

from reproduction.settings import TASKS  # noqa: E402

from longgen.eval.stats import paired_difference, wilson_interval  # noqa: E402


def outcomes(path: Path) -> tuple[dict[str, str], dict, tuple[int, ...]]:
    """Full attention's outcome strings, its extension record and the evaluation lengths of a saved report."""
    saved = json.loads(path.read_text())
    return saved["outcomes"]["full"], saved["variants"]["full"]["extension"], tuple(saved["settings"]["eval_lengths"])


def pooled(o: dict[str, str], lengths) -> list[bool]:
    return [c == "1" for n in lengths for t in TASKS for c in o[f"{t}@{n}"]]


def _pct(correct: int, n: int) -> str:
    lo, hi = wilson_interval(correct, n)
    return f"{100 * correct / n:.1f} ({100 * lo:.0f}-{100 * hi:.0f})"


def _diff(a: list[bool], b: list[bool]) -> str:
    d = paired_difference(a, b)
    return f"{100 * d.diff:+.1f} ({100 * d.ci_low:+.1f} to {100 * d.ci_high:+.1f}; {d.a_only}/{d.b_only})"


def report() -> str:
    probe, probe_ext, lengths = outcomes(HERE / "reproduce.json")
    main, main_ext, main_lengths = outcomes(FIFTH / "runs" / "e24dd0b_main.json")
    if lengths != main_lengths:
        raise ValueError(f"the runs were evaluated at different lengths: {lengths} and {main_lengths}")
    label = {
        "probe": f"probe: {probe_ext['steps']} steps, {probe_ext['tokens'] / 1e6:.1f}M tokens",
        "main": f"main run: {main_ext['steps']} steps, {main_ext['tokens'] / 1e6:.1f}M tokens",
    }
    lines = [
        "# Full attention: twice the extension tokens against the main run, same prompts",
        "",
        "Written by `compare.py`. Accuracy in % with the 95% Wilson interval; difference: probe minus main run, "
        "points, 95% Newcombe interval, prompts only the probe / only the main run answered.",
        "",
        f"Extension loss: probe {probe_ext['loss_final']:.3f}, main run {main_ext['loss_final']:.3f}.",
        "",
        "## Pooled over the five tasks (200 prompts a length)",
        "",
        "| length | " + " | ".join(label.values()) + " | difference |",
        "| --- | ---: | ---: | ---: |",
    ]
    far = tuple(n for n in lengths if n >= 8192)
    groups = [(f"{n // 1024}K", (n,)) for n in lengths] + [(">= 8K", far), ("all", lengths)]
    for name, group in groups:
        a, b = pooled(probe, group), pooled(main, group)
        lines.append(f"| {name} | {_pct(sum(a), len(a))} | {_pct(sum(b), len(b))} | {_diff(a, b)} |")
    lines += ["", "## Correct of 40, by task (probe / main run)", ""]
    lines += ["| task | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |", "| --- |" + " ---: |" * len(lengths)]
    for t in TASKS:
        cells = [f"{probe[f'{t}@{n}'].count('1')} / {main[f'{t}@{n}'].count('1')}" for n in lengths]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")

    def missed(o: dict[str, str]) -> str:  # prompt i of n has its needle at depth i / (n - 1)
        record = o["niah@32768"]
        return ", ".join(f"{100 * i / (len(record) - 1):.0f}%" for i, c in enumerate(record) if c == "0") or "none"

    lines += ["", f"Depths of the needles missed at 32K: probe {missed(probe)}; main run {missed(main)}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    text = report()
    (HERE / "compare.md").write_text(text)
    print(text)
