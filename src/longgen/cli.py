"""The `longgen` command line: parses arguments and calls one library function per subcommand."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

import longgen
from longgen.eval.cli import positive_int


def _cmd_patterns(args: argparse.Namespace) -> int:
    """Show what each built-in pattern keeps at a given length, and run the attention op on each."""
    import torch

    patterns = {
        "full": longgen.Full(),
        "sink_window": longgen.SinkWindow(args.sink, args.window),
        "block_sparse": longgen.BlockSparse(args.block_size, args.local_blocks, args.stride).resolve(args.kv_heads),
    }
    T, hkv = args.seq_len, args.kv_heads
    print(f"Patterns at seq_len={T}, kv_heads={hkv} (what a sparse layer computes and caches)\n")
    print(f"{'pattern':<13} {'parameters':<62} {'attn work':>9} {'KV kept':>9} {'KV tokens/head':>15}")
    for name, p in patterns.items():
        params = ", ".join(f"{k}={v}" for k, v in p.to_dict().items() if k != "type") or "-"
        work = p.block_fraction(T, hkv)
        kept = p.kept_tokens(T, hkv)
        mean_kept = sum(kept) / len(kept)
        print(f"{name:<13} {params:<62} {work:>8.1%} {mean_kept / T:>8.1%} {mean_kept:>15,.0f}")
    print("\nattn work = visited (query block, key block) tiles / causal tiles; KV kept = cached tokens / seq_len")

    n = args.run_len
    gen = torch.Generator().manual_seed(0)
    heads = hkv * args.group
    q = torch.randn(1, n, heads, 64, generator=gen)
    k = torch.randn(1, n, hkv, 64, generator=gen)
    v = torch.randn(1, n, hkv, 64, generator=gen)
    print(f"\nlonggen.sparse_attention on random q (1, {n}, {heads}, 64), k/v (1, {n}, {hkv}, 64), CPU reference:")
    full = None
    for name, p in patterns.items():
        start = time.perf_counter()
        out = longgen.sparse_attention(q, k, v, p)
        ms = (time.perf_counter() - start) * 1e3
        full = out if full is None else full
        diff = (out - full).abs().max().item()
        print(f"  {name:<13} {ms:8.1f} ms   max |out - full| = {diff:.3f}")
    return 0


def _full_layers(text: str):
    if text in ("middle", "bottom", "top", "interleave", "auto"):
        return text
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be middle, bottom, top, interleave, auto or comma-separated layer indices, got {text!r}"
        ) from None


def _pattern_from_args(args: argparse.Namespace) -> longgen.Pattern:
    if args.pattern == "sink_window":
        return longgen.SinkWindow(args.sink, args.window)
    return longgen.BlockSparse(args.block_size, args.local_blocks, args.stride, args.dense_kv_heads)


def _cmd_convert(args: argparse.Namespace) -> int:
    from longgen.model import convert_checkpoint, format_description

    print(f"Converting {args.src} -> {args.dst}")
    given = {  # the library's defaults apply to options not given (and auto-only ones are refused without auto)
        "full_fraction": args.full_fraction,
        "full_count": args.full_count,
        "calibration": args.calibration,
        "calibration_length": args.calibration_length,
        "calibration_sequences": args.calibration_sequences,
        "score": args.placement_score,
        "device": args.device,
    }
    config = convert_checkpoint(
        args.src,
        args.dst,
        force=args.force,
        full_layers=args.full_layers,
        pattern=_pattern_from_args(args),
        **{k: v for k, v in given.items() if v is not None},
        target_length=args.target_length,
        rope=args.rope,
        rope_theta=args.rope_theta,
        drop_sliding_window=args.drop_sliding_window,
    )
    print(format_description(config, config.max_position_embeddings))
    print(f"Wrote {args.dst}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from longgen.model import export_checkpoint

    print(f"Exporting {args.src} -> {args.dst} ({args.format})")
    config = export_checkpoint(args.src, args.dst, format=args.format, force=args.force)
    sliding = config.layer_types.count("sliding_attention")
    print(
        f"Wrote {args.dst}: {config.model_type}, {sliding} of {len(config.layer_types)} layers "
        f"sliding_attention (sliding_window={config.sliding_window}); stock transformers loads it"
    )
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from longgen.model import check_model_folder, format_description

    config = AutoConfig.from_pretrained(check_model_folder(args.path))
    print(format_description(config, args.length or config.max_position_embeddings, args.bytes_per_value))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from longgen.train import NonFiniteLossError, TrainingInterrupted, load_config, train
    from longgen.train.config import launched_processes

    flags = {"resume": args.resume, "overwrite": args.overwrite, "change_steps": args.change_steps}
    overrides = list(args.overrides) + [f"train.{name}=true" for name, on in flags.items() if on]
    cfg = load_config(args.config, overrides)
    try:
        final = train(cfg)
    except NonFiniteLossError as e:
        print(f"longgen train: {e}", file=sys.stderr)
        code = 3
    except TrainingInterrupted as e:
        print(f"longgen train: {e}", file=sys.stderr)
        code = e.exit_code
    else:
        print(f"done: {final}")
        code = 0
    if launched_processes() > 1:
        _leave_without_shutdown(code)
    return code


def _leave_without_shutdown(code: int) -> NoReturn:
    """End a process of a multi-process run that has finished its work, skipping the interpreter's shutdown.

    After `destroy_process_group` and a garbage collection the gloo group's threads still run (DTensor's sharding
    caches still hold FSDP's device mesh). They thus outlive the interpreter, and one that takes the GIL during its
    shutdown aborts the process ("terminate called without an active exception"), failing a run that has already
    saved and exported everything (rarely: a test-suite run, once; a loop of two-process runs on a loaded 2-core
    machine did not reproduce it). Everything is written by now; stdout, stderr and logging are flushed first.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _cmd_generate(args: argparse.Namespace) -> int:
    from longgen.infer import generate_text

    if (args.prompt is None) == (args.prompt_file is None):
        raise ValueError("give exactly one of --prompt TEXT or --prompt-file FILE (- for stdin)")
    if args.prompt_file == "-":
        prompt = sys.stdin.read()
    elif args.prompt_file is not None:
        prompt = Path(args.prompt_file).read_text(encoding="utf-8")
    else:
        prompt = args.prompt
    generate_text(
        args.path,
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        device=args.device,
    )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from longgen.infer.server import serve
    except ImportError as e:
        print(f"longgen serve: error: {e}", file=sys.stderr)
        return 2
    if args.kv_budget_gb is not None and args.kv_budget_gb <= 0:
        raise ValueError(f"--kv-budget-gb must be positive, got {args.kv_budget_gb}")
    serve(
        args.path,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_len=args.max_len,
        kv_budget_bytes=None if args.kv_budget_gb is None else int(args.kv_budget_gb * 1e9),
        device=args.device,
        model_name=args.model_name,
        prefill_chunk=args.prefill_chunk,
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import dataclasses

    from longgen.demo import TINY, DemoConfig, run_demo

    base = TINY if args.tiny else DemoConfig()
    overrides = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(DemoConfig)}}
    cfg = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    run_demo(cfg)  # checks the settings (DemoConfig.validate) before any work
    return 0


def _add_pattern_args(p: argparse.ArgumentParser, choose: bool = True) -> None:
    if choose:
        p.add_argument(
            "--pattern",
            choices=["sink_window", "block_sparse"],
            default="sink_window",
            help="sparse layers' pattern (sink_window)",
        )
    p.add_argument(
        "--sink", type=int, default=64, help="SinkWindow sink tokens (64; 0 = a plain sliding window, see export)"
    )
    p.add_argument("--window", type=positive_int, default=2048, help="SinkWindow window tokens (2048)")
    p.add_argument("--block-size", type=positive_int, default=64, help="BlockSparse block size (64)")
    p.add_argument("--local-blocks", type=positive_int, default=16, help="BlockSparse local blocks (16)")
    p.add_argument("--stride", type=positive_int, default=None, help="BlockSparse stride (number of KV heads)")
    p.add_argument("--dense-kv-heads", type=int, default=0, help="BlockSparse dense KV heads (0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longgen",
        description="Cheap long-context LLMs: LongGen hybrids of full and static sparse attention.",
    )
    parser.add_argument("--version", action="version", version=f"longgen {longgen.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="the whole LongGen story in minutes on a CPU: pre-train, convert, extend, evaluate, compare",
        description="Pre-trains a tiny Llama on the Python standard library's sources and pass-key documents "
        "(short ones first, so that it learns to look a key up), converts a copy into a LongGen hybrid whose full "
        "layers are the ones its look-up needs, extends it and a full-attention copy to 8x the context with the same "
        "budget, and compares them and StreamingLLM applied to the full model (pass-key retrieval by length, "
        "perplexity by position, KV-cache bytes, training and generation speed). Nothing is downloaded.",
    )
    from longgen.demo import DemoConfig
    from longgen.model.rope import ROPE_CHOICES

    d = DemoConfig()  # the help shows the real defaults
    p.add_argument("--out-dir", default=None, help=f"output folder ({d.out_dir})")
    p.add_argument("--tiny", action="store_true", help="a seconds-long configuration (for tests)")
    p.add_argument("--device", default=None, help=f"cpu or cuda ({d.device})")
    p.add_argument("--pretrain-steps", type=positive_int, default=None, help=f"({d.pretrain_steps})")
    p.add_argument(
        "--extend-steps", type=positive_int, default=None, help=f"steps of each extension ({d.extend_steps})"
    )
    p.add_argument("--layers", type=positive_int, default=None, help=f"({d.layers})")
    p.add_argument("--hidden-size", type=positive_int, default=None, help=f"({d.hidden_size})")
    p.add_argument("--short-len", type=positive_int, default=None, help=f"pre-training context ({d.short_len})")
    p.add_argument("--factor", type=positive_int, default=None, help=f"context extension factor ({d.factor})")
    p.add_argument("--rope", choices=list(ROPE_CHOICES), default=None, help=f"RoPE change of the extension ({d.rope})")
    p.add_argument("--sink", type=int, default=None, help=f"SinkWindow sink of the hybrid and StreamingLLM ({d.sink})")
    p.add_argument("--window", type=positive_int, default=None, help=f"SinkWindow window ({d.window})")
    p.add_argument("--corpus-mb", type=float, default=None, help=f"training text in MB ({d.corpus_mb:g})")
    p.add_argument(
        "--lookup-steps",
        type=int,
        default=None,
        help=f"first phase: steps on short pass-key documents, 0 to skip it ({d.lookup_steps})",
    )
    p.add_argument(
        "--passkey-share",
        type=float,
        default=None,
        help=f"share of pre-training and extension sequences that are pass-key documents ({d.passkey_share:g})",
    )
    p.add_argument(
        "--passkey-prompts", type=positive_int, default=None, help=f"pass-key prompts per length ({d.passkey_prompts})"
    )
    p.add_argument("--seed", type=int, default=None, help=f"({d.seed})")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("patterns", help="show what the sparse attention patterns keep, and run the op on them")
    p.add_argument("--seq-len", type=positive_int, default=32768, help="sequence length to describe (32768)")
    p.add_argument("--kv-heads", type=positive_int, default=8, help="number of KV heads (8)")
    p.add_argument("--group", type=positive_int, default=1, help="query heads per KV head for the run (1)")
    _add_pattern_args(p, choose=False)
    p.add_argument("--run-len", type=positive_int, default=4096, help="tokens in the example run (4096)")
    p.set_defaults(func=_cmd_patterns)

    p = sub.add_parser("convert", help="convert a Hugging Face model folder into a LongGen hybrid")
    p.add_argument("src", help="local Hugging Face model folder (config.json + safetensors)")
    p.add_argument("dst", help="new folder to write")
    p.add_argument(
        "--full-layers",
        type=_full_layers,
        default="middle",
        help="middle (default), bottom, top, interleave, auto (the layers whose attention reaches farthest "
        "beyond the sparse pattern on calibration text), or comma-separated full-layer indices",
    )
    count = p.add_mutually_exclusive_group()
    count.add_argument("--full-fraction", type=float, default=None, help="share of full layers (1/3)")
    count.add_argument("--full-count", type=int, default=None, help="number of full layers (auto only)")
    p.add_argument(
        "--calibration",
        nargs="+",
        default=None,
        metavar="PATH",
        help="auto: text files or folders, as longgen train reads them (default: the Python standard library)",
    )
    p.add_argument(
        "--calibration-length",
        type=positive_int,
        default=None,
        help="auto: tokens per calibration sequence (min(max_position_embeddings, 8192))",
    )
    p.add_argument("--calibration-sequences", type=positive_int, default=None, help="auto: calibration sequences (4)")
    p.add_argument(
        "--placement-score",
        choices=["outside", "loss"],
        default=None,
        help="auto: outside (default: attention probability outside the pattern, one pass a sequence) or loss "
        "(the loss increase when the layer alone is sparse, layers + 1 passes a sequence)",
    )
    p.add_argument("--device", default=None, help="auto: where the model runs (cuda if available, else cpu)")
    _add_pattern_args(p)
    p.add_argument("--target-length", type=positive_int, default=None, help="new maximum context length")
    p.add_argument(
        "--rope",
        choices=["ntk", "yarn", "linear", "none"],
        default=None,
        help="RoPE change for --target-length: ntk (base change), yarn, linear, none",
    )
    p.add_argument("--rope-theta", type=float, default=None, help="explicit RoPE base for --target-length")
    p.add_argument(
        "--drop-sliding-window",
        action="store_true",
        help="remove a sliding window the model has of its own (Mistral) instead of refusing",
    )
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=_cmd_convert)

    from longgen.model.export import EXPORT_FORMATS

    p = sub.add_parser(
        "export",
        help="write a hybrid as a folder stock transformers loads (SinkWindow(0, W) layers -> sliding_attention)",
        description="Export a hybrid whose sparse layers are all SinkWindow(sink=0, window=W) to a Hugging Face folder "
        "with layer_types and sliding_window=W that transformers (and engines reading its format) load without "
        "longgen; weights and tokenizer are copied unchanged. Other hybrids are refused with the reason.",
    )
    p.add_argument("src", help="converted hybrid folder")
    p.add_argument("dst", help="new folder to write")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="transformers", help="output format (transformers)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("inspect", help="show a hybrid's layout and KV-cache size")
    p.add_argument("path", help="converted model folder")
    p.add_argument("--length", type=positive_int, default=None, help="tokens (default: max_position_embeddings)")
    p.add_argument("--bytes-per-value", type=positive_int, default=2, help="bytes per cached value (2: bf16)")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "train",
        help="length-extension training (single process, or FSDP2 under torchrun)",
        description="Train from a TOML/YAML config; overrides look like train.steps=100 data.seq_len=8192. "
        "Multi-GPU: torchrun --nproc_per_node N -m longgen train CONFIG",
    )
    p.add_argument("config", help="config file (.toml or .yaml), see configs/")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (TOML literals)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in train.output_dir from its latest checkpoint (same model, data and seq_len)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an earlier run's checkpoints, metrics and final/ in train.output_dir and start over",
    )
    p.add_argument(
        "--change-steps",
        action="store_true",
        help="with --resume: train.steps is a new total for the run (its learning-rate schedule follows it)",
    )
    p.set_defaults(func=_cmd_train)

    from longgen.eval.cli import add_eval_parser

    add_eval_parser(sub)

    p = sub.add_parser("generate", help="generate text with a hybrid and its compact KV cache (streams to stdout)")
    p.add_argument("path", help="converted model folder (with tokenizer)")
    p.add_argument("--prompt", default=None, help="prompt text")
    p.add_argument("--prompt-file", default=None, help="file with the prompt, or - for stdin")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "serve",
        help="serve a hybrid over an OpenAI-compatible HTTP API (continuous batching)",
        description="OpenAI-compatible server: POST /v1/completions and /v1/chat/completions (streaming with SSE), "
        "GET /v1/models and /health. Needs fastapi and uvicorn: pip install 'longgen[serve]'.",
    )
    p.add_argument("path", help="converted model folder (with tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (8000)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="sequences decoded together at most (8)")
    p.add_argument("--max-len", type=positive_int, default=None, help="prompt + completion tokens (model maximum)")
    p.add_argument(
        "--kv-budget-gb",
        type=float,
        default=None,
        help="KV-cache memory in GB (1e9 bytes) for all rows; fewer rows than --max-batch if it holds fewer "
        "(default: every row fits)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--model-name", default=None, help="model id in the API (the folder's name)")
    p.add_argument(
        "--prefill-chunk",
        type=positive_int,
        default=None,
        help="prefill long prompts in slices of this many tokens between the other rows' decode steps, so their "
        "streams keep flowing (default: whole prompts at once)",
    )
    p.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, TypeError, FileExistsError, OSError) as e:
        print(f"longgen {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"longgen {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
