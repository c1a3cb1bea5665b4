"""``export``: a checkpoint to ONNX or TorchScript with its model card, written only once the exported file,
run on images, gives the logits PyTorch gives."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .common import (
    SOURCE_HELP,
    CommandError,
    add_checkpoint,
    add_force,
    add_skip_bad,
    load_checkpoint,
    positive,
    recorded_data,
    recorded_image_size,
    source,
    whole,
)

if TYPE_CHECKING:
    from .common import Commands


def add_export(commands: Commands) -> None:
    p = commands.add_parser(
        "export",
        help="export a checkpoint to ONNX or TorchScript, verified by running the exported file",
        description="Write FILE (ONNX or TorchScript) and FILE.json, its model card: class names, normalisation "
        "(mean, std), input size, model name and versions (the card is also stored inside FILE). The export is "
        "loaded back and run (ONNX through onnxruntime) on images and its logits compared with PyTorch's; "
        "FILE is written only when they match. An existing FILE or FILE.json is replaced only with --force, "
        "and the checkpoint itself never.",
    )
    add_checkpoint(p, "a model.pt or checkpoint.pt written by resnet-lessons")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"), help="onnx or torchscript")
    p.add_argument("--out", required=True, metavar="FILE", help="the exported file (FILE.json is written beside it)")
    p.add_argument("--data", metavar="SOURCE", help=f"verify on validation images of SOURCE ({SOURCE_HELP}), split "
                   "as the checkpoint records; default: random images")
    p.add_argument("--verify-images", type=whole(1), default=256, metavar="N", help="images to verify on (256)")
    p.add_argument("--tolerance", type=positive, default=1e-3, metavar="T",
                   help="largest |logit difference| accepted (1e-3)")
    add_force(p, "an existing FILE and FILE.json")
    add_skip_bad(p)
    p.set_defaults(handler=run_export)


def _same_file(a: Path, b: Path) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.abspath(a) == os.path.abspath(b)


def _check_export_target(out: Path, checkpoint: Path, *, force: bool) -> None:
    """Never the checkpoint being exported; an existing file only with --force."""
    from ..export import sidecar_path

    targets = (out, sidecar_path(out))
    for target in targets:
        if _same_file(target, checkpoint):
            raise CommandError(f"--out {out} would overwrite the checkpoint {checkpoint} being exported "
                               f"(the export writes {out} and {sidecar_path(out)}); choose another --out")
    existing = [str(t) for t in targets if os.path.lexists(t)]
    if existing and not force:
        raise CommandError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; pass --force "
                           "to replace, or choose another --out")


def run_export(args: argparse.Namespace) -> int:
    import torch

    from .._files import WriteError
    from ..checkpoints import CheckpointError
    from ..export import ExportError, ModelCard, export_model

    out = Path(args.out).expanduser()
    if out.is_dir():
        raise CommandError(f"--out {out} is a folder; give a file name such as {out / 'model.onnx'}")
    _check_export_target(out, Path(args.checkpoint).expanduser(), force=args.force)
    checkpoint = load_checkpoint(args.checkpoint)
    size = recorded_image_size(checkpoint)
    if args.data:
        data_source = source(args.data)
        data, size = recorded_data(checkpoint, data_source, skip_bad=args.skip_bad)
        split = "val" if "val" in data.splits else next(iter(data.splits))
        images, inputs = data[split].images[: args.verify_images], f"{data_source} {split} images"
    else:
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (args.verify_images, 3, size, size), dtype=torch.uint8, generator=generator)
        inputs = "random images (pass --data to verify on real ones)"
    try:
        model = checkpoint.build_model("cpu")
        result = export_model(model, out, format=args.format, card=ModelCard.from_checkpoint(checkpoint, size),
                              images=images, tolerance=args.tolerance, inputs=inputs)
    except (CheckpointError, ExportError, ValueError) as error:
        raise CommandError(str(error)) from None
    except OSError as error:
        raise CommandError(str(error) if isinstance(error, WriteError) else
                           f"cannot write {out}: {error.strerror or error}") from None
    engine = "onnxruntime" if args.format == "onnx" else "torch.jit"
    print(f"wrote {result.path} ({args.format}, {result.size_bytes / 1e6:.2f} MB) and {result.sidecar}")
    print(f"verified with {engine} on {result.comparison.summary()}")
    return 0
