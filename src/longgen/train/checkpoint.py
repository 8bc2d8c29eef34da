"""Atomic, resumable training checkpoints.

A checkpoint is a folder ``<output_dir>/checkpoints/step-00000042``: model and optimizer state through
`torch.distributed.checkpoint` (sharded under FSDP2, one file per rank), plus ``extra-rank<r>.pt`` with the step,
scheduler, data-loader position and RNG states of each rank. It is written as ``.step-00000042.tmp`` and renamed
only when every rank has finished, so a killed run never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

PREFIX = "step-"


_BARRIERS = itertools.count()


def barrier() -> None:
    """Wait until every rank gets here (nothing without torch.distributed), through the rendezvous store.

    Not a collective: gloo's worker threads free a finished collective's tensors after its caller has moved on,
    which takes the GIL. A collective just before the process exits thus races the interpreter's shutdown, and the
    process aborts ("terminate called without an active exception"; `dist.barrier()` here failed about one
    two-process training run in 30, an all-reduce as well). The store keeps no tensors, and while one rank waits
    for the others its GIL is free for the workers to finish.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    store = dist.distributed_c10d._get_default_store()
    key = f"longgen/barrier/{next(_BARRIERS)}"
    store.set(f"{key}/{dist.get_rank()}", "1")
    store.wait([f"{key}/{r}" for r in range(dist.get_world_size())])


@contextlib.contextmanager
def _one_process() -> Iterator[None]:
    """Silence torch.distributed.checkpoint's warning that it runs in one process: here that is intended."""
    with warnings.catch_warnings():
        if not (dist.is_available() and dist.is_initialized()):
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (unfinished ``.tmp`` folders are ignored)."""
    root = checkpoints_dir(output_dir)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit():
                found.append((int(p.name[len(PREFIX) :]), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    *,
    rank: int = 0,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically (all ranks call this); keeps the newest `keep` checkpoints."""
    root = checkpoints_dir(output_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{PREFIX}{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _one_process():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save(extra, tmp / f"extra-rank{rank}.pt")
    barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def read_extra(path: str | Path, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """This rank's extra state of checkpoint `path` (step, scheduler, loader, RNG, run record), without loading
    model or optimizer state."""
    path = Path(path)
    extra_file = path / f"extra-rank{rank}.pt"
    if not extra_file.is_file():
        n = len(list(path.glob("extra-rank*.pt")))
        raise ValueError(
            f"checkpoint {path} was written by {n} ranks but this run has {world_size}; resume with the same number"
        )
    return torch.load(extra_file, weights_only=False)


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, rank: int = 0, world_size: int = 1
) -> dict[str, Any]:
    """Restore model and optimizer state from `path` in place; returns this rank's extra state."""
    extra = read_extra(path, rank, world_size)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _one_process():
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return extra
