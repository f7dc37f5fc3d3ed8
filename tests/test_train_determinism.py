"""The default path is reproducible: `tiny`'s own recipe (torch.compile, Muon, 2 threads) trained twice,
and interrupted by SIGTERM or kill -9 then resumed with the same command, ends with the same weights,
optimizer state, loop state and logged losses, bit for bit.

Each run is a real `tinystories train` process. Only the run's length and batch are cut down (the
architecture, optimizer, compile and deterministic settings are the preset's).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tinystories.checkpoint import load_training_state, load_weights
from tinystories.config import get_preset

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS, EVAL_EVERY = 24, 8
SHORTER = ["--max-steps", str(STEPS), "--eval-every", str(EVAL_EVERY), "--batch-size", "4",
           "--set", "eval_tokens=1024", "--set", "sample_tokens=0", "--set", "log_every=2", "--set", "warmup_steps=4"]


def command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "tinystories", "train", "--preset", "tiny", "--data", str(data), "--out", str(out),
            "--device", "cpu", "--no-progress", *SHORTER]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "2"  # several threads: where compiled kernels could race
    return env


def logged_steps(run: Path) -> list[int]:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def interrupt(data: Path, run: Path, sig: int, when) -> int:
    """Start a run, send `sig` once `when(run)` holds, return the exit code."""
    process = subprocess.Popen(command(data, run), env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not when(run):
        assert process.poll() is None, f"{run.name} ended before its signal: {process.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, f"{run.name}: timed out waiting for its signal step"
        time.sleep(0.01)
    process.send_signal(sig)
    process.wait(timeout=600)
    return process.returncode


def finish(data: Path, run: Path) -> None:
    done = subprocess.run(command(data, run), env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          timeout=900)
    assert done.returncode == 0, done.stderr.decode()[-3000:]


def tensors_of(value, prefix: str = "") -> dict[str, object]:
    """Every leaf of a nested state (dicts, lists, tensors, numbers) by its path."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in tensors_of(item, f"{prefix}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for index, item in enumerate(value) for k, v in tensors_of(item, f"{prefix}/{index}").items()}
    return {prefix: value}


def assert_identical_runs(run: Path, reference: Path) -> None:
    for which in ("last", "best"):
        ours, theirs = load_weights(run / "checkpoints" / which), load_weights(reference / "checkpoints" / which)
        assert ours.keys() == theirs.keys()
        for name in theirs:
            assert torch.equal(ours[name], theirs[name]), f"{run.name} {which}: {name} differs"
    ours = tensors_of(load_training_state(run / "checkpoints" / "last"))
    theirs = tensors_of(load_training_state(reference / "checkpoints" / "last"))
    clock_and_ids = ("/loop/elapsed_seconds", "/save_id", "/loop/metrics_offset")  # wall time differs; ids are random
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if key.startswith(clock_and_ids):
            continue
        if isinstance(value, torch.Tensor):
            assert torch.equal(ours[key], value), f"{run.name}: {key} differs"
        else:
            assert ours[key] == value, f"{run.name}: {key} is {ours[key]!r}, not {value!r}"
    keep = ("step", "train_loss", "val_loss", "grad_norm")
    records = [{k: r[k] for k in keep if k in r} for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    expected = [{k: r[k] for k in keep if k in r}
                for r in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())]
    assert records == expected  # the same losses to the last bit, and the log reads as one run


@pytest.mark.slow
def test_the_default_compiled_recipe_repeats_bit_for_bit_across_runs_and_interruptions(prepared_small, tmp_path):
    preset = get_preset("tiny").train
    assert preset.compile and preset.deterministic and preset.optimizer == "muon"  # the path under test
    reference, again, stopped, killed = (tmp_path / name for name in ("reference", "again", "sigterm", "sigkill"))
    finish(prepared_small, reference)
    finish(prepared_small, again)
    assert_identical_runs(again, reference)

    # SIGTERM after the first checkpoint (it saves where it stands); kill -9 once that checkpoint is written
    # (the run resumes from it and redoes the lost steps)
    after_first_eval = lambda run: max(logged_steps(run), default=0) >= EVAL_EVERY + 2  # noqa: E731
    checkpointed = lambda run: (run / "checkpoints" / "last" / "state.pt").exists()  # noqa: E731
    assert interrupt(prepared_small, stopped, signal.SIGTERM, after_first_eval) == 143
    assert interrupt(prepared_small, killed, signal.SIGKILL, checkpointed) == -signal.SIGKILL
    assert EVAL_EVERY < load_training_state(stopped / "checkpoints" / "last")["loop"]["step"] < STEPS
    assert load_training_state(killed / "checkpoints" / "last")["loop"]["step"] == EVAL_EVERY
    finish(prepared_small, stopped)
    finish(prepared_small, killed)
    assert_identical_runs(stopped, reference)
    assert_identical_runs(killed, reference)
