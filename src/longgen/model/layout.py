"""The hybrid layout: which layers keep full attention, which pattern the others use, and how the layout is
recorded in a Hugging Face config (``config.longgen``), so that any tool can read it from ``config.json``.

Recorded form::

    "longgen": {"version": 1, "placement": "middle",
                "layers": ["full_attention" | {"type": "sink_window", "sink": 64, "window": 2048} | ...]}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from longgen.patterns import Full, Pattern, pattern_from_dict

LAYOUT_KEY = "longgen"
FULL_ATTENTION = "full_attention"
PLACEMENTS = ("middle", "bottom", "top", "interleave")
LAYOUT_VERSION = 1


def full_layer_indices(
    num_layers: int, placement: str | Sequence[int] = "middle", fraction: float = 1 / 3
) -> list[int]:
    """Indices of the full-attention layers.

    `placement`: ``"middle"`` (default: ``n = round(L * fraction)`` contiguous layers starting at
    ``(L - n) // 2``; 32 layers -> 10..20), ``"bottom"`` (first n), ``"top"`` (last n), ``"interleave"`` (one in
    the middle of each of n equal segments), or an explicit list of layer indices (then `fraction` is unused).
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if not isinstance(placement, str):
        idx = list(placement)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
            raise TypeError(f"explicit full layers must be ints, got {idx!r}")
        bad = [i for i in idx if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"full layer indices {bad} are out of range for a model with {num_layers} layers")
        if len(set(idx)) != len(idx):
            raise ValueError(f"full layer indices must be unique, got {idx}")
        return sorted(idx)
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS} or a list of layer indices, got {placement!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"full_fraction must be a number in [0, 1], got {fraction!r}")
    n = round(num_layers * fraction)
    if placement == "middle":
        first = (num_layers - n) // 2
        return list(range(first, first + n))
    if placement == "bottom":
        return list(range(n))
    if placement == "top":
        return list(range(num_layers - n, num_layers))
    return [(2 * i + 1) * num_layers // (2 * n) for i in range(n)]


def build_layout(
    num_layers: int,
    num_kv_heads: int,
    full_layers: str | Sequence[int] = "middle",
    full_fraction: float = 1 / 3,
    pattern: Pattern | dict[int, Pattern] | None = None,
) -> list[Pattern]:
    """One pattern per layer: `Full()` for the full layers, `pattern` (resolved for `num_kv_heads`) elsewhere.

    `pattern` may be a dict ``{layer index: Pattern}`` giving each sparse layer its own pattern (it must name
    exactly the sparse layers). Default pattern: ``SinkWindow(64, 2048)``.
    """
    from longgen.patterns import SinkWindow

    full = set(full_layer_indices(num_layers, full_layers, full_fraction))
    sparse = [i for i in range(num_layers) if i not in full]
    if pattern is None:
        pattern = SinkWindow()
    if isinstance(pattern, dict):
        if set(pattern) != set(sparse):
            raise ValueError(
                f"per-layer patterns must name exactly the sparse layers {sparse}, got layers {sorted(pattern)}"
            )
        per_layer = pattern
    elif isinstance(pattern, Pattern):
        per_layer = dict.fromkeys(sparse, pattern)
    else:
        raise TypeError(f"pattern must be a longgen Pattern or a dict of them, got {pattern!r}")
    layers: list[Pattern] = []
    for i in range(num_layers):
        if i in full:
            layers.append(Full())
            continue
        p = per_layer[i]
        if not isinstance(p, Pattern):
            raise TypeError(f"pattern for layer {i} must be a longgen Pattern, got {p!r}")
        layers.append(p.resolve(num_kv_heads))
    return layers


def layout_to_dict(layers: Sequence[Pattern], placement: str | Sequence[int]) -> dict[str, Any]:
    return {
        "version": LAYOUT_VERSION,
        "placement": placement if isinstance(placement, str) else "explicit",
        "layers": [FULL_ATTENTION if isinstance(p, Full) else p.to_dict() for p in layers],
    }


def read_layout(config: Any) -> list[Pattern]:
    """The per-layer patterns recorded in a config (`Full()` for full layers); ValueError if there are none."""
    rec = getattr(config, LAYOUT_KEY, None)
    if not isinstance(rec, dict) or "layers" not in rec:
        raise ValueError(
            "this config has no longgen layout (config.longgen): it is not a converted LongGen hybrid; "
            "convert it first with longgen.convert(...) or `longgen convert SRC DST`"
        )
    layers = rec["layers"]
    n = getattr(config, "num_hidden_layers", len(layers))
    if len(layers) != n:
        raise ValueError(f"config.longgen lists {len(layers)} layers but the model has {n}")
    return [Full() if entry == FULL_ATTENTION else pattern_from_dict(entry) for entry in layers]


def is_hybrid(config: Any) -> bool:
    return isinstance(getattr(config, LAYOUT_KEY, None), dict)
