"""Data parallel training: torchrun detection, rank micro-batches, 2 ranks == 1 process, resume across world
sizes, and all ranks stopping together when one of them is signalled. Real `torchrun` subprocesses on CPU (gloo)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tinystories import batching
from tinystories.checkpoint import load_training_state, load_weights
from tinystories.config import RunConfig, apply_overrides
from tinystories.distributed import DistributedError, launch_environment
from tinystories.batching import adapt_to_data
from tinystories.train import train

REPO_ROOT = Path(__file__).resolve().parents[1]

# tiny model; constant lr so a run's first steps do not depend on max_steps; no dropout so ranks are comparable
# AdamW, not tiny's Muon: Muon orthogonalizes each update in bfloat16, which turns the last-bit
# difference between an all-reduced and a single-process gradient into weight differences far above
# the 1e-6 at which these tests compare the two to check the data-parallel logic itself.
DDP_SETS = ["n_layer=1", "d_model=32", "n_head=2", "context_length=32", "eval_tokens=128", "sample_tokens=0",
            "log_every=1", "warmup_steps=0", "schedule=constant", "dropout=0", "lr=1e-2", "compile=false",
            "device=cpu", "optimizer=adamw"]

# Weights after AdamW steps compare at 1% of one step (lr 1e-2, each entry moves by ~lr): where an entry's
# gradient is near Adam's eps (1e-8), update = lr * g / (|g| + eps) turns a last-bit gradient difference
# into up to lr/eps = 1e6 times as much (measured 1.1e-5 on an AVX-512 Xeon), while a wrong data split or
# a missing all-reduce moves entries by ~lr. The gradients themselves are compared tightly.
ADAM_STEP_ATOL = 1e-4


# One CPU thread (the fixture is in conftest.py): tiny models run fastest without thread hand-offs.
pytestmark = pytest.mark.usefixtures("one_thread")


def run_config(data: Path, *overrides: str) -> RunConfig:
    run = apply_overrides(RunConfig.from_preset("tiny"), DDP_SETS + list(overrides))
    return adapt_to_data(run, data)[0]


def torchrun_command(data: Path, out: Path, *args: str, nproc: int = 2) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "tinystories", "train", "--data", str(data), "--out", str(out), "--no-progress", *args]
    for item in DDP_SETS:
        command += ["--set", item]
    return command


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(REPO_ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


@contextlib.contextmanager
def torchrun_job(command: list[str]):
    """Start a torchrun job in its own process group; on the way out kill what is left of it (a failed
    assertion must not leave workers spinning on the shared machine)."""
    job = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        yield job
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_weights_close(a: Path, b: Path, atol: float) -> None:
    left, right = load_weights(a), load_weights(b)
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], atol=atol, rtol=0, msg=name)


# --- detection and the batch split ---------------------------------------------------------------


def test_torchrun_environment_is_detected():
    assert launch_environment({}) is None  # a plain process
    launch = launch_environment({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (launch.rank, launch.local_rank, launch.world_size) == (3, 1, 8)
    assert launch_environment({"RANK": "0", "WORLD_SIZE": "1"}).local_rank == 0
    with pytest.raises(DistributedError, match="RANK=8 WORLD_SIZE=8"):
        launch_environment({"RANK": "8", "WORLD_SIZE": "8", "LOCAL_RANK": "0"})
    with pytest.raises(DistributedError, match="expected integers"):
        launch_environment({"RANK": "zero", "WORLD_SIZE": "2"})


def test_ranks_split_one_global_batch_the_same_way_at_any_world_size():
    """2 ranks x 2 micro-batches, 4 ranks x 1 and 1 rank x 4 train on the same rows of the same global batch."""
    tokens = np.arange(10_000, dtype=np.uint16)
    x, y = batching.WindowBatches(tokens, 8, 12, seed=0).next_batch()  # one step: 12 rows
    per_rank = [batching.rank_micro_batches(x, y, 2, rank, 2) for rank in range(2)]  # batch_size 3
    # rank r takes micro-batches r, r + W: rank 0 rows 0-2 and 6-8, rank 1 rows 3-5 and 9-11
    np.testing.assert_array_equal(np.concatenate([m[0] for m in per_rank[0]]), x[[0, 1, 2, 6, 7, 8]])
    np.testing.assert_array_equal(np.concatenate([m[1] for m in per_rank[1]]), y[[3, 4, 5, 9, 10, 11]])
    for grad_accum, world in ((2, 2), (1, 4), (4, 1)):
        rows = sorted(tuple(row) for rank in range(world)
                      for xs, _ in batching.rank_micro_batches(x, y, grad_accum, rank, world) for row in xs)
        assert rows == sorted(tuple(row) for row in x)  # every row once, on exactly one rank
    with pytest.raises(ValueError, match="rank 2"):
        batching.rank_micro_batches(x, y, 1, 2, 2)


# --- real torchrun jobs --------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_resume_with_one(prepared_small, tmp_path):
    """One step of 2 ranks x batch 4 == one step of 1 process x batch 8 (same windows), and the 2-rank run
    resumed by 1 process (batch 8) continues as the uninterrupted single-process run does."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    command = torchrun_command(prepared_small, ddp, "--max-steps", "1", "--eval-every", "1", "--batch-size", "4")
    with torchrun_job(command) as job:
        # meanwhile, the single-process reference: 1 step (extended to 3 below)
        train(run_config(prepared_small, "batch_size=8", "max_steps=1", "eval_every=1"), single, progress=False)
        single_step1 = load_weights(single / "checkpoints" / "last")
        output = job.communicate(timeout=120)[0].decode()
    assert job.returncode == 0, output[-3000:]
    assert "global batch 4 x 1 x 2 = 8 sequences" in output

    # The all-reduced gradient is what data parallelism must get right: AdamW's first moment after step 1 is
    # 0.1 x that gradient, equal up to float summation order (1e-6 of each tensor's largest entry).
    state = load_training_state(ddp / "checkpoints" / "last")
    single_state = load_training_state(single / "checkpoints" / "last")
    ddp_moments, single_moments = (s["optimizer"]["states"][0]["state"] for s in (state, single_state))
    for index, reference in single_moments.items():
        moment = reference["exp_avg"]
        torch.testing.assert_close(ddp_moments[index]["exp_avg"], moment, atol=1e-6 * float(moment.abs().max()),
                                   rtol=0, msg=f"gradient of parameter {index}")
    ddp_step1 = load_weights(ddp / "checkpoints" / "last")
    for name, tensor in single_step1.items():
        torch.testing.assert_close(ddp_step1[name], tensor, atol=ADAM_STEP_ATOL, rtol=0, msg=name)
    loop = state["loop"]
    assert loop["step"] == 1 and state["batches"]["position"] == 1 and loop["global_batch"] == 8
    assert loop["world_size"] == 2 and len(loop["rng"]) == 2  # each rank's random state
    assert loop["tokens"] == load_training_state(single / "checkpoints" / "last")["loop"]["tokens"] == 8 * 32
    ddp_records, single_records = read_metrics(ddp), read_metrics(single)
    assert [r["step"] for r in ddp_records] == [1, 1]  # one train and one val record: rank 0 alone logs
    for mine, reference in zip(ddp_records, single_records):
        for key in ("train_loss", "val_loss", "grad_norm"):
            if key in reference:
                assert mine[key] == pytest.approx(reference[key], abs=1e-6), key

    # resume both with one process and the same global batch of 8: same data, same weights (float tolerance)
    train(run_config(prepared_small, "batch_size=8", "max_steps=3", "eval_every=1"), single, progress=False)
    train(run_config(prepared_small, "batch_size=4", "grad_accum=2", "max_steps=3", "eval_every=1"), ddp,
          progress=False)
    assert_weights_close(ddp / "checkpoints" / "last", single / "checkpoints" / "last", atol=ADAM_STEP_ATOL)
    resumed = load_training_state(ddp / "checkpoints" / "last")
    assert resumed["batches"]["position"] == 3 and resumed["loop"]["world_size"] == 1 and len(resumed["loop"]["rng"]) == 1
    losses = [r["train_loss"] for r in read_metrics(ddp) if "train_loss" in r]
    assert losses == pytest.approx([r["train_loss"] for r in read_metrics(single) if "train_loss" in r], abs=1e-5)


def worker_processes(parent: int) -> dict[int, int]:
    """{RANK: pid} of torchrun's worker processes (its children), read from /proc."""
    workers = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            environ = dict(item.split("=", 1) for item in (entry / "environ").read_bytes().decode().split("\0")
                           if "=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in environ:
            workers[int(environ["RANK"])] = int(entry.name)
    return workers


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through Linux /proc")
def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint(prepared_small, tmp_path):
    run_dir = tmp_path / "run"
    command = torchrun_command(prepared_small, run_dir, "--max-steps", "100000", "--eval-every", "100000",
                               "--batch-size", "2")
    with torchrun_job(command) as job:
        deadline = time.monotonic() + 90
        logged = 0
        while logged < 3 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            try:
                logged = len((run_dir / "metrics.jsonl").read_text().splitlines())
            except FileNotFoundError:
                pass
        assert job.poll() is None, job.communicate()[0].decode()[-3000:]
        workers = worker_processes(job.pid)
        assert set(workers) == {0, 1}
        os.kill(workers[1], signal.SIGTERM)  # rank 1 alone is told to stop; rank 0 must agree and checkpoint
        output = job.communicate(timeout=60)[0].decode()
    assert "SIGTERM: saved" in output, output[-3000:]  # said by rank 0, which got no signal itself
    state = load_training_state(run_dir / "checkpoints" / "last")["loop"]
    assert state["step"] >= 3 and len(state["rng"]) == 2
    assert state["step"] == max(r["step"] for r in read_metrics(run_dir))  # the step both ranks stopped at
    assert load_weights(run_dir / "checkpoints" / "last")

    # the same command resumes it with the same world size (each rank restores its own random state)
    target = state["step"] + 2
    with torchrun_job(torchrun_command(prepared_small, run_dir, "--max-steps", str(target), "--eval-every",
                                       "100000", "--batch-size", "2")) as job:
        output = job.communicate(timeout=90)[0].decode()
    assert job.returncode == 0, output[-3000:]
    assert load_training_state(run_dir / "checkpoints" / "last")["loop"]["step"] == target
    assert [r["step"] for r in read_metrics(run_dir) if "train_loss" in r] == list(range(1, target + 1))
