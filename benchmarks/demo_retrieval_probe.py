"""Where a `longgen demo` run's pass-key retrieval lives (CPU, a finished demo folder, no training).

    PYTHONPATH=src python benchmarks/demo_retrieval_probe.py layers --demo-dir longgen-demo \
        --out benchmarks/results/demo/layer_probe.json
    PYTHONPATH=src python benchmarks/demo_retrieval_probe.py depth --demo-dir longgen-demo \
        --out benchmarks/results/demo/depth_probe.json
    PYTHONPATH=src python benchmarks/demo_retrieval_probe.py keys --demo-dir longgen-demo \
        --prompts 100 --out benchmarks/results/demo/key_probe.json
    PYTHONPATH=src python benchmarks/demo_retrieval_probe.py extend --demo-dir longgen-demo --rope yarn \
        --steps 40 --work-dir /tmp/probe-yarn --out benchmarks/results/demo/extend_yarn.json
    PYTHONPATH=src python benchmarks/demo_retrieval_probe.py layouts --demo-dir longgen-demo \
        --work-dir /tmp/probe-layouts --out benchmarks/results/demo/layout_swap.json

`layers`: the pre-trained model (``runs/pretrain/final``) converted without training, with every set of one, two
or three full layers (the rest SinkWindow(sink, window) of the run's config), scored on the demo's own pass-key
prompts at the pre-training length: which layers the look-up needs. `depth`: the two extended models
(``runs/full_attention/final``, ``runs/longgen_hybrid/final``) on the demo's prompts at 4x and 8x the pre-training
length, correct prompts per fifth of needle depth (first fifth: needle farthest from the question). `keys`: the
pre-trained model at its own length and the two extended models at every length of the demo's table, their
prompts split by the key: one whose first four digits repeat a digit (copying it digit by digit from the one
before is ambiguous) or not, each share with its 95% Wilson interval. `layouts`: each of the two extended
models as trained and with the other's layer layout at inference (no training; copies in `--work-dir`): the
full-attention model with the hybrid's sparse layers made SinkWindow, the hybrid with every layer full, on the
demo's prompts at 1x, 4x and the extended length: which layers' reach costs the look-up at length. `extend`
(trains, in `--work-dir`): the pre-trained model converted with `--rope` (all layers full, or `--full-layers` with
the run's SinkWindow elsewhere), first scored as it is (`--steps 0`) or extended `--steps` steps to `--factor` x
the pre-training length on text and pass-key documents made as the demo makes them, then scored at 1x, 4x and the
new length by fifth of depth; `--attention-factor` sets YaRN's attention temperature (transformers'
``attention_factor``, which scales cos and sin, so the logits by its square). Its prompts are the demo's own (the
held-out files in the demo's order); `layers` and `depth` join the held-out files in name order, so their prompts
are another seeded set.
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
    p.add_argument("mode", choices=["layers", "depth", "keys", "layouts", "extend"])
    p.add_argument("--demo-dir", required=True, help="the output folder of a finished `longgen demo`")
    p.add_argument("--out", required=True)
    p.add_argument("--rope", default="yarn", help="extend: the RoPE change (yarn)")
    p.add_argument("--steps", type=int, default=40, help="extend: extension steps, 0 scores the conversion (40)")
    p.add_argument("--factor", type=int, default=None, help="extend: extension factor (the run's)")
    p.add_argument(
        "--attention-factor", type=float, default=None, help="extend, --rope yarn: YaRN's temperature (0.1 ln f + 1)"
    )
    p.add_argument("--full-layers", default=None, help="extend: e.g. 0,4 for a hybrid (all layers full)")
    p.add_argument("--prompts", type=int, default=None, help="keys: prompts a length (the run's)")
    p.add_argument("--work-dir", default=None, help="extend, layouts: folder for the models it makes")
    a = p.parse_args()
    if a.attention_factor is not None and (a.mode != "extend" or a.rope != "yarn"):
        p.error("--attention-factor is YaRN's attention temperature: it needs the extend mode and --rope yarn")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longgen import convert
    from longgen.demo import passkey_prompts, score_passkey
    from longgen.eval.baseline import load_for_eval
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
    elif a.mode == "depth":
        for name in ("full_attention", "longgen_hybrid"):
            model, _ = load_for_eval(str(d / f"runs/{name}/final"), device="cpu")
            rows += [{"model": name, **r} for r in by_depth(model, tok, hay, [short * 4, short * cfg["factor"]], cfg)]
    elif a.mode == "keys":
        from longgen.demo import passkey_lengths

        n = a.prompts or n
        models = [("pretrain", [short])]
        models += [(name, passkey_lengths(short, cfg["factor"], 64)) for name in ("full_attention", "longgen_hybrid")]
        for name, lengths in models:
            model, _ = load_for_eval(str(d / f"runs/{name}/final"), device="cpu")
            prompts = passkey_prompts(tok, hay, lengths, n, cfg["seed"])
            scored = score_passkey(model, tok, prompts)
            for length in lengths:
                rows.append({"model": name, "length": length, **by_key(tok, prompts[length][1], scored[str(length)])})
                print(json.dumps(rows[-1]), flush=True)
    elif a.mode == "layouts":
        rows = layouts(a, d, cfg, tok)
    else:
        rows = extend(a, d, cfg, tok)
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


def by_depth(model, tok, hay: list[int], lengths: list[int], cfg: dict) -> list[dict]:
    """Pass key at each length on the demo's seeded prompts: correct prompts per fifth of needle depth."""
    from longgen.demo import passkey_prompts, score_passkey

    n = cfg["passkey_prompts"]
    scored = score_passkey(model, tok, passkey_prompts(tok, hay, lengths, n, cfg["seed"]))
    rows = []
    for length in lengths:
        ok = scored[str(length)]["outcomes"]
        fifths = [sum(ok[i * n // 5 : (i + 1) * n // 5]) for i in range(5)]
        rows.append({"length": length, "correct": sum(ok), "correct_by_depth_fifth": fifths, "n": n})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def by_key(tok, answers: list[list[int]], cell: dict) -> dict:
    """Correct prompts among keys whose first four digits repeat a digit and among the others, with intervals."""
    from longgen.eval.stats import wilson_interval

    repeats = [len(set(tok.decode(a).strip()[:4])) < 4 for a in answers]
    row = {"correct": cell["correct"], "n": cell["n"]}
    for label, want in (("repeated_digit", True), ("distinct_digits", False)):
        ok = [o for o, r in zip(cell["outcomes"], repeats, strict=True) if r == want]
        row[label] = {
            "correct": sum(ok),
            "n": len(ok),
            "interval": [round(x, 3) for x in wilson_interval(sum(ok), len(ok))],
        }
    return row


def demo_haystack(d: Path, tok) -> list[int]:
    """The token ids the demo's own evaluation prompts are cut from: its held-out files in the demo's order."""
    heldout = sorted((d / "heldout").iterdir(), key=lambda f: f.stat().st_size)
    return tok("\n\n".join(f.read_text(encoding="utf-8") for f in heldout), add_special_tokens=False)["input_ids"]


def layouts(a: argparse.Namespace, d: Path, cfg: dict, tok) -> list[dict]:
    """The `layouts` mode: both extended models with their own and with the other's layer layout."""
    import shutil

    from longgen.demo import passkey_prompts, score_passkey
    from longgen.eval.baseline import load_for_eval
    from longgen.eval.stats import paired_difference

    if a.work_dir is None:
        raise SystemExit("layouts needs --work-dir (the models with swapped layouts go there)")
    own = {n: json.loads((d / f"runs/{n}/final/config.json").read_text())["longgen"]["layers"] for n in
           ("full_attention", "longgen_hybrid")}  # fmt: skip
    hay = demo_haystack(d, tok)
    short = cfg["short_len"]
    lengths = sorted({short, short * 4, short * cfg["factor"]})
    prompts = passkey_prompts(tok, hay, lengths, cfg["passkey_prompts"], cfg["seed"])
    rows = []
    for name, other in (("full_attention", "longgen_hybrid"), ("longgen_hybrid", "full_attention")):
        for layout_of in (name, other):
            model_dir = d / f"runs/{name}/final"
            if layout_of != name:  # the same weights, the other model's layers (config.longgen)
                model_dir = Path(a.work_dir) / f"{name}-as-{layout_of}"
                shutil.copytree(d / f"runs/{name}/final", model_dir, dirs_exist_ok=True)
                config = json.loads((model_dir / "config.json").read_text())
                config["longgen"]["layers"] = own[layout_of]
                (model_dir / "config.json").write_text(json.dumps(config, indent=2))
            model, _ = load_for_eval(str(model_dir), device="cpu")
            scored = score_passkey(model, tok, prompts)
            full = [i for i, layer in enumerate(own[layout_of]) if layer == "full_attention"]
            row = {"weights": name, "layout_of": layout_of, "full_layers": full, "n": cfg["passkey_prompts"]}
            row["correct"] = {str(n): scored[str(n)]["correct"] for n in lengths}
            row["outcomes"] = {str(n): "".join("1" if x else "0" for x in scored[str(n)]["outcomes"]) for n in lengths}
            if layout_of == name:
                own_scored = scored
            else:  # paired on the same prompts: the other layout minus the model's own
                row["diff_vs_own_layout"] = {}
                for n in map(str, lengths):
                    diff = paired_difference(scored[n]["outcomes"], own_scored[n]["outcomes"])
                    ci, p = [diff.ci_low, diff.ci_high], diff.p_value
                    row["diff_vs_own_layout"][n] = {"diff": diff.diff, "ci": ci, "mcnemar_p": p}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "outcomes"}), flush=True)
    return rows


def extend(a: argparse.Namespace, d: Path, cfg: dict, tok) -> list[dict]:
    """The `extend` mode: convert the demo's pre-trained model with `a.rope`, extend it, score it."""
    from longgen.demo import DemoConfig, _train, write_passkey_data
    from longgen.eval.baseline import load_for_eval
    from longgen.model import convert_checkpoint
    from longgen.patterns import SinkWindow

    if a.work_dir is None:
        raise SystemExit("extend needs --work-dir (the converted and extended models go there)")
    known = {f for f in DemoConfig.__dataclass_fields__}
    demo = DemoConfig(**{k: v for k, v in cfg.items() if k in known})
    if a.factor:
        demo.factor = a.factor
    long_len, work = demo.short_len * demo.factor, Path(a.work_dir)
    layers = {"full_fraction": 1.0}
    if a.full_layers:
        layers = {
            "full_layers": [int(x) for x in a.full_layers.split(",")],
            "pattern": SinkWindow(demo.sink, demo.window),
        }
    model_dir = work / "converted"
    convert_checkpoint(d / "runs/pretrain/final", model_dir, force=True, progress=False, target_length=long_len,
                       rope=a.rope, **layers)  # fmt: skip
    info = {"rope": a.rope, "steps": a.steps, "extended_len": long_len, "full_layers": a.full_layers or "all"}
    if a.attention_factor is not None:  # transformers' YaRN reads it from the config's rope_parameters
        config_file = model_dir / "config.json"
        config = json.loads(config_file.read_text())
        config["rope_parameters"]["attention_factor"] = a.attention_factor
        config_file.write_text(json.dumps(config, indent=2))
        info["attention_factor"] = a.attention_factor
    if a.steps:
        passkey, _ = write_passkey_data(demo, d / "corpus", tok, work / "passkey")
        ext = _train(demo, model_dir, [d / "corpus", passkey["extend"]], work / "run", long_len, a.steps,
                     whole_min=demo.short_len)  # fmt: skip
        model_dir = ext["final"]
        info |= {"extension_loss": ext["loss"], "train_tokens_per_s": ext["train_tokens_per_s"]}
    hay = demo_haystack(d, tok)
    model, _ = load_for_eval(str(model_dir), device="cpu")
    lengths = sorted({demo.short_len, demo.short_len * 4, long_len})
    return [{**info, **r} for r in by_depth(model, tok, hay, lengths, cfg)]


if __name__ == "__main__":
    main()
