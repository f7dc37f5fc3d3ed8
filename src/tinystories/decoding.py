"""The decode engine: sequences in the slots of a static KV cache, one compiled step for all of them.

    engine = DecodeEngine(model, slots=4)
    engine.start(0, [eot, 72, 105], SamplingConfig(temperature=0))   # prefill slot 0
    token = engine.sample()[0]                                         # its first new token
    engine.advance({0: token})                                         # feed it: next logits

How a step works
----------------
Each slot holds one sequence: its token at position p sits at cache index p (a sequence's first token
is at position 0). A prefill runs the model's own `forward` on one slot's tokens through a one-row
view of the cache. After that, `advance` feeds one token per active slot in a single *decode step*
over every slot: each row writes its new key/value at its own position and attends to the cache's
first slots under a mask (slot <= position, within the sliding window if the model has one). How
many slots is the next quarter of the context above the longest row (`cache_span`), so the step
has at most four shapes per engine size: `torch.compile` compiles each once and reuses it for every
later step and call; free slots ride along (their output is ignored). The step runs the model's own
modules (embeddings, blocks, final norm, head), so every architecture option applies to it as to
training. Compiled, a step of up to four rows does its matrix products as multiply-and-sum loops
that stream the weights (`stream_few_row_linears`), faster on a CPU than a GEMM with so few rows.

When a slot's sequence fills the context, its last `context_length // 2` tokens (the new one
included) are prefilled again at positions 0.. and decoding goes on, for rotary and learned
positions alike. Rolling is per slot, so a sequence rolls exactly when it would alone.

Sampling is per slot: each slot has its own temperature, top-k, top-p, repetition penalty and
`torch.Generator`, kept as (S,) tensors so that one set of tensor ops samples every slot. The random
draw is `torch.multinomial`'s (for one sample: argmax(p / q), q ~ Exp(1) from the generator) over the
tokens the filters kept (probability > 0), in id order: top-k 40 costs 40 draws, not one per
vocabulary entry, and a slot's tokens do not depend on which other slots are busy. When every row is
top-k filtered, everything after the top-k itself runs on each row's k columns instead of the whole
vocabulary (`top_k_candidates`): at 16 rows that is most of a sampling step's time saved. Log-probabilities (of
the model's own distribution, before any sampling filter) are available for every sampled token.

`use_cache=False` gives the reference path: every step recomputes each slot's window from scratch
(same windows, same rolling), so greedy tokens agree with the cached path, also past the context.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tinystories.config import SamplingConfig
from tinystories.model import KVCache

MAX_LOGPROBS = 5  # alternatives per token, as OpenAI's legacy completions API allows


def compile_by_default() -> bool:
    """Compile the decode step unless TINYSTORIES_COMPILE=0 (or torch.compile is missing)."""
    return os.environ.get("TINYSTORIES_COMPILE", "1") != "0" and hasattr(torch, "compile")


def bucket(rows: int) -> int:
    """The engine size for `rows` sequences: the next power of two, so few sizes ever get compiled."""
    return 1 << max(0, rows - 1).bit_length()


def cache_span(filled: int, context_length: int) -> int:
    """How many cache slots a compiled step attends over when its longest row has `filled`: the next
    quarter of the context, so an engine compiles at most four steps and a short sequence does not
    read (and mask) the whole cache: 1.2 ms of small's 8.4 ms step at batch 1 is the 256 slots."""
    quarter = max(1, context_length // 4)
    return min(context_length, -(-filled // quarter) * quarter)


# --- sampling filters, any number of rows, each with its own options -------------------------------


def apply_repetition_penalty(logits: torch.Tensor, present: torch.Tensor,
                             penalty: float | torch.Tensor) -> torch.Tensor:
    """CTRL penalty: for tokens already present, divide positive logits and multiply negative ones.

    logits (B, V) float, present (B, V) bool, penalty a float or (B,) per row (1 = off).
    """
    if isinstance(penalty, torch.Tensor):
        penalty = penalty[:, None]  # (B, 1)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(present, penalized, logits)


def filter_top_k(logits: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept), -inf elsewhere.

    k: an int for every row, or (B,) per row; 0 (or >= V) keeps everything.
    """
    vocab = logits.shape[-1]
    if not isinstance(k, torch.Tensor):
        if k <= 0 or k >= vocab:
            return logits
        kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    else:
        largest = int(k.clamp(0, vocab).max())
        if largest == 0:
            return logits
        best = torch.topk(logits, largest, dim=-1).values  # (B, largest): enough for every row's k
        kth_largest = best.gather(-1, (k.clamp(1, largest) - 1)[:, None])  # (B, 1)
        kth_largest = kth_largest.masked_fill(((k <= 0) | (k >= vocab))[:, None], float("-inf"))
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p.

    p: a float for every row, or (B,) per row; 1 keeps everything.
    """
    if not isinstance(p, torch.Tensor):
        if p >= 1.0:
            return logits
        p = torch.full(logits.shape[:1], p, device=logits.device)
    elif not bool((p < 1.0).any()):
        return logits  # every row off: no sort
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
    drop_sorted = (mass_before >= p[:, None]) & (p < 1.0)[:, None]
    drop_sorted[..., 0] = False  # the most likely token always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def top_k_candidates(scaled: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's top-k logits (ties with the k-th kept) as (values, ids), both (B, W), in id order;
    the W - k columns past a row's k hold -inf. None when a row keeps every token (k <= 0 or k >= V)
    or its ties with the k-th run to the last column looked at (more may lie beyond): the full-row
    filters then apply. Sampling over these columns is the full-row sampling: the same kept tokens
    in the same (id) order; only the softmax adds up k terms instead of V, so a probability can
    differ in its last bit."""
    vocab = scaled.shape[-1]
    if bool(((k <= 0) | (k >= vocab)).any()):
        return None
    width = min(int(k.max()) + 1, vocab)  # one past the largest k: a tie with the k-th shows there
    best = torch.topk(scaled, width, dim=-1)  # (B, W), largest first
    kept = best.values >= best.values.gather(-1, (k - 1)[:, None])  # a prefix of each row
    if bool(kept[:, -1].any()):
        return None
    ids, order = best.indices.sort(dim=-1)
    return best.values.masked_fill(~kept, float("-inf")).gather(-1, order), ids


@dataclass
class RowOptions:
    """Sampling options of B rows as tensors: temperature, top_p (B,) float; top_k (B,) long; penalty (B,)."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    penalty: torch.Tensor

    def take(self, rows: torch.Tensor) -> "RowOptions":
        """The options of `rows` (an index tensor), in that order."""
        return RowOptions(self.temperature[rows], self.top_k[rows], self.top_p[rows], self.penalty[rows])


NoiseDraw = Callable[[list[int]], torch.Tensor]  # counts (B,) -> Exp(1) draws (sum(counts),), row after row


def sample_rows(logits: torch.Tensor, options: RowOptions, draw: NoiseDraw | None,
                present: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of each row (B,) from logits (B, V), every row with its own options.

    Filters in order: repetition penalty, temperature, top-k, top-p. Rows with temperature 0 take the
    argmax. draw(counts): Exp(1) draws for each row's kept tokens (probability > 0), row after row, from
    that row's generator (any values for greedy rows); None when every row is greedy. A row's token is
    then what torch.multinomial(probs[kept], 1) gives from the same generator, as an id of the whole
    vocabulary. Drawing only for kept tokens is the point: Exp(1) draws cost ~30 ns each on a CPU.
    """
    logits = logits.float()
    if present is not None:
        logits = apply_repetition_penalty(logits, present, options.penalty)
    if draw is None:
        return logits.argmax(dim=-1)
    greedy = options.temperature == 0
    scaled = logits / torch.where(greedy, 1.0, options.temperature)[:, None]
    # greedy rows take the argmax below: k = 1 keeps them from sending the batch down the full-row way
    candidates = top_k_candidates(scaled, torch.where(greedy, 1, options.top_k))
    if candidates is None:  # some row samples from the whole vocabulary: filter the full rows
        ids, probs = None, filter_top_p(filter_top_k(scaled, options.top_k), options.top_p).softmax(dim=-1)  # (B, V)
    else:  # every row is top-k filtered: the rest happens on its k columns, not on V
        values, ids = candidates  # (B, W)
        probs = filter_top_p(values, options.top_p).softmax(dim=-1)  # (B, W)
    kept = probs > 0
    noise = draw(kept.sum(dim=-1).tolist())
    race = torch.ones_like(probs).masked_scatter_(kept, noise)  # row-major: each row's draws in id order
    sampled = (probs / race).argmax(dim=-1)
    if ids is not None:
        sampled = ids.gather(-1, sampled[:, None])[:, 0]  # column -> token id
    if not bool(greedy.any()):
        return sampled  # an argmax over (B, V) saved: it costs as much as the top-k
    return torch.where(greedy, logits.argmax(dim=-1), sampled)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A private RNG: seeded with `seed`, or from the OS when None (never the global torch RNG)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return generator


@dataclass
class TokenLogprobs:
    """The model's log-probability of a token and its `top` most likely alternatives (id, logprob)."""

    logprob: float
    top: list[tuple[int, float]]


def logprobs_of(logits: torch.Tensor, chosen: torch.Tensor, top: int) -> list[TokenLogprobs]:
    """Log-softmax of logits (N, V) at the chosen ids (N,), with each row's `top` best alternatives."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    picked = logp.gather(-1, chosen[:, None])[:, 0].tolist()
    if top <= 0:
        return [TokenLogprobs(value, []) for value in picked]
    best = torch.topk(logp, min(top, logp.shape[-1]), dim=-1)
    pairs = zip(best.indices.tolist(), best.values.tolist())
    return [TokenLogprobs(value, list(zip(ids, values))) for value, (ids, values) in zip(picked, pairs)]


@torch.inference_mode()
def score_tokens(model: nn.Module, tokens: Sequence[int], top: int = 0) -> list[TokenLogprobs]:
    """For tokens[1:], the log-probability the model gives each one after the tokens before it
    (one forward pass; at most context_length tokens)."""
    if len(tokens) > model.config.context_length:
        raise ValueError(f"{len(tokens)} tokens do not fit the context of {model.config.context_length}")
    device = model.tok_emb.weight.device
    ids = torch.as_tensor(list(tokens), dtype=torch.long, device=device)
    if len(ids) < 2:
        return []
    logits, _ = model(ids[None, :-1])  # (1, T-1, V)
    return logprobs_of(logits[0], ids[1:], top)


# --- the decode step -------------------------------------------------------------------------------


def decode_step(model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One new token per row through the model's own modules: tokens, positions (B,) -> logits (B, V).

    Row b's key/value goes to cache slot positions[b]; it attends to slots <= positions[b] (within
    the sliding window). Every shape is fixed by the cache, so a compiled step never recompiles.
    """
    config = model.config
    x = model.tok_emb(tokens[:, None])  # (B, 1, C)
    if model.pos_emb is not None:
        x = x + model.pos_emb(positions[:, None])
    x = model.dropout(x)
    rotary = None
    if model.rotary is not None:  # positions stay below context_length: the tables cover them
        rotary = (model.rotary.cos_table[positions][:, None, None, :],  # (B, 1, 1, D/2)
                  model.rotary.sin_table[positions][:, None, None, :])
    slots = torch.arange(cache.max_length, device=tokens.device)[None, :]  # (1, S)
    allowed = slots <= positions[:, None]  # (B, S)
    if config.sliding_window is not None:
        allowed = allowed & (slots > positions[:, None] - config.sliding_window)
    mask = allowed[:, None, None, :]  # (B, 1, 1, S)
    x = model.run_blocks(x, tokens[:, None], rotary, mask, cache, positions)
    return model.logits(model.norm_f(x))[:, 0]  # (B, V): the model's own head (soft-capped if configured)


# The size/alignment checks are debugging aids that cost a Python call per buffer on every step.
_INDUCTOR_OPTIONS = {"size_asserts": False, "alignment_asserts": False}


# Up to this many rows a product streams the weights faster as a multiply and a sum than through
# MKL's GEMM (small's products at 2 threads: 3x at 2 rows, 1.9x at 4, even at 8; tiny's even).
STREAMED_ROWS = 4


def few_row_product(rows: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """(..., C) @ (C, N) as a multiply and a sum over C: inductor turns it into one loop that streams
    the matrix once, ~2x faster than MKL's GEMM with one row (benchmarks/decode_bound.py)."""
    return (rows[..., :, None] * matrix).sum(dim=-2)  # (..., C, 1) * (C, N) -> (..., N)


def _is_few_fp32_rows(rows: Any, weight: Any) -> bool:
    return (isinstance(rows, torch.Tensor) and isinstance(weight, torch.Tensor) and rows.device.type == "cpu"
            and rows.dtype == weight.dtype == torch.float32 and rows.numel() // rows.shape[-1] <= STREAMED_ROWS)


def stream_few_row_linears(graph_module: torch.fx.GraphModule) -> int:
    """Rewrite every `F.linear` of at most STREAMED_ROWS fp32 rows in a Dynamo graph (every linear
    and the head of a step of up to 4 slots) as `few_row_product`; returns how many. Done on the
    graph inductor is given, so its caches key on the rewritten graph. fp32 only: a half-precision
    sum would round where the GEMM accumulates in fp32."""
    graph, rewritten = graph_module.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not F.linear:
            continue
        rows, weight = node.args[:2]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not _is_few_fp32_rows(rows.meta.get("example_value"), weight.meta.get("example_value")):
            continue
        with graph.inserting_before(node):
            matrix = graph.call_function(torch.t, (weight,))  # (C, N): W's memory, read row by row
            product = graph.call_function(few_row_product, (rows, matrix))
            if bias is not None:
                product = graph.call_function(torch.add, (product, bias))
        node.replace_all_uses_with(product)
        graph.erase_node(node)
        rewritten += 1
    graph_module.recompile()
    return rewritten


def math_attention_step(model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor,
                        cache: KVCache) -> torch.Tensor:
    """`decode_step` with attention as plain matmuls and a softmax, which inductor fuses: for one
    query per row that is ~20% faster than the flash kernel (measured on the tiny preset, CPU)."""
    with sdpa_kernel(SDPBackend.MATH):
        return decode_step(model, tokens, positions, cache)


class CompiledStep:
    """`decode_step` compiled by inductor for one engine's tensors, then called without Dynamo.

    The first call compiles through torch.compile (inductor's on-disk cache makes a repeat take
    seconds) and keeps the compiled graph with the tensors it was traced with: the model's
    parameters and the engine's own tokens, positions and cache, which the engine updates in place
    and passes again on every step. Later calls run the graph on those same tensors directly: no
    guard evaluation and no Dynamo frame, which on a model this small is half of a compiled step.
    If compiling fails (no C++ compiler, an unsupported op...), the eager step, with one warning:
    compiling is a speed-up, never a requirement.
    """

    def __init__(self) -> None:
        self.graph: Callable[..., Any] | None = None
        self.inputs: list[torch.Tensor] = []
        self.traced_with: tuple[Any, ...] = ()
        self.failed = False

    def _backend(self, graph_module: Any, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        from torch._inductor.compile_fx import compile_fx

        stream_few_row_linears(graph_module)
        compiled = compile_fx(graph_module, example_inputs, config_patches=_INDUCTOR_OPTIONS)
        self.graph, self.inputs = compiled, list(example_inputs)
        return compiled

    def __call__(self, model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor,
                 cache: KVCache) -> torch.Tensor:
        arguments = (model, tokens, positions, cache)
        if self.graph is not None and all(a is b for a, b in zip(arguments, self.traced_with)):
            return self.graph(*self.inputs)[0]
        if self.failed:
            return decode_step(*arguments)
        try:
            logits = torch.compile(math_attention_step, backend=self._backend, fullgraph=True,
                                   dynamic=False)(*arguments)
            self.traced_with = arguments
            return logits
        except Exception as error:  # a backend failure: decode eagerly from now on
            self.failed, self.graph = True, None
            first_line = str(error).splitlines()[0] if str(error) else ""
            warnings.warn(f"torch.compile of the decode step failed ({type(error).__name__}: {first_line}); "
                          "decoding eagerly", stacklevel=2)
            return decode_step(*arguments)
        finally:
            # Dynamo's own cache of this function is not used (later calls bypass it): drop it, so
            # that many engines never pile up entries against its recompile limit.
            if hasattr(torch._dynamo, "reset_code"):
                torch._dynamo.reset_code(math_attention_step.__code__)


@dataclass
class SlotStart:
    """What `DecodeEngine.start_many` needs for one slot (the arguments of `start`)."""

    slot: int
    tokens: list[int]
    config: SamplingConfig
    seed: int | None = None
    exclude_from_penalty: int | None = None
    prompt_logprobs: int | None = None


def is_quantized(model: nn.Module) -> bool:
    """Dynamic int8 models (torch.ao) run their own kernels; they are decoded eagerly."""
    return any(type(module).__module__.startswith("torch.ao.nn.quantized") for module in model.modules())


# --- the engine ------------------------------------------------------------------------------------


class DecodeEngine:
    """`slots` sequences decoded together over one static KV cache (see the module docstring).

    start(slot, tokens, config, seed) prefills a free slot; sample() draws the next token of every
    active slot; advance({slot: token}) feeds those tokens (every active slot, once per round) and
    computes the next logits; release(slot) frees a slot at once (its rows are simply ignored).
    """

    def __init__(self, model: nn.Module, slots: int, use_cache: bool = True, compile: bool | None = None):
        config = model.config
        self.model, self.slots = model, slots
        self.context_length = config.context_length
        self.keep_on_roll = max(1, self.context_length // 2)
        self.device = model.tok_emb.weight.device
        dtype = model.tok_emb.weight.dtype
        with torch.inference_mode():  # every engine tensor is an inference tensor: the step's guards never change
            self.cache = KVCache(config, slots, self.context_length, self.device, dtype) if use_cache else None
            self.logits = torch.zeros(slots, config.vocab_size, device=self.device)  # (S, V) next-token logits
            self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)  # (S,) fed by the step
            self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)  # (S,)
            self.present = torch.zeros(slots, config.vocab_size, dtype=torch.bool, device=self.device)  # (S, V)
            self.options = RowOptions(torch.ones(slots, device=self.device),
                                      torch.zeros(slots, dtype=torch.long, device=self.device),
                                      torch.ones(slots, device=self.device), torch.ones(slots, device=self.device))
        self.windows: list[list[int] | None] = [None] * slots  # each slot's tokens in the cache; None: free
        self.configs: list[SamplingConfig | None] = [None] * slots
        self.generators: list[torch.Generator | None] = [None] * slots
        self.rolls = 0
        compile = compile_by_default() if compile is None else compile
        self.compiled = bool(compile and use_cache and not is_quantized(model))
        self._span_steps: dict[int, tuple[CompiledStep, KVCache]] = {}  # cache span -> its step and view

    def active(self) -> list[int]:
        return [slot for slot, window in enumerate(self.windows) if window is not None]

    def free_slot(self) -> int | None:
        return next((slot for slot, window in enumerate(self.windows) if window is None), None)

    @torch.inference_mode()
    def start(self, slot: int, tokens: Sequence[int], config: SamplingConfig, seed: int | None = None,
              exclude_from_penalty: int | None = None, prompt_logprobs: int | None = None) -> list[TokenLogprobs]:
        """Prefill `tokens` (1..context_length of them) into free `slot`; its next logits are then ready.

        seed: the slot's RNG seed (None: from the OS). exclude_from_penalty: a token id (the leading
        <|endoftext|>) that the repetition penalty ignores. prompt_logprobs: also return the log-probs
        of tokens[1:] from the prefill, with that many alternatives each.
        """
        (scored,) = self.start_many([SlotStart(slot, list(tokens), config, seed, exclude_from_penalty,
                                               prompt_logprobs)])
        if isinstance(scored, Exception):
            raise scored
        return scored

    @torch.inference_mode()
    def start_many(self, starts: Sequence["SlotStart"]) -> list[list[TokenLogprobs] | Exception]:
        """`start` for several free slots at once: their prompts are prefilled in one forward pass.

        Returns, per start, its prompt log-probs ([] unless asked for), or the error that refused it
        (a busy slot, a prompt of the wrong length): the others start all the same.
        """
        results: list[list[TokenLogprobs] | Exception] = []
        for request in starts:
            try:
                self._admit(request)
                results.append([])
            except (ValueError, RuntimeError) as error:
                results.append(error)
        admitted = [request for request, result in zip(starts, results) if not isinstance(result, Exception)]
        scored = {request.slot for request in admitted if request.prompt_logprobs is not None}
        prefilled = self._prefill_together([request.slot for request in admitted], scored)  # slot -> (T, V)
        for index, request in enumerate(starts):
            if request.prompt_logprobs is not None and not isinstance(results[index], Exception):
                ids = torch.as_tensor(request.tokens, device=self.device)
                results[index] = logprobs_of(prefilled[request.slot][:-1], ids[1:], request.prompt_logprobs)
        return results

    def _admit(self, request: "SlotStart") -> None:
        slot, tokens, config = request.slot, request.tokens, request.config
        if self.windows[slot] is not None:
            raise RuntimeError(f"slot {slot} is busy")
        if not 1 <= len(tokens) <= self.context_length:
            raise ValueError(f"a slot holds 1..{self.context_length} tokens, got {len(tokens)}")
        # The options first: a value the tensors cannot hold raises before the slot counts as taken.
        self.options.temperature[slot] = config.temperature
        self.options.top_k[slot] = min(config.top_k, self.logits.shape[-1])  # k >= V keeps every token anyway
        self.options.top_p[slot] = config.top_p
        self.options.penalty[slot] = config.repetition_penalty
        self.windows[slot] = list(tokens)
        self.configs[slot] = config
        self.generators[slot] = None if config.greedy else make_generator(request.seed, self.device)
        self.present[slot] = False
        content = [t for t in tokens if t != request.exclude_from_penalty]
        if content:
            self.present[slot, torch.as_tensor(content, device=self.device)] = True

    def free_slots(self) -> list[int]:
        return [slot for slot, window in enumerate(self.windows) if window is None]

    def release(self, slot: int) -> None:
        self.windows[slot] = None
        self.configs[slot] = None
        self.generators[slot] = None

    @torch.inference_mode()
    def sample(self, logprobs: int | None = None) -> dict[int, tuple[int, TokenLogprobs | None]]:
        """The next token of every active slot: {slot: (token, its logprobs or None)}.

        logprobs: alternatives per token (0..MAX_LOGPROBS) to report, None for no log-probs.
        """
        active = self.active()
        if not active:
            return {}
        generators = [self.generators[slot] for slot in active]
        penalized = any(self.configs[slot].repetition_penalty != 1.0 for slot in active)
        logits, options, present = self.logits, self.options, self.present  # (S, V), (S,), (S, V)
        if len(active) < self.slots:  # only the active rows: a free slot's stale options must not count
            rows = self.cache_rows(active)
            logits, options, present = logits[rows], options.take(rows), present[rows]  # (A, V), (A,), (A, V)
        sampling = any(generator is not None for generator in generators)
        draw = functools.partial(self._draw_noise, generators) if sampling else None
        tokens = sample_rows(logits, options, draw, present if penalized else None)  # (A,)
        if penalized:
            self.present[self.cache_rows(active), tokens] = True
        chosen = tokens.tolist()
        details: list[TokenLogprobs | None] = [None] * len(active)
        if logprobs is not None:
            details = logprobs_of(logits, tokens, logprobs)
        return {slot: (token, detail) for slot, token, detail in zip(active, chosen, details)}

    def _draw_noise(self, generators: list[torch.Generator | None], counts: list[int]) -> torch.Tensor:
        """Each sampling row's `count` Exp(1) draws from its own generator; ones for greedy rows."""
        noise = torch.ones(sum(counts), device=self.device)
        for piece, generator in zip(noise.split(counts), generators):
            if generator is not None:
                piece.exponential_(1.0, generator=generator)
        return noise

    def cache_rows(self, slots: list[int]) -> torch.Tensor:
        return torch.as_tensor(slots, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def advance(self, fed: dict[int, int]) -> None:
        """Feed one token to every active slot and compute each slot's next logits (one decode step;
        a slot whose window is full rolls: its last keep_on_roll tokens are prefilled again)."""
        if set(fed) != set(self.active()):
            raise RuntimeError("advance feeds every active slot exactly once per round")
        stepping, rolling = {}, []
        for slot, token in fed.items():
            window = self.windows[slot]
            if len(window) == self.context_length:
                self.windows[slot] = (window + [token])[-self.keep_on_roll:]
                rolling.append(slot)
            else:
                stepping[slot] = (token, len(window))
                window.append(token)
        if stepping:
            self._step_slots(stepping)
        for slot in rolling:
            self.rolls += 1
            self._prefill(slot)

    def _step_slots(self, stepping: dict[int, tuple[int, int]]) -> None:
        """The decode step for {slot: (token, position)}; other slots feed token 0 at position 0 (free,
        or rolling: they are prefilled afresh right after), so no live cache entry is touched."""
        if self.cache is None:
            for slot in stepping:
                self._recompute(slot)
            return
        tokens, positions = [0] * self.slots, [0] * self.slots
        for slot, (token, position) in stepping.items():
            tokens[slot], positions[slot] = token, position
        self.tokens.copy_(torch.tensor(tokens))
        self.positions.copy_(torch.tensor(positions))
        filled = max(positions) + 1
        if self.compiled:
            step, cache = self._span_step(cache_span(filled, self.context_length))
        else:  # eager: shapes may change, so read only the slots in use
            step, cache = decode_step, self.cache.prefix(filled)
        self.logits = step(self.model, self.tokens, self.positions, cache)  # (S, V)

    def _span_step(self, span: int) -> tuple[CompiledStep, KVCache]:
        """The compiled step over the first `span` cache slots and the view of the cache it runs on
        (kept: a compiled step runs on exactly the tensors it was traced with)."""
        if span not in self._span_steps:
            view = self.cache if span == self.context_length else self.cache.prefix(span)
            self._span_steps[span] = (CompiledStep(), view)
        return self._span_steps[span]

    @torch.inference_mode()
    def compile_steps(self) -> None:
        """Compile the step of every cache span now, so that no request waits on one later. Each
        throwaway step writes slot 0's row at one position, which a later sequence overwrites before
        it attends there (a row attends only to positions it has written)."""
        if not self.compiled or self.active():
            return
        spans = {cache_span(filled, self.context_length) for filled in range(1, self.context_length + 1)}
        for span in sorted(spans):
            self._step_slots({0: (0, span - 1)})

    def _prefill_together(self, slots: list[int], scored: set[int]) -> dict[int, torch.Tensor]:
        """Prefill several slots' windows in one forward: right-padded to the longest, so under causal
        attention no real token sees a pad; each row's keys/values are then copied into its slot.
        Returns the logits of every position (T, V) of the slots in `scored` (for their prompt
        log-probs); the others go through the head at their last position only, all decoding needs."""
        if self.cache is None or len(slots) <= 1:  # none: every start was refused
            return {slot: self._prefill(slot, every_position=slot in scored) for slot in slots}
        windows = [self.windows[slot] for slot in slots]
        lengths = [len(window) for window in windows]
        ids = torch.zeros(len(slots), max(lengths), dtype=torch.long, device=self.device)  # (n, T)
        for row, window in enumerate(windows):
            ids[row, :len(window)] = torch.as_tensor(window, dtype=torch.long, device=self.device)
        scratch = KVCache(self.model.config, len(slots), ids.shape[1], self.device, self.cache.keys[0].dtype)
        hidden = self.model.hidden_states(ids, cache=scratch)  # (n, T, C)
        rows = torch.arange(len(slots), device=self.device)
        last = self.model.logits(hidden[rows, torch.tensor(lengths, device=self.device) - 1])  # (n, V)
        prefilled = {}
        for row, (slot, length) in enumerate(zip(slots, lengths)):
            for layer in range(len(self.cache.keys)):
                self.cache.keys[layer][slot, :, :length] = scratch.keys[layer][row, :, :length]
                self.cache.values[layer][slot, :, :length] = scratch.values[layer][row, :, :length]
            self.logits[slot] = last[row]
            if slot in scored:
                prefilled[slot] = self.model.logits(hidden[row, :length])
        return prefilled

    def _prefill(self, slot: int, every_position: bool = False) -> torch.Tensor:
        """Run the model on the slot's window (filling its cache row); returns the logits (T, V) of
        every position, or (1, V) of the last one only (the head on one position, not T)."""
        if self.cache is None:
            return self._recompute(slot)
        ids = torch.as_tensor(self.windows[slot], dtype=torch.long, device=self.device)[None]  # (1, T)
        hidden = self.model.hidden_states(ids, cache=self.cache.row(slot))[0]  # (T, C)
        logits = self.model.logits(hidden if every_position else hidden[-1:])  # (T | 1, V)
        self.logits[slot] = logits[-1]
        return logits

    def _recompute(self, slot: int) -> torch.Tensor:
        """The no-cache reference: the whole window from scratch."""
        ids = torch.as_tensor(self.windows[slot], dtype=torch.long, device=self.device)[None]  # (1, T)
        logits, _ = self.model(ids)  # (1, T, V)
        self.logits[slot] = logits[0, -1]
        return logits[0]
