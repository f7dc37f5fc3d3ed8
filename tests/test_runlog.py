"""tinystories.runlog: metrics file, deferred loss reads, the run's messages and summary line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tinystories.config import RunConfig
from tinystories.distributed import Distributed
from tinystories.runlog import (DivergenceError, MetricsLog, PendingLosses, RunLog, RunLogError, iter_metrics,
                                summary_line)


def test_pending_losses_are_read_in_one_go_in_order(tmp_path):
    pending = PendingLosses(tmp_path / "checkpoints" / "last")
    for step, value in enumerate((2.5, 2.25, 2.0), start=1):
        pending.add(step, 1e-3, torch.tensor(value), torch.tensor(0.5 * step))
    assert pending.read(Distributed(device=torch.device("cpu"))) == [(2.5, 0.5), (2.25, 1.0), (2.0, 1.5)]
    assert pending.read(Distributed(device=torch.device("cpu"))) == []  # nothing is read twice


def test_a_non_finite_loss_names_its_step_and_the_checkpoint_kept(tmp_path):
    pending = PendingLosses(tmp_path / "checkpoints" / "last")
    pending.add(3, 1e-3, torch.tensor(2.0), torch.tensor(1.0))
    pending.add(4, 1e-3, torch.tensor(math.inf), torch.tensor(1.0))
    with pytest.raises(DivergenceError, match=r"diverged at step 4: loss inf.*no checkpoint was saved yet"):
        pending.read(Distributed(device=torch.device("cpu")))


def test_metrics_log_drops_lines_written_after_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", None)
    log.append({"step": 1, "train_loss": 3.0})
    offset = log.offset()
    log.append({"step": 2, "train_loss": 2.0})  # written after the checkpoint, then the process died
    resumed = MetricsLog(tmp_path / "metrics.jsonl", offset)
    assert resumed.records == [{"step": 1, "train_loss": 3.0}]
    assert list(iter_metrics(tmp_path)) == [{"step": 1, "train_loss": 3.0}]


def test_a_silent_log_writes_nothing(tmp_path):
    log = RunLog.silent()
    log.record({"step": 1}, plot=True)
    log.say("hello")
    log.progress(1, loss="1.0")
    assert log.offset() is None and not any(tmp_path.iterdir())


def test_a_full_disk_while_logging_is_one_line(tmp_path, monkeypatch):
    log = RunLog(tmp_path, RunConfig.from_preset("tiny"))

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MetricsLog, "append", no_space)
    with pytest.raises(RunLogError, match=r"cannot write the run's log \(No space left on device\)"):
        log.record({"step": 1, "train_loss": 2.0})


def test_summary_line():
    summary = {"stop_reason": "max_steps", "steps": 20, "tokens": 81920, "seconds": 12.4, "best_val_loss": 2.5,
               "best_val_bpb": 0.9, "out_dir": "runs/x"}
    assert summary_line(summary) == ("tinystories: max_steps after 20 steps, 81,920 tokens, 12s; best val loss 2.5000 "
                                     "(0.9000 bits/byte); run in runs/x")
    assert "no evaluation yet" in summary_line({**summary, "best_val_loss": None})
    assert json.dumps(summary)  # plain values only
