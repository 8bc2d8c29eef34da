"""benchmarks/common.py: every result file carries its device, date, commit and command (new ones when saved, the
committed ones outside the archives checked here); launch tunings parse."""

import json
from pathlib import Path

import pytest

RECORD = {"device": "NVIDIA H100 80GB HBM3 (79 GiB)", "date": "2026-12-05", "commit": "0123456789ab", "command": "x"}


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import common

    return common


def test_save_result_writes_json_and_markdown(common, tmp_path):
    out = tmp_path / "sub" / "r.json"
    common.save_result(out, {**RECORD, "rows": [1]}, "# table\n")
    assert json.loads(out.read_text())["rows"] == [1]
    assert out.with_suffix(".md").read_text() == "# table\n"


@pytest.mark.parametrize("key", ["device", "date", "commit", "command"])
@pytest.mark.parametrize("value", [None, "", "  ", 3])
def test_save_result_refuses_a_record_without_its_run(common, tmp_path, key, value):
    record = {**RECORD, "rows": []}
    if value is None:
        del record[key]
    else:
        record[key] = value
    out = tmp_path / "r.json"
    with pytest.raises(ValueError, match=f"missing or empty: {key}"):
        common.save_result(out, record)
    assert not out.exists()


def test_parse_tuning(common):
    from longgen.kernels.plan import Tuning

    assert common.parse_tuning("") == Tuning()
    assert common.parse_tuning("bwd_stages=4,persistent_programs=3") == Tuning(bwd_stages=4, persistent_programs=3)
    with pytest.raises(ValueError, match="bad knob 'BWD_STAGES=4'"):
        common.parse_tuning("BWD_STAGES=4")
    with pytest.raises(ValueError, match="bad knob 'tiles=1'"):
        common.parse_tuning("tiles=1")


def test_every_current_result_file_names_its_run():
    """Outside the archives, every result JSON says on what, when, from which code and by which command it ran."""
    root = Path(__file__).resolve().parents[1]
    files = [
        f
        for folder in ("benchmarks/results", "experiments/results")
        for f in sorted((root / folder).rglob("*.json"))
        if "archive" not in f.relative_to(root).parts
    ]
    assert len(files) > 20
    lacking = {}
    for f in files:
        record = json.loads(f.read_text())
        missing = [k for k in RECORD if not (isinstance(record, dict) and str(record.get(k) or "").strip())]
        if missing:
            lacking[str(f.relative_to(root))] = missing
    assert not lacking, lacking


def _step_row(command: str, compile: bool, step_ms: float) -> dict:
    return {"variant": "full", "seq_len": 2048, "layers": 12, "compile": compile, "shape": "repro", "pack": 32,
            "checkpointing": False, "step_ms": step_ms, "tokens_per_s": 65536 / step_ms * 1e3, "peak_mem_gb": 1.0,
            "command": command, "commit": "0123456789ab", "date": "2026-12-06", "device": RECORD["device"]}  # fmt: skip


def test_train_step_table_names_each_invocation_and_compares_compiled_to_eager(common):
    import train_step

    meta = {**RECORD, "torch": "2.11", "triton": "3.6"}
    one = train_step.markdown({**meta, "rows": [_step_row("x", False, 200.0)]})
    assert "Command: `x`" in one and "Commands" not in one
    two = train_step.markdown({**meta, "rows": [_step_row("eager cmd", False, 200.0), _step_row("x", True, 100.0)]})
    assert "Command: `x`" not in two
    assert "- `eager cmd` (commit 0123456789ab, 2026-12-06)" in two and "- `x` (commit" in two
    assert two.index("eager cmd") < two.index("- `x`")  # in the order they ran
    compiled = next(line for line in two.splitlines() if line.startswith("| repro | full") and "| yes |" in line)
    assert compiled.rstrip(" |").endswith("2.00")  # 200 ms eager / 100 ms compiled
