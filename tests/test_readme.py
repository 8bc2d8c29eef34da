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
