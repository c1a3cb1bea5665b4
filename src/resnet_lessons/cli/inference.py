"""``evaluate`` (accuracy and loss of a checkpoint on a split) and ``predict`` (the top classes of image
files): both run a trained model with the normalisation stored in its checkpoint."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from .common import (
    CommandError,
    add_checkpoint,
    add_data,
    add_device,
    add_skip_bad,
    load_checkpoint,
    print_json,
    recorded_data,
    recorded_image_size,
    source,
    whole,
)

if TYPE_CHECKING:
    from .common import Commands


# --- evaluate ------------------------------------------------------------------------------------


def add_evaluate(commands: Commands) -> None:
    p = commands.add_parser(
        "evaluate",
        help="accuracy and loss of a checkpoint on a data split",
        description="Evaluate CHECKPOINT on a split of SOURCE with the normalisation stored in the checkpoint. "
        "The validation split is carved exactly as in training (the checkpoint records how).",
    )
    add_checkpoint(p)
    add_data(p)
    p.add_argument("--split", metavar="NAME", help="train, val or test (default: test if there is one, else val)")
    p.add_argument("--json", action="store_true", help='print {"accuracy", "loss", "n", "per_class"} as JSON')
    p.add_argument("--batch-size", type=whole(1), default=500, metavar="B",
                   help="images per forward pass (default 500)")
    add_skip_bad(p)
    add_device(p)
    p.set_defaults(handler=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from .. import runtime
    from ..checkpoints import CheckpointError, ClassMismatch
    from ..evaluate import evaluate

    checkpoint = load_checkpoint(args.checkpoint)
    data_source = source(args.data)
    data, _ = recorded_data(checkpoint, data_source, skip_bad=args.skip_bad)
    split = args.split or ("test" if "test" in data.splits else "val")
    if split not in data.splits:
        raise CommandError(f"{data_source} has no split {split!r}; it has {', '.join(data.splits)}")
    try:
        checkpoint.check_classes(data.classes, what=data_source)
        device = runtime.pick_device(args.device)
        model = checkpoint.build_model(device)
    except (ClassMismatch, CheckpointError, RuntimeError) as error:
        raise CommandError(str(error)) from None
    images = data[split]
    result = evaluate(model, images.images, images.labels, classes=checkpoint.classes, mean=checkpoint.mean,
                      std=checkpoint.std, batch_size=args.batch_size, device=device)
    if args.json:
        print_json(result.as_dict())
    else:
        print(f"{args.checkpoint} on {data_source} [{split}]: accuracy {result.accuracy:.4f}, "
              f"loss {result.loss:.4f}, {result.n:,} images")
        for class_name, accuracy in result.per_class.items():
            print(f"  {class_name:>12}  {accuracy:.4f}")
    return 0


# --- predict -------------------------------------------------------------------------------------


def add_predict(commands: Commands) -> None:
    p = commands.add_parser(
        "predict",
        help="the top classes of image files",
        description="Classify image files with CHECKPOINT. A file that cannot be read gets its own error "
        "and the others are still predicted (exit code 1 if any failed).",
    )
    add_checkpoint(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--top-k", type=whole(1), default=3, metavar="K", help="classes to show per image (default 3)")
    p.add_argument("--json", action="store_true", help='print [{"file", "top": [{"class", "p"}], "error"}] as JSON')
    add_device(p)
    p.set_defaults(handler=run_predict)


def _unreadable(path: str, error: Exception) -> str:
    """The message for an image file that cannot be read, naming it as the user wrote it. ``read_image``
    wraps what Pillow or the OS raised in a ValueError (kept as its ``__context__``); that is the reason."""
    reason: BaseException = error
    if isinstance(error, ValueError) and error.__context__ is not None:
        reason = error.__context__
    text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
    return f"cannot read {path} as an image: {text}"


def run_predict(args: argparse.Namespace) -> int:
    import torch

    from .. import runtime
    from ..checkpoints import CheckpointError
    from ..data.images import read_image
    from ..evaluate import infer

    checkpoint = load_checkpoint(args.checkpoint)
    size = recorded_image_size(checkpoint)
    try:
        device = runtime.pick_device(args.device)
        model = checkpoint.build_model(device)
    except (CheckpointError, RuntimeError) as error:
        raise CommandError(str(error)) from None
    entries: list[dict[str, Any]] = []
    images, readable = [], []
    for path in args.images:
        entry: dict[str, Any] = {"file": path, "top": [], "error": None}
        try:
            images.append(read_image(path, size))
            readable.append(entry)
        except Exception as error:  # whatever the file holds, it gets its own message and the others go on
            entry["error"] = _unreadable(path, error)
        entries.append(entry)
    if images:
        logits = infer(model, torch.stack(images), mean=checkpoint.mean, std=checkpoint.std, device=device)
        probabilities = logits.softmax(dim=1)
        k = min(args.top_k, probabilities.shape[1])
        values, indices = probabilities.topk(k, dim=1)
        for entry, p_row, i_row in zip(readable, values.tolist(), indices.tolist()):
            entry["top"] = [{"class": checkpoint.classes[i], "p": p} for p, i in zip(p_row, i_row)]
    if args.json:
        print_json(entries)
    else:
        for entry in entries:
            if entry["error"]:  # on stderr: stdout holds only predictions
                print(f"{entry['file']}: error: {entry['error']}", file=sys.stderr)
            else:
                print(f"{entry['file']}: " + ", ".join(f"{t['class']} {t['p']:.3f}" for t in entry["top"]))
    return 1 if any(entry["error"] for entry in entries) else 0
