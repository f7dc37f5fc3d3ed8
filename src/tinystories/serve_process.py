"""The server's model in a process of its own: decode rounds that never wait for the event loop's GIL.

`ModelProcess` is the event loop's side, with the same methods as the in-thread `BatchWorker`: it
counts pending requests, sends each job to the model process and hands the events that come back to
their requests. `_PipeRounds` is the model process's side: the same `DecodeRounds` as the thread,
reading jobs and cancellations from a pipe and writing each round's events back in one message.

Why a process: in one process the model thread gives up the GIL at every torch call and waits for
it while the event loop parses HTTP and writes server-sent events; with 16 streaming clients that
made a batched round ~1.3x slower than the same work alone (benchmarks/serve_load.py, docs/speed.md).

The model process is started with `spawn` (a fresh interpreter: forking a process that already runs
OpenMP and inductor threads is unsafe), gets the `LanguageModel` pickled (weights, tokenizer, config;
no compiled state), compiles its decode step and says it is ready. It ignores Ctrl+C and SIGTERM:
the server shuts it down after its own graceful shutdown, and it exits by itself if the server dies
(its end of the pipe closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
from typing import Any

from tinystories.errors import UserError
from tinystories.serve_schema import APIError
from tinystories.serve_worker import (Admission, DecodeRounds, Event, Job, LanguageModelLike, set_decode_threads,
                                     warm_up_seconds)

logger = logging.getLogger("tinystories.serve")

READY_TIMEOUT = 1800.0  # seconds for the model process to load and compile (a cold compile takes minutes)


class ModelProcess(Admission):
    """The model process seen from the event loop (see the module docstring)."""

    def __init__(self, language_model: LanguageModelLike, slots: int, max_pending: int) -> None:
        super().__init__(slots, max_pending)
        self.language_model = language_model
        self._process: Any = None
        self._connection: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: dict[int, Job] = {}  # job id -> job, from submit until its last event
        self._ids = itertools.count()
        self._outgoing: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._exited: str | None = None  # why the model process is gone, once it is

    def prepare(self) -> float | None:
        """Start the model process and wait until it has compiled its decode step: the seconds the
        compile took (None when the model does not compile). Raises UserError if it fails to start."""
        if self._process is not None:
            return None
        context = multiprocessing.get_context("spawn")
        self._connection, child_end = context.Pipe()
        self._process = context.Process(target=_model_process_main, name="tinystories-model", daemon=True,
                                        args=(self.language_model, self.slots, child_end))
        try:
            self._process.start()  # pickles the language model
        except (TypeError, AttributeError, pickle.PicklingError) as error:
            self._process = None
            raise UserError(f"the model cannot go to a model process ({error}); serve it with "
                            "model_process=False") from None
        finally:
            child_end.close()
        return self._wait_ready()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def exitcode(self) -> int | None:
        """The model process's exit code once it has exited (0: it was told to close), else None."""
        return None if self._process is None else self._process.exitcode

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def _wait_ready(self) -> float | None:
        waited = 0.0
        while not self._connection.poll(1.0):
            waited += 1.0
            if not self._process.is_alive() or waited > READY_TIMEOUT:
                self._process.kill()
                raise UserError(f"the model process exited (code {self._process.exitcode}) before it was ready")
        kind, value = self._connection.recv()
        if kind != "ready":
            self._process.join()
            raise UserError(f"the model process could not start: {value}")
        return value

    def open(self) -> None:
        """On the event loop: start the process if `prepare` has not, then the pipe's two threads."""
        self.prepare()
        self._loop = asyncio.get_running_loop()
        self._threads = [threading.Thread(target=target, name=f"tinystories-model-{name}", daemon=True)
                         for name, target in (("reader", self._read), ("writer", self._write))]
        for thread in self._threads:
            thread.start()

    async def close(self) -> None:
        """Stop the model process at its next round (its jobs end with an error event, delivered
        before this returns), off the event loop so that cancelled requests can clean up."""
        if self._process is None:
            return
        self._outgoing.put(("close",))
        self._outgoing.put(None)
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
        await asyncio.to_thread(self._process.join, 30)
        if self._process.is_alive():
            self._process.kill()
        self._connection.close()

    def submit(self, job: Job) -> None:
        if self._exited is not None:
            raise APIError(503, f"the model process has exited ({self._exited}); restart the server",
                           type="server_error", code="model_exited")
        job_id = next(self._ids)
        self._jobs[job_id] = job
        job.key = job_id
        self._outgoing.put(("job", job_id, job.tokens, job.sampling, job.seed, job.logprobs, job.prompt_logprobs))

    def cancel(self, jobs: list[Job]) -> None:
        self._outgoing.put(("cancel", [job.key for job in jobs]))

    # --- the pipe's threads: a blocked write never stalls the event loop, nor a blocked read -------

    def _write(self) -> None:
        while (message := self._outgoing.get()) is not None:
            try:
                self._connection.send(message)
            except OSError:  # the model process is gone; the reader says so to every job
                return

    def _read(self) -> None:
        while True:
            try:
                events = self._connection.recv()
            except (EOFError, OSError):
                self._loop.call_soon_threadsafe(self._lost)
                return
            if events == "closed":
                return
            self._loop.call_soon_threadsafe(self._deliver, events)

    def _deliver(self, events: list[tuple[int, Event]]) -> None:
        for job_id, (kind, _, value) in events:
            job = self._jobs.pop(job_id, None) if kind in ("end", "error") else self._jobs.get(job_id)
            if job is not None:
                job.emit((kind, job.index, value))

    def _lost(self) -> None:
        """The model process died (killed, out of memory): every job still running fails."""
        self._process.join(5)
        self._exited = f"exit code {self._process.exitcode}"
        logger.error("the model process exited unexpectedly (%s)", self._exited)
        for job in self._jobs.values():
            job.emit(("error", job.index, RuntimeError(f"the model process exited ({self._exited})")))
        self._jobs.clear()


class _PipeRounds(DecodeRounds):
    """The model process's rounds: jobs and cancellations from the pipe, each round's events back."""

    def __init__(self, language_model: LanguageModelLike, slots: int, connection: Any) -> None:
        super().__init__(language_model, slots)
        self.connection = connection
        self._cancelled: dict[int, threading.Event] = {}  # job id -> its flag, while the job lives

    def _collect(self, block: bool) -> None:
        try:
            if not self.connection.poll(None if block else 0):
                return
            while True:
                self._take(self.connection.recv())
                if self.closing.is_set() or not self.connection.poll(0):
                    return
        except (EOFError, OSError):  # the server is gone: nobody is left to serve
            self.closing.set()

    def _take(self, message: tuple) -> None:
        kind, *rest = message
        if kind == "job":
            job_id, tokens, sampling, seed, logprobs, prompt_logprobs = rest
            job = Job(job_id, tokens, sampling, seed, logprobs, prompt_logprobs, key=job_id)
            self._cancelled[job_id] = job.cancelled
            self._waiting.append(job)
        elif kind == "cancel":
            for job_id in rest[0]:
                if job_id in self._cancelled:
                    self._cancelled[job_id].set()
        elif kind == "close":
            self.closing.set()

    def _flush(self) -> None:
        if not self._outbox:
            return
        events = [(job.key, _sendable(event)) for job, event in self._outbox]
        self._outbox.clear()
        for job_id, (kind, _, _) in events:
            if kind in ("end", "error"):
                self._cancelled.pop(job_id, None)
        with contextlib.suppress(OSError):  # the server is gone; `_collect` sees it next
            self.connection.send(events)


def _sendable(event: Event) -> Event:
    """An error event whose exception may not pickle (a bug's, already logged here) goes as its text."""
    kind, index, value = event
    if kind == "error" and not isinstance(value, UserError):
        return kind, index, RuntimeError(f"{type(value).__name__}: {value}")
    return event


def _model_process_main(language_model: LanguageModelLike, slots: int, connection: Any) -> None:
    for signal_number in (signal.SIGINT, signal.SIGTERM):  # the server decides when this process ends
        signal.signal(signal_number, signal.SIG_IGN)
    try:
        set_decode_threads()
        connection.send(("ready", warm_up_seconds(language_model, slots)))
    except Exception as error:  # noqa: BLE001 - whatever it is, the server reports it and exits
        connection.send(("failed", f"{type(error).__name__}: {error}"))
        return
    rounds = _PipeRounds(language_model, slots, connection)
    rounds.run()
    with contextlib.suppress(OSError):
        connection.send("closed")
