"""``data``: load a data source as the library does and summarise it (splits, images per class, image
size, class names in label order), as a table or as JSON."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .common import SOURCE_HELP, add_skip_bad, load_data, print_json, whole

if TYPE_CHECKING:
    from ..data import DataSplits
    from .common import Commands


def add_data_command(commands: Commands) -> None:
    p = commands.add_parser(
        "data",
        help="summarise a data source: splits, images per class, image size, classes",
        description="Load a data source as the library does (val carved out of train where the source has "
        "none) and summarise it: splits, images per class in each split, image size, class names in label "
        "order. The first load of an image folder or zip decodes and caches it; later loads are quick.",
    )
    p.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("--json", action="store_true", help="print JSON: classes, image_size, splits")
    p.add_argument("--image-size", type=whole(8), default=32, metavar="PX", help="side of the square images (32)")
    p.add_argument("--val-per-class", type=whole(0), default=500, metavar="N",
                   help="validation images per class carved out of train when the source has no val (500)")
    p.add_argument("--synthetic-per-class", type=whole(1), default=2000, metavar="N",
                   help="training images per class of the synthetic source (2000)")
    p.add_argument("--seed", type=int, default=0, metavar="K", help="seed of the train/val split (0)")
    p.add_argument("--cache-dir", metavar="DIR", help="data cache (default ~/.cache/resnet_lessons)")
    p.add_argument("--no-download", action="store_true", help="never download CIFAR-10")
    add_skip_bad(p)
    p.set_defaults(handler=run_data)


def run_data(args: argparse.Namespace) -> int:
    sizes = {"val_per_class": args.val_per_class, "synthetic_per_class": args.synthetic_per_class}
    d = load_data(args.source, sizes, args.seed, args.image_size, skip_bad=args.skip_bad, cache_dir=args.cache_dir,
                  download=not args.no_download)
    if args.json:
        print_json({
            "classes": list(d.classes),
            "image_size": list(d.train.image_size),
            "splits": {name: {"n": len(s), "per_class": s.counts()} for name, s in d.splits.items()},
        })
    else:
        _print_table(d)
    return 0


def _print_table(d: DataSplits) -> None:
    height, width = d.train.image_size
    print(f"source      {d.source}")
    print(f"image size  {height} x {width} (RGB)")
    print(f"classes     {len(d.classes)}: {', '.join(d.classes)}")
    names = list(d.splits)
    width_name = max(len(c) for c in d.classes + ("class", "total"))
    print(f"\n{'class':<{width_name}}" + "".join(f"{n:>9}" for n in names))
    for c in d.classes:
        print(f"{c:<{width_name}}" + "".join(f"{d.splits[n].counts()[c]:>9,}" for n in names))
    print(f"{'total':<{width_name}}" + "".join(f"{len(d.splits[n]):>9,}" for n in names))
    print(f"\nmean (train) {tuple(round(m, 4) for m in d.mean)}  std {tuple(round(s, 4) for s in d.std)}")
    for note in d.notes:
        print(f"note: {note}")
