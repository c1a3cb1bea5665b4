"""Speed: training throughput with each speed feature on or off, bench results.

:func:`measure_throughput` times the steady state of the training step of :func:`resnet_lessons.train.fit`
(autocast, ``GradScaler`` for fp16, channels_last, ``torch.compile``, SGD) on random images, after warm-up
steps that pay for compiling and for the allocator; ``bench/throughput.py`` and chapter 14 both use it.
:func:`profile_step` runs the same step under ``torch.profiler`` and says which operators took the time.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
from collections.abc import Callable, Generator
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


def _training_step(
    model: nn.Module, batch_size: int, n: int, device: torch.device, *, channels_last: bool, precision: str,
    compile: bool, loader: str, num_workers: int, image_size: int, seed: int,
) -> tuple[Callable[[], torch.Tensor], Callable[[], None]]:
    """The training step of ``train.fit`` on ``n`` random images (one epoch: no loader restart), and a function
    that ends the loader. Checks the settings; moves ``model`` to ``device`` and trains it in place."""
    if batch_size < 1 or loader not in LOADERS or precision not in PRECISIONS:
        raise ValueError(f"need batch_size >= 1, loader in {LOADERS}, precision in {PRECISIONS}; "
                         f"got {batch_size}, loader {loader!r}, precision {precision!r}")
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    forward = cast(nn.Module, torch.compile(model)) if compile else model  # a compiled module is still called
    batches = _batches(images, labels, batch_size, device, channels_last, loader, num_workers)
    loss_fn, autocast = nn.CrossEntropyLoss(), partial(runtime.autocast, precision, device)

    def step() -> torch.Tensor:
        x, y = next(batches)
        loss, _ = train_step(forward, x, y, optimizer=optimizer, loss_fn=loss_fn, autocast=autocast, scaler=scaler)
        return loss

    return step, batches.close  # close ends the DataLoader's workers


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
    if steps < 1 or warmup < 1:
        raise ValueError(f"need steps and warmup >= 1, got {steps} and {warmup}")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step, close = _training_step(
        model, batch_size, min(batch_size * (warmup + steps), max(batch_size, 50_000)), device,
        channels_last=channels_last, precision=precision, compile=compile, loader=loader,
        num_workers=num_workers, image_size=image_size, seed=seed)
    timings = []
    for count in (warmup, steps):
        start = time.perf_counter()
        for _ in range(count):
            loss = step()
        float(loss)  # waits for the device
        synchronize(device)
        timings.append(time.perf_counter() - start)
    warmup_s, seconds = timings
    close()
    memory, kind = peak_memory_mib(device)
    return {"images_per_s": steps * batch_size / seconds, "step_ms": 1000 * seconds / steps,
            "warmup_s": warmup_s, "peak_memory_mib": memory, "memory": kind}


# profile_step's groups of operators: the first whose pattern is in an operator's lower-cased name. The autograd
# nodes (ConvolutionBackward0, ...) are named apart from the aten operators they call, and the kernels without
# oneDNN or cuDNN apart from both (_slow_conv2d_backward), hence several spellings.
OP_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("convolution backward", ("convolution_backward", "convolutionbackward", "conv2d_backward")),
    ("convolution forward", ("convolution", "conv2d")),
    ("BatchNorm", ("batch_norm", "batchnorm")),
    ("pooling", ("pool",)),
    ("ReLU", ("relu", "clamp_min", "threshold_backward")),
)


def op_group(name: str) -> str:
    """The group of :data:`OP_GROUPS` an operator belongs to, else ``"other"`` (the loss, the optimiser,
    copies, fills and additions)."""
    lowered = name.lower()
    return next((group for group, patterns in OP_GROUPS if any(p in lowered for p in patterns)), "other")


@contextlib.contextmanager
def _native_stderr_dropped() -> Generator[None, None, None]:
    """Drops what C++ code writes to file descriptor 2 meanwhile: libkineto, the profiler's engine, logs its
    start and stop there (and, without a GPU driver, a failed GPU query), which would land in a chapter's output.
    Python's own errors are exceptions and pass."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def profile_step(
    model: nn.Module,
    batch_size: int,
    steps: int,
    device: str | torch.device = "cpu",
    *,
    channels_last: bool = False,
    precision: str = "fp32",
    warmup: int = 2,
    image_size: int = 32,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Where the time of :func:`measure_throughput`'s training step goes: ``torch.profiler`` over ``steps``
    steps after ``warmup`` unprofiled ones. One row per operator and input shapes, most time first: ``op``,
    ``group`` (:func:`op_group`), ``shapes`` (of its tensor inputs, a tuple of tuples), ``calls_per_step``,
    ``ms_per_step`` (its own time, without the operators it calls: on a GPU the time of its kernels) and
    ``share`` of all of it. The model is trained in place on random images: pass a fresh one."""
    from torch.profiler import ProfilerActivity, profile

    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got {steps} and {warmup}")
    device = torch.device(device)
    step, close = _training_step(
        model, batch_size, batch_size * (warmup + steps), device, channels_last=channels_last,
        precision=precision, compile=False, loader="device", num_workers=0, image_size=image_size, seed=seed)
    for _ in range(warmup):
        step()
    synchronize(device)
    cuda = device.type == "cuda"
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []), record_shapes=True)
    with _native_stderr_dropped():
        prof.start()
    try:
        for _ in range(steps):
            step()
        synchronize(device)
    finally:
        with _native_stderr_dropped():
            prof.stop()
        close()
    rows = []
    for event in prof.key_averages(group_by_input_shape=True):
        self_us = event.self_device_time_total if cuda else event.self_cpu_time_total
        rows.append({"op": event.key, "group": op_group(event.key),
                     "shapes": tuple(tuple(shape) for shape in event.input_shapes if shape),
                     "calls_per_step": event.count / steps, "ms_per_step": self_us / 1000 / steps})
    total = sum(row["ms_per_step"] for row in rows) or 1.0  # a step too fast for the profiler's clock
    for row in rows:
        row["share"] = row["ms_per_step"] / total
    return sorted(rows, key=lambda row: -row["ms_per_step"])


def convolution_times(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per convolution (its input and filter shapes), the forward and the backward time of a step from
    :func:`profile_step`'s rows: ``input``, ``filters``, ``forward_ms``, ``backward_ms`` and their ``ratio``.
    A forward operator takes (input, filters, ...), ``convolution_backward`` (output gradient, input, filters,
    ...); the autograd nodes, which record only the output gradient, are left out."""
    layers: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        if not row["group"].startswith("convolution"):
            continue
        backward = row["group"] == "convolution backward"
        shapes = row["shapes"][1:] if backward else row["shapes"]
        if len(shapes) < 2:
            continue
        layer = layers.setdefault(shapes[:2], {"input": shapes[0], "filters": shapes[1], "forward_ms": 0.0,
                                               "backward_ms": 0.0})
        layer["backward_ms" if backward else "forward_ms"] += row["ms_per_step"]
    for layer in layers.values():
        layer["ratio"] = layer["backward_ms"] / layer["forward_ms"] if layer["forward_ms"] else float("nan")
    return list(layers.values())


__all__ = [
    "OP_GROUPS", "convolution_times", "measure_throughput", "op_group", "peak_memory_mib", "profile_step",
    "synchronize",
]
