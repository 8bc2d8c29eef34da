"""Causal-LM loss computed in chunks, so that long sequences never materialise their logits.

At 128K tokens and a 32K vocabulary the logits alone are 16 GB in float32; here each chunk of positions goes
through the output projection and cross entropy and is recomputed in the backward pass, so only one chunk's
logits exist at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # transformers' label value for "no loss here"


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets ``(batch, seq)``: ``labels[:, t + 1]`` at position t, -100 at the last position.

    Shifting before a sequence is cut into shards keeps the target of each shard's last token."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


def chunked_lm_loss_sum(
    hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, chunk: int, shifted: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross entropy and the number of counted targets.

    Args:
        hidden: final hidden states ``(batch, seq, dim)``; position t predicts ``labels[:, t + 1]``, or with
            `shifted`, ``labels[:, t]`` (targets from `shift_labels`, e.g. one rank's shard of a sequence).
        head: the output projection (``lm_head``).
        labels: ``(batch, seq)`` token ids, -100 where no loss is taken.
        chunk: positions per chunk.
    """
    hidden, targets = (hidden, labels) if shifted else (hidden[:, :-1], labels[:, 1:])
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[1], chunk):
        h, t = hidden[:, s : s + chunk], targets[:, s : s + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, h, head.weight, head.bias, t, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, head.weight, head.bias, t)
    return total, (targets != IGNORE_INDEX).sum()


class CausalLMLoss(torch.nn.Module):
    """Wraps a transformers causal LM: ``forward(batch) -> (loss_sum, n_targets)`` with the chunked loss.

    Being the root module, it is what FSDP shards last, so the embedding, final norm and output projection
    are gathered around its forward like every other parameter.
    """

    def __init__(self, lm: torch.nn.Module, chunk: int = 4096):
        super().__init__()
        self.lm = lm
        self.chunk = chunk

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor, shifted: bool = False):
        hidden = self.lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        return chunked_lm_loss_sum(hidden, self.lm.get_output_embeddings(), labels, self.chunk, shifted)
