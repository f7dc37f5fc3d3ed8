"""Evaluation: loss / perplexity / bits per byte against hand-computed values, diversity metrics on
hand-made texts, shards vs raw text agreement, and the `eval` CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tinystories import cli
from tinystories.config import ModelConfig
from tinystories.evaluate import (
    count_text_bytes,
    evaluate_generation,
    evaluate_loss,
    evaluate_shards,
    evaluate_text,
    generation_metrics,
    stories_to_tokens,
    story_bytes,
)
from tinystories.generate import LanguageModel
from tinystories.model import GPT
from tinystories.tokenizer import BytesTokenizer, load_tokenizer

from test_generate import make_run, random_model

STORIES = ["Once upon a time there was a cat.", "The dog said: \"Woof!\" Café au lait.", "Tom ran home."]


def uniform_model(vocab_size: int = 257, context_length: int = 16) -> GPT:
    """Every logit is 0: the predicted distribution is uniform over the vocabulary."""
    model = GPT(ModelConfig(vocab_size=vocab_size, context_length=context_length, n_layer=1, n_head=2, d_model=8,
                            tie_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model.eval()


def test_uniform_model_costs_ln_v_per_token():
    V = 257
    tokens = np.arange(50) % V  # 49 predicted tokens: 3 full windows of 16 and a tail of 1
    results = evaluate_loss(uniform_model(V), tokens, bytes=30, context_length=16, batch_size=2)
    assert results["tokens"] == 49 and results["bytes"] == 30
    assert results["val_loss"] == pytest.approx(math.log(V), abs=1e-6)
    assert results["perplexity"] == pytest.approx(V, rel=1e-5)
    assert results["bits_per_byte"] == pytest.approx(49 * math.log(V) / math.log(2) / 30, rel=1e-6)


@pytest.mark.parametrize("length", [33, 40])  # windows divide the stream exactly / leave a tail
def test_loss_predicts_every_token_once_with_non_overlapping_windows(length):
    model = random_model(std=0.2)
    C = model.config.context_length
    tokens = torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(0))
    expected_nats = 0.0
    with torch.no_grad():  # reference: each window on its own, log-probabilities gathered by hand
        for start in range(0, length - 1, C):
            window = tokens[start:min(start + C + 1, length)]
            log_probs = model(window[None, :-1])[0].log_softmax(-1)[0]  # (T, V)
            expected_nats -= float(log_probs.gather(1, window[1:, None]).sum())
    results = evaluate_loss(model, tokens.numpy(), bytes=100, context_length=C, batch_size=3)
    assert results["tokens"] == length - 1
    assert results["nats"] == pytest.approx(expected_nats, rel=1e-5)
    assert results["val_loss"] == pytest.approx(expected_nats / (length - 1), rel=1e-5)


def test_evaluate_text_uses_the_shard_layout_and_story_bytes():
    tokenizer = BytesTokenizer()
    tokens = stories_to_tokens(tokenizer, STORIES)
    assert tokens[0] == tokenizer.eot_id and int((tokens == tokenizer.eot_id).sum()) == len(STORIES)
    assert story_bytes(STORIES) == sum(len(s.encode()) for s in STORIES)
    assert count_text_bytes(tokenizer, tokens) == story_bytes(STORIES)  # EOT markers are not bytes
    results = evaluate_text(LanguageModel(uniform_model(), tokenizer), STORIES)
    # every byte and the EOT before each story but the first is predicted at ln 257 nats
    predicted = story_bytes(STORIES) + len(STORIES) - 1
    assert results["tokens"] == predicted
    assert results["bits_per_byte"] == pytest.approx(predicted * math.log2(257) / story_bytes(STORIES), rel=1e-6)


def test_distinct_n_and_repeats_on_hand_made_texts():
    metrics = generation_metrics(["The cat sat.", "the cat ran!"], [True, False], token_counts=[4, 6])
    # words: [the, cat, sat], [the, cat, ran]
    assert metrics["distinct_1"] == pytest.approx(4 / 6)  # the, cat, sat, ran of 6
    assert metrics["distinct_2"] == pytest.approx(3 / 4)  # (the cat) twice, (cat sat), (cat ran)
    assert metrics["distinct_3"] == pytest.approx(2 / 2)
    assert metrics["repeated_4gram_fraction"] == 0.0  # no sample has a 4-gram
    assert metrics["mean_words"] == 3 and metrics["mean_tokens"] == 5 and metrics["ended_fraction"] == 0.5
    looping = generation_metrics(["a b c d a b c d", "x y z w"], [False, True])
    # 4-grams of sample 1: abcd bcda cdab dabc abcd (one repeat of 5); sample 2: xyzw
    assert looping["repeated_4gram_fraction"] == pytest.approx(1 / 6)
    assert looping["distinct_1"] == pytest.approx(8 / 12)


@pytest.mark.slow  # ~6 s: evaluates the whole small val split twice
def test_shards_and_raw_text_give_the_same_numbers(prepared_small, small_story_files):
    from tinystories.data import load_meta, read_stories

    tokenizer = load_tokenizer(prepared_small)
    model = random_model(std=0.05, vocab_size=tokenizer.vocab_size, context_length=64)
    lm = LanguageModel(model, tokenizer)
    on_shards = evaluate_shards(lm, prepared_small, batch_size=8)
    on_text = evaluate_text(lm, list(read_stories(small_story_files[1])), batch_size=8)
    assert on_shards["bytes"] == on_text["bytes"] == load_meta(prepared_small)["splits"]["val"]["bytes"]
    assert on_shards["tokens"] == on_text["tokens"]
    assert on_shards["val_loss"] == pytest.approx(on_text["val_loss"], rel=1e-6)
    assert on_shards["bits_per_byte"] == pytest.approx(on_text["bits_per_byte"], rel=1e-6)
    # a prefix: bytes are counted exactly by decoding what was evaluated
    part = evaluate_shards(lm, prepared_small, max_tokens=500)
    assert part["tokens"] == 500
    from tinystories.data import load_tokens

    text = tokenizer.decode(np.asarray(load_tokens(prepared_small, "val")[1:501]).tolist())
    assert part["bytes"] == len(text.replace("<|endoftext|>", "").encode("utf-8"))


def test_cli_eval_on_input_writes_json(tmp_path, capsys):
    stories_file = tmp_path / "stories.txt"
    stories_file.write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES), encoding="utf-8")
    run_dir = make_run(tmp_path / "run", random_model())
    out_json = tmp_path / "results.json"
    code = cli.main(["eval", str(run_dir), "--input", str(stories_file), "--samples", "3", "--max-new-tokens", "10",
                     "--json", str(out_json)])
    out = capsys.readouterr().out
    assert code == 0 and "| bits_per_byte |" in out
    results = json.loads(out_json.read_text())
    for key in ("val_loss", "perplexity", "bits_per_byte", "tokens", "bytes", "distinct_1", "distinct_2",
                "distinct_3", "repeated_4gram_fraction", "mean_words", "mean_tokens", "ended_fraction"):
        assert key in results
    assert results["bytes"] == story_bytes(STORIES) and results["samples"] == 3
    expected = evaluate_text(LanguageModel(random_model(), BytesTokenizer()), STORIES)
    assert results["bits_per_byte"] == pytest.approx(expected["bits_per_byte"], rel=1e-6)


def test_cli_eval_on_shards(prepared_small, tmp_path, capsys):
    tokenizer = load_tokenizer(prepared_small)
    run_dir = make_run(tmp_path / "run", random_model(vocab_size=tokenizer.vocab_size), tokenizer=tokenizer)
    code = cli.main(["eval", str(run_dir), "--data", str(prepared_small), "--max-tokens", "300", "--samples", "0",
                     "--json", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    assert code == 0 and "counted by decoding" in captured.err
    assert json.loads((tmp_path / "r.json").read_text())["tokens"] == 300
    # a model with another tokenizer cannot be evaluated on these shards
    bytes_run = make_run(tmp_path / "bytes_run", random_model())
    code = cli.main(["eval", str(bytes_run), "--data", str(prepared_small)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tinystories: error:")]
    assert code == 2 and len(errors) == 1 and "tokenizer" in errors[0]


def test_cli_eval_samples_with_top_k_and_top_p(tmp_path, capsys):
    """The sampled stories' metrics are those of evaluate_generation with the same sampling options."""
    stories_file = tmp_path / "stories.txt"
    stories_file.write_text("".join(f"{s}\n<|endoftext|>\n" for s in STORIES), encoding="utf-8")
    run_dir = make_run(tmp_path / "run", random_model())
    code = cli.main(["eval", str(run_dir), "--input", str(stories_file), "--samples", "4", "--max-new-tokens", "12",
                     "--temperature", "0.9", "--top-k", "50", "--top-p", "0.6", "--seed", "3",
                     "--json", str(tmp_path / "r.json")])
    assert code == 0
    results = json.loads((tmp_path / "r.json").read_text())
    lm = LanguageModel(random_model(), BytesTokenizer())
    expected = evaluate_generation(lm, 4, seed=3, max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.6)
    for key in ("distinct_1", "distinct_2", "mean_tokens", "ended_fraction"):
        assert results[key] == pytest.approx(expected[key])
    capsys.readouterr()


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "1.5", "--data", "."], "top_p"),
    (["--samples", "-1"], "--samples"),
    (["--max-tokens", "0", "--data", "."], "--max-tokens"),
    ([], "--data"),  # the run's config names no data directory
])
def test_cli_eval_rejects_bad_input(tmp_path, capsys, flags, message):
    run_dir = make_run(tmp_path / "run", random_model())
    code = cli.main(["eval", str(run_dir), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    code = cli.main(["eval", str(tmp_path / "missing"), "--input", "x.txt"])
    assert code == 2 and "no such run" in capsys.readouterr().err
