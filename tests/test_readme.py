"""The README runs as written and quotes the committed results."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})


def test_readme_starts_with_install_and_test_commands():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmd = next(line for line in first_block.splitlines() if "pytest" in line).strip()
    assert test_cmd in ci, "the README's test command and .ci/run must agree"


def _readme_commands():
    """Every `longgen ...` command of the README's bash blocks, as argument lists (continuations joined, comments
    dropped, `torchrun ... -m longgen` and pipes or `&&` chains split)."""
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            parts, part = [], []
            for w in [*words, "&&"]:
                if w in ("&&", "|", ";"):
                    parts.append(part)
                    part = []
                else:
                    part.append(w)
            for part in parts:
                if part[:1] == ["longgen"]:
                    commands.append(part[1:])
                elif "-m" in part and part[part.index("-m") + 1 : part.index("-m") + 2] == ["longgen"]:
                    commands.append(part[part.index("-m") + 2 :])
    return commands


def test_readme_longgen_commands_parse_with_the_real_parser():
    from longgen.cli import build_parser

    commands = _readme_commands()
    assert {c[0] for c in commands} >= {"demo", "convert", "inspect", "train", "generate", "serve", "eval"}
    assert ["eval", "ppl"] in [c[:2] for c in commands]
    parser = build_parser()
    for args in commands:
        try:
            parser.parse_args(args)
        except SystemExit:
            raise AssertionError(f"README command does not parse: longgen {' '.join(args)}") from None


def test_readme_quality_tables_quote_the_committed_summary():
    """The README's quality tables quote `experiments/results/quality_summary.json`: the main table's paired
    differences of both hybrids; the targets table's pass key and needle by length, the hybrids' worst differences,
    the pooled accuracies at >= 8K and over all lengths."""
    import json

    summary = json.loads((README.parent / "experiments" / "results" / "quality_summary.json").read_text())
    rows, lengths = summary["rows"], (2048, 4096, 8192, 16384, 32768)

    def pooled(variant, at_least=0):
        picked = [r for r in rows if r["variant"] == variant and r["length"] >= at_least]
        return f"{100 * (sum(r['correct'] for r in picked) / sum(r['n'] for r in picked)):.1f}%"  # as the report

    def by_length(task):
        acc = {r["length"]: 100 * r["accuracy"] for r in rows if r["variant"] == "full" and r["task"] == task}
        return " / ".join(f"{acc[n]:.1f}".removesuffix(".0") for n in lengths) + "%"

    def diff(variant, length):
        p = next(p for p in summary["paired"] if p["variant"] == variant and p["length"] == length)
        keys = ("diff_ci_low", "diff_vs_full", "diff_ci_high")
        low, mid, high = (f"{100 * p[k]:+.1f}".replace("-", "−") for k in keys)
        return f"{mid} ({low}, {high})"

    text = README.read_text()
    for variant, label in (("hybrid_sinkwindow", "SinkWindow hybrid − full, same prompts"),
                           ("hybrid_blocksparse", "BlockSparse hybrid − full")):  # fmt: skip
        row = f"| {label} | " + " | ".join(diff(variant, n) for n in lengths) + " |"
        assert row in text, f"README's main table does not have {row!r}"

    table = re.search(r"\*\*The targets\*\*.*?\n\n(\| target .*?)\n\n", text, flags=re.S).group(1)
    expected = [
        f"pass key {by_length('passkey')}, needle {by_length('niah')}",
        f"SinkWindow {diff('hybrid_sinkwindow', 32768)} at 32K",
        f"BlockSparse {diff('hybrid_blocksparse', 8192)} at 8K and {diff('hybrid_blocksparse', 16384)} at 16K",
        f"{pooled('all_sparse', 8192)} and {pooled('streaming_llm', 8192)} against {pooled('full', 8192)}",
        f"layers 0-3 full {pooled('hybrid_bottom')} over all lengths against {pooled('hybrid_sinkwindow')}",
    ]
    for quote in expected:
        assert quote.replace("+", "") in table, f"README's targets table does not say {quote!r}"
