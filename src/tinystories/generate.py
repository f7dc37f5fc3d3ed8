"""Sampling stories from a trained model: greedy, temperature, top-k, top-p, repetition penalty.

    lm = load_model("runs/tiny")                    # a run dir, a checkpoint dir or a shipped name
    lm.generate("Once upon a time", temperature=0.8, top_k=40, seed=1)[0].text
    for chunk in lm.stream("Once upon a time"):      # text as it is produced
        print(chunk.text, end="", flush=True)

Stories in the shards read `EOT story EOT story ...`, so every prompt becomes `[EOT] + tokens(prompt)`,
cut to its last `context_length` tokens (with a warning) when it is longer. The tokens are decoded by
`tinystories.decoding.DecodeEngine`: each row in a slot of a static KV cache, one compiled decode step
for all rows, rolling the window past the context, every row sampled with its own RNG; a row's tokens
are the same whether it is decoded alone or in a batch. `use_cache=False` recomputes every window from
scratch (the reference the cache is tested against). Sample j of a prompt uses seed `seed + j`.

Stopping (`Continuation`, used by `generate`, `stream` and the server alike): at `<|endoftext|>`
(not part of the returned text or token ids), after `max_new_tokens`, or when the text contains one of
the `stop` strings (the text is cut before it). Byte-level BPE tokens may end inside a UTF-8
character; text is released only once it decodes cleanly.

Randomness comes only from `torch.Generator`s seeded with `seed` (or from os.urandom when `seed` is
None); the global torch RNG is never read or changed.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from tinystories.config import SamplingConfig, SamplingError
from tinystories.decoding import (
    MAX_LOGPROBS,
    DecodeEngine,
    RowOptions,
    TokenLogprobs,
    apply_repetition_penalty,
    bucket,
    filter_top_k,
    filter_top_p,
    make_generator,
    sample_rows,
    score_tokens,
)
from tinystories.devices import parse_device
from tinystories.errors import UserError
from tinystories.model import eval_mode

__all__ = [
    "Chunk", "Completion", "Continuation", "LanguageModel", "SamplingConfig", "SamplingError", "TextAssembler",
    "apply_repetition_penalty", "filter_top_k", "filter_top_p", "load_model", "make_generator", "prompt_tokens",
    "quantize_int8", "sample_next",
]

REPLACEMENT_CHAR = "\ufffd"
MAX_SEED = 2**63 - 1


# --- results -------------------------------------------------------------------------------------


@dataclass
class Completion:
    """One generated continuation.

    text: the new text only (not the prompt), cut before a stop string if one appeared.
    token_ids: the generated tokens; without the final `<|endoftext|>`; with a stop string, up to and
        including the token that completed it.
    finish_reason: 'stop' (end of text or a stop string) or 'length' (max_new_tokens reached).
    prompt_tokens: tokens the model read before generating: the leading `<|endoftext|>` plus the
        prompt's tokens (after cutting a too-long prompt to the context length).
    logprobs: with `logprobs=N`, one `TokenLogprobs` per token id (the model's own distribution).
    end_logprobs: with `logprobs=N`, those of the closing `<|endoftext|>` when the story ended.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprobs] | None = None
    end_logprobs: TokenLogprobs | None = None


@dataclass
class Chunk:
    """One step of `LanguageModel.stream`: one generated token and the text it released.

    text may be '' (a token ending inside a UTF-8 character, or text held back because it may be the
    start of a stop string). The last chunk has finish_reason 'stop' or 'length' and carries the rest
    of the text; when the story ended, its token_id is the `<|endoftext|>` id.
    """

    text: str
    token_id: int
    finish_reason: str | None = None
    logprobs: TokenLogprobs | None = None


def sample_next(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None,
                present: torch.Tensor | None = None) -> torch.Tensor:
    """Pick the next token of each row from its logits (B, V) -> (B,) int64, all rows with `config`.

    The draw is torch.multinomial's over each row's kept tokens (one generator for all rows, row after row).
    """
    rows, device = logits.shape[0], logits.device
    options = RowOptions(torch.full((rows,), float(config.temperature), device=device),
                         torch.full((rows,), config.top_k, dtype=torch.long, device=device),
                         torch.full((rows,), float(config.top_p), device=device),
                         torch.full((rows,), float(config.repetition_penalty), device=device))
    def draw(counts: list[int]) -> torch.Tensor:
        return torch.empty(sum(counts), device=device).exponential_(1.0, generator=generator)

    return sample_rows(logits, options, None if config.greedy else draw,
                       present if config.repetition_penalty != 1.0 else None)


def row_seed(seed: int | None, sample: int) -> int | None:
    """Sample j of a prompt draws from seed + j: each row has its own stream, reproducible alone."""
    return None if seed is None else (seed + sample) % (MAX_SEED + 1)


def prompt_tokens(tokenizer: Any, prompt: str, context_length: int) -> list[int]:
    """[EOT] + tokens of `prompt`, cut to its last `context_length` tokens (with a warning)."""
    if not isinstance(prompt, str):
        raise SamplingError(f"prompt must be a string, got {type(prompt).__name__}")
    tokens = [tokenizer.eot_id] + tokenizer.encode(prompt)
    if len(tokens) > context_length:
        warnings.warn(f"prompt has {len(tokens)} tokens (with the leading <|endoftext|>), more than the context "
                      f"length {context_length}; keeping its last {context_length} tokens", stacklevel=3)
        tokens = tokens[-context_length:]
    return tokens


# --- text assembly -------------------------------------------------------------------------------


class TextAssembler:
    """Turns one row's generated tokens into text: releases clean UTF-8 only, finds stop strings.

    Byte-level tokens decode by concatenation, so the text of all tokens equals the text of the
    tokens up to the last clean boundary plus the text of the ones after it: each step decodes
    only the few tokens since that boundary instead of the whole sequence.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.token_ids: list[int] = []
        self.text = ""  # clean text of token_ids[:clean_tokens] (cut at a stop string if one appeared)
        self.clean_tokens = 0
        self.released = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string appeared

    def push(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        pending = self.tokenizer.decode(self.token_ids[self.clean_tokens:])
        if pending.endswith(REPLACEMENT_CHAR):
            return  # ends inside a UTF-8 character: wait for the rest
        self._extend(pending)
        self.clean_tokens = len(self.token_ids)

    def finish(self) -> None:
        """No more tokens: take in whatever is pending, even a broken character (as U+FFFD)."""
        if not self.stopped and self.clean_tokens < len(self.token_ids):
            self._extend(self.tokenizer.decode(self.token_ids[self.clean_tokens:]))
            self.clean_tokens = len(self.token_ids)

    def _extend(self, new_text: str) -> None:
        old_length = len(self.text)
        self.text += new_text
        if self.stop:
            search_from = max(0, old_length - self.longest_stop + 1)
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True

    def release(self, final: bool = False) -> str:
        """The text not handed out yet, holding back a tail that may begin a stop string."""
        end = len(self.text)
        if not final and self.stop:
            for stop in self.stop:
                for size in range(min(len(stop) - 1, end), 0, -1):
                    if self.text.endswith(stop[:size]):
                        end = min(end, len(self.text) - size)
                        break
        end = max(end, self.released)
        piece = self.text[self.released:end]
        self.released = end
        return piece


def token_offsets(tokenizer: Any, tokens: Sequence[int]) -> list[int]:
    """Where each token's text starts in the text of all of them (a token inside a UTF-8 character
    starts where that character does), as OpenAI's `text_offset`."""
    assembler, offsets = TextAssembler(tokenizer), []
    for token in tokens:
        offsets.append(len(assembler.text))
        assembler.push(token)
    return offsets


class Continuation:
    """One row's generated tokens and text, and the stop rules: `<|endoftext|>`, a stop string, the
    length limit. `generate`, `stream` and the server all push a row's tokens through one of these.

    push(token) returns the `Chunk` to hand out; its finish_reason is set when that token ended the row.
    """

    def __init__(self, tokenizer: Any, config: SamplingConfig, prompt_tokens: int):
        self.text = TextAssembler(tokenizer, config.stop)
        self.eot_id = tokenizer.eot_id
        self.max_new_tokens = config.max_new_tokens
        self.prompt_tokens = prompt_tokens
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprobs] = []
        self.end_logprobs: TokenLogprobs | None = None  # of the closing <|endoftext|>
        self.offsets: list[int] = []  # where each token's text starts in `text.text`

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int, logprobs: TokenLogprobs | None = None) -> Chunk:
        if self.finished:
            raise RuntimeError("the row has ended")
        if token == self.eot_id:
            self.text.finish()
            self.finish_reason = "stop"
            self.end_logprobs = logprobs
            return Chunk(self.text.release(final=True), token, "stop", logprobs)
        self.offsets.append(len(self.text.text))
        self.text.push(token)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        if self.text.stopped:
            self.finish_reason = "stop"
        elif len(self.text.token_ids) == self.max_new_tokens:
            self.text.finish()
            self.finish_reason = "stop" if self.text.stopped else "length"
        return Chunk(self.text.release(final=self.finished), token, self.finish_reason, logprobs)

    def completion(self) -> Completion:
        """The row as a `Completion` (a row cut short counts as 'length')."""
        self.text.finish()
        return Completion(text=self.text.text, token_ids=list(self.text.token_ids),
                          finish_reason=self.finish_reason or "length", prompt_tokens=self.prompt_tokens,
                          logprobs=list(self.logprobs) if self.logprobs else None, end_logprobs=self.end_logprobs)


def decode_rows(engine: DecodeEngine, rows: Sequence[Sequence[int]], configs: Sequence[SamplingConfig],
                seeds: Sequence[int | None], continuations: Sequence[Continuation], eot_id: int | None,
                logprobs: int | None = None, should_stop: Callable[[], bool] | None = None,
                ) -> Iterator[tuple[int, Chunk]]:
    """Decode rows[i] in slot i of a free `engine` until every row has ended; yields (row, Chunk) per
    token. A row leaves the batch as soon as it ends. `should_stop()` is asked before every step."""
    for slot, row in enumerate(rows):
        engine.start(slot, row, configs[slot], seeds[slot], exclude_from_penalty=eot_id)
    while engine.active():
        if should_stop is not None and should_stop():
            return
        fed = {}
        for slot, (token, details) in engine.sample(logprobs).items():
            yield slot, continuations[slot].push(token, details)
            if continuations[slot].finished:
                engine.release(slot)
            else:
                fed[slot] = token
        if fed:
            engine.advance(fed)

# --- the user-facing model -----------------------------------------------------------------------


class LanguageModel:
    """A model, its tokenizer and run config, ready to generate text.

    `.model` (a `GPT`), `.tokenizer`, `.config` (the `RunConfig`), `.generate(...)`, `.stream(...)`,
    `.score(tokens)`. `compile`: compile the decode step (default: yes unless TINYSTORIES_COMPILE=0).
    Engines (static caches with their compiled steps) are kept between calls, so only the first call
    of each batch size compiles.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, run_config: Any = None, compile: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = run_config
        self.compile = compile
        self.last_stats: dict[str, float] = {}  # tokens, seconds, tokens_per_second of the last call
        self._idle_engines: dict[tuple[int, bool], list[DecodeEngine]] = {}
        self._engines_lock = threading.Lock()
        self._warmed: dict[int, DecodeEngine] = {}  # compiled by warm_up, waiting for new_engine

    def __getstate__(self) -> dict[str, Any]:
        """What a copy in another process needs (the server's model process): the model, tokenizer and
        config; engines and their compiled steps are this process's own and are made again there."""
        return {"model": self.model, "tokenizer": self.tokenizer, "config": self.config, "compile": self.compile}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model"], state["tokenizer"], state["config"], state["compile"])

    @property
    def device(self) -> torch.device:
        return self.model.tok_emb.weight.device

    @property
    def context_length(self) -> int:
        return self.model.config.context_length

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def encode_prompt(self, prompt: str) -> list[int]:
        """The tokens generation starts from: [EOT] + the prompt's tokens (cut to the context)."""
        return prompt_tokens(self.tokenizer, prompt, self.context_length)

    def new_engine(self, slots: int, use_cache: bool = True) -> DecodeEngine:
        """An engine of `slots` slots over this model, for a caller that keeps it (the server does, for
        its lifetime): the one `warm_up` compiled, else a fresh one."""
        with self._engines_lock:
            warmed = self._warmed.pop(slots, None) if use_cache else None
        return warmed or DecodeEngine(self.model, slots, use_cache=use_cache, compile=self.compile)

    def warm_up(self, slots: int = 1) -> bool:
        """Compile the decode step of an engine of `slots` slots now, if this model compiles; the next
        `new_engine(slots)` returns that engine. Returns whether it compiled."""
        engine = self.new_engine(slots)
        if not engine.compiled:
            return False
        with eval_mode(self.model):
            engine.compile_steps()
        with self._engines_lock:
            self._warmed[slots] = engine
        return True

    @contextlib.contextmanager
    def _engine(self, rows: int, use_cache: bool) -> Iterator[DecodeEngine]:
        """An idle engine with room for `rows` (sizes are powers of two), given back afterwards."""
        key = (bucket(rows), use_cache)
        with self._engines_lock:
            idle = self._idle_engines.setdefault(key, [])
            engine = idle.pop() if idle else None
        engine = engine or self.new_engine(*key)
        try:
            with eval_mode(self.model), decode_threads(self.device, rows):
                yield engine
        finally:
            for slot in engine.active():
                engine.release(slot)
            with self._engines_lock:
                self._idle_engines[key].append(engine)

    def generate(self, prompt: str | list[str] = "", num_samples: int = 1, use_cache: bool = True,
                 logprobs: int | None = None, **sampling: Any) -> list[Completion]:
        """Continue each prompt `num_samples` times, all in one batch.

        Returns len(prompts) * num_samples completions, grouped by prompt (prompt 0's samples first).
        `sampling`: the fields of `SamplingConfig` (max_new_tokens, temperature, top_k, top_p,
        repetition_penalty, seed, stop). logprobs=N (0..5) fills each completion's `logprobs`.
        """
        config = SamplingConfig.from_options(**sampling)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise SamplingError("no prompt given")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise SamplingError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        check_logprobs(logprobs)
        encoded = [self.encode_prompt(p) for p in prompts]
        rows = [tokens for tokens in encoded for _ in range(num_samples)]
        seeds = [row_seed(config.seed, j) for _ in encoded for j in range(num_samples)]
        continuations = [Continuation(self.tokenizer, config, len(row)) for row in rows]
        started, tokens = time.perf_counter(), 0
        with self._engine(len(rows), use_cache) as engine:
            for _ in decode_rows(engine, rows, [config] * len(rows), seeds, continuations, self.tokenizer.eot_id,
                                 logprobs):
                tokens += 1
        self._record_stats(tokens, time.perf_counter() - started)
        return [continuation.completion() for continuation in continuations]

    def stream(self, prompt: str = "", use_cache: bool = True, should_stop: Callable[[], bool] | None = None,
               logprobs: int | None = None, **sampling: Any) -> Iterator[Chunk]:
        """Continue `prompt` once, yielding a `Chunk` per generated token as soon as it is sampled.

        `should_stop`, if given, is called before each step; when it returns True the iterator
        ends at once (no final chunk), e.g. because the client went away.
        """
        config = SamplingConfig.from_options(**sampling)
        check_logprobs(logprobs)
        row = self.encode_prompt(prompt)
        return self._stream(row, config, use_cache, should_stop, logprobs)

    def _stream(self, row: list[int], config: SamplingConfig, use_cache: bool,
                should_stop: Callable[[], bool] | None, logprobs: int | None) -> Iterator[Chunk]:
        continuation = Continuation(self.tokenizer, config, len(row))
        started, tokens = time.perf_counter(), 0
        with self._engine(1, use_cache) as engine:
            for _, chunk in decode_rows(engine, [row], [config], [config.seed], [continuation],
                                        self.tokenizer.eot_id, logprobs, should_stop):
                tokens += 1
                yield chunk
        self._record_stats(tokens, time.perf_counter() - started)

    def score(self, tokens: Sequence[int], top: int = 0) -> list[TokenLogprobs]:
        """The model's log-probability of each of tokens[1:] after the tokens before it, with `top`
        alternatives each (one forward pass; at most context_length tokens)."""
        check_logprobs(top)
        with eval_mode(self.model):
            return score_tokens(self.model, tokens, top)

    def _record_stats(self, tokens: int, seconds: float) -> None:
        self.last_stats = {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / max(seconds, 1e-9)}

    def __repr__(self) -> str:
        return (f"LanguageModel({self.model.num_parameters():,} parameters, tokenizer={self.tokenizer.spec!r}, "
                f"context_length={self.context_length}, device={self.device})")


SINGLE_THREAD_ROWS = 4  # up to this many rows, a CPU decodes faster on one thread


@contextlib.contextmanager
def decode_threads(device: torch.device, rows: int) -> Iterator[None]:
    """One torch thread while a small batch decodes on the CPU, then the previous count: a step of a
    model this small is a few dozen tiny kernels, and handing each to a second thread costs more than
    it gains (the shipped tiny: 817 tokens/s on one thread, 551 on two, README)."""
    before = torch.get_num_threads()
    if device.type != "cpu" or rows > SINGLE_THREAD_ROWS or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_logprobs(logprobs: int | None) -> None:
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= MAX_LOGPROBS):
        raise SamplingError(f"logprobs must be an integer in 0..{MAX_LOGPROBS} or None, got {logprobs!r}")

# --- loading -------------------------------------------------------------------------------------


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of every nn.Linear (weights int8, activations quantized per call).

    CPU only. Uses torch.ao.quantization.quantize_dynamic, which torch marks deprecated in favour of
    torchao but which still works in torch 2.13. The tied output head gets its own int8 copy of the
    embedding matrix (the embedding itself stays float), which is what makes it worth it: the head
    is the largest matrix of a small-vocabulary model.
    """
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*")
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def load_model(name_or_path: str | os.PathLike = "tiny", checkpoint: str = "best", device: str = "cpu",
               quantize: str | None = None, compile: bool | None = None) -> LanguageModel:
    """Load a run directory, a checkpoint directory or a shipped model name for generation.

    checkpoint: 'best' or 'last' (for a run directory). quantize: None or 'int8' (CPU only).
    compile: compile the decode step (None: yes, unless TINYSTORIES_COMPILE=0).
    """
    from tinystories.checkpoint import CheckpointError, load_run, shipped_model_path, shipped_models_root

    if quantize not in (None, "int8"):
        raise UserError(f"--quantize {quantize!r}: the only supported value is int8")
    torch_device = parse_device(device)
    if quantize == "int8" and torch_device.type != "cpu":
        raise UserError(f"--quantize int8 runs on the CPU only, not on --device {device}")
    name = str(name_or_path)
    if shipped_model_path(name) is None and not Path(name).exists() and "/" not in name and os.sep not in name:
        root = shipped_models_root()
        shipped = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise CheckpointError(f"{name}: no such run or checkpoint directory, and no shipped model of that name "
                              f"(shipped: {', '.join(shipped) or 'none yet'})")
    model, tokenizer, run_config = load_run(name, checkpoint, torch_device)
    if quantize == "int8":
        model = quantize_int8(model)
    return LanguageModel(model, tokenizer, run_config, compile=compile)
