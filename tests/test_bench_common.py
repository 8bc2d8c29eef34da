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
