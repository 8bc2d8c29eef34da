"""Training-step speed on a CPU with subnormal floats computed and with them counted as zero (CPU, no GPU).

    PYTHONPATH=src python benchmarks/cpu_subnormals.py --model full=DIR --model hybrid=DIR [--seq-len 8192] \
        --out benchmarks/results/cpu_subnormals.json

Each `--model NAME=DIR` is a model folder (e.g. a `longgen demo` run's ``runs/full_attention/final``). For both
settings, `longgen.demo.measure_training_speed` times forward and backward of one `--seq-len`-token sequence through
the training loop's model and loss, the models taking turns (one warm-up round, `--rounds` timed), first with
subnormals kept (`flush=False`), then counted as zero (`flush=True`, what `longgen.train` does on a CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import cpu_run_metadata, save_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="NAME=DIR, repeated")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    from longgen.demo import measure_training_speed

    paths = dict(m.split("=", 1) for m in a.model)
    rows = []
    for flush in (False, True):
        tps = measure_training_speed({k: Path(v) for k, v in paths.items()}, a.seq_len, "cpu", a.rounds, flush=flush)
        for name, value in tps.items():
            rows.append({"model": name, "path": paths[name], "flush_denormals": flush, "tokens_per_s": round(value, 1),
                         "step_s": round(a.seq_len / value, 3)})  # fmt: skip
            print(rows[-1], flush=True)
    lines = ["| model | subnormals kept: step s | counted as zero: step s | speed-up |", "|---|---:|---:|---:|"]
    for name in paths:
        kept, zero = (next(r["step_s"] for r in rows if r["model"] == name and r["flush_denormals"] == f)
                      for f in (False, True))  # fmt: skip
        lines.append(f"| {name} | {kept} | {zero} | {kept / zero:.2f}x |")
    result = {**cpu_run_metadata(), "seq_len": a.seq_len, "rounds": a.rounds, "rows": rows}
    save_result(a.out, result, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
