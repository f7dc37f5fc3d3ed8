"""The server's decode rounds: continuous batching of every request's choices over one decode engine.

Each choice of a request is a `Job`. `DecodeRounds` owns a `DecodeEngine` with `slots` slots and
runs rounds: take new jobs (they join at the next round, prefilled together into free slots), drop
the jobs whose client went away (their slot is free at once), sample one token for every running
job, hand each its `Chunk` (through the same `Continuation` stop rules as `generate`), and feed the
tokens of the jobs still running to one batched decode step. Jobs beyond the free slots wait in
arrival order. With `slots=1` requests are served one at a time (the mode benchmarks/serve_load.py
compares with).

A job with no sampling options (max_tokens 0) only scores its prompt: one forward pass, no slot.
Every job ends with exactly one ('end', index, Completion) or ('error', index, exception) event;
before that come ('prompt', index, [TokenLogprobs...]) once and ('chunk', index, Chunk) per token.
Only the rounds touch the model, so its tensors are never shared between threads.

The rounds do not know where their jobs come from: `serve_process.ModelProcess` runs them in a
process of their own (what `tinystories serve` does), `BatchWorker` here on a thread of the server's
process (what tests of the HTTP layer use with stand-in models that cannot leave the process).
`Admission` is the event loop's side both share: the count of pending requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

from tinystories.config import SamplingConfig
from tinystories.decoding import SlotStart, TokenLogprobs
from tinystories.errors import UserError
from tinystories.generate import Continuation
from tinystories.serve_schema import APIError

logger = logging.getLogger("tinystories.serve")

Event = tuple[str, int, Any]  # (kind, choice index, value)


class EngineLike(Protocol):
    """What the worker needs from `tinystories.decoding.DecodeEngine`."""

    def active(self) -> list[int]: ...
    def free_slots(self) -> list[int]: ...
    def start_many(self, starts: list[SlotStart]) -> list[list[TokenLogprobs] | Exception]: ...
    def sample(self, logprobs: int | None = None) -> dict[int, tuple[int, TokenLogprobs | None]]: ...
    def advance(self, fed: dict[int, int]) -> None: ...
    def release(self, slot: int) -> None: ...


class LanguageModelLike(Protocol):
    """What the server needs from `tinystories.generate.LanguageModel`."""

    tokenizer: Any
    context_length: int

    def new_engine(self, slots: int) -> EngineLike: ...
    def score(self, tokens: list[int], top: int = 0) -> list[TokenLogprobs]: ...


@dataclass
class Job:
    """One choice of a request: the tokens the model reads and how to continue them.

    sampling None: score the prompt only. logprobs: alternatives to report per generated token (None:
    no log-probs); prompt_logprobs: the same for the prompt's tokens (echo), None for none.
    """

    index: int
    tokens: list[int]
    sampling: SamplingConfig | None
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    emit: Callable[[Event], None] = print  # called on `loop`, the request's event loop
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    key: int = -1  # the worker's name for it where the worker needs one (serve_process.ModelProcess)


def _trim(details: TokenLogprobs | None, top: int | None) -> TokenLogprobs | None:
    if details is None or top is None:
        return None
    return TokenLogprobs(details.logprob, details.top[:top])


def set_decode_threads() -> int:
    """The model gets every core but one, which stays with the event loop (HTTP, JSON, SSE): on
    2 cores, two OpenMP threads that spin-wait while the loop runs make decoding many times slower."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    threads = max(1, min(torch.get_num_threads(), cores - 1))
    torch.set_num_threads(threads)
    return threads


class Admission:
    """The event loop's count of requests queued or running: past `max_pending` new requests are
    refused (503) instead of queueing without bound."""

    def __init__(self, slots: int, max_pending: int) -> None:
        self.slots, self.max_pending = slots, max_pending
        self.pending = 0  # touched on the event loop only (admit / release)

    def admit(self) -> None:
        """Count one more request as pending, or refuse it (503) if the queue is full."""
        if self.pending >= self.max_pending:
            raise APIError(503, f"the server is busy ({self.pending} requests pending); retry shortly",
                           type="server_error", code="server_busy")
        self.pending += 1

    def release(self) -> None:
        self.pending -= 1

    def cancel(self, jobs: list[Job]) -> None:
        """The client of `jobs` went away (their shared `cancelled` flag is set now)."""


class DecodeRounds:
    """The model's side: rounds over one engine (see the module docstring), until `closing` is set.
    Where jobs come from and where events go is the subclass's: `_collect` and `_flush`."""

    def __init__(self, language_model: LanguageModelLike, slots: int) -> None:
        self.language_model, self.slots = language_model, slots
        self.closing = threading.Event()
        self._waiting: deque[Job] = deque()
        self._running: dict[int, tuple[Job, Continuation]] = {}
        self._outbox: list[tuple[Job, Event]] = []  # events of this round, delivered together

    def run(self) -> None:
        engine = self.language_model.new_engine(self.slots)
        while not self.closing.is_set():
            self._collect(block=not self._running and not self._waiting)
            self._drop_cancelled(engine)
            self._fill_slots(engine)
            if self._running:
                self._round(engine)
            self._flush()
        for job in list(self._waiting) + [job for job, _ in self._running.values()]:
            self._send(job, ("error", job.index, UserError("the server is shutting down")))
        self._flush()

    def _collect(self, block: bool) -> None:
        """Move newly submitted jobs to `_waiting` (waiting for one when `block`)."""
        raise NotImplementedError

    def _flush(self) -> None:
        """Hand `_outbox`'s events to their requests and empty it."""
        raise NotImplementedError

    def _send(self, job: Job, event: Event) -> None:
        self._outbox.append((job, event))

    def _drop_cancelled(self, engine: EngineLike) -> None:
        """A job whose client went away frees its slot now; a waiting one never starts."""
        for slot, (job, _) in list(self._running.items()):
            if job.cancelled.is_set():
                engine.release(slot)
                del self._running[slot]
                self._send(job, ("error", job.index, UserError("cancelled")))
        for job in [job for job in self._waiting if job.cancelled.is_set()]:
            self._waiting.remove(job)
            self._send(job, ("error", job.index, UserError("cancelled")))

    def _fill_slots(self, engine: EngineLike) -> None:
        """Start waiting jobs in the free slots, all prefilled together; score-only jobs need no slot."""
        free, joining = engine.free_slots(), []
        while self._waiting and not self.closing.is_set():
            job = self._waiting[0]
            if job.sampling is not None and not free:
                break  # every slot is busy: the job waits for a later round
            self._waiting.popleft()
            if job.sampling is None:
                self._score(job)
            else:
                joining.append((free.pop(0), job))
        if joining:
            self._start(engine, joining)

    def _score(self, job: Job) -> None:
        """A max_tokens 0 job: the prompt's log-probs (if asked for), no generation."""
        try:
            scored = [] if job.prompt_logprobs is None else self.language_model.score(job.tokens, job.prompt_logprobs)
        except Exception as error:
            self._fail(job, error)
            return
        self._send(job, ("prompt", job.index, scored))
        completion = Continuation(self.language_model.tokenizer, SamplingConfig(), len(job.tokens)).completion()
        self._send(job, ("end", job.index, completion))

    def _start(self, engine: EngineLike, joining: list[tuple[int, Job]]) -> None:
        tokenizer = self.language_model.tokenizer
        starts = [SlotStart(slot, job.tokens, job.sampling, job.seed, tokenizer.eot_id, job.prompt_logprobs)
                  for slot, job in joining]
        try:
            results = engine.start_many(starts)
        except Exception as error:  # the prefill itself failed (a bug): these jobs fail, the server goes on
            for slot, job in joining:
                if slot in engine.active():
                    engine.release(slot)
                self._fail(job, error)
            return
        for (slot, job), result in zip(joining, results):
            if isinstance(result, Exception):  # a refused prompt (UserError) or a bug: this job alone fails
                if slot in engine.active():  # refused half-way in: the slot must not decode for nobody
                    engine.release(slot)
                self._fail(job, result)
                continue
            self._send(job, ("prompt", job.index, result))
            self._running[slot] = (job, Continuation(tokenizer, job.sampling, len(job.tokens)))

    def _round(self, engine: EngineLike) -> None:
        """One token for every running job, then one decode step for those that go on."""
        wanted = [job.logprobs for job, _ in self._running.values() if job.logprobs is not None]
        try:
            sampled = engine.sample(max(wanted) if wanted else None)
            fed = {}
            for slot, (token, details) in sampled.items():
                job, continuation = self._running[slot]
                self._send(job, ("chunk", job.index, continuation.push(token, _trim(details, job.logprobs))))
                if continuation.finished:
                    self._send(job, ("end", job.index, continuation.completion()))
                    engine.release(slot)
                    del self._running[slot]
                else:
                    fed[slot] = token
            if fed:
                engine.advance(fed)
        except Exception as error:  # a bug in decoding: every running job fails, the server goes on
            for slot, (job, _) in list(self._running.items()):
                engine.release(slot)
                self._fail(job, error)
            self._running.clear()

    def _fail(self, job: Job, error: Exception) -> None:
        if not isinstance(error, UserError):
            logger.error("generation failed", exc_info=error)
        self._send(job, ("error", job.index, error))


class BatchWorker(DecodeRounds, Admission):
    """The model thread (see the module docstring): `DecodeRounds` on a thread of this process."""

    def __init__(self, language_model: LanguageModelLike, slots: int, max_pending: int) -> None:
        DecodeRounds.__init__(self, language_model, slots)
        Admission.__init__(self, slots, max_pending)
        self._incoming: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def prepare(self) -> float | None:
        """Compile the decode step before serving (when the model compiles): the seconds it took, or None."""
        set_decode_threads()
        return warm_up_seconds(self.language_model, self.slots)

    def open(self) -> None:
        self.closing.clear()
        self._thread = threading.Thread(target=self.run, name="tinystories-model", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Stop at the next round: running and queued jobs end with an error event. The wait happens
        off the event loop, which must keep running so that cancelled requests can clean up."""
        self.closing.set()
        self._incoming.put(None)  # wakes a worker waiting for work
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def submit(self, job: Job) -> None:
        self._incoming.put(job)

    def _flush(self) -> None:
        """Hand the round's events to their event loops: one wake-up per loop and round, not per token."""
        by_loop: dict[Any, list[tuple[Callable[[Event], None], Event]]] = {}
        for job, event in self._outbox:
            by_loop.setdefault(job.loop, []).append((job.emit, event))
        self._outbox.clear()
        for loop, deliveries in by_loop.items():
            if loop is None:
                _deliver(deliveries)
                continue
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(_deliver, deliveries)

    def _collect(self, block: bool) -> None:
        with contextlib.suppress(queue.Empty):
            job = self._incoming.get(block=block)
            while True:
                if job is not None:
                    self._waiting.append(job)
                job = self._incoming.get_nowait()


def warm_up_seconds(language_model: LanguageModelLike, slots: int) -> float | None:
    """`language_model.warm_up(slots)` when it has one: the seconds it took to compile, or None."""
    warm_up = getattr(language_model, "warm_up", None)
    if warm_up is None:
        return None
    started = time.perf_counter()
    compiled = warm_up(slots)
    return time.perf_counter() - started if compiled else None


def _deliver(deliveries: list[tuple[Callable[[Event], None], Event]]) -> None:
    for emit, event in deliveries:
        emit(event)


class CancelFlag(threading.Event):
    """A request's `cancelled` flag: set by whichever part of the server sees the client go first
    (the disconnect watcher, the stream writer, an error), it also tells the worker once, so that a
    worker in another process hears of it."""

    def __init__(self, on_set: Callable[[], None]) -> None:
        super().__init__()
        self._on_set = on_set

    def set(self) -> None:
        if not self.is_set():
            super().set()
            self._on_set()


class RequestJobs:
    """The jobs of one request, submitted to the worker, and the events they send back to the event
    loop. `cancel()` (the client went away) frees their slots at the worker's next round."""

    def __init__(self, worker: Any, jobs: list[Job]) -> None:
        """`worker`: a `BatchWorker` or a `serve_process.ModelProcess` (submit, cancel)."""
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = CancelFlag(lambda: worker.cancel(jobs))
        self.remaining = len(jobs)
        for job in jobs:
            job.emit, job.loop, job.cancelled = self._events.put_nowait, asyncio.get_running_loop(), self.cancelled
            worker.submit(job)

    def cancel(self) -> None:
        self.cancelled.set()

    async def events(self) -> AsyncIterator[Event]:
        """Every event until each job has ended ('end' or 'error')."""
        while self.remaining:
            event = await self._events.get()
            if event[0] in ("end", "error"):
                self.remaining -= 1
            yield event
