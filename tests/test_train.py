"""Training: schedule, optimizer groups, accumulation, masking, resume, signals, divergence, run layout."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinystories import batching
from tinystories import train_setup
from tinystories.checkpoint import CheckpointError, load_training_state, load_weights
from tinystories.config import ModelConfig, RunConfig, TrainConfig, apply_overrides
from tinystories.model import GPT
from tinystories.batching import adapt_to_data
from tinystories.runlog import DivergenceError, TrackerError
from tinystories.train import TrainingError, accumulate_gradients, train

REPO_ROOT = Path(__file__).resolve().parents[1]

# A model small enough that a training step takes milliseconds on a shared CPU.
TINY_OVERRIDES = ["n_layer=1", "d_model=32", "n_head=2", "context_length=32", "batch_size=4", "eval_tokens=256",
                  "sample_tokens=8", "compile=false", "log_every=1", "eval_every=5", "max_steps=10",
                  "warmup_steps=2", "device=cpu"]


# One CPU thread (the fixture is in conftest.py): tiny models run fastest without thread hand-offs.
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_run(data: Path, *overrides: str) -> RunConfig:
    run = apply_overrides(RunConfig.from_preset("tiny"), TINY_OVERRIDES + list(overrides))
    run, _ = adapt_to_data(run, data)
    return run


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- gradients and losses ------------------------------------------------------------------------


def test_grad_accum_two_halves_equals_one_full_batch():
    config = ModelConfig(vocab_size=64, context_length=16, n_layer=1, n_head=2, d_model=32)
    tokens = np.random.default_rng(0).integers(0, 64, size=2000).astype(np.uint16)
    x, y = batching.WindowBatches(tokens, 16, 8, seed=0).next_batch()  # the same windows for both
    results = []
    for grad_accum in (2, 1):
        torch.manual_seed(0)
        model = GPT(config)
        loss, norm, count = accumulate_gradients(model, model, x, y, grad_accum, 0.5, torch.device("cpu"), None)
        grads = [p.grad.clone() for p in model.parameters()]
        torch.optim.SGD(model.parameters(), lr=0.1).step()  # plain SGD: the update is the gradient itself
        results.append((loss, norm, count, grads, [p.detach().clone() for p in model.parameters()]))
    (loss_a, norm_a, count_a, grads_a, params_a), (loss_b, norm_b, count_b, grads_b, params_b) = results
    assert count_a == count_b == 8 * 16
    assert loss_a == pytest.approx(loss_b, abs=1e-6) and norm_a == pytest.approx(norm_b, abs=1e-6)
    assert norm_a > 0.5  # clipping was active, on the accumulated gradient
    for a, b in zip(grads_a + params_a, grads_b + params_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_story_batches_mask_padding_out_of_the_loss(prepared_small):
    from tinystories.data import load_meta, load_tokens

    meta = load_meta(prepared_small)
    tokens = load_tokens(prepared_small, "train")
    config = ModelConfig(vocab_size=meta["vocab_size"], context_length=512, n_layer=1, n_head=2, d_model=32)
    torch.manual_seed(0)
    model = GPT(config)
    x, y = batching.StoryBatches(tokens, 512, 6, seed=1, eot_id=meta["eot_id"]).next_batch()
    assert (y == -1).any(), "the batch should need padding"
    loss, _, count = accumulate_gradients(model, model, x, y, 2, 0.0, torch.device("cpu"), None)
    # by hand: each story alone (no padding anywhere), summed over its tokens, divided by all real tokens
    total, real = 0.0, 0
    with torch.no_grad():
        for row_x, row_y in zip(x, y):
            n = int((row_y != -1).sum())
            logits, _ = model(torch.from_numpy(row_x[None, :n]))
            total += float(F.cross_entropy(logits[0], torch.from_numpy(row_y[:n]), reduction="sum"))
            real += n
    assert count == real
    assert loss == pytest.approx(total / real, abs=1e-5)


# --- training runs -------------------------------------------------------------------------------


def test_tiny_model_learns_and_writes_the_run_layout(prepared_small, tmp_path):
    run_dir = tmp_path / "run"
    summary = train(tiny_run(prepared_small, "max_steps=40", "eval_every=20", "lr=1e-2", "log_every=5"), run_dir,
                    progress=False)
    assert summary["steps"] == 40 and summary["stop_reason"] == "max_steps"
    assert summary["tokens"] == 40 * 4 * 32
    records = read_metrics(run_dir)
    train_losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert train_losses[0] > train_losses[-1] + 0.5
    assert summary["best_val_loss"] < math.log(512) - 0.5  # far below a uniform guess over 512 tokens
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    for record in records:
        assert {"step", "tokens", "lr", "tokens_per_second", "grad_norm", "elapsed_seconds"} <= set(record)
    # bits per byte from the val split's bytes-per-token ratio
    meta = json.loads((prepared_small / "meta.json").read_text())
    val = meta["splits"]["val"]
    assert evals[-1]["val_bpb"] == pytest.approx(evals[-1]["val_loss"] * val["tokens"] / val["bytes"] / math.log(2))
    assert summary["best_val_bpb"] == pytest.approx(min(r["val_bpb"] for r in evals))
    # run directory: config, tokenizer, plot, both checkpoints
    saved = RunConfig.load(run_dir / "config.json")
    assert saved.model.vocab_size == 512 and saved.tokenizer == "bpe:512"
    from tinystories.tokenizer import load_tokenizer

    assert load_tokenizer(run_dir).vocab_size == 512
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for which in ("last", "best"):
        assert (run_dir / "checkpoints" / which / "model.safetensors").is_file()
    state = load_training_state(run_dir / "checkpoints" / "last")  # torch.load(weights_only=True)
    assert state["loop"]["step"] == 40 and state["batches"]["position"] == 40
    assert isinstance(state["loop"]["rng"][0]["torch"], torch.Tensor)


def test_resume_extends_a_finished_run_through_the_cli(prepared_small, tmp_path):
    from tinystories.cli import main

    run_dir = tmp_path / "run"
    common = ["--data", str(prepared_small), "--out", str(run_dir), "--no-progress", "--device", "cpu"]
    sets = [arg for item in TINY_OVERRIDES for arg in ("--set", item)]
    assert main(["train", *common, *sets, "--max-steps", "4"]) == 0
    assert load_training_state(run_dir / "checkpoints" / "last")["loop"]["step"] == 4
    assert main(["train", "--out", str(run_dir), "--no-progress", "--max-steps", "7"]) == 0  # no --data: saved
    assert load_training_state(run_dir / "checkpoints" / "last")["loop"]["step"] == 7
    assert RunConfig.load(run_dir / "config.json").train.max_steps == 7
    steps = [r["step"] for r in read_metrics(run_dir) if "train_loss" in r]
    assert steps == list(range(1, 8))  # no duplicated or missing log lines across the resume


def test_init_from_starts_with_another_runs_weights(prepared_small, tmp_path):
    source = tmp_path / "source"
    train(tiny_run(prepared_small, "max_steps=5"), source, progress=False)
    # one step with vanishing learning rates (AdamW and Muon; no decay) leaves the weights where they started
    tuned = tmp_path / "tuned"
    run = tiny_run(prepared_small, "max_steps=1", "lr=1e-12", "muon_lr=1e-12", "weight_decay=0", "warmup_steps=0", "seed=99")
    train(run, tuned, init_from=source, progress=False)
    start, after = load_weights(source / "checkpoints" / "best"), load_weights(tuned / "checkpoints" / "last")
    for name, tensor in start.items():
        torch.testing.assert_close(after[name], tensor, atol=1e-6, rtol=0)
    assert RunConfig.load(tuned / "config.json").init_from == str(source)


def test_patience_stops_early(prepared_small, tmp_path):
    # lr so small the loss barely moves: with patience 1 the first non-improving evaluation stops training
    run = tiny_run(prepared_small, "max_steps=200", "eval_every=1", "lr=1e-9", "warmup_steps=0", "patience=1",
                   "sample_tokens=0", "eval_tokens=32")
    summary = train(run, tmp_path / "run", progress=False)
    assert summary["stop_reason"] == "patience" and summary["steps"] < 200


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(prepared_small, tmp_path, monkeypatch):
    def model_that_diverges(config):
        model = GPT(config)
        calls = {"training": 0}

        def inject_nan(module, inputs, output):
            if module.training:
                calls["training"] += 1
                if calls["training"] >= 8:  # the 8th training forward: step 8
                    logits, loss = output
                    return logits, loss * float("nan")
            return output

        model.register_forward_hook(inject_nan)
        return model

    monkeypatch.setattr(train_setup, "create_model", model_that_diverges)
    run_dir = tmp_path / "run"
    with pytest.raises(DivergenceError, match=r"diverged at step 8: loss nan.*checkpoints/last \(step 5\)"):
        train(tiny_run(prepared_small, "max_steps=20", "eval_every=5"), run_dir, progress=False)
    state = load_training_state(run_dir / "checkpoints" / "last")
    assert state["loop"]["step"] == 5
    assert all(torch.isfinite(t).all() for t in load_weights(run_dir / "checkpoints" / "last").values())


def test_divergence_between_log_steps_is_found_at_the_next_read_and_nothing_bad_is_saved(prepared_small, tmp_path,
                                                                                         monkeypatch):
    """Losses are read from the device only at log steps (and before evaluations and checkpoints): a NaN at
    step 7 with log_every 3 is found at step 9, named as step 7, and the step-5 checkpoint stays the last."""
    def model_that_diverges(config):
        model = GPT(config)
        calls = {"training": 0}

        def inject_nan(module, inputs, output):
            if module.training:
                calls["training"] += 1
                if calls["training"] == 7:  # step 7 only: a transient spike the next steps would not show
                    logits, loss = output
                    return logits, loss * float("nan")
            return output

        model.register_forward_hook(inject_nan)
        return model

    monkeypatch.setattr(train_setup, "create_model", model_that_diverges)
    read_at_steps = []
    real_read = torch.Tensor.tolist

    def counting_tolist(tensor):
        if tensor.dim() == 2 and tensor.shape[1] == 2:  # the loop's (steps, [loss, grad norm]) read
            read_at_steps.append(tensor.shape[0])
        return real_read(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    run_dir = tmp_path / "run"
    with pytest.raises(DivergenceError, match=r"diverged at step 7: loss nan.*checkpoints/last \(step 5\)"):
        train(tiny_run(prepared_small, "max_steps=20", "eval_every=5", "log_every=3"), run_dir, progress=False)
    assert read_at_steps == [3, 2, 1, 3]  # reads at steps 3, 5 (eval), 6 and 9: one per log interval or eval
    assert load_training_state(run_dir / "checkpoints" / "last")["loop"]["step"] == 5
    assert [r["step"] for r in read_metrics(run_dir) if "train_loss" in r] == [3, 6]  # nothing logged after


def test_mismatched_config_is_one_clear_error(prepared_small, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_run(prepared_small, "max_steps=2", "eval_every=2"), run_dir, progress=False)
    with pytest.raises(CheckpointError, match=r"different model config \(d_model: 32 -> 64\)"):
        train(tiny_run(prepared_small, "max_steps=4", "d_model=64"), run_dir, progress=False)
    with pytest.raises(TrainingError, match="already holds a run"):
        train(tiny_run(prepared_small, "max_steps=4"), run_dir, resume=False, progress=False)


def test_truncated_checkpoint_is_one_clear_error(prepared_small, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_run(prepared_small, "max_steps=2", "eval_every=2"), run_dir, progress=False)
    weights = run_dir / "checkpoints" / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        train(tiny_run(prepared_small, "max_steps=4"), run_dir, progress=False)


def broken_by(fault: str, run_dir: Path, other_run: Path) -> None:
    """Damage a finished run's checkpoint the way `fault` says."""
    last = run_dir / "checkpoints" / "last"
    if fault == "truncated weights":
        weights = last / "model.safetensors"
        weights.resolve().write_bytes(weights.read_bytes()[:100])
    elif fault == "truncated state":
        state = last / "state.pt"
        state.resolve().write_bytes(state.read_bytes()[:200])
    elif fault == "state from another run":
        (last / "state.pt").resolve().write_bytes((other_run / "checkpoints" / "last" / "state.pt").read_bytes())
    elif fault == "config does not match the weights":
        config = json.loads((run_dir / "config.json").read_text())
        config["model"]["n_layer"] = 2
        (run_dir / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("fault, message", [
    ("truncated weights", "unreadable or truncated safetensors file"),
    ("truncated state", "unreadable training state"),
    ("state from another run", "come from different saves"),
    ("config does not match the weights", "weights do not match the model config"),
])
def test_a_damaged_checkpoint_is_one_line_and_exit_2(prepared_small, tmp_path, capsys, fault, message):
    from tinystories.cli import main

    runs = {}
    for name, seed in (("run", 1), ("other", 2)):
        runs[name] = tmp_path / name
        train(tiny_run(prepared_small, "max_steps=2", "eval_every=2", f"seed={seed}"), runs[name], progress=False)
    broken_by(fault, runs["run"], runs["other"])
    capsys.readouterr()
    assert main(["train", "--out", str(runs["run"]), "--max-steps", "4", "--no-progress"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith("tinystories: error: ") and message in errors[0], errors


def test_data_from_another_tokenizer_is_refused_in_one_line(prepared_small, small_story_files, tmp_path, capsys):
    from tinystories.cli import main
    from tinystories.data import prepare

    run_dir = tmp_path / "run"
    train(tiny_run(prepared_small, "max_steps=2", "eval_every=2"), run_dir, progress=False)
    train_file, valid_file = small_story_files
    other = tmp_path / "other-shards"  # the same vocabulary size, trained on other text: other ids
    prepare([valid_file, train_file], other, "bpe:512", [valid_file], progress=False)
    capsys.readouterr()
    assert main(["train", "--out", str(run_dir), "--data", str(other), "--max-steps", "4", "--no-progress"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert errors == [f"tinystories: error: --data {other}: its shards were made by another tokenizer than the run "
                      f"in {run_dir} was trained with; use the run's own data or start a new run"], errors


def test_weight_average_is_evaluated_saved_and_used_for_generation(prepared_small, tmp_path):
    from tinystories.checkpoint import EMA_FILE, load_run

    run_dir = tmp_path / "run"
    train(tiny_run(prepared_small, "max_steps=6", "eval_every=3", "ema_decay=0.5"), run_dir, progress=False)
    evals = [r for r in read_metrics(run_dir) if "val_loss" in r]
    assert len(evals) == 2 and all("val_loss_raw" in r and r["val_loss"] != r["val_loss_raw"] for r in evals)
    last = run_dir / "checkpoints" / "last"
    average = load_weights(last, EMA_FILE)
    model, _, _ = load_run(run_dir, "last")
    assert torch.equal(model.tok_emb.weight, average["tok_emb.weight"])  # generation uses the average
    assert not torch.equal(average["tok_emb.weight"], load_weights(last)["tok_emb.weight"])


def test_a_run_with_a_weight_average_resumes_bit_exactly(prepared_small, tmp_path, monkeypatch):
    """Stopped at step 4 (as by SIGTERM) and resumed: the weights and their average equal a straight run's."""
    from tinystories import train as train_loop
    from tinystories.checkpoint import EMA_FILE

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run = tiny_run(prepared_small, "max_steps=8", "eval_every=3", "ema_decay=0.9", "batching=epochs", "dropout=0.1")
    train(run, straight, progress=False)
    real_stop_reason = train_loop.stop_reason
    monkeypatch.setattr(train_loop, "stop_reason",
                        lambda r, signals: "sigterm" if r.loop.step == 4 else real_stop_reason(r, signals))
    assert train(run, stopped, progress=False)["stop_reason"] == "sigterm"
    monkeypatch.setattr(train_loop, "stop_reason", real_stop_reason)
    assert train(run, stopped, progress=False)["steps"] == 8
    for file in ("model.safetensors", EMA_FILE):
        ours = load_weights(stopped / "checkpoints" / "last", file)
        for name, tensor in load_weights(straight / "checkpoints" / "last", file).items():
            assert torch.equal(ours[name], tensor), (file, name)


@pytest.mark.parametrize("option, module", [("wandb=proj", "wandb"), ("tensorboard=true", "torch.utils.tensorboard")])
def test_missing_tracker_is_a_user_error(prepared_small, tmp_path, option, module):
    try:
        __import__(module)
    except ImportError:
        pass
    else:
        pytest.skip(f"{module} is installed here: there is nothing to refuse")
    with pytest.raises(TrackerError, match="is not installed"):
        train(tiny_run(prepared_small, option), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


# --- every preset trains -------------------------------------------------------------------------

SMALL_PRESETS = ["tiny", "seed000", "seed004"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in SMALL_PRESETS else pytest.mark.slow)
                                  for n in ["tiny", "small", "medium", "seed000", "seed001", "seed002", "seed003",
                                            "seed004"]])
def test_every_preset_trains_a_step(name, prepared_small, tmp_path):
    shorter = ["context_length=32", "batch_size=2", "grad_accum=1", "max_steps=2", "eval_every=2", "eval_tokens=32",
               "sample_tokens=4", "compile=false", "device=cpu", "warmup_steps=1"]
    if RunConfig.from_preset(name).model.sliding_window is not None:
        shorter.append("sliding_window=16")  # shorter than the 32-token context, so the window is exercised
    run, _ = adapt_to_data(apply_overrides(RunConfig.from_preset(name), shorter), prepared_small)  # 512-token vocab
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seed002's adamw8bit falls back to AdamW without bitsandbytes
        summary = train(run, tmp_path / name, progress=False)
    assert summary["steps"] == 2 and math.isfinite(summary["best_val_loss"])
    if run.model.sliding_window is not None:
        assert_the_window_limits_attention(tmp_path / name)


def assert_the_window_limits_attention(run_dir: Path) -> None:
    """The trained model's first 16 positions match full attention; later ones see less, so they differ."""
    from tinystories.checkpoint import load_run

    windowed, _, config = load_run(run_dir, "last")
    full = GPT(dataclasses.replace(config.model, sliding_window=None))
    full.load_state_dict(windowed.state_dict())
    full.eval()
    idx = torch.randint(0, config.model.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        local, everything = windowed(idx)[0], full(idx)[0]
    torch.testing.assert_close(local[:, :16], everything[:, :16])
    assert not torch.allclose(local[:, 16:], everything[:, 16:])


# --- real processes: signals, kill -9, atomic saves ----------------------------------------------

RESUME_SETS = ["n_layer=1", "d_model=32", "n_head=2", "context_length=32", "batch_size=4", "dropout=0.1",
               "eval_tokens=128", "sample_tokens=0", "log_every=10", "eval_every=40", "warmup_steps=10"]


def tensor_bytes(checkpoint: Path) -> dict[str, bytes]:
    """Each tensor's raw bytes (the safetensors header's metadata order varies between writes)."""
    return {name: tensor.numpy().tobytes() for name, tensor in load_weights(checkpoint).items()}


def train_command(data: Path, out: Path, max_steps: int) -> list[str]:
    command = [sys.executable, "-m", "tinystories", "train", "--data", str(data), "--out", str(out),
               "--max-steps", str(max_steps), "--no-compile", "--device", "cpu", "--no-progress"]
    for item in RESUME_SETS:
        command += ["--set", item]
    return command


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


def start_and_interrupt(command: list[str], run_dir: Path, when, sig: int, timeout: float = 60.0):
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not when() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, f"finished before the signal: {process.communicate()[1].decode()[-2000:]}"
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout.decode() + stderr.decode()


@pytest.mark.slow
def test_interrupted_runs_resume_bit_exactly(prepared_small, tmp_path):
    """Uninterrupted vs SIGINT mid-way vs kill -9 after the first checkpoint, each then resumed with the
    same command: identical final weights, bit for bit. The three runs go side by side to save time."""
    steps = 120
    reference, interrupted, killed = tmp_path / "reference", tmp_path / "sigint", tmp_path / "sigkill"
    commands = {run: train_command(prepared_small, run, steps) for run in (reference, interrupted, killed)}
    processes = {run: subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE) for run, command in commands.items()}
    # SIGINT once step 70 is logged; SIGKILL after the first checkpoint (step 40) once step 50 is logged
    pending = {interrupted: (70, signal.SIGINT), killed: (50, signal.SIGKILL)}
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        for run, (at_step, sig) in list(pending.items()):
            assert processes[run].poll() is None, f"{run.name} finished before its signal"
            if logged_step(run) >= at_step:
                processes[run].send_signal(sig)
                del pending[run]
        time.sleep(0.01)
    assert not pending, "timed out waiting for the runs to reach their signal steps"
    codes = {run: process.wait(timeout=120) for run, process in processes.items()}
    assert codes[interrupted] == 130, processes[interrupted].stderr.read().decode()[-2000:]
    assert codes[killed] == -signal.SIGKILL
    assert codes[reference] == 0, processes[reference].stderr.read().decode()[-2000:]
    assert 70 <= load_training_state(interrupted / "checkpoints" / "last")["loop"]["step"] < steps  # saved on SIGINT
    assert load_training_state(killed / "checkpoints" / "last")["loop"]["step"] == 40  # the last eval's checkpoint

    resumed = [subprocess.Popen(commands[run], env=subprocess_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE) for run in (interrupted, killed)]
    for process in resumed:
        assert process.wait(timeout=120) == 0, process.stderr.read().decode()[-2000:]
    for run_dir in (interrupted, killed):
        for which in ("last", "best"):
            assert tensor_bytes(run_dir / "checkpoints" / which) == tensor_bytes(reference / "checkpoints" / which)
        # the metrics log reads as one run: the same steps and losses, no duplicates from the redo
        strip = [{k: v for k, v in r.items() if k in ("step", "train_loss", "val_loss")} for r in read_metrics(run_dir)]
        assert strip == [{k: v for k, v in r.items() if k in ("step", "train_loss", "val_loss")}
                         for r in read_metrics(reference)]


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_143(prepared_small, tmp_path):
    run_dir = tmp_path / "run"
    command = train_command(prepared_small, run_dir, 100_000)
    code, output = start_and_interrupt(command, run_dir, lambda: logged_step(run_dir) >= 20, signal.SIGTERM)
    assert code == 143, output
    assert "SIGTERM: saved" in output and "sigterm after" in output
    state = load_training_state(run_dir / "checkpoints" / "last")
    assert state["loop"]["step"] >= 20
    assert load_weights(run_dir / "checkpoints" / "last")  # loadable


KILL_DURING_SAVE = """
import sys, torch
from tinystories.checkpoint import save_checkpoint
model = torch.nn.Linear(512, 512)
i = 0
while True:
    with torch.no_grad():
        model.weight.fill_(i)
        model.bias.fill_(i)
    save_checkpoint(sys.argv[1], model, {"i": i})
    i += 1
    if i == 3:
        print("saving", flush=True)
"""


@pytest.mark.slow
def test_kill_during_checkpoint_save_leaves_a_loadable_checkpoint(tmp_path):
    for attempt, delay in enumerate((0.05, 0.13, 0.31)):
        directory = tmp_path / f"attempt{attempt}" / "last"
        process = subprocess.Popen([sys.executable, "-c", KILL_DURING_SAVE, str(directory)], env=subprocess_env(),
                                   stdout=subprocess.PIPE)
        assert process.stdout.readline().strip() == b"saving"
        time.sleep(delay)
        process.kill()
        process.wait()
        weights = load_weights(directory)
        value = float(weights["weight"][0, 0])
        assert (weights["weight"] == value).all() and (weights["bias"] == value).all()
        assert load_training_state(directory)["i"] == int(value)  # weights and state from the same save


def test_threads_come_from_the_free_cores_and_a_resume_keeps_them(prepared_small, tmp_path, monkeypatch, capsys):
    """With another program on one of two cores a run trains on one thread, says so and saves the count;
    resumed on a quiet machine it keeps that count (and so repeats the straight run)."""
    from tinystories import devices

    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(devices, "usable_cores", lambda: 2)
    monkeypatch.setattr(train_setup, "usable_cores", lambda: 2)
    monkeypatch.setattr(devices, "cores_busy_elsewhere", lambda: 1.0)
    run_dir = tmp_path / "run"
    train(tiny_run(prepared_small, "max_steps=3"), run_dir, progress=False)
    assert "training on 1 of 2 CPU threads" in capsys.readouterr().err
    assert load_training_state(run_dir / "checkpoints" / "last")["loop"]["threads"] == 1

    monkeypatch.setattr(devices, "cores_busy_elsewhere", lambda: 0.0)
    train(tiny_run(prepared_small, "max_steps=5"), run_dir, progress=False, resume=True)
    assert torch.get_num_threads() == 1 and "CPU threads" not in capsys.readouterr().err
    assert load_training_state(run_dir / "checkpoints" / "last")["loop"]["threads"] == 1
