"""What a training run writes besides checkpoints: metrics.jsonl, loss.png, trackers, progress and messages.

    RUN/metrics.jsonl   one JSON object per log step (train_loss) or evaluation (val_loss, val_bpb)
    RUN/loss.png        train/val loss and gradient norm, redrawn at each evaluation

`RunLog` is what the loop talks to; under data parallel training only rank 0 has a real one (the
others get `RunLog.silent()`, which ignores everything). Weights & Biases and TensorBoard are optional
trackers that receive the same records. `PendingLosses` holds the steps whose losses were not read
from the device yet.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from tinystories.checkpoint import load_training_state
from tinystories.config import RunConfig, TrainConfig
from tinystories.errors import UserError
from tinystories.files import atomic_path

METRICS_FILE = "metrics.jsonl"


class TrackerError(UserError):
    """A requested tracker (wandb, tensorboard) is not installed."""


class DivergenceError(UserError):
    """The loss or the gradient norm became NaN or infinite."""


class RunLogError(UserError):
    """A log file of the run cannot be written (a full disk, say)."""


class MetricsLog:
    """RUN/metrics.jsonl: one JSON object per line, truncated back to the checkpoint's offset on resume."""

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


def iter_metrics(run_dir: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The records of RUN/metrics.jsonl."""
    with open(Path(run_dir) / METRICS_FILE) as file:
        for line in file:
            if line.strip():
                yield json.loads(line)


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
                raise TrackerError(f"--wandb {config.wandb}: wandb is not installed (pip install wandb)") from None
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise TrackerError("--tensorboard: tensorboard is not installed (pip install tensorboard)") from None

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


class PendingLosses:
    """Steps whose loss and gradient norm are still device tensors. Reading waits for the device, so it
    happens once per log interval (and before any evaluation or checkpoint), not after every step."""

    def __init__(self, last_dir: Path):
        self.last_dir = last_dir
        self.steps: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []  # (step, lr, loss, grad norm)

    def add(self, step: int, lr: float, loss: torch.Tensor, norm: torch.Tensor) -> None:
        self.steps.append((step, lr, loss, norm))

    def read(self, ddp: Any) -> list[tuple[float, float]]:
        """(loss summed over ranks, grad norm) of each pending step, in one host sync. A non-finite value
        stops training: nothing is saved, so checkpoints/last stays the last good state."""
        if not self.steps:
            return []
        losses = ddp.sum_(torch.stack([loss for _, _, loss, _ in self.steps]))
        norms = torch.stack([norm.float() for _, _, _, norm in self.steps])
        values = torch.stack([losses, norms], dim=1).tolist()  # (n, 2): the sync
        for (step, lr, _, _), (loss, norm) in zip(self.steps, values):
            if not (math.isfinite(loss) and math.isfinite(norm)):
                self.steps.clear()
                raise DivergenceError(f"training diverged at step {step}: loss {loss}, grad norm {norm} (lr {lr:.3g}); "
                                    f"{self._kept()}; try a lower --lr or more warmup")
        self.steps.clear()
        return [(loss, norm) for loss, norm in values]

    def _kept(self) -> str:
        if not self.last_dir.exists():
            return "no checkpoint was saved yet"
        state = load_training_state(self.last_dir) or {}
        step = (state.get("loop") or state).get("step", "?")
        return f"the last good checkpoint is {self.last_dir} (step {step}), from which the run resumes"


def summary_line(summary: dict[str, Any]) -> str:
    """The one line a finished (or stopped) run ends with."""
    best = summary["best_val_loss"]
    best_text = (f"best val loss {best:.4f} ({summary['best_val_bpb']:.4f} bits/byte)" if best is not None
                 else "no evaluation yet")
    return (f"tinystories: {summary['stop_reason']} after {summary['steps']} steps, {summary['tokens']:,} tokens, "
            f"{summary['seconds']:.0f}s; {best_text}; run in {summary['out_dir']}")


def format_count(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


class RunLog:
    """The run's metrics file, plot, trackers, progress bar and messages, as one object."""

    def __init__(self, out_dir: Path | None, run_config: RunConfig | None = None, metrics_offset: int | None = None,
                 progress: bool = False, initial_step: int = 0):
        self.out_dir = out_dir
        self.metrics = MetricsLog(out_dir / METRICS_FILE, metrics_offset) if out_dir is not None else None
        self.trackers = Trackers(run_config.train, run_config, out_dir) if out_dir is not None else None
        self.bar = None
        if progress and out_dir is not None:
            from tqdm import tqdm

            self.bar = tqdm(total=run_config.train.max_steps, initial=initial_step, unit="step", file=sys.stderr,
                            dynamic_ncols=True)

    @classmethod
    def silent(cls) -> "RunLog":
        """A log that writes nothing (the ranks > 0 of a data parallel run)."""
        return cls(None)

    def offset(self) -> int | None:
        return self.metrics.offset() if self.metrics is not None else None

    def record(self, record: dict[str, Any], plot: bool = False) -> None:
        if self.metrics is None:
            return
        try:
            self.metrics.append(record)
            if plot:
                plot_metrics(self.metrics.records, self.out_dir / "loss.png")
        except OSError as error:
            raise RunLogError(f"{self.out_dir}: cannot write the run's log ({error.strerror or error})") from None
        self.trackers.log(record)

    def say(self, message: str) -> None:
        if self.out_dir is None:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def progress(self, steps: int = 1, **postfix: str) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.trackers is not None:
            self.trackers.close()
