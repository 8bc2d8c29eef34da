"""The serving runner: a Llama-family hybrid with compact caches for a fixed set of rows, fast prefill, and a
static decode step captured in a CUDA graph.

`ModelRunner` owns one `CompactKV` per layer for `max_batch` rows of up to `max_len` tokens and drives the
model's own modules (embedding, decoder layers, norm, head) itself, so nothing on the host depends on tensor
values during a decode step:

* `prefill(row, ids)`: the prompt goes through the model layer by layer. Attention runs over the whole prompt with
  the sparse kernels (Full layers: PyTorch SDPA); the MLP runs in token chunks of `mlp_chunk`; logits are computed
  for the last token only. With `prefill_chunk`, the prompt itself goes through the model in pieces of that many
  tokens (each piece attends the cache filled by the earlier ones), which bounds activation memory by the piece.
  Each layer keeps only the keys/values its pattern retains. `prefill(row, ids, start)` goes on with a row that
  holds `start` tokens (a scheduler's prompt slices between decode steps).
* `decode(tokens, active)`: one new token for every row (rows not `active` store nothing and do not advance),
  logits ``(max_batch, vocab)``. On CUDA the pieces of a layer around attention (norms, projections, RoPE, MLP)
  are compiled with `torch.compile` (one graph shared by all layers: the small element-wise kernels fuse), and
  the whole step is captured once in a CUDA graph and replayed. Prefill uses the same pieces compiled for any
  length (fewer passes over the prompt's activations).

Attention with the cache is `CompactKV.attend` (the same path Hugging Face `generate` takes through
`HybridCache`), which runs `longgen.kernels.cache_attention` for new tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

from longgen.infer.kv import CompactKV, SlotMap
from longgen.model.attention import ATTN_IMPLEMENTATION
from longgen.model.layout import read_layout

MLP_CHUNK = 8192


def _parts(model: Any) -> tuple[Any, Any]:
    """(decoder stack, lm head) of a Llama-family causal LM, or a clear error."""
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
        raise TypeError(
            f"ModelRunner drives Llama-family causal LMs (model.model.{{embed_tokens, layers, norm, rotary_emb}} and "
            f"model.lm_head); got {type(model).__name__}"
        )
    for layer in inner.layers:
        for n in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            if not hasattr(layer, n):
                raise TypeError(f"decoder layer {type(layer).__name__} has no {n}: not a Llama-family layer")
        for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"):
            if not hasattr(layer.self_attn, n):
                raise TypeError(f"attention {type(layer.self_attn).__name__} has no {n}: not a Llama-family attention")
    return inner, model.lm_head


def _rope_function(attn: Any) -> Any:
    """The model family's own ``apply_rotary_pos_emb`` (defined in its modeling module)."""
    rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if rope is None:
        raise TypeError(f"{type(attn).__name__}'s module has no apply_rotary_pos_emb: not a Llama-family attention")
    return rope


def _kv_geometry(config: Any) -> tuple[int, int]:
    hkv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return hkv, head_dim


def row_kv_bytes(config: Any, max_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """KV-cache bytes one row (sequence of up to `max_len` tokens) takes in a `ModelRunner` for this config."""
    hkv, d = _kv_geometry(config)
    size = torch.empty((), dtype=dtype).element_size()
    return sum(2 * hkv * (SlotMap.build(p, hkv, max_len).capacity + 1) * d * size for p in read_layout(config))


def rows_for_budget(config: Any, max_len: int, budget_bytes: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """How many sequences of up to `max_len` tokens fit a KV-cache budget of `budget_bytes`."""
    return budget_bytes // row_kv_bytes(config, max_len, dtype)


def _qkv(attn: Any, norm: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: Any):
    """The attention block up to attention: norm, q/k/v projections (+ per-head q/k norms where the family has
    them), RoPE. Returns q ``(B, H, T, d)`` and k, v ``(B, Hkv, T, d)``."""
    h = norm(x)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q, k = attn.q_proj(h).view(shape), attn.k_proj(h).view(shape)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    q, k = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q, k, v


def _norm_mlp(norm: Any, mlp: Any, x: torch.Tensor) -> torch.Tensor:
    return mlp(norm(x))


def _finish(attn: Any, norm: Any, mlp: Any, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """The rest of a decoder layer: output projection, residual, norm, MLP, residual. o ``(B, T, H, d)``."""
    x = x + attn.o_proj(o.reshape(*o.shape[:2], -1))
    return x + mlp(norm(x))


class ModelRunner:
    """A converted hybrid (or an all-Full conversion) ready to serve `max_batch` sequences of `max_len` tokens."""

    def __init__(
        self,
        model: Any,
        *,
        max_batch: int = 1,
        max_len: int | None = None,
        cuda_graph: bool | None = None,
        compile: bool | None = None,
        prefill_chunk: int | None = None,
        mlp_chunk: int = MLP_CHUNK,
    ):
        config = model.config
        if getattr(config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            raise ValueError(
                "ModelRunner needs a model running attn_implementation='longgen': a converted hybrid "
                "(longgen.load_model / longgen.convert); for a full-attention baseline use convert(model, "
                "full_fraction=1.0)"
            )
        self.inner, self.lm_head = _parts(model)
        self.model, self.config = model, config
        limit = config.max_position_embeddings
        max_len = max_len or limit
        if not 1 <= max_len <= limit:
            raise ValueError(f"max_len must be in [1, {limit}] (the model's maximum length), got {max_len}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        for name, value in (("prefill_chunk", prefill_chunk), ("mlp_chunk", mlp_chunk)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.max_batch, self.max_len = max_batch, max_len
        self.prefill_chunk, self.mlp_chunk = prefill_chunk, mlp_chunk
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        hkv, d = _kv_geometry(config)
        self.kv = [
            CompactKV(p, hkv, d, max_len=max_len, batch=max_batch, dtype=self.dtype, device=self.device)
            for p in read_layout(config)
        ]
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        self._graph: torch.cuda.CUDAGraph | None = None
        self._rope = _rope_function(self.inner.layers[0].self_attn)
        self.compile = self.device.type == "cuda" if compile is None else compile
        # the decode step's pieces around attention, compiled once for all layers (fused norms, RoPE, SiLU)
        wrap = torch.compile if self.compile else (lambda f, **kw: f)
        self._qkv_step, self._finish_step = wrap(_qkv, dynamic=False), wrap(_finish, dynamic=False)
        # prefill: the same pieces for any prompt length (fused norms, RoPE and SiLU save memory passes)
        self._qkv_prefill, self._mlp_prefill = wrap(_qkv, dynamic=True), wrap(_norm_mlp, dynamic=True)
        self._tokens = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self._active = torch.zeros(max_batch, dtype=torch.bool, device=self.device)
        self._logits: torch.Tensor | None = None

    # -- state --------------------------------------------------------------------------------------------------
    def lengths(self) -> torch.Tensor:
        """Tokens stored per row, ``(max_batch,)``."""
        return self.kv[0].next_pos

    def release(self, row: int) -> None:
        """Forget row `row`'s sequence."""
        self._check_row(row)
        for kv in self.kv:
            kv.rows(row).reset()

    def allocated_bytes(self) -> int:
        """Bytes of key/value storage held by all layers (all rows)."""
        return sum(kv.allocated_bytes() for kv in self.kv)

    def _check_row(self, row: int) -> None:
        if not 0 <= row < self.max_batch:
            raise ValueError(f"row must be in [0, {self.max_batch}), got {row}")

    # -- the model, layer by layer ------------------------------------------------------------------------------
    def _forward(self, ids, q_pos, kvs, valid, empty: bool, step: bool = False, start=None) -> torch.Tensor:
        """Hidden states after the final norm of the last position, ``(B, hidden)``. `step`: the decode step
        (compiled pieces, no MLP chunking)."""
        qkv, finish = (self._qkv_step, self._finish_step) if step else (self._qkv_prefill, None)
        x = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(x, q_pos)
        for layer, kv in zip(self.inner.layers, kvs, strict=True):
            attn = layer.self_attn
            q, k, v = qkv(attn, layer.input_layernorm, x, cos, sin, self._rope)
            o = kv.attend(q, k, v, q_pos, valid, attn.scaling, empty=empty, start=start)
            if finish is not None:
                x = finish(attn, layer.post_attention_layernorm, layer.mlp, x, o)
                continue
            x = x + attn.o_proj(o.reshape(*o.shape[:2], -1))
            for s in range(0, x.shape[1], self.mlp_chunk):
                part = x[:, s : s + self.mlp_chunk]
                part += self._mlp_prefill(layer.post_attention_layernorm, layer.mlp, part)
        return self.inner.norm(x[:, -1])

    @torch.inference_mode()
    def prefill(self, row: int, ids: Sequence[int] | torch.Tensor, start: int = 0) -> torch.Tensor:
        """Start row `row` with prompt `ids`; returns the next-token logits ``(vocab,)`` in float32.

        With `start` > 0 the row goes on instead: `ids` are the prompt's tokens from position `start`, which must be
        the number of tokens the row holds (a scheduler can prefill a long prompt in slices between decode steps;
        the result equals one call with the whole prompt)."""
        self._check_row(row)
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).flatten()
        n = ids.numel()
        if n < 1 or start < 0 or start + n > self.max_len:
            raise ValueError(
                f"a prompt must have 1 to {self.max_len} tokens (the runner's max_len): got {n} tokens from "
                f"position {start}"
            )
        views = [kv.rows(row) for kv in self.kv]
        if start == 0:
            for v in views:
                v.reset()
        elif (held := int(self.lengths()[row])) != start:
            raise ValueError(f"row {row} holds {held} tokens: a prefill that goes on must start there, not at {start}")
        piece = self.prefill_chunk or n
        for s in range(0, n, piece):
            part = ids[s : s + piece][None]
            q_pos = torch.arange(start + s, start + s + part.shape[1], device=self.device)[None]
            h = self._forward(part, q_pos, views, None, empty=start + s == 0, start=start + s)
        return self.lm_head(h)[0].float()

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor | Sequence[int], active: torch.Tensor | Sequence[bool] | None = None):
        """Feed one token per row; rows not `active` (default: all active) are left untouched. Returns the
        next-token logits ``(max_batch, vocab)`` in float32 (a fresh tensor)."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        if tokens.shape != (self.max_batch,):
            raise ValueError(f"decode takes one token per row: shape ({self.max_batch},), got {tuple(tokens.shape)}")
        if active is None:
            active = torch.ones(self.max_batch, dtype=torch.bool, device=self.device)
        active = torch.as_tensor(active, dtype=torch.bool, device=self.device)
        self._tokens.copy_(tokens)
        self._active.copy_(active)
        if not self.cuda_graph:
            self._step()
        else:
            if self._graph is None:
                self._capture()
            self._graph.replay()
        return self._logits.clone()

    def _step(self) -> None:
        q_pos = self.kv[0].next_pos[:, None].clone()
        valid = self._active[:, None]
        h = self._forward(self._tokens[:, None], q_pos, self.kv, valid, empty=False, step=True)
        logits = self.lm_head(h).float()
        if self._logits is None:
            self._logits = logits
        else:
            self._logits.copy_(logits)

    def _capture(self) -> None:
        """Compile (first eager run, nothing stored: no row active) and capture the decode step."""
        saved = self._active.clone()
        self._active.zero_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self._graph = graph
        self._active.copy_(saved)

    # -- whole generations ---------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        eos_token_id: int | None = None,
    ) -> list[list[int]]:
        """Generate for up to `max_batch` prompts together (different lengths are fine); returns the new tokens
        of each (stopping at `eos_token_id`, included, when given)."""
        if not 1 <= len(prompts) <= self.max_batch:
            raise ValueError(f"generate takes 1 to {self.max_batch} prompts (max_batch), got {len(prompts)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for p in prompts:
            if len(p) + max_new_tokens > self.max_len:
                raise ValueError(
                    f"prompt ({len(p)} tokens) + max_new_tokens ({max_new_tokens}) exceeds max_len {self.max_len}"
                )
        gen = torch.Generator(device=self.device).manual_seed(seed)
        B = self.max_batch
        logits = torch.zeros(B, self.config.vocab_size, device=self.device)
        active = torch.zeros(B, dtype=torch.bool, device=self.device)
        for row, p in enumerate(prompts):
            logits[row] = self.prefill(row, p)
            active[row] = True
        temp = torch.full((B,), float(temperature), device=self.device)
        top = torch.full((B,), float(top_p), device=self.device)
        out: list[list[int]] = [[] for _ in prompts]
        for step in range(max_new_tokens):
            nxt = sample_tokens(logits, temp, top, gen)
            for row, tok in enumerate(nxt[: len(prompts)].tolist()):
                if active[row]:
                    out[row].append(tok)
                    if tok == eos_token_id:
                        active[row] = False
            if step == max_new_tokens - 1 or not bool(active.any()):
                break
            logits = self.decode(nxt, active)
        for row in range(len(prompts)):
            self.release(row)
        return out


def sample_tokens(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token per row of `logits` ``(B, vocab)``: greedy where temperature is 0, else nucleus sampling."""
    greedy = logits.argmax(-1)
    t = temperature.clamp(min=1e-6)[:, None]
    probs = torch.softmax(logits.float() / t, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
    sorted_p = torch.where(before < top_p[:, None], sorted_p, 0.0)
    pick = torch.multinomial(sorted_p, 1, generator=generator).squeeze(-1)
    sampled = order.gather(-1, pick[:, None]).squeeze(-1)
    return torch.where(temperature > 0, sampled, greedy)


__all__ = ["ModelRunner", "row_kv_bytes", "rows_for_budget", "sample_tokens"]
