"""Result files: what every task records about its run, and writing it as JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def task_settings(
    task: str, path: str | os.PathLike, seed: int, model: Any, model_options: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """The settings a task records: task, model path, seed, baseline (with sink/window when streaming), the
    device and dtype the model ran in, and the task's own settings (`extra`)."""
    opts = {"baseline": "none", **model_options, "device": str(model.device), "dtype": str(model.dtype)}
    if opts["baseline"] != "streaming":
        opts.pop("sink", None)
        opts.pop("window", None)
    return {"task": task, "model": str(path), "seed": seed, **opts, **extra}


def write_result(result: dict[str, Any], out_dir: str | os.PathLike, name: str) -> Path:
    """Write `result` as ``<out_dir>/<name>.json`` (the folder is created) and return the file's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
