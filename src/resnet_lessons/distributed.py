"""Beyond one machine: the torchrun / DistributedDataParallel set-up, reductions, rank-0-only writes.

``torchrun --nproc_per_node=N -m resnet_lessons train ...`` starts N processes and tells each its
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` through the environment (torchrun's protocol: these
variables are read by :func:`torchrun_env` and nowhere else). :func:`setup` joins the process group (NCCL on GPUs,
gloo on CPUs) and gives each process its device. :func:`train.fit` asks :func:`world` for the rank and
the number of processes, shards the data by rank, averages gradients through DDP, sums metrics with
:func:`all_reduce_sum`, and writes files only on rank 0.

A single process without torchrun is a world of one: every function here then does nothing special.
:func:`unwrap` is the one way to the plain network inside DDP and ``torch.compile`` wrappers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


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


@dataclass(frozen=True)
class TorchrunEnv:
    """What torchrun tells a process it starts: its global rank, the number of processes, its rank on this node."""

    rank: int
    world_size: int
    local_rank: int


def torchrun_env(env: Mapping[str, str] | None = None) -> TorchrunEnv | None:
    """torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (``os.environ`` unless ``env`` is given), or ``None``
    outside torchrun (``RANK`` or ``WORLD_SIZE`` missing). The one reader of these variables in the library."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    rank = int(env["RANK"])
    return TorchrunEnv(rank=rank, world_size=int(env["WORLD_SIZE"]), local_rank=int(env.get("LOCAL_RANK", rank)))


def setup(device: str | torch.device | None = None, backend: str | None = None) -> World:
    """Join the process group when started by torchrun, and pick this process's device.

    ``device`` ``None`` means ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU. The backend is
    NCCL for CUDA and gloo otherwise. Outside torchrun this returns a world of one.
    """
    launch = torchrun_env()
    if launch is None:
        if device is None:
            from .runtime import pick_device

            device = pick_device()
        return World(device=torch.device(device))
    rank, world_size, local_rank = launch.rank, launch.world_size, launch.local_rank
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


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
    if not world().distributed:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=op)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all processes (itself in a single process)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``tensor`` over all processes (itself in a single process)."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


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
    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain network inside DistributedDataParallel (or DataParallel) and ``torch.compile`` wrappers, nested
    in either order: what to save, export or inspect, with the state-dict keys of the network itself."""
    while True:
        if isinstance(model, (DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        compiled = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule keeps the network here
        if not isinstance(compiled, nn.Module):
            return model
        model = compiled


__all__ = [
    "TorchrunEnv",
    "World",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "is_main",
    "setup",
    "torchrun_env",
    "unwrap",
    "world",
    "wrap_model",
]
