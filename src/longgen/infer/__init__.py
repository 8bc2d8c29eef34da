"""Inference: compact KV caches that keep only what each layer can see, generation, and the serving runner."""

from longgen.infer.cache import HybridCache, RetainedKVLayer, analytic_kv_bytes, cache_kwargs
from longgen.infer.generate import generate_text
from longgen.infer.kv import CompactKV
from longgen.infer.runner import ModelRunner, row_kv_bytes, rows_for_budget, sample_tokens

__all__ = [
    "CompactKV",
    "HybridCache",
    "ModelRunner",
    "RetainedKVLayer",
    "analytic_kv_bytes",
    "cache_kwargs",
    "generate_text",
    "row_kv_bytes",
    "rows_for_budget",
    "sample_tokens",
]
