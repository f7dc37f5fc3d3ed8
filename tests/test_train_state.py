"""tinystories.train_state: the loop state round-trips through a checkpoint; RNGs and deterministic mode."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import torch

from tinystories.train_state import LoopState, capture_rng_state, deterministic_algorithms, seed_everything


def test_loop_state_round_trips_through_a_weights_only_load():
    seed_everything(3)
    loop = LoopState(step=12, tokens=4096, elapsed_seconds=1.5, best_val_loss=2.5, best_step=10, evals_since_best=1,
                     metrics_offset=777, interval_loss=6.25, interval_steps=2, global_batch=16, world_size=1)
    loop.capture_rng(None)
    buffer = io.BytesIO()
    torch.save({"loop": loop.to_dict()}, buffer)
    buffer.seek(0)
    loaded = LoopState.from_dict(torch.load(buffer, weights_only=True)["loop"])
    for name in ("step", "tokens", "elapsed_seconds", "best_val_loss", "best_step", "evals_since_best",
                 "metrics_offset", "interval_loss", "interval_steps", "global_batch", "world_size"):
        assert getattr(loaded, name) == getattr(loop, name), name
    # the random streams continue exactly where they were captured
    expected = (torch.rand(3), np.random.rand(3), random.random())
    seed_everything(99)
    loaded.restore_rng(rank=0, seed=3)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_a_rank_the_checkpoint_did_not_have_gets_its_own_stream():
    loop = LoopState(step=5)
    loop.capture_rng([capture_rng_state()])
    loop.restore_rng(rank=1, seed=7)
    first = torch.rand(2)
    loop.restore_rng(rank=1, seed=7)
    assert torch.equal(torch.rand(2), first)  # derived from (seed + step, rank): repeatable


def test_best_and_patience_bookkeeping():
    loop = LoopState(step=1)
    assert loop.record_eval(3.0) and loop.best_step == 1
    loop.step = 2
    assert not loop.record_eval(3.5) and loop.evals_since_best == 1
    loop.step = 3
    assert loop.record_eval(2.0) and (loop.best_val_loss, loop.best_step, loop.evals_since_best) == (2.0, 3, 0)
    assert math.isinf(LoopState().best_val_loss)


def test_a_version_1_checkpoint_state_converts():
    rng = capture_rng_state()
    old = {"version": 1, "step": 40, "tokens": 999, "elapsed_seconds": 3.0, "best_val_loss": 2.0, "best_step": 40,
           "evals_since_best": 0, "metrics_offset": 120, "global_batch": 8, "world_size": 1, "rng": rng,
           "interval": {"loss_sum": 4.5, "steps": 3}}
    loop = LoopState.from_version_1(old)
    assert (loop.step, loop.tokens, loop.metrics_offset, loop.interval_loss, loop.interval_steps) == (40, 999, 120, 4.5, 3)
    assert len(loop.rng) == 1 and torch.equal(loop.rng[0]["torch"], rng["torch"])


def test_deterministic_mode_is_on_inside_and_restored_after():
    import torch.utils.deterministic as settings

    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(True, torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert settings.fill_uninitialized_memory is False
    assert not torch.are_deterministic_algorithms_enabled() and settings.fill_uninitialized_memory is True
    with deterministic_algorithms(False, torch.device("cpu")):
        assert not torch.are_deterministic_algorithms_enabled()
