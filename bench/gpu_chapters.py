"""Execute chapters in a profile (the `gpu` one on a GPU) and record how long each took against its budget.

    python3 bench/gpu_chapters.py --data .device-data/cifar10-train-jpeg.zip          # on a GPU machine
    .venv/bin/python bench/gpu_chapters.py --profile smoke --data synthetic --chapter-seconds 10 \\
        --chapters 05_training --out /tmp/chapters.json                                  # the CPU test

Each chapter runs in a fresh Python process, cell by cell, through IPython's shell when IPython is installed
(magics and rich display work) and through plain ``exec`` otherwise (a GPU machine's image may lack
IPython; chapters that need it then fail and are recorded as failed, with the error). Nothing is faked: a
chapter counts as run only when every cell ran. The chapters run in the order given until the next one's budget
would no longer fit in ``--time-limit`` seconds. ``--chapter-seconds`` sets RESNET_LESSONS_CHAPTER_SECONDS for
them (the reference model's budget scales with it), so a machine check can run several chapters in minutes; the
JSON says which budget each chapter had. Writes bench/results/gpu_chapters.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import common

BOOK = common.ROOT / "book"
DEFAULT_CHAPTERS = ["05_training", "07_evaluation", "08_looking_inside", "03_residual_math"]
STARTUP_S = 30.0  # a fresh process's imports and data load, on top of the chapter's own budget


def run_cells(path: Path) -> None:
    """Run the code cells of the notebook at ``path`` in this process, top to bottom; raise on the first error."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    sources = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in cells]
    os.chdir(path.parent)  # as Jupyter Book and nbval run it
    try:
        from IPython.core.interactiveshell import InteractiveShell
    except ImportError:
        namespace: dict = {"__name__": "__main__", "display": print}
        for index, source in enumerate(sources):
            code = "\n".join("pass" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
            exec(compile(code, f"{path.name}, cell {index + 1}", "exec"), namespace)
        return
    shell = InteractiveShell.instance()
    for index, source in enumerate(sources):
        result = shell.run_cell(source, store_history=False)
        if not result.success:
            error = result.error_in_exec or result.error_before_exec
            raise RuntimeError(f"{path.name}, cell {index + 1}: {type(error).__name__}: {error}")


def run_chapter(name: str, env: dict[str, str], timeout: float) -> dict:
    """One chapter in a fresh process: its wall time with the process's start, the time its last cell measured
    (from its set-up cell, as in the book), and its error's last line if it failed."""
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--run-one", str(BOOK / f"{name}.ipynb")], env=env,
                              capture_output=True, text=True, timeout=timeout)
        ok, tail, stdout = done.returncode == 0, (done.stderr.strip().splitlines() or [""])[-1], done.stdout
    except subprocess.TimeoutExpired:
        ok, tail, stdout = False, f"stopped after {timeout:.0f} s", ""
    measured = re.search(r"This chapter ran in (\d+) s", stdout)
    return {"chapter": name, "process_seconds": round(time.perf_counter() - started, 1),
            "chapter_seconds": int(measured.group(1)) if measured else None, "ok": ok,
            "error": None if ok else tail[-300:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="gpu", choices=["smoke", "cpu", "gpu"])
    parser.add_argument("--data", default=None, help="RESNET_LESSONS_DATA for the chapters (default: the profile's)")
    parser.add_argument("--chapters", nargs="+", default=DEFAULT_CHAPTERS, metavar="NAME",
                        help="notebook names in book/, in the order to run them")
    parser.add_argument("--chapter-seconds", type=float, default=None,
                        help="each chapter's budget (default: the profile's)")
    parser.add_argument("--time-limit", type=float, default=float("inf"), help="seconds for all chapters together")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "gpu_chapters.json")
    parser.add_argument("--run-one", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        run_cells(args.run_one)
        return 0
    missing = [name for name in args.chapters if not (BOOK / f"{name}.ipynb").exists()]
    if missing:
        parser.error(f"no such chapter in book/: {', '.join(missing)}")
    if args.chapter_seconds is not None and not 0 < args.chapter_seconds < float("inf"):
        parser.error(f"--chapter-seconds must be a number of seconds above 0, got {args.chapter_seconds}")
    from resnet_lessons.profiles import get_profile

    budget = args.chapter_seconds or get_profile(args.profile).chapter_seconds
    env = {**os.environ, "RESNET_LESSONS_PROFILE": args.profile, "RESNET_LESSONS_CHAPTER_SECONDS": str(budget),
           "PYTHONPATH": os.pathsep.join([str(common.ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if args.data:
        env["RESNET_LESSONS_DATA"] = str(Path(args.data).resolve()) if Path(args.data).exists() else args.data
    started, runs, skipped = time.perf_counter(), [], []
    for name in args.chapters:
        left = args.time_limit - (time.perf_counter() - started)
        if left < budget + STARTUP_S:
            skipped.append(name)
            continue
        runs.append({**run_chapter(name, env, timeout=min(left, 2 * budget + STARTUP_S)), "budget_s": budget})
        run = runs[-1]
        print(f"{name}: {run['chapter_seconds']} s of its {budget:.0f} s budget ({run['process_seconds']:.0f} s with "
              f"the process's start), {'ok' if run['ok'] else run['error']}", flush=True)
    result = {**common.record(__file__, argv), "profile": args.profile, "data": env.get("RESNET_LESSONS_DATA"),
              "chapter_budget_s": budget, "chapters": runs, "skipped_for_time": skipped}
    common.write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0 if runs and all(run["ok"] for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
