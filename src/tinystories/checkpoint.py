"""Checkpoints and the run-directory layout.

    RUN/config.json                 RunConfig: rebuilds the model and resumes the run
    RUN/tokenizer.json, tokenizer_meta.json
    RUN/metrics.jsonl, RUN/loss.png
    RUN/checkpoints/last/           model.safetensors (+ state.pt: optimizer, schedule, RNG, data position)
                                    (+ model_ema.safetensors: the weight average, when training keeps one)
    RUN/checkpoints/best/           the same, from the evaluation with the lowest validation loss so far

Generation, evaluation and export use the weight average when a checkpoint has one (it is what the
run evaluated), the raw weights otherwise; resuming loads both.

Saving is atomic: a checkpoint is written into a fresh hidden directory, and then the name `last`
(a symbolic link) is switched to it with one rename. A process killed at any moment leaves the
previous checkpoint whole; so does a full disk (the error is one line). Every file of one save carries
the same random save id, so weights and state from different saves (or runs) are refused, never mixed.
Loading never unpickles arbitrary objects: weights are safetensors and the training state is read
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tinystories.config import ConfigError, ModelConfig, RunConfig
from tinystories.errors import UserError

WEIGHTS_FILE = "model.safetensors"
EMA_FILE = "model_ema.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"


class CheckpointError(UserError):
    """A checkpoint or run directory is missing, truncated or does not match its config."""


def checkpoint_dir(run_dir: str | os.PathLike, which: str) -> Path:
    return Path(run_dir) / "checkpoints" / which


def _weights_to_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    config = getattr(model, "config", None)
    if config is not None and config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as tok_emb.weight; safetensors stores it once
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}


def save_checkpoint(directory: str | os.PathLike, model: torch.nn.Module,
                    extra_state: dict[str, Any] | None = None, metadata: dict[str, str] | None = None,
                    ema_weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Atomically write `directory`: the weights, and the training state and weight average if given.

    A failed write (a full disk, say) leaves the previous checkpoint as it was and raises a one-line
    CheckpointError."""
    directory = Path(directory)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    version = parent / f".{directory.name}-{uuid.uuid4().hex[:12]}"
    try:
        version.mkdir()
        _write_version(version, _unwrap(model), extra_state, metadata, ema_weights)
        link_temp = parent / f".{directory.name}.link-{uuid.uuid4().hex[:8]}"
        os.symlink(version.name, link_temp)
        if directory.exists() and not directory.is_symlink():
            shutil.rmtree(directory)  # a plain directory (copied or hand-made) is replaced by the link
        os.replace(link_temp, directory)  # the atomic switch
        _fsync_directory(parent)
    except OSError as error:
        shutil.rmtree(version, ignore_errors=True)
        kept = "the previous checkpoint is kept" if (directory / WEIGHTS_FILE).is_file() else "nothing was saved"
        raise CheckpointError(f"{directory}: cannot write the checkpoint ({error.strerror or error}); {kept}") from None
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)
        raise
    _remove_stale_versions(parent, directory.name)
    return directory


def _write_version(version: Path, model: torch.nn.Module, extra_state: dict[str, Any] | None,
                   metadata: dict[str, str] | None, ema_weights: dict[str, torch.Tensor] | None) -> None:
    """Write one save's files into the fresh directory `version`, all stamped with one save id."""
    save_id = uuid.uuid4().hex
    info = {"format": "pt", "save_id": save_id}
    if getattr(model, "config", None) is not None:
        info["model_config"] = json.dumps(model.config.to_dict())
    info.update(metadata or {})
    save_file(_weights_to_save(model), str(version / WEIGHTS_FILE), metadata=info)
    if ema_weights is not None:
        ema = {name: tensor.detach().to("cpu").contiguous() for name, tensor in ema_weights.items()}
        save_file(ema, str(version / EMA_FILE), metadata=info)
    if extra_state is not None:
        torch.save({**extra_state, "save_id": save_id}, version / STATE_FILE)
    _fsync_directory(version)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DistributedDataParallel or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _remove_stale_versions(parent: Path, name: str) -> None:
    """Delete hidden versions of `name` that no link points to (left by earlier saves or kills)."""
    live = {os.readlink(link) for link in parent.iterdir() if link.is_symlink()}
    for candidate in parent.glob(f".{name}-*"):
        if candidate.name not in live:
            shutil.rmtree(candidate, ignore_errors=True)
    for temp_link in parent.glob(f".{name}.link-*"):
        temp_link.unlink(missing_ok=True)


def _fsync_directory(path: Path) -> None:
    for file in path.iterdir() if path.is_dir() else []:
        if file.is_file() and not file.is_symlink():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def copy_checkpoint(source: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Atomically make `destination` a copy of checkpoint `source` (e.g. last -> best)."""
    source, destination = Path(source), Path(destination)
    parent = destination.parent
    version = parent / f".{destination.name}-{uuid.uuid4().hex[:12]}"
    shutil.copytree(source.resolve(), version)
    link_temp = parent / f".{destination.name}.link-{uuid.uuid4().hex[:8]}"
    os.symlink(version.name, link_temp)
    if destination.exists() and not destination.is_symlink():
        shutil.rmtree(destination)
    os.replace(link_temp, destination)
    _remove_stale_versions(parent, destination.name)
    return destination


def load_weights(directory: str | os.PathLike, file: str = WEIGHTS_FILE) -> dict[str, torch.Tensor]:
    path = Path(directory) / file
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({_first_line(error)})") from None


def load_inference_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights to generate, evaluate and export with: the weight average if the checkpoint has one."""
    return load_weights(directory, EMA_FILE if (Path(directory) / EMA_FILE).is_file() else WEIGHTS_FILE)


def save_id(directory: str | os.PathLike, file: str = WEIGHTS_FILE) -> str | None:
    """The save id stamped into a weights file's metadata (None for files written before save ids)."""
    try:
        with safe_open(str(Path(directory) / file), framework="pt") as handle:
            return (handle.metadata() or {}).get("save_id")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{Path(directory) / file}: unreadable or truncated safetensors file "
                              f"({_first_line(error)})") from None


def check_same_save(directory: str | os.PathLike, state: dict[str, Any] | None) -> None:
    """Refuse a checkpoint whose files come from different saves (copied together from two runs)."""
    directory = Path(directory)
    ids = {WEIGHTS_FILE: save_id(directory)}
    if (directory / EMA_FILE).is_file():
        ids[EMA_FILE] = save_id(directory, EMA_FILE)
    if state is not None:
        ids[STATE_FILE] = state.get("save_id")
    if None not in ids.values() and len(set(ids.values())) > 1:
        raise CheckpointError(f"{directory}: {', '.join(ids)} come from different saves (files copied between "
                              "checkpoints or runs?); restore the directory as one piece")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_training_state(directory: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: unreadable training state ({type(error).__name__}: {_first_line(error)})") from None


def load_weights_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy `weights` into `model`, with one clear error for any missing, extra or misshapen tensor."""
    model = _unwrap(model)
    expected = model.state_dict()
    tied = getattr(model, "config", None) is not None and model.config.tie_embeddings
    if tied:
        expected.pop("lm_head.weight", None)
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        details = []
        if missing:
            details.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            details.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
        raise CheckpointError(f"{source}: weights do not match the model config ({'; '.join(details)})")
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, "
                                  f"the config needs {tuple(expected[name].shape)}")
    model.load_state_dict(weights, strict=not tied)


def resolve_checkpoint(path: str | os.PathLike, which: str = "best") -> tuple[Path, Path]:
    """Find (checkpoint directory, directory holding config.json and the tokenizer) for `path`.

    `path` may be a run directory (its `checkpoints/<which>`, falling back to `last` if there is no
    `best` yet), a checkpoint directory inside a run, or a self-contained directory holding
    config.json, the tokenizer and model.safetensors together.
    """
    if which not in ("best", "last"):
        raise CheckpointError(f"--checkpoint must be 'best' or 'last', got {which!r}")
    path = shipped_model_path(path) or Path(path)  # a shipped model's name (e.g. 'tiny') or a path
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    if (path / WEIGHTS_FILE).is_file():
        for home in (path, path.parent.parent):
            if (home / CONFIG_FILE).is_file():
                return path, home
        raise CheckpointError(f"{path}: found {WEIGHTS_FILE} but no {CONFIG_FILE} beside it or in its run directory")
    if (path / CONFIG_FILE).is_file():
        for candidate in (which, "last" if which == "best" else "best"):
            directory = checkpoint_dir(path, candidate)
            if (directory / WEIGHTS_FILE).is_file():
                return directory, path
        raise CheckpointError(f"{path}: run has no checkpoint yet (no checkpoints/{which}/{WEIGHTS_FILE})")
    raise CheckpointError(f"{path}: not a run directory (no {CONFIG_FILE}) nor a checkpoint (no {WEIGHTS_FILE})")


def load_run_config(home: str | os.PathLike) -> RunConfig:
    try:
        return RunConfig.load(Path(home) / CONFIG_FILE)
    except ConfigError as error:
        raise CheckpointError(str(error)) from None


def build_model(config: ModelConfig, weights: dict[str, torch.Tensor] | None = None, source: str = "checkpoint"):
    from tinystories.model import GPT

    model = GPT(config)
    if weights is not None:
        load_weights_into(model, weights, source)
    return model


def load_run(path: str | os.PathLike, checkpoint: str = "best", device: str | torch.device = "cpu"):
    """Load (model in eval mode, tokenizer, RunConfig) from a run, checkpoint or shipped model name."""
    from tinystories.tokenizer import load_tokenizer

    path = shipped_model_path(path) or Path(path)
    directory, home = resolve_checkpoint(path, checkpoint)
    run_config = load_run_config(home)
    model = build_model(run_config.model, load_inference_weights(directory), source=str(directory))
    tokenizer = load_tokenizer(home)
    if tokenizer.vocab_size > run_config.model.vocab_size:
        raise CheckpointError(f"{home}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{run_config.model.vocab_size}: checkpoint and tokenizer do not belong together")
    model.to(device).eval()
    return model, tokenizer, run_config


def shipped_models_root() -> Path:
    return Path(__file__).parent / "assets" / "models"


def shipped_model_path(name: str | os.PathLike) -> Path | None:
    """The directory of a model shipped inside the package (e.g. 'tiny'), if `name` names one."""
    name = str(name)
    if os.sep in name or "/" in name or Path(name).exists():
        return None
    candidate = shipped_models_root() / name
    return candidate if (candidate / CONFIG_FILE).is_file() else None
