"""Distributed data parallel plumbing: detect torchrun, join the process group, and let the ranks agree.

    torchrun --nproc_per_node=N -m tinystories train ...     # one node, N processes
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv-endpoint=HOST:29500 -m tinystories train ...

torchrun starts one process per GPU (or CPU worker) and tells each who it is through the environment:
RANK (0 .. WORLD_SIZE-1 over all nodes), WORLD_SIZE and LOCAL_RANK (the index on its node). A process
with WORLD_SIZE > 1 joins the default process group (backend nccl on CUDA, gloo on CPU); on CUDA rank
r uses the device cuda:LOCAL_RANK.

The training loop keeps every rank in lockstep: ranks must take the same decisions (stop now, evaluate
now, the learning rate of this step). Those decisions come from host-side values (a clock, a signal
flag, rank 0's validation loss), so they are exchanged over a small gloo group of CPU tensors: agreeing
never waits for the GPU, and the training loop keeps its no-host-sync hot path.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from tinystories.errors import UserError


class DistributedError(UserError):
    """The torchrun environment or the requested device cannot run data parallel training."""


@dataclasses.dataclass(frozen=True)
class LaunchEnvironment:
    """Who this process is, as torchrun's environment variables say."""

    rank: int
    local_rank: int
    world_size: int


def launch_environment(environ: Mapping[str, str] | None = None) -> LaunchEnvironment | None:
    """The torchrun identity from RANK / WORLD_SIZE / LOCAL_RANK, or None when not launched by torchrun."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ and "RANK" not in environ:
        return None
    try:
        world_size = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise DistributedError(f"RANK={environ.get('RANK')!r} WORLD_SIZE={environ.get('WORLD_SIZE')!r} "
                               f"LOCAL_RANK={environ.get('LOCAL_RANK')!r}: expected integers (as torchrun sets)") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise DistributedError(f"RANK={rank} WORLD_SIZE={world_size} LOCAL_RANK={local_rank}: "
                               "expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0")
    return LaunchEnvironment(rank, local_rank, world_size)


@dataclasses.dataclass
class Distributed:
    """This process's place in a data parallel job (rank 0 of 1 when training alone).

    `control` is the gloo group the host-side agreements run over (None: the default group, when that
    is gloo already). Methods are no-ops, or return their input, when world_size == 1.
    """

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None
    control: Any = None
    owns_group: bool = False  # this object started the process group, so it destroys it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, evaluates and writes checkpoints."""
        return self.rank == 0

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` inside DistributedDataParallel (gradients averaged over ranks in backward), or as is."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        import inspect

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # no buffer broadcast before each forward: the model's only buffers are RoPE tables, equal on every
        # rank by construction (newer torch names the option forward_sync_buffers)
        options = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})
        return DistributedDataParallel(module, device_ids=device_ids, **options)

    def agree_max(self, values: list[float]) -> list[float]:
        """The element-wise maximum of `values` over all ranks (float64 on the CPU: no GPU sync)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.control)
        return tensor.tolist()

    def broadcast(self, values: list[float]) -> list[float]:
        """Rank 0's `values` on every rank (the length must be the same everywhere)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.broadcast(tensor, src=0, group=self.control)
        return tensor.tolist()

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's picklable `value`, in rank order, on rank 0 (None on the other ranks)."""
        if not self.enabled:
            return [value]
        gathered: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0, group=self.control)
        return gathered

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks in place, on its own device (the default group: nccl or gloo)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        """Wait until every rank gets here (over the CPU group: GPUs keep working)."""
        if self.enabled:
            dist.barrier(group=self.control)

    def close(self) -> None:
        """Leave the process group if this object joined it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup(device: torch.device, environ: Mapping[str, str] | None = None) -> Distributed:
    """Join the torchrun job this process belongs to (if any) and return its `Distributed`.

    `device` is the device the user asked for: under torchrun a CUDA device becomes cuda:LOCAL_RANK.
    A process group already initialised by the caller is used as it is (and left open).
    """
    launch = launch_environment(environ)
    already = dist.is_available() and dist.is_initialized()
    if launch is None and not already:
        return Distributed(device=device)
    if already:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = launch.local_rank if launch is not None else rank
    else:
        rank, local_rank, world_size = launch.rank, launch.local_rank, launch.world_size
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA "
                                   "device(s): start at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size == 1 and not already:
        return Distributed(device=device, rank=rank, local_rank=local_rank)
    if device.type not in ("cuda", "cpu"):
        raise DistributedError(f"--device {device.type}: data parallel training runs on CUDA (nccl) or CPU (gloo)")
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed: run a single process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = False
    if not already:
        if backend == "nccl" and not dist.is_nccl_available():
            raise DistributedError("CUDA training under torchrun needs NCCL, which this torch build lacks")
        dist.init_process_group(backend=backend)
        owns = True
    backend = dist.get_backend()
    # host-side agreements go over gloo (CPU tensors); with an nccl default group that needs a group of its own
    control = None if backend == "gloo" else dist.new_group(backend="gloo")
    return Distributed(device=device, rank=rank, local_rank=local_rank, world_size=world_size, backend=backend,
                       control=control, owns_group=owns)
