"""Evaluation of long-context models: passkey, needle in a haystack, RULER-style tasks, perplexity by position.

Every task takes a model folder (a LongGen hybrid or a plain Hugging Face model; `baseline="streaming"` turns a
plain one into StreamingLLM), writes JSON (and PNG figures) to an output folder and returns the result dict.
"""

from longgen.eval.baseline import limit_full_layers, load_for_eval, streaming_llm
from longgen.eval.perplexity import ppl, segment_loss_sums
from longgen.eval.prompts import Haystack, Prompt, build_prompt
from longgen.eval.results import write_result
from longgen.eval.ruler import RULER_TASKS, ruler_sample
from longgen.eval.scoring import first_number, passkey_score, string_match_all, string_match_part
from longgen.eval.tasks import generate, niah, passkey, ruler

TASKS = {"passkey": passkey, "niah": niah, "ruler": ruler, "ppl": ppl}

__all__ = [
    "RULER_TASKS",
    "TASKS",
    "Haystack",
    "Prompt",
    "build_prompt",
    "first_number",
    "generate",
    "limit_full_layers",
    "load_for_eval",
    "niah",
    "passkey",
    "passkey_score",
    "ppl",
    "ruler",
    "ruler_sample",
    "segment_loss_sums",
    "streaming_llm",
    "string_match_all",
    "string_match_part",
    "write_result",
]
