"""Shared builders for tests: a real BPE tokenizer and a tiny Llama saved as plain and hybrid model folders."""

from pathlib import Path

import torch


def bpe_tokenizer(texts, vocab_size=400):
    """A byte-level BPE tokenizer trained on `texts`, as a transformers fast tokenizer (eos ``</s>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]")


def save_tiny_models(root: Path, tokenizer, max_len: int, **convert_kwargs):
    """A tiny random Llama saved with `tokenizer` as ``root/plain`` and, converted, as ``root/hybrid``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import longgen

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_len,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(root / "plain")
    tokenizer.save_pretrained(root / "plain")
    longgen.convert(model, pattern=longgen.SinkWindow(4, 32), **convert_kwargs)
    model.save_pretrained(root / "hybrid")
    tokenizer.save_pretrained(root / "hybrid")
