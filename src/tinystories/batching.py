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
  between stories teaches the model where a story ends). Drawn with replacement: over one pass's
  worth of batches some text is seen twice and some not at all.
- `epochs`: the same windows, but each pass over the shard cuts it into windows at a random offset
  and visits every one of them once, in a fresh random order (reshuffled every pass).
- `stories`: `batch_size` random whole stories, each starting at its EOT token and ending with the
  next story's EOT as the last target, truncated to T + 1 tokens and right-padded to the longest in
  the batch. Padded targets are -1, which the model's loss ignores; causal attention means real
  tokens never see the padding to their right.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from tinystories.errors import UserError

IGNORE_INDEX = -1  # targets the loss skips (the model's cross_entropy ignore_index)


class BatchError(UserError):
    """The shards cannot supply the batches asked for (e.g. a split shorter than one window)."""


def _generator(seed: int, position: int) -> np.random.Generator:
    # A fresh generator per batch keyed by (seed, position): no generator state to carry around.
    return np.random.default_rng([int(seed), int(position)])


class Sampler:
    """What every sampler shares: a `kind`, a `seed` and a `position` (batches drawn so far), which is
    all its state: `state_dict()` is plain ints and `load_state_dict` refuses another sampler's."""

    kind = ""
    seed = 0
    position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seed": int(self.seed), "position": int(self.position)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind or int(state.get("seed", -1)) != self.seed:
            raise BatchError(f"saved data position is for {state.get('kind')} batches with seed {state.get('seed')}, "
                             f"this run uses {self.kind} batches with seed {self.seed}")
        self.position = int(state["position"])


class WindowBatches(Sampler):
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


class EpochWindows(Sampler):
    """Every window once per pass: pass e cuts the shard into windows of T + 1 tokens (stride T) from a
    random offset in [0, T), and serves them in a random order of its own; x, y (N, T) int64.

    Batch `position` holds windows position * N ... position * N + N - 1 of the sequence of passes,
    so a batch may end one pass and start the next.
    """

    kind = "epochs"

    def __init__(self, tokens: np.ndarray, context_length: int, batch_size: int, seed: int):
        if len(tokens) < 2 * context_length + 1:
            raise BatchError(f"the training split has {len(tokens)} tokens, fewer than two windows of "
                             f"context_length = {context_length}; prepare more data or lower context_length")
        self.tokens = tokens
        self.context_length = context_length
        self.batch_size = batch_size
        self.seed = seed
        self.position = 0
        # windows per pass, the same for every offset: the last window must end inside the shard
        self.windows_per_pass = (len(tokens) - context_length) // context_length
        self._order: tuple[int, int, np.ndarray] | None = None  # (pass, offset, window order)

    def _pass(self, index: int) -> tuple[int, np.ndarray]:
        """(offset, window order) of pass `index`, derived from (seed, 'pass', index) alone."""
        if self._order is None or self._order[0] != index:
            rng = np.random.default_rng([int(self.seed), 1, int(index)])
            offset = int(rng.integers(0, self.context_length))
            self._order = (index, offset, rng.permutation(self.windows_per_pass))
        return self._order[1], self._order[2]

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        first = self.position * self.batch_size
        self.position += 1
        starts = []
        for window in range(first, first + self.batch_size):
            offset, order = self._pass(window // self.windows_per_pass)
            starts.append(offset + self.context_length * int(order[window % self.windows_per_pass]))
        return windows_at(self.tokens, np.asarray(starts), self.context_length)


class StoryBatches(Sampler):
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


def make_batches(kind: str, tokens: np.ndarray, context_length: int, batch_size: int, seed: int,
                 eot_id: int) -> WindowBatches | EpochWindows | StoryBatches:
    """The sampler named by TrainConfig.batching ('windows' | 'epochs' | 'stories')."""
    if kind == "windows":
        return WindowBatches(tokens, context_length, batch_size, seed)
    if kind == "epochs":
        return EpochWindows(tokens, context_length, batch_size, seed)
    if kind == "stories":
        return StoryBatches(tokens, context_length, batch_size, seed, eot_id)
    raise BatchError(f"batching must be 'windows', 'epochs' or 'stories', got {kind!r}")


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


# --------------------------------------------------------------------------------------------------
# A run's training data: the shards it reads, and the config adapted to their tokenizer


@dataclasses.dataclass
class Shards:
    """A prepared shards directory: metadata, token memmaps, tokenizer."""

    directory: Path
    meta: dict[str, Any]
    train: np.ndarray
    val: np.ndarray
    tokenizer: Any

    @property
    def val_bytes_per_token(self) -> float:
        val = self.meta.get("splits", self.meta)["val"]
        return float(val["bytes"]) / float(val["tokens"])


def _shards_directory(directory: str | os.PathLike | None) -> Path:
    if directory is None:
        raise BatchError("no data directory: pass --data DIR (a directory made by `tinystories data prepare`)")
    path = Path(directory)
    if not path.is_dir():
        raise BatchError(f"--data {path}: no such directory (prepare one with `tinystories data prepare`)")
    return path


def open_shards(directory: str | os.PathLike | None) -> Shards:
    from tinystories import data
    from tinystories.tokenizer import load_tokenizer

    path = _shards_directory(directory)
    meta = data.load_meta(path)
    return Shards(path, meta, data.load_tokens(path, "train"), data.load_tokens(path, "val"), load_tokenizer(path))


def adapt_to_data(run_config: Any, data_dir: str | os.PathLike) -> tuple[Any, list[str]]:
    """Fit a new run's config (a RunConfig) to its shards: their tokenizer decides vocab_size and tokenizer.

    Returns the adapted config and notes saying what changed.
    """
    from tinystories import data
    from tinystories.tokenizer import load_tokenizer

    directory = _shards_directory(data_dir)
    vocab_size = int(data.load_meta(directory)["vocab_size"])
    notes, model = [], run_config.model
    if vocab_size != model.vocab_size:
        notes.append(f"vocab_size set to {vocab_size} from the data's tokenizer (the preset says {model.vocab_size})")
        model = dataclasses.replace(model, vocab_size=vocab_size)
    spec = getattr(load_tokenizer(directory), "spec", None) or run_config.tokenizer
    if spec != run_config.tokenizer:
        notes.append(f"tokenizer is {spec} as in the data (the preset says {run_config.tokenizer})")
    adapted = dataclasses.replace(run_config, model=model, tokenizer=spec, data=str(directory.resolve()))
    return adapted, notes


def tokenizer_identity(directory: str | os.PathLike) -> tuple[Any, ...] | None:
    """What makes two saved tokenizers the same: kind, vocab_size, eot_id and the vocabulary itself
    (tokenizer.json's model: vocab and merges; tokenizer.bin's bytes). None when `directory` has none."""
    directory = Path(directory)
    meta_path = directory / "tokenizer_meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        vocabulary = directory / "tokenizer.json"
        model = json.loads(vocabulary.read_text(encoding="utf-8")).get("model") if vocabulary.is_file() else None
        pieces = directory / "tokenizer.bin"
        digest = hashlib.sha256(pieces.read_bytes()).hexdigest() if pieces.is_file() else None
    except (OSError, ValueError) as error:
        raise BatchError(f"{meta_path.parent}: unreadable tokenizer files ({error})") from None
    return meta.get("kind"), meta.get("vocab_size"), meta.get("eot_id"), json.dumps(model, sort_keys=True), digest


def check_same_tokenizer(run_dir: str | os.PathLike, shards: Shards) -> None:
    """Refuse shards made by another tokenizer than the run's own (the ids would mean other text)."""
    expected = tokenizer_identity(run_dir)
    if expected is not None and tokenizer_identity(shards.directory) != expected:
        raise BatchError(f"--data {shards.directory}: its shards were made by another tokenizer than the run "
                         f"in {run_dir} was trained with; use the run's own data or start a new run")
