"""tinystories.devices: the one device parser every command uses."""

import pytest
import torch

from tinystories.devices import parse_device
from tinystories.errors import UserError


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("tinystories.devices.mps_available", lambda: False)
    assert parse_device("auto") == torch.device("cpu")
    monkeypatch.setattr("tinystories.devices.mps_available", lambda: True)
    assert parse_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parse_device("auto") == torch.device("cuda")


def test_explicit_devices_and_their_errors(monkeypatch):
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"--device cuda:1: CUDA is not available"):
        parse_device("cuda:1")
    monkeypatch.setattr("tinystories.devices.mps_available", lambda: False)
    with pytest.raises(UserError, match="--device mps: MPS is not available"):
        parse_device("mps")
    for bad in ("gpu", "cuda:x", "xla"):
        with pytest.raises(UserError, match="expected auto, cpu, cuda, cuda:N or mps"):
            parse_device(bad)
