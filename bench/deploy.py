"""Deployment benchmark: accuracy, weight size and single-image CPU latency of one network as PyTorch fp32,
TorchScript, ONNX Runtime, int8 (dynamic and static), pruned, and pruned + int8.

    python bench/deploy.py                      # trains the profile's recipe first (RESNET_LESSONS_PROFILE)
    python bench/deploy.py --checkpoint model.pt --data cifar10 --repeats 200 --threads 1

Prints the table and writes bench/results/deploy.json with the hardware, the versions and the date.
Latency is the median of ``--repeats`` forward passes of one image; close other programs first, and compare
rows of one run rather than runs on different days.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import common
import torch

from resnet_lessons import checkpoints, compress, export, runtime, train
from resnet_lessons.data import DataUnavailable, load
from resnet_lessons.models import build_model
from resnet_lessons.profiles import from_env

RESULTS = common.RESULTS / "deploy.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a model.pt to measure (default: train the profile's recipe)")
    parser.add_argument("--data", help="data source for accuracy and calibration (default: the profile's)")
    parser.add_argument("--images", type=int, default=1000, help="held-out images for accuracy (1000)")
    parser.add_argument("--repeats", type=int, default=100, help="timed forward passes per variant (100)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the latency (1)")
    parser.add_argument("--prune", type=float, default=0.5, help="share of weights pruned (0.5)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    args = parser.parse_args(argv)

    settings = from_env()
    profile = settings.profile
    runtime.cpu_threads()
    saved = checkpoints.load(args.checkpoint) if args.checkpoint else None
    recorded = dict(saved.extra.get("data") or {}) if saved else {}
    source = args.data or recorded.get("source") or settings.source
    try:
        data = load(source, val_per_class=recorded.get("val_per_class", profile.val_per_class),
                    train_per_class=recorded.get("train_per_class", profile.train_per_class),
                    synthetic_per_class=recorded.get("synthetic_per_class", profile.synthetic_per_class),
                    seed=recorded.get("seed", profile.seed), image_size=recorded.get("image_size", 32))
    except DataUnavailable as error:
        print(f"{source} unavailable ({error}); using the synthetic stand-in", file=sys.stderr)
        source = "synthetic"
        data = load(source, val_per_class=profile.val_per_class, synthetic_per_class=profile.synthetic_per_class,
                    seed=profile.seed)

    if saved is not None:
        model, model_name = saved.build_model("cpu"), saved.model_name
        card = export.ModelCard.from_checkpoint(saved, data.train.image_size)
    else:
        runtime.seed_everything(profile.seed)
        model_name = profile.model
        model = build_model(model_name, num_classes=len(data.classes), **profile.model_options)
        print(f"training {model_name} ({profile.name} profile) on {source}", file=sys.stderr)
        train.fit(model, data, train.config_from_profile(profile), device=runtime.pick_device(),
                  options=train.RunOptions(quiet=True))
        model = model.cpu().eval()
        card = export.ModelCard(model_name=model_name, model_options=dict(profile.model_options),
                                classes=data.classes, mean=data.mean, std=data.std,
                                input_size=(3, *data.train.image_size))

    held_out = data["test"] if "test" in data.splits else data.val
    images, labels = held_out.images[: args.images], held_out.labels[: args.images]
    mean, std = card.mean, card.std
    with tempfile.TemporaryDirectory() as folder:
        variants: dict[str, object] = {"PyTorch fp32": model}
        for format, name in (("torchscript", "model.pt"), ("onnx", "model.onnx")):
            result = export.export_model(model, Path(folder) / name, format=format, card=card, images=images[:256])
            variants["TorchScript" if format == "torchscript" else "ONNX Runtime"] = export.load_exported(
                result.path, threads=args.threads)
        variants["int8 dynamic (Linear only)"] = compress.quantize_dynamic(model)
        variants["int8 static"] = compress.quantize_static(model, data.train.images, mean=mean, std=std)
        pruned = compress.prune_global(model, args.prune)
        variants[f"pruned {args.prune:.0%}"] = pruned
        variants[f"pruned {args.prune:.0%} + int8 static"] = compress.quantize_static(
            pruned, data.train.images, mean=mean, std=std)
        table = compress.compare_variants(variants, images, labels, mean=mean, std=std,
                                          latency_repeats=args.repeats, threads=args.threads)

    print(table.round(3).to_string())
    report = {
        "benchmark": "deploy",
        **common.record(__file__, argv),
        "onnx_versions": {name: __import__(name).__version__ for name in ("onnx", "onnxruntime")},
        "settings": {"profile": profile.name, "model": model_name, "data": source, "images": len(images),
                     "repeats": args.repeats, "threads": args.threads, "checkpoint": args.checkpoint,
                     "quantization_engine": torch.backends.quantized.engine},
        "rows": json.loads(table.reset_index().to_json(orient="records")),
    }
    common.write_json(args.out, report)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
