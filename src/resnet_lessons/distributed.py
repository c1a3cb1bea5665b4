"""Beyond one machine: the torchrun / DistributedDataParallel set-up, reductions, rank-0-only writes.

``torchrun --nproc_per_node=N -m resnet_lessons train ...`` starts N processes and tells each its
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` through the environment (torchrun's protocol: these
variables are read here and nowhere else). :func:`setup` joins the process group (NCCL on GPUs,
gloo on CPUs) and gives each process its device. :func:`train.fit` asks :func:`world` for the rank and
the number of processes, shards the data by rank, averages gradients through DDP, sums metrics with
:func:`all_reduce_sum`, and writes files only on rank 0.

A single process without torchrun is a world of one: every function here then does nothing special.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank, how many processes there are, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True inside a process started by ``torchrun`` (or any launcher that sets its variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def setup(device: str | torch.device | None = None, backend: str | None = None) -> World:
    """Join the process group when started by torchrun, and pick this process's device.

    ``device`` ``None`` means ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU. The backend is
    NCCL for CUDA and gloo otherwise. Outside torchrun this returns a world of one.
    """
    if not launched_by_torchrun():
        if device is None:
            from .runtime import pick_device

            device = pick_device()
        return World(device=torch.device(device))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def world() -> World:
    """The current rank and world size (a world of one when no process group is running)."""
    if dist.is_available() and dist.is_initialized():
        return World(rank=dist.get_rank(), world_size=dist.get_world_size())
    return World()


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one process that prints and writes files."""
    return world().is_main


def barrier() -> None:
    if world().distributed:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (call once at the end of a torchrun process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all processes (itself in a single process)."""
    if not world().distributed:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``tensor`` over all processes."""
    if not world().distributed:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(value: object, src: int = 0) -> object:
    """``value`` as held by rank ``src``, on every process."""
    if not world().distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when several processes run, else ``model`` itself."""
    if not world().distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain network inside DDP and ``torch.compile`` wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


@contextlib.contextmanager
def main_first() -> Iterator[bool]:
    """Rank 0 runs the block first (e.g. a download), the others wait, then run it too."""
    if not is_main():
        barrier()
    yield is_main()
    if is_main():
        barrier()


__all__ = [
    "World",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "is_main",
    "launched_by_torchrun",
    "main_first",
    "setup",
    "unwrap",
    "world",
    "wrap_model",
]
