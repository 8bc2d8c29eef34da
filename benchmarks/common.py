"""What every benchmark records about its run, and the header of its markdown table."""

from __future__ import annotations

import datetime
import sys

import torch


def run_metadata() -> dict:
    """command, device, torch, triton, date of this run (call on the GPU machine)."""
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "command": "PYTHONPATH=src python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "device": f"{torch.cuda.get_device_name()} ({props.total_memory / 2**30:.0f} GiB)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
    }


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
