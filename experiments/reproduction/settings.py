"""Settings of the reproduction: sizes, options, the GPU and --tiny presets, the variants, and the time plan."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

MAIN = ("full", "hybrid_sinkwindow", "hybrid_blocksparse", "all_sparse", "streaming_llm")
BLOCKSPARSE = ("hybrid_blocksparse", "hybrid_blocksparse_sink")  # the variants whose sparse layers are BlockSparse
FRONTIER_FRACTIONS = (0.0, 1 / 6, 1 / 4, 1 / 3, 1 / 2)


PLACEMENTS = ("middle", "auto")  # how the frontier's full layers are chosen


def frontier_name(fraction: float, placement: str = "middle") -> str:
    """``frontier_<fraction>`` (full layers in the middle) or ``frontier_auto_<fraction>`` (chosen by
    `longgen.convert(full_layers="auto")`): the SinkWindow hybrid with this share of full layers."""
    return f"frontier_{'' if placement == 'middle' else placement + '_'}{fraction:.3g}"


# (name, placement, fraction) of every point of the sweep
FRONTIER_POINTS = tuple((frontier_name(f, p), p, f) for p in PLACEMENTS for f in FRONTIER_FRACTIONS)
# with no full layer both are all_sparse; at 1/3 they are the main hybrids: the same models, evaluated once
FRONTIER_ALIASES = {
    frontier_name(0.0): "all_sparse",
    frontier_name(1 / 3): "hybrid_sinkwindow",
    frontier_name(0.0, "auto"): "all_sparse",
    frontier_name(1 / 3, "auto"): "hybrid_auto",
}
VARIANTS = (
    *MAIN, "hybrid_bottom", "hybrid_nosink", "hybrid_auto", "hybrid_auto_loss", "hybrid_interleave",
    "hybrid_blocksparse_sink",
    *(name for name, _, _ in FRONTIER_POINTS if name not in FRONTIER_ALIASES),
)  # fmt: skip
LABELS = {
    "full": "1. full attention",
    "hybrid_sinkwindow": "2. LongGen hybrid, SinkWindow",
    "hybrid_blocksparse": "3. LongGen hybrid, BlockSparse",
    "all_sparse": "4. all layers sparse",
    "streaming_llm": "5. StreamingLLM on model 1",
    "hybrid_bottom": "6. full layers at the bottom",
    "hybrid_nosink": "7. SinkWindow hybrid without sink tokens",
    "hybrid_auto": "8. SinkWindow hybrid, full layers chosen by calibration",
    "hybrid_auto_loss": "9. SinkWindow hybrid, full layers chosen by calibration (loss score)",
    "hybrid_interleave": "10. SinkWindow hybrid, full layers interleaved",
    "hybrid_blocksparse_sink": "11. BlockSparse hybrid with a sink block",
    **{name: f"SinkWindow hybrid, {frac:.0%} full ({p})" for name, p, frac in FRONTIER_POINTS},
}
# the settings only the sparse patterns read (and StreamingLLM at inference): full attention's model and answers do
# not depend on them, so runs that differ only in these share full attention (`reproduce.py compare`), and a variant
# that reads none of those that differ (`pattern_settings_read`) is one model in both (`merge`, `replicas`)
PATTERN_SETTINGS = frozenset({"sink", "window", "block_size", "local_blocks"})


def pattern_settings_read(variant: str) -> frozenset[str]:
    """The `PATTERN_SETTINGS` that `variant`'s model and answers depend on: none for full attention; the block size
    and local blocks for the BlockSparse hybrids; the window, and but for `hybrid_nosink` the sink, for the others,
    whose sparse layers are SinkWindow (StreamingLLM: at inference on full attention's model). A test checks this
    against the stage keys."""
    if variant == "full":
        return frozenset()
    if variant in BLOCKSPARSE:
        return frozenset({"block_size", "local_blocks"})
    return frozenset({"window"} if variant == "hybrid_nosink" else {"sink", "window"})


def local_window(settings: dict[str, Any], variant: str) -> int | None:
    """The tokens just before a query that every head of `variant`'s sparse layers sees (a saved run's `settings`):
    SinkWindow's --window, BlockSparse's --block-size x --local-blocks; None for full attention, which has no sparse
    layer. Beyond it a sparse layer sees only its sink tokens (SinkWindow) or a KV head's strided blocks."""
    if variant == "full":
        return None
    if variant in BLOCKSPARSE:
        return settings["block_size"] * settings["local_blocks"]
    return settings["window"]


# longgen.train.synthetic's CHAIN_MAX, the recorded runs' longest variable chain, its RETRIEVAL_KINDS, the kinds of
# fact of the recorded runs, and its FACT_KINDS, every kind (not imported: it would load torch; a test compares them)
CHAIN_MAX = 4
RETRIEVAL_KINDS = ("passkey", "niah", "variable_tracking")
FACT_KINDS = (*RETRIEVAL_KINDS, "record")
TRAINED_TASKS = ("passkey", "niah", "niah_multikey", "variable_tracking")
HELD_OUT_TASK = "parcel_weight"  # a fact in a template the training data never contains
TASKS = (*TRAINED_TASKS, HELD_OUT_TASK)


def trained_for(variants: Sequence[str]) -> list[str]:
    """The extension runs that evaluating `variants` needs, in VARIANTS order: StreamingLLM is model 1 (`full`)
    with StreamingLLM at inference, so it needs `full` and no run of its own."""
    wanted = set(variants) | ({"full"} if "streaming_llm" in variants else set())
    return [v for v in VARIANTS if v in wanted and v != "streaming_llm"]


def _help(text: str) -> Any:
    return {"help": text}


@dataclass(frozen=True)
class Settings:
    """Everything that decides the experiment's results (each is a --field-name option of reproduce.py)."""

    work_dir: str = field(default="experiments/work", metadata=_help("checkpoints, data, evaluation records"))
    out_dir: str = field(default="experiments/results", metadata=_help("report: JSON, markdown, plots"))
    device: str = field(default="auto", metadata=_help("auto | cuda | cpu"))
    seed: int = 0
    # corpus
    sources: str = field(default="site", metadata=_help("site: standard library + site-packages; stdlib: only it"))
    corpus_mb: float = field(default=120.0, metadata=_help("training text taken from the sources"))
    tokenizer_mb: float = field(default=16.0, metadata=_help("text the BPE tokenizer is trained on"))
    vocab_size: int = 16384
    heldout_docs: int = field(default=8, metadata=_help("long documents kept out of training (ppl, haystack)"))
    retrieval_share_pretrain: float = field(default=0.3, metadata=_help("share of synthetic retrieval tokens"))
    retrieval_share_extend: float = 0.5
    extend_retrieval_min: float = field(
        default=0.875, metadata=_help("shortest synthetic retrieval document of the extension, a share of --long-len")
    )
    extend_far_share: float = field(
        default=0.25,
        metadata=_help("share of the extension's synthetic facts stated in the first eighth, asked at the end"),
    )
    extend_near_share: float = field(
        default=0.0,
        metadata=_help(
            "share of the extension's synthetic facts stated wholly within the 1/32 of the document "
            "just before their question"
        ),
    )
    extend_chain_max: int = field(
        default=CHAIN_MAX,
        metadata=_help("names in the longest variable chain of the extension's synthetic documents (>= 2)"),
    )
    whole_docs: bool = field(default=True, metadata=_help("packing never cuts a document of retrieval length"))
    facts_per_1k: float = field(default=3.0, metadata=_help("facts stated and asked per 1K synthetic tokens"))
    fact_kinds: tuple[str, ...] = field(
        default=RETRIEVAL_KINDS,
        metadata=_help(
            f"kinds of synthetic fact, some of {', '.join(FACT_KINDS)} (record: a number in many wordings, none of "
            "the held-out task's)"
        ),
    )
    # model
    hidden_size: int = 512
    layers: int = 12
    heads: int = 8
    kv_heads: int = 4
    intermediate_size: int = 1536
    short_len: int = field(default=2048, metadata=_help("pre-training context"))
    long_len: int = field(default=32768, metadata=_help("extended context"))
    rope: str = field(
        default="yarn", metadata=_help("RoPE change of the extension: yarn | ntk | linear | none (why: results/RUN.md)")
    )
    # sparse patterns; StreamingLLM uses the SinkWindow ones, so its layers keep what the hybrid's sparse ones keep
    sink: int = 64
    window: int = 1024
    block_size: int = 64
    local_blocks: int = 16
    # training
    batch_tokens: int = field(default=65536, metadata=_help("tokens per optimizer step (all training)"))
    micro_batch_tokens: int = field(default=65536, metadata=_help("tokens per forward/backward pass"))
    pretrain_steps: int = field(default=1636, metadata=_help("pre-training steps (0: from --budget-minutes)"))
    extend_steps: int = field(
        default=1118, metadata=_help("extension steps, the same for every variant (0: from --budget-minutes)")
    )
    pretrain_lr: float = 1e-3
    extend_lr: float = 4e-4
    extend_replica: int = field(
        default=0, metadata=_help("another extension run: data order and seed --seed + N (0: the recorded run's)")
    )
    activation_checkpointing: bool = False
    compile: bool = field(default=True, metadata=_help("torch.compile each decoder layer (on a CPU: slow to start)"))
    checkpoints_per_run: int = field(default=0, metadata=_help("0: one a minute of planned training"))
    # the time plan (`plan`): the planned minutes, and the steps where --pretrain-steps / --extend-steps are 0
    budget_minutes: float = field(
        default=20.5, metadata=_help("with steps 0: the main comparison's wall time they are planned to fill")
    )
    assume_pretrain_tps: float = field(
        default=0, metadata=_help("tokens/s at --short-len (0: the H100's, 550K compiled, 320K not)")
    )
    assume_extend_tps: float = field(
        default=0, metadata=_help("tokens/s at --long-len, full attention (0: the H100's, 250K compiled, 200K not)")
    )
    assume_eval_tps: float = field(
        default=700_000, metadata=_help("prompt tokens/s in evaluation, full attention (H100: 730K)")
    )
    # evaluation
    eval_lengths: tuple[int, ...] = (2048, 4096, 8192, 16384, 32768)
    prompts_per_task: int = field(default=80, metadata=_help("prompts per (task, length); needle depths evenly spaced"))
    answer_room: int = field(default=32, metadata=_help("a length-n prompt is n minus this many tokens"))
    ppl_docs: int = 4
    ppl_bucket: int = 1024
    variants: tuple[str, ...] = MAIN
    # the targets
    retrieval_target: float = field(default=0.95, metadata=_help("full attention on passkey and niah"))
    tolerance: float = field(default=0.02, metadata=_help("a hybrid's paired difference vs full: at least -this"))
    ci_tolerance: float = field(default=0.05, metadata=_help("... and its interval's lower end at least -this"))
    far_below: float = field(default=0.25, metadata=_help("'far below' full attention at >= 8K"))

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
        if not 0 <= self.extend_far_share <= 1:
            raise ValueError(f"--extend-far-share must lie in [0, 1], got {self.extend_far_share}")
        if not 0 <= self.extend_near_share <= 1 - self.extend_far_share:
            raise ValueError(
                f"--extend-near-share must lie in [0, 1 - --extend-far-share] (shares of the same facts), "
                f"got {self.extend_near_share} with --extend-far-share {self.extend_far_share}"
            )
        if not 0 < self.extend_retrieval_min <= 1:
            raise ValueError(f"--extend-retrieval-min must lie in (0, 1], got {self.extend_retrieval_min}")
        kinds = self.fact_kinds
        if not kinds or set(kinds) - set(FACT_KINDS) or len(set(kinds)) < len(kinds):
            raise ValueError(f"--fact-kinds must name some of {', '.join(FACT_KINDS)}, each once; got "
                             f"{','.join(kinds) or 'none'}")  # fmt: skip
        if self.extend_chain_max < 2:
            raise ValueError(f"--extend-chain-max must be >= 2 (a value and one name), got {self.extend_chain_max}")
        for name in ("retrieval_share_pretrain", "retrieval_share_extend"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must lie in [0, 1)")
        if not self.eval_lengths or any(n <= self.answer_room for n in self.eval_lengths):
            raise ValueError(f"--eval-lengths must be longer than --answer-room ({self.answer_room})")
        if max(self.eval_lengths) > self.long_len:
            raise ValueError(f"--eval-lengths must be at most --long-len ({self.long_len}): prompts are not truncated")
        if self.assume_pretrain_tps < 0 or self.assume_extend_tps < 0 or self.assume_eval_tps <= 0:
            raise ValueError("--assume-pretrain-tps and --assume-extend-tps must be >= 0 (0: the H100's), "
                             "--assume-eval-tps > 0")  # fmt: skip
        if self.extend_replica < 0:
            raise ValueError(f"--extend-replica must be >= 0 (0: the recorded extension), got {self.extend_replica}")
        if self.prompts_per_task < 2 or self.ppl_docs < 1 or self.checkpoints_per_run < 0:
            raise ValueError("--prompts-per-task must be >= 2, --ppl-docs >= 1, --checkpoints-per-run >= 0")

    @property
    def trained(self) -> list[str]:
        """Variants that need an extension run (StreamingLLM evaluates model 1, `full`)."""
        return trained_for(self.variants)

    @property
    def ppl_lengths(self) -> list[int]:
        return sorted({self.short_len, self.long_len, *self.eval_lengths})


DEFAULT = Settings()
TINY = Settings(
    device="cpu",
    sources="stdlib",
    corpus_mb=0.25,
    tokenizer_mb=0.25,
    vocab_size=1024,
    heldout_docs=2,
    hidden_size=64,
    layers=6,
    heads=4,
    kv_heads=2,
    intermediate_size=128,
    short_len=64,
    long_len=512,
    sink=4,
    window=32,
    block_size=16,
    local_blocks=2,
    batch_tokens=1024,
    micro_batch_tokens=1024,
    checkpoints_per_run=2,
    compile=False,
    pretrain_steps=6,
    extend_steps=2,
    pretrain_lr=3e-3,
    extend_lr=1e-3,
    eval_lengths=(320, 512),
    prompts_per_task=3,
    answer_room=16,
    ppl_docs=1,
    ppl_bucket=64,
)


def train_seed(s: Settings, stage: str) -> int:
    """The seed of a training run's data order and randomness: --seed, plus --extend-replica for an extension."""
    return s.seed + (s.extend_replica if stage == "extend" else 0)


def batch_shape(s: Settings, seq_len: int) -> tuple[int, int]:
    """(sequences per micro-batch, micro-batches per optimizer step) for `seq_len`-token sequences."""
    micro = max(1, s.micro_batch_tokens // seq_len)
    return micro, max(1, s.batch_tokens // (micro * seq_len))


MAIN_TRAINED = ("full", "hybrid_sinkwindow", "hybrid_blocksparse", "all_sparse")
SPARSE_EVAL = 0.75  # a sparse variant's evaluation time, a share of full attention's (H100: 15-20 s against 21-24 s)
RUN_OVERHEAD_S = 15  # seconds a training run spends besides its steps: load, data cache, checkpoints, export


@dataclass(frozen=True)
class Speed:
    """The time plan's throughput for the model of `MEASURED_SHAPE` on one H100 (bf16), eager or with compiled
    layers."""

    pretrain_tps: float  # tokens/s at 2K
    extend_tps: float  # tokens/s at 32K, full attention
    not_attention: float  # the share of a full-attention extension step that is not attention


H100 = {  # by --compile; fitted to the runs of 2026-12-06 (results/RUN.md and archive/2026-12-06-fifth-recipe)
    False: Speed(pretrain_tps=320_000, extend_tps=200_000, not_attention=0.62),
    True: Speed(pretrain_tps=550_000, extend_tps=250_000, not_attention=0.47),
}
MEASURED_SHAPE = {  # the model and lengths those speeds were measured with
    "hidden_size": 512, "layers": 12, "heads": 8, "kv_heads": 4, "intermediate_size": 1536, "vocab_size": 16384,
    "short_len": 2048, "long_len": 32768,
}  # fmt: skip


def _weight_macs(m: dict[str, int]) -> float:
    """Multiply-adds per token of the weight matrices (attention projections, MLP, output layer)."""
    d, kv = m["hidden_size"], m["hidden_size"] // m["heads"] * m["kv_heads"]
    return m["layers"] * (2 * d * d + 2 * d * kv + 3 * d * m["intermediate_size"]) + d * m["vocab_size"]


def _attention_macs(m: dict[str, int], n: int) -> float:
    """Multiply-adds per token of causal attention over `n` tokens in every layer (n / 2 keys on average, two
    products: scores and values)."""
    return m["layers"] * m["hidden_size"] * n


@dataclass(frozen=True)
class ShapeCost:
    """Per-token time of this model relative to `MEASURED_SHAPE`'s, from multiply-adds: what scales the assumed
    throughput when the model or the lengths differ (not where --assume-*-tps gives the throughput)."""

    pretrain: float  # a pre-training token at --short-len
    extend: float  # a full-attention extension token at --long-len
    not_attention: float  # the share of a full-attention extension step that is not attention, for this shape


def shape_cost(s: Settings) -> ShapeCost:
    """`ShapeCost` of the settings' model and lengths (1, 1 and the H100's share for `MEASURED_SHAPE`)."""
    m = {k: getattr(s, k) for k in MEASURED_SHAPE}
    ref = MEASURED_SHAPE
    pretrain = (_weight_macs(m) + _attention_macs(m, s.short_len)) / (
        _weight_macs(ref) + _attention_macs(ref, ref["short_len"])
    )
    other = H100[s.compile].not_attention * _weight_macs(m) / _weight_macs(ref)
    attention = (
        (1 - H100[s.compile].not_attention) * _attention_macs(m, s.long_len) / _attention_macs(ref, ref["long_len"])
    )
    return ShapeCost(pretrain=pretrain, extend=other + attention, not_attention=other / (other + attention))


def assumed_tps(s: Settings) -> tuple[float, float]:
    """(pre-training, full attention's extension) tokens/s of the plan: --assume-*-tps where given, else the H100's
    for `MEASURED_SHAPE` scaled by `shape_cost`."""
    speed, cost = H100[s.compile], shape_cost(s)
    return s.assume_pretrain_tps or speed.pretrain_tps / cost.pretrain, s.assume_extend_tps or (
        speed.extend_tps / cost.extend
    )


def _capped_sum(n: int, cap: int) -> int:
    """sum(min(k, cap) for k in 1..n)."""
    if n <= 0:
        return 0
    m = min(n, cap)
    return m * (m + 1) // 2 + (n - m) * cap


def kept_share(s: Settings, variant: str) -> float:
    """Share of causal attention's (query, key) pairs at --long-len that a sparse layer of `variant` computes.
    SinkWindow (every sparse variant but the BlockSparse hybrid; `hybrid_nosink` without sink tokens): a query's
    last --window keys and the first --sink. BlockSparse, counted in blocks: a query block's --local-blocks last
    blocks and every stride-th of the others (stride: the KV heads, at most 64, as `longgen.patterns` resolves it);
    with a sink block (`hybrid_blocksparse_sink`) also the first block, for the heads whose strided blocks miss it."""
    n = s.long_len
    if variant in BLOCKSPARSE:
        blocks, stride = -(-n // s.block_size), min(s.kv_heads, 64)
        step = max(1, stride // s.kv_heads)
        far = max(0, blocks - s.local_blocks)
        kept = _capped_sum(blocks, s.local_blocks) + far * (far + 1) / 2 / stride
        if variant == "hybrid_blocksparse_sink":
            missing = sum((g * step) % stride != 0 for g in range(s.kv_heads)) / s.kv_heads
            kept += far * missing
        return kept / (blocks * (blocks + 1) / 2)
    sink = 0 if variant == "hybrid_nosink" else s.sink
    return (_capped_sum(n, s.window) + _capped_sum(n - s.window, sink)) / (n * (n + 1) / 2)


# time per kept pair relative to full attention's, fitted to the compiled H100 runs at 32K (commit 3485a18):
# SinkWindow(64, 1024) took 7% of full attention's attention time for 6.5% of its pairs, BlockSparse(64, 16 local
# blocks, stride 4) 35% for 29.6% (its per-block bookkeeping). A `BlockLayout` (`hybrid_blocksparse_sink`) runs on
# the Triton kernels: its extension (commit d33db79) ran at 212.6K tokens/s against the main run's full attention
# at 254.2K, so its sparse layers took 155% of full attention's attention time for 29.9% of the pairs
PAIR_COST = {"sinkwindow": 0.07 / 0.065303, "blocksparse": 0.35 / 0.296098, "blocklayout": 1.5538 / 0.298931}


def extend_cost(s: Settings, variant: str) -> float:
    """Planned seconds of one extension step relative to full attention's: what is not attention costs the same,
    and a sparse layer's attention costs its `kept_share` of full attention's pairs at `PAIR_COST` (so 7% for
    SinkWindow(64, 1024) and 35% for BlockSparse(64, 16) at 32K). Fitted to the H100 runs' extensions at 32K.
    Compiled layers (commit 3485a18), 47% not attention: full attention 254K tokens/s; SinkWindow hybrid 375K
    (predicted 379K), BlockSparse hybrid 336K (330K), all sparse 498K (501K). Eager (the fifth recipe's runs), 62%:
    full attention 200K; SinkWindow hybrids with 0, 1/6, 1/4, 1/3, 1/2 of the layers full 307K, 289K, 277K, 260K,
    248K (predicted 309K, 283K, 272K, 262K, 243K); BlockSparse 238K (240K). For another model or length the
    not-attention share is `shape_cost`'s, and a narrower model runs slower than planned
    (results/probes/2026-12-07-deeper-model). `hybrid_blocksparse_sink`, a `BlockLayout` on the Triton kernels,
    is planned at its own measured time per pair (212.6K tokens/s, slower than full attention; nothing caps it at
    a full layer's time as for the Hopper kernels); a guide."""
    third = {v: 1 / 3 for v in ("hybrid_sinkwindow", "hybrid_blocksparse", "hybrid_bottom", "hybrid_nosink",
                                "hybrid_auto", "hybrid_auto_loss", "hybrid_interleave",
                                "hybrid_blocksparse_sink")}  # fmt: skip
    fractions = {"full": 1.0, "all_sparse": 0.0, **third, **{name: f for name, _, f in FRONTIER_POINTS}}
    full = round(s.layers * fractions[variant]) / s.layers
    if variant == "hybrid_blocksparse_sink":
        sparse_keep = PAIR_COST["blocklayout"] * kept_share(s, variant)
    else:  # the Hopper kernels: a sparse layer that keeps nearly every pair costs a full one
        kind = "blocksparse" if variant in BLOCKSPARSE else "sinkwindow"
        sparse_keep = min(1.0, PAIR_COST[kind] * kept_share(s, variant))
    other = shape_cost(s).not_attention
    return other + (1 - other) * (full + (1 - full) * sparse_keep)


def plan(s: Settings) -> dict[str, Any]:
    """Training steps and the planned seconds of each stage at the assumed throughput.

    The steps are the recipe's (--pretrain-steps, --extend-steps); where one is 0 it is derived from
    --budget-minutes, the wall time of the main comparison (full, both hybrids, all sparse, StreamingLLM): fixed
    costs are estimated first (preparation, evaluation, loading and exporting per training run), the rest is split
    between pre-training (40%) and the four extensions, which all get the same steps (the same token budget).
    Other variants (bottom placement, the frontier) reuse the pre-trained model and the same step count.
    """
    prepare_s = 30 + 0.35 * s.corpus_mb  # walk, read, tokenizer training, tokenization (~16 cores)
    prompt_tokens = len(TASKS) * s.prompts_per_task * sum(s.eval_lengths)
    eval_full_s = prompt_tokens / s.assume_eval_tps + 8  # + loading, perplexity
    main_eval_s = sum(eval_full_s * (1.0 if v == "full" else SPARSE_EVAL) for v in MAIN)
    overhead_s = RUN_OVERHEAD_S * (1 + len(MAIN_TRAINED))
    train_s = s.budget_minutes * 60 - prepare_s - main_eval_s - overhead_s
    pre_bs, pre_acc = batch_shape(s, s.short_len)
    ext_bs, ext_acc = batch_shape(s, s.long_len)
    pre_tokens = pre_bs * pre_acc * s.short_len
    ext_tokens = ext_bs * ext_acc * s.long_len
    pretrain_steps, extend_steps = s.pretrain_steps, s.extend_steps
    if not (pretrain_steps and extend_steps) and train_s <= 0:
        raise ValueError(
            f"--budget-minutes {s.budget_minutes:g} leaves no time for training after preparation "
            f"(~{prepare_s:.0f} s) and evaluation (~{main_eval_s:.0f} s); raise it, or give --pretrain-steps and "
            "--extend-steps"
        )
    ext_units = sum(extend_cost(s, v) for v in MAIN_TRAINED)  # in full-attention extension steps
    pre_tps, ext_tps = assumed_tps(s)
    if not pretrain_steps:
        pretrain_steps = max(1, int(0.4 * train_s * pre_tps / pre_tokens))
    if not extend_steps:
        extend_steps = max(1, int(0.6 * train_s / ext_units * ext_tps / ext_tokens))
    pretrain_s = pretrain_steps * pre_tokens / pre_tps
    full_step_s = ext_tokens / ext_tps

    def save_every(steps: int, step_s: float) -> int:  # a call cut off at its deadline loses at most this much
        return max(1, steps // s.checkpoints_per_run if s.checkpoints_per_run else int(60 / step_s))

    pretrain_total = pretrain_s + RUN_OVERHEAD_S
    extend_each = {
        v: extend_steps * full_step_s * extend_cost(s, v) + RUN_OVERHEAD_S for v in VARIANTS if v != "streaming_llm"
    }
    return {
        "pretrain_steps": pretrain_steps,
        "extend_steps": extend_steps,
        "pretrain": {
            "batch_size": pre_bs,
            "grad_accum": pre_acc,
            "tokens_per_step": pre_tokens,
            "save_every": save_every(pretrain_steps, pre_tokens / pre_tps),
        },
        "extend": {
            "batch_size": ext_bs,
            "grad_accum": ext_acc,
            "tokens_per_step": ext_tokens,
            "save_every": save_every(extend_steps, full_step_s),
        },
        "pretrain_tokens": pretrain_steps * pre_tokens,
        "extend_tokens_per_variant": extend_steps * ext_tokens,
        "eval_prompts_per_variant": len(TASKS) * s.prompts_per_task * len(s.eval_lengths),
        "seconds": {
            "prepare": prepare_s,
            "pretrain": pretrain_total,
            "extend": extend_each,
            "eval_full": eval_full_s,
            "eval_sparse": eval_full_s * SPARSE_EVAL,
            "main_total": prepare_s + pretrain_total + sum(extend_each[v] for v in MAIN_TRAINED) + main_eval_s,
        },
        "assumptions": {
            "pretrain_tokens_per_s": pre_tps,
            "extend_tokens_per_s_full": ext_tps,
            "eval_prompt_tokens_per_s_full": s.assume_eval_tps,
            "per_token_time_vs_measured_shape": asdict(shape_cost(s)),
            "prepare_s": "30 + 0.35 per MB of corpus",
            "seconds_per_training_run_besides_steps": RUN_OVERHEAD_S,
        },
    }
