"""The `longgen eval TASK PATH` subcommand: `add_eval_parser(subparsers)` adds it to the longgen parser."""

from __future__ import annotations

import argparse
import json
from typing import Any

from longgen.eval.ruler import RULER_TASKS

TASK_NAMES = ("passkey", "niah", "ruler", "ppl")


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text!r}")
    return values


def _depths(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers in [0, 1], got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers in [0, 1], got {text!r}")
    return values


def _ruler_tasks(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in RULER_TASKS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"RULER tasks must be among {', '.join(RULER_TASKS)}, got {text!r}")
    return names


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (its error says what is allowed; argparse would name this function)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def run_eval(args: argparse.Namespace) -> int:
    """Handler of `longgen eval`: runs the task and prints its summary; returns the exit code."""
    from longgen.eval import TASKS

    kwargs: dict[str, Any] = {
        "seed": args.seed,
        "out_dir": args.out,
        "progress": not args.no_progress,
        "baseline": args.baseline,
        "sink": args.sink,
        "window": args.window,
        "device": args.device,
        "dtype": args.dtype,
        "tokenizer_path": args.tokenizer,
    }
    if args.lengths:
        kwargs["lengths"] = args.lengths
    if args.task == "ppl":
        if args.haystack:
            raise ValueError(
                "ppl reads its texts from --documents FILE_OR_FOLDER ...; --haystack is the filler of passkey, niah "
                "and ruler"
            )
        kwargs.update(bucket=args.bucket, num_documents=args.num_documents, chunk=args.chunk, documents=args.documents)
    else:
        if args.documents:
            raise ValueError(f"--documents is for ppl; {args.task} takes its filler texts from --haystack")
        kwargs.update(chat=args.chat, haystack=args.haystack, kv_cache=args.kv_cache)
        if args.samples:
            kwargs["samples"] = args.samples
        if args.max_new_tokens:
            kwargs["max_new_tokens"] = (
                dict.fromkeys(args.ruler_tasks or RULER_TASKS, args.max_new_tokens)
                if args.task == "ruler"
                else args.max_new_tokens
            )
        if args.task == "ruler":
            kwargs["cwe_words"] = args.cwe_words
            if args.ruler_tasks:
                kwargs["tasks"] = args.ruler_tasks
        elif args.depths:
            kwargs["depths"] = args.depths
    result = TASKS[args.task](args.path, **kwargs)
    print(json.dumps(result["summary"], indent=2))
    for f in result["files"]:
        print(f"wrote {f}")
    return 0


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to `subparsers` (from ``ArgumentParser.add_subparsers``); returns its parser."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model: passkey, needle in a haystack, RULER-style tasks, perplexity by position",
        description="Evaluate a LongGen hybrid or a plain Hugging Face model folder; writes JSON (and PNG) to --out.",
    )
    p.add_argument("task", choices=TASK_NAMES, help="passkey | niah | ruler | ppl")
    p.add_argument("path", help="model folder (a LongGen hybrid, or a plain model for the baselines)")
    p.add_argument("--lengths", type=_ints, default=None, help="prompt lengths in tokens (1024,2048,4096)")
    p.add_argument("--depths", type=_depths, default=None, help="needle depths in [0, 1] (0,0.25,0.5,0.75,1)")
    p.add_argument("--samples", type=positive_int, default=None, help="prompts per cell (passkey/niah 1, ruler 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed of keys, needles and depths (0)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, help="generated tokens per prompt (per task)")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument(
        "--haystack",
        nargs="+",
        default=None,
        help="passkey, niah, ruler: text files or folders for the filler; default: the Python standard library",
    )
    p.add_argument(
        "--documents",
        nargs="+",
        default=None,
        help="ppl: text files or folders, one document per file; default: the Python standard library's sources",
    )
    p.add_argument("--ruler-tasks", type=_ruler_tasks, default=None, help=f"subset of {','.join(RULER_TASKS)}")
    p.add_argument("--cwe-words", type=positive_int, default=10, help="ruler cwe: number of common words (10)")
    p.add_argument("--bucket", type=positive_int, default=256, help="ppl: positions per bucket (256)")
    p.add_argument("--num-documents", type=positive_int, default=4, help="ppl: number of documents (4)")
    p.add_argument("--chunk", type=positive_int, default=4096, help="ppl: positions per output-layer chunk (4096)")
    p.add_argument(
        "--baseline", choices=["none", "streaming"], default="none", help="streaming: StreamingLLM on a plain model"
    )
    p.add_argument("--sink", type=int, default=4, help="StreamingLLM sink tokens (4)")
    p.add_argument("--window", type=positive_int, default=2048, help="StreamingLLM window tokens (2048)")
    p.add_argument(
        "--kv-cache",
        choices=["auto", "hybrid", "dynamic"],
        default="auto",
        help="generation cache: auto (longgen's hybrid cache for hybrids and the streaming baseline), hybrid, dynamic",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="bf16 CUDA, fp32 CPU")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    p.add_argument("--out", default="eval_results", help="output folder (eval_results)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_eval)
    return p
