"""HTTP server: an OpenAI-compatible completions API and a small web page, over `generate`.

    GET  /                     the web page (self-contained: inline CSS and JS, no network assets)
    GET  /health               {"status": "ok", "model": ..., "max_tokens_limit": ..., "pending": ...}
    GET  /v1/models            the one served model, OpenAI's list format
    POST /v1/completions       OpenAI's legacy completions API; `stream: true` sends server-sent events
    POST /v1/chat/completions  not offered (a story model has no chat format): OpenAI-style 404

The server never samples by itself: every request becomes one call of `LanguageModel.generate`
(non-streamed, all prompts x n samples in one batch) or `LanguageModel.stream` (streamed). Those calls
run one at a time, in arrival order, on a single model thread: the model's tensors are not shared
between threads, torch's own thread pool keeps the cores busy, and the event loop stays free to accept
connections, answer /health and notice disconnects. A client that disconnects while its request waits
is skipped, and one that disconnects during a stream stops its generation through `should_stop`.

Bad input never reaches the model: the JSON body is checked field by field and refused with
OpenAI's error shape `{"error": {"message", "type", "param", "code"}}` (400, 404, 405, 413 or 415).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Protocol, Sequence

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tinystories.errors import UserError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_TOKENS_LIMIT = 1024  # the largest `max_tokens` a request may ask for
DEFAULT_MAX_BODY_BYTES = 256 * 1024  # a story prompt is a few KB; anything near this is abuse
DEFAULT_MAX_PENDING = 64  # requests queued or running before new ones get a 503
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_CHOICES = 16  # prompts x n in one request
MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_SEED = 2**63 - 1

logger = logging.getLogger("tinystories.serve")


class LanguageModelLike(Protocol):
    """What the server needs from `tinystories.generate.LanguageModel`."""

    tokenizer: Any

    def generate(self, prompt: str | list[str], num_samples: int = 1, **sampling: Any) -> list[Any]: ...

    def stream(self, prompt: str, should_stop: Callable[[], bool] | None = None, **sampling: Any) -> Iterator[Any]: ...


# ----------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


class APIError(Exception):
    """A request the server refuses; becomes `{"error": {...}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status, headers=headers)


def _invalid(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ----------------------------------------------------------------------------------------------
# Reading and checking a request


@dataclass(frozen=True)
class CompletionRequest:
    """A checked /v1/completions request. `sampling` holds `LanguageModel` keyword arguments."""

    prompts: list[str]
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    sampling: dict[str, Any] = field(default_factory=dict)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n


_OPENAI_FIELDS = {
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
    "echo", "logprobs", "best_of", "presence_penalty", "frequency_penalty", "logit_bias", "user", "suffix",
}
_EXTENSION_FIELDS = {"top_k", "repetition_penalty"}


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1 here


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int, high_reason: str = "") -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 16.0 is accepted as 16, like OpenAI
    if not _is_integer(value):
        raise _invalid(name, f"'{name}' must be an integer, got {json.dumps(value)}", "invalid_type")
    if value < low:
        raise _invalid(name, f"'{name}' must be at least {low}, got {value}")
    if value > high:
        raise _invalid(name, f"'{name}' must be at most {high}{high_reason}, got {value}")
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise _invalid(name, f"'{name}' must be a number, got {json.dumps(value)}", "invalid_type")
    if value < low or (low_open and value == low) or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise _invalid(name, f"'{name}' must be in {interval}, got {value:g}")
    return float(value)


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _invalid(name, f"'{name}' must be true or false, got {json.dumps(value)}", "invalid_type")
    return value


def _prompts(body: dict) -> list[str]:
    prompt = body.get("prompt", None)
    if "prompt" not in body or prompt is None:
        raise _invalid("prompt", "'prompt' is required: a string or a list of strings", "missing_required_parameter")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(item, str) for item in prompt):
        if len(prompt) > MAX_CHOICES:
            raise _invalid("prompt", f"at most {MAX_CHOICES} prompts per request, got {len(prompt)}")
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(_is_integer(item) or isinstance(item, list) for item in prompt):
        raise _invalid("prompt", "token-id prompts are not supported: send the prompt as text", "unsupported_value")
    raise _invalid("prompt", "'prompt' must be a string or a non-empty list of strings", "invalid_type")


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    sequences = [stop] if isinstance(stop, str) else stop
    if not isinstance(sequences, list) or not all(isinstance(item, str) for item in sequences):
        raise _invalid("stop", "'stop' must be a string or a list of strings", "invalid_type")
    if len(sequences) > MAX_STOP_SEQUENCES:
        raise _invalid("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(sequences)}")
    if any(item == "" for item in sequences):
        raise _invalid("stop", "stop sequences must not be empty strings")
    return tuple(sequences)


def _refuse_unsupported(body: dict) -> None:
    """OpenAI fields this server accepts only at their neutral value."""
    for name in ("logprobs", "suffix"):
        if body.get(name) is not None:
            raise _invalid(name, f"'{name}' is not supported by this server", "unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value is not None and (not _is_number(value) or value != 0):
            raise _invalid(name, f"'{name}' is not supported (only 0); use 'repetition_penalty' instead",
                           "unsupported_parameter")
    logit_bias = body.get("logit_bias")
    if logit_bias not in (None, {}):
        raise _invalid("logit_bias", "'logit_bias' is not supported by this server", "unsupported_parameter")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _invalid("user", "'user' must be a string", "invalid_type")


def parse_completion_request(body: Any, model_name: str, max_tokens_limit: int) -> CompletionRequest:
    """Check a decoded /v1/completions body. Raises `APIError` naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_type")
    unknown = sorted(set(body) - _OPENAI_FIELDS - _EXTENSION_FIELDS)
    if unknown:
        raise _invalid(unknown[0], f"unrecognized request argument supplied: {unknown[0]}", "unknown_parameter")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _invalid("model", "'model' must be a string", "invalid_type")
    if model is not None and model != model_name:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")
    _refuse_unsupported(body)
    prompts = _prompts(body)
    n = _integer(body, "n", 1, 1, MAX_CHOICES)
    if len(prompts) * n > MAX_CHOICES:
        raise _invalid("n", f"prompts x n must be at most {MAX_CHOICES}, got {len(prompts)} x {n}")
    best_of = _integer(body, "best_of", None, 1, MAX_CHOICES)
    if best_of is not None and best_of != n:
        raise _invalid("best_of", "'best_of' is not supported (it may only equal n)", "unsupported_parameter")
    stream = _boolean(body, "stream", False)
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise _invalid("stream_options", "'stream_options' is only allowed when 'stream' is true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _invalid("stream_options", "'stream_options' must be an object like {\"include_usage\": true}",
                           "invalid_type")
        include_usage = _boolean(options, "include_usage", False)
    sampling = {
        "max_new_tokens": _integer(body, "max_tokens", min(DEFAULT_MAX_TOKENS, max_tokens_limit), 1,
                                   max_tokens_limit, " (this server's max_tokens limit)"),
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        "top_k": _integer(body, "top_k", 0, 0, 1_000_000),
        "repetition_penalty": _number(body, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True),
        "seed": _integer(body, "seed", None, 0, MAX_SEED),
        "stop": _stop(body),
    }
    return CompletionRequest(prompts=prompts, n=n, stream=stream, include_usage=include_usage,
                             echo=_boolean(body, "echo", False), sampling=sampling)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json_body(request: Request, max_body_bytes: int) -> Any:
    """The request's JSON body, refusing a wrong content type (415), a large body (413) or bad JSON (400)."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {content_type or 'none'!r} "
                            "(e.g. curl -H 'Content-Type: application/json')", code="unsupported_media_type")
    too_large = APIError(413, f"request body is larger than {max_body_bytes} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "invalid Content-Length header", code="invalid_header")
        if int(declared) > max_body_bytes:
            raise too_large
    body = bytearray()
    async for piece in request.stream():  # also bounds chunked bodies, which declare no length
        body += piece
        if len(body) > max_body_bytes:
            raise too_large
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise APIError(400, "request body is not valid UTF-8", code="invalid_json") from None
    except (ValueError, RecursionError) as error:
        raise APIError(400, f"request body is not valid JSON ({error})", code="invalid_json") from None


# ----------------------------------------------------------------------------------------------
# The model thread


class _Cancelled(Exception):
    """The client went away before its request reached the model."""


class ModelWorker:
    """Runs model calls one at a time on a dedicated thread, in arrival order.

    `pending` counts requests queued or running; past `max_pending` new requests are refused (503)
    instead of queueing without bound.
    """

    def __init__(self, language_model: LanguageModelLike, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.language_model = language_model
        self.max_pending = max_pending
        self.pending = 0
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.closing = threading.Event()  # set while the server shuts down: every stream stops

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinystories-model")
            return self._executor

    def open(self) -> None:
        self.closing.clear()

    async def close(self) -> None:
        """Stop running streams at their next token, drop queued calls, wait for the model thread.

        The wait happens off the event loop, which must keep running so cancelled requests can clean up.
        """
        self.closing.set()
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)

    def admit(self) -> None:
        """Count one more request as pending, or refuse it (503) if the queue is full.

        Called on the event loop thread only, like `release`, so the counter needs no lock.
        """
        if self.pending >= self.max_pending:
            raise APIError(503, f"the server is busy ({self.pending} requests pending); retry shortly",
                           type="server_error", code="server_busy")
        self.pending += 1

    def release(self) -> None:
        self.pending -= 1

    def prompt_tokens(self, prompt: str) -> int:
        """How many tokens the model reads for `prompt`, counted as `Completion.prompt_tokens` counts them."""
        encode_prompt = getattr(self.language_model, "encode_prompt", None)  # [EOT] + prompt, cut to the context
        return len(encode_prompt(prompt) if encode_prompt else self.language_model.tokenizer.encode(prompt))

    async def generate(self, prompts: list[str], n: int, sampling: dict[str, Any], gone: threading.Event) -> list[Any]:
        """All prompts x n completions in one batched `generate` call (prompt-major order)."""

        def call() -> list[Any]:
            if gone.is_set() or self.closing.is_set():
                raise _Cancelled()
            return list(self.language_model.generate(prompts if len(prompts) > 1 else prompts[0],
                                                     num_samples=n, **sampling))

        return await asyncio.get_running_loop().run_in_executor(self._pool(), call)

    async def stream(self, jobs: Sequence[tuple[int, str, dict[str, Any]]], stop: threading.Event,
                     ) -> AsyncIterator[tuple[str, int, Any]]:
        """Run `stream` for each (choice index, prompt, sampling) in turn, as one queued call.

        Yields ('prompt_tokens', index, count), ('chunk', index, Chunk) and ('error', index, exception)
        items; the model thread stops at its next step once `stop` is set.
        """
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        done = object()

        def put(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(items.put_nowait, item)

        def should_stop() -> bool:
            return stop.is_set() or self.closing.is_set()

        def produce() -> None:
            index = -1
            try:
                for index, prompt, sampling in jobs:
                    if should_stop():
                        return
                    put(("prompt_tokens", index, self.prompt_tokens(prompt)))
                    chunks = self.language_model.stream(prompt, should_stop=should_stop, **sampling)
                    try:
                        for chunk in chunks:
                            put(("chunk", index, chunk))
                            if should_stop():
                                return
                    finally:
                        if hasattr(chunks, "close"):
                            chunks.close()  # a generator left early runs its cleanup now, on this thread
            except BaseException as error:  # handed to the request, which reports it
                put(("error", index, error))
            finally:
                put(done)

        future = loop.run_in_executor(self._pool(), produce)
        try:
            while (item := await items.get()) is not done:
                yield item
        finally:
            stop.set()
            if not future.done():
                future.cancel()  # still queued: never runs; running: `stop` ends it at its next token


def _completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


async def _watch_disconnect(request: Request, gone: threading.Event) -> None:
    """Set `gone` when the client closes the connection (the body has been read already)."""
    with contextlib.suppress(Exception):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone.set()
                return


# ----------------------------------------------------------------------------------------------
# Server-sent events


class EventStreamResponse(StreamingResponse):
    """A `text/event-stream` response that sets `stop` as soon as the client disconnects.

    Starlette's StreamingResponse only notices a disconnect when its next write fails (ASGI 2.4) or
    cancels the stream silently; generation must stop even while no token is being written.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], stop: threading.Event,
                 on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events, self.stop, self.on_close = events, stop, on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def write() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode("utf-8"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            async with anyio.create_task_group() as group:
                async def write_then_finish() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-write
                        await write()
                    group.cancel_scope.cancel()

                async def listen() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    self.stop.set()  # the model thread stops at its next token
                    group.cancel_scope.cancel()

                group.start_soon(write_then_finish)
                group.start_soon(listen)
        finally:
            self.stop.set()
            await self.events.aclose()  # runs the generator's cleanup now, not at garbage collection
            if self.on_close is not None:
                await self.on_close()  # also when the events never started (their cleanup then never runs)


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------------------------
# The application


def _page_html() -> str:
    return resources.files("tinystories").joinpath("web/index.html").read_text(encoding="utf-8")


# The page may load nothing from elsewhere: everything it needs is inline (it must work offline).
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'",
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}


def create_app(language_model: LanguageModelLike, model_name: str, max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
               *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_pending: int = DEFAULT_MAX_PENDING) -> Starlette:
    """The Starlette app serving `language_model` under `model_name` (API and web page)."""
    if max_tokens_limit < 1:
        raise UserError(f"--max-tokens-limit must be a positive integer, got {max_tokens_limit}")
    worker = ModelWorker(language_model, max_pending=max_pending)
    created = int(time.time())
    page = _page_html()

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_name, "max_tokens_limit": max_tokens_limit,
                             "pending": worker.pending})

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "tinystories"}

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def get_model(request: Request) -> Response:
        if request.path_params["model"] != model_name:
            raise APIError(404, f"the model '{request.path_params['model']}' does not exist", param="model",
                           code="model_not_found")
        return JSONResponse(model_card())

    async def chat_completions(request: Request) -> Response:
        raise APIError(404, "chat completions are not offered by this server (a story model has no chat "
                            "format); use POST /v1/completions", code="unknown_url")

    async def completions(request: Request) -> Response:
        try:
            body = await read_json_body(request, max_body_bytes)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is left to read it
        parsed = parse_completion_request(body, model_name, max_tokens_limit)
        if parsed.stream:
            return await _stream_completion(request, parsed)
        worker.admit()
        gone = threading.Event()
        watcher = asyncio.create_task(_watch_disconnect(request, gone))
        try:
            completions = await worker.generate(parsed.prompts, parsed.n, parsed.sampling, gone)
        except _Cancelled:
            return Response(status_code=499)  # the client closed the connection; nobody reads this
        except UserError as error:
            raise _invalid(None, str(error)) from None
        finally:
            watcher.cancel()
            worker.release()
        if len(completions) != parsed.num_choices:
            raise RuntimeError(f"generate returned {len(completions)} completions for {parsed.num_choices}")
        choices, completion_tokens, prompt_tokens = [], 0, 0
        for index, completion in enumerate(completions):
            prompt = parsed.prompts[index // parsed.n]
            choices.append({"text": (prompt if parsed.echo else "") + completion.text, "index": index,
                            "logprobs": None, "finish_reason": completion.finish_reason})
            completion_tokens += len(completion.token_ids)
            if index % parsed.n == 0:
                prompt_tokens += completion.prompt_tokens  # each prompt is counted once, as OpenAI does
        return JSONResponse({
            "id": _completion_id(), "object": "text_completion", "created": int(time.time()), "model": model_name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    async def _stream_completion(request: Request, parsed: CompletionRequest) -> Response:
        jobs = []
        for index in range(parsed.num_choices):
            sampling = dict(parsed.sampling)
            if sampling["seed"] is not None:
                sampling["seed"] = (sampling["seed"] + index % parsed.n) % (MAX_SEED + 1)  # distinct samples
            jobs.append((index, parsed.prompts[index // parsed.n], sampling))
        stop = threading.Event()
        worker.admit()  # released when the events end (or below, if they never start)
        items = worker.stream(jobs, stop)
        watcher = asyncio.create_task(_watch_disconnect(request, stop))  # while the request waits its turn
        head: list[tuple] = []  # items read before any header is sent
        try:
            # Wait for the first token before answering, so that a model-side UserError is still a 400.
            while not head or head[-1][0] == "prompt_tokens":
                head.append(await items.__anext__())
            if head[-1][0] == "error":
                error = head[-1][2]
                raise _invalid(None, str(error)) if isinstance(error, UserError) else error
        except StopAsyncIteration:  # the client left before its turn came
            worker.release()
            return Response(status_code=499)
        except BaseException:
            stop.set()
            await items.aclose()
            worker.release()
            raise
        finally:
            watcher.cancel()

        released = False

        async def finish() -> None:
            """Stop the model thread's work for this request and give back its slot, exactly once."""
            nonlocal released
            if not released:
                released = True
                stop.set()
                await items.aclose()
                worker.release()

        return EventStreamResponse(_events(parsed, head, items, finish), stop, on_close=finish)

    async def _events(parsed: CompletionRequest, head: list[tuple], items: AsyncIterator[tuple],
                      finish: Callable[[], Awaitable[None]]) -> AsyncIterator[str]:
        completion_id, created_at = _completion_id(), int(time.time())
        eot_id = getattr(language_model.tokenizer, "eot_id", None)
        prompt_tokens, completion_tokens = 0, 0

        def chunk_event(index: int, text: str, finish_reason: str | None) -> str:
            return _sse({"id": completion_id, "object": "text_completion", "created": created_at, "model": model_name,
                         "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}]})

        async def all_items() -> AsyncIterator[tuple]:
            for item in head:
                yield item
            async for item in items:
                yield item

        try:
            async for kind, index, value in all_items():
                if kind == "prompt_tokens":
                    if index % parsed.n == 0:
                        prompt_tokens += value
                    if parsed.echo:
                        yield chunk_event(index, parsed.prompts[index // parsed.n], None)
                elif kind == "chunk":
                    if not (value.finish_reason == "stop" and value.token_id == eot_id):
                        completion_tokens += 1  # as Completion.token_ids: the closing <|endoftext|> is not counted
                    yield chunk_event(index, value.text, value.finish_reason)
                else:  # an error after the response started: report it in-band, as OpenAI does
                    if not isinstance(value, UserError):
                        logger.error("generation failed during a stream", exc_info=value)
                    message = str(value) if isinstance(value, UserError) else "the model failed while generating"
                    yield _sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
                    return
            if parsed.include_usage:
                yield _sse({"id": completion_id, "object": "text_completion", "created": created_at,
                            "model": model_name, "choices": [],
                            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                      "total_tokens": prompt_tokens + completion_tokens}})
            yield "data: [DONE]\n\n"
        finally:
            await finish()

    async def api_error(request: Request, error: APIError) -> Response:
        headers = {"Retry-After": "1"} if error.status == 503 else None
        return error.response(headers)

    async def http_error(request: Request, error: HTTPException) -> Response:
        codes = {404: "unknown_url", 405: "method_not_allowed"}
        message = {404: f"unknown URL: {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed for {request.url.path}"}.get(error.status_code,
                                                                                            str(error.detail))
        return APIError(error.status_code, message, code=codes.get(error.status_code)).response(error.headers)

    async def server_error(request: Request, error: Exception) -> Response:
        return APIError(500, "the server failed to handle the request", type="server_error").response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        worker.open()
        yield
        await worker.close()

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.worker = worker
    app.state.model_name = model_name
    return app


# ----------------------------------------------------------------------------------------------
# Running it


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def bind_socket(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port); UserError if it cannot be had."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise UserError(f"--host {host!r}: cannot resolve it ({error.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn_server(app: Starlette, log_level: str, graceful_timeout: float, access_log: bool):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=graceful_timeout)
    return uvicorn.Server(config)


def serve(language_model: LanguageModelLike, model_name: str, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, log_level: str = "info",
          graceful_timeout: float = 10.0) -> None:
    """Serve until Ctrl+C / SIGTERM, then shut down gracefully.

    On shutdown the server stops accepting connections, lets running requests finish for up to
    `graceful_timeout` seconds, then cancels the rest (their generation stops at the next token).
    """
    app = create_app(language_model, model_name, max_tokens_limit)
    sock = bind_socket(host, port)
    if not _is_loopback(host):
        print(f"warning: listening on {host}, reachable from other machines; the server has no authentication")
    print(f"tinystories: serving '{model_name}' at {_url(sock)}/  (API: {_url(sock)}/v1, Ctrl+C to stop)", flush=True)
    server = _uvicorn_server(app, log_level, graceful_timeout, access_log=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


class BackgroundServer:
    """Serve an app with uvicorn on a background thread: for tests, benchmarks and notebooks.

        with BackgroundServer(create_app(model, "tiny")) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app: Starlette, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning",
                 graceful_timeout: float = 5.0) -> None:
        self.app, self.host, self.port = app, host, port
        self.server = _uvicorn_server(app, log_level, graceful_timeout, access_log=False)
        self.url = ""
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 20.0) -> "BackgroundServer":
        self._socket = bind_socket(self.host, self.port)
        self.url = _url(self._socket)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="tinystories-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Shut down gracefully and wait for the thread (and the model worker) to finish."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the server at {self.url} did not stop within {timeout} s")
        if self._socket is not None:
            self._socket.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
