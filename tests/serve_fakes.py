"""A small deterministic stand-in for the model under the server: a fake decode engine.

The server decodes through `language_model.new_engine(slots)`. `FakeEngine` has the engine's
interface (`start_many`, `sample`, `advance`, `release`, `active`, `free_slots`) and emits PIECES, one token
id each (`PieceTokenizer`), from an offset fixed by the seed and the prompt, sleeping `delay` seconds
per decode round as a batched step would. It checks nothing about the sampling options: the server
builds the library's real `SamplingConfig`, whose rules are the ones under test. It records what the
server asked of it: every start (prompt, options, seed), how many slots each round decoded, and when
a slot was freed, so tests can check batching, per-row options and disconnects.
"""

from __future__ import annotations

import threading
import time

from tinystories.decoding import TokenLogprobs
from tinystories.errors import UserError

PIECES = [" The", " little", " dog", " ran", " to", " the", " park", ".", " He", " was", " very", " happy", "."]
FAIL_PROMPT = "<fail>"  # a prompt the fake refuses like a model refuses input (a UserError)
CRASH_PROMPT = "<crash>"  # a prompt on which the fake fails like a bug would


class PieceTokenizer:
    """Ids 0..12 are PIECES, 13 is <|endoftext|>, 14.. one per UTF-8 byte (what prompts encode to)."""

    eot_id = len(PIECES)
    first_byte = eot_id + 1
    vocab_size = first_byte + 256

    def encode(self, text: str) -> list[int]:
        return [self.first_byte + byte for byte in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        out = bytearray()
        for i in ids:
            if i < len(PIECES):
                out += PIECES[i].encode("utf-8")
            elif i > self.eot_id:
                out.append(i - self.first_byte)
        return out.decode("utf-8", errors="replace")


def expected_pieces(prompt: str, seed: int | None, max_new_tokens: int) -> list[str]:
    """The pieces the fake emits: PIECES from an offset fixed by seed and prompt length."""
    start = (seed or 0) + len(prompt)
    return [PIECES[(start + i) % len(PIECES)] for i in range(max_new_tokens)]


def fake_logprob(token: int) -> float:
    """The log-probability the fake reports for `token` (its top alternative is always token 0)."""
    return -1.0 - token / 10


class FakeEngine:
    def __init__(self, model: "FakeLanguageModel", slots: int) -> None:
        self.model, self.slots = model, slots
        self.rows: dict[int, dict] = {}  # slot -> the record of the start it serves

    def active(self) -> list[int]:
        return sorted(self.rows)

    def free_slots(self) -> list[int]:
        return [slot for slot in range(self.slots) if slot not in self.rows]

    def start_many(self, starts) -> list:
        """Each start's prompt log-probs, or the error that refused it (the others start anyway)."""
        self.model.prefills.append(len(starts))
        results = []
        for request in starts:
            try:
                results.append(self.start(request.slot, request.tokens, request.config, request.seed,
                                          request.exclude_from_penalty, request.prompt_logprobs))
            except Exception as error:
                results.append(error)
        return results

    def start(self, slot, tokens, config, seed=None, exclude_from_penalty=None, prompt_logprobs=None):
        if slot in self.rows:
            raise RuntimeError(f"slot {slot} is busy")
        tokenizer = self.model.tokenizer
        prompt = tokenizer.decode(tokens[1:] if tokens and tokens[0] == tokenizer.eot_id else tokens)
        record = {"prompt": prompt, "tokens": list(tokens), "config": config, "seed": seed, "slot": slot,
                  "produced": 0, "released": False,
                  "others_produced": {r["prompt"]: r["produced"] for r in self.model.starts}}
        self.model.starts.append(record)
        if prompt == FAIL_PROMPT:
            raise UserError("prompt: refused by the model")
        if prompt == CRASH_PROMPT:
            raise RuntimeError("simulated bug")
        self.rows[slot] = record
        self.model.stream_started.set()
        if prompt_logprobs is None:
            return []
        return [TokenLogprobs(-0.5, [(0, -0.25)][:prompt_logprobs]) for _ in tokens[1:]]

    def sample(self, logprobs=None):
        time.sleep(self.model.delay)
        self.model.rounds.append(len(self.rows))
        sampled = {}
        for slot, record in self.rows.items():
            token = ((record["seed"] or 0) + len(record["prompt"]) + record["produced"]) % len(PIECES)
            record["produced"] += 1
            details = None
            if logprobs is not None:
                details = TokenLogprobs(fake_logprob(token), [(0, fake_logprob(0))][:logprobs])
            sampled[slot] = (token, details)
        return sampled

    def advance(self, fed) -> None:
        if set(fed) != set(self.rows):
            raise RuntimeError("advance feeds every active slot exactly once per round")

    def release(self, slot: int) -> None:
        self.rows.pop(slot)["released"] = True


class FakeLanguageModel:
    def __init__(self, delay: float = 0.0, context_length: int = 1000) -> None:
        self.tokenizer = PieceTokenizer()
        self.vocab_size = self.tokenizer.vocab_size
        self.context_length = context_length
        self.delay = delay  # seconds per decode round, to make requests take time
        self.starts: list[dict] = []  # every row the server started, in order
        self.rounds: list[int] = []  # how many rows each decode round served
        self.prefills: list[int] = []  # how many rows each prefill started together
        self.scored: list[list[int]] = []  # prompts scored without generating (max_tokens 0)
        self.engines = 0
        self.stream_started = threading.Event()

    def new_engine(self, slots: int) -> FakeEngine:
        self.engines += 1
        return FakeEngine(self, slots)

    def score(self, tokens: list[int], top: int = 0) -> list[TokenLogprobs]:
        self.scored.append(list(tokens))
        return [TokenLogprobs(-0.5, [(0, -0.25)][:top]) for _ in tokens[1:]]
