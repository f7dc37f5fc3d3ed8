"""Building a training run: everything the loop reads and changes, fresh or resumed from checkpoints/last.

    check_resumable(out_dir, run_config, resume) -> whether out_dir holds a run to continue
    check_data(run_config, out_dir, init_from)   -> the shards, checked against the run's tokenizer
    build_run(...)                               -> Run: model, optimizer, batches, log, loop state

Resuming restores the weights, the optimizer, the batch position, the weight average, the loop
counters and, last of all, every RNG, so the resumed run draws exactly what the interrupted one would have.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from tinystories import batching, distributed
from tinystories.batching import Shards, check_same_tokenizer, open_shards
from tinystories.checkpoint import (EMA_FILE, CheckpointError, check_same_save, checkpoint_dir, load_run_config,
                                    load_training_state, load_weights, load_weights_into, resolve_checkpoint)
from tinystories.config import ModelConfig, RunConfig, TrainConfig
from tinystories.devices import (autocast_dtype, free_cores, peak_flops, pinned_threads, start_mkl_on_this_thread,
                                 usable_cores, use_free_cores)
from tinystories.errors import UserError
from tinystories.optim import Optimizers, WeightEMA, build_optimizer
from tinystories.runlog import PendingLosses, RunLog
from tinystories.train_state import STATE_VERSION, LoopState, seed_everything, seed_rank


class TrainingError(UserError):
    """Training cannot start or cannot go on (diverged loss, mismatched data)."""


def create_model(config: ModelConfig) -> nn.Module:
    """Build the model (a seam: tests wrap it to inject faults)."""
    from tinystories.model import GPT

    return GPT(config)


@dataclasses.dataclass
class Run:
    run_config: RunConfig
    out_dir: Path
    shards: Shards
    ddp: distributed.Distributed
    dtype: torch.dtype | None
    model: nn.Module  # owns the parameters
    runnable: nn.Module  # the model or its compiled wrapper (evaluation runs this)
    trainable: nn.Module  # `runnable` under DDP (training runs this)
    optimizer: Optimizers
    batches: Any
    ema: WeightEMA | None
    loop: LoopState
    log: RunLog
    pending: PendingLosses
    eval_starts: np.ndarray
    peak: float | None
    started: float = dataclasses.field(default_factory=time.perf_counter)
    now: float = 0.0  # training time, as every rank agreed at the top of this step
    lr: float = math.nan
    last_loss: float = math.nan
    grad_norm: float = math.nan
    tokens_per_second: float = 0.0
    interval_tokens: int = 0
    interval_seconds: float = 0.0
    evaluated_at: int = -1

    @property
    def config(self) -> TrainConfig:
        return self.run_config.train

    @property
    def last_dir(self) -> Path:
        return checkpoint_dir(self.out_dir, "last")

    def elapsed(self) -> float:
        return self.loop.elapsed_seconds + time.perf_counter() - self.started


def starting_point(run_config: RunConfig, out_dir: Path, resuming: bool, init_from, ddp) -> tuple[nn.Module, dict | None]:
    """The model with its first weights (fresh, resumed or another run's), and the saved training state."""
    seed_everything(run_config.train.seed)
    model = create_model(run_config.model)  # the same initial weights on every rank
    if ddp.rank > 0:
        seed_rank(run_config.train.seed, ddp.rank)  # rank 0 keeps the single-process random stream
    if resuming:
        last = checkpoint_dir(out_dir, "last")
        state = load_training_state(last)
        if state is None or state.get("version") not in (1, STATE_VERSION):
            raise CheckpointError(f"{last}: no usable training state (state.pt) to resume from")
        check_same_save(last, state)
        load_weights_into(model, load_weights(last), source=str(last))
        return model, state
    source = init_from if init_from is not None else run_config.init_from
    if source is not None:
        directory, _ = resolve_checkpoint(source, "best")
        load_weights_into(model, load_weights(directory), source=str(directory))
    return model, None


def build_run(run_config: RunConfig, out_dir: Path, resuming: bool, init_from, progress: bool, shards: Shards,
              ddp: distributed.Distributed) -> Run:
    """Model, optimizer, batches, weight average, loop state and log, resumed from checkpoints/last if asked."""
    config, device = run_config.train, ddp.device
    start_mkl_on_this_thread()  # before any parallel region makes MKL's first call (bit-for-bit repeats)
    # Looked at first: torch.compile's compile workers would count as another program's load. A resume
    # keeps its saved count instead (a checkpoint from before the count was saved looks later).
    free = free_cores() if device.type == "cpu" and pinned_threads() is None and not resuming else None
    model, state = starting_point(run_config, out_dir, resuming, init_from, ddp)
    if init_from is not None:
        run_config = dataclasses.replace(run_config, init_from=str(init_from))
    model.to(device).train()
    T, global_batch = run_config.model.context_length, config.batch_size * config.grad_accum * ddp.world_size
    runnable = torch.compile(model) if config.compile else model
    run = Run(run_config, out_dir, shards, ddp, autocast_dtype(config.dtype, device), model, runnable, ddp.wrap(runnable),
              build_optimizer(model, config, device),
              batching.make_batches(config.batching, shards.train, T, global_batch, config.seed, shards.tokenizer.eot_id),
              WeightEMA(model, config.ema_decay) if config.ema_decay else None,
              LoopState(global_batch=global_batch, world_size=ddp.world_size), RunLog.silent(),
              PendingLosses(checkpoint_dir(out_dir, "last")),
              batching.eval_window_starts(len(shards.val), T, config.eval_tokens),
              peak_flops(device) if ddp.is_main else None)
    if state is not None:
        resume(run, state)
    choose_threads(run, free)  # before the first step: compiled kernels keep the count they were built for
    if ddp.is_main:
        run.log = open_run_directory(run, progress)
    if state is not None:
        run.loop.restore_rng(ddp.rank, config.seed)  # last: everything above may have drawn random numbers
    run.evaluated_at = run.loop.step  # no final evaluation unless this session trains a step
    return run


def choose_threads(run: Run, free: int | None) -> None:
    """CPU threads: OMP_NUM_THREADS, else a resumed run's own count, else the `free` cores (said when fewer)."""
    saved = run.loop.threads
    run.loop.threads = use_free_cores(run.ddp.device, saved, free)
    chosen = saved is None and pinned_threads() is None and run.loop.threads is not None
    if run.ddp.is_main and chosen and run.loop.threads < usable_cores():
        print(f"tinystories: training on {run.loop.threads} of {usable_cores()} CPU threads: other programs are "
              "keeping the other cores busy, and a thread sharing a core would slow every step (OMP_NUM_THREADS "
              "chooses; a resumed run keeps its count)", file=sys.stderr, flush=True)


def resume(run: Run, state: dict[str, Any]) -> None:
    """Put the optimizer, batch position, weight average and loop counters back as checkpoints/last saved them."""
    last = run.last_dir
    run.optimizer.load_state_dict(state["optimizer"])
    try:
        run.batches.load_state_dict(state["batches"])
    except batching.BatchError as error:
        raise CheckpointError(f"{last}: {error}") from None
    if run.ema is not None and (last / EMA_FILE).is_file():
        run.ema.load_weights(load_weights(last, EMA_FILE))
    global_batch = run.loop.global_batch
    run.loop = LoopState.from_dict(state["loop"]) if "loop" in state else LoopState.from_version_1(state)
    if run.ddp.is_main and run.loop.global_batch not in (None, global_batch):
        print(f"tinystories: note: the global batch is now {global_batch} sequences; the checkpoint was trained "
              f"with {run.loop.global_batch}: set --batch-size / --grad-accum so that batch_size x grad_accum x "
              "processes is that to continue with the same data", file=sys.stderr, flush=True)
    run.loop.global_batch, run.loop.world_size = global_batch, run.ddp.world_size


def open_run_directory(run: Run, progress: bool) -> RunLog:
    """Rank 0 writes the run directory: config.json, the tokenizer, and the log (truncated on resume)."""
    run.out_dir.mkdir(parents=True, exist_ok=True)
    run.run_config.save(run.out_dir / "config.json")
    if not (run.out_dir / "tokenizer_meta.json").exists():
        run.shards.tokenizer.save(run.out_dir)  # the run carries its tokenizer: generation needs no data dir
    if run.ddp.enabled:
        c = run.config
        print(f"tinystories: data parallel on {run.ddp.world_size} processes ({run.ddp.backend}, "
              f"{run.ddp.device.type}): global batch {c.batch_size} x {c.grad_accum} x {run.ddp.world_size} = "
              f"{run.loop.global_batch} sequences per step", file=sys.stderr, flush=True)
    return RunLog(run.out_dir, run.run_config, run.loop.metrics_offset, progress, run.loop.step)


def check_resumable(out_dir: Path, run_config: RunConfig, resume: bool) -> bool:
    """Whether out_dir holds a run to resume; errors for a run whose model config differs."""
    config_path = out_dir / "config.json"
    if not config_path.is_file():
        return False
    if not resume:
        raise TrainingError(f"{out_dir} already holds a run; resume it or choose another --out")
    saved = load_run_config(out_dir)
    if saved.model != run_config.model:
        changed = [f"{k}: {v} -> {getattr(run_config.model, k)}" for k, v in saved.model.to_dict().items()
                   if getattr(run_config.model, k) != v]
        raise CheckpointError(f"{config_path}: the saved run has a different model config ({'; '.join(changed)}); "
                              "resume it unchanged or choose another --out")
    return (checkpoint_dir(out_dir, "last") / "model.safetensors").exists()


def check_data(run_config: RunConfig, out_dir: Path, init_from) -> Shards:
    shards = open_shards(run_config.data)
    if int(shards.meta["vocab_size"]) > run_config.model.vocab_size:
        raise TrainingError(f"{shards.directory}: the data's tokenizer has {shards.meta['vocab_size']} tokens but the "
                            f"model only {run_config.model.vocab_size} (set model.vocab_size to fit)")
    check_same_tokenizer(out_dir, shards)
    source = init_from if init_from is not None else run_config.init_from
    if source is not None:
        check_same_tokenizer(resolve_checkpoint(source, "best")[1], shards)
    return shards
