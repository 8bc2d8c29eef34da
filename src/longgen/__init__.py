"""longgen: cheap long-context LLMs with LongGen hybrids of full and static sparse attention."""

from longgen.kernels import reference_attention, sparse_attention
from longgen.patterns import BlockLayout, BlockSparse, Full, Pattern, SinkWindow, pattern_from_dict

__version__ = "0.1.0"

__all__ = [
    "BlockLayout",
    "BlockSparse",
    "Full",
    "Pattern",
    "SinkWindow",
    "__version__",
    "pattern_from_dict",
    "reference_attention",
    "sparse_attention",
]
