"""Images per second: DeviceLoader against the torchvision DataLoader (PIL transforms), same images.

    .venv/bin/python bench/loader.py [--images 10000] [--batch-size 512] [--device cpu] [--threads N]

Both pipelines do the same training augmentation (random crop with 4 pixels of reflect padding,
horizontal flip) and normalisation on the same images: the shared JPEG copy of CIFAR-10 when it is
at ../shared/data/cifar10-train-jpeg.zip, else the synthetic stand-in. One run of each, side by side;
the DataLoader is timed over one epoch (worker start-up included, as a training epoch pays it), the
fast loader over as many epochs as fill --min-seconds (its set-up, done once per run, is reported
apart). Prints a table and writes bench/results/loader.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common
import torch

from resnet_lessons.data import Augment, DeviceLoader, ImageSet, load, torchvision_loader

GOAL = {"vs_w0": 20.0, "vs_w2": 5.0}


def time_dataloader(images: ImageSet, batch_size: int, mean, std, workers: int) -> float:
    loader = torchvision_loader(images, batch_size, mean, std, train=True, num_workers=workers)
    seen, start = 0, time.perf_counter()
    for _x, y in loader:
        seen += y.numel()
    return seen / (time.perf_counter() - start)


def time_fast(images: ImageSet, batch_size: int, mean, std, device: torch.device, min_seconds: float):
    start = time.perf_counter()
    loader = DeviceLoader(images.images, images.labels, batch_size=batch_size, mean=mean, std=std,
                          device=device, train=True, augment=Augment())
    setup = time.perf_counter() - start
    seen, epochs, start = 0, 0, time.perf_counter()
    while epochs == 0 or time.perf_counter() - start < min_seconds:
        for _x, y in loader:
            seen += y.numel()
        epochs += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - start), setup, epochs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000, help="training images in the benchmark")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--device", default="cpu", help="device of the fast loader (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="time the fast loader at least this long")
    parser.add_argument("--data", default=None,
                        help="image source (default: the shared JPEG zip if here, else synthetic)")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "loader.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    source = args.data or str(common.shared_zip() or "synthetic")
    start = time.perf_counter()
    data = load(source, val_per_class=0, synthetic_per_class=max(1, args.images // 10))  # speed only: no val split
    load_s = time.perf_counter() - start
    train = data.train
    images = train.subset(torch.arange(min(args.images, len(train))))
    n, bs = len(images), args.batch_size
    print(f"{n:,} images of {source} (load: {load_s:.2f} s), batch {bs}, torch threads {torch.get_num_threads()}")

    w0 = time_dataloader(images, bs, data.mean, data.std, workers=0)
    w2 = time_dataloader(images, bs, data.mean, data.std, workers=2)
    fast, setup_s, epochs = time_fast(images, bs, data.mean, data.std, device, args.min_seconds)

    rows = [("torchvision DataLoader, num_workers=0", w0), ("torchvision DataLoader, num_workers=2", w2),
            (f"DeviceLoader on {device} ({epochs} epochs)", fast)]
    print(f"\n{'pipeline':<42}{'images/s':>12}{'vs w0':>8}")
    for name, rate in rows:
        print(f"{name:<42}{rate:>12,.0f}{rate / w0:>7.1f}x")
    print(f"DeviceLoader set-up (padding and mirrored copy, once): {setup_s:.3f} s")
    met = fast / w0 >= GOAL["vs_w0"] and fast / w2 >= GOAL["vs_w2"]
    print(f"goal {GOAL['vs_w0']:.0f}x vs w0 and {GOAL['vs_w2']:.0f}x vs w2: {'met' if met else 'NOT met'} "
          f"({fast / w0:.1f}x, {fast / w2:.1f}x)")

    result = {
        "fast_images_per_s": round(fast, 1),
        "dataloader_w0_images_per_s": round(w0, 1),
        "dataloader_w2_images_per_s": round(w2, 1),
        "speedup_vs_w0": round(fast / w0, 2),
        "speedup_vs_w2": round(fast / w2, 2),
        "goal": GOAL,
        "goal_met": met,
        "fast_setup_s": round(setup_s, 4),
        "fast_epochs_timed": epochs,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "images": n,
        "image_size": list(images.image_size),
        "batch_size": bs,
        "augment": "random crop 32 (reflect padding 4), horizontal flip, normalise",
        "source": "shared JPEG copy of CIFAR-10 (train split)" if source != "synthetic" else "synthetic",
        "load_s": round(load_s, 3),
        "torch_threads": torch.get_num_threads(),
        **common.record(__file__, argv),  # hardware, versions, date, command
    }
    print(f"wrote {common.write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
