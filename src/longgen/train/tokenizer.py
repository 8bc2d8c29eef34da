"""A byte-level BPE tokenizer trained on local text, for models pre-trained from scratch (demo, reproduction).

Digits are split one per token, as in Llama's tokenizer: a number is then tokenized the same way wherever it
appears, so copying it from a distant part of the context (pass keys, magic numbers) is a token-by-token copy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def train_bpe_tokenizer(corpus: str | os.PathLike, vocab_size: int) -> Any:
    """A `PreTrainedTokenizerFast` trained on the text files in folder `corpus`; ``</s>`` is its only special
    token (end of document, also used for padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(str(p) for p in Path(corpus).iterdir() if p.is_file())
    if not files:
        raise ValueError(f"no text files in {corpus} to train a tokenizer on")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 300:
        raise ValueError(f"vocab_size must be an int >= 300 (256 bytes + merges), got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>")
