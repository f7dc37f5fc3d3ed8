"""Optimizers, the learning-rate schedule and the weight average: everything a step changes but the loss.

    build_optimizer(model, config, device) -> Optimizers   AdamW, Muon + AdamW, or 8-bit AdamW
    lr_multiplier(step, config, elapsed)   -> float        warmup, then cosine / wsd / constant
    WeightEMA(model, decay)                                an exponential moving average of the weights

Parameter groups: 'hidden' are the 2-D matrices inside the transformer blocks (Muon trains them when
optimizer='muon'), 'matrices' every weight matrix that is not an embedding (weight_decay), 'embeddings'
the token and position tables (embedding_weight_decay; a tied output head is the token table), and
'gains' the norms' weights and the biases (never decayed).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import defaultdict
from typing import Any, Iterator

import torch
import torch.nn as nn

from tinystories.config import TrainConfig
from tinystories.errors import UserError


class OptimizerStateError(UserError):
    """A saved optimizer state does not fit the optimizers this run builds."""


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
    decay_start = 1.0 - config.decay_fraction  # wsd: warmup, a long stable phase, then a linear decay
    if config.decay_fraction <= 0 or progress < decay_start:
        return 1.0
    t = min((progress - decay_start) / config.decay_fraction, 1.0)
    return 1.0 - (1.0 - floor) * t


def learning_rate(step: int, config: TrainConfig, elapsed_seconds: float = 0.0) -> float:
    """The AdamW learning rate of update `step` (Muon's is muon_lr times the same multiplier)."""
    return config.lr * lr_multiplier(step, config, elapsed_seconds)


# --------------------------------------------------------------------------------------------------
# Parameter groups


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters by role: 'matrices', 'embeddings', 'gains' (a partition) and 'hidden' (the
    2-D matrices inside transformer blocks, a subset of 'matrices'). Tied tensors are listed once."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"matrices": [], "embeddings": [], "gains": [], "hidden": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if id(parameter) in embedding_ids:
            groups["embeddings"].append((name, parameter))
        elif parameter.dim() >= 2:
            groups["matrices"].append((name, parameter))
            if parameter.dim() == 2 and name.startswith("blocks."):
                groups["hidden"].append((name, parameter))
        else:
            groups["gains"].append((name, parameter))
    return groups


def _group(params: list[tuple[str, nn.Parameter]], weight_decay: float, peak_lr: float) -> dict[str, Any]:
    return {"params": [p for _, p in params], "weight_decay": weight_decay, "lr": peak_lr, "peak_lr": peak_lr}


# --------------------------------------------------------------------------------------------------
# Muon


def orthogonalize(updates: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Newton-Schulz approximation of U V^T for each matrix of `updates` (N, rows, cols) = U S V^T.

    Keller Jordan's quintic iteration X <- a X + (b A + c A^2) X with A = X X^T and (a, b, c) =
    (3.4445, -4.7750, 2.0315), tuned to push every singular value towards ~1 in five steps (it ends
    in roughly [0.7, 1.2], which trains as well as the exact U V^T). Works on the wide orientation
    (rows <= cols) so that A is the smaller Gram matrix.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = updates.shape[-2] > updates.shape[-1]
    x = updates.mT if tall else updates  # (N, r, c) with r <= c
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT  # (N, r, r)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon (momentum orthogonalized by Newton-Schulz) for 2-D weight matrices.

    Per matrix W with gradient G: M <- momentum * M + (1 - momentum) * G; the update U is
    lerp(G, M, momentum) (Nesterov) or M; W <- W * (1 - lr * weight_decay) - lr * sqrt(max(1, rows/cols))
    * orthogonalize(U). The same rule as torch.optim.Muon, but matrices of one shape are
    orthogonalized together as one batched matmul, and in float32 on the CPU (torch's runs in bf16,
    which most CPUs emulate slowly: 0.65 s instead of ~0.03 s per step for `tiny`); bf16 on CUDA.
    `row_parts` (parameter -> row counts) names matrices that fuse several (q, k and v in one): each
    band of rows is then orthogonalized, and scaled, as a matrix of its own.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5,
                 row_parts: dict[torch.nn.Parameter, list[int]] | None = None):
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
                    "ns_steps": ns_steps}
        super().__init__(params, defaults)
        for group in self.param_groups:
            if any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon trains 2-D weight matrices only")
        self.row_parts = {id(p): parts for p, parts in (row_parts or {}).items()}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            # (rows, cols) -> [(a band of a weight's rows, its momentum update)]: one batched orthogonalization each
            by_shape: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                update = self._momentum_update(parameter, group)
                parameter.mul_(1 - group["lr"] * group["weight_decay"])  # the update does not read the weight
                for weight, part in zip(*self._bands(parameter, update)):
                    by_shape[tuple(weight.shape)].append((weight, part))
            for pieces in by_shape.values():
                self._step_same_shape(pieces, group)

    def _momentum_update(self, parameter: torch.nn.Parameter, group: dict[str, Any]) -> torch.Tensor:
        momentum = group["momentum"]
        buffer = self.state[parameter].setdefault("momentum_buffer", torch.zeros_like(parameter))
        buffer.lerp_(parameter.grad, 1 - momentum)
        return parameter.grad.lerp(buffer, momentum) if group["nesterov"] else buffer

    def _bands(self, parameter: torch.Tensor, update: torch.Tensor):
        """(views of the weight's row bands, the same bands of the update): the whole matrix unless split."""
        parts = self.row_parts.get(id(parameter))
        if parts is None:
            return [parameter], [update]
        return parameter.split(parts), update.split(parts)

    def _step_same_shape(self, pieces: list[tuple[torch.Tensor, torch.Tensor]], group: dict[str, Any]) -> None:
        stacked = torch.stack([update for _, update in pieces])  # (N, rows, cols)
        dtype = torch.bfloat16 if stacked.is_cuda else torch.float32
        orthogonal = orthogonalize(stacked.to(dtype), group["ns_steps"])
        rows, cols = pieces[0][0].shape
        scale = group["lr"] * math.sqrt(max(1.0, rows / cols))
        for (weight, _), update in zip(pieces, orthogonal):
            weight.add_(update.to(weight.dtype), alpha=-scale)


# --------------------------------------------------------------------------------------------------
# Building the optimizers


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
            raise OptimizerStateError(f"the checkpoint's optimizer state is for {state.get('kinds')}, "
                                      f"this run builds {kinds} (was --optimizer changed?)")
        try:
            for optimizer, values in zip(self.optimizers, state["states"]):
                optimizer.load_state_dict(values)
        except (ValueError, KeyError, RuntimeError) as error:
            raise OptimizerStateError(f"the checkpoint's optimizer state does not fit this model ({error})") from None


def _adamw(groups: list[dict[str, Any]], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = [g for g in groups if g["params"]]
    betas = (config.beta1, config.beta2)
    if device.type in ("cuda", "cpu", "mps"):
        try:  # fused: one kernel for all parameters instead of a loop of small ones
            return torch.optim.AdamW(groups, lr=config.lr, betas=betas, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(groups, lr=config.lr, betas=betas)


def _adamw8bit(groups: list[dict[str, Any]], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    try:
        import bitsandbytes
    except ImportError:
        warnings.warn("optimizer 'adamw8bit' needs bitsandbytes (pip install bitsandbytes); using AdamW instead",
                      stacklevel=3)
        return _adamw(groups, config, device)
    return bitsandbytes.optim.AdamW8bit([g for g in groups if g["params"]], lr=config.lr,
                                        betas=(config.beta1, config.beta2))


def fused_row_parts(model: nn.Module) -> dict[nn.Parameter, list[int]]:
    """The block matrices that fuse several, with the row count of each: qkv -> (q, k, v), and
    SwiGLU's fc -> (gate, up)."""
    config = model.config
    queries, keys = config.n_head * config.head_dim, config.kv_heads * config.head_dim
    parts = {}
    for block in model.blocks:
        parts[block.attn.qkv.weight] = [queries, keys, keys]
        if config.mlp == "swiglu":
            parts[block.mlp.fc.weight] = [config.ffn_dim, config.ffn_dim]
    return parts


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> Optimizers:
    """AdamW for everything, or Muon for the blocks' matrices and AdamW for the rest (optimizer='muon').

    Weight decay is decoupled and shrinks a weight by lr * decay per step. Muon's lr is ~7x AdamW's,
    so its groups get weight_decay * lr / muon_lr: the matrices shrink at the same rate either way.
    """
    groups = parameter_groups(model)
    embeddings = _group(groups["embeddings"], config.embedding_weight_decay, config.lr)
    gains = _group(groups["gains"], 0.0, config.lr)
    if config.optimizer != "muon":
        matrices = _group(groups["matrices"], config.weight_decay, config.lr)
        build = _adamw8bit if config.optimizer == "adamw8bit" else _adamw
        return Optimizers([build([matrices, embeddings, gains], config, device)])
    hidden_ids = {id(p) for _, p in groups["hidden"]}
    others = [(n, p) for n, p in groups["matrices"] if id(p) not in hidden_ids]
    muon_decay = config.weight_decay * config.lr / config.muon_lr
    muon = Muon([_group(groups["hidden"], muon_decay, config.muon_lr)], lr=config.muon_lr, weight_decay=muon_decay,
                row_parts=fused_row_parts(model) if config.muon_split else None)
    adamw = _adamw([_group(others, config.weight_decay, config.lr), embeddings, gains], config, device)
    return Optimizers([muon, adamw])


# --------------------------------------------------------------------------------------------------
# Weight averaging


class WeightEMA:
    """An exponential moving average of a model's parameters, updated after every optimizer step:

        average <- d * average + (1 - d) * weights,   d = min(decay, (1 + step) / (10 + step))

    The warm-up of d keeps the first steps' random weights from lingering in the average (with a
    fixed 0.999 they would still weigh e^-1 after 1,000 steps). Small models trained for many passes
    over small data forget and re-fit the same stories; the average smooths that out. It is what
    `applied()` evaluates and what a checkpoint ships beside the raw weights (checkpoint.EMA_FILE).
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]  # tied tensors once
        self.parameters = [p for _, p in model.named_parameters()]
        self.average = [p.detach().clone() for p in self.parameters]

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step `step` (0-based)."""
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        torch._foreach_lerp_(self.average, [p.detach() for p in self.parameters], 1.0 - self.decay_at(step))

    def weights(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.average))

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self.names if name not in weights]
        if missing:
            raise OptimizerStateError(f"the saved weight average lacks {', '.join(missing[:3])}")
        for name, average in zip(self.names, self.average):
            average.copy_(weights[name])

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Run the block with the averaged weights in the model, then put the trained ones back."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.parameters]
            torch._foreach_copy_(self.parameters, self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.parameters, trained)
