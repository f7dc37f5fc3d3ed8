"""Which torch device to run on: one parser for every command (train, generate, eval, serve, export).

    parse_device("auto")    -> cuda if available, else mps if available, else cpu
    parse_device("cuda:1")  -> that device, or a one-line UserError if this machine has no CUDA
"""

from __future__ import annotations

import torch

from tinystories.errors import UserError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return backend is not None and backend.is_available()


def parse_device(requested: str | torch.device = "auto") -> torch.device:
    """'auto' picks cuda > mps > cpu; an explicit device must exist on this machine."""
    if isinstance(requested, torch.device):
        requested = str(requested)
    text = str(requested).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"--device {requested!r}: expected {DEVICE_CHOICES}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {requested!r}: expected {DEVICE_CHOICES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {requested}: CUDA is not available in this torch build or machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not mps_available():
        raise UserError(f"--device {requested}: MPS is not available on this machine")
    return device
