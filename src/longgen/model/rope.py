"""RoPE settings for length extension, written into a Hugging Face config's ``rope_parameters``.

Options (`extend_rope`):
- ``rope="ntk"``: NTK-aware base change, ``theta' = theta * (L_new / L_old) ** (d / (d - 2))`` (d = head dim);
- ``rope_theta=X``: an explicit base;
- ``rope="yarn"`` / ``rope="linear"``: transformers' own scalings with ``factor = L_new / L_old``;
- ``rope="none"``: keep the rotary settings, only raise the maximum length.
"""

from __future__ import annotations

from typing import Any

ROPE_CHOICES = ("ntk", "yarn", "linear", "none")


def head_dim(config: Any) -> int:
    d = getattr(config, "head_dim", None)
    return int(d) if d else config.hidden_size // config.num_attention_heads


def ntk_theta(theta: float, old_len: int, new_len: int, dim: int) -> float:
    """NTK-aware base for extending from `old_len` to `new_len` with rotary dimension `dim`."""
    return float(theta) * (new_len / old_len) ** (dim / (dim - 2))


def extend_rope(
    config: Any, target_length: int | None, rope: str | None = None, rope_theta: float | None = None
) -> dict:
    """Set ``max_position_embeddings`` and the RoPE parameters of `config` for `target_length`, in place.

    Returns the new ``rope_parameters``. Raises ValueError for a target below the current maximum length, an
    unknown option, or a scaling that would stack on a non-default rope type.
    """
    old_len = int(config.max_position_embeddings)
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        params["rope_theta"] = float(getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    if rope is not None and rope not in ROPE_CHOICES:
        raise ValueError(f"rope must be one of {ROPE_CHOICES} (or pass rope_theta=...), got {rope!r}")
    if rope_theta is not None and rope not in (None, "none"):
        raise ValueError("pass either rope_theta (an explicit base) or rope='ntk'|'yarn'|'linear', not both")
    if target_length is None:
        if rope not in (None, "none") or rope_theta is not None:
            raise ValueError("a RoPE change needs target_length (the new maximum context length)")
        return params
    if isinstance(target_length, bool) or not isinstance(target_length, int) or target_length < old_len:
        raise ValueError(
            f"target_length must be an int >= the current max_position_embeddings ({old_len}), got {target_length!r}"
        )
    factor = target_length / old_len
    if rope_theta is not None:
        if not rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {rope_theta}")
        params["rope_theta"] = float(rope_theta)
    elif rope == "ntk":
        params["rope_theta"] = ntk_theta(params["rope_theta"], old_len, target_length, head_dim(config))
    elif rope in ("yarn", "linear"):
        if params["rope_type"] != "default":
            raise ValueError(
                f"the model already uses rope_type={params['rope_type']!r}; {rope!r} scaling would stack on it. "
                "Use rope='ntk' or an explicit rope_theta instead"
            )
        params["rope_type"] = rope
        params["factor"] = float(factor)
        if rope == "yarn":
            params["original_max_position_embeddings"] = old_len
    config.rope_parameters = params
    config.max_position_embeddings = target_length
    return params
