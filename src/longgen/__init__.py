"""longgen: cheap long-context LLMs with LongGen hybrids of full and static sparse attention."""

import importlib.util

from longgen.kernels import reference_attention, sparse_attention
from longgen.patterns import BlockLayout, BlockSparse, Full, Pattern, SinkWindow, pattern_from_dict

__version__ = "0.1.0"

if importlib.util.find_spec("transformers") is not None:
    # the Hugging Face integration: `attn_implementation="longgen"` works once longgen is imported
    from longgen.model import convert, load_model, register

    register()
else:  # patterns and kernels still work without transformers

    def _needs_transformers(*args, **kwargs):
        raise ImportError("longgen's model functions need transformers: pip install transformers")

    convert = load_model = register = _needs_transformers

__all__ = [
    "BlockLayout",
    "BlockSparse",
    "Full",
    "Pattern",
    "SinkWindow",
    "__version__",
    "convert",
    "load_model",
    "pattern_from_dict",
    "reference_attention",
    "sparse_attention",
]
