"""Training batches from token shards: random windows or whole stories, seeded and resumable.

Every batch is derived from `(seed, position)` alone, where `position` counts the batches drawn so far.
The data position of a run is therefore one integer, and a resumed run draws exactly the batches an
uninterrupted run would have drawn. Under data parallel training every rank draws the step's whole
global batch and keeps its own micro-batches (`rank_micro_batches`), so the position is the same
integer on every rank and does not depend on the number of ranks. `state_dict()` holds only plain ints, so it loads with
`torch.load(weights_only=True)`.

Two ways to cut batches (TrainConfig.batching):

- `windows`: `batch_size` random windows of `context_length + 1` tokens anywhere in the shard; the
  input is the first T tokens, the target the last T. Windows cross story boundaries (the EOT token
  between stories teaches the model where a story ends).
- `stories`: `batch_size` random whole stories, each starting at its EOT token and ending with the
  next story's EOT as the last target, truncated to T + 1 tokens and right-padded to the longest in
  the batch. Padded targets are -1, which the model's loss ignores; causal attention means real
  tokens never see the padding to their right.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tinystories.errors import UserError

IGNORE_INDEX = -1  # targets the loss skips (the model's cross_entropy ignore_index)


class BatchError(UserError):
    """The shards cannot supply the batches asked for (e.g. a split shorter than one window)."""


def _generator(seed: int, position: int) -> np.random.Generator:
    # A fresh generator per batch keyed by (seed, position): no generator state to carry around.
    return np.random.default_rng([int(seed), int(position)])


class WindowBatches:
    """Random (x, y) windows of a token shard: x (N, T) int64, y (N, T) int64 (x shifted by one)."""

    kind = "windows"

    def __init__(self, tokens: np.ndarray, context_length: int, batch_size: int, seed: int):
        if len(tokens) < context_length + 1:
            raise BatchError(f"the training split has {len(tokens)} tokens, fewer than one window of "
                             f"context_length + 1 = {context_length + 1}; prepare more data or lower context_length")
        self.tokens = tokens
        self.context_length = context_length
        self.batch_size = batch_size
        self.seed = seed
        self.position = 0  # batches drawn so far

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        rng = _generator(self.seed, self.position)
        self.position += 1
        T = self.context_length
        starts = rng.integers(0, len(self.tokens) - T, size=self.batch_size)  # last start: len - T - 1
        return windows_at(self.tokens, starts, T)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seed": int(self.seed), "position": int(self.position)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(self, state)
        self.position = int(state["position"])


class StoryBatches:
    """Random whole stories, right-padded per batch: x (N, L) int64, y (N, L) int64 with -1 at padding.

    L is the longest story of the batch (at most T). A story is the run of tokens from its EOT up to,
    and including as the last target, the next story's EOT.
    """

    kind = "stories"

    def __init__(self, tokens: np.ndarray, context_length: int, batch_size: int, seed: int, eot_id: int):
        self.tokens = tokens
        self.context_length = context_length
        self.batch_size = batch_size
        self.seed = seed
        self.eot_id = int(eot_id)
        starts = story_starts(tokens, self.eot_id)
        ends = np.append(starts[1:] + 1, len(tokens))  # exclusive; includes the next story's EOT
        keep = ends - starts >= 2  # a story needs at least one target
        self.starts, self.ends = starts[keep], ends[keep]
        if len(self.starts) == 0:
            raise BatchError(f"the training split holds no story (no EOT token {self.eot_id} followed by text)")
        self.position = 0

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        rng = _generator(self.seed, self.position)
        self.position += 1
        chosen = rng.integers(0, len(self.starts), size=self.batch_size)
        stories = []
        for index in chosen:
            start = int(self.starts[index])
            end = min(int(self.ends[index]), start + self.context_length + 1)
            story = np.asarray(self.tokens[start:end], dtype=np.int64)
            if end == len(self.tokens) and story[-1] != self.eot_id and len(story) <= self.context_length:
                story = np.append(story, self.eot_id)  # the last story of the shard: close it with EOT
            stories.append(story)
        return pad_stories(stories, pad_id=self.eot_id)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seed": int(self.seed), "position": int(self.position)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(self, state)
        self.position = int(state["position"])


def _check_state(batches, state: dict[str, Any]) -> None:
    if state.get("kind") != batches.kind or int(state.get("seed", -1)) != batches.seed:
        raise BatchError(f"saved data position is for {state.get('kind')} batches with seed {state.get('seed')}, "
                         f"this run uses {batches.kind} batches with seed {batches.seed}")


def make_batches(kind: str, tokens: np.ndarray, context_length: int, batch_size: int, seed: int,
                 eot_id: int) -> WindowBatches | StoryBatches:
    """The sampler named by TrainConfig.batching ('windows' | 'stories')."""
    if kind == "windows":
        return WindowBatches(tokens, context_length, batch_size, seed)
    if kind == "stories":
        return StoryBatches(tokens, context_length, batch_size, seed, eot_id)
    raise BatchError(f"batching must be 'windows' or 'stories', got {kind!r}")


def windows_at(tokens: np.ndarray, starts: np.ndarray, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """The windows beginning at `starts`: x = tokens[s : s+T], y = tokens[s+1 : s+T+1], each (N, T) int64."""
    offsets = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(context_length + 1)  # (N, T+1)
    chunk = np.asarray(tokens[offsets], dtype=np.int64)
    return chunk[:, :-1], chunk[:, 1:]


def pad_stories(stories: list[np.ndarray], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token sequences into x (N, L) and y (N, L), L = longest - 1; padded targets are -1."""
    length = max(len(story) for story in stories) - 1
    x = np.full((len(stories), length), pad_id, dtype=np.int64)
    y = np.full((len(stories), length), IGNORE_INDEX, dtype=np.int64)
    for row, story in enumerate(stories):
        x[row, : len(story) - 1] = story[:-1]
        y[row, : len(story) - 1] = story[1:]
    return x, y


def story_starts(tokens: np.ndarray, eot_id: int, chunk_size: int = 1 << 24) -> np.ndarray:
    """Indices of every EOT token (each story begins with one), scanned in chunks to bound memory."""
    found = [np.flatnonzero(tokens[offset: offset + chunk_size] == eot_id) + offset
             for offset in range(0, len(tokens), chunk_size)]
    return np.concatenate(found).astype(np.int64) if found else np.zeros(0, dtype=np.int64)


def split_micro_batches(x: np.ndarray, y: np.ndarray, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut a step's batch into `count` micro-batches, trimming columns that are padding in every row."""
    micro = []
    for xs, ys in zip(np.array_split(x, count), np.array_split(y, count)):
        real = np.flatnonzero((ys != IGNORE_INDEX).any(axis=0))
        width = int(real[-1]) + 1 if len(real) else 1
        micro.append((xs[:, :width], ys[:, :width]))
    return micro


def rank_micro_batches(x: np.ndarray, y: np.ndarray, grad_accum: int, rank: int = 0,
                       world_size: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """One rank's share of a step's global batch x, y (N, L), N = batch_size * grad_accum * world_size.

    The rows are cut into grad_accum * world_size micro-batches of batch_size rows and rank r takes
    micro-batches r, r + W, r + 2W, ... (grad_accum of them). Every rank draws the same global batch
    from (seed, step), so the data a step trains on depends only on the global batch size: a run
    resumed with another world size (and batch_size or grad_accum adjusted to keep the product)
    continues with the same data in the same order.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    return split_micro_batches(x, y, grad_accum * world_size)[rank::world_size]


def eval_window_starts(num_tokens: int, context_length: int, eval_tokens: int) -> np.ndarray:
    """Evenly spaced, fixed window starts covering about `eval_tokens` tokens of a split."""
    if num_tokens < context_length + 1:
        raise BatchError(f"the validation split has {num_tokens} tokens, fewer than one window of "
                         f"context_length + 1 = {context_length + 1}")
    count = max(1, eval_tokens // context_length)
    last = num_tokens - context_length - 1
    return np.unique(np.linspace(0, last, count).round().astype(np.int64))
