"""The training loop's own state, and what makes a run repeat: the counters and random streams a checkpoint
saves and a resume restores, seeding, and torch's deterministic mode.

One `LoopState` holds all of it (step, tokens, clock, best-so-far bookkeeping, the open log interval,
and every RNG), and round-trips through `checkpoints/last/state.pt` as plain ints, floats, lists and
tensors, so the file loads with `torch.load(weights_only=True)`. With the optimizer state and the
batch sampler's position beside it, a resumed run continues exactly where the interrupted one stood.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from typing import Any

import numpy as np
import torch

STATE_VERSION = 2


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def seed_rank(seed: int, rank: int) -> None:
    """Seed the RNGs of rank `rank` > 0 of a data parallel run: its own dropout masks, derived from the seed."""
    seed_everything(int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0]))


def capture_rng_state() -> dict[str, Any]:
    """Every RNG this process draws from (torch CPU and CUDA, numpy, python) as weights_only-loadable values."""
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


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool, device: torch.device):
    """Run the block in torch's deterministic mode (CPU), then restore the previous mode.

    This is what makes a compiled CPU run repeat bit for bit: otherwise inductor lowers the
    embedding's backward (an index_put with accumulate) to atomic adds from all threads, whose order
    changes from run to run; in deterministic mode it calls ATen's deterministic kernel instead, at no
    measurable cost (benchmarks/RESULTS.md). warn_only: an op without a deterministic version warns
    instead of failing. fill_uninitialized_memory would NaN-fill every new tensor, which costs time
    and guards nothing here. Not applied on CUDA, where flash attention's backward has no
    deterministic kernel: GPU runs agree to rounding, not bit for bit.
    """
    if not enabled or device.type != "cpu":
        yield
        return
    import torch.utils.deterministic as settings

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              settings.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    settings.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        settings.fill_uninitialized_memory = before[2]


@dataclasses.dataclass
class LoopState:
    """Where a run stands. `step` counts optimizer updates (it fixes the learning rate)."""

    step: int = 0
    tokens: int = 0  # real (non-padding) training targets seen
    elapsed_seconds: float = 0.0  # training time before this session (the clock adds this session's)
    best_val_loss: float = math.inf
    best_step: int | None = None
    evals_since_best: int = 0
    metrics_offset: int | None = None  # metrics.jsonl's size at the checkpoint (later lines are dropped)
    interval_loss: float = 0.0  # the log interval in progress: summed step losses ...
    interval_steps: int = 0  # ... over this many steps, so the first log after a resume averages the same steps
    global_batch: int | None = None  # sequences per step when saved (batch_size x grad_accum x ranks)
    world_size: int = 1
    threads: int | None = None  # CPU threads it trains with: a resume keeps them, so it repeats the run exactly
    rng: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # one per rank, rank 0 first

    def record_eval(self, val_loss: float) -> bool:
        """Count an evaluation; returns whether it is the best so far."""
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.best_step, self.evals_since_best = val_loss, self.step, 0
            return True
        self.evals_since_best += 1
        return False

    def capture_rng(self, per_rank: list[dict[str, Any]] | None) -> None:
        """Keep every rank's RNG state (gathered by the caller; None: this process only)."""
        self.rng = list(per_rank) if per_rank else [capture_rng_state()]

    def restore_rng(self, rank: int, seed: int) -> None:
        """Put back this rank's RNG state; a rank the checkpoint did not have gets a fresh stream."""
        if rank < len(self.rng):
            restore_rng_state(self.rng[rank])
        else:
            seed_rank(seed + self.step, rank)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LoopState":
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})

    @classmethod
    def from_version_1(cls, state: dict[str, Any]) -> "LoopState":
        """A checkpoint written before LoopState existed (its counters at the top level of state.pt)."""
        interval = state.get("interval") or {}
        rng = state.get("rng_per_rank") or [state["rng"]]
        loop = cls.from_dict({key: state[key] for key in ("step", "tokens", "elapsed_seconds", "best_val_loss",
                                                          "best_step", "evals_since_best", "metrics_offset",
                                                          "global_batch", "world_size") if key in state})
        loop.interval_loss, loop.interval_steps = float(interval.get("loss_sum", 0.0)), int(interval.get("steps", 0))
        loop.rng = rng
        return loop
