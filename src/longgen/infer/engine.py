"""Continuous batching over a `ModelRunner`: the scheduler behind ``longgen serve``.

The runner holds a fixed number of rows (sequences), each with room for `max_len` tokens of compact KV cache.
One background worker thread owns the runner (it is not thread-safe) and repeats:

1. drop requests whose client went away (`cancel`), releasing their rows;
2. admit waiting requests first come, first served while a row is free, and prefill admitted prompts into their
   rows: whole prompts, or with `prefill_chunk` at most that many prompt tokens per turn (a long prompt is then
   prefilled in slices between the decode steps of the other rows, so it does not stall their streams); a
   request whose prompt is complete samples its first token;
3. one `decode` step for every row past its prompt, then sample each row's next token with its own parameters;
4. detokenize each new token incrementally, cut at stop strings, hand the new text to the request's consumer,
   and finish a request on EOS or a stop string (``finish_reason="stop"``) or at `max_tokens` (``"length"``),
   releasing its row for the next waiting request.

Admission is by KV memory: every row reserves the cache of a whole `max_len`-token sequence, so the number of
rows is ``min(max_batch, rows_for_budget(config, max_len, kv_budget_bytes))`` (`admission_rows`) and a request
whose prompt plus `max_tokens` exceeds `max_len` is refused when it is submitted. Nothing is ever evicted.

Consumers are called on the worker thread; `Engine.stream` is the asyncio side: it hands each `Output` over with
``loop.call_soon_threadsafe`` onto an `asyncio.Queue`, and cancels the request when the consumer stops early.
An exception inside the worker fails the requests it touched (an `Output` with `error`) and the loop goes on.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from longgen.infer.runner import ModelRunner, row_kv_bytes, rows_for_budget, sample_tokens

DETOKENIZE_CONTEXT = 5  # prompt tokens decoded before the first new one, so its leading space survives


class InvalidRequestError(ValueError):
    """A request the engine cannot take; `param` names the offending field (OpenAI's error ``param``)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt. ``temperature=0`` is greedy; `stop` strings end the text and are not part of
    it; `seed` makes sampling reproducible (without it each request draws a fresh one)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}", "max_tokens")
        if not self.temperature >= 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings", "stop")


@dataclass(frozen=True)
class Output:
    """What one request produced since its previous `Output`: new `text`, and at the end `finish_reason`
    (``"stop"`` or ``"length"``) or `error` (the request failed on the server). Token counts are totals."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class IncrementalDetokenizer:
    """Turns tokens into text one at a time without splitting a multi-byte character.

    Decodes a short window (the last tokens already shown plus the new ones) and emits what the new tokens add;
    while the window's text ends in an incomplete character (U+FFFD) it waits for the next token. The prompt's last
    tokens start the window, so tokenizers that drop a leading space at the start of a text keep it here."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)[len(prompt_ids) - DETOKENIZE_CONTEXT :] if prompt_ids else []
        self.prefix = 0  # window start
        self.read = len(self.ids)  # tokens before this are shown

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add one token; returns the text it completes (often all of it, sometimes "" while a character is open)."""
        self.ids.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end comes out as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        shown = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) <= len(shown) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(shown) :]


class StopStrings:
    """Cuts a stream of text at the first occurrence of any stop string, which is never emitted.

    Text that could be the beginning of a stop string is held back until the next piece shows whether it is."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        if not self.stop:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = max((k for s in self.stop for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


@dataclass(eq=False)
class Request:
    """One generation, as the engine tracks it. `deliver` is called on the worker thread."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    deliver: Callable[[Output], None]
    row: int | None = None
    prefilled: int = 0  # prompt tokens in the row's cache so far
    last_token: int = 0
    completion_tokens: int = 0
    cancelled: bool = False
    done: bool = False
    generator: torch.Generator | None = None
    detokenizer: IncrementalDetokenizer | None = None
    stops: StopStrings = field(default_factory=lambda: StopStrings(()))


def _check_prefill_chunk(prefill_chunk: int | None) -> None:
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1 (or None for whole prompts), got {prefill_chunk}")


def admission_rows(
    config: Any, max_len: int, max_batch: int, kv_budget_bytes: int | None, dtype: torch.dtype = torch.bfloat16
) -> int:
    """Rows (concurrent sequences of up to `max_len` tokens) a server admits: `max_batch`, fewer if the KV-cache
    budget holds fewer. Raises `ValueError` when the budget holds not even one."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if kv_budget_bytes is None:
        return max_batch
    rows = rows_for_budget(config, max_len, kv_budget_bytes, dtype)
    if rows < 1:
        need = row_kv_bytes(config, max_len, dtype)
        raise ValueError(
            f"a KV budget of {kv_budget_bytes:,} bytes holds no sequence of {max_len} tokens (one needs {need:,} "
            "bytes): raise the budget or lower max_len"
        )
    return min(max_batch, rows)


class Engine:
    """Continuous batching of generation requests over `runner` (see the module docstring).

    `tokenizer` detokenizes; generation stops at `eos_token_ids` (default: the tokenizer's EOS); `prefill_chunk`:
    prompt tokens prefilled per scheduler turn (None: whole prompts). Call `start` before submitting and
    `shutdown` at the end."""

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Any,
        eos_token_ids: Sequence[int] | None = None,
        prefill_chunk: int | None = None,
    ):
        _check_prefill_chunk(prefill_chunk)
        self.runner, self.tokenizer, self.prefill_chunk = runner, tokenizer, prefill_chunk
        if eos_token_ids is None:
            eos_token_ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        self.eos_token_ids = frozenset(eos_token_ids)
        self.rows, self.max_len = runner.max_batch, runner.max_len
        self.vocab_size = runner.config.vocab_size
        self.kv_bytes_per_row = row_kv_bytes(runner.config, runner.max_len, runner.dtype)
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._running: dict[int, Request] = {}  # row -> request (prefilling or decoding); the worker's alone
        self._prefilling: deque[Request] = deque()  # admitted, prompt not complete yet, first come first
        self._free = list(range(self.rows))
        self._ids = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._totals = {"finished": 0, "cancelled": 0, "failed": 0}  # requests ended each way, since start

    # -- the consumers' side (any thread) ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="longgen-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Stop the worker; requests not finished get an error."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise `InvalidRequestError` for a request this engine cannot serve."""
        n = len(prompt_ids)
        if n < 1:
            raise InvalidRequestError("the prompt is empty (it has no tokens)", "prompt")
        if n >= self.max_len:
            raise InvalidRequestError(
                f"the prompt has {n} tokens; this server takes at most {self.max_len - 1} (max_len {self.max_len} "
                "includes at least one generated token)",
                "prompt",
            )
        if n + params.max_tokens > self.max_len:
            raise InvalidRequestError(
                f"this server's maximum length is {self.max_len} tokens, but {n + params.max_tokens} were requested "
                f"({n} in the prompt, {params.max_tokens} for the completion): lower max_tokens to at most "
                f"{self.max_len - n}",
                "max_tokens",
            )
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, deliver: Callable[[Output], None]) -> Request:
        """Queue a request; `deliver` gets its `Output`s on the worker thread, the last one `finished`."""
        prompt_ids = [int(t) for t in prompt_ids]
        self.check(prompt_ids, params)
        req = Request(next(self._ids), prompt_ids, params, deliver)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            self._waiting.append(req)
            self._cond.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop working on `req` (its consumer went away); nothing more is delivered. No-op once it finished."""
        with self._cond:
            req.cancelled = True
            if req in self._waiting:  # never started: ends here; a running one ends at the worker's next step
                self._waiting.remove(req)
                req.done = True
                self._totals["cancelled"] += 1
            self._cond.notify()

    async def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> AsyncIterator[Output]:
        """Submit from asyncio and yield the request's `Output`s until it finishes; leaving early cancels it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output] = asyncio.Queue()
        req = self.submit(prompt_ids, params, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
        try:
            while True:
                out = await queue.get()
                yield out
                if out.finished:
                    return
        finally:
            self.cancel(req)

    def stats(self) -> dict[str, int]:
        """Counters for health checks: requests running (of them, still prefilling their prompt) and waiting now,
        requests ended so far (finished, cancelled, failed), rows, KV-cache bytes."""
        with self._cond:
            waiting = len(self._waiting)
            totals = {f"{k}_total": v for k, v in self._totals.items()}
        return {
            "running": len(self._running),
            "prefilling": len(self._prefilling),
            "waiting": waiting,
            **totals,
            "rows": self.rows,
            "max_len": self.max_len,
            "kv_bytes_per_row": self.kv_bytes_per_row,
            "kv_bytes_allocated": self.runner.allocated_bytes(),
        }

    # -- the worker thread -----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._running):
                    self._cond.wait()
                if self._stopping:
                    break
                admitted = []
                while self._waiting and len(self._free) > len(admitted):
                    admitted.append(self._waiting.popleft())
            try:
                for req in [r for r in self._running.values() if r.cancelled]:
                    self._end(req, "cancelled")
                for req in admitted:
                    self._admit(req)
                self._prefill()
                if len(self._running) > len(self._prefilling):
                    self._decode()
            except Exception as e:  # a bug of ours: fail what is in flight, keep serving
                for req in [*self._running.values(), *admitted]:
                    self._fail(req, e)
        with self._cond:
            pending = list(self._waiting) + list(self._running.values())
            self._waiting.clear()
        for req in pending:
            self._fail(req, RuntimeError("the server is shutting down"))

    def _admit(self, req: Request) -> None:
        """Give `req` a row; its prompt waits in `_prefilling`."""
        if req.cancelled:
            return self._end(req, "cancelled")
        req.row = self._free.pop()
        self._running[req.row] = req
        try:
            p = req.params
            if p.temperature > 0:
                seed = secrets.randbits(63) if p.seed is None else p.seed
                req.generator = torch.Generator(device=self.runner.device).manual_seed(seed)
            req.detokenizer = IncrementalDetokenizer(self.tokenizer, req.prompt_ids)
            req.stops = StopStrings(p.stop)
        except Exception as e:
            return self._fail(req, e)
        self._prefilling.append(req)

    def _prefill(self) -> None:
        """This turn's prefill: whole prompts, or `prefill_chunk` prompt tokens (first come, first served)."""
        budget = self.prefill_chunk
        while self._prefilling and (budget is None or budget > 0):
            req = self._prefilling[0]
            lo = req.prefilled
            hi = len(req.prompt_ids) if budget is None else min(len(req.prompt_ids), lo + budget)
            try:
                logits = self.runner.prefill(req.row, req.prompt_ids[lo:hi], start=lo)
                req.prefilled = hi
                if hi == len(req.prompt_ids):
                    self._prefilling.popleft()
                    self._advance(req, self._sample(req, logits[None])[0])
            except Exception as e:
                self._fail(req, e)
            if budget is not None:
                budget -= hi - lo

    def _decode(self) -> None:
        tokens = [0] * self.rows
        active = [False] * self.rows
        decoding = {row: req for row, req in self._running.items() if req.prefilled == len(req.prompt_ids)}
        for row, req in decoding.items():
            tokens[row], active[row] = req.last_token, True
        try:
            logits = self.runner.decode(tokens, active)
        except Exception as e:  # the whole step failed: every row in it
            for req in decoding.values():
                self._fail(req, e)
            return
        greedy = logits.argmax(-1).tolist()
        for row, req in decoding.items():
            try:
                token = greedy[row] if req.generator is None else self._sample(req, logits[row : row + 1])[0]
                self._advance(req, token)
            except Exception as e:
                self._fail(req, e)

    def _sample(self, req: Request, logits: torch.Tensor) -> list[int]:
        if req.generator is None:
            return logits.argmax(-1).tolist()
        p, dev = req.params, logits.device
        temp, top_p = torch.tensor([p.temperature], device=dev), torch.tensor([p.top_p], device=dev)
        return sample_tokens(logits, temp, top_p, req.generator).tolist()

    def _advance(self, req: Request, token: int) -> None:
        """Account for `req`'s new token: emit its text, finish the request if it is done."""
        req.completion_tokens += 1
        req.last_token = token
        if token in self.eos_token_ids:
            return self._finish(req, "", "stop")
        text, stopped = req.stops.push(req.detokenizer.push(token))
        if stopped:
            return self._finish(req, text, "stop", flush=False)
        if req.completion_tokens >= req.params.max_tokens:
            return self._finish(req, text, "length")
        if text:
            self._deliver(req, Output(text, len(req.prompt_ids), req.completion_tokens))

    def _finish(self, req: Request, text: str, reason: str, flush: bool = True) -> None:
        if flush:
            tail, stopped = req.stops.push(req.detokenizer.flush())
            text += tail if stopped else tail + req.stops.flush()
            reason = "stop" if stopped else reason
        self._end(req, "finished")
        self._deliver(req, Output(text, len(req.prompt_ids), req.completion_tokens, finish_reason=reason))

    def _fail(self, req: Request, error: Exception) -> None:
        if req.done:
            return
        self._end(req, "failed")
        message = f"generation failed: {type(error).__name__}: {error}"
        self._deliver(req, Output("", len(req.prompt_ids), req.completion_tokens, error=message))

    def _end(self, req: Request, outcome: str) -> None:
        """Count how `req` ended and give its row back."""
        if req.done:
            return
        req.done = True
        with self._cond:
            self._totals[outcome] += 1
        if req in self._prefilling:
            self._prefilling.remove(req)
        if req.row is not None and self._running.get(req.row) is req:
            del self._running[req.row]
            self._free.append(req.row)
            try:
                self.runner.release(req.row)
            finally:
                req.row = None

    def _deliver(self, req: Request, out: Output) -> None:
        if req.cancelled:
            return
        try:
            req.deliver(out)
        except Exception:  # the consumer is gone (e.g. its event loop closed): stop generating for it
            req.cancelled = True


def load_engine(
    path: str | os.PathLike,
    *,
    max_batch: int = 8,
    max_len: int | None = None,
    kv_budget_bytes: int | None = None,
    device: str = "auto",
    prefill_chunk: int | None = None,
) -> Engine:
    """Load the hybrid at `path` (bfloat16 on CUDA, float32 on CPU) with its tokenizer into a (not started)
    `Engine` of `admission_rows` rows of up to `max_len` tokens (default: the model's maximum), prefilling at most
    `prefill_chunk` prompt tokens between decode steps (None: whole prompts). On CUDA the decode step is captured in
    a CUDA graph here, before the first request. Generation stops at the tokenizer's EOS and the model's
    generation-config EOS tokens."""
    from longgen.model import load_model, load_tokenizer

    _check_prefill_chunk(prefill_chunk)  # before the model loads
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype=dtype).to(device).eval()
    limit = model.config.max_position_embeddings
    max_len = max_len or limit
    if not 2 <= max_len <= limit:
        raise ValueError(f"max_len must be in [2, {limit}] (the model's maximum length), got {max_len}")
    rows = admission_rows(model.config, max_len, max_batch, kv_budget_bytes, dtype)
    runner = ModelRunner(model, max_batch=rows, max_len=max_len)
    runner.decode([0] * rows, [False] * rows)  # warm-up (and CUDA-graph capture): no row is active, none changes
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None:
        eos.append(tokenizer.eos_token_id)
    return Engine(runner, tokenizer, eos_token_ids=eos, prefill_chunk=prefill_chunk)


__all__ = [
    "Engine",
    "IncrementalDetokenizer",
    "InvalidRequestError",
    "Output",
    "SamplingParams",
    "StopStrings",
    "admission_rows",
    "load_engine",
]
