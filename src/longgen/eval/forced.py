"""Greedy answers checked in one batched forward pass, without generating.

Greedy decoding continues a prompt with the answer's tokens ``a_0 .. a_{m-1}`` exactly when, in a single forward
pass over ``prompt + answer``, the argmax of the logits at the position before each ``a_i`` is ``a_i`` (each
decoding step then sees exactly the teacher-forced prefix). So `greedy_matches` decides, for many prompts at
once and with the training kernels instead of a decoding loop, whether greedy generation would produce the
answer; `stop_after` also requires that the token greedy decoding would produce next does not extend it (e.g.
is not another digit of a number). The result equals generating and comparing tokens, up to floating-point
differences between a cached decoding step and a full forward pass.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch


@torch.inference_mode()
def greedy_matches(
    model: Any,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    *,
    reject_next: Collection[int] = (),
    max_batch_tokens: int = 262_144,
    pad_id: int = 0,
) -> list[bool]:
    """For each prompt, whether greedy decoding continues it with its answer's token ids.

    Args:
        model: a causal LM (``model(input_ids=..., logits_to_keep=k)`` returns the last k positions' logits).
        prompts: token ids; prompts of equal length are batched together (up to `max_batch_tokens` tokens).
        answers: the expected continuation of each prompt (non-empty token ids).
        reject_next: token ids that must not follow the answer (e.g. digits after a number); empty: no check.
        pad_id: token appended to shorter answers inside a batch (never scored).
    Returns:
        one bool per prompt, in order.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers")
    if any(len(a) == 0 for a in answers) or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt and every answer needs at least one token")
    reject = torch.tensor(sorted(set(reject_next)), dtype=torch.long)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    out = [False] * len(prompts)
    device = next(model.parameters()).device
    for length, idx in by_length.items():
        per_batch = max(1, max_batch_tokens // (length + max(len(answers[i]) for i in idx)))
        for start in range(0, len(idx), per_batch):
            group = idx[start : start + per_batch]
            m = max(len(answers[i]) for i in group)
            rows = [list(prompts[i]) + list(answers[i]) + [pad_id] * (m - len(answers[i])) for i in group]
            ids = torch.tensor(rows, device=device)
            # logits at positions length-1 .. length+m-1 predict answer tokens 0..m-1 and the token after them
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=m + 1).logits
            pred = logits.argmax(-1).cpu()
            for row, i in enumerate(group):
                a = torch.tensor(list(answers[i]))
                ok = bool((pred[row, : len(a)] == a).all())
                if ok and len(reject):
                    ok = not bool(torch.isin(pred[row, len(a)], reject))
                out[i] = ok
    return out
