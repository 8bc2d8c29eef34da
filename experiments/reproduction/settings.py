"""Settings of the reproduction: sizes, options, the GPU and --tiny presets, and the time plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TRAINED = ("full", "hybrid_sinkwindow", "hybrid_blocksparse", "all_sparse", "hybrid_bottom")
VARIANTS = (*TRAINED, "streaming_llm")
LABELS = {
    "full": "1. full attention",
    "hybrid_sinkwindow": "2. LongGen hybrid, SinkWindow",
    "hybrid_blocksparse": "3. LongGen hybrid, BlockSparse",
    "all_sparse": "4. all layers sparse",
    "hybrid_bottom": "5. full layers at the bottom",
    "streaming_llm": "6. StreamingLLM on model 1",
}
TASKS = ("passkey", "niah", "ppl")  # evaluation order: retrieval first, what the comparison needs most


def _help(text: str) -> Any:
    return {"help": text}


@dataclass(frozen=True)
class Settings:
    """Everything that decides the experiment's results (each is a --field-name option of reproduce.py)."""

    work_dir: str = field(default="experiments/work", metadata=_help("checkpoints, data, evaluation records"))
    out_dir: str = field(default="experiments/results", metadata=_help("report: JSON, markdown table, plots"))
    device: str = field(default="auto", metadata=_help("auto | cuda | cpu"))
    seed: int = 0
    # corpus
    sources: str = field(default="site", metadata=_help("site: standard library + site-packages; stdlib: only it"))
    corpus_mb: float = field(default=200.0, metadata=_help("training text taken from the sources"))
    tokenizer_mb: float = field(default=16.0, metadata=_help("text the BPE tokenizer is trained on"))
    vocab_size: int = 16384
    heldout_docs: int = field(default=8, metadata=_help("long documents kept out of training (ppl, haystack)"))
    retrieval_share_pretrain: float = field(default=0.2, metadata=_help("share of synthetic retrieval tokens"))
    retrieval_share_extend: float = 0.3
    facts_per_1k: float = field(default=4.0, metadata=_help("needle/question pairs per 1K synthetic tokens"))
    # model
    hidden_size: int = 768
    layers: int = 12
    heads: int = 12
    kv_heads: int = 4
    intermediate_size: int = 2048
    short_len: int = field(default=1024, metadata=_help("pre-training context"))
    long_len: int = field(default=8192, metadata=_help("extended context"))
    rope: str = field(default="ntk", metadata=_help("RoPE change for the extension: ntk | yarn | linear | none"))
    # sparse patterns; StreamingLLM uses the SinkWindow ones, so its layers keep what the hybrid's sparse ones keep
    sink: int = 64
    window: int = 1024
    block_size: int = 64
    local_blocks: int = 16
    # training
    batch_tokens: int = field(default=65536, metadata=_help("tokens per optimizer step (all training)"))
    micro_batch_tokens: int = field(default=32768, metadata=_help("tokens per forward/backward pass"))
    pretrain_steps: int = field(default=0, metadata=_help("0: from --budget-minutes"))
    extend_steps: int = field(default=0, metadata=_help("0: from --budget-minutes"))
    pretrain_lr: float = 1e-3
    extend_lr: float = 3e-4
    activation_checkpointing: bool = False
    compile: bool = False
    checkpoints_per_run: int = field(default=0, metadata=_help("0: one a minute of planned training"))
    # the time plan (`plan`): training steps follow from these unless given
    budget_minutes: float = field(default=22.0, metadata=_help("planned wall time of all stages together"))
    assume_pretrain_tps: float = field(default=200_000, metadata=_help("tokens/s at --short-len (H100, bf16)"))
    assume_extend_tps: float = field(default=120_000, metadata=_help("tokens/s at --long-len, full attention"))
    assume_prompt_s: float = field(default=0.3, metadata=_help("seconds per retrieval prompt in evaluation"))
    # evaluation
    eval_lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    eval_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    eval_samples: int = field(default=2, metadata=_help("prompts per (length, depth) cell and task"))
    ppl_docs: int = 4
    ppl_bucket: int = 256
    variants: tuple[str, ...] = VARIANTS
    # what the paper leads us to expect
    tolerance: float = field(default=0.02, metadata=_help("'within 2 points' of full attention"))
    far_below: float = field(default=0.25, metadata=_help("'far below' full attention at long range"))

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"--variants must name some of {', '.join(VARIANTS)}; got {list(self.variants)}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"--device must be auto, cuda or cpu, got {self.device!r}")
        if self.sources not in ("site", "stdlib"):
            raise ValueError(f"--sources must be site or stdlib, got {self.sources!r}")
        if self.long_len < self.short_len:
            raise ValueError(f"--long-len ({self.long_len}) must be >= --short-len ({self.short_len})")
        if self.hidden_size % self.heads or self.heads % self.kv_heads:
            raise ValueError("--hidden-size must be a multiple of --heads, and --heads a multiple of --kv-heads")
        for name in ("retrieval_share_pretrain", "retrieval_share_extend"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must lie in [0, 1)")
        if not self.eval_lengths or not self.eval_depths or any(not 0 <= d <= 1 for d in self.eval_depths):
            raise ValueError("--eval-lengths needs a length and --eval-depths depths in [0, 1]")
        if self.checkpoints_per_run < 0 or self.eval_samples < 1 or self.ppl_docs < 1:
            raise ValueError("--checkpoints-per-run must be >= 0, --eval-samples and --ppl-docs >= 1")

    @property
    def trained(self) -> list[str]:
        """Variants that need an extension run (StreamingLLM evaluates model 1, `full`)."""
        wanted = set(self.variants) | ({"full"} if "streaming_llm" in self.variants else set())
        return [v for v in TRAINED if v in wanted]

    @property
    def ppl_lengths(self) -> list[int]:
        return sorted({self.short_len, self.long_len, *self.eval_lengths})


DEFAULT = Settings()
TINY = Settings(
    device="cpu",
    sources="stdlib",
    corpus_mb=0.25,
    tokenizer_mb=0.25,
    vocab_size=384,
    heldout_docs=2,
    hidden_size=64,
    layers=3,
    heads=4,
    kv_heads=2,
    intermediate_size=128,
    short_len=64,
    long_len=256,
    sink=4,
    window=32,
    block_size=16,
    local_blocks=2,
    batch_tokens=512,
    micro_batch_tokens=512,
    checkpoints_per_run=2,
    pretrain_steps=12,
    extend_steps=4,
    pretrain_lr=3e-3,
    extend_lr=1e-3,
    eval_lengths=(192, 512),
    eval_depths=(0.0, 1.0),
    eval_samples=1,
    ppl_docs=1,
    ppl_bucket=64,
)


def batch_shape(s: Settings, seq_len: int) -> tuple[int, int]:
    """(sequences per micro-batch, micro-batches per optimizer step) for `seq_len`-token sequences."""
    micro = max(1, s.micro_batch_tokens // seq_len)
    return micro, max(1, s.batch_tokens // (micro * seq_len))


def plan(s: Settings) -> dict[str, Any]:
    """Training steps and the planned seconds of each stage, from --budget-minutes and the assumptions.

    Fixed costs are estimated first (preparation, evaluation, loading and exporting per training run); the rest
    of the budget is split evenly between pre-training and the extensions, which all get the same steps (the
    same token budget). Explicit --pretrain-steps / --extend-steps win over the plan.
    """
    n_trained = len(s.trained)
    prepare_s = 40 + 0.3 * s.corpus_mb  # walk, read, tokenizer training, tokenization (~16 cores)
    prompts = 2 * len(s.eval_lengths) * len(s.eval_depths) * s.eval_samples  # pass key + needle
    eval_s = len(s.variants) * (prompts * s.assume_prompt_s + 15)  # + loading, perplexity, plots
    overhead_s = 20 * (1 + n_trained)  # per training run: load, data cache, checkpoints, export
    train_s = s.budget_minutes * 60 - prepare_s - eval_s - overhead_s
    pre_bs, pre_acc = batch_shape(s, s.short_len)
    ext_bs, ext_acc = batch_shape(s, s.long_len)
    pre_tokens = pre_bs * pre_acc * s.short_len
    ext_tokens = ext_bs * ext_acc * s.long_len
    pretrain_steps, extend_steps = s.pretrain_steps, s.extend_steps
    if not (pretrain_steps and extend_steps) and train_s <= 0:
        raise ValueError(
            f"--budget-minutes {s.budget_minutes:g} leaves no time for training after preparation "
            f"(~{prepare_s:.0f} s) and evaluation (~{eval_s:.0f} s); raise it, or give --pretrain-steps and "
            "--extend-steps"
        )
    if not pretrain_steps:
        pretrain_steps = max(1, int(0.5 * train_s * s.assume_pretrain_tps / pre_tokens))
    if not extend_steps:
        extend_steps = max(1, int(0.5 * train_s / max(1, n_trained) * s.assume_extend_tps / ext_tokens))
    pretrain_s = pretrain_steps * pre_tokens / s.assume_pretrain_tps
    extend_s = extend_steps * ext_tokens / s.assume_extend_tps

    def save_every(steps: int, step_s: float) -> int:  # a call cut off at its deadline loses at most this much
        return max(1, steps // s.checkpoints_per_run if s.checkpoints_per_run else int(60 / step_s))

    return {
        "pretrain_steps": pretrain_steps,
        "extend_steps": extend_steps,
        "pretrain": {
            "batch_size": pre_bs,
            "grad_accum": pre_acc,
            "tokens_per_step": pre_tokens,
            "save_every": save_every(pretrain_steps, pre_tokens / s.assume_pretrain_tps),
        },
        "extend": {
            "batch_size": ext_bs,
            "grad_accum": ext_acc,
            "tokens_per_step": ext_tokens,
            "save_every": save_every(extend_steps, ext_tokens / s.assume_extend_tps),
        },
        "pretrain_tokens": pretrain_steps * pre_tokens,
        "extend_tokens_per_variant": extend_steps * ext_tokens,
        "eval_prompts_per_variant": prompts,
        "seconds": {
            "prepare": prepare_s,
            "pretrain": pretrain_s + 20,
            "extend_each": extend_s + 20,
            "eval_each": eval_s / len(s.variants),
            "total": prepare_s + pretrain_s + n_trained * extend_s + eval_s + overhead_s,
        },
        "assumptions": {
            "pretrain_tokens_per_s": s.assume_pretrain_tps,
            "extend_tokens_per_s": s.assume_extend_tps,
            "seconds_per_eval_prompt": s.assume_prompt_s,
            "seconds_per_variant_eval_besides_prompts": 15,
            "prepare_s": "40 + 0.3 per MB of corpus",
            "seconds_per_training_run_besides_steps": 20,
        },
    }
