"""`longgen demo --tiny`: the whole pipeline runs and every stage leaves its artefacts and sane numbers."""

import json
import math
import subprocess
import sys


def test_demo_tiny_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "longgen", "demo", "--tiny", "--out-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[5/5] summary" in r.stdout and "longgen_hybrid" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    hybrid, full = summary["variants"]["longgen_hybrid"], summary["variants"]["full_attention"]
    long_len = str(summary["config"]["short_len"] * summary["config"]["factor"])
    for v in (hybrid, full):
        assert math.isfinite(v["extension_loss"]) and v["extension_loss"] > 0
        assert math.isfinite(v["perplexity"]["ppl_by_length"][long_len])
        assert 0.0 <= v["passkey"]["accuracy"] <= 1.0
        assert v["generate_tokens_per_s"] > 0 and v["train_tokens_per_s"] > 0
        for name in ("ppl.json", "ppl.png", "passkey.json"):
            assert (out / "eval" / ("longgen_hybrid" if v is hybrid else "full_attention") / name).is_file()
    assert hybrid["kv_bytes_stored"] < full["kv_bytes_stored"]
    assert hybrid["kv_bytes_allocated"] < full["kv_bytes_allocated"]
    assert hybrid["kv_bytes_stored"] == hybrid["kv_bytes_analytic"]  # the cache keeps exactly the retention
    for model in ("longgen_hybrid", "full_attention"):
        assert (out / "runs" / model / "final" / "model.safetensors").is_file()
    assert (out / "corpus").is_dir() and (out / "models" / "init" / "tokenizer.json").is_file()
