"""Hugging Face integration: convert models into LongGen hybrids, the ``"longgen"`` attention, loading."""

from longgen.model.attention import ATTN_IMPLEMENTATION, longgen_attention, register
from longgen.model.convert import (
    SUPPORTED_MODEL_TYPES,
    check_model_folder,
    convert,
    convert_checkpoint,
    convert_config,
    describe,
    enable_activation_checkpointing,
    format_description,
    load_model,
    load_tokenizer,
)
from longgen.model.export import EXPORT_FORMATS, export_checkpoint, export_config
from longgen.model.layout import build_layout, full_layer_indices, is_hybrid, read_layout
from longgen.model.placement import auto_full_layers, score_layers
from longgen.model.rope import extend_rope, ntk_theta

__all__ = [
    "ATTN_IMPLEMENTATION",
    "EXPORT_FORMATS",
    "SUPPORTED_MODEL_TYPES",
    "auto_full_layers",
    "build_layout",
    "check_model_folder",
    "convert",
    "convert_checkpoint",
    "convert_config",
    "describe",
    "enable_activation_checkpointing",
    "export_checkpoint",
    "export_config",
    "extend_rope",
    "format_description",
    "full_layer_indices",
    "is_hybrid",
    "load_model",
    "load_tokenizer",
    "longgen_attention",
    "ntk_theta",
    "read_layout",
    "register",
    "score_layers",
]
