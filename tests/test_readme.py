"""The README's examples run as written."""

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
