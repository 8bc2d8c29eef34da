"""Export a LongGen hybrid to a plain Hugging Face folder that stock transformers serves without longgen.

A hybrid whose sparse layers are all ``SinkWindow(sink=0, window=W)`` is, token for token, a model with
per-layer ``layer_types`` ("full_attention" / "sliding_attention") and ``sliding_window = W``: transformers'
sliding mask keeps key ``s`` for query ``t`` when ``s > t - sliding_window``
(``transformers.masking_utils.sliding_window_overlay``), which is ``t - s < W``, the window that includes the
query itself, exactly SinkWindow(0, W). Its caches then keep only the window on the sliding layers.

Model types (the weights keep their names, so the safetensors files are copied unchanged):
qwen2 -> qwen2, qwen3 -> qwen3 (their configs have ``layer_types``); llama and mistral -> ministral (Mistral's
architecture with per-layer ``layer_types``; transformers' Llama and Mistral configs have none).
"""

from __future__ import annotations

import os
from typing import Any

from longgen.model.convert import check_folders, write_model_folder
from longgen.model.layout import LAYOUT_KEY, read_layout
from longgen.patterns import Full, SinkWindow

EXPORT_FORMATS = ("transformers",)
# hybrid's model type -> exported model type: the same weight names, and per-layer `layer_types` in its config
EXPORT_MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "ministral", "mistral": "ministral"}
SLIDING_ATTENTION = "sliding_attention"
FULL_ATTENTION = "full_attention"
# Llama config keys that Ministral does not have (refused below when they would change the computation)
_LLAMA_ONLY_KEYS = ("attention_bias", "mlp_bias", "pretraining_tp")

_WHAT_WORKS = (
    "export needs every sparse layer to be SinkWindow(sink=0, window=W) with one W for the whole model: convert "
    "with `longgen convert SRC DST --pattern sink_window --sink 0 --window W` (Python: SinkWindow(0, W)) and train "
    "that hybrid; to serve any other hybrid, use `longgen serve` or longgen.load_model"
)


def _sliding_window(layers: list[Any]) -> int | None:
    """The one window W of the sparse layers (None if every layer is full); ValueError naming the first layer
    that stock transformers cannot express."""
    windows = set()
    for i, p in enumerate(layers):
        if isinstance(p, Full):
            continue
        if not isinstance(p, SinkWindow):
            raise ValueError(
                f"layer {i} uses {p!r}: transformers' per-layer attention is full or a plain sliding window, so "
                f"block-sparse and custom block layouts cannot be exported; {_WHAT_WORKS}"
            )
        if p.sink > 0:
            raise ValueError(
                f"layer {i} uses {p!r}: transformers' sliding window has no sink tokens, and dropping them would "
                f"change the model's outputs; {_WHAT_WORKS}"
            )
        windows.add(p.window)
    if len(windows) > 1:
        raise ValueError(
            f"the sparse layers use different windows {sorted(windows)}: a transformers config has one "
            f"sliding_window for all sliding layers; {_WHAT_WORKS}"
        )
    return windows.pop() if windows else None


def export_config(config: Any, format: str = "transformers") -> Any:
    """The stock transformers config equivalent to the hybrid config `config` (which is left unchanged).

    The result has ``layer_types`` (one entry per layer) and ``sliding_window`` = W, the RoPE settings, length
    and every other field of `config`; the ``longgen`` layout and ``attn_implementation: "longgen"`` are gone, so
    it loads without longgen. Llama and Mistral hybrids become ``ministral`` configs (same weights). ValueError
    naming the cause for what cannot be expressed: sink tokens, BlockSparse or custom layouts, windows that differ
    between layers, biases a Ministral does not have, other architectures.
    """
    from transformers import CONFIG_MAPPING

    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; supported: {', '.join(EXPORT_FORMATS)}")
    layers = read_layout(config)
    model_type = getattr(config, "model_type", None)
    if model_type not in EXPORT_MODEL_TYPES:
        raise ValueError(
            f"cannot export a {model_type!r} hybrid: export supports {', '.join(EXPORT_MODEL_TYPES)} hybrids "
            "(transformers configs with per-layer layer_types)"
        )
    target = EXPORT_MODEL_TYPES[model_type]
    if target not in CONFIG_MAPPING or "layer_types" not in CONFIG_MAPPING[target]().to_dict():
        import transformers

        raise ValueError(
            f"the installed transformers {transformers.__version__} has no {target!r} config with layer_types, "
            f"which a {model_type} export needs; upgrade transformers (>= 5.0)"
        )
    window = _sliding_window(layers)
    d = config.to_dict()
    for key in (LAYOUT_KEY, "attn_implementation", "_attn_implementation", "transformers_version"):
        d.pop(key, None)
    if target != model_type:
        biased = [k for k in ("attention_bias", "mlp_bias") if d.get(k)]
        if biased:
            raise ValueError(
                f"this {model_type} model has {' and '.join(biased)}=True; it is exported as a ministral model, "
                "whose projections have no biases, so it cannot be expressed"
            )
        for key in _LLAMA_ONLY_KEYS:
            d.pop(key, None)
        d["model_type"] = target
        d["architectures"] = ["MinistralForCausalLM"]
    d["layer_types"] = [FULL_ATTENTION if isinstance(p, Full) else SLIDING_ATTENTION for p in layers]
    d["sliding_window"] = window
    if "use_sliding_window" in d:  # qwen2 / qwen3 drop sliding_window unless this is set
        d["use_sliding_window"] = window is not None
    out = CONFIG_MAPPING[target].from_dict(d)
    if list(out.layer_types) != d["layer_types"] or out.sliding_window != window:
        raise ValueError(
            f"transformers' {target} config did not keep layer_types / sliding_window as written "
            f"({out.layer_types}, {out.sliding_window}); this transformers version cannot express the hybrid"
        )
    return out


def export_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    format: str = "transformers",
    force: bool = False,
    progress: bool = True,
) -> Any:
    """Export the hybrid folder `src` into a new folder `dst` that stock transformers loads (the CLI's
    ``longgen export``); returns the new config.

    Weights (safetensors), tokenizer and generation config are copied unchanged; config.json is `export_config`'s.
    `dst` is written beside itself and renamed into place; an existing `dst` is replaced only with ``force=True``.
    """
    from transformers import AutoConfig

    src, dst = check_folders(src, dst, force)
    config = export_config(AutoConfig.from_pretrained(src), format)
    write_model_folder(src, dst, config, progress=progress)
    return config
