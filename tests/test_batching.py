"""Batch sampling: windows and padded stories, determinism and resumable positions."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from tinystories import batching

EOT = 9


def story_shard(lengths: list[int], seed: int = 0) -> np.ndarray:
    """EOT s1 EOT s2 ...: stories of the given lengths with token ids 0..8 (never EOT)."""
    rng = np.random.default_rng(seed)
    parts = []
    for length in lengths:
        parts.append([EOT])
        parts.append(rng.integers(0, EOT, size=length))
    return np.concatenate(parts).astype(np.uint16)


def test_windows_are_shifted_slices_of_the_shard():
    tokens = np.arange(1000, dtype=np.uint16)  # token value == position: a window reveals its start
    sampler = batching.WindowBatches(tokens, context_length=16, batch_size=8, seed=3)
    for _ in range(20):
        x, y = sampler.next_batch()
        assert x.shape == y.shape == (8, 16) and x.dtype == np.int64
        starts = x[:, 0]
        assert (starts >= 0).all() and (starts + 16 < 1000).all()  # y's last token still inside the shard
        np.testing.assert_array_equal(x, starts[:, None] + np.arange(16))
        np.testing.assert_array_equal(y, x + 1)


def test_windows_depend_only_on_seed_and_position():
    tokens = np.arange(5000, dtype=np.uint16)
    first = batching.WindowBatches(tokens, 8, 4, seed=1)
    batches = [first.next_batch()[0] for _ in range(5)]
    assert not np.array_equal(batches[0], batches[1])
    resumed = batching.WindowBatches(tokens, 8, 4, seed=1)
    resumed.load_state_dict({"kind": "windows", "seed": 1, "position": 3})
    np.testing.assert_array_equal(resumed.next_batch()[0], batches[3])
    other_seed = batching.WindowBatches(tokens, 8, 4, seed=2)
    assert not np.array_equal(other_seed.next_batch()[0], batches[0])


def test_state_dict_is_plain_ints_and_loads_weights_only():
    sampler = batching.WindowBatches(np.arange(100, dtype=np.uint16), 8, 2, seed=5)
    sampler.next_batch()
    state = sampler.state_dict()
    assert state == {"kind": "windows", "seed": 5, "position": 1}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == state


def test_state_of_another_sampler_is_refused():
    sampler = batching.WindowBatches(np.arange(100, dtype=np.uint16), 8, 2, seed=5)
    with pytest.raises(batching.BatchError, match="seed 6"):
        sampler.load_state_dict({"kind": "windows", "seed": 6, "position": 0})
    with pytest.raises(batching.BatchError, match="stories"):
        sampler.load_state_dict({"kind": "stories", "seed": 5, "position": 0})


def test_too_short_split_is_a_clear_error():
    with pytest.raises(batching.BatchError, match="fewer than one window"):
        batching.WindowBatches(np.arange(10, dtype=np.uint16), 16, 2, seed=0)
    with pytest.raises(batching.BatchError, match="validation split"):
        batching.eval_window_starts(10, 16, 1000)


def test_story_batches_are_whole_stories_right_padded():
    lengths = [5, 12, 3, 30, 7]
    tokens = story_shard(lengths)
    starts = np.flatnonzero(tokens == EOT)
    stories = [np.append(tokens[s: s + n + 1], EOT) for s, n in zip(starts, lengths)]  # with the closing EOT
    sampler = batching.StoryBatches(tokens, context_length=20, batch_size=6, seed=0, eot_id=EOT)
    seen = set()
    for _ in range(10):
        x, y = sampler.next_batch()
        assert x.shape == y.shape and x.shape[1] <= 20
        for row_x, row_y in zip(x, y):
            real = row_y != -1
            n = int(real.sum())
            assert real[:n].all() and not real[n:].any()  # padding only at the right
            assert row_x[0] == EOT
            match = [i for i, s in enumerate(stories) if np.array_equal(row_x[:n], s[:n])]
            assert match, "row is not the beginning of a story"
            story = stories[match[0]]
            expected = min(len(story) - 1, 20)  # a story longer than T is cut to T inputs
            assert n == expected
            np.testing.assert_array_equal(row_y[:n], story[1: n + 1])
            seen.add(match[0])
        # the batch is only as wide as its longest story
        assert x.shape[1] == max(int((row != -1).sum()) for row in y)
    assert seen == set(range(len(lengths)))


def test_last_story_of_the_shard_is_closed_with_eot():
    tokens = story_shard([4])
    sampler = batching.StoryBatches(tokens, 16, 1, seed=0, eot_id=EOT)
    x, y = sampler.next_batch()
    np.testing.assert_array_equal(x[0], tokens)
    assert y[0, -1] == EOT


def test_story_starts_in_chunks_matches_flatnonzero():
    tokens = story_shard([3, 8, 1, 20, 2, 9], seed=4)
    np.testing.assert_array_equal(batching.story_starts(tokens, EOT, chunk_size=7), np.flatnonzero(tokens == EOT))


def test_micro_batches_split_rows_and_trim_padding_columns():
    x = np.arange(24).reshape(4, 6)
    y = x.copy()
    y[:2, 3:] = -1  # the first two rows are short: their micro-batch needs only 3 columns
    micro = batching.split_micro_batches(x, y, 2)
    assert [m[0].shape for m in micro] == [(2, 3), (2, 6)]
    np.testing.assert_array_equal(np.concatenate([m[0] for m in micro[1:]]), x[2:])
    np.testing.assert_array_equal(micro[0][1], y[:2, :3])


def test_eval_windows_are_fixed_and_cover_the_split():
    starts = batching.eval_window_starts(10_000, 32, 3200)
    assert len(starts) == 100
    assert starts[0] == 0 and starts[-1] == 10_000 - 33
    np.testing.assert_array_equal(starts, batching.eval_window_starts(10_000, 32, 3200))


def test_epochs_serve_every_window_once_per_pass_in_a_new_order():
    tokens = np.arange(1000, dtype=np.uint16)  # token value == position
    T, N = 10, 7
    sampler = batching.EpochWindows(tokens, T, N, seed=5)
    per_pass = sampler.windows_per_pass
    assert per_pass == (1000 - T) // T  # the same count whatever the pass's offset
    starts = []
    while len(starts) < 3 * per_pass:
        x, y = sampler.next_batch()
        np.testing.assert_array_equal(x, x[:, :1] + np.arange(T))
        np.testing.assert_array_equal(y, x + 1)
        starts.extend(int(s) for s in x[:, 0])
    passes = [starts[i * per_pass:(i + 1) * per_pass] for i in range(3)]
    for one in passes:
        offset = min(one) % T
        assert sorted(one) == [offset + T * k for k in range(per_pass)]  # each window exactly once
        assert max(one) + T + 1 <= 1000  # the last window's target stays in the shard
    assert passes[0] != passes[1] != passes[2]  # reshuffled every pass


def test_epochs_resume_from_their_position():
    tokens = np.arange(3000, dtype=np.uint16)
    straight = batching.EpochWindows(tokens, 16, 8, seed=2)
    expected = [straight.next_batch()[0] for _ in range(40)]  # crosses into the second pass
    first = batching.EpochWindows(tokens, 16, 8, seed=2)
    for _ in range(25):
        first.next_batch()
    resumed = batching.EpochWindows(tokens, 16, 8, seed=2)
    resumed.load_state_dict(first.state_dict())
    for batch in expected[25:]:
        np.testing.assert_array_equal(resumed.next_batch()[0], batch)
    with pytest.raises(batching.BatchError, match="saved data position is for windows"):
        resumed.load_state_dict(batching.WindowBatches(tokens, 16, 8, seed=2).state_dict())
