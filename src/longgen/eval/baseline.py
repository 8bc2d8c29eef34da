"""Loading a model for evaluation, and the StreamingLLM baseline applied at inference."""

from __future__ import annotations

import os
from typing import Any

import torch

from longgen.model import check_model_folder, convert, load_model, load_tokenizer
from longgen.model.layout import LAYOUT_KEY, is_hybrid, read_layout
from longgen.patterns import Full, SinkWindow

BASELINES = ("none", "streaming")


def streaming_llm(model: Any, sink: int = 4, window: int = 2048) -> Any:
    """StreamingLLM (Xiao et al.): every layer of a full-attention model attends to `sink` first tokens and the
    last `window` tokens. Converts the loaded model in place (configuration only) and returns it: a plain model,
    or a LongGen conversion whose layers are all full (a full-attention model in longgen's layout)."""
    if is_hybrid(model.config) and not is_full_attention(model.config):
        raise ValueError(
            "StreamingLLM is applied to a full-attention model; this one is a LongGen hybrid with sparse layers"
        )
    return limit_full_layers(model, sink, window)


def limit_full_layers(model: Any, sink: int, window: int) -> Any:
    """The loaded model with every full-attention layer limited to SinkWindow(`sink`, `window`) and its sparse
    layers as they are: for a full-attention model StreamingLLM, for a hybrid what its sparse layers alone do with
    the help of windowed full layers (a diagnostic: which answers need the full layers' reach). Configuration only,
    in place; returns the model."""
    pattern = SinkWindow(sink, window)
    if not is_hybrid(model.config):
        return convert(model, full_fraction=0.0, pattern=pattern)
    record = dict(getattr(model.config, LAYOUT_KEY))
    record["layers"] = [
        pattern.to_dict() if isinstance(p, Full) else entry
        for p, entry in zip(read_layout(model.config), record["layers"], strict=True)
    ]
    setattr(model.config, LAYOUT_KEY, record)
    return model


def is_full_attention(config: Any) -> bool:
    """Whether every layer of the model attends fully: a plain model, or a LongGen layout of full layers only."""
    return not is_hybrid(config) or all(isinstance(p, Full) for p in read_layout(config))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_eval(
    path: str | os.PathLike,
    *,
    baseline: str = "none",
    sink: int = 4,
    window: int = 2048,
    device: str | None = None,
    dtype: str | None = None,
    tokenizer_path: str | os.PathLike | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) from a local folder: a LongGen hybrid or a plain Hugging Face model, in eval mode.

    `baseline="streaming"` turns a plain model into StreamingLLM(`sink`, `window`). `dtype`: "float32",
    "bfloat16", "float16" or None (bfloat16 on CUDA, float32 on CPU).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    device = device or default_device()
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype is None:
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    check_model_folder(path, weights=True)
    tokenizer = load_tokenizer(tokenizer_path or path)
    config = AutoConfig.from_pretrained(path)
    if baseline == "streaming" and not is_full_attention(config):
        raise ValueError(
            "--baseline streaming applies to a full-attention model (a plain model, or a conversion whose layers "
            "are all full), not to a LongGen hybrid with sparse layers"
        )
    if is_hybrid(config):
        model = load_model(path, dtype=dtypes[dtype])
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtypes[dtype])
    if baseline == "streaming":
        streaming_llm(model, sink, window)
    return model.to(device).eval(), tokenizer
