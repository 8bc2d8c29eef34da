"""Training configuration: dataclasses read from a TOML (or YAML) file, with ``section.key=value`` overrides.

Every value is checked before any work starts; unknown keys are errors that list the allowed ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEDULES = ("cosine", "constant")
DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class ModelSection:
    path: str = ""  # Hugging Face folder: a converted hybrid, or a plain model for the full-attention baseline
    tokenizer: str = ""  # default: the model folder
    dtype: str = "bfloat16"  # compute dtype; parameters and optimizer state stay float32
    activation_checkpointing: bool = True
    compile: bool = False  # torch.compile each decoder layer


@dataclass
class OptimSection:
    lr: float = 2e-5
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    schedule: str = "cosine"
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class TrainSection:
    steps: int = 1000
    batch_size: int = 1  # sequences per rank per micro-step
    grad_accum: int = 1
    seed: int = 0
    output_dir: str = "runs/longgen"
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    loss_chunk: int = 4096  # positions per chunk of the output projection + cross entropy
    device: str = "auto"  # auto | cpu | cuda
    tensorboard: bool = True
    flush_denormals: bool = True  # CPU: subnormal floats count as zero while training (they are slow)
    resume: bool = False  # continue the run in output_dir from its latest checkpoint (same model, data, seq_len)
    overwrite: bool = False  # delete an earlier run's checkpoints, metrics and export in output_dir, start over
    change_steps: bool = False  # with resume: `steps` is a new total for the run (the LR schedule follows it)
    progress: bool = True
    context_parallel_size: int = 1  # ranks that share each sequence (Ulysses); must divide the world size


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: Any = None  # longgen.train.data.DataConfig
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    def validate(self) -> None:
        """Raise ValueError naming the first bad value (and check data paths) before any work starts."""
        m, o, t = self.model, self.optim, self.train
        if not m.path:
            raise ValueError("model.path is required (a Hugging Face model folder)")
        if not (Path(m.path).expanduser() / "config.json").is_file():
            raise ValueError(f"model.path={m.path!r} is not a Hugging Face model folder (no config.json)")
        if m.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {DTYPES}, got {m.dtype!r}")
        if not o.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {o.lr}")
        if not 0 <= o.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
        if o.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {o.schedule!r}")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
        for name, value, low in (
            ("optim.warmup_steps", o.warmup_steps, 0),
            ("train.steps", t.steps, 1),
            ("train.batch_size", t.batch_size, 1),
            ("train.grad_accum", t.grad_accum, 1),
            ("train.save_every", t.save_every, 1),
            ("train.keep_checkpoints", t.keep_checkpoints, 1),
            ("train.log_every", t.log_every, 1),
            ("train.loss_chunk", t.loss_chunk, 1),
        ):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if o.grad_clip < 0 or o.weight_decay < 0:
            raise ValueError("optim.grad_clip and optim.weight_decay must be >= 0")
        if t.resume and t.overwrite:
            raise ValueError("train.resume (--resume) and train.overwrite (--overwrite) exclude each other")
        if t.change_steps and not t.resume:
            raise ValueError("train.change_steps (--change-steps) applies only when resuming (--resume)")
        if t.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device must be auto, cpu or cuda, got {t.device!r}")
        if self.data is None:
            raise ValueError("a [data] section is required (sources, seq_len, ...)")
        self.data.validate()
        self._validate_context_parallel()

    def _validate_context_parallel(self) -> None:
        """train.context_parallel_size against the world size (torchrun's WORLD_SIZE), heads and seq_len."""
        from longgen.train.context_parallel import check_context_parallel

        cp = self.train.context_parallel_size
        if cp < 1:
            raise ValueError(f"train.context_parallel_size must be >= 1, got {cp}")
        if cp == 1:
            return
        model_config = json.loads((Path(self.model.path).expanduser() / "config.json").read_text())
        check_context_parallel(
            cp,
            world_size=launched_processes(),
            num_heads=model_config.get("num_attention_heads"),
            num_kv_heads=model_config.get("num_key_value_heads") or model_config.get("num_attention_heads"),
            seq_len=self.data.seq_len,
        )


def launched_processes() -> int:
    """How many processes the launcher started for this run (torchrun's WORLD_SIZE; 1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _section(cls, values: dict, name: str):
    allowed = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(allowed)
    if unknown:
        raise ValueError(f"unknown keys in [{name}]: {sorted(unknown)}; allowed: {sorted(allowed)}")
    missing = [k for k, f in allowed.items() if _default(f) is dataclasses.MISSING and k not in values]
    if missing:
        raise ValueError(f"[{name}] needs {', '.join(missing)}")
    out = {}
    for key, value in values.items():
        default = _default(allowed[key])
        out[key] = _coerce(value, None if default is dataclasses.MISSING else default, f"{name}.{key}")
    return cls(**out)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Check a value against the type of its default (ints accepted for floats)."""
    if default is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = True
    if not ok:
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}
        raise ValueError(f"{where} must be {kind.get(type(default), type(default).__name__)}, got {value!r}")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.steps=10"`` -> (["train", "steps"], 10). Values are TOML literals; bare words are strings."""
    if "=" not in text:
        raise ValueError(f"an override looks like section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ValueError(f"override keys are section.key (e.g. train.steps), got {key!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def load_config(path: str | Path | None = None, overrides: list[str] = (), raw: dict | None = None) -> TrainConfig:
    """Read a config file (.toml, or .yaml/.yml with PyYAML) and apply overrides; validates everything."""
    from longgen.train.data import DataConfig

    data: dict[str, Any] = {}
    if raw is not None:
        data = {k: dict(v) for k, v in raw.items()}
    elif path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {p} does not exist")
        if p.suffix == ".toml":
            try:
                data = tomllib.loads(p.read_text())
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"config file {p} is not valid TOML: {e}") from None
        elif p.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ImportError("YAML configs need PyYAML: pip install pyyaml (or use a .toml config)") from None
            try:
                data = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"config file {p} is not valid YAML: {e}") from None
        else:
            raise ValueError(f"config files are .toml or .yaml, got {p.name}")
    sections = {"model", "data", "optim", "train"}
    unknown = set(data) - sections
    if unknown:
        raise ValueError(f"unknown config sections {sorted(unknown)}; allowed: {sorted(sections)}")
    for text in overrides:
        (section, key), value = parse_override(text)
        if section not in sections:
            raise ValueError(f"unknown config section {section!r} in override {text!r}; allowed: {sorted(sections)}")
        data.setdefault(section, {})[key] = value
    cfg = TrainConfig(
        model=_section(ModelSection, data.get("model", {}), "model"),
        data=_section(DataConfig, data["data"], "data") if "data" in data else None,
        optim=_section(OptimSection, data.get("optim", {}), "optim"),
        train=_section(TrainSection, data.get("train", {}), "train"),
    )
    cfg.validate()
    return cfg
