"""The training loop.

    train(run_config, out_dir, resume=True, init_from=None) -> summary dict

One call trains (or resumes) the run in `out_dir` (layout in checkpoint.py). `_train` reads top to
bottom: build the run (train_setup.py: model, optimizer, batches, log; resumed if there is a
checkpoint), then loop - stop? step, log, evaluate, checkpoint - and finish. The other pieces: the
optimizers and schedule in optim.py, the saved counters, RNGs and deterministic mode in
train_state.py, the metrics file, plot, trackers and deferred loss reads in runlog.py, signals in
signals.py, the data in batching.py.

Reproducible: on CPU the same seed, data and thread count give a bit-identical run, compiled or not
and however often it is interrupted (`TrainConfig.deterministic`; see `deterministic_algorithms`).
`checkpoints/last/state.pt` holds the loop state, the optimizer and the batch sampler's position.

Signals: SIGINT and SIGTERM finish the current step, write `checkpoints/last` and return with
`summary['stop_reason']` 'sigint' / 'sigterm' (the CLI exits 130 / 143).

Data parallel: under torchrun each process trains batch_size x grad_accum sequences of every step's
global batch (distributed.py, batching.rank_micro_batches); rank 0 alone logs, evaluates and writes
checkpoints, and all ranks agree on when to stop.

The hot loop never waits for the device: a step's loss and gradient norm stay device tensors until
the next log step, evaluation or checkpoint (`PendingLosses`), where they are read at once and checked
for NaN/inf. A divergence stops training without saving, so checkpoints/last is the last good state.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from tinystories import batching, distributed
from tinystories.checkpoint import checkpoint_dir, copy_checkpoint, save_checkpoint
from tinystories.config import RunConfig
from tinystories.devices import autocast, parse_device, to_device
from tinystories.model import eval_mode
from tinystories.optim import lr_multiplier
from tinystories.runlog import Trackers, format_count
from tinystories.signals import StopSignals
from tinystories.train_setup import TrainingError, Run, build_run, check_data, check_resumable  # noqa: F401 (TrainingError: API)
from tinystories.train_state import STATE_VERSION, capture_rng_state, deterministic_algorithms


# --------------------------------------------------------------------------------------------------
# One step's gradients


def step_gradients(runnable: nn.Module, model: nn.Module, x: np.ndarray, y: np.ndarray, grad_accum: int,
                   grad_clip: float, device: torch.device, dtype: torch.dtype | None, rank: int = 0,
                   world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Forward and backward this rank's share of one step's global batch x, y (N, L), then clip.

    The global batch is cut into grad_accum * world_size micro-batches; this rank runs micro-batches
    rank, rank + W, ... Each micro-batch's mean loss is weighted by its share of the step's real
    (non-padding) targets, so the gradient is that of the mean loss over every real target of the
    step however it is split. Under DDP (`runnable` has `no_sync`) gradients are all-reduced once, in
    the last micro-batch's backward, and averaged over ranks: each rank scales its backward by W.

    Returns (this rank's part of the step's loss, gradient norm before clipping) as 0-d device
    tensors, and the step's real target count over all ranks.
    """
    real_tokens = int((y != batching.IGNORE_INDEX).sum())
    micro_batches = batching.rank_micro_batches(x, y, grad_accum, rank, world_size)
    no_sync = getattr(runnable, "no_sync", None) if world_size > 1 else None
    loss_sum = torch.zeros((), device=device)
    for index, (xs, ys) in enumerate(micro_batches):
        share = int((ys != batching.IGNORE_INDEX).sum()) / real_tokens
        xs, ys = to_device(xs, device), to_device(ys, device)
        accumulate_only = no_sync is not None and index < len(micro_batches) - 1
        with no_sync() if accumulate_only else contextlib.nullcontext():
            with autocast(device, dtype):
                _, loss = runnable(xs, ys)
            weighted = loss.float() * share
            (weighted * world_size if world_size > 1 else weighted).backward()
        loss_sum += weighted.detach()
    parameters = [p for p in model.parameters() if p.grad is not None]
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    return loss_sum, norm, real_tokens


def accumulate_gradients(runnable: nn.Module, model: nn.Module, x: np.ndarray, y: np.ndarray, grad_accum: int,
                         grad_clip: float, device: torch.device, dtype: torch.dtype | None) -> tuple[float, float, int]:
    """`step_gradients` in one process, its loss and norm read as Python numbers (a host sync)."""
    loss, norm, real_tokens = step_gradients(runnable, model, x, y, grad_accum, grad_clip, device, dtype)
    return float(loss), float(norm), real_tokens


# --------------------------------------------------------------------------------------------------
# Evaluation during training


@torch.no_grad()
def fixed_windows_loss(model: nn.Module, tokens: np.ndarray, starts: np.ndarray, context_length: int, batch_size: int,
                       device: torch.device, dtype: torch.dtype | None) -> float:
    """Mean next-token loss (nats) over the windows at `starts` (the same windows every evaluation)."""
    total, count = 0.0, 0
    with eval_mode(model):
        for offset in range(0, len(starts), batch_size):
            x, y = batching.windows_at(tokens, starts[offset: offset + batch_size], context_length)
            x, y = to_device(x, device), to_device(y, device)
            with autocast(device, dtype):
                _, loss = model(x, y)
            total += float(loss) * y.numel()
            count += y.numel()
    return total / count


def sample_story(model: nn.Module, tokenizer: Any, num_tokens: int, seed: int, temperature: float = 0.7,
                 top_k: int = 20) -> str:
    """A short story from EOT with low-temperature top-k sampling, through the real sampler
    (tinystories.generate). It samples with its own generator, so the training RNG is untouched."""
    from tinystories.generate import LanguageModel

    with eval_mode(model):
        length = min(num_tokens, model.config.context_length - 1)
        return LanguageModel(model, tokenizer).generate("", max_new_tokens=length, temperature=temperature,
                                                        top_k=top_k, seed=seed)[0].text


# --------------------------------------------------------------------------------------------------
# The pieces of the loop


def stop_reason(run: Run, signals: StopSignals) -> str | None:
    """Why to stop before the next step, if at all. One agreement per step: every rank takes the same
    decision from the same clock and signals (a CPU collective, no device sync)."""
    run.now, code = run.ddp.agree_max([run.elapsed(), signals.code])
    if code:
        return StopSignals.name_of(code)
    if run.loop.step >= run.config.max_steps:
        return "max_steps"
    if run.config.max_minutes is not None and run.now >= 60.0 * run.config.max_minutes:
        return "max_minutes"
    return None


def train_step(run: Run) -> None:
    """One optimizer update on the next global batch; its loss is read later (PendingLosses)."""
    started, config = time.perf_counter(), run.config
    multiplier = lr_multiplier(run.loop.step, config, run.now)
    run.optimizer.set_lr_multiplier(multiplier)
    run.lr = config.lr * multiplier
    x, y = run.batches.next_batch()  # (batch_size * grad_accum * world, L)
    loss, norm, real_tokens = step_gradients(run.trainable, run.model, x, y, config.grad_accum, config.grad_clip,
                                             run.ddp.device, run.dtype, run.ddp.rank, run.ddp.world_size)
    run.optimizer.step()
    run.optimizer.zero_grad()
    if run.ema is not None:
        run.ema.update(run.loop.step)
    run.loop.step += 1
    run.loop.tokens += real_tokens
    run.pending.add(run.loop.step, run.lr, loss, norm)
    run.loop.interval_steps += 1
    run.interval_tokens += real_tokens
    run.interval_seconds += time.perf_counter() - started


def read_losses(run: Run) -> None:
    started = time.perf_counter()
    for loss, norm in run.pending.read(run.ddp):
        run.loop.interval_loss += loss
        run.last_loss, run.grad_norm = loss, norm
    run.interval_seconds += time.perf_counter() - started  # the device's share of the interval's steps


def log_interval(run: Run) -> None:
    """Every log_every steps: the interval's mean train loss, tokens/s, MFU, to metrics.jsonl and the bar."""
    read_losses(run)
    loop, world = run.loop, run.ddp.world_size
    run.tokens_per_second = run.interval_tokens / max(run.interval_seconds, 1e-9)
    record = {"step": loop.step, "tokens": loop.tokens, "train_loss": loop.interval_loss / max(loop.interval_steps, 1),
              "lr": run.lr, "tokens_per_second": run.tokens_per_second, "grad_norm": run.grad_norm,
              "elapsed_seconds": run.elapsed()}
    if run.peak:
        record["mfu"] = run.run_config.model.flops_per_token(run.run_config.model.context_length) * \
            run.tokens_per_second / (run.peak * world)
    run.log.record(record)
    postfix = {"loss": f"{record['train_loss']:.3f}", "lr": f"{run.lr:.2e}", "tok/s": format_count(run.tokens_per_second)}
    if "mfu" in record:
        postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
    if run.config.max_minutes:
        postfix["left"] = f"{max(0.0, run.config.max_minutes - run.elapsed() / 60):.1f}min"
    run.log.progress(0, **postfix)
    loop.interval_loss, loop.interval_steps, run.interval_tokens, run.interval_seconds = 0.0, 0, 0, 0.0


def validation_losses(run: Run) -> dict[str, float]:
    """val_loss of what the run ships (the weight average when there is one), and of the raw weights."""
    arguments = (run.shards.val, run.eval_starts, run.run_config.model.context_length, run.config.batch_size,
                 run.ddp.device, run.dtype)
    raw = fixed_windows_loss(run.runnable, *arguments)
    if run.ema is None:
        return {"val_loss": raw}
    with run.ema.applied():
        return {"val_loss": fixed_windows_loss(run.runnable, *arguments), "val_loss_raw": raw}


def evaluate_and_save(run: Run) -> bool:
    """Evaluate (rank 0; the others wait), log, write checkpoints. Returns whether patience says stop."""
    read_losses(run)
    run.evaluated_at = loop_step = run.loop.step
    losses = validation_losses(run) if run.ddp.is_main else {"val_loss": 0.0}
    val_loss = run.ddp.broadcast([losses["val_loss"]])[0]  # every rank keeps the same best / patience bookkeeping
    val_bpb = val_loss / run.shards.val_bytes_per_token / math.log(2)
    improved = run.loop.record_eval(val_loss)
    run.log.record({"step": loop_step, "tokens": run.loop.tokens, **losses, "val_loss": val_loss, "val_bpb": val_bpb,
                    "lr": run.lr, "tokens_per_second": run.tokens_per_second, "grad_norm": run.grad_norm,
                    "elapsed_seconds": run.elapsed()}, plot=True)
    save_last(run)
    if run.ddp.is_main and improved:
        copy_checkpoint(run.last_dir, checkpoint_dir(run.out_dir, "best"))
    run.log.say(f"step {loop_step}: val loss {val_loss:.4f}, {val_bpb:.4f} bits/byte{' (best)' if improved else ''}")
    if run.config.sample_tokens > 0 and run.ddp.is_main:
        with run.ema.applied() if run.ema is not None else contextlib.nullcontext():
            story = sample_story(run.model, run.shards.tokenizer, run.config.sample_tokens, seed=run.config.seed + loop_step)
        run.log.say(f"sample: {story.strip()}")
    return run.config.patience is not None and run.loop.evals_since_best >= run.config.patience


def save_last(run: Run) -> None:
    """Write checkpoints/last. Every rank calls this: it gathers each rank's RNG state, and the others
    wait at a barrier until rank 0 has written the checkpoint whole."""
    read_losses(run)  # never save a state whose losses were not checked
    run.loop.capture_rng(run.ddp.gather(capture_rng_state()))
    if run.ddp.is_main:
        run.loop.elapsed_seconds, run.started = run.elapsed(), time.perf_counter()
        run.loop.metrics_offset = run.log.offset()
        state = {"version": STATE_VERSION, "loop": run.loop.to_dict(), "optimizer": run.optimizer.state_dict(),
                 "batches": run.batches.state_dict()}
        save_checkpoint(run.last_dir, run.model, state, metadata={"step": str(run.loop.step)},
                        ema_weights=run.ema.weights() if run.ema is not None else None)
    run.ddp.barrier()


def summary(run: Run, stop: str) -> dict[str, Any]:
    best = run.loop.best_val_loss if math.isfinite(run.loop.best_val_loss) else None
    return {"best_val_loss": best, "best_val_bpb": best / run.shards.val_bytes_per_token / math.log(2) if best else None,
            "best_step": run.loop.best_step, "steps": run.loop.step, "tokens": run.loop.tokens, "seconds": run.elapsed(),
            "stop_reason": stop, "out_dir": str(run.out_dir), "world_size": run.ddp.world_size, "rank": run.ddp.rank}


# --------------------------------------------------------------------------------------------------
# train()


def train(run_config: RunConfig, out_dir: str | os.PathLike, resume: bool = True,
          init_from: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the run in `out_dir`. Returns a summary: best_val_loss, best_val_bpb, steps,
    tokens, seconds, stop_reason ('max_steps' | 'max_minutes' | 'patience' | 'sigint' | 'sigterm'),
    world_size, rank (this process: 0 unless under torchrun).

    Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set) every process calls this with the same config
    and trains its share of each global batch with DistributedDataParallel (see distributed.py); every
    rank returns the same summary (but for `rank`).
    """
    out_dir = Path(out_dir)
    # every rank checks before any rank writes: ranks meet in setup() below, before rank 0 writes anything
    resuming = check_resumable(out_dir, run_config, resume)
    Trackers.check_available(run_config.train)
    shards = check_data(run_config, out_dir, init_from)
    ddp = distributed.setup(parse_device(run_config.train.device))
    try:
        ddp.barrier()  # every rank has read the run directory before rank 0 writes to it
        result = _train(run_config, out_dir, resuming, init_from, progress, shards, ddp)
        ddp.barrier()  # ranks return together: torchrun stops the job when the first one exits with a failure
        return result
    finally:
        ddp.close()


def _train(run_config: RunConfig, out_dir: Path, resuming: bool, init_from, progress: bool, shards: batching.Shards,
           ddp: distributed.Distributed) -> dict[str, Any]:
    run = build_run(run_config, out_dir, resuming, init_from, progress, shards, ddp)
    config = run.config
    try:
        with deterministic_algorithms(config.deterministic, ddp.device), \
                StopSignals(repeat_interrupts=not ddp.enabled) as signals:
            while True:
                stop = stop_reason(run, signals)
                if stop in ("sigint", "sigterm"):
                    save_last(run)
                    run.log.say(f"{stop.upper()}: saved {run.last_dir} at step {run.loop.step}; "
                                "run the same command again to resume")
                if stop == "max_minutes" and run.evaluated_at != run.loop.step:
                    evaluate_and_save(run)
                if stop is not None:
                    break
                train_step(run)
                if run.loop.step % config.log_every == 0 or run.loop.step == config.max_steps:
                    log_interval(run)
                run.log.progress(1)
                if run.loop.step % config.eval_every == 0 or run.loop.step >= config.max_steps:
                    if evaluate_and_save(run):
                        stop = "patience"
                        run.log.say(f"stopping early: no improvement in {config.patience} evaluations")
                        break
    finally:
        run.log.close()
    return summary(run, stop)
