"""What every benchmark script shares: the record of where and when it ran, JSON writing, table printing, the
book's CPU recipe, loading the data with a label for what its figures are, and the spread of a figure over seeds.

Every ``bench/results/*.json`` carries ``hardware``, ``versions``, ``date`` (UTC, ISO 8601) and ``command`` so
that a figure in the book can say what it was measured on. Imported by the scripts of this folder (run as
``python bench/<script>.py``, which puts this folder on ``sys.path``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from resnet_lessons.profiles import get_profile
from resnet_lessons.train import config_from_profile

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED_ZIP_NAME = Path("shared") / "data" / "cifar10-train-jpeg.zip"
SHARED_ZIP = ROOT.parent / SHARED_ZIP_NAME  # the shared JPEG copy of CIFAR-10's training split, if present
JPEG_LABEL = "JPEG copy of CIFAR-10, validation"  # what a figure scored on the shared zip's carved split is

# The book's CPU recipe is the cpu profile's: half-width ResNet-9 in bf16 where the CPU computes it natively (probes
# of ResNet-20, ResNet-9 and airbench-like networks in issue 5's report). time_to_accuracy.py and ladder.py train it.
CPU_RECIPE = config_from_profile(get_profile("cpu"))


def shared_zip() -> Path | None:
    """The shared JPEG zip next to the repository or inside it (the device machine's copy), or None."""
    for path in (SHARED_ZIP, ROOT / SHARED_ZIP_NAME):
        if path.is_file():
            return path
    return None


def data_label(data: Any) -> str:
    """What accuracy on ``data``'s validation split is: :data:`JPEG_LABEL` for the JPEG copy of CIFAR-10, else the
    source and split, e.g. ``"synthetic, validation"``."""
    if any("JPEG copy of CIFAR-10" in note for note in getattr(data, "notes", ())):
        return JPEG_LABEL
    return f"{Path(str(data.source)).name}, validation"


def load_data(source: str, *, val_per_class: int, seed: int = 0, threads: int | None = None, **options: Any) -> Any:
    """``resnet_lessons.data.load`` with a one-line account on stderr: sizes, label, load time, threads, CPU."""
    import time

    from resnet_lessons.data import load

    started = time.perf_counter()
    data = load(source, val_per_class=val_per_class, seed=seed, **options)
    val = len(data.splits["val"]) if "val" in data.splits else 0
    print(f"data: {source}: train {len(data.train):,}, val {val:,} ({data_label(data)}); loaded in "
          f"{time.perf_counter() - started:.0f} s; {threads or torch.get_num_threads()} threads on {cpu_name()}",
          file=sys.stderr, flush=True)
    return data


def cpu_load(threads: int, load_average_at_start: Sequence[float] | None) -> dict[str, Any]:
    """Hardware fields for a CPU run: threads used, logical CPUs, load average at start and at end (other work on
    the machine slows a timed run; a reader needs to see it)."""
    return {"torch_threads": threads, "logical_cpus": os.cpu_count(),
            "load_average_at_start": list(load_average_at_start) if load_average_at_start else None,
            "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for one value), min, max and the values themselves."""
    import statistics

    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values) if values else None, "max": max(values) if values else None, "values": values}


def _rate(work: Any, flops: float, device: torch.device, min_seconds: float) -> float:
    """GFLOP/s of ``work()`` (``flops`` each call): one warm-up call, then calls until ``min_seconds`` pass."""
    import time

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad():
        work()
        sync()
        calls, start = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - start < min_seconds:
            work()
            calls += 1
        sync()
        return calls * flops / (time.perf_counter() - start) / 1e9


def machine_peaks(device: torch.device | str = "cpu", min_seconds: float = 1.0) -> dict[str, float]:
    """What this machine computes at best, in GFLOP/s (a multiply-add is 2 FLOPs), to set a recipe's speed
    beside: a 3x3 convolution of 128 to 128 channels on a batch of 64 16x16 images (the shape of ResNet-9's
    middle, channels_last) and a 2048 x 2048 matrix product, each in fp32 and in bf16. bf16 runs where the
    device computes it natively (AVX512-BF16/AMX on a CPU; any recent GPU)."""
    from resnet_lessons import runtime

    device = torch.device(device)
    peaks = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        if dtype == torch.bfloat16 and not runtime.native_bf16(device):
            continue
        x = torch.randn(64, 128, 16, 16, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        w = torch.randn(128, 128, 3, 3, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        conv_flops = 2.0 * 64 * 16 * 16 * 128 * 128 * 9
        peaks[f"conv3x3_{name}_gflops"] = _rate(lambda x=x, w=w: torch.nn.functional.conv2d(x, w, padding=1),
                                                conv_flops, device, min_seconds)
        a = torch.randn(2048, 2048, device=device, dtype=dtype)
        peaks[f"matmul_{name}_gflops"] = _rate(lambda a=a: a @ a, 2.0 * 2048**3, device, min_seconds)
    return peaks


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    """The CPU (name, logical CPUs, the ones this process may use, torch threads, load) and the GPU, if any."""
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["cuda_capability"] = f"{props.major}.{props.minor}"
        info["cuda_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda_devices"] = torch.cuda.device_count()
    return info


def versions() -> dict[str, Any]:
    import torchvision

    from resnet_lessons import __version__

    return {
        "resnet_lessons": __version__,
        "torch": str(torch.__version__),
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
    }


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command(script: str, argv: Sequence[str] | None) -> str:
    """The command line that reproduces this run, e.g. ``bench/loader.py --threads 1``."""
    return " ".join([f"bench/{Path(script).name}", *(argv if argv is not None else sys.argv[1:])])


def record(script: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """``hardware``, ``versions``, ``date`` and ``command`` of this run, to merge into a result."""
    return {"hardware": hardware(), "versions": versions(), "date": now(), "command": command(script, argv)}


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, atomically (a reader never sees half a file); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")
    partial.replace(path)
    return path


def _cell(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def print_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]], *, file=None) -> str:
    """Print ``rows`` as an aligned text table; ``columns`` are (key, heading, format spec). Returns the text."""
    cells = [[heading for _, heading, _ in columns]]
    cells += [[_cell(row.get(key), spec) for key, _, spec in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = []
    for n, line in enumerate(cells):
        lines.append("  ".join(text.ljust(w) if i == 0 else text.rjust(w) for i, (text, w) in
                               enumerate(zip(line, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text, file=file or sys.stdout, flush=True)
    return text
