"""Sampling stories from a trained model: greedy, temperature, top-k, top-p, repetition penalty.

    lm = load_model("runs/tiny")                    # a run dir, a checkpoint dir or a shipped name
    lm.generate("Once upon a time", temperature=0.8, top_k=40, seed=1)[0].text
    for chunk in lm.stream("Once upon a time"):      # text as it is produced
        print(chunk.text, end="", flush=True)

How a batch is decoded
----------------------
Stories in the shards read `EOT story EOT story ...`, so every prompt becomes `[EOT] + tokens(prompt)`.
Prompts of different lengths are left-padded to one length; a key padding mask hides the pads and
per-row position ids start each row's real tokens at 0, so a row's tokens are the same whether it is
decoded alone or in a batch. With the KV cache the prompt is prefilled in one forward pass, then each
step feeds one token per row. The cache holds `context_length` slots; when it is full, the last
`context_length // 2` tokens of each row are re-prefilled into the emptied cache at positions 0..,
and decoding continues (correct for both rotary and learned positions). In a left-padded batch a
row rolls only when its own tokens fill the context (shorter rows just lose their padding), so
each row rolls exactly when it would alone. Without the cache
(`use_cache=False`) each step re-reads the same token window from scratch, so the two paths see the
same context and give the same tokens under greedy decoding, also past the context length.

Stopping: at `<|endoftext|>` (not part of the returned text or token ids), after `max_new_tokens`,
or when the text contains one of the `stop` strings (the text is cut before it). Byte-level BPE
tokens may end inside a UTF-8 character; text is released only once it decodes cleanly.

Randomness comes only from a `torch.Generator` seeded with `seed` (or from os.urandom when `seed`
is None); the global torch RNG is never read or changed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from tinystories.devices import parse_device
from tinystories.errors import UserError
from tinystories.model import eval_mode

REPLACEMENT_CHAR = "\ufffd"


class SamplingError(UserError):
    """A sampling option is out of range (message is one line naming the option)."""


# --- options and results -------------------------------------------------------------------------


@dataclass
class SamplingConfig:
    """How to pick each next token and when to stop. `temperature=0` means greedy decoding.

    Filters apply in this order: repetition penalty, temperature, top-k, top-p.
    """

    max_new_tokens: int = 200
    temperature: float = 1.0  # 0: greedy (argmax); top_k / top_p are then irrelevant
    top_k: int = 0  # 0: off; else sample among the k most likely tokens
    top_p: float = 1.0  # 1: off; else the smallest set of tokens whose probability reaches top_p
    repetition_penalty: float = 1.0  # 1: off; CTRL-style on tokens already in the prompt or output
    seed: int | None = None  # None: fresh randomness each call
    stop: tuple[str, ...] = ()  # stop strings: the text is cut before the first one that appears

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        self.validate()

    def validate(self) -> None:
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise SamplingError(message)

        need(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
             f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        need(_is_number(self.temperature) and self.temperature >= 0,
             f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        need(_is_int(self.top_k) and self.top_k >= 0, f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        need(_is_number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        need(_is_number(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        need(self.seed is None or _is_int(self.seed), f"seed must be an integer or None, got {self.seed!r}")
        need(all(isinstance(s, str) and s for s in self.stop), f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_options(cls, **options: Any) -> "SamplingConfig":
        """Build from keyword options, with a one-line error for an unknown one."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise SamplingError(f"unknown sampling option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**options)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Completion:
    """One generated continuation.

    text: the new text only (not the prompt), cut before a stop string if one appeared.
    token_ids: the generated tokens; without the final `<|endoftext|>`; with a stop string, up to and
        including the token that completed it.
    finish_reason: 'stop' (end of text or a stop string) or 'length' (max_new_tokens reached).
    prompt_tokens: tokens the model read before generating: the leading `<|endoftext|>` plus the
        prompt's tokens (after cutting a too-long prompt to the context length).
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


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


# --- logit processing and sampling ---------------------------------------------------------------


def apply_repetition_penalty(logits: torch.Tensor, present: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty: for tokens already present, divide positive logits and multiply negative ones.

    logits (B, V) float, present (B, V) bool.
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(present, penalized, logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False  # the most likely token always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None,
                present: torch.Tensor | None = None) -> torch.Tensor:
    """Pick the next token of each row from its logits (B, V) -> (B,) int64."""
    logits = logits.float()
    if present is not None and config.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, present, config.repetition_penalty)
    if config.greedy:
        return logits.argmax(dim=-1)
    logits = logits / config.temperature
    logits = filter_top_k(logits, config.top_k)
    logits = filter_top_p(logits, config.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A private RNG: seeded with `seed`, or from the OS when None (never the global torch RNG)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return generator


# --- the token-level decoder ---------------------------------------------------------------------


class Decoder:
    """Feeds a batch of token rows to the model and returns next-token logits, step by step.

    Holds the current token window of every row (left-padded to a common length), its padding mask
    and position ids, and, with `use_cache`, the KV cache. `next_logits()` gives (B, V) logits for the
    next token; `append(tokens)` adds one token per row, rolling the window when it is full.
    """

    def __init__(self, model: nn.Module, rows: Sequence[Sequence[int]], use_cache: bool = True):
        config = model.config
        self.model = model
        self.context_length = config.context_length
        self.keep_on_roll = max(1, self.context_length // 2)
        self.use_cache = use_cache
        device = model.tok_emb.weight.device
        batch = len(rows)
        C = self.context_length
        with torch.inference_mode():
            self.cache = model.new_cache(batch, C) if use_cache else None
            self.tokens = torch.zeros(batch, C, dtype=torch.long, device=device)  # (B, C) current window
            self.real = torch.zeros(batch, C, dtype=torch.bool, device=device)  # (B, C) False = padding
            self.positions = torch.zeros(batch, C, dtype=torch.long, device=device)  # (B, C)
        self.length = 0  # slots of the window in use
        self.padded = False  # whether any row is left-padded: only then are masks and positions passed
        self.needs_prefill = True
        self.rolls = 0
        self._start_window(rows)

    @torch.inference_mode()
    def _start_window(self, rows: Sequence[Sequence[int]]) -> None:
        """Make `rows` (each 1..C tokens) the window, left-padded; the next step prefills it."""
        width = max(len(row) for row in rows)
        self.tokens.zero_()
        self.real.zero_()
        for b, row in enumerate(rows):
            if len(row):
                self.tokens[b, width - len(row):width] = torch.as_tensor(row, dtype=torch.long)
            self.real[b, width - len(row):width] = True
        self.padded = any(len(row) != width for row in rows)
        # Each row's first real token sits at position 0; pads get position 0 too (they are masked).
        self.positions[:, :width] = (self.real[:, :width].long().cumsum(dim=1) - 1).clamp(min=0)
        self.length = width
        self.needs_prefill = True
        if self.cache is not None:
            self.cache.reset()

    @torch.inference_mode()
    def next_logits(self) -> torch.Tensor:
        """Logits (B, V) for the token after the window."""
        S = self.length
        mask = self.real[:, :S] if self.padded else None
        if self.cache is None:
            positions = self.positions[:, :S] if self.padded else None
            logits, _ = self.model(self.tokens[:, :S], position_ids=positions, key_padding_mask=mask)
        elif self.needs_prefill:
            positions = self.positions[:, :S] if self.padded else None
            logits, _ = self.model(self.tokens[:, :S], cache=self.cache, position_ids=positions, key_padding_mask=mask)
            self.needs_prefill = False
        else:
            # Without padding, slot index == position, which is the model's default.
            positions = self.positions[:, S - 1:S] if self.padded else None
            logits, _ = self.model(self.tokens[:, S - 1:S], cache=self.cache, position_ids=positions,
                                   key_padding_mask=mask)
        return logits[:, -1]  # (B, V)

    @torch.inference_mode()
    def append(self, next_tokens: torch.Tensor) -> None:
        """Add one token per row (B,), rolling the window first if it is full."""
        if self.length == self.context_length:
            self._roll(next_tokens)
            return
        S = self.length
        self.tokens[:, S] = next_tokens
        self.real[:, S] = True
        self.positions[:, S] = self.positions[:, S - 1] + 1 if S else 0
        self.length = S + 1

    def _roll(self, next_tokens: torch.Tensor) -> None:
        """The window is full. A row whose real tokens (with the new one) exceed the context keeps its
        last `keep_on_roll`; a shorter (left-padded) row keeps all of them. Each row thus rolls exactly
        when it would alone, which keeps a batch's output equal to each row's output alone."""
        rows = []
        new = next_tokens.tolist()
        for b in range(self.tokens.shape[0]):
            real_tokens = self.tokens[b, :self.length][self.real[b, :self.length]].tolist() + [new[b]]
            if len(real_tokens) > self.context_length:
                real_tokens = real_tokens[-self.keep_on_roll:]
            rows.append(real_tokens)
        self.rolls += 1
        self._start_window(rows)


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


def decode_tokens(model: nn.Module, rows: Sequence[Sequence[int]], config: SamplingConfig,
                  use_cache: bool = True, eot_id: int | None = None) -> Iterator[list[int]]:
    """Yield the next token of every row, step after step, up to `config.max_new_tokens` steps.

    The caller stops early by leaving the loop (e.g. when every row has ended). Rows that ended keep
    being decoded (their tokens are to be ignored). `eot_id` is excluded from the repetition penalty.
    """
    decoder = Decoder(model, rows, use_cache)
    device = decoder.tokens.device
    generator = None if config.greedy else make_generator(config.seed, device)
    present = None
    if config.repetition_penalty != 1.0:
        with torch.inference_mode():
            present = torch.zeros(len(rows), model.config.vocab_size, dtype=torch.bool, device=device)  # (B, V)
            for b, row in enumerate(rows):
                content = [t for t in row if t != eot_id]
                if content:
                    present[b, torch.as_tensor(content, device=device)] = True
            batch_index = torch.arange(len(rows), device=device)
    with eval_mode(model):
        for step in range(config.max_new_tokens):
            with torch.inference_mode():
                next_tokens = sample_next(decoder.next_logits(), config, generator, present)  # (B,)
                if present is not None:
                    present[batch_index, next_tokens] = True
            yield next_tokens.tolist()
            if step + 1 < config.max_new_tokens:
                decoder.append(next_tokens)


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


# --- the user-facing model -----------------------------------------------------------------------


class LanguageModel:
    """A model, its tokenizer and run config, ready to generate text.

    `.model` (a `GPT`), `.tokenizer`, `.config` (the `RunConfig`), `.generate(...)`, `.stream(...)`.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, run_config: Any = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = run_config
        self.last_stats: dict[str, float] = {}  # tokens, seconds, tokens_per_second of the last call

    @property
    def device(self) -> torch.device:
        return self.model.tok_emb.weight.device

    @property
    def context_length(self) -> int:
        return self.model.config.context_length

    def encode_prompt(self, prompt: str) -> list[int]:
        """The tokens generation starts from: [EOT] + the prompt's tokens (cut to the context)."""
        return prompt_tokens(self.tokenizer, prompt, self.context_length)

    def generate(self, prompt: str | list[str] = "", num_samples: int = 1, use_cache: bool = True,
                 **sampling: Any) -> list[Completion]:
        """Continue each prompt `num_samples` times, all in one batch.

        Returns len(prompts) * num_samples completions, grouped by prompt (prompt 0's samples first).
        `sampling`: the fields of `SamplingConfig` (max_new_tokens, temperature, top_k, top_p,
        repetition_penalty, seed, stop).
        """
        config = SamplingConfig.from_options(**sampling)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise SamplingError("no prompt given")
        if not _is_int(num_samples) or num_samples < 1:
            raise SamplingError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        encoded = [self.encode_prompt(p) for p in prompts]
        rows = [tokens for tokens in encoded for _ in range(num_samples)]
        eot = self.tokenizer.eot_id
        generated: list[list[int]] = [[] for _ in rows]
        finish: list[str | None] = [None] * len(rows)
        texts = [TextAssembler(self.tokenizer, config.stop) for _ in rows] if config.stop else None
        active = len(rows)
        started = time.perf_counter()
        steps = 0
        for step_tokens in decode_tokens(self.model, rows, config, use_cache, eot_id=eot):
            steps += 1
            for b, token in enumerate(step_tokens):
                if finish[b] is not None:
                    continue
                if token == eot:
                    finish[b] = "stop"
                else:
                    generated[b].append(token)
                    if texts is not None:
                        texts[b].push(token)
                        if texts[b].stopped:
                            finish[b] = "stop"
                    if finish[b] is None and len(generated[b]) == config.max_new_tokens:
                        finish[b] = "length"
                if finish[b] is not None:
                    active -= 1
            if not active:
                break
        elapsed = time.perf_counter() - started
        self.last_stats = {"tokens": steps * len(rows), "steps": steps, "seconds": elapsed,
                           "tokens_per_second": steps * len(rows) / max(elapsed, 1e-9)}
        completions = []
        for b, tokens in enumerate(generated):
            if texts is not None:
                texts[b].finish()
                text = texts[b].text
            else:
                text = self.tokenizer.decode(tokens)
            completions.append(Completion(text=text, token_ids=tokens, finish_reason=finish[b] or "length",
                                          prompt_tokens=len(rows[b])))
        return completions

    def stream(self, prompt: str = "", use_cache: bool = True, should_stop: Callable[[], bool] | None = None,
               **sampling: Any) -> Iterator[Chunk]:
        """Continue `prompt` once, yielding a `Chunk` per generated token as soon as it is sampled.

        `should_stop`, if given, is called before each step; when it returns True the iterator
        ends at once (no final chunk), e.g. because the client went away.
        """
        config = SamplingConfig.from_options(**sampling)
        row = self.encode_prompt(prompt)
        return self._stream(row, config, use_cache, should_stop)

    def _stream(self, row: list[int], config: SamplingConfig, use_cache: bool,
                should_stop: Callable[[], bool] | None) -> Iterator[Chunk]:
        eot = self.tokenizer.eot_id
        text = TextAssembler(self.tokenizer, config.stop)
        steps = decode_tokens(self.model, [row], config, use_cache, eot_id=eot)
        try:
            while True:
                if should_stop is not None and should_stop():
                    return
                step_tokens = next(steps, None)
                if step_tokens is None:
                    return
                token = step_tokens[0]
                if token == eot:
                    text.finish()
                    yield Chunk(text.release(final=True), token, "stop")
                    return
                text.push(token)
                if text.stopped:
                    yield Chunk(text.release(final=True), token, "stop")
                    return
                if len(text.token_ids) == config.max_new_tokens:
                    text.finish()
                    yield Chunk(text.release(final=True), token, "stop" if text.stopped else "length")
                    return
                yield Chunk(text.release(), token, None)
        finally:
            steps.close()

    def __repr__(self) -> str:
        return (f"LanguageModel({self.model.num_parameters():,} parameters, tokenizer={self.tokenizer.spec!r}, "
                f"context_length={self.context_length}, device={self.device})")


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
               quantize: str | None = None) -> LanguageModel:
    """Load a run directory, a checkpoint directory or a shipped model name for generation.

    checkpoint: 'best' or 'last' (for a run directory). quantize: None or 'int8' (CPU only).
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
    return LanguageModel(model, tokenizer, run_config)
