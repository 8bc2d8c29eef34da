"""An OpenAI-compatible HTTP server over the continuous-batching `Engine` (``longgen serve``).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the prompt is the tokenizer's chat template
with ``add_generation_prompt=True``), both streaming with server-sent events when ``"stream": true``;
``GET /v1/models``; ``GET /health`` (the engine's counters).

Each request is validated (unknown fields, ranges, lengths) and tokenized on the event loop's side, then submitted
to the engine, whose single worker thread runs every admitted request together (see `longgen.infer.engine`).
Its outputs come back through `Engine.stream`; a client that disconnects cancels its request, freeing the row.
Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for bad requests, 404 for
an unknown model, 500 when generation failed; the server keeps serving after each.

fastapi and uvicorn are optional dependencies (``pip install 'longgen[serve]'``): only this module imports them.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(f"the server needs fastapi and uvicorn: pip install 'longgen[serve]' ({e})") from e

from longgen.infer.engine import Engine, InvalidRequestError, Output, SamplingParams

DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks that its client is still there


# -- request bodies: unknown fields are errors; features we do not have are accepted only at neutral values -----
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _GenerationBody(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionBody(_GenerationBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatBody(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None


# features this server lacks, and the one value (besides null) at which each changes nothing
NEUTRAL = {
    "logprobs": False,
    "top_logprobs": 0,
    "echo": False,
    "best_of": 1,
    "suffix": "",
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "logit_bias": {},
    "tools": [],
    "tool_choice": "none",
    "functions": [],
    "function_call": "none",
    "response_format": {"type": "text"},
}


def _check_supported(body: _GenerationBody) -> None:
    """400 for n != 1 and for any feature this server lacks, used at a value that would change the output."""
    if body.n not in (None, 1):
        raise InvalidRequestError(f"n must be 1 (this server returns one choice per request), got {body.n}", "n")
    for name, neutral in NEUTRAL.items():
        value = getattr(body, name, None)
        if value is not None and not (value == neutral and type(value) is type(neutral)):
            raise InvalidRequestError(f"{name} is not supported by this server", name)


def _sampling(body: _GenerationBody, max_tokens: int) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=stop,
        seed=body.seed,
    )


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class _ClientGone(Exception):
    pass


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it (and so the generation behind it) if the client disconnects meanwhile."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise _ClientGone
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})


def create_app(engine: Engine, model_name: str) -> Any:
    """The FastAPI app serving `engine` as `model_name`; it starts the engine and shuts it down with itself."""
    tokenizer = engine.tokenizer
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await run_in_threadpool(engine.shutdown)

    app = FastAPI(title="longgen", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if err.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
            param = None
        elif err.get("type") == "extra_forbidden":
            message = f"unknown field {param!r} (not part of this endpoint's request)"
        elif param is None:
            message = f"the request body must be a JSON object: {err.get('msg')}"
        else:
            message = f"{param}: {err.get('msg')}"
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(InvalidRequestError)
    async def _invalid_request(request: Request, exc: InvalidRequestError):
        return _error(400, str(exc), "invalid_request_error", exc.param)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    def check_model(name: str) -> JSONResponse | None:
        if name == model_name:
            return None
        message = f"the model {name!r} does not exist; this server serves {model_name!r}"
        return _error(404, message, "invalid_request_error", "model", "model_not_found")

    async def respond(
        request: Request,
        body: _GenerationBody,
        prompt_ids: list[int],
        max_tokens: int | None,
        chunk: Callable[[str | None, str | None], dict],
        final: Callable[[str, Output], dict],
    ) -> Response:
        """Run one generation: a JSON response from `final(text, last output)`, or SSE chunks from
        ``chunk(text delta, finish_reason)``."""
        if max_tokens is None:  # chat without a limit: up to the server's maximum length
            max_tokens = max(1, engine.max_len - len(prompt_ids))
        params = _sampling(body, max_tokens)
        outputs = engine.stream(prompt_ids, params)
        try:
            first = await _unless_disconnected(request, anext(outputs))
            if first.error is not None:
                return _error(500, first.error, "server_error")
            if body.stream:
                usage = body.stream_options is not None and body.stream_options.include_usage
                return StreamingResponse(_sse(outputs, first, chunk, usage), media_type="text/event-stream")

            async def rest() -> tuple[str, Output]:
                texts, out = [first.text], first
                while not out.finished:
                    out = await anext(outputs)
                    texts.append(out.text)
                return "".join(texts), out

            text, last = await _unless_disconnected(request, rest())
        except _ClientGone:
            await outputs.aclose()
            return Response(status_code=499)
        if last.error is not None:
            return _error(500, last.error, "server_error")
        return JSONResponse(final(text, last))

    async def _sse(outputs: AsyncIterator[Output], out: Output, chunk, include_usage: bool) -> AsyncIterator[str]:
        try:
            start = chunk(None, None)
            if start:
                yield _event(start)
            while True:
                if out.error is not None:
                    yield _event({"error": {"message": out.error, "type": "server_error", "param": None, "code": None}})
                    break
                if out.text or out.finished:
                    yield _event(chunk(out.text, out.finish_reason))
                if out.finished:
                    if include_usage:
                        yield _event({**chunk("", None), "choices": [], "usage": _usage(out)})
                    break
                out = await anext(outputs)
            yield "data: [DONE]\n\n"
        finally:
            await outputs.aclose()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "longgen"}
        return {"object": "list", "data": [{**card, "max_model_len": engine.max_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        if (missing := check_model(body.model)) is not None:
            return missing
        _check_supported(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise InvalidRequestError("this server takes one prompt per request", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = await run_in_threadpool(lambda: tokenizer(prompt).input_ids)
        else:
            prompt_ids = list(prompt)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": now, "model": model_name}

        def chunk(text, finish):
            if text is None:
                return {}
            return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        def final(text, out):
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": out.finish_reason}
            return {**head, "choices": [choice], "usage": _usage(out)}

        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default for completions
        return await respond(request, body, prompt_ids, max_tokens, chunk, final)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        if (missing := check_model(body.model)) is not None:
            return missing
        _check_supported(body)
        if getattr(tokenizer, "chat_template", None) is None:
            raise InvalidRequestError(
                "this model's tokenizer has no chat template, so it cannot take chat messages; use /v1/completions "
                "with a plain prompt",
                "messages",
            )
        messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
        prompt_ids = await run_in_threadpool(_chat_prompt, tokenizer, messages)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name}

        def chunk(text, finish):
            delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
            return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def final(text, out):
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": out.finish_reason}
            return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(out)}

        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await respond(request, body, prompt_ids, max_tokens, chunk, final)

    return app


def _text(content: str | list[TextPart] | None) -> str | None:
    return "".join(p.text for p in content) if isinstance(content, list) else content


def _chat_prompt(tokenizer: Any, messages: list[dict]) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # the template's own checks (roles, order) or a template error
        raise InvalidRequestError(f"the chat template refused these messages: {e}", "messages") from e
    return tokenizer(text, add_special_tokens=False).input_ids


def _usage(out: Output) -> dict[str, int]:
    total = out.prompt_tokens + out.completion_tokens
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens, "total_tokens": total}


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def serve(
    path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    max_len: int | None = None,
    kv_budget_bytes: int | None = None,
    device: str = "auto",
    model_name: str | None = None,
    prefill_chunk: int | None = None,
) -> None:
    """Load the hybrid at `path` and serve it over HTTP until interrupted (the ``longgen serve`` command). The
    address is taken first, so a port in use is an error before the model loads."""
    import uvicorn

    from longgen.infer.engine import load_engine

    sock = _listen(host, port)
    try:
        engine = load_engine(
            path,
            max_batch=max_batch,
            max_len=max_len,
            kv_budget_bytes=kv_budget_bytes,
            device=device,
            prefill_chunk=prefill_chunk,
        )
    except BaseException:
        sock.close()
        raise
    name = model_name or Path(path).resolve().name
    budget = "" if kv_budget_bytes is None else f", KV budget {kv_budget_bytes:,} bytes"
    print(
        f"longgen serve: {name} on {engine.runner.device}: {engine.rows} rows (max_batch {max_batch}{budget}) of up "
        f"to {engine.max_len} tokens; KV cache {engine.kv_bytes_per_row:,} bytes per row, "
        f"{engine.runner.allocated_bytes():,} bytes allocated; prompts prefilled "
        + ("whole" if prefill_chunk is None else f"in slices of {prefill_chunk} tokens between decode steps"),
        flush=True,
    )
    print(f"OpenAI-compatible API at http://{host}:{port}/v1 (model {name!r})", flush=True)
    config = uvicorn.Config(create_app(engine, name), host=host, port=port, log_level="info")
    uvicorn.Server(config).run(sockets=[sock])


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port); OSError saying so when the address is in use or cannot be had."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --port or --host)") from None


__all__ = ["create_app", "serve"]
