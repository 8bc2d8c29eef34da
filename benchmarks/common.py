"""What every benchmark records about its run, and the header of its markdown table."""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch

from longgen.provenance import cpu_name, git_commit


def parse_tuning(text: str):
    """A `longgen.kernels.plan.Tuning` from "name=VALUE[,name=VALUE...]" (its integer fields, e.g.
    "bwd_stages=4,fwd_stages=2"; "" = the defaults). Unknown names are an error, so a typo cannot silently time the
    defaults."""
    import dataclasses

    from longgen.kernels.plan import Tuning

    fields = {f.name for f in dataclasses.fields(Tuning) if f.type == "int"}
    values = {}
    for part in filter(None, (text or "").split(",")):
        name, _, value = part.partition("=")
        if name not in fields or not value.lstrip("-").isdigit():
            raise ValueError(f"bad knob {part!r}: expected NAME=INTEGER with NAME one of {', '.join(sorted(fields))}")
        values[name] = int(value)
    return Tuning(**values)


def run_metadata() -> dict:
    """command, device, torch, triton, commit, date of this run (call on the GPU machine)."""
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "command": "PYTHONPATH=src python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "device": f"{torch.cuda.get_device_name()} ({props.total_memory / 2**30:.0f} GiB)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
    }


REQUIRED = ("device", "date", "commit", "command")  # what every result file must say about its run


def save_result(out: str | Path, result: dict, markdown: str | None = None) -> None:
    """Write a result record as JSON to `out` (and `markdown` beside it, ``.md``); refuses a record without a
    non-empty device, date, commit and command (see `run_metadata`), so that no result file is written that cannot
    be traced to a GPU, a day, a commit and the command that made it."""
    missing = [k for k in REQUIRED if not isinstance(result.get(k), str) or not result[k].strip()]
    if missing:
        raise ValueError(f"a result record needs {', '.join(REQUIRED)}; missing or empty: {', '.join(missing)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if markdown is not None:
        out.with_suffix(".md").write_text(markdown)


def cpu_run_metadata() -> dict:
    """command, device (CPU model, cores, threads torch uses), torch, commit, date and load of a CPU run."""
    return {
        "command": "PYTHONPATH=src python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "device": cpu_name(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": datetime.date.today().isoformat(),
        "load_average_at_start": list(os.getloadavg()),
    }


def cuda_kernel_table(prof) -> dict[str, tuple[float, int]]:
    """kernel name -> (total ms, launches) over the CUDA kernels a `torch.profiler.profile` saw."""
    out: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            entry = out.setdefault(e.name, [0.0, 0])
            entry[0] += e.device_time / 1e3
            entry[1] += 1
    return {k: (ms, n) for k, (ms, n) in out.items()}


def markdown_header(title: str, result: dict, note: str) -> list[str]:
    return [
        f"# {title}",
        "",
        f"Device: {result['device']}; torch {result['torch']}, triton {result['triton']}; {result['date']}.",
        f"Command: `{result['command']}`",
        "",
        note,
        "",
    ]


def llama2_7b_config(layers: int, max_len: int):
    """The Llama-2-7B shape every benchmark uses: hidden 4096, 32 heads (= KV heads), head dim 128, MLP 11008."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=max_len,
    )
