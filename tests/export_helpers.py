"""Helpers shared by test_export.py and test_llama2c.py: tiny run directories made from scratch.

The tokenizer is a byte-level BPE trained here with Hugging Face `tokenizers` on a few sentences
and saved by hand as tokenizer.json + tokenizer_meta.json (the layout tokenizer.py writes), so these
tests depend only on checkpoint.py, config.py and model.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tinystories.checkpoint import save_checkpoint
from tinystories.config import ModelConfig, RunConfig, TrainConfig
from tinystories.model import GPT

EOT = "<|endoftext|>"
# .ci/run sets this after installing llama-cpp-python: there a missing llama_cpp fails the tests.
REQUIRE_LLAMA_CPP = "TINYSTORIES_REQUIRE_LLAMA_CPP"
SENTENCES = [
    "Once upon a time, there was a little girl named Lily.",
    "She loved to play outside with her dog, Max.",
    "One day, they found a big red ball in the park!",
    "\"Can we keep it?\" Lily asked her mom. Mom smiled and said yes.",
    "Tom and Sue went to the beach. They built a sand castle and swam in the sea.",
    "The sun was warm and the birds sang happy songs in the tall green trees.",
] * 3


def train_byte_level_bpe(vocab_size: int = 320):
    """A `tokenizers.Tokenizer`: GPT-2-style byte-level BPE, <|endoftext|> = id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(SENTENCES, trainer=trainer)
    return tokenizer


def randomize(model: GPT, seed: int = 0, scale: float = 0.2) -> GPT:
    """Random weights everywhere, biases and norm gains included, so a misplaced tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                parameter.copy_(0.1 * noise)
            else:
                parameter.copy_(scale * noise)
    return model.eval()


def make_run(directory: Path, config: ModelConfig, tokenizer=None, seed: int = 0) -> tuple[Path, GPT]:
    """A run directory (config.json, tokenizer files, checkpoints/best) holding a random model."""
    tokenizer = tokenizer or train_byte_level_bpe()
    directory.mkdir(parents=True, exist_ok=True)
    RunConfig(model=config, train=TrainConfig(), tokenizer=f"bpe:{tokenizer.get_vocab_size()}").save(
        directory / "config.json")
    (directory / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    meta = {"kind": "bpe", "spec": f"bpe:{tokenizer.get_vocab_size()}",
            "vocab_size": tokenizer.get_vocab_size(), "eot_id": tokenizer.token_to_id(EOT)}
    (directory / "tokenizer_meta.json").write_text(json.dumps(meta))
    model = randomize(GPT(config), seed)
    save_checkpoint(directory / "checkpoints" / "best", model)
    return directory, model


def greedy(model: GPT, prompt: list[int], steps: int, stop: int | None = None) -> list[int]:
    """Our model's greedy continuation, one full forward per token (independent of generate.py)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits, _ = model(torch.tensor([ids[-model.config.context_length:]]))
            next_id = int(logits[0, -1].argmax())
            ids.append(next_id)
            if next_id == stop:
                break
    return ids[len(prompt):]


def llama_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=320, context_length=32, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96,
                  norm="rmsnorm", position="rope", mlp="swiglu", bias=False, tie_embeddings=False)
    values.update(overrides)
    return ModelConfig(**values)


def gpt2_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=320, context_length=32, n_layer=2, n_head=4, d_model=64, d_ff=128,
                  norm="layernorm", position="learned", mlp="gelu", bias=True, tie_embeddings=True)
    values.update(overrides)
    return ModelConfig(**values)


def require_llama_cpp():
    """The llama_cpp module (llama-cpp-python, the `[llamacpp]` extra). Without it the test fails
    where $TINYSTORIES_REQUIRE_LLAMA_CPP=1 (CI) and skips elsewhere, saying how to install it."""
    try:
        import llama_cpp
    except ImportError as error:
        message = (f"llama-cpp-python is not installed ({error}): pip install -e '.[llamacpp]' "
                   "(a source build, ~15 minutes on 2 cores) or a prebuilt wheel (.ci/run)")
        if os.environ.get(REQUIRE_LLAMA_CPP) == "1":
            pytest.fail(f"{message}; {REQUIRE_LLAMA_CPP}=1 requires it")
        pytest.skip(f"{message}; CI sets {REQUIRE_LLAMA_CPP}=1 and fails instead of skipping")
    return llama_cpp
