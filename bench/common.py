"""What every benchmark script shares: the record of where and when it ran, JSON writing, table printing.

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
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED_ZIP_NAME = Path("shared") / "data" / "cifar10-train-jpeg.zip"
SHARED_ZIP = ROOT.parent / SHARED_ZIP_NAME  # the shared JPEG copy of CIFAR-10's training split, if present


def shared_zip() -> Path | None:
    """The shared JPEG zip next to the repository or inside it (the device machine's copy), or None."""
    for path in (SHARED_ZIP, ROOT / SHARED_ZIP_NAME):
        if path.is_file():
            return path
    return None


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
