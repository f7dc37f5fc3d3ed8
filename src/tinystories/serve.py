"""HTTP server: an OpenAI-compatible completions API and a small web page, over the decode engine.

    GET  /                     the web page (self-contained: inline CSS and JS, no network assets)
    GET  /health               {"status": "ok", "model": ..., "max_tokens_limit": ..., "pending": ..., "slots": ...}
    GET  /v1/models            the one served model, OpenAI's list format
    POST /v1/completions       OpenAI's legacy completions API; `stream: true` sends server-sent events
    POST /v1/chat/completions  not offered (a story model has no chat format): OpenAI-style 404

Requests are decoded together (`serve_worker`): every choice of every request is a row
in one slot of the engine's static KV cache; a request joins the running batch at the next step and
leaves it when it ends, and a client that goes away frees its slot at once. Each row keeps its own
sampling options and seed, so a choice gets the same tokens it would get alone (`slots=1` serves one
request at a time). The model runs in a process of its own (`serve_process`), so decoding never waits
for the event loop's GIL; `model_process=False` keeps it on a thread of this one. `logprobs` (0..5)
reports each token's log-probability under the model and its most likely alternatives, as OpenAI's
legacy API; `echo` with `max_tokens: 0` scores a prompt.

Bad input never reaches the model (`serve_schema`): the JSON body is checked field by field and
refused with OpenAI's error shape (400, 404, 405, 413 or 415); nothing of it is logged as a traceback.
The handlers are module-level functions reading what they need from `request.app.state`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tinystories.decoding import TokenLogprobs
from tinystories.errors import UserError
from tinystories.generate import Completion, row_seed, token_offsets
from tinystories.serve_schema import APIError, CompletionRequest, invalid, parse_completion_request, read_json_body
from tinystories.serve_process import ModelProcess
from tinystories.serve_worker import BatchWorker, Job, LanguageModelLike, RequestJobs

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_TOKENS_LIMIT = 1024  # the largest `max_tokens` a request may ask for
DEFAULT_MAX_BODY_BYTES = 256 * 1024  # a story prompt is a few KB; anything near this is abuse
DEFAULT_MAX_PENDING = 64  # requests queued or running before new ones get a 503
DEFAULT_SLOTS = 16  # rows decoded together: each a choice of a running request
EOT_TEXT = "<|endoftext|>"  # how the end-of-text token reads in logprobs (it adds nothing to the text)


@dataclass
class ServerSettings:
    """What the handlers read from `request.app.state.settings`."""

    model_name: str
    max_tokens_limit: int
    max_body_bytes: int
    created: int


# ----------------------------------------------------------------------------------------------
# From a checked request to the worker's jobs


@dataclass
class PromptRead:
    """A prompt as the model reads it: tokens (cut to the context), its own tokens and text for echo."""

    tokens: list[int]
    own_tokens: list[int]
    text: str


def read_prompt(language_model: LanguageModelLike, prompt: str | list[int], whole: bool) -> PromptRead:
    """Text is read as <|endoftext|> + its tokens, token ids as given; longer than the context, the
    last context_length tokens are kept, unless `whole` (its log-probabilities are wanted): a 400."""
    tokenizer, context = language_model.tokenizer, language_model.context_length
    if isinstance(prompt, str):
        own = tokenizer.encode(prompt)
        read, text = [tokenizer.eot_id] + own, prompt
    else:
        own = list(prompt)
        read, text = own, tokenizer.decode(own)
    if len(read) > context:
        if whole:
            raise invalid("prompt", f"the prompt is {len(read)} tokens, more than the context length {context}: "
                                    "echo with logprobs scores a prompt in one window; send a shorter one")
        read = read[-context:]
    return PromptRead(read, own, text)


def make_jobs(parsed: CompletionRequest, language_model: LanguageModelLike) -> tuple[list[Job], list[PromptRead]]:
    """One job per choice (prompt-major: prompt i's n samples, sample j seeded with seed + j)."""
    wants_prompt_logprobs = parsed.echo and parsed.logprobs is not None
    prompts = [read_prompt(language_model, p, wants_prompt_logprobs) for p in parsed.prompts]
    jobs = []
    for index in range(parsed.num_choices):
        sampling = parsed.sampling
        seed = None if sampling is None else row_seed(sampling.seed, index % parsed.n)
        jobs.append(Job(index, prompts[index // parsed.n].tokens, sampling, seed, parsed.logprobs,
                        parsed.logprobs if wants_prompt_logprobs else None))
    return jobs, prompts


# ----------------------------------------------------------------------------------------------
# OpenAI's logprobs objects


def _alternatives(tokenizer: Any, details: TokenLogprobs | None) -> dict[str, float] | None:
    """Each alternative's text -> its log-probability; tokens with the same text (the pieces of one
    UTF-8 character all read U+FFFD) keep the likeliest."""
    if details is None:
        return None
    alternatives: dict[str, float] = {}
    for token, logprob in details.top:  # most likely first
        alternatives.setdefault(_token_text(tokenizer, token), logprob)
    return alternatives


def _token_text(tokenizer: Any, token: int) -> str:
    return EOT_TEXT if token == tokenizer.eot_id else tokenizer.decode([token])


def logprobs_block(tokenizer: Any, tokens: list[int], details: list[TokenLogprobs | None],
                   offsets: list[int]) -> dict[str, list]:
    """{tokens, token_logprobs, top_logprobs, text_offset} for `tokens` (a None detail: a null entry)."""
    return {
        "tokens": [_token_text(tokenizer, token) for token in tokens],
        "token_logprobs": [None if d is None else d.logprob for d in details],
        "top_logprobs": [_alternatives(tokenizer, d) for d in details],
        "text_offset": offsets,
    }


def echo_details(prompt: PromptRead, scored: list[TokenLogprobs]) -> list[TokenLogprobs | None]:
    """The prompt's own tokens' log-probs: the first is null (as OpenAI), each later one given the
    tokens before it (for text, after the leading <|endoftext|> too)."""
    count = len(prompt.own_tokens)
    return ([None] + scored[len(scored) - (count - 1):]) if count else []


def echo_block(tokenizer: Any, prompt: PromptRead, scored: list[TokenLogprobs]) -> dict[str, list]:
    return logprobs_block(tokenizer, prompt.own_tokens, echo_details(prompt, scored),
                          token_offsets(tokenizer, prompt.own_tokens))


def choice_logprobs(tokenizer: Any, parsed: CompletionRequest, prompt: PromptRead, scored: list[TokenLogprobs],
                    completion: Completion, echoed: str) -> dict[str, list] | None:
    """The logprobs object of a non-streamed choice: the echoed prompt's tokens, then the new ones."""
    if parsed.logprobs is None:
        return None
    block = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    parts = [echo_block(tokenizer, prompt, scored)] if parsed.echo else []
    generated, details = list(completion.token_ids), list(completion.logprobs or [None] * len(completion.token_ids))
    offsets = [len(echoed) + offset for offset in token_offsets(tokenizer, generated)]
    if completion.end_logprobs is not None:  # the story ended: its <|endoftext|> is a token too, as OpenAI's
        generated.append(tokenizer.eot_id)
        details.append(completion.end_logprobs)
        offsets.append(len(echoed) + len(completion.text))
    parts.append(logprobs_block(tokenizer, generated, details, offsets))
    for part in parts:
        for key in block:
            block[key].extend(part[key])
    return block


# ----------------------------------------------------------------------------------------------
# POST /v1/completions


def _error_response(error: BaseException) -> Response:
    """A job's failure as the request's answer: the model refused the input (400), or a bug (500; the
    worker logged it)."""
    if isinstance(error, UserError):
        return invalid(None, str(error)).response()
    return APIError(500, "the server failed to handle the request", type="server_error").response()


async def completions(request: Request) -> Response:
    state = request.app.state
    try:
        body = await read_json_body(request, state.settings.max_body_bytes)
    except ClientDisconnect:
        return Response(status_code=400)  # nobody is left to read it
    parsed = parse_completion_request(body, state.settings.model_name, state.settings.max_tokens_limit,
                                      state.language_model.vocab_size)
    jobs, prompts = make_jobs(parsed, state.language_model)
    state.worker.admit()  # released when the answer is complete (or the stream ends)
    try:
        run = RequestJobs(state.worker, jobs)
    except BaseException:
        state.worker.release()
        raise
    if parsed.stream:
        return await stream_completion(request, parsed, prompts, run)
    try:
        return await plain_completion(request, parsed, prompts, run)
    finally:
        state.worker.release()


async def _collect(run: RequestJobs) -> tuple[dict[int, list], dict[int, Completion], BaseException | None]:
    """Every choice's prompt log-probs and completion; on the first error the other choices stop."""
    scored, finished, failure = {}, {}, None
    async for kind, index, value in run.events():
        if kind == "prompt":
            scored[index] = value
        elif kind == "end":
            finished[index] = value
        elif kind == "error" and failure is None:
            failure = value
            run.cancel()
    return scored, finished, failure


async def plain_completion(request: Request, parsed: CompletionRequest, prompts: list[PromptRead],
                           run: RequestJobs) -> Response:
    watcher = asyncio.create_task(_watch_disconnect(request, run.cancelled))
    try:
        scored, finished, failure = await _collect(run)
    finally:
        watcher.cancel()
    if run.cancelled.is_set() and failure is not None and str(failure) == "cancelled":
        return Response(status_code=499)  # the client closed the connection; nobody reads this
    if failure is not None:
        return _error_response(failure)
    tokenizer, choices, prompt_tokens, completion_tokens = request.app.state.language_model.tokenizer, [], 0, 0
    for index in range(parsed.num_choices):
        prompt, completion = prompts[index // parsed.n], finished[index]
        echoed = prompt.text if parsed.echo else ""
        logprobs = choice_logprobs(tokenizer, parsed, prompt, scored.get(index, []), completion, echoed)
        choices.append({"text": echoed + completion.text, "index": index, "logprobs": logprobs,
                        "finish_reason": completion.finish_reason})
        completion_tokens += len(completion.token_ids)
        if index % parsed.n == 0:
            prompt_tokens += len(prompt.tokens)  # each prompt is counted once, as OpenAI does
    settings = request.app.state.settings
    return JSONResponse({
        "id": _completion_id(), "object": "text_completion", "created": int(time.time()),
        "model": settings.model_name, "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    })


class _GiveBack:
    """Ends a streamed request exactly once: its remaining jobs stop, its pending count is returned."""

    def __init__(self, run: RequestJobs, worker: BatchWorker | ModelProcess) -> None:
        self.run, self.worker, self.done = run, worker, False

    async def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.run.cancel()
            self.worker.release()


async def stream_completion(request: Request, parsed: CompletionRequest, prompts: list[PromptRead],
                            run: RequestJobs) -> Response:
    give_back = _GiveBack(run, request.app.state.worker)
    events = run.events()
    watcher = asyncio.create_task(_watch_disconnect(request, run.cancelled))  # while it waits its turn
    try:
        # Wait for the first event before answering, so that a refused prompt is still an HTTP error.
        first = await events.__anext__()
    except BaseException:
        await give_back()
        raise
    finally:
        watcher.cancel()
    if first[0] == "error":
        await give_back()
        cancelled = run.cancelled.is_set() and str(first[2]) == "cancelled"
        return Response(status_code=499) if cancelled else _error_response(first[2])
    writer = StreamWriter(request.app.state, parsed, prompts)
    return EventStreamResponse(writer.events(first, events, give_back), run.cancelled, on_close=give_back)


class StreamWriter:
    """Turns a request's job events into server-sent events, counting usage as they pass."""

    def __init__(self, state: Any, parsed: CompletionRequest, prompts: list[PromptRead]) -> None:
        self.parsed, self.prompts = parsed, prompts
        self.tokenizer, self.model_name = state.language_model.tokenizer, state.settings.model_name
        self.id, self.created = _completion_id(), int(time.time())
        self.prompt_tokens, self.completion_tokens = 0, 0
        self.text_length: dict[int, int] = {}  # characters sent per choice: the next token's text_offset

    async def events(self, first: tuple, rest: AsyncIterator[tuple], finish: Callable[[], Awaitable[None]],
                     ) -> AsyncIterator[str]:
        try:
            async for kind, index, value in _chained(first, rest):
                text, failed = self.render(kind, index, value)
                if text:
                    yield text
                if failed:
                    return  # no [DONE]: the stream did not complete
            if self.parsed.include_usage:
                yield _sse({"id": self.id, "object": "text_completion", "created": self.created,
                            "model": self.model_name, "choices": [],
                            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                                      "total_tokens": self.prompt_tokens + self.completion_tokens}})
            yield "data: [DONE]\n\n"
        finally:
            await finish()

    def render(self, kind: str, index: int, value: Any) -> tuple[str | None, bool]:
        """(the event to send or None, whether the stream failed)."""
        if kind == "prompt":
            return self._prompt(index, value), False
        if kind == "chunk":
            return self._chunk(index, value), False
        if kind == "end":  # a scored-only choice (max_tokens 0) ends without a token
            return (self._event(index, "", "length") if self.parsed.sampling is None else None), False
        # an error after the response started: report it in-band, as OpenAI does
        message = str(value) if isinstance(value, UserError) else "the model failed while generating"
        return _sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}}), True

    def _prompt(self, index: int, scored: list[TokenLogprobs]) -> str | None:
        prompt = self.prompts[index // self.parsed.n]
        if index % self.parsed.n == 0:
            self.prompt_tokens += len(prompt.tokens)
        self.text_length[index] = len(prompt.text) if self.parsed.echo else 0
        if not self.parsed.echo:
            return None
        logprobs = echo_block(self.tokenizer, prompt, scored) if self.parsed.logprobs is not None else None
        return self._event(index, prompt.text, None, logprobs)

    def _chunk(self, index: int, chunk: Any) -> str:
        ended_story = chunk.finish_reason == "stop" and chunk.token_id == self.tokenizer.eot_id
        if not ended_story:  # as Completion.token_ids: the closing <|endoftext|> is not counted
            self.completion_tokens += 1
        logprobs = None
        if self.parsed.logprobs is not None and chunk.logprobs is not None:
            logprobs = logprobs_block(self.tokenizer, [chunk.token_id], [chunk.logprobs], [self.text_length[index]])
        self.text_length[index] += len(chunk.text)
        return self._event(index, chunk.text, chunk.finish_reason, logprobs)

    def _event(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> str:
        return _sse({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_name,
                     "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}]})


async def _chained(first: tuple, rest: AsyncIterator[tuple]) -> AsyncIterator[tuple]:
    yield first
    async for event in rest:
        yield event


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
# The other endpoints and the application


def _page_html() -> str:
    return resources.files("tinystories").joinpath("web/index.html").read_text(encoding="utf-8")


# The page may load nothing from elsewhere: everything it needs is inline (it must work offline).
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'",
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}


async def index(request: Request) -> Response:
    return HTMLResponse(request.app.state.page, headers=_PAGE_HEADERS)


async def health(request: Request) -> Response:
    state = request.app.state
    return JSONResponse({"status": "ok", "model": state.settings.model_name,
                         "max_tokens_limit": state.settings.max_tokens_limit, "pending": state.worker.pending,
                         "slots": state.worker.slots})


def _model_card(settings: ServerSettings) -> dict[str, Any]:
    return {"id": settings.model_name, "object": "model", "created": settings.created, "owned_by": "tinystories"}


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(request.app.state.settings)]})


async def get_model(request: Request) -> Response:
    settings = request.app.state.settings
    if request.path_params["model"] != settings.model_name:
        raise APIError(404, f"the model '{request.path_params['model']}' does not exist", param="model",
                       code="model_not_found")
    return JSONResponse(_model_card(settings))


async def chat_completions(request: Request) -> Response:
    raise APIError(404, "chat completions are not offered by this server (a story model has no chat "
                        "format); use POST /v1/completions", code="unknown_url")


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
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    app.state.worker.open()
    yield
    await app.state.worker.close()


ROUTES = [
    Route("/", index, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
]


def create_app(language_model: LanguageModelLike, model_name: str, max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
               *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_pending: int = DEFAULT_MAX_PENDING,
               slots: int = DEFAULT_SLOTS, model_process: bool = True) -> Starlette:
    """The Starlette app serving `language_model` under `model_name` (API and web page).

    slots: rows decoded together (1: one request at a time). model_process: decode in a process of
    its own (the model must pickle: a `LanguageModel` does), else on a thread of this process (what
    tests of the HTTP layer use with stand-in models). The model starts with the app.
    """
    if max_tokens_limit < 1:
        raise UserError(f"--max-tokens-limit must be a positive integer, got {max_tokens_limit}")
    if slots < 1:
        raise UserError(f"--max-batch must be a positive integer, got {slots}")
    app = Starlette(routes=ROUTES, lifespan=_lifespan,
                    exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.language_model = language_model
    app.state.worker = (ModelProcess if model_process else BatchWorker)(language_model, slots, max_pending)
    app.state.settings = ServerSettings(model_name, max_tokens_limit, max_body_bytes, int(time.time()))
    app.state.page = _page_html()
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
          max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, slots: int = DEFAULT_SLOTS, log_level: str = "info",
          graceful_timeout: float = 10.0) -> None:
    """Serve until Ctrl+C / SIGTERM, then shut down gracefully.

    Before listening, the model process starts and compiles the decode step for `slots` rows (when
    the model compiles: it is then reused for every request). On shutdown the server stops accepting
    connections, lets running requests finish for up to `graceful_timeout` seconds, then cancels the
    rest (at the next token).
    """
    app = create_app(language_model, model_name, max_tokens_limit, slots=slots)
    sock = bind_socket(host, port)
    compile_seconds = app.state.worker.prepare()  # the model process starts and compiles its step
    if compile_seconds is not None:
        print(f"tinystories: compiled the decode step for {slots} rows in {compile_seconds:.0f} s", flush=True)
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

    The app's model process is started with `spawn`, which imports a script's main module again:
    in a script, start servers under `if __name__ == "__main__":`, as `multiprocessing` asks.
    """

    def __init__(self, app: Starlette, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning",
                 graceful_timeout: float = 5.0) -> None:
        self.app, self.host, self.port = app, host, port
        self.server = _uvicorn_server(app, log_level, graceful_timeout, access_log=False)
        self.url = ""
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 600.0) -> "BackgroundServer":
        """Serve, once the app has started (its model process loaded and compiled: seconds to minutes)."""
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
