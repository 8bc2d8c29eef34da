"""Convert Hugging Face Llama-family models into LongGen hybrids, save them, load them back, describe them.

Conversion changes the configuration only (layout, RoPE, maximum length); the weights are untouched.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longgen.model.attention import ATTN_IMPLEMENTATION, register
from longgen.model.layout import LAYOUT_KEY, build_layout, is_hybrid, layout_to_dict, read_layout
from longgen.model.placement import AUTO_OPTIONS, auto_full_layers, check_auto_options
from longgen.model.rope import extend_rope, head_dim
from longgen.patterns import Full, Pattern

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def convert_config(
    config: Any,
    *,
    full_layers: str | Sequence[int] = "middle",
    full_fraction: float = 1 / 3,
    pattern: Pattern | dict[int, Pattern] | None = None,
    target_length: int | None = None,
    rope: str | None = None,
    rope_theta: float | None = None,
    drop_sliding_window: bool = False,
) -> Any:
    """Turn a transformers config into a LongGen hybrid config, in place, and return it.

    Args:
        full_layers: "middle" (default), "bottom", "top", "interleave", or explicit full-layer indices
            ("auto" needs the model: `convert` or `convert_checkpoint`).
        full_fraction: share of full-attention layers for the named placements (default 1/3).
        pattern: the sparse layers' pattern (default ``SinkWindow(64, 2048)``), or ``{layer: Pattern}``.
        target_length: new maximum context length (>= the current one), or None to keep it.
        rope: "ntk", "yarn", "linear" or "none" (see `longgen.model.rope`); rope_theta: an explicit base.
        drop_sliding_window: a model with a sliding window of its own (Mistral, Qwen2 with
            use_sliding_window) is refused unless this is True; then its window is removed, and the
            full layers attend fully.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported architecture {model_type!r}: longgen converts models whose attention is standard "
            f"q/k/v/o + RoPE + GQA: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if is_hybrid(config):
        raise ValueError("this model is already a LongGen hybrid (config.longgen exists); convert the original")
    if full_layers == "auto":
        raise ValueError(
            "full_layers='auto' scores the model's layers on calibration text, so it needs the model: use "
            "longgen.convert(model, ...) or convert_checkpoint(src, dst, ...) (CLI: longgen convert --full-layers auto)"
        )
    window = getattr(config, "sliding_window", None)
    uses_window = window is not None and (model_type != "qwen2" or getattr(config, "use_sliding_window", False))
    if uses_window and not drop_sliding_window:
        raise ValueError(
            f"this {model_type} model has its own sliding window ({window} tokens); longgen will not mix it with "
            "its patterns. Pass drop_sliding_window=True (CLI: --drop-sliding-window) to remove it"
        )
    source = {
        "max_position_embeddings": config.max_position_embeddings,
        "rope_parameters": copy.deepcopy(getattr(config, "rope_parameters", None)),
    }
    num_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    layers = build_layout(config.num_hidden_layers, num_kv, full_layers, full_fraction, pattern)
    extend_rope(config, target_length, rope, rope_theta)
    if uses_window:
        source["sliding_window"] = window
        config.sliding_window = None
        if hasattr(config, "use_sliding_window"):
            config.use_sliding_window = False
        if getattr(config, "layer_types", None):
            config.layer_types = ["full_attention"] * config.num_hidden_layers
    record = layout_to_dict(layers, full_layers)
    record["source"] = source
    setattr(config, LAYOUT_KEY, record)
    config.attn_implementation = ATTN_IMPLEMENTATION  # saved in config.json: loading then selects longgen
    return config


def convert(model: Any, **kwargs: Any) -> Any:
    """Convert a loaded transformers causal LM into a LongGen hybrid, in place; returns the model.

    Takes the keyword arguments of `convert_config`. Rotary embeddings are rebuilt when RoPE changes.
    ``full_layers="auto"`` first scores the layers on calibration text and makes the highest-scoring ones full;
    it also takes the options of `longgen.model.placement.auto_full_layers` (calibration, tokenizer,
    calibration_length, calibration_sequences, full_count, progress).
    """
    register()
    kwargs, scores = _place_automatically(model, kwargs)
    old_rope = copy.deepcopy(getattr(model.config, "rope_parameters", None))
    convert_config(model.config, **kwargs)
    _record_scores(model.config, scores)
    model.config._attn_implementation = ATTN_IMPLEMENTATION
    if model.config.rope_parameters != old_rope:
        _rebuild_rotary(model)
    return model


def _place_automatically(model: Any, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """For ``full_layers="auto"``: score `model`'s layers and return the `convert_config` arguments with the
    chosen full layers, and the scores to record; otherwise the arguments unchanged and None."""
    options = {k: kwargs.pop(k) for k in AUTO_OPTIONS if k in kwargs}
    if kwargs.get("full_layers") != "auto":
        if options:
            raise ValueError(f"{', '.join(options)}: only for full_layers='auto' (CLI: --full-layers auto)")
        return kwargs, None
    _check_before_scoring(model.config, {**kwargs, **options})
    full, scores = auto_full_layers(
        model, pattern=kwargs.get("pattern"), full_fraction=kwargs.pop("full_fraction", None), **options
    )
    return {**kwargs, "full_layers": full}, scores


def _check_before_scoring(config: Any, kwargs: dict[str, Any]) -> None:
    """Raise what `convert_config` would raise for this model and these options, before the (long) scoring."""
    rest = {k: v for k, v in kwargs.items() if k not in ("full_layers", "full_fraction", "pattern", *AUTO_OPTIONS)}
    convert_config(copy.deepcopy(config), full_layers=[], **rest)
    if not isinstance(kwargs.get("calibration"), torch.Tensor):  # token ids set the length themselves
        check_auto_options(
            config, kwargs.get("pattern"), kwargs.get("full_fraction"), kwargs.get("full_count"),
            kwargs.get("calibration_length"),
        )  # fmt: skip


def _record_scores(config: Any, scores: dict[str, Any] | None) -> None:
    if scores is not None:
        getattr(config, LAYOUT_KEY).update(placement="auto", placement_scores=scores)


def _rebuild_rotary(model: Any) -> None:
    base = getattr(model, "model", model)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        raise ValueError("cannot find the model's rotary embedding (model.model.rotary_emb) to apply the RoPE change")
    base.rotary_emb = type(rotary)(config=model.config).to(rotary.inv_freq.device)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")  # one of them makes a tokenizer


def check_model_folder(path: str | os.PathLike, weights: bool = False) -> Path:
    """`path` as a Path; FileNotFoundError unless it is a folder with config.json. With `weights`, ValueError
    naming the first ``*.safetensors`` file whose header is damaged or whose data is cut short."""
    from safetensors import SafetensorError, safe_open

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no model folder at {path} (a folder with config.json is needed)")
    for f in sorted(folder.glob("*.safetensors")) if weights else ():
        try:
            with safe_open(f, "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f} is damaged or incomplete (a copy cut short?): {e}") from None
    return folder


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer saved in the local folder `path`; ValueError naming the folder when it holds none."""
    from transformers import AutoTokenizer

    folder = Path(path).expanduser()
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(
            f"{folder} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); save the model's tokenizer "
            "there (tokenizer.save_pretrained)"
        )
    return AutoTokenizer.from_pretrained(folder)


def enable_activation_checkpointing(model: Any) -> Any:
    """Recompute each decoder layer's activations in the backward pass (non-reentrant); returns the model.
    transformers 5.24 renamed ``gradient_checkpointing_enable`` (deprecated, goes in 6.0) to this."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    return model


def load_model(path: str | os.PathLike, **kwargs: Any) -> Any:
    """Load a converted hybrid from a local folder (kwargs go to ``AutoModelForCausalLM.from_pretrained``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    register()
    check_model_folder(path, weights=True)
    config = AutoConfig.from_pretrained(path)
    if not is_hybrid(config):
        raise ValueError(f"{path} is not a LongGen hybrid (its config has no 'longgen' layout); convert it first")
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=ATTN_IMPLEMENTATION, **kwargs)


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    force: bool = False,
    progress: bool = True,
    device: str | None = None,
    **kwargs: Any,
) -> Any:
    """Convert the checkpoint folder `src` into a new folder `dst` (the CLI's ``longgen convert``).

    Only config.json changes; every other file (safetensors weights, tokenizer, generation config) is copied
    unchanged. `dst` is written beside itself and renamed into place, so it never exists half-written; an
    existing `dst` is replaced only with ``force=True``. Returns the new config.

    ``full_layers="auto"`` (options as for `convert`) loads the model on `device` (default: cuda when available,
    in the checkpoint's dtype; else cpu, float32) and the tokenizer from `src` to score the layers first.
    """
    from transformers import AutoConfig

    src, dst = check_folders(src, dst, force)
    config = AutoConfig.from_pretrained(src)
    if kwargs.get("full_layers") == "auto":
        from transformers import AutoModelForCausalLM

        _check_before_scoring(config, kwargs)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = "auto" if str(device).startswith("cuda") else torch.float32
        if "tokenizer" not in kwargs and not isinstance(kwargs.get("calibration"), torch.Tensor):
            kwargs["tokenizer"] = load_tokenizer(src)
        model = AutoModelForCausalLM.from_pretrained(check_model_folder(src, weights=True), dtype=dtype)
        kwargs, scores = _place_automatically(model.to(device).eval(), {"progress": progress, **kwargs})
        del model
    elif device is not None:
        raise ValueError("device: only for full_layers='auto' (the one conversion that runs the model)")
    else:
        kwargs, scores = _place_automatically(None, kwargs)  # refuses the options only auto takes
    convert_config(config, **kwargs)
    _record_scores(config, scores)
    write_model_folder(src, dst, config, progress=progress)
    return config


def check_folders(src: str | os.PathLike, dst: str | os.PathLike, force: bool) -> tuple[Path, Path]:
    """`src` and `dst` as Paths, once `src` is a model folder and `dst` may be written (a new folder, or an
    existing one with `force`); ValueError / FileExistsError otherwise."""
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} is not a Hugging Face model folder (no config.json)")
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists; pass --force (force=True) to replace it")
    if dst.resolve() == src.resolve():
        raise ValueError("DST must differ from SRC (conversion writes a new folder)")
    return src, dst


def write_model_folder(src: Path, dst: Path, config: Any, *, progress: bool = True) -> None:
    """Write `dst`: every file of `src` copied unchanged except config.json, which is `config`'s. The folder is
    written beside `dst` and renamed into place, so it never exists half-written; an existing `dst` is replaced."""
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    files = [p for p in sorted(src.rglob("*")) if p.is_file() and p.relative_to(src) != Path("config.json")]
    try:
        tmp.mkdir(parents=True)
        for i, f in enumerate(files, 1):
            rel = f.relative_to(src)
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            if progress:
                print(f"  copying [{i}/{len(files)}] {rel} ({f.stat().st_size / 2**20:.1f} MiB)", flush=True)
            shutil.copy2(f, tmp / rel)
        config.save_pretrained(tmp)
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass(frozen=True)
class LayerKV:
    """One layer's KV cache at a given length."""

    layer: int
    pattern: Pattern
    kept_tokens_per_kv_head: float
    kv_bytes: int


def describe(config: Any, length: int, bytes_per_value: int = 2) -> tuple[list[LayerKV], int]:
    """Per-layer KV-cache sizes of a hybrid at `length` tokens (one sequence), and the full-attention total.

    Bytes count K and V for every KV head: ``2 * kept_tokens * head_dim * bytes_per_value`` per head.
    """
    layers = read_layout(config)
    hkv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    d = head_dim(config)
    rows = []
    for i, p in enumerate(layers):
        kept = p.kept_tokens(length, hkv)
        rows.append(LayerKV(i, p, sum(kept) / hkv, 2 * sum(kept) * d * bytes_per_value))
    full_total = 2 * len(layers) * hkv * length * d * bytes_per_value
    return rows, full_total


def format_description(config: Any, length: int, bytes_per_value: int = 2) -> str:
    rows, full_total = describe(config, length, bytes_per_value)
    total = sum(r.kv_bytes for r in rows)
    n_full = sum(isinstance(r.pattern, Full) for r in rows)
    rec = getattr(config, LAYOUT_KEY)
    scores = rec.get("placement_scores")
    lines = [
        f"{config.model_type}: {len(rows)} layers, {n_full} full ({rec.get('placement')}), "
        f"{len(rows) - n_full} sparse; max_position_embeddings={config.max_position_embeddings}; "
        f"rope={getattr(config, 'rope_parameters', None)}",
    ]
    if scores:
        lines.append(
            f"placement score (auto): {scores['score']} {scores['pattern']}, {scores['sequences']} calibration "
            f"sequences of {scores['calibration_length']} tokens ({_calibration_name(scores['calibration'])})"
        )
    lines += [
        f"KV cache at {length} tokens, batch 1, {bytes_per_value}-byte values:",
        f"{'layer':>5}  {'attention':<72} {'KV tokens/head':>15} {'KV MiB':>9}" + ("  score" if scores else ""),
    ]
    for r in rows:
        desc = "full_attention" if isinstance(r.pattern, Full) else str(r.pattern.to_dict())
        score = f"  {scores['layers'][r.layer]:.4f}" if scores else ""
        lines.append(f"{r.layer:>5}  {desc:<72} {r.kept_tokens_per_kv_head:>15,.0f} {r.kv_bytes / 2**20:>9.1f}{score}")
    lines.append(
        f"total KV {total / 2**20:,.1f} MiB vs {full_total / 2**20:,.1f} MiB with full attention "
        f"({1 - total / full_total:.1%} smaller)"
    )
    return "\n".join(lines)


def _calibration_name(source: Any) -> str:
    return ", ".join(source) if isinstance(source, list) else str(source)
