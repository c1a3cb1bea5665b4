"""Training throughput (images/s) and peak memory per model, with each speed feature on and off, in one run.

    .venv/bin/python bench/throughput.py                 # the full run on this machine's device
    .venv/bin/python bench/throughput.py --no-compile    # without torch.compile (slow to compile on a CPU)
    .venv/bin/python bench/throughput.py --smoke --out /tmp/t.json   # seconds: the test's configuration

Models: resnet8, resnet20, resnet56, ResNet-18 with the CIFAR stem (at a quarter of its width on the CPU, full
width on a GPU: ``--resnet18-width``) and ResNet-9 at half width (the cpu profile's network). For each model,
one speed feature at a time against the plain baseline (fp32, NCHW, eager): channels_last, bf16 autocast, fp16
autocast (GPU only), torch.compile, and all that help together (channels_last + bf16, with and without
torch.compile, also on a CPU with bf16 in hardware). For one model (``--focus``: resnet9 on the CPU, resnet18
on a GPU): batch sizes 64/128/256/512, the torchvision DataLoader (0 and 2 workers) instead of the
DeviceLoader feeding the same model, and torch's CPU thread count (CPU only). Each configuration runs in a
fresh process, so peak memory is its own (CUDA ``max_memory_allocated``; on the CPU the peak resident set from
``getrusage``) and no setting leaks into the next. Each times ``--steps`` steps after ``--warmup`` steps
(compiling happens in the warm-up, reported apart). Prints a table and writes bench/results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import common
import torch

from resnet_lessons import runtime

FEATURES = {  # setting -> (channels_last, precision, compile)
    "baseline": (False, "fp32", False),
    "channels_last": (True, "fp32", False),
    "bf16": (False, "bf16", False),
    "fp16": (False, "fp16", False),
    "channels_last+bf16": (True, "bf16", False),
    "compile": (False, "fp32", True),
    "channels_last+bf16+compile": (True, "bf16", True),
}
MODELS = ("resnet8", "resnet20", "resnet56", "resnet18", "resnet9")
TIMEOUT_S = 900  # one configuration; a hung one is recorded as failed


def model_options(name: str, resnet18_width: float) -> dict:
    if name == "resnet9":
        return {"width": 0.5}  # the cpu profile's network
    return {"stem": "cifar", "width": resnet18_width} if name == "resnet18" else {}


def plan(args: argparse.Namespace, device: torch.device, threads: int) -> list[dict]:
    """Every configuration of the run, each with the id of the row it is compared against."""
    cuda = device.type == "cuda"
    fast_bf16 = runtime.native_bf16(device)  # bf16 in hardware: Ampere+ GPUs, CPUs with AVX512-BF16 or AMX
    features = ["baseline", "channels_last", "bf16"] + (["fp16"] if cuda else [])
    features += ["channels_last+bf16"] if cuda or fast_bf16 else []
    if args.compile:
        features += ["compile"] + (["channels_last+bf16+compile"] if cuda or fast_bf16 else [])
    if args.features:
        features = [f for f in args.features if args.compile or not FEATURES[f][2]]
    sweep_base = "channels_last+bf16" if cuda or fast_bf16 else "baseline"  # the sweeps vary one thing from here
    rows = []

    def add(model, group, setting, compare_to, **overrides):
        channels_last, precision, compiled = FEATURES[overrides.pop("feature", "baseline")]
        config = {"model": model, "model_options": model_options(model, args.resnet18_width),
                  "batch_size": args.batch_size, "channels_last": channels_last, "precision": precision,
                  "compile": compiled, "loader": "device", "num_workers": 0, "threads": threads,
                  "steps": args.steps, "warmup": args.warmup, "device": str(device)}
        config.update(overrides)
        rows.append({"id": f"{model}/{group}/{setting}", "group": group, "setting": setting,
                     "compare_to": compare_to, "config": config})

    for model in args.models:
        for feature in features:
            add(model, "feature", feature, f"{model}/feature/baseline", feature=feature)
    focus, base = args.focus, f"{args.focus}/feature/{sweep_base}"
    if focus not in args.models:
        add(focus, "feature", sweep_base, base, feature=sweep_base)
    for batch_size in args.batch_sizes:
        if batch_size != args.batch_size:
            add(focus, "batch_size", f"batch {batch_size}", base, feature=sweep_base, batch_size=batch_size)
    for workers in args.workers:
        add(focus, "loader", f"DataLoader, {workers} workers", base, feature=sweep_base, loader="dataloader",
            num_workers=workers)
    if not cuda:
        for n in args.threads:
            if n != threads:
                add(focus, "threads", f"{n} thread{'s' if n > 1 else ''}", base, feature=sweep_base, threads=n)
    return rows


def run_one(config: dict) -> dict:
    """Measure one configuration in this process (the worker's side)."""
    from resnet_lessons import speed
    from resnet_lessons.models import build_model, count_flops

    torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    runtime.seed_everything(0)
    model = build_model(config["model"], **config["model_options"])
    flops = count_flops(model)
    before, _ = speed.peak_memory_mib(device)  # CPU: the process after imports (torch alone is hundreds of MiB)
    result = speed.measure_throughput(
        model, config["batch_size"], config["steps"], device, channels_last=config["channels_last"],
        precision=config["precision"], compile=config["compile"], warmup=config["warmup"],
        loader=config["loader"], num_workers=config["num_workers"],
    )
    # forward + backward ~ 3 forward passes: the arithmetic rate the step achieved
    result["gflops_per_s"] = 3 * flops * result["images_per_s"] / 1e9
    result["forward_mflops_per_image"] = flops / 1e6
    if device.type != "cuda" and before is not None and result["peak_memory_mib"] is not None:
        result["memory_before_mib"] = before
        result["training_memory_mib"] = result["peak_memory_mib"] - before
    return result


def run_isolated(config: dict) -> dict:
    """Measure one configuration in a fresh Python process; a failure becomes a row with its error."""
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(config)], capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {TIMEOUT_S} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"status": "failed", "error": " | ".join(tail) or f"exit status {done.returncode}"}
    return {"status": "ok", **json.loads(lines[-1]), "process_s": time.perf_counter() - started}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--features", nargs="+", default=None, choices=list(FEATURES),
                        help="the settings measured per model (default: all that apply to the device)")
    parser.add_argument("--focus", default=None, choices=MODELS,
                        help="the model of the batch, loader and thread sweeps (resnet9 on a CPU, resnet18 on a GPU)")
    parser.add_argument("--resnet18-width", type=float, default=None,
                        help="width multiplier of ResNet-18 (default: 0.25 on a CPU, 1 on a GPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch of the feature rows (128 CPU, 512 GPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[64, 128, 256, 512])
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 2], help="DataLoader num_workers to compare")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2], help="CPU thread counts to compare")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (5 CPU, 30 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (2 CPU, 5 GPU)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="leave torch.compile out")
    parser.add_argument("--in-process", action="store_true",
                        help="measure in this process (faster; CPU peak memory is then the process's so far)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: resnet8, batch 32, 1 step, no compile, in this process (the test)")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "throughput.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_one(json.loads(args.worker))))
        return 0

    device = runtime.pick_device(args.device or ("cpu" if args.smoke else None))
    cuda = device.type == "cuda"
    if args.smoke:
        args.models, args.focus, args.resnet18_width, args.batch_size = ["resnet8"], "resnet8", 0.25, 32
        args.batch_sizes, args.workers, args.threads, args.steps, args.warmup = [16], [0], [1], 1, 1
        args.compile, args.in_process = False, True
    args.focus = args.focus or ("resnet18" if cuda else "resnet9")
    args.resnet18_width = args.resnet18_width or (1.0 if cuda else 0.25)
    args.batch_size = args.batch_size or (512 if cuda else 128)
    args.steps = args.steps or (30 if cuda else 5)
    args.warmup = args.warmup or (5 if cuda else 2)
    threads = runtime.cpu_threads()  # all the cores this process may use
    described, load_at_start = runtime.describe_device(device), common.hardware()["load_average"]
    rows = plan(args, device, threads)
    print(f"{len(rows)} configurations on {described}, {args.warmup} warm-up + "
          f"{args.steps} timed steps each, {'in this process' if args.in_process else 'one process each'}",
          flush=True)
    started = time.perf_counter()
    for row in rows:
        if args.in_process:
            try:
                row.update(status="ok", **run_one(row["config"]))
            except Exception as error:  # noqa: BLE001 - a failed configuration is a result too
                row.update(status="failed", error=f"{type(error).__name__}: {error}")
            torch.set_num_threads(threads)
        else:
            row.update(run_isolated(row["config"]))
        rate = row.get("images_per_s")
        print(f"  {row['id']:<52} " + (f"{rate:10,.0f} images/s" if rate else row.get("error", "")), flush=True)
    peaks = common.machine_peaks(device, min_seconds=0.2 if args.smoke else 1.0)
    by_id = {row["id"]: row for row in rows}
    for row in rows:
        peak = peaks.get(f"conv3x3_{row['config']['precision']}_gflops")  # fp16 rows: no measured peak
        row["of_conv_peak"] = row["gflops_per_s"] / peak if row.get("gflops_per_s") and peak else None
        base = by_id.get(row["compare_to"], {}).get("images_per_s")
        row["speedup"] = row["images_per_s"] / base if row.get("images_per_s") and base else None
        row.update(model=row["config"]["model"], batch_size=row["config"]["batch_size"])

    print()
    common.print_table(rows, [("id", "configuration", ""), ("images_per_s", "images/s", ",.0f"),
                              ("speedup", "x base", ".2f"), ("step_ms", "step ms", ".1f"),
                              ("warmup_s", "warm-up s", ".1f"), ("peak_memory_mib", "peak MiB", ",.0f"),
                              ("gflops_per_s", "GFLOP/s", ",.1f"), ("of_conv_peak", "of conv peak", ".0%")])
    print("machine peaks (GFLOP/s; a 3x3 convolution of ResNet-9's middle, a 2048^2 matrix product): "
          + ", ".join(f"{k.removesuffix('_gflops')} {v:,.0f}" for k, v in peaks.items()))
    failed = [row["id"] for row in rows if row["status"] != "ok"]
    result = {
        "benchmark": "throughput",
        "device": described,
        "smoke": args.smoke,
        "settings": {"steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size,
                     "focus": args.focus, "resnet18_width": args.resnet18_width, "compile": args.compile,
                     "isolated": not args.in_process, "threads": threads, "load_average_at_start": load_at_start,
                     "memory": "cuda max_memory_allocated" if cuda else "process peak RSS (getrusage)",
                     "images": "random uint8 32x32 (throughput does not depend on the pixels)"},
        "results": rows,
        "machine_peaks_gflops": peaks,  # of_conv_peak: a row's GFLOP/s over the conv peak of its precision
        "failed": failed,
        "seconds": round(time.perf_counter() - started, 1),
        **common.record(__file__, argv),
    }
    out = common.write_json(args.out, result)
    print(f"\n{len(rows) - len(failed)} of {len(rows)} configurations measured in {result['seconds']:.0f} s; "
          f"wrote {out}")
    return 1 if failed and len(failed) == len(rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
