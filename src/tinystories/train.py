"""The training loop: optimizer, schedule, evaluation cadence, logging, checkpoints and resuming.

    train(run_config, out_dir, resume=True, init_from=None) -> summary dict

One call trains (or resumes) the run in `out_dir` (layout in checkpoint.py). The run is reproducible
bit for bit on CPU across interruptions: `checkpoints/last/state.pt` stores the optimizer, the step
(which fixes the learning rate), the batch sampler's position, and every RNG (torch CPU and CUDA,
numpy, python), all as tensors or plain ints so it loads with `torch.load(weights_only=True)`.

Signals: SIGINT and SIGTERM finish the current optimizer step, write `checkpoints/last` and return
with `summary['stop_reason']` 'sigint' / 'sigterm' (the CLI exits 130 / 143). A second signal while
that happens raises KeyboardInterrupt (checkpoint writes are atomic, the previous one stays whole).

Data parallel: under torchrun each process trains batch_size x grad_accum sequences of every step's
global batch of batch_size x grad_accum x world_size sequences (distributed.py, batching.rank_micro_batches);
rank 0 alone logs, evaluates and writes checkpoints, and all ranks agree on when to stop.

The hot loop never waits for the device: a step's loss and gradient norm stay device tensors until the
next log step (or evaluation, or checkpoint), where they are read at once and checked for NaN/inf. A
divergence found there stops training without saving, so checkpoints/last is the last good state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn

from tinystories import batching, distributed
from tinystories.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    copy_checkpoint,
    load_run_config,
    load_training_state,
    load_weights,
    load_weights_into,
    resolve_checkpoint,
    save_checkpoint,
)
from tinystories.config import ModelConfig, RunConfig, TrainConfig
from tinystories.devices import parse_device
from tinystories.errors import UserError
from tinystories.files import atomic_path

STATE_VERSION = 1

# bf16 dense peak FLOP/s of known GPUs (no sparsity), matched against torch.cuda.get_device_name().
GPU_BF16_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12,
    "A100": 312e12, "A800": 312e12, "A6000": 155e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12,
}


class TrainingError(UserError):
    """Training cannot start or cannot go on (diverged loss, mismatched data, missing tracker)."""


# --------------------------------------------------------------------------------------------------
# Devices and precision


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32: 'auto' means bf16 on CUDA, fp32 elsewhere."""
    if config.dtype == "bfloat16" or (config.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s for MFU: the bf16 peak of a known GPU, a measured fp32 matmul rate on CPU, else None."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_BF16_PEAK_FLOPS.items():
            if key in name:
                return value
        return None
    if device.type == "cpu":
        return measure_cpu_matmul_flops()
    return None


def measure_cpu_matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a square fp32 matmul on this CPU (a practical peak for MFU).

    Large enough to be compute-bound (small matmuls measure overheads, not the peak) and the best of
    several single timings, so a moment of contention from other processes doesn't lower the peak.
    """
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: thread pool start, first-call allocations
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        fastest = min(fastest, time.perf_counter() - start)
    return 2.0 * size ** 3 / fastest


# --------------------------------------------------------------------------------------------------
# Learning-rate schedule


def schedule_progress(step: int, config: TrainConfig, elapsed_seconds: float = 0.0) -> float:
    """Fraction of training done: max(step / max_steps, elapsed / max_minutes), so time limits anneal too."""
    progress = step / config.max_steps
    if config.max_minutes:
        progress = max(progress, elapsed_seconds / (60.0 * config.max_minutes))
    return min(progress, 1.0)


def lr_multiplier(step: int, config: TrainConfig, elapsed_seconds: float = 0.0) -> float:
    """The factor applied to each group's peak lr for optimizer update `step` (0-based).

    Linear warmup over the first `warmup_steps` updates: (step + 1) / warmup_steps. Then, with
    p = schedule_progress and w = warmup_steps / max_steps:
      cosine:   min + (1 - min) * (1 + cos(pi * (p - w) / (1 - w))) / 2
      wsd:      1 until p reaches 1 - decay_fraction, then linear to min at p = 1
      constant: 1
    where min = min_lr_ratio.
    """
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = schedule_progress(step, config, elapsed_seconds)
    floor = config.min_lr_ratio
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "cosine":
        warmup = min(config.warmup_steps / config.max_steps, 1.0)
        t = 1.0 if warmup >= 1.0 else min(max((progress - warmup) / (1.0 - warmup), 0.0), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    # wsd: warmup, a long stable phase, then a linear decay over the last decay_fraction of training
    decay_start = 1.0 - config.decay_fraction
    if config.decay_fraction <= 0 or progress < decay_start:
        return 1.0
    t = min((progress - decay_start) / config.decay_fraction, 1.0)
    return 1.0 - (1.0 - floor) * t


def learning_rate(step: int, config: TrainConfig, elapsed_seconds: float = 0.0) -> float:
    """The AdamW learning rate of update `step` (Muon's is muon_lr times the same multiplier)."""
    return config.lr * lr_multiplier(step, config, elapsed_seconds)


# --------------------------------------------------------------------------------------------------
# Optimizers


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Split trainable parameters into 'decay' (weight matrices), 'no_decay' (embeddings, norms, biases)
    and, for Muon, 'hidden' (the 2-D matrices inside transformer blocks, a subset of 'decay').

    Embedding tables are not decayed (a tied output head shares the token embedding and follows it).
    """
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"decay": [], "no_decay": [], "hidden": []}
    for name, parameter in model.named_parameters():  # shared (tied) tensors are listed once
        if not parameter.requires_grad:
            continue
        is_matrix = parameter.dim() >= 2 and id(parameter) not in embedding_ids
        groups["decay" if is_matrix else "no_decay"].append((name, parameter))
        if is_matrix and parameter.dim() == 2 and name.startswith("blocks."):
            groups["hidden"].append((name, parameter))
    return groups


class Optimizers:
    """One or two torch optimizers (Muon + AdamW) driven as one: step, zero_grad, lr, state."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def set_lr_multiplier(self, multiplier: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["peak_lr"] * multiplier

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"kinds": [type(o).__name__ for o in self.optimizers],
                "states": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kinds = [type(o).__name__ for o in self.optimizers]
        if list(state.get("kinds", [])) != kinds:
            raise CheckpointError(f"the checkpoint's optimizer state is for {state.get('kinds')}, "
                                  f"this run builds {kinds} (was --optimizer changed?)")
        try:
            for optimizer, values in zip(self.optimizers, state["states"]):
                optimizer.load_state_dict(values)
        except (ValueError, KeyError, RuntimeError) as error:
            raise CheckpointError(f"the checkpoint's optimizer state does not fit this model ({error})") from None


def _adamw(groups: list[dict[str, Any]], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    betas = (config.beta1, config.beta2)
    if device.type in ("cuda", "cpu", "mps"):
        try:  # fused: one kernel for all parameters instead of a loop of small ones
            return torch.optim.AdamW(groups, lr=config.lr, betas=betas, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(groups, lr=config.lr, betas=betas)


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> Optimizers:
    """AdamW (weight decay on matrices only), Muon + AdamW, or bitsandbytes' 8-bit AdamW."""
    groups = parameter_groups(model)

    def group(params, weight_decay: float, peak_lr: float) -> dict[str, Any]:
        return {"params": [p for _, p in params], "weight_decay": weight_decay, "lr": peak_lr, "peak_lr": peak_lr}

    if config.optimizer == "muon":
        hidden_ids = {id(p) for _, p in groups["hidden"]}
        other_matrices = [(n, p) for n, p in groups["decay"] if id(p) not in hidden_ids]
        # torch's Muon decays by lr * weight_decay per step, as AdamW does; scale weight_decay so the
        # hidden matrices shrink at the same per-step rate as they would under AdamW.
        muon_decay = config.weight_decay * config.lr / config.muon_lr
        muon = torch.optim.Muon([group(groups["hidden"], muon_decay, config.muon_lr)], lr=config.muon_lr,
                                weight_decay=muon_decay)
        adamw_groups = [group(other_matrices, config.weight_decay, config.lr),
                        group(groups["no_decay"], 0.0, config.lr)]
        return Optimizers([muon, _adamw([g for g in adamw_groups if g["params"]], config, device)])

    adamw_groups = [group(groups["decay"], config.weight_decay, config.lr), group(groups["no_decay"], 0.0, config.lr)]
    adamw_groups = [g for g in adamw_groups if g["params"]]
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            warnings.warn("optimizer 'adamw8bit' needs bitsandbytes (pip install bitsandbytes); using AdamW instead",
                          stacklevel=2)
        else:
            return Optimizers([bitsandbytes.optim.AdamW8bit(adamw_groups, lr=config.lr,
                                                            betas=(config.beta1, config.beta2))])
    return Optimizers([_adamw(adamw_groups, config, device)])


# --------------------------------------------------------------------------------------------------
# RNG state as tensors and plain values (weights_only-loadable)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def capture_rng_state() -> dict[str, Any]:
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": [int(k) for k in keys], "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], np.asarray(numpy_state["keys"], dtype=np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# Data


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
        val = split_stats(self.meta, "val")
        return float(val["bytes"]) / float(val["tokens"])


def split_stats(meta: dict[str, Any], split: str) -> dict[str, Any]:
    """A split's {tokens, stories, bytes} from meta.json (under 'splits', or at the top level)."""
    return meta.get("splits", meta)[split]


def open_shards(directory: str | os.PathLike | None) -> Shards:
    from tinystories import data
    from tinystories.tokenizer import load_tokenizer

    if directory is None:
        raise TrainingError("no data directory: pass --data DIR (a directory made by `tinystories data prepare`)")
    directory = Path(directory)
    if not directory.is_dir():
        raise TrainingError(f"--data {directory}: no such directory (prepare one with `tinystories data prepare`)")
    meta = data.load_meta(directory)
    return Shards(directory, meta, data.load_tokens(directory, "train"), data.load_tokens(directory, "val"),
                  load_tokenizer(directory))


def adapt_to_data(run_config: RunConfig, data_dir: str | os.PathLike) -> tuple[RunConfig, list[str]]:
    """Fit a new run's config to its shards: the shards' tokenizer decides vocab_size and tokenizer.

    Returns the adapted config and notes saying what changed.
    """
    from tinystories import data

    directory = Path(data_dir)
    if not directory.is_dir():
        raise TrainingError(f"--data {directory}: no such directory (prepare one with `tinystories data prepare`)")
    meta = data.load_meta(directory)
    notes = []
    model = run_config.model
    vocab_size = int(meta["vocab_size"])
    if vocab_size != model.vocab_size:
        notes.append(f"vocab_size set to {vocab_size} from the data's tokenizer (the preset says {model.vocab_size})")
        model = dataclasses.replace(model, vocab_size=vocab_size)
    tokenizer_spec = _data_tokenizer_spec(directory, run_config.tokenizer)
    if tokenizer_spec != run_config.tokenizer:
        notes.append(f"tokenizer is {tokenizer_spec} as in the data (the preset says {run_config.tokenizer})")
    adapted = dataclasses.replace(run_config, model=model, tokenizer=tokenizer_spec, data=str(directory.resolve()))
    return adapted, notes


def _data_tokenizer_spec(directory: Path, default: str) -> str:
    """The spec of the tokenizer that made the shards ('bpe:4096', 'gpt2', 'bytes')."""
    from tinystories.tokenizer import load_tokenizer

    spec = getattr(load_tokenizer(directory), "spec", None)
    return spec if isinstance(spec, str) and spec else default


# --------------------------------------------------------------------------------------------------
# Evaluation and sampling


@torch.no_grad()
def fixed_windows_loss(model: nn.Module, tokens: np.ndarray, starts: np.ndarray, context_length: int, batch_size: int,
                       device: torch.device, dtype: torch.dtype | None) -> float:
    """Mean next-token loss (nats) over the windows at `starts` (the same windows every evaluation)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for offset in range(0, len(starts), batch_size):
        x, y = batching.windows_at(tokens, starts[offset: offset + batch_size], context_length)
        x, y = _to_device(x, device), _to_device(y, device)
        with _autocast(device, dtype):
            _, loss = model(x, y)
        total += float(loss) * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count


def sample_story(model: nn.Module, tokenizer: Any, num_tokens: int, seed: int, temperature: float = 0.7,
                 top_k: int = 20) -> str:
    """A short story from EOT with low-temperature top-k sampling, through the real sampler
    (tinystories.generate). It samples with its own generator, so the training RNG is untouched."""
    from tinystories.generate import LanguageModel

    was_training = model.training
    model.eval()
    try:
        length = min(num_tokens, model.config.context_length - 1)
        completion = LanguageModel(model, tokenizer).generate(
            "", max_new_tokens=length, temperature=temperature, top_k=top_k, seed=seed)[0]
    finally:
        model.train(was_training)
    return completion.text


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Metrics, plot, trackers


class MetricsLog:
    """RUN/metrics.jsonl: one JSON object per log or eval step; truncated to the checkpoint on resume."""

    def __init__(self, path: Path, resume_offset: int | None):
        self.path = path
        if resume_offset is None:
            path.write_text("")
        else:
            with open(path, "a+b") as file:
                file.truncate(resume_offset)  # drop lines written after the checkpoint we resume from
        self.records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
        self.records.append(record)

    def offset(self) -> int:
        return self.path.stat().st_size


def plot_metrics(records: list[dict[str, Any]], path: Path) -> None:
    """Draw train/val loss and grad norm against step into `path` (PNG, written atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    norms = [(r["step"], r["grad_norm"]) for r in records if "train_loss" in r and r.get("grad_norm") is not None]
    figure = Figure(figsize=(9, 4.5))
    FigureCanvasAgg(figure)
    loss_axes, norm_axes = figure.subplots(1, 2)
    if train:
        loss_axes.plot(*zip(*train), label="train", linewidth=1)
    if val:
        loss_axes.plot(*zip(*val), label="val", marker="o", linewidth=1.5)
    loss_axes.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    loss_axes.legend()
    loss_axes.grid(alpha=0.3)
    if norms:
        norm_axes.plot(*zip(*norms), color="tab:green", linewidth=1)
        norm_axes.set_yscale("log")
    norm_axes.set(xlabel="step", ylabel="grad norm (before clipping)", title="gradient norm")
    norm_axes.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)


class Trackers:
    """Optional Weights & Biases / TensorBoard logging; asking for one that is not installed is a UserError."""

    def __init__(self, config: TrainConfig, run_config: RunConfig, out_dir: Path):
        self.wandb_run = None
        self.tensorboard = None
        self.check_available(config)
        if config.wandb:
            import wandb

            self.wandb_run = wandb.init(project=config.wandb, name=out_dir.name, dir=str(out_dir),
                                        config=run_config.to_dict(), resume="allow")
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    @staticmethod
    def check_available(config: TrainConfig) -> None:
        """Fail before anything is written if a requested tracker is not installed."""
        if config.wandb:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise TrainingError(f"--wandb {config.wandb}: wandb is not installed (pip install wandb)") from None
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise TrainingError("--tensorboard: tensorboard is not installed (pip install tensorboard)") from None

    def log(self, record: dict[str, Any]) -> None:
        values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=record["step"])
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


# --------------------------------------------------------------------------------------------------
# Signals


class StopSignals:
    """Turn SIGINT/SIGTERM into a flag the loop polls before each step (so it can checkpoint and exit).

    A second signal raises KeyboardInterrupt, unless `repeat_interrupts` is False. Under torchrun one
    stop can reach a worker twice (a scheduler such as Slurm signals every process of the job, and
    torchrun forwards the signal it got), and torchrun kills workers that outlive its grace period anyway.
    """

    NAMES = {signal.SIGINT: "sigint", signal.SIGTERM: "sigterm"}
    CODES = {None: 0, "sigint": 1, "sigterm": 2}  # for agreeing over ranks (the larger code wins)

    def __init__(self, repeat_interrupts: bool = True):
        self.received: str | None = None
        self.repeat_interrupts = repeat_interrupts
        self._previous: dict[int, Any] = {}

    @property
    def code(self) -> int:
        return self.CODES[self.received]

    @classmethod
    def name_of(cls, code: int) -> str | None:
        return {value: key for key, value in cls.CODES.items()}[int(code)]

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for number in self.NAMES:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame) -> None:
        if self.received is not None:
            if self.repeat_interrupts:
                raise KeyboardInterrupt  # a second signal: stop now (checkpoints are atomic)
            return
        self.received = self.NAMES[number]

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


# --------------------------------------------------------------------------------------------------
# The loop


def step_gradients(runnable: nn.Module, model: nn.Module, x: np.ndarray, y: np.ndarray, grad_accum: int,
                   grad_clip: float, device: torch.device, dtype: torch.dtype | None, rank: int = 0,
                   world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Forward and backward this rank's share of one optimizer step's global batch x, y (N, L), then clip.

    The global batch is cut into grad_accum * world_size micro-batches; this rank runs micro-batches
    rank, rank + W, ... (batching.rank_micro_batches). Each micro-batch's mean loss is weighted by its
    share of the step's real (non-padding) targets, so the gradient is that of the mean loss over every
    real target of the step, however it is split over micro-batches and ranks. Under
    DistributedDataParallel (`runnable` has `no_sync`) gradients are all-reduced once, in the last
    micro-batch's backward; DDP averages them over ranks, so each rank scales its backward by W to turn
    that average into the sum of the shares. `model` owns the parameters.

    Returns (this rank's part of the step's loss, gradient norm before clipping) as 0-d device tensors
    (reading them waits for the device, so the loop reads them only at log steps; summed over ranks the
    losses give the step's loss) and the step's real target count over all ranks.
    """
    real_tokens = int((y != batching.IGNORE_INDEX).sum())
    micro_batches = batching.rank_micro_batches(x, y, grad_accum, rank, world_size)
    no_sync = getattr(runnable, "no_sync", None) if world_size > 1 else None
    loss_sum = torch.zeros((), device=device)
    for index, (xs, ys) in enumerate(micro_batches):
        share = int((ys != batching.IGNORE_INDEX).sum()) / real_tokens
        xs, ys = _to_device(xs, device), _to_device(ys, device)
        accumulate_only = no_sync is not None and index < len(micro_batches) - 1
        with no_sync() if accumulate_only else contextlib.nullcontext():
            with _autocast(device, dtype):
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
    """Forward and backward one optimizer step's batch x, y (N, L) in `grad_accum` micro-batches, then clip.

    Each micro-batch's mean loss is weighted by its share of the step's real (non-padding) targets, so
    the gradient is that of the mean loss over every real target of the step, however it is split.
    `runnable` is the model or its compiled wrapper; `model` owns the parameters.
    Returns (loss, gradient norm before clipping, real target count) as Python numbers (a host sync:
    the training loop uses `step_gradients` and reads the values only at log steps).
    """
    loss, norm, real_tokens = step_gradients(runnable, model, x, y, grad_accum, grad_clip, device, dtype)
    return float(loss), float(norm), real_tokens


def create_model(config: ModelConfig) -> nn.Module:
    """Build the model (a seam: tests wrap it to inject faults)."""
    from tinystories.model import GPT

    return GPT(config)


def _format_count(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def _check_resumable(out_dir: Path, run_config: RunConfig, resume: bool) -> bool:
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
    config = run_config.train
    # every rank checks before any rank writes: ranks meet in setup() below, before rank 0 writes anything
    resuming = _check_resumable(out_dir, run_config, resume)
    Trackers.check_available(config)
    shards = open_shards(run_config.data)
    if int(shards.meta["vocab_size"]) > run_config.model.vocab_size:
        raise TrainingError(f"{shards.directory}: the data's tokenizer has {shards.meta['vocab_size']} tokens but the "
                            f"model only {run_config.model.vocab_size} (set model.vocab_size to fit)")
    ddp = distributed.setup(parse_device(config.device))
    try:
        ddp.barrier()  # every rank has read the run directory before rank 0 writes to it
        summary = _train(run_config, out_dir, resuming, init_from, progress, shards, ddp)
        ddp.barrier()  # ranks return together: torchrun stops the job when the first one exits with a failure
        return summary
    finally:
        ddp.close()


def seed_rank(seed: int, rank: int) -> None:
    """Seed the RNGs of rank `rank` > 0 of a data parallel run: its own dropout masks, derived from the seed."""
    derived = int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])
    seed_everything(derived)


def _train(run_config: RunConfig, out_dir: Path, resuming: bool, init_from: str | os.PathLike | None, progress: bool,
           shards: Shards, ddp: distributed.Distributed) -> dict[str, Any]:
    config = run_config.train
    device = ddp.device
    if device.type == "cpu":
        # every core, unless the user pinned a count the usual way (OMP_NUM_THREADS), e.g. on a shared machine
        threads = os.environ.get("OMP_NUM_THREADS", "")
        torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else os.cpu_count() or 1)
    if device.type == "cuda":
        # TF32 tensor cores for the fp32 matmuls that remain outside bf16 autocast
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = autocast_dtype(config, device)
    T = run_config.model.context_length
    world = ddp.world_size

    seed_everything(config.seed)
    model = create_model(run_config.model)  # the same initial weights on every rank
    if ddp.rank > 0:
        seed_rank(config.seed, ddp.rank)  # rank 0 keeps the single-process random stream
    state = None
    last_dir, best_dir = checkpoint_dir(out_dir, "last"), checkpoint_dir(out_dir, "best")
    if resuming:
        load_weights_into(model, load_weights(last_dir), source=str(last_dir))
        state = load_training_state(last_dir)
        if state is None or state.get("version") != STATE_VERSION:
            raise CheckpointError(f"{last_dir}: no usable training state (state.pt) to resume from")
    elif init_from is not None or run_config.init_from:
        source = init_from if init_from is not None else run_config.init_from
        directory, _ = resolve_checkpoint(source, "best")
        load_weights_into(model, load_weights(directory), source=str(directory))
        run_config = dataclasses.replace(run_config, init_from=str(source))
    model.to(device)
    model.train()

    optimizer = build_optimizer(model, config, device)
    # the global batch: batch_size sequences per micro-batch x grad_accum micro-batches x world_size ranks
    global_batch = config.batch_size * config.grad_accum * world
    batches = batching.make_batches(config.batching, shards.train, T, global_batch, config.seed,
                                    shards.tokenizer.eot_id)
    eval_starts = batching.eval_window_starts(len(shards.val), T, config.eval_tokens)
    step, tokens, elapsed_before = 0, 0, 0.0
    best_val_loss, best_step, evals_since_best = math.inf, None, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        try:
            batches.load_state_dict(state["batches"])
        except batching.BatchError as error:
            raise CheckpointError(f"{last_dir}: {error}") from None
        step, tokens, elapsed_before = int(state["step"]), int(state["tokens"]), float(state["elapsed_seconds"])
        best_val_loss = float(state["best_val_loss"])
        best_step = state["best_step"]
        evals_since_best = int(state["evals_since_best"])
        saved_batch = state.get("global_batch")
        if ddp.is_main and saved_batch is not None and int(saved_batch) != global_batch:
            print(f"tinystories: note: the global batch is now {global_batch} sequences (batch_size "
                  f"{config.batch_size} x grad_accum {config.grad_accum} x {world} process(es)); the checkpoint was "
                  f"trained with {saved_batch}: set --batch-size / --grad-accum so the product is {saved_batch} "
                  "to continue with the same data", file=sys.stderr, flush=True)

    metrics, trackers = None, None
    if ddp.is_main:  # rank 0 writes the run directory; the others only train
        out_dir.mkdir(parents=True, exist_ok=True)
        run_config.save(out_dir / "config.json")
        if not (out_dir / "tokenizer_meta.json").exists():
            shards.tokenizer.save(out_dir)  # the run carries its tokenizer: generation needs no data dir
        metrics = MetricsLog(out_dir / "metrics.jsonl", state["metrics_offset"] if state is not None else None)
        trackers = Trackers(config, run_config, out_dir)
        if ddp.enabled:
            print(f"tinystories: data parallel on {world} processes ({ddp.backend}, {device.type}): global batch "
                  f"{config.batch_size} x {config.grad_accum} x {world} = {global_batch} sequences of {T} tokens "
                  "per step", file=sys.stderr, flush=True)
    flops_per_token = run_config.model.flops_per_token(T)
    peak = peak_flops(device) if ddp.is_main else None
    runnable = torch.compile(model) if config.compile else model  # evaluation runs this (rank 0 only)
    trainable = ddp.wrap(runnable)  # training runs this: DDP all-reduces gradients in backward
    if state is not None:
        # last: everything above may have drawn random numbers
        per_rank = state.get("rng_per_rank") or []
        if ddp.rank == 0:
            restore_rng_state(state["rng"])
        elif ddp.rank < len(per_rank):
            restore_rng_state(per_rank[ddp.rank])
        else:  # a rank the checkpoint did not have (the world grew): a fresh stream for this step
            seed_rank(config.seed + step, ddp.rank)

    def training_state(rng_per_rank: list[Any] | None) -> dict[str, Any]:
        state = {"version": STATE_VERSION, "step": step, "tokens": tokens, "elapsed_seconds": elapsed(),
                 "optimizer": optimizer.state_dict(), "batches": batches.state_dict(), "rng": capture_rng_state(),
                 "best_val_loss": best_val_loss, "best_step": best_step, "evals_since_best": evals_since_best,
                 "metrics_offset": metrics.offset(), "global_batch": global_batch, "world_size": world,
                 # the log interval in progress, so the first train_loss after a resume averages the same steps
                 "interval": {"loss_sum": interval_loss, "steps": interval_steps}}
        if rng_per_rank is not None and len(rng_per_rank) > 1:
            state["rng_per_rank"] = rng_per_rank
        return state

    def save_last() -> None:
        """Write checkpoints/last (rank 0; every rank calls this: it gathers each rank's RNG state, and the
        others wait at a barrier until the checkpoint is whole)."""
        read_pending()  # never save a state whose losses were not checked
        rng_per_rank = ddp.gather(capture_rng_state())
        if ddp.is_main:
            save_checkpoint(last_dir, model, training_state(rng_per_rank), metadata={"step": str(step)})
        ddp.barrier()

    def say(message: str) -> None:
        if ddp.is_main:
            _write(bar, message)

    start_time = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start_time

    def time_is_up(seconds: float) -> bool:
        return config.max_minutes is not None and seconds >= 60.0 * config.max_minutes

    # Steps whose loss and gradient norm (device tensors) were not read yet: reading waits for the device,
    # so it happens once per log interval, before any evaluation or checkpoint, not after every step.
    pending: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []  # (step, lr, loss, grad norm)

    def read_pending() -> None:
        """Read the pending steps' losses (one host sync; summed over ranks); stop at a non-finite one.

        On divergence nothing is saved: checkpoints/last stays the last good state to resume from."""
        nonlocal interval_loss, last_loss, grad_norm, interval_seconds
        if not pending:
            return
        started = time.perf_counter()
        losses = ddp.sum_(torch.stack([loss for _, _, loss, _ in pending]))
        norms = torch.stack([norm.float() for _, _, _, norm in pending])
        values = torch.stack([losses, norms], dim=1).tolist()  # (n, 2): the sync
        interval_seconds += time.perf_counter() - started  # the device's share of the interval's steps
        for (at_step, at_lr, _, _), (loss, norm) in zip(pending, values):
            if not (math.isfinite(loss) and math.isfinite(norm)):
                pending.clear()
                kept = (f"the last good checkpoint is {last_dir} (step {_saved_step(last_dir)}), from which the "
                        "run resumes" if last_dir.exists() else "no checkpoint was saved yet")
                raise TrainingError(f"training diverged at step {at_step}: loss {loss}, grad norm {norm} "
                                    f"(lr {at_lr:.3g}); {kept}; try a lower --lr or more warmup")
            interval_loss += loss
            last_loss, grad_norm = loss, norm
        pending.clear()

    evaluated_at = step  # no final evaluation unless this session trains a step

    def evaluate_and_save() -> bool:
        """Evaluate (rank 0; the others wait), log, write checkpoints. Returns whether patience says stop."""
        nonlocal best_val_loss, best_step, evals_since_best, evaluated_at
        read_pending()
        evaluated_at = step
        val_loss = (fixed_windows_loss(runnable, shards.val, eval_starts, T, config.batch_size, device, dtype)
                    if ddp.is_main else 0.0)
        val_loss = ddp.broadcast([val_loss])[0]  # every rank keeps the same best / patience bookkeeping
        val_bpb = val_loss / shards.val_bytes_per_token / math.log(2)
        improved = val_loss < best_val_loss
        if improved:
            best_val_loss, best_step, evals_since_best = val_loss, step, 0
        else:
            evals_since_best += 1
        if ddp.is_main:
            record = {"step": step, "tokens": tokens, "val_loss": val_loss, "val_bpb": val_bpb, "lr": lr,
                      "tokens_per_second": last_tokens_per_second, "grad_norm": grad_norm,
                      "elapsed_seconds": elapsed()}
            metrics.append(record)
            trackers.log(record)
            plot_metrics(metrics.records, out_dir / "loss.png")
        save_last()
        if ddp.is_main:
            if improved:
                copy_checkpoint(last_dir, best_dir)
            say(f"step {step}: val loss {val_loss:.4f}, {val_bpb:.4f} bits/byte{' (best)' if improved else ''}")
            if config.sample_tokens > 0:
                text = sample_story(model, shards.tokenizer, config.sample_tokens, seed=config.seed + step)
                say(f"sample: {text.strip()}")
        return config.patience is not None and evals_since_best >= config.patience

    bar = _progress_bar(progress and ddp.is_main, config.max_steps, step)
    interval_loss, interval_steps, interval_tokens, interval_seconds = 0.0, 0, 0, 0.0
    if state is not None:
        interval_loss, interval_steps = float(state["interval"]["loss_sum"]), int(state["interval"]["steps"])
    last_loss, grad_norm, lr = math.nan, math.nan, learning_rate(step, config, elapsed_before)
    last_tokens_per_second = 0.0
    stop_reason = "max_steps"
    try:
        with StopSignals(repeat_interrupts=not ddp.enabled) as signals:
            while True:
                # One agreement per step: every rank takes the same decisions from the same clock and signals
                # (the latest clock and any signal over all ranks; a CPU collective, no device sync).
                now, signal_code = ddp.agree_max([elapsed(), signals.code])
                if signal_code:
                    stop_reason = StopSignals.name_of(signal_code)
                    save_last()
                    say(f"{stop_reason.upper()}: saved {last_dir} at step {step}; run the same command again to resume")
                    break
                if step >= config.max_steps:
                    stop_reason = "max_steps"
                    break
                if time_is_up(now):
                    stop_reason = "max_minutes"
                    if evaluated_at != step:
                        evaluate_and_save()
                    break
                step_start = time.perf_counter()
                multiplier = lr_multiplier(step, config, now)
                optimizer.set_lr_multiplier(multiplier)
                lr = config.lr * multiplier
                x, y = batches.next_batch()  # the global batch (batch_size * grad_accum * world, L)
                loss, norm, real_tokens = step_gradients(trainable, model, x, y, config.grad_accum,
                                                         config.grad_clip, device, dtype, ddp.rank, world)
                optimizer.step()
                optimizer.zero_grad()
                step += 1
                tokens += real_tokens
                pending.append((step, lr, loss, norm))
                interval_steps += 1
                interval_tokens += real_tokens
                interval_seconds += time.perf_counter() - step_start

                if step % config.log_every == 0 or step == config.max_steps:
                    read_pending()
                    last_tokens_per_second = interval_tokens / max(interval_seconds, 1e-9)
                    if ddp.is_main:
                        record = {"step": step, "tokens": tokens, "train_loss": interval_loss / interval_steps,
                                  "lr": lr, "tokens_per_second": last_tokens_per_second, "grad_norm": grad_norm,
                                  "elapsed_seconds": elapsed()}
                        if peak:
                            record["mfu"] = flops_per_token * last_tokens_per_second / (peak * world)
                        metrics.append(record)
                        trackers.log(record)
                    if bar is not None:
                        postfix = {"loss": f"{interval_loss / interval_steps:.3f}", "lr": f"{lr:.2e}",
                                   "tok/s": _format_count(last_tokens_per_second)}
                        if peak:
                            postfix["mfu"] = f"{100 * flops_per_token * last_tokens_per_second / (peak * world):.1f}%"
                        if config.max_minutes:
                            postfix["left"] = f"{max(0.0, config.max_minutes - elapsed() / 60):.1f}min"
                        bar.set_postfix(postfix, refresh=False)
                    interval_loss, interval_steps, interval_tokens, interval_seconds = 0.0, 0, 0, 0.0
                if bar is not None:
                    bar.update(1)

                if step % config.eval_every == 0 or step >= config.max_steps:
                    if evaluate_and_save():
                        stop_reason = "patience"
                        say(f"stopping early: no improvement in {config.patience} evaluations")
                        break
    finally:
        if bar is not None:
            bar.close()
        if trackers is not None:
            trackers.close()

    best_bpb = best_val_loss / shards.val_bytes_per_token / math.log(2) if math.isfinite(best_val_loss) else None
    return {"best_val_loss": best_val_loss if math.isfinite(best_val_loss) else None, "best_val_bpb": best_bpb,
            "best_step": best_step, "steps": step, "tokens": tokens, "seconds": elapsed(),
            "stop_reason": stop_reason, "out_dir": str(out_dir), "world_size": world, "rank": ddp.rank}


def _saved_step(directory: Path) -> Any:
    state = load_training_state(directory)
    return state.get("step") if state else "?"


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True)


def _write(bar, message: str) -> None:
    if bar is not None:
        bar.write(message, file=sys.stdout)
    else:
        print(message, flush=True)


def iter_metrics(run_dir: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The records of RUN/metrics.jsonl."""
    with open(Path(run_dir) / "metrics.jsonl") as file:
        for line in file:
            if line.strip():
                yield json.loads(line)
