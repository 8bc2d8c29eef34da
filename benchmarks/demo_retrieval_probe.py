"""Where a `longgen demo` run's pass-key retrieval lives (CPU, a finished demo folder, no training).

    PYTHONPATH=src python benchmarks/demo_retrieval_probe.py layers --demo-dir longgen-demo \
        --out benchmarks/results/demo/layer_probe.json
    PYTHONPATH=src python benchmarks/demo_retrieval_probe.py depth --demo-dir longgen-demo \
        --out benchmarks/results/demo/depth_probe.json

`layers`: the pre-trained model (``runs/pretrain/final``) converted without training, with every set of one, two
or three full layers (the rest SinkWindow(sink, window) of the run's config), scored on the demo's own pass-key
prompts at the pre-training length: which layers the look-up needs. `depth`: the two extended models
(``runs/full_attention/final``, ``runs/longgen_hybrid/final``) on the demo's prompts at 4x and 8x the pre-training
length, correct prompts per fifth of needle depth (first fifth: needle farthest from the question).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import torch
from common import git_commit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["layers", "depth"])
    p.add_argument("--demo-dir", required=True, help="the output folder of a finished `longgen demo`")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longgen import convert
    from longgen.demo import passkey_prompts, score_passkey
    from longgen.eval.baseline import load_for_eval
    from longgen.eval.forced import greedy_matches
    from longgen.patterns import SinkWindow

    d = Path(a.demo_dir)
    summary = json.loads((d / "summary.json").read_text())
    cfg = summary["config"]
    tok = AutoTokenizer.from_pretrained(d / "runs/pretrain/final")
    heldout = sorted((d / "heldout").iterdir())
    hay = tok("\n\n".join(f.read_text(encoding="utf-8") for f in heldout), add_special_tokens=False)["input_ids"]
    n, short = cfg["passkey_prompts"], cfg["short_len"]
    rows = []
    if a.mode == "layers":
        prompts = passkey_prompts(tok, hay, [short], n, cfg["seed"])
        sets = [None] + [c for k in (1, 2, 3) for c in itertools.combinations(range(cfg["layers"]), k)]
        for full in sets:
            model = AutoModelForCausalLM.from_pretrained(d / "runs/pretrain/final", dtype=torch.float32).eval()
            if full is None:
                convert(model, full_fraction=1.0)
            else:
                convert(model, full_layers=list(full), pattern=SinkWindow(cfg["sink"], cfg["window"]))
            cell = score_passkey(model, tok, prompts)[str(short)]
            rows.append({"full_layers": "all" if full is None else list(full), "correct": cell["correct"], "n": n})
            print(json.dumps(rows[-1]), flush=True)
    else:
        digits = {i for c in "0123456789" for i in tok(c, add_special_tokens=False)["input_ids"]}
        lengths = [short * 4, short * cfg["factor"]]
        prompts = passkey_prompts(tok, hay, lengths, n, cfg["seed"])
        for name in ("full_attention", "longgen_hybrid"):
            model, _ = load_for_eval(str(d / f"runs/{name}/final"), device="cpu")
            for length in lengths:
                ok = greedy_matches(model, *prompts[length], reject_next=digits, max_batch_tokens=16_384)
                fifths = [sum(ok[i * n // 5 : (i + 1) * n // 5]) for i in range(5)]
                rows.append({"model": name, "length": length, "correct_by_depth_fifth": fifths, "n": n})
                print(json.dumps(rows[-1]), flush=True)
    result = {
        "device": f"CPU, {torch.get_num_threads()} threads",
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "command": "PYTHONPATH=src python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "demo": {"dir": str(d), "wall_s": summary["wall_s"], "config": cfg},
        "rows": rows,
    }
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
