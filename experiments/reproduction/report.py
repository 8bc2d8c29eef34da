"""The report: every finished result per variant, the paper's expectations checked, markdown, JSON and plots.

Only results that are current for the settings count; a variant not evaluated yet shows as "—" and the
expectations that need it as "not evaluated".
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .settings import LABELS, TASKS, Settings
from .stages import Experiment, log, write_json

FILES = ("reproduce.json", "reproduce.md", "retrieval_heatmaps.png", "retrieval_by_length.png", "ppl_by_position.png")


def build_report(exp: Experiment) -> dict[str, Any]:
    """Collect, check, write ``FILES`` into the output folder, print the markdown; returns the JSON summary."""
    s = exp.s
    variants = {v: variant_record(exp, v) for v in s.variants}
    prepare, pretrain = (exp.done(n) if exp.current(n) else None for n in ("prepare", "pretrain"))
    summary = {
        "title": "LongGen comparisons, scaled down",
        "settings": dataclasses.asdict(s),
        "plan": exp.plan,
        "environment": environment(),
        "corpus": prepare and prepare["result"],
        "pretrain": pretrain and {**pretrain["result"], "seconds": pretrain["seconds"]},
        "variants": variants,
        "expectations": expectations(s, variants),
        "stage_seconds": {n: exp.done(n)["seconds"] for n in exp.stage_names() if exp.current(n)},
    }
    exp.out.mkdir(parents=True, exist_ok=True)
    table = format_report(summary, s)
    (exp.out / "reproduce.md").write_text(table + "\n")
    write_plots(exp.out, s, variants)
    summary["files"] = [str(exp.out / f) for f in FILES]
    write_json(exp.out / "reproduce.json", summary)
    print(table, flush=True)
    log(f"\nresults: {exp.out} ({', '.join(FILES)}); work files: {exp.work}")
    return summary


def variant_record(exp: Experiment, variant: str) -> dict[str, Any]:
    s = exp.s
    trained, options = exp.model_of(variant)
    ext_name = f"extend-{trained}"
    ext = exp.done(ext_name) if exp.current(ext_name) else None
    record: dict[str, Any] = {"label": LABELS[variant], "model_of": trained, "eval_options": options}
    record["extension"] = ext and {**ext["result"], "seconds": ext["seconds"]}
    start = exp.outputs(ext_name)[0]
    if ext and (start / "config.json").is_file():
        record.update(layout_record(start, options, [s.long_len, max(s.eval_lengths)]))
    for task in TASKS:
        name = f"eval-{variant}-{task}"
        record[task] = exp.result(name)["summary"] if exp.current(name) else None
    pk, nh = record["passkey"], record["niah"]
    record["retrieval_by_length"] = pk and nh and {
        n: (pk["accuracy_by_length"][n] + nh["accuracy_by_length"][n]) / 2 for n in map(str, s.eval_lengths)
    }  # fmt: skip
    record["retrieval"] = pk and nh and (pk["accuracy"] + nh["accuracy"]) / 2
    record["prompts_per_length"] = 2 * len(s.eval_depths) * s.eval_samples
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


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def expectations(s: Settings, variants: dict[str, dict]) -> list[dict[str, Any]]:
    """What the paper leads us to expect, checked on retrieval accuracy (pass key and needle, mean of the two).

    `met` is None when a variant that a check needs was not evaluated. Long range: prompt lengths of at least 4x
    the sparse window, where most needle depths are out of a window's reach."""
    acc = {v: r["retrieval_by_length"] for v, r in variants.items() if r.get("retrieval_by_length")}
    lengths = [str(n) for n in s.eval_lengths]
    long = [str(n) for n in s.eval_lengths if n >= 4 * s.window] or [lengths[-1]]
    n = 2 * len(s.eval_depths) * s.eval_samples
    checks = []

    def add(text: str, needs: Sequence[str], test: Callable[[], tuple[bool, str]]) -> None:
        missing = [v for v in needs if v not in acc]
        met, detail = (None, f"not evaluated: {', '.join(missing)}") if missing else test()
        checks.append({"expectation": text, "met": met, "detail": detail})

    for v in ("hybrid_sinkwindow", "hybrid_blocksparse"):

        def near(v=v) -> tuple[bool, str]:
            gaps = {k: acc[v][k] - acc["full"][k] for k in lengths}
            worst = min(gaps, key=gaps.get)
            p, q = acc[v][worst], acc["full"][worst]
            noise = 2 * math.sqrt((p * (1 - p) + q * (1 - q)) / n)  # two standard errors of the difference
            return gaps[worst] >= -s.tolerance, (
                f"worst gap {100 * gaps[worst]:+.1f} points at {worst} tokens (two standard errors with {n} "
                f"prompts a length: {100 * noise:.1f} points)"
            )

        add(f"{LABELS[v]} within {100 * s.tolerance:g} points of full attention at every length", [v, "full"], near)
    for v in ("all_sparse", "streaming_llm"):

        def far(v=v) -> tuple[bool, str]:
            full, mine = _mean([acc["full"][k] for k in long]), _mean([acc[v][k] for k in long])
            return full - mine >= s.far_below, (
                f"{100 * mine:.1f}% vs {100 * full:.1f}% at {', '.join(long)} tokens (gap {100 * (full - mine):.1f} "
                f"points; far: >= {100 * s.far_below:g})"
            )

        add(f"{LABELS[v]} far below full attention at long range", [v, "full"], far)

    def middle_vs_bottom() -> tuple[bool, str]:
        mid, bottom = _mean(list(acc["hybrid_sinkwindow"].values())), _mean(list(acc["hybrid_bottom"].values()))
        return mid >= bottom, f"{100 * mid:.1f}% vs {100 * bottom:.1f}% over all lengths"

    add("full layers in the middle (2) at least as good as at the bottom (5)", ["hybrid_sinkwindow", "hybrid_bottom"],
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


def _k(n: int | str) -> str:
    n = int(n)
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> list[str]:
    """A markdown table: the first `text_columns` columns left-aligned, the numbers right-aligned."""
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    return ["| " + " | ".join(r) + " |" for r in (header, align, *rows)]


def format_report(summary: dict, s: Settings) -> str:
    """The comparison as markdown: retrieval, perplexity, layout/training/KV cache, expectations."""
    variants, pre, env = summary["variants"], summary["pretrain"], summary["environment"]
    mark = {n: "†" if n > s.long_len else "" for n in s.ppl_lengths}
    lines = [f"# {summary['title']}", ""]
    if pre:
        lines += [
            f"Llama, {pre['parameters'] / 1e6:.0f}M parameters ({s.layers} layers, hidden {s.hidden_size}, {s.heads} "
            f"heads, {s.kv_heads} KV heads), pre-trained on {pre['tokens'] / 1e6:.1f}M tokens at {s.short_len} "
            f"tokens; each variant extended to {s.long_len} tokens on the same "
            f"{summary['plan']['extend_tokens_per_variant'] / 1e6:.1f}M tokens. {env['device']}, torch "
            f"{env['torch']}, {env['date']}.",
            "",
        ]
    n = 2 * len(s.eval_depths) * s.eval_samples
    lines += [f"## Retrieval accuracy by prompt length (pass key and needle in a haystack, {n} prompts a length)", ""]
    rows = []
    for r in variants.values():
        acc = r.get("retrieval_by_length") or {}
        pk, nh = (r.get(t) or {} for t in ("passkey", "niah"))
        rows.append([r["label"], *(_pct(acc.get(str(n))) for n in s.eval_lengths), _pct(r.get("retrieval")),
                     _pct(pk.get("accuracy")), _pct(nh.get("accuracy"))])  # fmt: skip
    lines += _table(["variant", *(_k(n) + mark[n] for n in s.eval_lengths), "all", "pass key", "needle"], rows)
    lines += ["", "## Perplexity of held-out documents by context length", ""]
    rows = []
    for r in variants.values():
        by = (r.get("ppl") or {}).get("ppl_by_length", {})
        rows.append([r["label"], *(f"{by[str(n)]:.2f}" if str(n) in by else "—" for n in s.ppl_lengths)])
    lines += _table(["variant", *(_k(n) + mark[n] for n in s.ppl_lengths)], rows)
    if any(mark.values()):
        lines += ["", f"† longer than the extended context ({s.long_len} tokens): extrapolation."]
    lines += ["", "## Layout, extension training, KV cache (bf16, batch 1, analytic)", ""]
    kv_lengths = list(dict.fromkeys([s.long_len, max(s.eval_lengths)]))
    rows = []
    for v, r in variants.items():
        ext, kv = r.get("extension"), r.get("kv_bytes", {})
        tps = "—" if not ext else f"{ext['tokens_per_s']:,.0f}" if r["model_of"] == v else "(model 1's)"
        rows.append([
            r["label"],
            ",".join(map(str, r.get("full_layers", []))) or "none",
            r.get("sparse_pattern") or "none",
            f"{ext['loss_final']:.3f}" if ext else "—",
            tps,
            *(f"{kv[str(n)] / 2**20:,.1f}" if str(n) in kv else "—" for n in kv_lengths),
        ])  # fmt: skip
    header = ["variant", "full layers", "sparse layers", "extension loss", "tokens/s"]
    lines += _table([*header, *(f"KV MiB @{_k(n)}" for n in kv_lengths)], rows, text_columns=3)
    lines += ["", "## What the paper leads us to expect", ""]
    verdict = {True: "met", False: "NOT met", None: "not evaluated"}
    lines += ["| expectation | verdict | numbers |", "| --- | --- | --- |"]
    lines += [f"| {c['expectation']} | {verdict[c['met']]} | {c['detail']} |" for c in summary["expectations"]]
    return "\n".join(lines)


def write_plots(out: Path, s: Settings, variants: dict[str, dict]) -> None:
    """retrieval_heatmaps.png (accuracy by depth and length, pass key and needle, every variant),
    retrieval_by_length.png and ppl_by_position.png (loss by token position)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(variants), figsize=(2 + 2.4 * len(variants), 6), squeeze=False)
    for col, (v, r) in enumerate(variants.items()):
        for row, task in enumerate(("passkey", "niah")):
            ax = axes[row][col]
            grid = (r.get(task) or {}).get("accuracy_by_length_depth")
            if grid:
                acc = [[grid[str(n)][f"{d:g}"] for n in s.eval_lengths] for d in s.eval_depths]
                ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
                for i, line in enumerate(acc):
                    for j, a in enumerate(line):
                        ax.text(j, i, f"{a:.1f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(s.eval_lengths)), [_k(n) for n in s.eval_lengths], fontsize=7)
            ax.set_yticks(range(len(s.eval_depths)), [f"{d:.0%}" for d in s.eval_depths], fontsize=7)
            ax.set_title(f"{LABELS[v]}\n{'pass key' if task == 'passkey' else 'needle in a haystack'}", fontsize=8)
    fig.supxlabel("prompt length (tokens)")
    fig.supylabel("needle depth")
    fig.tight_layout()
    fig.savefig(out / "retrieval_heatmaps.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for v, r in variants.items():
        if r.get("retrieval_by_length"):
            acc = [r["retrieval_by_length"][str(n)] for n in s.eval_lengths]
            ax.plot(s.eval_lengths, acc, marker="o", label=LABELS[v])
    ax.set_xscale("log", base=2)
    ax.set_xticks(s.eval_lengths, [_k(n) for n in s.eval_lengths])
    ax.axvline(s.long_len, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("prompt length (tokens); dashed: the extended context")
    ax.set_ylabel("retrieval accuracy (pass key and needle)")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "retrieval_by_length.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for v, r in variants.items():
        by = (r.get("ppl") or {}).get("by_position")
        if by:
            ax.plot([(b["start"] + b["end"]) / 2 for b in by], [b["loss"] for b in by], lw=1, label=LABELS[v])
    for x in (s.short_len, s.long_len):
        ax.axvline(x, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("token position; dashed: pre-training and extended context")
    ax.set_ylabel("mean loss (nats)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "ppl_by_position.png", dpi=110)
    plt.close(fig)
