"""Stopping on request: SIGINT (Ctrl-C) and SIGTERM become a flag the training loop polls before each step,
so it can finish the step, write a checkpoint and exit (130 / 143) instead of dying mid-write."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopSignals:
    """Turn SIGINT/SIGTERM into a flag the loop polls before each step (so it can checkpoint and exit).

    A second signal raises KeyboardInterrupt, unless `repeat_interrupts` is False. Under torchrun one
    stop can reach a worker twice (a scheduler such as Slurm signals every process of the job, and
    torchrun forwards the signal it got), and torchrun kills workers that outlive its grace period anyway.
    """

    NAMES = {signal.SIGINT: "sigint", signal.SIGTERM: "sigterm"}
    CODES = {None: 0, "sigint": 1, "sigterm": 2}  # for agreeing over ranks (the larger code wins)

    def __init__(self, repeat_interrupts: bool = True):
        self.received: str | None = None
        self.repeat_interrupts = repeat_interrupts
        self._previous: dict[int, Any] = {}

    @property
    def code(self) -> int:
        return self.CODES[self.received]

    @classmethod
    def name_of(cls, code: int) -> str | None:
        return {value: key for key, value in cls.CODES.items()}[int(code)]

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for number in self.NAMES:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame) -> None:
        if self.received is not None:
            if self.repeat_interrupts:
                raise KeyboardInterrupt  # a second signal: stop now (checkpoints are atomic)
            return
        self.received = self.NAMES[number]

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
