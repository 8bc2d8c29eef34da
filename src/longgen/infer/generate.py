"""Text generation with the hybrid cache (the `longgen generate` command's engine)."""

from __future__ import annotations

import os
from typing import Any

import torch

from longgen.infer.cache import HybridCache, cache_kwargs


def generate_text(
    path: str | os.PathLike,
    prompt: str,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    device: str = "auto",
    stream: bool = True,
) -> str:
    """Load the hybrid at `path`, generate a continuation of `prompt` with the compact cache, return it.

    ``temperature=0`` is greedy decoding; otherwise sampling with `temperature` and `top_p`. With `stream`, tokens
    are printed to stdout as they are produced.
    """
    from transformers import TextStreamer

    from longgen.model import load_model, load_tokenizer

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1: no nucleus cut), got {top_p}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype=dtype).to(device).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    limit = model.config.max_position_embeddings
    if ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's maximum "
            f"length {limit}"
        )
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    streamer = TextStreamer(tokenizer, skip_prompt=True) if stream else None
    cache = HybridCache(model.config, max_length=ids.shape[1] + max_new_tokens)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        **cache_kwargs(cache),
        max_new_tokens=max_new_tokens,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        **kwargs,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
