"""Choose which layers keep full attention from the model itself (``full_layers="auto"``).

The score of a layer is how much of its attention falls outside the sparse pattern it would get: for each query,
the share of its full-attention probability on keys the pattern drops,

    outside(t) = 1 - exp(lse_pattern(t) - lse_full(t)),

where both log-sum-exps come from `longgen.sparse_attention(..., return_lse=True)`, so no ``seq x seq`` matrix is
ever built. The model runs once per calibration sequence with ordinary full attention, through a temporary
attention function registered with transformers' `AttentionInterface` that records the score of every layer (and
head) as the forward pass reaches it. The layers with the highest mean score become the full layers.

The other score (``score="loss"``): for each layer, the next-token loss with that layer alone made sparse, minus
the loss with every layer full, in nats per token, mean over the calibration tokens (or over `targets`, e.g. the
answers of retrieval prompts). It runs the model ``layers + 1`` times a sequence instead of once, and asks what the
outside mass only suggests: whether the layer's distant attention matters to the model's predictions. In a model
whose attention is spread everywhere (a tiny model trained briefly, say) the outside mass is nearly flat and misses
the one layer that does a look-up; the loss increase finds it.

Recorded in the converted config as ``config.longgen["placement"] = "auto"`` plus
``config.longgen["placement_scores"]`` (see `placement_record`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longgen.kernels import sparse_attention
from longgen.patterns import Full, Pattern, SinkWindow
from longgen.sources import iter_documents

SCORING_IMPLEMENTATION = "longgen_placement"
DEFAULT_CALIBRATION_LENGTH = 8192  # capped at the model's max_position_embeddings
DEFAULT_CALIBRATION_SEQUENCES = 4
SCORE_NAMES = {
    "outside": "attention probability outside the pattern, mean over calibration queries",
    "loss": "next-token loss increase (nats) with the layer alone sparse, mean over calibration tokens",
}
STDLIB_CALIBRATION = "python standard library"
# convert() keyword arguments that only `full_layers="auto"` takes
AUTO_OPTIONS = (
    "calibration", "tokenizer", "calibration_length", "calibration_sequences", "full_count", "progress", "score",
    "targets",
)  # fmt: skip


def attention_mass_outside(
    q: torch.Tensor, k: torch.Tensor, pattern: Pattern, *, scale: float | None = None, backend: str = "auto"
) -> torch.Tensor:
    """Share of each query's causal full-attention probability that falls on keys `pattern` drops.

    q: ``(batch, seq, heads, head_dim)``, k: ``(batch, seq, kv_heads, head_dim)`` (GQA as in `sparse_attention`).
    Returns float32 ``(batch, heads, seq)`` in [0, 1]: ``1 - exp(lse_pattern - lse_full)``.
    """
    _, lse_full = sparse_attention(q, k, k, Full(), scale=scale, return_lse=True, backend=backend)
    _, lse_pattern = sparse_attention(q, k, k, pattern, scale=scale, return_lse=True, backend=backend)
    return (1 - torch.exp(lse_pattern.float() - lse_full.float())).clamp_(0, 1)


@dataclass
class LayerScores:
    """A score per layer, `layers[i]` for layer i; for the outside mass also `heads[i][h]` for its query head h
    (None for the loss increase, which is a layer's)."""

    layers: list[float]
    heads: list[list[float]] | None
    sequences: int
    length: int
    score: str = "outside"


class _Recorder:
    """Per-layer, per-head sums of the outside mass over the queries seen so far; or, for the loss score
    (`sparse_layer` set, possibly to -1 for none), which layer runs the pattern."""

    def __init__(self, pattern: Pattern, num_layers: int, sparse_layer: int | None = None):
        self.pattern = pattern
        self.sums: list[torch.Tensor | None] = [None] * num_layers
        self.queries = [0] * num_layers
        self.sparse_layer = sparse_layer


_RECORDER: _Recorder | None = None  # set only while `score_layers` runs


def _scoring_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q ``(B, H, T, d)``, k/v ``(B, Hkv, T, d)`` (after RoPE) -> full causal
    attention ``(B, T, H, d)``, recording the layer's outside mass on the way."""
    if _RECORDER is None:
        raise RuntimeError(f"the {SCORING_IMPLEMENTATION!r} attention only runs inside longgen's score_layers")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("placement scoring takes whole sequences without padding")
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if _RECORDER.sparse_layer is not None:  # the loss score: one layer runs the pattern, the others full attention
        pattern = _RECORDER.pattern if module.layer_idx == _RECORDER.sparse_layer else Full()
        return sparse_attention(q, k, v, pattern, scale=scaling), None
    out, lse_full = sparse_attention(q, k, v, Full(), scale=scaling, return_lse=True)
    _, lse_pattern = sparse_attention(q, k, k, _RECORDER.pattern, scale=scaling, return_lse=True)
    outside = (1 - torch.exp(lse_pattern.float() - lse_full.float())).clamp_(0, 1)  # (B, H, T)
    i = module.layer_idx
    per_head = outside.sum(dim=(0, 2)).double().cpu()
    prev = _RECORDER.sums[i]
    _RECORDER.sums[i] = per_head if prev is None else prev + per_head
    _RECORDER.queries[i] += outside.shape[0] * outside.shape[2]
    return out, None


def _register_scoring() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(SCORING_IMPLEMENTATION, _scoring_attention)
    AttentionMaskInterface.register(SCORING_IMPLEMENTATION, flash_attention_mask)  # None for unpadded input


def _check_ids(input_ids: Any) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(f"input_ids must be an integer tensor (sequences, length), got {_describe(input_ids)}")


@contextlib.contextmanager
def _scoring(model: Any, input_ids: Any, pattern: Pattern, sparse_layer: int | None = None) -> Iterator[_Recorder]:
    """Check the calibration ids and the pattern, then run `model`'s attention through `_scoring_attention` with a
    fresh recorder (yielded) until the block ends; the model's attention implementation is restored after."""
    global _RECORDER
    _check_ids(input_ids)
    config = model.config
    num_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    check_pattern(pattern, input_ids.shape[1], num_kv)
    _register_scoring()
    saved = config._attn_implementation
    _RECORDER = _Recorder(pattern.resolve(num_kv), config.num_hidden_layers, sparse_layer)
    try:
        config._attn_implementation = SCORING_IMPLEMENTATION
        yield _RECORDER
    finally:
        config._attn_implementation = saved
        _RECORDER = None


@torch.no_grad()
def score_layers(model: Any, input_ids: torch.Tensor, pattern: Pattern, *, progress: bool = True) -> LayerScores:
    """Score every layer of the transformers causal LM `model` on the calibration sequences `input_ids`
    ``(sequences, length)``, one sequence per forward pass (the layers run one after the other, so memory is
    one layer's activations and never ``seq x seq``). The model's attention implementation is restored after.

    `pattern` is resolved for the model's number of KV heads. Returns the mean outside mass per layer and head.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    with _scoring(model, input_ids, pattern) as recorder:
        for row in tqdm(input_ids, desc="placement scores", unit=" seq", disable=not progress):
            model.base_model(input_ids=row[None].to(device), use_cache=False)  # no LM head: no (T, vocab) logits
    missing = [i for i, s in enumerate(recorder.sums) if s is None]
    if missing:
        raise ValueError(f"layers {missing} never called the attention function; cannot score them")
    heads = [(s / n).tolist() for s, n in zip(recorder.sums, recorder.queries, strict=True)]
    return LayerScores([sum(h) / len(h) for h in heads], heads, input_ids.shape[0], input_ids.shape[1])


@torch.no_grad()
def loss_scores(
    model: Any,
    input_ids: torch.Tensor,
    pattern: Pattern,
    *,
    targets: torch.Tensor | None = None,
    progress: bool = True,
    chunk: int = 2048,
) -> LayerScores:
    """Score every layer of the transformers causal LM `model` by the loss increase when it alone runs `pattern`
    (the other layers full attention): the mean next-token loss over the calibration tokens, in nats, minus the
    loss with every layer full. `input_ids` ``(sequences, length)``; `targets` (bool, same shape) marks the tokens
    whose prediction counts (default: every token but the first). Runs ``layers + 1`` forward passes a sequence;
    logits are made `chunk` positions at a time. The model's attention implementation is restored after."""
    from tqdm.auto import tqdm

    _check_ids(input_ids)
    if targets is None:
        targets = torch.ones_like(input_ids, dtype=torch.bool)
        targets[:, 0] = False
    elif not isinstance(targets, torch.Tensor) or targets.dtype != torch.bool or targets.shape != input_ids.shape:
        raise ValueError(f"targets must be a bool tensor of the shape of input_ids, got {_describe(targets)}")
    elif bool(targets[:, 0].any()) or not bool(targets.any()):
        raise ValueError("targets must mark at least one token, and not a sequence's first (nothing predicts it)")
    layers = model.config.num_hidden_layers
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    nll = torch.zeros(layers + 1, dtype=torch.float64)  # [0]: every layer full; [i + 1]: layer i sparse
    with _scoring(model, input_ids, pattern, sparse_layer=-1) as recorder:
        for row, want in tqdm(
            list(zip(input_ids, targets, strict=True)), desc="placement scores (loss)", unit=" seq",
            disable=not progress,
        ):  # fmt: skip
            row = row[None].to(device)
            where = want[1:].nonzero().squeeze(1).to(device)  # position t predicts token t + 1
            for i in range(-1, layers):
                recorder.sparse_layer = i
                hidden = model.base_model(input_ids=row, use_cache=False).last_hidden_state[0]
                for part in where.split(chunk):
                    logits = head(hidden[part]).float()
                    nll[i + 1] -= logits.log_softmax(-1).gather(-1, row[0, part + 1, None]).sum().double().cpu()
    per_token = nll / int(targets.sum())
    return LayerScores((per_token[1:] - per_token[0]).tolist(), None, input_ids.shape[0], input_ids.shape[1], "loss")


def check_pattern(pattern: Any, length: int, num_kv_heads: int) -> None:
    """ValueError unless `pattern` is one sparse Pattern that drops some keys at `length` tokens."""
    if isinstance(pattern, dict):
        raise ValueError(
            "full_layers='auto' chooses which layers are sparse, so it needs one pattern for all of them, "
            f"not per-layer patterns (got a dict for layers {sorted(pattern)})"
        )
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a longgen Pattern, got {pattern!r}")
    if isinstance(pattern, Full):
        raise ValueError(
            "full_layers='auto' scores layers by what a sparse pattern drops; pattern=Full() drops nothing. "
            "Give a sparse pattern (SinkWindow, BlockSparse, BlockLayout)"
        )
    kept = pattern.kept_tokens(length, num_kv_heads)
    if min(kept) >= length:
        raise ValueError(
            f"{pattern!r} keeps every key at the calibration length {length}, so every layer would score 0; "
            "use a longer calibration length or a pattern with a shorter reach"
        )


def full_layer_count(num_layers: int, full_fraction: float | None = None, full_count: int | None = None) -> int:
    """Number of full layers: `full_count`, or ``round(num_layers * full_fraction)`` as the "middle" placement
    takes (default fraction 1/3); ValueError when both are given or either is out of range."""
    from longgen.model.layout import full_layer_indices

    if full_count is None:
        return len(full_layer_indices(num_layers, "middle", 1 / 3 if full_fraction is None else full_fraction))
    if full_fraction is not None:
        raise ValueError("give full_fraction or full_count, not both (CLI: --full-fraction or --full-count)")
    if isinstance(full_count, bool) or not isinstance(full_count, int) or not 0 <= full_count <= num_layers:
        raise ValueError(f"full_count must be an int in [0, {num_layers}] (the model's layers), got {full_count!r}")
    return full_count


def choose_full_layers(scores: Sequence[float], count: int) -> list[int]:
    """The `count` layers with the highest scores (ties: the lower index first), sorted."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:count])


def stdlib_sources() -> list[Path]:
    """The Python standard library's top-level modules, largest first (calibration text that needs no data)."""
    return sorted(Path(os.__file__).parent.glob("*.py"), key=lambda p: (-p.stat().st_size, p.name))


def calibration_ids(
    tokenizer: Any, sources: Sequence[str | os.PathLike] | None, length: int, sequences: int
) -> torch.Tensor:
    """``(sequences, length)`` token ids: the documents of `sources` (files or folders, read as `longgen train`
    reads text sources; default: the standard library's modules, largest first), each tokenized with the
    tokenizer's special tokens, concatenated in order and cut into `sequences` sequences of `length` tokens.

    ValueError when the text holds fewer than ``sequences * length`` tokens (the message says how many it holds).
    """
    for name, v in (("calibration_length", length), ("calibration_sequences", sequences)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files = stdlib_sources() if sources is None else list(sources)
    if not files:
        raise ValueError("the calibration set is empty: give at least one file or folder of text")
    need = sequences * length
    ids: list[int] = []
    for text in iter_documents(files):
        ids += tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) >= need:
            break
    if len(ids) < need:
        what = STDLIB_CALIBRATION if sources is None else ", ".join(map(str, files))
        raise ValueError(
            f"the calibration text ({what}) has {len(ids)} tokens; {sequences} sequences of {length} tokens need "
            f"{need}. Give more text, or a smaller calibration_length / calibration_sequences"
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(sequences, length)


def auto_full_layers(
    model: Any,
    *,
    pattern: Pattern | None = None,
    full_fraction: float | None = None,
    full_count: int | None = None,
    calibration: torch.Tensor | str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    tokenizer: Any = None,
    calibration_length: int | None = None,
    calibration_sequences: int = DEFAULT_CALIBRATION_SEQUENCES,
    progress: bool = True,
    score: str = "outside",
    targets: torch.Tensor | None = None,
) -> tuple[list[int], dict[str, Any]]:
    """Score `model`'s layers on calibration text and return (the full layers, the `placement_record`).

    score: ``"outside"`` (attention mass outside the pattern, one forward pass a sequence) or ``"loss"`` (loss
        increase with the layer alone sparse, ``layers + 1`` passes; `targets` marks the tokens that count, with
        token-id calibration only).
    calibration: None (the standard library's sources), files/folders of text (needs `tokenizer`), or token ids
        ``(sequences, length)``. calibration_length: tokens per sequence, default
        ``min(max_position_embeddings, 8192)``. pattern: the sparse layers' pattern (default SinkWindow(64, 2048)).
    The number of full layers is `full_count`, or ``round(L * full_fraction)`` like ``"middle"`` (default 1/3).
    """
    if score not in SCORE_NAMES:
        raise ValueError(f"score must be one of {', '.join(SCORE_NAMES)}, got {score!r}")
    if targets is not None and (score != "loss" or not isinstance(calibration, torch.Tensor)):
        raise ValueError("targets: only for score='loss' with calibration token ids (sequences, length)")
    config = model.config
    n_full = full_layer_count(config.num_hidden_layers, full_fraction, full_count)
    pattern = SinkWindow() if pattern is None else pattern
    num_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if isinstance(calibration, torch.Tensor):
        if calibration_length is not None and calibration_length != calibration.shape[-1]:
            raise ValueError(
                f"calibration_length={calibration_length} but the calibration token ids have "
                f"{calibration.shape[-1]} tokens a sequence"
            )
        ids, source = calibration, "token ids"
    else:
        if tokenizer is None:
            raise ValueError(
                "calibration text needs the model's tokenizer: pass tokenizer=..., or calibration= token ids "
                "(sequences, length)"
            )
        length = check_auto_options(config, pattern, full_fraction, full_count, calibration_length)
        ids = calibration_ids(tokenizer, calibration, length, calibration_sequences)
        if calibration is None:
            source = STDLIB_CALIBRATION
        elif isinstance(calibration, (str, os.PathLike)):
            source = [str(calibration)]
        else:
            source = [str(c) for c in calibration]
    if score == "loss":
        scores = loss_scores(model, ids, pattern, targets=targets, progress=progress)
    else:
        scores = score_layers(model, ids, pattern, progress=progress)
    return choose_full_layers(scores.layers, n_full), placement_record(scores, pattern.resolve(num_kv), source)


def check_auto_options(
    config: Any,
    pattern: Pattern | None = None,
    full_fraction: float | None = None,
    full_count: int | None = None,
    calibration_length: int | None = None,
) -> int:
    """Check the options of `auto_full_layers` against a transformers `config` before any model or text is read;
    returns the calibration length (default ``min(max_position_embeddings, 8192)``)."""
    full_layer_count(config.num_hidden_layers, full_fraction, full_count)
    length = calibration_length or min(config.max_position_embeddings, DEFAULT_CALIBRATION_LENGTH)
    if length > config.max_position_embeddings:
        raise ValueError(
            f"calibration_length {length} exceeds the model's max_position_embeddings "
            f"({config.max_position_embeddings})"
        )
    num_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    check_pattern(SinkWindow() if pattern is None else pattern, length, num_kv)
    return length


def placement_record(scores: LayerScores, pattern: Pattern, source: Any) -> dict[str, Any]:
    """The JSON-able ``config.longgen["placement_scores"]`` of an automatic placement."""
    record = {
        "score": SCORE_NAMES[scores.score],
        "pattern": pattern.to_dict(),
        "calibration": source,
        "calibration_length": scores.length,
        "sequences": scores.sequences,
        "tokens": scores.length * scores.sequences,
        "layers": [round(s, 6) for s in scores.layers],
    }
    if scores.heads is not None:
        record["heads"] = [[round(s, 6) for s in h] for h in scores.heads]
    return record


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
