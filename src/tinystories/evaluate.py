"""Evaluation: validation loss, perplexity, bits per byte, and diversity of sampled stories.

Loss is measured on non-overlapping windows of `context_length` tokens over a token stream laid out
as the shards are, `EOT s1 EOT s2 ... EOT sN`: window i reads tokens [iC, iC+C) and predicts
[iC+1, iC+C+1), so every token after the first is predicted exactly once, each with up to C tokens of
context (fewer at a window's start).

Bits per byte does not depend on the tokenizer, so models with different tokenizers compare:

    bits_per_byte = (nats summed over every predicted token, EOT separators included) / ln 2
                    / (UTF-8 bytes of the stories' text)

EOT separators cost nats (the model must predict where a story ends) but are not bytes of text; this
matches the training code's `val_bpb` (mean loss x tokens / story bytes / ln 2, from meta.json).
Over a whole split the byte count is meta.json's exact `bytes`; over `max_tokens` of it the bytes are
counted exactly by decoding the evaluated tokens (EOT markers excluded; a story cut in the middle of a
UTF-8 character at the end counts its replacement character, at most 3 bytes off).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinystories.errors import UserError
from tinystories.model import eval_mode
from tinystories.tokenizer import EOT

WORD = re.compile(r"[\w']+")
DECODE_CHUNK_TOKENS = 1 << 20


class EvaluationError(UserError):
    """Evaluation input that cannot be used (message is one line)."""


# --- loss and bits per byte ----------------------------------------------------------------------


def _as_long_tensor(tokens: Any) -> torch.Tensor:
    if isinstance(tokens, torch.Tensor):
        return tokens.long().reshape(-1)
    return torch.from_numpy(np.asarray(tokens).astype(np.int64, copy=False).reshape(-1))


@torch.inference_mode()
def evaluate_loss(model: nn.Module, tokens: Any, bytes: int, context_length: int | None = None,
                  batch_size: int = 16, device: str | torch.device | None = None) -> dict[str, float]:
    """Loss over non-overlapping windows of a token stream (1-D array or tensor of ids).

    `bytes`: the UTF-8 bytes of the text the predicted tokens encode (for bits per byte).
    Returns {val_loss (mean nats per predicted token), perplexity, bits_per_byte, tokens (predicted),
    bytes, nats (summed)}.
    """
    stream = _as_long_tensor(tokens)
    if stream.numel() < 2:
        raise EvaluationError(f"need at least 2 tokens to evaluate, got {stream.numel()}")
    if bytes <= 0:
        raise EvaluationError(f"the evaluated text must have a positive byte count, got {bytes}")
    C = context_length or model.config.context_length
    device = torch.device(device) if device is not None else model.tok_emb.weight.device
    predicted = stream.numel() - 1
    full_windows = predicted // C
    inputs = stream[:full_windows * C].view(full_windows, C)  # (N, C)
    targets = stream[1:full_windows * C + 1].view(full_windows, C)  # (N, C)
    total_nats = 0.0
    with eval_mode(model):
        for start in range(0, full_windows, batch_size):
            total_nats += _window_nats(model, inputs[start:start + batch_size], targets[start:start + batch_size], device)
        if predicted % C:  # the last, shorter window
            tail = stream[full_windows * C:]
            total_nats += _window_nats(model, tail[:-1][None], tail[1:][None], device)
    loss = total_nats / predicted
    return {
        "val_loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "bits_per_byte": total_nats / math.log(2) / bytes,
        "tokens": predicted,
        "bytes": int(bytes),
        "nats": total_nats,
    }


def _window_nats(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    logits, _ = model(x.to(device))  # (B, T, V)
    return float(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum"))


def story_bytes(stories: Iterable[str]) -> int:
    """UTF-8 bytes of the stories (no separators)."""
    return sum(len(story.encode("utf-8")) for story in stories)


def stories_to_tokens(tokenizer: Any, stories: Sequence[str]) -> np.ndarray:
    """The shard layout of `stories`: EOT s1 EOT s2 ... EOT sN, as int64 ids."""
    ids: list[int] = []
    for encoded in tokenizer.encode_batch(list(stories)):
        ids.append(tokenizer.eot_id)
        ids.extend(encoded)
    return np.asarray(ids, dtype=np.int64)


def count_text_bytes(tokenizer: Any, tokens: np.ndarray) -> int:
    """UTF-8 bytes of the text `tokens` encode, EOT markers excluded (decoded in story-aligned chunks)."""
    tokens = np.asarray(tokens)
    eot_positions = np.flatnonzero(tokens == tokenizer.eot_id)
    total, start = 0, 0
    while start < len(tokens):
        end = min(start + DECODE_CHUNK_TOKENS, len(tokens))
        if end < len(tokens):  # cut at a story boundary so no UTF-8 character is split
            boundary = eot_positions[np.searchsorted(eot_positions, end) - 1] if len(eot_positions) else 0
            end = int(boundary) if boundary > start else end
        piece = tokens[start:end]
        text = tokenizer.decode(piece.tolist())
        total += len(text.encode("utf-8")) - int((piece == tokenizer.eot_id).sum()) * len(EOT.encode("ascii"))
        start = end
    return total


def evaluate_text(lm: Any, stories: Sequence[str], batch_size: int = 16,
                  device: str | torch.device | None = None) -> dict[str, float]:
    """Loss and bits per byte of `lm` on raw stories, tokenized with the model's own tokenizer.

    The stories are laid out as shards are (EOT before each), so this agrees with evaluating shards
    prepared from the same stories with the same tokenizer.
    """
    stories = list(stories)
    if not stories:
        raise EvaluationError("no stories to evaluate")
    tokens = stories_to_tokens(lm.tokenizer, stories)
    results = evaluate_loss(lm.model, tokens, story_bytes(stories), lm.context_length, batch_size, device)
    results["stories"] = len(stories)
    return results


def evaluate_shards(lm: Any, data_dir: str | Path, max_tokens: int | None = None, batch_size: int = 16,
                    device: str | torch.device | None = None) -> dict[str, Any]:
    """Loss and bits per byte on a prepared shard directory's val.bin (all of it, or `max_tokens`).

    The shards must come from the model's tokenizer (checked: size, EOT id and a probe encoding).
    """
    from tinystories.data import load_meta, load_tokens
    from tinystories.tokenizer import load_tokenizer

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise EvaluationError(f"--data {data_dir}: no such directory")
    meta = load_meta(data_dir)
    check_same_tokenizer(lm.tokenizer, load_tokenizer(data_dir), f"--data {data_dir}")
    tokens = load_tokens(data_dir, "val")
    if max_tokens is not None:
        if max_tokens < 1:
            raise EvaluationError(f"--max-tokens must be >= 1, got {max_tokens}")
    if max_tokens is not None and max_tokens + 1 < len(tokens):
        tokens = np.asarray(tokens[:max_tokens + 1])
        byte_count = count_text_bytes(lm.tokenizer, tokens[1:])
        byte_source = f"counted by decoding the {max_tokens:,} evaluated tokens"
    else:
        byte_count = int(meta["splits"]["val"]["bytes"])
        byte_source = "meta.json (whole val split)"
    results = evaluate_loss(lm.model, tokens, byte_count, lm.context_length, batch_size, device)
    results["bytes_source"] = byte_source
    return results


def check_same_tokenizer(model_tokenizer: Any, data_tokenizer: Any, where: str) -> None:
    """EvaluationError unless the two tokenizers have the same size, EOT id and encoding of a probe."""
    probe = "Once upon a time, Lily's dog said: \"Wow!\" 123 naïve café."
    same = (model_tokenizer.vocab_size == data_tokenizer.vocab_size
            and model_tokenizer.eot_id == data_tokenizer.eot_id
            and model_tokenizer.encode(probe) == data_tokenizer.encode(probe))
    if not same:
        raise EvaluationError(
            f"{where}: the shards were made with tokenizer {getattr(data_tokenizer, 'spec', '?')} "
            f"({data_tokenizer.vocab_size} tokens) but the model uses {getattr(model_tokenizer, 'spec', '?')} "
            f"({model_tokenizer.vocab_size} tokens); evaluate with --input on raw text instead")


# --- generation metrics --------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Lower-cased words (letters, digits, apostrophes); punctuation is not a word."""
    return WORD.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def generation_metrics(texts: Sequence[str], ended: Sequence[bool],
                       token_counts: Sequence[int] | None = None) -> dict[str, float]:
    """Diversity and length of sampled stories (word-level, see `words`).

    distinct_n: unique n-grams / total n-grams, pooled over all samples (n-grams within a sample).
    repeated_4gram_fraction: of all 4-grams, the fraction that already occurred earlier in the same
        sample (a measure of loops).
    mean_words, mean_tokens (when token_counts is given), ended_fraction (share of samples that
    ended with <|endoftext|> rather than running into the token limit).
    """
    if len(texts) != len(ended):
        raise ValueError("texts and ended must have the same length")
    tokenized = [words(text) for text in texts]
    results: dict[str, float] = {"samples": len(texts)}
    for n in (1, 2, 3):
        grams = [gram for sample in tokenized for gram in _ngrams(sample, n)]
        results[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else 0.0
    repeated = total = 0
    for sample in tokenized:
        counts = Counter(_ngrams(sample, 4))
        total += sum(counts.values())
        repeated += sum(count - 1 for count in counts.values())
    results["repeated_4gram_fraction"] = repeated / total if total else 0.0
    results["mean_words"] = sum(len(sample) for sample in tokenized) / len(texts) if texts else 0.0
    if token_counts is not None:
        results["mean_tokens"] = sum(token_counts) / len(token_counts) if token_counts else 0.0
    results["ended_fraction"] = sum(bool(e) for e in ended) / len(ended) if ended else 0.0
    return results


def sample_stories(lm: Any, samples: int, seed: int = 0, batch_size: int = 16,
                   **sampling: Any) -> tuple[list[str], list[bool], list[int]]:
    """`samples` stories from `<|endoftext|>` in batches: (texts, ended with EOT, generated tokens)."""
    texts: list[str] = []
    ended: list[bool] = []
    token_counts: list[int] = []
    for batch_index, start in enumerate(range(0, samples, batch_size)):
        count = min(batch_size, samples - start)
        for completion in lm.generate("", num_samples=count, seed=seed + batch_index, **sampling):
            texts.append(completion.text)
            ended.append(completion.finish_reason == "stop")
            token_counts.append(len(completion.token_ids))
    return texts, ended, token_counts


def evaluate_generation(lm: Any, samples: int = 20, seed: int = 0, batch_size: int = 16,
                        **sampling: Any) -> dict[str, float]:
    """generation_metrics of `samples` stories sampled from `lm` (no stop strings: EOT ends a story)."""
    texts, ended, token_counts = sample_stories(lm, samples, seed, batch_size, **sampling)
    return generation_metrics(texts, ended, token_counts)
