"""Inference: the hybrid KV cache that keeps only what each layer can see, and generation with it."""

from longgen.infer.cache import HybridCache, RetainedKVLayer, analytic_kv_bytes
from longgen.infer.generate import generate_text

__all__ = ["HybridCache", "RetainedKVLayer", "analytic_kv_bytes", "generate_text"]
