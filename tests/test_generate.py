"""Generation: sampling filters (one set of options or one per row), the decode engine (static KV
cache vs no cache, the compiled step, batching, rolling past the context), log-probabilities, text
assembly (UTF-8, stop strings), streaming, int8, the Python API and the `generate` CLI.

Most tests decode eagerly (`compile=False`: the same step function, not compiled) to keep the suite
fast; the tests marked "default path" use the library's default, the compiled step."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from tinystories import cli
from tinystories.checkpoint import save_checkpoint
from tinystories.config import ModelConfig, RunConfig, TrainConfig
from torch._dynamo.utils import counters

from tinystories.decoding import DecodeEngine, RowOptions, bucket, decode_step, sample_rows, top_k_candidates
from tinystories.generate import (
    Chunk,
    Completion,
    LanguageModel,
    SamplingConfig,
    SamplingError,
    TextAssembler,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    load_model,
    sample_next,
)
from tinystories.model import GPT
from tinystories.tokenizer import BytesTokenizer

EOT_ID = 256  # BytesTokenizer: ids 0-255 are bytes, 256 is <|endoftext|>


def random_model(seed: int = 0, std: float = 0.3, **overrides) -> GPT:
    """A random-weight model with large enough weights that greedy decoding does not repeat one token."""
    values = dict(vocab_size=257, context_length=16, n_layer=2, n_head=4, d_model=32, tie_embeddings=False)
    values.update(overrides)
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**values))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, std)
        # The <|endoftext|> logit is 0, below the largest of 256 random logits: stories do not end early.
        model.lm_head.weight[EOT_ID] = 0.0
    return model.eval()


def eager(model: GPT, tokenizer=None) -> LanguageModel:
    """A LanguageModel that decodes with the uncompiled step (fast to start; same code path)."""
    return LanguageModel(model, tokenizer or BytesTokenizer(), compile=False)


VARIANTS = {
    "rope-mha": {},
    "rope-gqa": dict(n_kv_head=2),
    "rope-mqa-window": dict(n_kv_head=1, sliding_window=5),
    "learned-gelu-layernorm": dict(position="learned", mlp="gelu", norm="layernorm", bias=True),
    "learned-window": dict(position="learned", sliding_window=6, n_kv_head=2),
    "rope-gqa-value-embedding": dict(n_kv_head=2, value_embedding=True),
    "rope-input-mix": dict(input_mix=True),
}


# --- sampling filters ----------------------------------------------------------------------------


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = filter_top_k(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, True, False]]
    assert kept[0, 1] == 5.0 and kept[0, 3] == 4.0
    assert torch.equal(filter_top_k(logits, 0), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.1, 0.5, 0.25, 0.15]])
    logits = probs.log()
    # sorted: 0.5, 0.25, 0.15, 0.1 -> cumulative 0.5, 0.75, 0.9, 1.0
    assert torch.isfinite(filter_top_p(logits, 0.5)).tolist() == [[False, True, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.6)).tolist() == [[False, True, True, False]]
    assert torch.isfinite(filter_top_p(logits, 0.85)).tolist() == [[False, True, True, True]]
    assert torch.isfinite(filter_top_p(logits, 0.01)).tolist() == [[False, True, False, False]]
    assert torch.equal(filter_top_p(logits, 1.0), logits)


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 4.0, -1.0]])
    present = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, present, 2.0).tolist() == [[1.0, -4.0, 4.0, -1.0]]


def test_greedy_is_argmax_and_penalty_changes_the_choice():
    logits = torch.tensor([[3.0, 2.5, -1.0]])
    assert sample_next(logits, SamplingConfig(temperature=0), None).tolist() == [0]
    present = torch.tensor([[True, False, False]])
    assert sample_next(logits, SamplingConfig(temperature=0, repetition_penalty=1.5), None, present).tolist() == [1]


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[0.0, math.log(3.0), -1e9, math.log(6.0)]]).repeat(20000, 1)
    generator = torch.Generator().manual_seed(0)
    draws = sample_next(logits, SamplingConfig(temperature=1.0), generator)
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(frequencies, torch.tensor([0.1, 0.3, 0.0, 0.6]), atol=0.015)
    # top_k=2 renormalises over {1, 3}: 1/3, 2/3; temperature 0.5 squares the odds: 1/5, 4/5
    draws = sample_next(logits, SamplingConfig(temperature=0.5, top_k=2), generator)
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(frequencies, torch.tensor([0.0, 0.2, 0.0, 0.8]), atol=0.015)


@pytest.mark.parametrize("options, message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(stop=("",)), "stop"),
    (dict(repetition_penalty=1e300), "repetition_penalty .*float32"),  # the engine holds it as float32
    (dict(temperature=1e39), "temperature .*float32"),
])
def test_sampling_config_rejects_bad_values(options, message):
    with pytest.raises(SamplingError, match=message):
        SamplingConfig(**options)


def test_unknown_sampling_option_is_a_clear_error():
    lm = eager(random_model())
    with pytest.raises(SamplingError, match="temprature"):
        lm.generate("x", temprature=0.5)


# --- the decode engine: KV cache, rolling, batching, the compiled step -----------------------------


GREEDY = SamplingConfig(temperature=0)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_logits_agree_with_a_plain_forward(variant, use_cache):
    model = random_model(std=0.1, **VARIANTS[variant])  # logits of size ~2: float32 error ~1e-6
    prompt = [EOT_ID, 72, 101, 108]
    engine = DecodeEngine(model, slots=2, use_cache=use_cache, compile=False)
    engine.start(1, prompt, GREEDY)  # slot 1: slot 0 stays free and rides along in every step
    sequence = list(prompt)
    for _ in range(model.config.context_length - len(prompt)):
        with torch.no_grad():
            reference = model(torch.tensor([sequence]))[0][0, -1]  # independent: the whole sequence at once
        assert torch.allclose(engine.logits[1], reference, atol=1e-5, rtol=0)
        token = int(reference.argmax())
        assert engine.sample()[1][0] == token
        engine.advance({1: token})
        sequence.append(token)
    assert engine.rolls == 0 and len(engine.windows[1]) == model.config.context_length


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_and_uncached_greedy_tokens_are_identical_past_the_context(variant):
    lm = eager(random_model(**VARIANTS[variant]))
    options = dict(max_new_tokens=45, temperature=0)  # context 16: the window rolls several times
    with_cache = lm.generate("Once upon", **options)[0]
    without_cache = lm.generate("Once upon", use_cache=False, **options)[0]
    assert with_cache.token_ids == without_cache.token_ids
    assert len(set(with_cache.token_ids)) > 3  # a real test: the output is not one repeated token


def test_rolled_window_restarts_positions_at_zero():
    model = random_model(position="learned")  # learned positions fail loudly beyond the context
    C = model.config.context_length
    tokens = [EOT_ID] + list(range(65, 65 + C - 1))  # exactly fills the window
    engine = DecodeEngine(model, slots=1, compile=False)
    engine.start(0, tokens, GREEDY)
    engine.advance({0: 90})
    assert engine.rolls == 1
    kept = (tokens + [90])[-(C // 2):]
    assert engine.windows[0] == kept
    with torch.no_grad():
        expected = model(torch.tensor([kept]))[0][0, -1]
    assert torch.allclose(engine.logits[0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["rope-gqa", "learned-gelu-layernorm", "rope-mqa-window"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_a_batch_gives_the_same_greedy_tokens_as_each_prompt_alone(variant, use_cache):
    lm = eager(random_model(**VARIANTS[variant]))
    prompts = ["A", "Once upon a", "", "The dog ran"]
    options = dict(max_new_tokens=30, temperature=0, use_cache=use_cache)
    batch = lm.generate(prompts, **options)
    alone = [lm.generate(prompt, **options)[0] for prompt in prompts]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    assert [c.prompt_tokens for c in batch] == [1 + len(p) for p in prompts]


def test_rows_join_and_leave_a_running_batch_with_their_own_options():
    """Continuous batching: rows start at different steps, each with its own options and seed, and
    leave early; each row's tokens equal what it gets alone in a one-slot engine."""
    model = random_model()
    rows = {0: ([EOT_ID, 65], SamplingConfig(temperature=0), None, 0),
            2: ([EOT_ID, 66, 67], SamplingConfig(temperature=0.9, top_k=20, seed=5), 5, 3),
            3: ([EOT_ID], SamplingConfig(temperature=1.2, top_p=0.8, repetition_penalty=1.3), 11, 6)}
    lengths = {0: 30, 2: 12, 3: 25}  # row 2 leaves while the others go on; the context (16) rolls

    def alone(tokens, config, seed, length):
        engine = DecodeEngine(model, slots=1, compile=False)
        engine.start(0, tokens, config, seed, exclude_from_penalty=EOT_ID)
        out = []
        while len(out) < length:
            out.append(engine.sample()[0][0])
            engine.advance({0: out[-1]})
        return out

    engine = DecodeEngine(model, slots=4, compile=False)
    together: dict[int, list[int]] = {slot: [] for slot in rows}
    for step in range(40):
        for slot, (tokens, config, seed, joins_at) in rows.items():
            if step == joins_at:
                engine.start(slot, tokens, config, seed, exclude_from_penalty=EOT_ID)
        if not engine.active():
            break
        fed = {}
        for slot, (token, _) in engine.sample().items():
            together[slot].append(token)
            if len(together[slot]) == lengths[slot]:
                engine.release(slot)
            else:
                fed[slot] = token
        if fed:
            engine.advance(fed)
    for slot, (tokens, config, seed, _) in rows.items():
        assert together[slot] == alone(tokens, config, seed, lengths[slot]), slot
    assert len(set(together[3])) > 5


def test_default_path_is_compiled_and_a_second_call_does_not_recompile(monkeypatch):
    monkeypatch.delenv("TINYSTORIES_COMPILE")  # the suite's switch-off (conftest.py): back to the default
    model = random_model(**VARIANTS["rope-mqa-window"])
    lm = LanguageModel(model, BytesTokenizer())  # the default: compiled decode step
    options = dict(max_new_tokens=45, temperature=0)  # context 16: rolls, and the window of 5 applies
    first = lm.generate("Once upon", **options)[0]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1  # something was compiled: the step
    again = lm.generate("Once upon", **options)[0]
    sampled = lm.generate("Once upon", num_samples=1, max_new_tokens=20, temperature=0.8, seed=3)[0]
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation on later calls
    (engine,) = lm._idle_engines[(1, True)]
    assert engine.compiled and all(step.graph is not None for step, _ in engine._span_steps.values())
    reference = eager(model).generate("Once upon", use_cache=False, **options)[0]
    assert first.token_ids == again.token_ids == reference.token_ids
    assert sampled.token_ids == eager(model).generate("Once upon", max_new_tokens=20, temperature=0.8,
                                                       seed=3)[0].token_ids


def test_compiled_step_gives_the_eager_steps_logits():
    """The compiled step (the shape of the test above: no second compile) against the eager one."""
    model = random_model(std=0.1, **VARIANTS["rope-mqa-window"])
    compiled, plain = DecodeEngine(model, 1, compile=True), DecodeEngine(model, 1, compile=False)
    for engine in (compiled, plain):
        engine.start(0, [EOT_ID, 72, 105], GREEDY)
    for _ in range(20):
        assert torch.allclose(compiled.logits, plain.logits, atol=1e-5, rtol=0)
        tokens = {slot: token for slot, (token, _) in plain.sample().items()}
        compiled.advance(tokens)
        plain.advance(tokens)
    assert compiled.rolls == plain.rolls > 0


def test_linears_of_few_rows_become_a_multiply_and_sum_and_others_stay_linears():
    """The compiled step's graph rewrite: an fp32 `F.linear` of 1-4 rows (every linear of a step of up
    to 4 slots) becomes a multiply and a sum, equal to the GEMM; 5 rows, or half precision, stay."""
    from tinystories.decoding import stream_few_row_linears

    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(40, 48, generator=generator), torch.randn(40, generator=generator)

    def step(x, w, b):
        return F.linear(x, w) + F.linear(x, w, b)

    for rows, dtype, expected in ((1, torch.float32, 2), (4, torch.float32, 2), (5, torch.float32, 0),
                                  (1, torch.bfloat16, 0)):
        rewritten = []

        def backend(graph_module, example_inputs):
            rewritten.append(stream_few_row_linears(graph_module))
            return graph_module.forward

        x, w, b = (t.to(dtype) for t in (torch.randn(rows, 1, 48, generator=generator), weight, bias))
        out = torch.compile(step, backend=backend, fullgraph=True, dynamic=False)(x, w, b)
        assert rewritten == [expected], (rows, dtype)
        reference = F.linear(x.double(), w.double()) + F.linear(x.double(), w.double(), b.double())
        tolerance = dict(atol=1e-4, rtol=0) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
        assert torch.allclose(out.double(), reference, **tolerance), (rows, dtype)
        torch._dynamo.reset()


def test_cache_spans_are_the_next_quarter_of_the_context():
    from tinystories.decoding import cache_span

    assert [cache_span(n, 256) for n in (1, 64, 65, 128, 129, 200, 256)] == [64, 64, 128, 128, 192, 256, 256]
    assert [cache_span(n, 10) for n in (1, 2, 3, 9, 10)] == [2, 2, 4, 10, 10]  # quarter 2, capped at 10
    assert [cache_span(n, 3) for n in (1, 2, 3)] == [1, 2, 3]


def test_engine_sizes_are_powers_of_two():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 9, 16, 17)] == [1, 2, 4, 4, 8, 16, 16, 32]


def per_row_draw(generators: list[torch.Generator | None]):
    """Each row's Exp(1) draws from its own generator (ones for rows without one), as the engine draws."""
    def draw(counts: list[int]) -> torch.Tensor:
        pieces = [torch.empty(n).exponential_(1.0, generator=g) if g else torch.ones(n)
                  for n, g in zip(counts, generators)]
        return torch.cat(pieces)
    return draw


def row_options(configs: list[SamplingConfig]) -> RowOptions:
    return RowOptions(torch.tensor([c.temperature for c in configs], dtype=torch.float),
                      torch.tensor([c.top_k for c in configs]), torch.tensor([c.top_p for c in configs]),
                      torch.tensor([c.repetition_penalty for c in configs]))


def reference_token(logits: torch.Tensor, present: torch.Tensor, config: SamplingConfig, seed: int) -> int:
    """One row (1, V) with its options as plain numbers: the full-row filters, then torch.multinomial
    over the tokens they kept, from a generator seeded with `seed`."""
    logits = apply_repetition_penalty(logits, present, config.repetition_penalty)
    if config.greedy:
        return int(logits.argmax())
    probs = filter_top_p(filter_top_k(logits / config.temperature, config.top_k), config.top_p).softmax(-1)[0]
    kept = probs.nonzero()[:, 0]
    assert 1 < len(kept) < logits.shape[-1]  # the filters did cut
    return int(kept[torch.multinomial(probs[kept], 1, generator=torch.Generator().manual_seed(seed)).item()])


def sample_as_rows_alone(logits: torch.Tensor, configs: list[SamplingConfig], present: torch.Tensor) -> None:
    generators = [None if c.greedy else torch.Generator().manual_seed(10 + row) for row, c in enumerate(configs)]
    together = sample_rows(logits, row_options(configs), per_row_draw(generators), present)
    for row, config in enumerate(configs):
        assert int(together[row]) == reference_token(logits[row:row + 1], present[row:row + 1], config, 10 + row)


def test_per_row_options_sample_as_each_row_alone():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    configs = [SamplingConfig(temperature=0.7, top_k=5), SamplingConfig(temperature=0),
               SamplingConfig(temperature=1.3, top_p=0.6, repetition_penalty=2.0)]  # no top-k: the full rows
    present = torch.zeros(3, 50, dtype=torch.bool)
    present[:, :10] = True
    sample_as_rows_alone(logits, configs, present)
    generator = torch.Generator().manual_seed(4)
    probs = (logits[:1] / 0.7).softmax(-1)
    drawn = torch.multinomial(probs, 1, generator=generator).item()
    assert sample_next(logits[:1], SamplingConfig(temperature=0.7), torch.Generator().manual_seed(4)).item() == drawn


def test_top_k_rows_sample_on_their_k_columns_as_each_row_alone():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) * 3
    configs = [SamplingConfig(temperature=0.7, top_k=5), SamplingConfig(temperature=0),  # greedy: no say
               SamplingConfig(temperature=1.3, top_k=40, top_p=0.6, repetition_penalty=2.0),
               SamplingConfig(temperature=1.0, top_k=17)]
    present = torch.zeros(4, 300, dtype=torch.bool)
    present[:, :30] = True
    options = row_options(configs)
    scaled = apply_repetition_penalty(logits, present, options.penalty) / options.temperature.clamp(min=1e-9)[:, None]
    assert top_k_candidates(scaled, torch.tensor([5, 1, 40, 17])) is not None  # this batch takes the k columns
    sample_as_rows_alone(logits, configs, present)
    # ties with the k-th past the columns looked at: the full rows, which keep every tied token
    tied = torch.full((1, 300), -5.0)
    tied[0, 100:110] = 2.0  # ten tokens tie for first place; top-3 keeps all ten
    assert top_k_candidates(tied, torch.tensor([3])) is None
    sample_as_rows_alone(tied, [SamplingConfig(temperature=1.0, top_k=3)], torch.zeros(1, 300, dtype=torch.bool))


def test_top_k_candidates_are_the_full_row_filters_kept_tokens():
    scaled = torch.randn(6, 500, generator=torch.Generator().manual_seed(2)) * 2
    k = torch.tensor([1, 2, 7, 40, 64, 3])
    values, ids = top_k_candidates(scaled, k)
    assert values.shape == ids.shape == (6, 65)  # one column past the largest k
    kept = filter_top_k(scaled, k) > float("-inf")
    for row in range(6):
        real = values[row] > float("-inf")
        assert int(real.sum()) == int(k[row]) == int(kept[row].sum())
        assert torch.equal(ids[row][real], kept[row].nonzero()[:, 0])  # the same tokens, in id order
        assert torch.equal(values[row][real], scaled[row][kept[row]])
    assert top_k_candidates(scaled, torch.tensor([5, 0, 5, 5, 5, 5])) is None  # a row keeps every token
    assert top_k_candidates(scaled, torch.tensor([5, 500, 5, 5, 5, 5])) is None


def test_a_draw_spends_one_exp_value_per_kept_token():
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(3)
    sample_next(logits, SamplingConfig(temperature=0.8, top_k=40), generator)
    after = torch.empty(5).exponential_(1.0, generator=generator)
    reference = torch.Generator().manual_seed(3)
    torch.empty(2 * 40).exponential_(1.0, generator=reference)  # 40 kept tokens in each of the 2 rows
    assert torch.equal(after, torch.empty(5).exponential_(1.0, generator=reference))


def test_long_prompt_is_cut_to_the_context_with_a_warning():
    lm = eager(random_model(position="learned"))
    with pytest.warns(UserWarning, match="context length"):
        completion = lm.generate("x" * 40, max_new_tokens=5, temperature=0)[0]
    assert completion.prompt_tokens == lm.context_length and len(completion.token_ids) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm.generate("x" * 10, max_new_tokens=2)  # fits: no warning


def test_seed_reproduces_samples_without_touching_the_global_rng():
    lm = eager(random_model())
    state = torch.get_rng_state()
    first = lm.generate("Hi", num_samples=3, max_new_tokens=20, seed=7, top_k=50, top_p=0.9, repetition_penalty=1.3)
    assert torch.equal(state, torch.get_rng_state())
    again = lm.generate("Hi", num_samples=3, max_new_tokens=20, seed=7, top_k=50, top_p=0.9, repetition_penalty=1.3)
    other = lm.generate("Hi", num_samples=3, max_new_tokens=20, seed=8, top_k=50, top_p=0.9, repetition_penalty=1.3)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]
    assert len({tuple(c.token_ids) for c in first}) == 3  # the samples of one batch differ
    # sample j of a prompt is seed + j: the same tokens as asking for it alone with that seed
    second_alone = lm.generate("Hi", max_new_tokens=20, seed=8, top_k=50, top_p=0.9, repetition_penalty=1.3)[0]
    assert first[1].token_ids == second_alone.token_ids


def test_repetition_penalty_reduces_repeats():
    lm = eager(random_model())
    plain = lm.generate("aaaa", max_new_tokens=40, temperature=0)[0].token_ids
    penalized = lm.generate("aaaa", max_new_tokens=40, temperature=0, repetition_penalty=100.0)[0].token_ids
    # a huge penalty makes every present token less likely than any unseen one with a positive logit
    assert len(set(penalized)) > len(set(plain))


# --- stopping and text ---------------------------------------------------------------------------


class ScriptedGPT(GPT):
    """A GPT whose next token is scripted by position: predicts script[p + 1] at position p."""

    def __init__(self, script: list[int], context_length: int = 64):
        super().__init__(ModelConfig(vocab_size=257, context_length=context_length, n_layer=1, n_head=2, d_model=8))
        self.script = torch.tensor(script)

    def forward(self, idx, targets=None, *, cache=None, position_ids=None, key_padding_mask=None):
        start = cache.length if cache is not None else 0
        super().forward(idx, cache=cache, position_ids=position_ids, key_padding_mask=key_padding_mask)
        if position_ids is None:
            position_ids = torch.arange(start, start + idx.shape[1])[None].expand(idx.shape[0], -1)
        upcoming = self.script[(position_ids + 1).clamp(max=len(self.script) - 1)]  # (B, T)
        return F.one_hot(upcoming, self.config.vocab_size).float() * 20.0, None


class ScriptedLanguageModel(LanguageModel):
    """The scripted model's output comes from its forward(): decode on the no-cache path, which calls it."""

    def generate(self, prompt="", num_samples=1, use_cache=False, **sampling):
        return super().generate(prompt, num_samples, use_cache, **sampling)

    def stream(self, prompt="", use_cache=False, should_stop=None, **sampling):
        return super().stream(prompt, use_cache, should_stop, **sampling)


def scripted(text: str, ending: list[int] = ()) -> LanguageModel:
    script = [EOT_ID] + list(text.encode("utf-8")) + list(ending) + [ord("z")] * 100
    return ScriptedLanguageModel(ScriptedGPT(script), BytesTokenizer(), compile=False)


def test_stops_at_end_of_text():
    lm = scripted("Hi there.", ending=[EOT_ID])
    completion = lm.generate("", max_new_tokens=50, temperature=0)[0]
    assert completion == Completion(text="Hi there.", token_ids=list(b"Hi there."), finish_reason="stop",
                                    prompt_tokens=1)
    chunks = list(lm.stream("", max_new_tokens=50, temperature=0))
    assert "".join(c.text for c in chunks) == "Hi there."
    assert chunks[-1].token_id == EOT_ID and chunks[-1].finish_reason == "stop"
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_stops_at_max_new_tokens():
    lm = scripted("Hi there.", ending=[EOT_ID])
    completion = lm.generate("", max_new_tokens=4, temperature=0)[0]
    assert (completion.text, completion.finish_reason) == ("Hi t", "length")
    chunks = list(lm.stream("", max_new_tokens=4, temperature=0))
    assert len(chunks) == 4 and chunks[-1].finish_reason == "length"


def test_stop_string_cuts_the_text_before_it():
    lm = scripted("Once upon a time. The end. More")
    completion = lm.generate("", max_new_tokens=60, temperature=0, stop=("The end", "zzz"))[0]
    assert (completion.text, completion.finish_reason) == ("Once upon a time. ", "stop")
    assert bytes(completion.token_ids) == b"Once upon a time. The end"
    chunks = list(lm.stream("", max_new_tokens=60, temperature=0, stop=["The end"]))
    assert "".join(c.text for c in chunks) == "Once upon a time. "
    # "The en" must have been held back, never released before the stop string completed
    assert all("T" not in c.text for c in chunks)


def test_stream_never_releases_half_a_utf8_character():
    text = "Café 😀 naïve — 日本"
    lm = scripted(text, ending=[EOT_ID])
    chunks = list(lm.stream("", max_new_tokens=100, temperature=0))
    assert "".join(c.text for c in chunks) == text
    assert all("\ufffd" not in c.text for c in chunks)
    assert sum(1 for c in chunks if c.text == "") >= 6  # the continuation bytes of é, 😀, ï, —, 日, 本


def test_text_assembler_flushes_a_broken_tail_at_the_end():
    assembler = TextAssembler(BytesTokenizer())
    for token in b"ok\xe2\x82":  # "ok" then two bytes of a three-byte character
        assembler.push(token)
    assert assembler.release() == "ok"
    assembler.finish()
    assert assembler.release(final=True) == "\ufffd"


def test_generate_returns_samples_grouped_by_prompt():
    lm = eager(random_model())
    completions = lm.generate(["a", "bb"], num_samples=2, max_new_tokens=3, seed=1)
    assert [c.prompt_tokens for c in completions] == [2, 2, 3, 3]
    with pytest.raises(SamplingError, match="num_samples"):
        lm.generate("a", num_samples=0)


def test_stream_should_stop_ends_the_iterator():
    lm = eager(random_model())
    calls = []
    chunks = list(lm.stream("a", max_new_tokens=50, should_stop=lambda: len(calls.append(1) or calls) > 3))
    assert len(chunks) == 3 and all(isinstance(c, Chunk) for c in chunks)


# --- loading, int8, CLI --------------------------------------------------------------------------


def make_run(directory, model: GPT, tokenizer=None, vocab_size: int | None = None):
    """A run directory as training writes it: config.json, tokenizer files, checkpoints/best."""
    config = model.config if vocab_size is None else ModelConfig(**{**model.config.to_dict(), "vocab_size": vocab_size})
    tokenizer = tokenizer or BytesTokenizer()
    RunConfig(model=config, train=TrainConfig(), tokenizer=tokenizer.spec).save(directory / "config.json")
    tokenizer.save(directory)
    if vocab_size is None:
        save_checkpoint(directory / "checkpoints" / "best", model)
    else:
        save_checkpoint(directory / "checkpoints" / "best", GPT(config))
    return directory


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_load_model_from_run_and_checkpoint_dirs(tmp_path):
    model = random_model()
    run_dir = make_run(tmp_path / "run", model)
    expected = eager(model).generate("Hi", max_new_tokens=8, temperature=0)[0]
    for source in (run_dir, run_dir / "checkpoints" / "best"):
        lm = load_model(source, compile=False)
        assert lm.generate("Hi", max_new_tokens=8, temperature=0)[0] == expected
    assert load_model(run_dir, checkpoint="last").config.model == model.config  # falls back to best


def test_int8_quantization_replaces_linears_and_stays_close(tmp_path):
    model = random_model(std=0.1, d_model=64)
    run_dir = make_run(tmp_path / "run", model)
    quantized = load_model(run_dir, quantize="int8")
    linears = [m for m in quantized.model.modules() if type(m).__name__ == "Linear"]
    assert len(linears) == 4 * 2 + 1  # qkv, proj, fc, proj per block + lm_head
    assert all(type(m).__module__.startswith("torch.ao.nn.quantized.dynamic") for m in linears)
    tokens = torch.tensor([[EOT_ID, 72, 105, 33, 32, 65]])
    with torch.no_grad():
        reference, _ = model(tokens)
        approximate, _ = quantized.model(tokens)
    relative_error = (approximate - reference).norm() / reference.norm()
    assert 0 < relative_error < 0.1  # int8 rounding: close, but not the float model itself
    assert len(quantized.generate("Hi", max_new_tokens=5)[0].token_ids) == 5


def test_cli_generate_prints_prompt_and_continuation(tmp_path, capsys):
    model = random_model()
    run_dir = make_run(tmp_path / "run", model)
    expected = eager(model).generate("Once", max_new_tokens=12, temperature=0)[0]
    code, out, err = run_cli(capsys, "generate", str(run_dir), "--prompt", "Once", "--max-new-tokens", "12",
                             "--temperature", "0")
    assert code == 0 and out == "Once" + expected.text + "\n"
    assert "tokens/s" in err
    code, out, _ = run_cli(capsys, "generate", str(run_dir), "--prompt", "Once", "--max-new-tokens", "12",
                           "--temperature", "0", "--num-samples", "2", "--no-cache")
    assert code == 0 and out == f"Once{expected.text}\n\nOnce{expected.text}\n"
    code, out, _ = run_cli(capsys, "generate", str(run_dir), "--prompt", "", "--max-new-tokens", "3",
                           "--seed", "1", "--top-k", "5", "--top-p", "0.9", "--repetition-penalty", "1.2",
                           "--quantize", "int8", "--stop", "zz")
    assert code == 0 and out.endswith("\n")


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--top-p", "1.5"], "top_p"),
    (["--top-k", "-1"], "top_k"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--num-samples", "0"], "num-samples"),
    (["--model", "tiny"], "not both"),
])
def test_cli_generate_rejects_bad_options(tmp_path, capsys, flags, message):
    run_dir = make_run(tmp_path / "run", random_model())
    code, out, err = run_cli(capsys, "generate", str(run_dir), "--prompt", "x", *flags)
    assert code == 2 and out == ""
    assert err.startswith("tinystories: error:") and message in err and err.count("\n") == 1


def test_cli_generate_rejects_unknown_runs_and_mismatched_tokenizers(tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", str(tmp_path / "nowhere"), "--prompt", "x")
    assert code == 2 and "no such run" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "generate", "--model", "no-such-model", "--prompt", "x")
    assert code == 2 and "no shipped model" in err and err.count("\n") == 1
    # a model with 200 tokens beside a 257-token tokenizer: they do not belong together
    run_dir = make_run(tmp_path / "run", random_model(), vocab_size=200)
    code, _, err = run_cli(capsys, "generate", str(run_dir), "--prompt", "x")
    assert code == 2 and "tokenizer" in err and err.count("\n") == 1


def test_warm_up_compiles_the_engine_that_new_engine_then_returns(monkeypatch):
    monkeypatch.delenv("TINYSTORIES_COMPILE")  # the default path (the same shape as the compiled tests above)
    lm = LanguageModel(random_model(**VARIANTS["rope-mqa-window"]), BytesTokenizer())
    assert lm.warm_up(1)
    engine = lm.new_engine(1)
    spans = sorted(engine._span_steps)  # context 16: a step per quarter of the cache, compiled before any request
    assert spans == [4, 8, 12, 16] and all(step.graph is not None for step, _ in engine._span_steps.values())
    assert lm.new_engine(1) is not engine  # handed out once
    assert not eager(random_model()).warm_up(1)  # a model that does not compile: nothing to do


def test_a_pickled_language_model_generates_what_the_original_does():
    """What the server's model process receives: the model, tokenizer and config, no engines."""
    import pickle

    lm = eager(random_model())
    lm.generate("warm", max_new_tokens=2)  # leaves an idle engine behind, which must not travel
    copy = pickle.loads(pickle.dumps(lm))
    assert copy.model is not lm.model and copy._idle_engines == {} and copy.compile is False
    for sampling in ({"temperature": 0}, {"temperature": 0.9, "top_k": 20, "seed": 5}):
        assert copy.generate("Hi", max_new_tokens=12, **sampling) == lm.generate("Hi", max_new_tokens=12, **sampling)


@pytest.mark.parametrize("variant", ["rope-mqa-window", "learned-gelu-layernorm"])
def test_prompts_prefilled_together_decode_as_each_alone(variant):
    from tinystories.decoding import SlotStart

    model = random_model(std=0.1, **VARIANTS[variant])
    prompts = {0: [EOT_ID, 72, 105, 33, 32, 65, 66], 2: [EOT_ID], 3: [EOT_ID, 80, 81]}
    together = DecodeEngine(model, slots=4, compile=False)
    too_long = [EOT_ID] * (model.config.context_length + 1)
    starts = [SlotStart(slot, tokens, GREEDY, prompt_logprobs=2) for slot, tokens in prompts.items()]
    results = together.start_many(starts + [SlotStart(1, too_long, GREEDY)])
    assert isinstance(results[-1], ValueError) and together.active() == [0, 2, 3]  # refused alone
    for (slot, tokens), scored in zip(prompts.items(), results):
        alone = DecodeEngine(model, slots=1, compile=False)
        expected = alone.start(0, tokens, GREEDY, prompt_logprobs=2)
        assert len(scored) == len(tokens) - 1
        assert [s.logprob for s in scored] == pytest.approx([s.logprob for s in expected], abs=1e-5)
        assert [[i for i, _ in s.top] for s in scored] == [[i for i, _ in s.top] for s in expected]
        assert torch.allclose(together.logits[slot], alone.logits[0], atol=1e-5, rtol=0)
    for _ in range(25):  # past the context (16): every row rolls on its own
        together.advance({slot: token for slot, (token, _) in together.sample().items()})
    for slot, tokens in prompts.items():
        alone = DecodeEngine(model, slots=1, compile=False)
        alone.start(0, tokens, GREEDY)
        for _ in range(25):
            alone.advance({0: alone.sample()[0][0]})
        assert together.windows[slot] == alone.windows[0]


def test_top_k_beyond_the_vocabulary_is_the_whole_vocabulary():
    """k >= V keeps every token: the same samples as top_k off, even for a k no int64 holds."""
    lm = eager(random_model())
    off = lm.generate("Hi", max_new_tokens=12, seed=3, temperature=1.0)[0].token_ids
    for k in (lm.model.config.vocab_size, 10**30):
        assert lm.generate("Hi", max_new_tokens=12, seed=3, temperature=1.0, top_k=k)[0].token_ids == off


def test_a_refused_start_leaves_its_slot_free_and_the_others_running():
    from tinystories.decoding import DecodeEngine, SlotStart

    lm = eager(random_model())
    engine = DecodeEngine(lm.model, 2, compile=False)
    good = SlotStart(0, [1, 2, 3], SamplingConfig(temperature=0), None, None, None)
    bad = SlotStart(1, [1, 2], SamplingConfig(temperature=0), None, None, None)
    bad.config.temperature = 1e39  # past validation: what a caller mutating a config could hand the engine
    results = engine.start_many([good, bad])
    assert results[0] == [] and isinstance(results[1], Exception)
    assert engine.free_slots() == [1] and set(engine.sample()) == {0}
    assert engine.start_many([bad]) and engine.free_slots() == [1]  # alone: refused, nothing prefilled
