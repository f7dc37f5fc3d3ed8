"""A small deterministic stand-in for `tinystories.generate.LanguageModel`, for the server tests.

It follows the documented interface (`generate`, `stream`, `tokenizer`, the sampling keywords and
their `UserError`s) and records every call, so tests can check what the server asked of the model,
that calls never overlap, and when a stream was told to stop.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from tinystories.errors import UserError

PIECES = [" The", " little", " dog", " ran", " to", " the", " park", ".", " He", " was", " very", " happy", "."]
FAIL_PROMPT = "<fail>"  # a prompt the fake refuses like a real model refuses a bad prompt
CRASH_PROMPT = "<crash>"  # a prompt on which the fake fails like a bug would


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


@dataclass
class Chunk:
    text: str
    token_id: int | None
    finish_reason: str | None


class ByteTokenizer:
    """One token per UTF-8 byte."""

    eot_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def expected_pieces(prompt: str, seed: int | None, max_new_tokens: int) -> list[str]:
    """The pieces the fake emits: PIECES from an offset fixed by seed and prompt length."""
    start = (seed or 0) + len(prompt)
    return [PIECES[(start + i) % len(PIECES)] for i in range(max_new_tokens)]


class FakeLanguageModel:
    def __init__(self, delay: float = 0.0) -> None:
        self.tokenizer = ByteTokenizer()
        self.delay = delay  # seconds per token, to make requests take time
        self.calls: list[tuple[str, object, dict]] = []  # (method, prompt, sampling)
        self.streams: list[dict] = []  # per stream call: prompt, tokens produced, whether told to stop
        self.overlaps = 0  # model calls that found another call running
        self._busy = threading.Lock()
        self.stream_started = threading.Event()

    def _check(self, sampling: dict) -> dict:
        """Mirror SamplingConfig: the same keywords, defaults and one-line UserErrors."""
        config = {"max_new_tokens": 200, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                  "repetition_penalty": 1.0, "seed": None, "stop": ()}
        unknown = set(sampling) - set(config)
        if unknown:
            raise TypeError(f"unexpected sampling arguments {sorted(unknown)}")
        config.update(sampling)
        if config["temperature"] < 0:
            raise UserError("temperature must be >= 0")
        if not 0 < config["top_p"] <= 1:
            raise UserError("top_p must be in (0, 1]")
        if config["top_k"] < 0 or config["max_new_tokens"] < 1:
            raise UserError("top_k must be >= 0 and max_new_tokens >= 1")
        return config

    def _run(self, prompt: str, config: dict) -> list[Chunk]:
        if prompt == FAIL_PROMPT:
            raise UserError("prompt: refused by the model")
        if prompt == CRASH_PROMPT:
            raise RuntimeError("simulated bug")
        chunks, text = [], ""
        for index, piece in enumerate(expected_pieces(prompt, config["seed"], config["max_new_tokens"])):
            text += piece
            hits = [text.find(stop) for stop in config["stop"] if stop in text]
            if hits:
                cut = min(hits)
                emitted = "".join(chunk.text for chunk in chunks)
                chunks.append(Chunk(text[len(emitted):cut], 1000 + index, "stop"))
                return chunks
            last = index == config["max_new_tokens"] - 1
            chunks.append(Chunk(piece, 1000 + index, "length" if last else None))
        return chunks

    def _enter(self) -> None:
        if not self._busy.acquire(blocking=False):
            self.overlaps += 1
            self._busy.acquire()

    def generate(self, prompt, num_samples: int = 1, use_cache: bool = True, **sampling) -> list[Completion]:
        self._enter()
        try:
            self.calls.append(("generate", prompt, dict(sampling)))
            config = self._check(sampling)
            completions = []
            for one_prompt in [prompt] if isinstance(prompt, str) else prompt:
                for sample in range(num_samples):
                    seed = None if config["seed"] is None else config["seed"] + sample
                    chunks = self._run(one_prompt, dict(config, seed=seed))
                    time.sleep(self.delay * len(chunks))
                    completions.append(Completion("".join(chunk.text for chunk in chunks),
                                                  [chunk.token_id for chunk in chunks], chunks[-1].finish_reason,
                                                  len(self.tokenizer.encode(one_prompt))))
            return completions
        finally:
            self._busy.release()

    def stream(self, prompt: str, use_cache: bool = True, should_stop=None, **sampling):
        self._enter()
        # stopped: should_stop() said so; finished: the generator ended (ran out, stopped or closed).
        record = {"prompt": prompt, "produced": 0, "stopped": False, "finished": False, "should_stop": should_stop}
        try:
            self.calls.append(("stream", prompt, dict(sampling)))
            config = self._check(sampling)
            chunks = self._run(prompt, config)
            self.streams.append(record)
            self.stream_started.set()
            for chunk in chunks:
                if should_stop is not None and should_stop():
                    record["stopped"] = True
                    return
                time.sleep(self.delay)
                record["produced"] += 1
                yield chunk
        finally:
            record["finished"] = True
            self._busy.release()
