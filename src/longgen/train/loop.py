"""The training loop: length-extension fine-tuning of a hybrid (or of a full-attention baseline).

One process on CPU or one GPU, or many processes under ``torchrun`` with FSDP2 (`fully_shard` on every decoder
layer, then the root), optionally with context parallelism (`train.context_parallel_size` ranks share each
sequence: `longgen.train.context_parallel`). Parameters and AdamW state are float32; compute runs in
`model.dtype` (autocast, or FSDP's mixed precision). The loss is the token mean over the whole global batch,
computed in chunks.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from longgen.train.checkpoint import (
    barrier,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_extra,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from longgen.train.config import TrainConfig, launched_processes
from longgen.train.context_parallel import context_parallel_attention, setup_context_parallel, shard_batch
from longgen.train.loss import IGNORE_INDEX, CausalLMLoss

FAULT_ENV = "LONGGEN_FAULT_KILL_AFTER_STEP"  # testing hook: SIGKILL the process after this step


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the run stopped and kept its last good checkpoint."""


class TrainingInterrupted(RuntimeError):
    """The run was stopped by Ctrl-C (SIGINT, exit code 130), or by SIGTERM or `request_stop` (143: a checkpoint of
    the step was written first). The message says at which step and how to resume."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


RUN_FILES = ("checkpoints", "metrics.jsonl", "final", "tensorboard")  # what a run leaves in its output_dir


def _earlier_run(out: Path) -> list[str]:
    """What an earlier run left in `out` (complete checkpoints, metrics, export), for messages; [] if nothing."""
    found = [p.name for _, p in list_checkpoints(out)]
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        found.append("metrics.jsonl")
    if (out / "final").exists():
        found.append("final/")
    return found


def _prepare_output(out: Path, t, rank: int) -> None:
    """Refuse to start a fresh run over an earlier one unless told (`--resume` or `--overwrite`); with overwrite,
    delete the earlier run's files. Runs before any work."""
    found = _earlier_run(out)
    if found and not (t.resume or t.overwrite):
        raise ValueError(
            f"{out} already holds a training run ({', '.join(found)}); pass --resume to continue it "
            "(train.resume=true) or --overwrite to delete it and start over (train.overwrite=true), "
            "or choose another train.output_dir"
        )
    if t.resume and not list_checkpoints(out) and (out / "final").exists():
        raise ValueError(
            f"--resume: {out} holds an exported model (final/) but no checkpoint to continue from; "
            "pass --overwrite instead to delete it and start over"
        )
    if t.overwrite and found and rank == 0:
        print(f"--overwrite: deleting the earlier run in {out} ({', '.join(found)})")
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    barrier()


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[None]:
    """Inside, the CPU reads and writes subnormal floats (below 1.2e-38 in float32) as zero; the setting before is
    restored on leaving. CPUs compute with subnormals much more slowly, and training makes them: tiny gradients
    (the loss is a mean over every token of a step). Measured on a 2-core x86 CPU, one 8,192-token training step
    of a 6-layer model (hidden 192, 6 heads of 32): 20.8 s without, 15.3 s with
    (`benchmarks/results/cpu_subnormals.json`). GPUs are unaffected. Nothing changes with `enabled` False."""
    if not enabled:
        yield
        return
    before = flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def flushing_denormals() -> bool:
    """Whether the CPU now reads and writes subnormal floats as zero (`torch.set_flush_denormal`)."""
    return bool(torch.tensor([1e-40], dtype=torch.float32).mul(1.0)[0] == 0)


def _run_record(cfg: TrainConfig, loader) -> dict[str, Any]:
    """What makes a checkpoint belong to this run; saved with every checkpoint and checked on resume."""
    meta = None if loader.corpus.path is None else loader.corpus.path / "meta.json"
    data = json.loads(meta.read_text()).get("fingerprint") if meta is not None and meta.is_file() else None
    return {
        "model": str(Path(cfg.model.path).expanduser().resolve()),
        "data": data or str(loader.corpus.path),
        "seq_len": cfg.data.seq_len,
        "steps": cfg.train.steps,
    }


def _check_resume(ckpt: Path, saved: dict[str, Any] | None, mine: dict[str, Any], start: int, t) -> None:
    """ValueError unless the checkpoint at `ckpt` (step `start`) was written by this run."""
    if saved is None:
        print(f"note: {ckpt} has no run record (written by an older longgen); model and data are not checked")
        saved = {}
    names = {
        "model": "model.path",
        "data": "data (sources, their sizes and times, or the tokenizer; fingerprint)",
        "seq_len": "data.seq_len",
    }
    changed = [f"{names[k]}: {saved[k]} -> {mine[k]}" for k in names if k in saved and saved[k] != mine[k]]
    if changed:
        raise ValueError(
            f"--resume: checkpoint {ckpt} belongs to another run: {'; '.join(changed)}. Resume with the run's own "
            "settings, or start over with --overwrite (or another train.output_dir)"
        )
    if start > t.steps:
        raise ValueError(
            f"--resume: checkpoint {ckpt} is at step {start}, past train.steps={t.steps}; "
            "start over with --overwrite, or resume with train.steps >= that step and --change-steps"
        )
    if "steps" in saved and saved["steps"] != t.steps and not t.change_steps:
        raise ValueError(
            f"--resume: checkpoint {ckpt} belongs to a run of train.steps={saved['steps']}, this one has "
            f"train.steps={t.steps}; pass --change-steps to continue that run to {t.steps} steps (its learning-rate "
            "schedule then follows the new total), or start over with --overwrite"
        )


def _dist_setup(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    world = launched_processes()
    want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def load_training_model(
    path: str | Path, device: torch.device | str, *, activation_checkpointing: bool = False, compile: bool = False
):
    """The model of folder `path` as training runs it, in float32 on `device`: a hybrid as converted; a plain model
    with every layer Full, so that packed documents stay separate exactly as in a hybrid. Returns ``(model,
    config)``: the plain model's own config, to export it with, or None for a hybrid."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from longgen.model import check_model_folder, convert, enable_activation_checkpointing, is_hybrid, load_model

    path = check_model_folder(path, weights=True)
    if is_hybrid(AutoConfig.from_pretrained(path)):
        model = load_model(path, dtype=torch.float32)
        original_config = None
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        original_config = copy.deepcopy(model.config)
        convert(model, full_fraction=1.0)
    model.config.use_cache = False
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    if compile:
        for layer in model.model.layers:
            layer.compile()
    return model.to(device), original_config


def _shard(wrapped: CausalLMLoss, dtype: torch.dtype) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in wrapped.lm.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(wrapped, mp_policy=mp)


def _optimizer(cfg: TrainConfig, model: torch.nn.Module):
    o = cfg.optim
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
    )

    def factor(step: int) -> float:  # step counts completed optimizer steps
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.train.steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


class _Metrics:
    """JSONL metrics (and TensorBoard when available) on rank 0."""

    def __init__(self, out: Path, start_step: int, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():  # a resumed run replaces what the killed run logged after its checkpoint
            keep = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                print("note: tensorboard is not installed; metrics go to metrics.jsonl only")

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns the exported Hugging Face folder ``<output_dir>/final``."""
    from longgen.model import load_tokenizer
    from longgen.train.data import build_loader

    cfg.validate()
    rank, world, device = _dist_setup(cfg)
    t = cfg.train
    cp = setup_context_parallel(t.context_parallel_size, device.type)
    out = Path(t.output_dir).expanduser()
    _prepare_output(out, t, rank)
    torch.manual_seed(t.seed)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    if rank != 0:  # rank 0 tokenizes into the shared cache first; the others then read it
        barrier()
    # the context ranks of one data-parallel rank share its batches (and each takes its shard of the sequences)
    loader = build_loader(cfg.data, tokenizer, t.batch_size, rank=cp.dp_rank, world_size=cp.dp_size, progress=rank == 0)
    if rank == 0:
        barrier()
    m = cfg.model
    model, original_config = load_training_model(
        m.path, device, activation_checkpointing=m.activation_checkpointing, compile=m.compile
    )
    dtype = getattr(torch, cfg.model.dtype)
    wrapped = CausalLMLoss(model, t.loss_chunk)
    sharded = dist.is_initialized()
    if sharded:
        _shard(wrapped, dtype)
    optimizer, scheduler = _optimizer(cfg, wrapped)

    start = 0
    record = _run_record(cfg, loader)
    ckpt = latest_checkpoint(out) if t.resume else None
    if ckpt is not None:
        saved = read_extra(ckpt, rank, world)
        _check_resume(ckpt, saved.get("run"), record, saved["step"], t)
        extra = load_checkpoint(ckpt, wrapped, optimizer, rank=rank, world_size=world)
        start = extra["step"]
        scheduler.load_state_dict(extra["scheduler"])
        loader.load_state_dict(extra["loader"])
        set_rng_state(extra["rng"])
        if rank == 0:
            print(f"resumed from {ckpt} (step {start})")
    elif t.resume and rank == 0:
        print(f"no checkpoint in {out / 'checkpoints'}; starting from step 0")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(_config_dict(cfg), indent=1))

    autocast = contextlib.nullcontext()
    if not sharded and dtype != torch.float32:
        autocast = torch.autocast(device.type, dtype=dtype)
    metrics = _Metrics(out, start, t.tensorboard, rank == 0)
    bar = _progress(t, start, rank == 0)
    batches = iter(loader)
    kill_after = int(os.environ.get(FAULT_ENV, "0"))
    tokens_per_step = t.batch_size * t.grad_accum * cp.dp_size * cfg.data.seq_len
    wrapped.train()
    tick = time.perf_counter()
    # the metrics are closed (TensorBoard flushed) however the loop ends: a rank of a multi-process run then
    # leaves without the interpreter's shutdown (`longgen.cli`)
    with _Stops(out, t, bar) as stops, flush_denormals(t.flush_denormals), contextlib.closing(metrics):
        for step in range(start + 1, t.steps + 1):
            stops.step = step
            micro = [shard_batch(next(batches), cp.rank, cp.size) for _ in range(t.grad_accum)]
            n_local = sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in micro)
            n_global = _all_sum(torch.tensor(float(n_local), device=device)).clamp(min=1)
            loss_sum = torch.zeros((), device=device)
            for b in micro:
                # backward inside too: activation checkpointing recomputes the attention there
                with context_parallel_attention(cp.group, b["full_position_ids"].to(device)):
                    with autocast:
                        ids, pos, targets = (b[k].to(device) for k in ("input_ids", "position_ids", "targets"))
                        part, _ = wrapped(ids, pos, targets, True)
                    # FSDP averages gradients over ranks, so scale by world: the gradient is of the global token mean
                    (part * (world / n_global)).backward()
                loss_sum += part.detach()
            # one reduction carries the loss and whether any rank got SIGTERM: every rank stops after the same step
            sums = _all_sum(torch.stack([loss_sum, torch.tensor(float(stops.asked_by is not None), device=device)]))
            loss, stop = (sums[0] / n_global).item(), bool(sums[1] > 0)
            grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), _clip_value(cfg))
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            grad_norm = float(grad_norm)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                last = latest_checkpoint(out)
                raise NonFiniteLossError(
                    f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}; stopped without "
                    f"updating. Last good checkpoint: {last or 'none'} (resume with train.resume=true after "
                    "lowering optim.lr)"
                )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            now = time.perf_counter()
            tps = tokens_per_step / (now - tick)
            tick = now
            if step % t.log_every == 0 or step == t.steps:
                metrics.log({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps})
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}")
                bar.update(1)
            if step % t.save_every == 0 or step == t.steps or stop:
                extra = {
                    "step": step,
                    "scheduler": scheduler.state_dict(),
                    "loader": loader.state_dict(),
                    "rng": rng_state(),
                    "run": record,
                }
                with stops.ctrl_c_after_saving():
                    save_checkpoint(out, step, wrapped, optimizer, extra, rank=rank, keep=t.keep_checkpoints)
            if kill_after and step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if stop and step < t.steps:
                stops.stop_as_asked()
    if bar is not None:
        bar.close()
    final = _export(out, wrapped, tokenizer, original_config, rank)
    if dist.is_initialized():
        dist.destroy_process_group()
    return final


_RUNNING: list[_Stops] = []  # the training loop of this process while it runs


def request_stop() -> bool:
    """Ask the training loop running in this process to do what SIGTERM makes it do: finish its step, write a
    checkpoint of it and raise `TrainingInterrupted` (exit code 143). For a caller's own time limit; safe to call
    from a signal handler or another thread. Returns False (and does nothing) when no training loop is running."""
    if not _RUNNING:
        return False
    _RUNNING[-1].request("request_stop()")
    return True


class _Stops:
    """Around the training loop: SIGTERM (what cluster schedulers send before killing a job) or `request_stop` only
    sets a flag, and the loop then writes a checkpoint of its current step and stops; Ctrl-C becomes one line saying
    where the run stands. Both raise `TrainingInterrupted`."""

    def __init__(self, out: Path, t, bar):
        self.out, self.t, self.bar = out, t, bar
        self.step, self.previous = 0, None
        # what asked this rank's loop to stop after its step (None on a rank stopping because another was asked)
        self.asked_by: str | None = None

    def __enter__(self) -> _Stops:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        _RUNNING.append(self)
        return self

    def request(self, by: str) -> None:
        self.asked_by = by

    def _on_sigterm(self, signum, frame) -> None:
        self.request("SIGTERM")

    @contextlib.contextmanager
    def ctrl_c_after_saving(self):
        """A checkpoint being written is finished before Ctrl-C stops the run: torch.distributed.checkpoint turns a
        KeyboardInterrupt inside its save into a CheckpointException (a traceback instead of the one line), and the
        checkpoint would be lost. Ctrl-C during the save is held and raised right after it."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        held: list[int] = []
        previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
        if held:
            raise KeyboardInterrupt

    def stop_as_asked(self) -> None:
        raise TrainingInterrupted(
            f"stopped by {self.asked_by or 'SIGTERM'} after step {self.step} of {self.t.steps}; wrote checkpoint "
            f"{latest_checkpoint(self.out)}; continue with --resume",
            128 + signal.SIGTERM,
        )

    def __exit__(self, kind, exc, tb) -> None:
        _RUNNING.remove(self)
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        if kind is not None and self.bar is not None:
            self.bar.close()
        if kind is KeyboardInterrupt:
            last = list_checkpoints(self.out)
            where = f"last checkpoint: step {last[-1][0]} ({last[-1][1]})" if last else "no checkpoint written yet"
            raise TrainingInterrupted(
                f"interrupted during step {self.step} of {self.t.steps}; {where}; continue with --resume",
                128 + signal.SIGINT,
            ) from None


def _clip_value(cfg: TrainConfig) -> float:
    return cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")


def _progress(t, start: int, enabled: bool):
    if not (enabled and t.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _export(out: Path, wrapped: CausalLMLoss, tokenizer, original_config, rank: int) -> Path:
    """Write the trained model as a Hugging Face folder ``out/final`` (atomically, on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = out / "final"
    if rank == 0:
        tmp = out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        sd = {k.removeprefix("lm."): v for k, v in full.items()}
        lm = wrapped.lm
        saved_config = lm.config
        if original_config is not None:  # the baseline leaves as the plain model it came in as
            lm.config = original_config
        try:
            lm.save_pretrained(tmp, state_dict=sd)
        finally:
            lm.config = saved_config
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        print(f"exported {final}")
    barrier()
    return final


def _config_dict(cfg: TrainConfig) -> dict:
    import dataclasses

    return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in vars(cfg).items()}
