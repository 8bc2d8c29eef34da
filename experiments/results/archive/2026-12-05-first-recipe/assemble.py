"""Assemble the committed report of the 2026-12-05 run from the two evaluations it made (files in `runs/`).

Kept as the record of how this archived report was made. It runs with the reproduction code of commit 5ae8cc3,
where this folder was `experiments/results/` (the held-out task was then `kv_lookup`):

    git worktree add /tmp/longgen-5ae8cc3 5ae8cc3 && cd /tmp/longgen-5ae8cc3
    PYTHONPATH=src python experiments/results/assemble.py

* `runs/eval_main_c96391b.json` — the report of commit c96391b, which evaluated full, both hybrids, all sparse,
  StreamingLLM, bottom placement and the 1/6 and 1/4 frontier points. That commit stored each prompt's outcome
  against another prompt: `_retrieval` scored the prompts length by length (length, task, index order) but paired
  the outcomes with the prompts in task order (task, length, index). The mapping is a fixed permutation, undone
  here (`in_scoring_order`).
* `runs/eval_second_0104e95.json` — the report of commit 0104e95 (the order fixed), which evaluated bottom
  placement, the 1/6, 1/4 and 1/2 frontier points with the same trained models and prompts. For the three
  models evaluated by both commits, the outcomes restored from c96391b equal 0104e95's prompt for prompt
  (checked below, 3 x 1000 prompts), which is the evidence that the permutation is the right one.

The report takes the main variants' outcomes from c96391b (restored) and every other variant's from 0104e95.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from reproduction.report import rebuild_report  # noqa: E402
from reproduction.settings import MAIN, TASKS  # noqa: E402


def in_scoring_order(outcomes: dict[str, str], lengths: list[int], per_task: int) -> dict[str, str]:
    """Undo c96391b's pairing: its record j (task order) holds the outcome of prompt j in scoring order."""
    task_order = [(t, n, i) for t in TASKS for n in lengths for i in range(per_task)]
    scoring_order = [(t, n, i) for n in lengths for t in TASKS for i in range(per_task)]
    stored = [outcomes[f"{t}@{n}"][i] for t, n, i in task_order]
    true = dict(zip(scoring_order, stored, strict=True))
    return {f"{t}@{n}": "".join(true[t, n, i] for i in range(per_task)) for t in TASKS for n in lengths}


def main() -> None:
    first = json.loads((HERE / "runs" / "eval_main_c96391b.json").read_text())
    second = json.loads((HERE / "runs" / "eval_second_0104e95.json").read_text())
    lengths, per_task = first["settings"]["eval_lengths"], first["settings"]["prompts_per_task"]
    restored = {v: in_scoring_order(o, lengths, per_task) for v, o in first["outcomes"].items()}
    for v in sorted(set(restored) & set(second["outcomes"])):
        if restored[v] != second["outcomes"][v]:
            raise SystemExit(f"{v}: the outcomes restored from c96391b differ from 0104e95's")
        print(f"{v}: restored outcomes equal the re-evaluation's ({len(TASKS) * len(lengths) * per_task} prompts)")
    outcomes = {v: restored[v] for v in MAIN} | second["outcomes"]
    command = (f"{first['command']}  (main variants, commit c96391b); {second['command']}  (the rest, commit "
               f"0104e95); assembled by PYTHONPATH=src python experiments/results/assemble.py")  # fmt: skip
    settings = {**second["settings"], "whole_docs": False}  # the run predates the option: packing cut every document
    rebuild_report(second, HERE, outcomes=outcomes, settings=settings, commit="c96391b + 0104e95", command=command)


if __name__ == "__main__":
    main()
