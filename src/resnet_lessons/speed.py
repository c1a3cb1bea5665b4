"""Speed: training throughput with each speed feature on or off, bench results.

:func:`measure_throughput` times the steady state of the training step of :func:`resnet_lessons.train.fit`
(autocast, ``GradScaler`` for fp16, channels_last, ``torch.compile``, SGD) on random images, after warm-up
steps that pay for compiling and for the allocator; ``bench/throughput.py`` and chapter 14 both use it.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Generator
from functools import partial
from typing import Any, cast

import torch
from torch import nn

from . import runtime
from .runtime import PRECISIONS
from .train import train_step

LOADERS = ("device", "dataloader")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> tuple[float | None, str]:
    """Peak memory in MiB and what it measures: CUDA ``max_memory_allocated`` (since the last reset) on a
    GPU; on the CPU the peak resident set of the whole process so far (``getrusage``), which only a fresh
    process per configuration turns into a per-configuration figure (``bench/throughput.py`` does that)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    if sys.platform == "win32":
        return None, "unavailable"
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10), "process peak RSS (getrusage)"


def _batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device,
             channels_last: bool, loader: str,
             num_workers: int) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
    """An endless stream of augmented, normalised training batches from the chosen loader."""
    from .data import Augment, DeviceLoader, ImageSet, torchvision_loader

    mean = std = (0.5, 0.5, 0.5)
    if loader == "device":
        stream = DeviceLoader(images, labels, batch_size=batch_size, mean=mean, std=std, device=device,
                              train=True, augment=Augment(), channels_last=channels_last)
        while True:
            yield from stream
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    imageset = ImageSet(images, labels, tuple(str(c) for c in range(int(labels.max()) + 1)))
    for epoch in itertools.count():
        for x, y in torchvision_loader(imageset, batch_size, mean, std, train=True, num_workers=num_workers,
                                       seed=epoch):
            yield x.to(device, memory_format=fmt, non_blocking=True), y.to(device, non_blocking=True)


def measure_throughput(
    model: nn.Module,
    batch_size: int,
    steps: int,
    device: str | torch.device = "cpu",
    *,
    channels_last: bool = False,
    precision: str = "fp32",
    compile: bool = False,
    warmup: int = 3,
    loader: str = "device",
    num_workers: int = 0,
    image_size: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Training images per second of ``model`` over ``steps`` timed steps, after ``warmup`` untimed ones.

    A step is :func:`resnet_lessons.train.train_step`, the one of ``train.fit``: loader batch (``"device"``:
    :class:`~resnet_lessons.data.DeviceLoader`;
    ``"dataloader"``: the torchvision ``DataLoader`` with ``num_workers``), forward under autocast, cross-entropy,
    backward, SGD step. The model is trained in place on random images: pass a fresh one. Returns
    ``images_per_s``, ``step_ms``, ``warmup_s`` (compiling happens there), ``peak_memory_mib`` and ``memory``.
    """
    if steps < 1 or warmup < 1 or batch_size < 1 or loader not in LOADERS or precision not in PRECISIONS:
        raise ValueError(f"need steps, warmup, batch_size >= 1, loader in {LOADERS}, precision in {PRECISIONS}; "
                         f"got {steps}, {warmup}, {batch_size}, loader {loader!r}, precision {precision!r}")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    n = min(batch_size * (warmup + steps), max(batch_size, 50_000))  # one epoch: no loader restart while timed
    images = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    forward = cast(nn.Module, torch.compile(model)) if compile else model  # a compiled module is still called
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = _batches(images, labels, batch_size, device, channels_last, loader, num_workers)

    loss_fn, autocast = nn.CrossEntropyLoss(), partial(runtime.autocast, precision, device)

    def step() -> torch.Tensor:
        x, y = next(batches)
        loss, _ = train_step(forward, x, y, optimizer=optimizer, loss_fn=loss_fn, autocast=autocast, scaler=scaler)
        return loss

    timings = []
    for count in (warmup, steps):
        start = time.perf_counter()
        for _ in range(count):
            loss = step()
        float(loss)  # waits for the device
        synchronize(device)
        timings.append(time.perf_counter() - start)
    warmup_s, seconds = timings
    batches.close()  # ends the DataLoader's workers
    memory, kind = peak_memory_mib(device)
    return {"images_per_s": steps * batch_size / seconds, "step_ms": 1000 * seconds / steps,
            "warmup_s": warmup_s, "peak_memory_mib": memory, "memory": kind}


__all__ = ["measure_throughput", "peak_memory_mib", "synchronize"]
