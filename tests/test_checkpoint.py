"""tinystories.checkpoint: atomic saves that survive a full disk, save ids, the weight average file."""

from __future__ import annotations

import errno

import pytest
import torch

import tinystories.checkpoint as checkpoint
from tinystories.checkpoint import (EMA_FILE, CheckpointError, check_same_save, load_inference_weights,
                                    load_training_state, load_weights, save_checkpoint)


def linear(value: float) -> torch.nn.Linear:
    layer = torch.nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.fill_(value)
        layer.bias.fill_(value)
    return layer


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so_in_one_line(tmp_path, monkeypatch):
    last = tmp_path / "checkpoints" / "last"
    save_checkpoint(last, linear(1.0), {"step": 1})

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(CheckpointError) as raised:
        save_checkpoint(last, linear(2.0), {"step": 2})
    message = str(raised.value)
    assert "\n" not in message and "No space left on device" in message and "previous checkpoint is kept" in message
    assert float(load_weights(last)["weight"][0, 0]) == 1.0 and load_training_state(last)["step"] == 1
    assert sorted(p.name for p in last.parent.iterdir()) == sorted(["last", last.resolve().name])  # no half-written version


def test_a_full_disk_on_the_state_file_is_caught_too(tmp_path, monkeypatch):
    last = tmp_path / "last"

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="nothing was saved"):
        save_checkpoint(last, linear(1.0), {"step": 1})
    assert not last.exists()


def test_files_of_one_save_share_an_id_and_mixed_saves_are_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    save_checkpoint(a, linear(1.0), {"step": 1}, ema_weights=linear(0.5).state_dict())
    save_checkpoint(b, linear(2.0), {"step": 2})
    check_same_save(a, load_training_state(a))  # as saved: fine
    (a.resolve() / "state.pt").write_bytes((b.resolve() / "state.pt").read_bytes())  # swapped in from another save
    with pytest.raises(CheckpointError, match="come from different saves"):
        check_same_save(a, load_training_state(a))


def test_inference_uses_the_weight_average_when_there_is_one(tmp_path):
    plain, averaged = tmp_path / "plain", tmp_path / "averaged"
    save_checkpoint(plain, linear(1.0))
    save_checkpoint(averaged, linear(1.0), ema_weights=linear(0.25).state_dict())
    assert (averaged / EMA_FILE).is_file() and not (plain / EMA_FILE).exists()
    assert float(load_inference_weights(plain)["weight"][0, 0]) == 1.0
    assert float(load_inference_weights(averaged)["weight"][0, 0]) == 0.25
    assert float(load_weights(averaged)["weight"][0, 0]) == 1.0  # the raw weights stay what training resumes
