"""The quality experiment: does a LongGen hybrid keep full attention's long-context ability after a 16x extension?

A Llama-style model is pre-trained from scratch at a short context (2K) on the Python source and documentation
found on the machine itself (nothing is downloaded) mixed with synthetic retrieval documents. Copies of it are
extended to 16x the context (32K), each with the same token budget:

    full attention                            full
    LongGen hybrid, SinkWindow                hybrid_sinkwindow   (1/3 full layers in the middle)
    LongGen hybrid, BlockSparse               hybrid_blocksparse
    all layers sparse                         all_sparse          (SinkWindow)
    full layers at the bottom                 hybrid_bottom       (SinkWindow)
    full layers interleaved                   hybrid_interleave   (one a segment: 1, 4, 7, 10 of 12)
    without sink tokens: SinkWindow(0, W)     hybrid_nosink       (exportable to stock transformers)
    BlockSparse hybrid with a sink block      hybrid_blocksparse_sink (the first block seen by every KV head)
    full layers chosen by calibration         hybrid_auto         (longgen.convert(full_layers="auto"))
    the same by the loss score                hybrid_auto_loss    (full_layers="auto", score="loss")
    SinkWindow hybrids, 1/6, 1/4, 1/2 full    frontier_0.167, frontier_0.25, frontier_0.5

and these plus StreamingLLM applied at inference to the full model (streaming_llm) answer the same seeded prompts
of five retrieval tasks at five lengths; the report gives accuracies with intervals, paired differences against
full attention, the cost-quality frontier and perplexity by position, and checks the targets.

Stages write into --work-dir and skip what is finished for the same settings; a stage stopped half-way (killed,
or by --deadline-minutes) resumes where it stopped (training from its last checkpoint; the deadline lets a training
run checkpoint the step it is in):

    prepare   corpus, held-out documents, BPE tokenizer, token caches, synthetic retrieval documents
    pretrain  the base model at --short-len
    extend    every trained variant (or --variant X) at --long-len
    eval      every variant (or --variant X): the retrieval prompts, then perplexity
    report    tables, JSON and plots in --out-dir; prints the comparison
    all       the stages above, in order
    plan      sizes, the time plan and which stages are done (starts nothing)
    merge     one report in --out-dir from the reproduce.json of runs of the same recipe on different days
              (--from A/reproduce.json --from B/reproduce.json; a variant in several is taken from the first)
    replicas  replicas.md and replicas.json in --out-dir: how the variants' differences to full attention move
              between runs that differ only in --extend-replica (--from A/reproduce.json --from B/reproduce.json;
              runs that also differ in a sparse pattern's settings: the variants that read none of them)
    compare   compare.md and compare.json in --out-dir: runs of different recipes on the same prompts (a probe
              against the recorded run; --from A/reproduce.json --from B/reproduce.json, A the reference)
    near      near.md and near.json in --out-dir: the near-question probe on trained variants (default full and
              hybrid_sinkwindow): every fact within --near-span tokens before the question, each model as trained
              and with its full layers limited to a window (--near-windows) at inference
    distance  distance.md and distance.json in --out-dir: answers by where the needles lie, pooled over one run or
              more that asked the same prompts (--from A/reproduce.json ...): variable chains by their hops longer
              than each variant's local window, single facts by their distance from the question; each variant
              against full attention of the same run
    (replicas and compare set side by side every variant all the runs evaluated, or only those of --variant;
    replicas --against X measures them against variant X of the same run instead of full attention)

    PYTHONPATH=src python experiments/reproduce.py all --deadline-minutes 9    # GPU: see experiments/README.md
    PYTHONPATH=src python experiments/reproduce.py all --tiny                  # CPU, about a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if importlib.util.find_spec("longgen") is None:  # a checkout that is not installed: use its src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reproduction.report import build_report, load_reports, merge_reports
from reproduction.settings import DEFAULT, MEASURED_SHAPE, TINY, VARIANTS, Settings
from reproduction.stages import EVAL_STAGES, Deadline, DeadlineReached, Experiment, interactive, log

STAGES = ("plan", "prepare", "pretrain", "extend", "eval", "report", "all", "merge", "replicas", "compare", "near",
          "distance")  # fmt: skip
FROM_RUNS = ("merge", "replicas", "compare", "distance")  # the stages that read --from reports instead of a work folder
EXIT_UNFINISHED = 75  # stopped at --deadline-minutes: run the same command again to continue


def _list_of(kind: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    return parse


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reproduce.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("stage", choices=STAGES, help="what to run")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: the whole pipeline on a CPU in about a minute")
    p.add_argument(
        "--variant",
        action="append",
        choices=VARIANTS,
        help="extend/eval/all: only this one; replicas/compare: compare only this one; near: probe this one; "
        "distance: analyse only this one (repeatable)",
    )
    p.add_argument(
        "--against",
        choices=VARIANTS,
        default="full",
        help="replicas: the variant of the same run the others are measured against (default full)",
    )
    p.add_argument("--near-span", type=int, help="near: every needle within this many tokens before the question "
                   "(default three quarters of --window)")  # fmt: skip
    p.add_argument("--near-windows", type=_list_of(int), help="near: the windows the full layers are limited to "
                   "at inference, comma-separated (default --window and 8 x --window)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="redo the stages run now even if they finished")
    p.add_argument(
        "--deadline-minutes",
        type=float,
        help=f"stop after this long (exit code {EXIT_UNFINISHED}); training checkpoints its step first",
    )
    p.add_argument("--commit", help="the commit of the code that runs, for the results (default: git rev-parse HEAD)")
    p.add_argument("--from", dest="runs", action="append", metavar="REPRODUCE_JSON",
                   help="merge, replicas, compare, distance: a run's reproduce.json (two or more; distance: one "
                        "or more; merge: the main run first; compare: the reference first)")  # fmt: skip
    group = p.add_argument_group("settings (defaults: the GPU preset; --tiny has its own)")
    for f in dataclasses.fields(Settings):
        default = getattr(DEFAULT, f.name)
        if isinstance(default, tuple):
            parse, shown = _list_of(str if f.name == "variants" else type(default[0])), ",".join(map(str, default))
        else:
            parse, shown = _bool if isinstance(default, bool) else type(default), default
        text = f"{f.metadata.get('help', '')} (default {shown})".strip()
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=parse, default=None, help=text)
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if getattr(args, f.name) is not None}
    s = dataclasses.replace(TINY if args.tiny else DEFAULT, **given)
    s.validate()
    return s


def print_plan(exp: Experiment, picked: Sequence[str] | None = None) -> None:
    """The plan of the main comparison, then what is left of `all` for `picked` (default: the settings' variants)."""
    s, p = exp.s, exp.plan
    sec = p["seconds"]
    pre, ext, ext_s = p["pretrain"], p["extend"], sec["extend"]
    tps = p["assumptions"]
    given = s.pretrain_steps and s.extend_steps
    log(f"plan ({'steps given' if given else f'--budget-minutes {s.budget_minutes:g}'}; times at the assumed "
        f"throughput; work {exp.work}; results {exp.out}):")  # fmt: skip
    scaled = tps["per_token_time_vs_measured_shape"]
    if any(getattr(s, k) != v for k, v in MEASURED_SHAPE.items()) and not (s.assume_pretrain_tps and
                                                                          s.assume_extend_tps):  # fmt: skip
        log(f"  (the H100's speeds were measured with another model or lengths; scaled by multiply-adds per token: "
            f"pre-training x{scaled['pretrain']:.2f}, full attention's extension x{scaled['extend']:.2f} the time; "
            "a guide: --assume-pretrain-tps / --assume-extend-tps give measured ones)")  # fmt: skip
    log(f"  pre-train {p['pretrain_steps']} steps x {pre['tokens_per_step']:,} tokens at {s.short_len} "
        f"= {p['pretrain_tokens'] / 1e6:.1f}M tokens, ~{sec['pretrain'] / 60:.1f} min at "
        f"{tps['pretrain_tokens_per_s']:,.0f} tokens/s")  # fmt: skip
    log(f"  extend {len(s.trained)} variants x {p['extend_steps']} steps x {ext['tokens_per_step']:,} tokens at "
        f"{s.long_len} = {p['extend_tokens_per_variant'] / 1e6:.1f}M tokens each, "
        f"{', '.join(f'{v} ~{ext_s[v] / 60:.1f}' for v in s.trained)} min (full attention at "
        f"{tps['extend_tokens_per_s_full']:,.0f} tokens/s{', compiled layers' if s.compile else ''})")  # fmt: skip
    log(f"  evaluate {len(s.variants)} variants x {p['eval_prompts_per_variant']} prompts + perplexity, "
        f"~{sec['eval_full'] / 60:.1f} min for full attention; prepare ~{sec['prepare'] / 60:.1f} min; "
        f"main comparison ~{sec['main_total'] / 60:.1f} min")  # fmt: skip
    names = exp.stage_names(picked)
    pending = [n for n in names if not exp.current(n)]
    status = f"  finished: {len(names) - len(pending)}/{len(names)} stages"
    if pending:
        status += f"; next: {pending[0]}; ~{exp.remaining_seconds(picked) / 60:.1f} min of planned work left"
    log(status)


def current_commit() -> str:
    """The checkout's commit (with "+changes" when files differ from it), or "unknown" outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def run(exp: Experiment, stage: str, picked: Sequence[str] | None, provenance: dict[str, str],
        near: dict[str, Any] | None = None) -> None:  # fmt: skip
    s = exp.s
    if stage == "near":
        from reproduction.near import run_near

        run_near(exp, picked, **(near or {}), **provenance)
    if stage == "extend" and picked and "streaming_llm" in picked:  # before any work, not after the others
        raise ValueError("streaming_llm is not trained: it is model 1 (`full`) with StreamingLLM at inference")
    if stage == "all":  # each variant evaluated as soon as it is trained (`all --variant streaming_llm` trains full)
        for name in exp.stage_names(picked):
            exp.run(name)
    if stage == "prepare":
        exp.run("prepare")
    if stage == "pretrain":
        exp.run("pretrain")
    if stage == "extend":
        for v in picked or s.trained:
            exp.run(f"extend-{v}")
    if stage == "eval":
        for task in EVAL_STAGES:
            for v in picked or s.variants:
                exp.run(f"eval-{v}-{task}")
    if stage in ("report", "all"):
        build_report(exp, **provenance)


def from_runs(args: argparse.Namespace, given: Sequence[str]) -> int:
    """The stages that read --from files, into --out-dir: `merge` (`merge_reports`), `replicas` (`write_replicas`),
    `compare` (`write_compare`) and `distance` (`write_distance`)."""
    from reproduction.distance import write_distance
    from reproduction.runs import write_compare, write_replicas

    saved = load_reports(args.runs)
    out = Path(args.out_dir or DEFAULT.out_dir)
    command = shlex.join(["python", "experiments/reproduce.py", *given])
    if args.stage == "merge":
        merge_reports(saved, out, command=command)
    elif args.stage == "replicas":
        write_replicas(saved, out, command=command, picked=args.variant, against=args.against)
    elif args.stage == "distance":
        write_distance(saved, out, command=command, picked=args.variant)
    else:
        write_compare(saved, out, command=command, picked=args.variant)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    if args.deadline_minutes is not None and not args.deadline_minutes > 0:
        print(f"error: --deadline-minutes must be more than 0 (minutes from now), got {args.deadline_minutes:g}; "
              "leave it out for no deadline", file=sys.stderr)  # fmt: skip
        return 2
    if (args.stage in FROM_RUNS) != bool(args.runs):
        print("error: --from goes with the merge, replicas, compare and distance stages, which need it (two or "
              "more reproduce.json; distance: one or more)", file=sys.stderr)  # fmt: skip
        return 2
    if args.against != "full" and args.stage != "replicas":
        print(f"error: --against goes with the replicas stage; {args.stage} does not read it", file=sys.stderr)
        return 2
    if (args.near_span is not None or args.near_windows) and args.stage != "near":
        print(f"error: --near-span and --near-windows go with the near stage; {args.stage} does not read them",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.stage == "merge" and args.variant:
        print("error: --variant goes with replicas and compare here: merge takes every variant of each run",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.stage in FROM_RUNS:
        try:
            return from_runs(args, given)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        exp = Experiment(settings_from_args(args), force=args.force)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_plan(exp, args.variant)
    if args.stage == "plan":
        return 0
    if not interactive():  # a log, not a terminal: no loading bars from transformers
        from transformers.utils import logging

        logging.disable_progress_bar()
    provenance = {
        "commit": args.commit or current_commit(),
        "command": shlex.join(["python", "experiments/reproduce.py", *given]),
    }
    t0 = time.perf_counter()
    try:
        with Deadline(args.deadline_minutes):
            run(exp, args.stage, args.variant, provenance, {"span": args.near_span, "windows": args.near_windows})
    except DeadlineReached:
        log(f"\nstopped at the deadline after {time.perf_counter() - t0:.0f} s; finished stages are kept: run the "
            "same command again to continue")  # fmt: skip
        if args.stage == "all" and exp.current("pretrain"):  # a partial report, in case no call follows
            build_report(exp, **provenance)
        print_plan(exp, args.variant)
        return EXIT_UNFINISHED
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
