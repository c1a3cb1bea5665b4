"""The ``resnet-lessons`` command line: a thin face over the library.

Exit codes: 0 success, 2 usage error (argparse, bad values included), 1 failure with a one-line message
(a traceback only with ``--debug``). Each subcommand registers itself with ``_add_<name>`` and runs in
``_run_<name>``. What it promises (README, "What the command line promises"): no file is overwritten
without ``--force``; one run per output folder (an OS lock); every file is written atomically and never
through a symbolic link; a failed run leaves no empty folder behind.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from . import __version__

TRAIN_FILES = ("model.pt", "checkpoint.pt", "history.csv", "metrics.json")  # what train writes into --out
FINETUNE_FILES = ("model.pt", "history.csv", "metrics.json")


class CommandError(Exception):
    """A failure the user can act on; printed as one line, exit code 1."""


def _print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


# --- argument types: a bad value is a usage error (exit code 2) ----------------------------------


def _whole(minimum: int) -> Callable[[str], int]:
    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return whole_number


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):  # nan and inf too
        raise argparse.ArgumentTypeError(f"must be a finite number more than 0, got {text}")
    return value


def _per_class(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number or 'all', got {text!r}")
    return int(text)


def _skip_bad_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-bad", action="store_true",
                   help="skip images that cannot be read (corrupt files, links outside the data folder) with a "
                   "warning naming them, instead of stopping")


def _force_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"replace {what} (never done without it)")


# --- subcommands -------------------------------------------------------------------------------
# Each _add_* function adds one subparser and sets ``handler`` to its _run_* function.


def _add_train(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "train",
        help="train a network from scratch (the profile's recipe unless told otherwise)",
        description="Train from scratch with the one training loop (SGD + Nesterov, one-cycle). Writes "
        "OUT/model.pt, OUT/history.csv and OUT/metrics.json, and OUT/checkpoint.pt after every epoch "
        "(resume it with --resume). Under torchrun each process trains on its shard; rank 0 writes. A run holds OUT "
        "with an OS lock (a second run there stops at once) and replaces an earlier run's files only with --force.",
    )
    p.add_argument("--data", required=True, metavar="SOURCE",
                   help="cifar10, synthetic, or a path to an image folder or .zip")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the model, history and metrics")
    p.add_argument("--model", metavar="NAME", help="a model name (see resnet_lessons.models); default: the profile's")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_whole(1), metavar="N", help="passes over the training split")
    length.add_argument("--budget-seconds", type=_positive, metavar="S",
                        help="wall-clock budget: the schedule is planned to end within S seconds")
    p.add_argument("--seed", type=int, metavar="K", help="seed for splits, initialisation and shuffling")
    p.add_argument("--profile", metavar="P", help="smoke, cpu or gpu (default: RESNET_LESSONS_PROFILE, else by hardware)")
    p.add_argument("--train-per-class", type=_per_class, metavar="N|all",
                   help="training images kept per class (default: all of them, in every profile)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (it must be there)")
    _force_flag(p, "an earlier run's files in OUT")
    _skip_bad_flag(p)
    p.add_argument("--device", metavar="DEVICE", help="cpu, cuda, cuda:1, mps (default: the best available)")
    p.set_defaults(handler=_run_train)


def _source(text: str) -> str:
    from .profiles import SettingsError, check_source

    try:
        return check_source(text)
    except SettingsError as error:
        raise CommandError(str(error)) from None


def _train_settings(args: argparse.Namespace):  # -> (Profile, source)
    """The profile (--profile, else RESNET_LESSONS_PROFILE, else by hardware) and the --data source; the
    command line uses all the data unless --train-per-class says otherwise (the chapters' subsets are theirs)."""
    from .profiles import SettingsError, get_profile, profile_from_env

    try:
        if args.profile:
            profile = get_profile(args.profile)
        else:  # --data is required: RESNET_LESSONS_DATA is neither needed, nor read, nor checked
            profile = profile_from_env()
    except SettingsError as error:
        raise CommandError(str(error)) from None
    return replace(profile, train_per_class=getattr(args, "train_per_class", None)), _source(args.data)


def _load_data(source: str, profile, seed: int, image_size: int = 32, *, skip_bad: bool = False,
               require_train: bool = True):  # -> DataSplits
    from .data import DataError, DataUnavailable, load

    try:
        return load(source, image_size=image_size, val_per_class=profile.val_per_class,
                    train_per_class=profile.train_per_class, synthetic_per_class=profile.synthetic_per_class,
                    seed=seed, skip_bad=skip_bad, require_train=require_train)
    except (DataUnavailable, DataError) as error:  # never a silent fallback to synthetic here
        raise CommandError(str(error)) from None


def _recorded_data(checkpoint, source: str, *, skip_bad: bool = False):  # -> (DataSplits, image_size)
    """``source`` split the way the checkpoint's training run split it (sizes, seed, image size). The
    source needs no train split: evaluating uses the checkpoint's own normalisation."""
    from .profiles import get_profile

    recorded = dict(checkpoint.extra.get("data") or {})
    smoke = get_profile("smoke")
    sizes = SimpleNamespace(
        val_per_class=recorded.get("val_per_class", smoke.val_per_class if source == "synthetic" else 500),
        train_per_class=recorded.get("train_per_class"),
        synthetic_per_class=recorded.get("synthetic_per_class", smoke.synthetic_per_class),
    )
    size = int(recorded.get("image_size", 32))
    data = _load_data(source, sizes, recorded.get("seed", 0), image_size=size, skip_bad=skip_bad, require_train=False)
    return data, size


def _run_train(args: argparse.Namespace) -> int:
    from . import distributed

    profile, source = _train_settings(args)
    out = _out_folder(args.out, resume=args.resume)
    world = distributed.setup(args.device)
    try:
        with ExitStack() as stack:
            if world.is_main:  # under torchrun rank 0 holds the folder and writes; the others only train
                _hold(stack, out, TRAIN_FILES)
                _check_run_folder(out, TRAIN_FILES, resume=args.resume, force=args.force)
            _train(args, profile, source, out, world)
        distributed.barrier()
    finally:
        distributed.cleanup()
    return 0


def _train(args: argparse.Namespace, profile, source: str, out: Path, world) -> None:
    """Train and write the run into ``out`` (which the caller holds)."""
    from . import runtime
    from .models import build_model
    from .train import config_from_profile, fit

    seed = profile.seed if args.seed is None else args.seed
    overrides: dict = {"seed": seed}
    if args.model and args.model != profile.model:
        overrides.update(model=args.model, model_options={})
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.budget_seconds is not None:
        overrides["budget_seconds"] = args.budget_seconds
    cfg = config_from_profile(profile, **overrides)
    if world.device.type == "cpu" and not world.distributed:
        runtime.cpu_threads()
    data = _load_data(source, profile, seed, skip_bad=args.skip_bad)
    if args.resume and world.is_main:
        _check_resume_data(out, data.classes)
    runtime.seed_everything(seed)
    try:
        model = build_model(cfg.model, num_classes=len(data.classes), **cfg.model_options)
    except (KeyError, ValueError, TypeError) as error:
        raise CommandError(str(error).strip("'\"")) from None
    if world.is_main:
        kept = "" if profile.train_per_class is None else f": {profile.train_per_class} per class"
        print(f"training {cfg.model} on {source} ({len(data.train):,} images{kept}, {profile.name} profile) on "
              f"{runtime.describe_device(world.device)} x{world.world_size}", file=sys.stderr)
    result = fit(model, data, cfg, device=world.device, checkpoint_dir=out, resume=args.resume)
    if world.is_main:
        metrics = _train_metrics(result, data, cfg, profile, source, world)
        _write_run(out, model, data, result, cfg, metrics, source=source, profile=profile, seed=seed)


def _train_metrics(result, data, cfg, profile, source: str, world) -> dict:
    import math

    import torch

    from . import __version__

    last = result.final
    clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731 (JSON has no NaN)
    return {
        "val_accuracy": clean(last.get("val_accuracy")),
        "val_loss": clean(last.get("val_loss")),
        "train_loss": clean(last.get("train_loss")),
        "best_epoch": result.best_epoch,
        "epochs": int(last.get("epoch", 0)),
        "steps": result.steps,
        "images_seen": result.images_seen,
        "seconds": result.seconds,
        "stopped": result.stopped,
        "model": cfg.model,
        "model_options": cfg.model_options,
        "profile": profile.name,
        "data": source,
        "notes": list(data.notes),
        "world_size": world.world_size,
        "device": str(world.device),
        "library_version": __version__,
        "torch_version": str(torch.__version__),
    }


def _out_folder(arg: str, *, resume: bool = False) -> Path:
    """The --out folder of train and finetune, checked before anything is created: not a file, and there
    when resuming."""
    out = Path(arg).expanduser()
    if os.path.lexists(out) and not out.is_dir():
        raise CommandError(f"--out {out} is a file, not a folder")
    if resume and not out.exists():
        raise CommandError(f"nothing to resume: {out} does not exist; run without --resume to start a new run")
    return out


def _hold(stack: ExitStack, out: Path, names: Sequence[str]) -> None:
    """Create ``out`` if needed and hold its lock until ``stack`` closes (removing the folder again if the
    run fails before writing anything); a second run on the same folder stops here, naming the first.
    Temporaries of ``names`` that a killed run left are removed."""
    from ._files import FolderInUse, run_folder

    try:
        stack.enter_context(run_folder(out, names))
    except (FolderInUse, OSError) as error:
        raise CommandError(str(error)) from None


def _check_run_folder(out: Path, names: Sequence[str], *, resume: bool | None, force: bool) -> None:
    """Under the folder's lock: refuse to overwrite an earlier run's files (``names``) without --force, and
    to resume without a checkpoint. ``resume=None``: the command cannot resume (finetune)."""
    from .train import CHECKPOINT_NAME

    present = [name for name in names if os.path.lexists(out / name)]
    if resume:
        if CHECKPOINT_NAME not in present:
            held = f"it holds {', '.join(present)}" if present else "it holds no run"
            replace_it = " (and --force to replace it)" if present else ""
            raise CommandError(f"nothing to resume in {out}: there is no {CHECKPOINT_NAME} ({held}); run "
                               f"without --resume to start a new run{replace_it}")
        if "model.pt" in present and not force:
            raise CommandError(f"{out} holds a finished run (model.pt); resuming would replace it: pass --force "
                               "as well to do so, or choose another --out")
        return
    if present and not force:
        unfinished = resume is not None and CHECKPOINT_NAME in present and "model.pt" not in present
        advice = "--resume to continue it, " if unfinished else ""
        raise CommandError(f"{out} already holds {', '.join(present)}; pass {advice}--force to replace it, "
                           "or choose another --out")
    if CHECKPOINT_NAME in present and resume is not None:  # --force: the new run must not resume the old one
        (out / CHECKPOINT_NAME).unlink()


def _check_resume_data(out: Path, classes: Sequence[str]) -> None:
    """Resuming needs the data the run was trained on: the same classes, in the same order."""
    from .checkpoints import ClassMismatch
    from .train import CHECKPOINT_NAME

    saved = _load_checkpoint(out / CHECKPOINT_NAME)
    where = f"cannot resume {saved.path}"
    if len(saved.classes) != len(classes):
        raise CommandError(f"{where}: this run was trained on {len(saved.classes)} classes, the data has "
                           f"{len(classes)} ({list(saved.classes)} vs {list(classes)}); resume with the same "
                           "data, or start a new run in another folder")
    try:
        saved.check_classes(classes, what="the data")
    except ClassMismatch as error:
        raise CommandError(f"{where}: {error}") from None


def _write_run(out, model, data, result, cfg, metrics: dict, *, source: str, profile, seed: int) -> None:
    """OUT/model.pt (the model with how its data was loaded, its recipe and metrics), OUT/history.csv and
    OUT/metrics.json of a finished train or finetune run; evaluate, predict and export read the model.pt."""
    from . import checkpoints
    from ._files import atomic_write

    loaded = {"source": source, "val_per_class": profile.val_per_class, "train_per_class": profile.train_per_class,
              "synthetic_per_class": profile.synthetic_per_class, "seed": seed, "image_size": data.train.image_size[0]}
    extra = {"data": loaded, "train_config": cfg.as_dict(), "metrics": metrics}
    payload = checkpoints.make_checkpoint(model, model_name=cfg.model, model_options=cfg.model_options,
                                          classes=data.classes, mean=data.mean, std=data.std,
                                          history=result.history, extra=extra)
    checkpoints.save(payload, out / "model.pt")
    atomic_write(out / "history.csv", result.history.to_csv(index=False))
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    accuracy = "n/a" if metrics["val_accuracy"] is None else f"{metrics['val_accuracy']:.4f}"
    print(f"val accuracy {accuracy} after {metrics['epochs']} epochs ({metrics['stopped']}, "
          f"{metrics['seconds']:.0f} s); wrote {out / 'model.pt'}", file=sys.stderr)


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "evaluate",
        help="accuracy and loss of a checkpoint on a data split",
        description="Evaluate CHECKPOINT on a split of SOURCE with the normalisation stored in the checkpoint. "
        "The validation split is carved exactly as in training (the checkpoint records how).",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a model.pt written by resnet-lessons")
    p.add_argument("--data", required=True, metavar="SOURCE", help="cifar10, synthetic, or an image folder or .zip")
    p.add_argument("--split", metavar="NAME", help="train, val, test or holdout (default: test if there is one, else val)")
    p.add_argument("--json", action="store_true", help='print {"accuracy", "loss", "n", "per_class"} as JSON')
    p.add_argument("--batch-size", type=_whole(1), default=500, metavar="B",
                   help="images per forward pass (default 500)")
    _skip_bad_flag(p)
    p.add_argument("--device", metavar="DEVICE", help="cpu, cuda, mps (default: the best available)")
    p.set_defaults(handler=_run_evaluate)


def _load_checkpoint(path: str):  # -> checkpoints.Checkpoint
    from . import checkpoints

    try:
        return checkpoints.load(path)
    except checkpoints.CheckpointError as error:
        raise CommandError(str(error)) from None


def _run_evaluate(args: argparse.Namespace) -> int:
    from . import runtime
    from .checkpoints import CheckpointError, ClassMismatch
    from .evaluate import evaluate

    checkpoint = _load_checkpoint(args.checkpoint)
    source = _source(args.data)
    data, _ = _recorded_data(checkpoint, source, skip_bad=args.skip_bad)
    split = args.split or ("test" if "test" in data.splits else "val")
    if split not in data.splits:
        raise CommandError(f"{source} has no split {split!r}; it has {', '.join(data.splits)}")
    try:
        checkpoint.check_classes(data.classes, what=f"{source}")
        device = runtime.pick_device(args.device)
        model = checkpoint.build_model(device)
    except (ClassMismatch, CheckpointError, RuntimeError) as error:
        raise CommandError(str(error)) from None
    images = data[split]
    result = evaluate(model, images.images, images.labels, classes=checkpoint.classes, mean=checkpoint.mean,
                      std=checkpoint.std, batch_size=args.batch_size, device=device)
    if args.json:
        _print_json(result.as_dict())
    else:
        print(f"{args.checkpoint} on {source} [{split}]: accuracy {result.accuracy:.4f}, "
              f"loss {result.loss:.4f}, {result.n:,} images")
        for name, accuracy in result.per_class.items():
            print(f"  {name:>12}  {accuracy:.4f}")
    return 0


def _add_predict(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "predict",
        help="the top classes of image files",
        description="Classify image files with CHECKPOINT. A file that cannot be read gets its own error "
        "and the others are still predicted (exit code 1 if any failed).",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a model.pt written by resnet-lessons")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--top-k", type=_whole(1), default=3, metavar="K", help="classes to show per image (default 3)")
    p.add_argument("--json", action="store_true", help='print [{"file", "top": [{"class", "p"}], "error"}] as JSON')
    p.add_argument("--device", metavar="DEVICE", help="cpu, cuda, mps (default: the best available)")
    p.set_defaults(handler=_run_predict)


def _read_image(path: str, size: int):  # -> uint8 tensor [3, size, size]
    import numpy as np
    import torch
    from PIL import Image

    from .data.folders import fit_image, to_rgb

    with Image.open(path) as image:
        image.load()
        array = np.asarray(fit_image(to_rgb(image), size))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _run_predict(args: argparse.Namespace) -> int:
    import torch

    from . import runtime
    from .checkpoints import CheckpointError
    from .evaluate import infer

    checkpoint = _load_checkpoint(args.checkpoint)
    size = int((checkpoint.extra.get("data") or {}).get("image_size", 32))
    try:
        device = runtime.pick_device(args.device)
        model = checkpoint.build_model(device)
    except (CheckpointError, RuntimeError) as error:
        raise CommandError(str(error)) from None
    entries, images, readable = [], [], []
    for path in args.images:
        entry: dict = {"file": path, "top": [], "error": None}
        try:
            images.append(_read_image(path, size))
            readable.append(entry)
        except Exception as error:  # Pillow raises many kinds; each file gets its own message
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            entry["error"] = f"cannot read {path} as an image: {reason}"
        entries.append(entry)
    if images:
        logits = infer(model, torch.stack(images), mean=checkpoint.mean, std=checkpoint.std, device=device)
        probabilities = logits.softmax(dim=1)
        k = min(args.top_k, probabilities.shape[1])
        values, indices = probabilities.topk(k, dim=1)
        for entry, p_row, i_row in zip(readable, values.tolist(), indices.tolist()):
            entry["top"] = [{"class": checkpoint.classes[i], "p": p} for p, i in zip(p_row, i_row)]
    if args.json:
        _print_json(entries)
    else:
        for entry in entries:
            if entry["error"]:  # on stderr: stdout holds only predictions
                print(f"{entry['file']}: error: {entry['error']}", file=sys.stderr)
            else:
                print(f"{entry['file']}: " + ", ".join(f"{t['class']} {t['p']:.3f}" for t in entry["top"]))
    return 1 if any(entry["error"] for entry in entries) else 0


def _add_data(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "data",
        help="summarise a data source: splits, images per class, image size, classes",
        description="Load a data source as the library does (val carved out of train where the source has "
        "none) and summarise it: splits, images per class in each split, image size, class names in label "
        "order. The first load of an image folder or zip decodes and caches it; later loads are quick.",
    )
    p.add_argument("source", metavar="SOURCE", help="cifar10, synthetic, or a path to an image folder or .zip")
    p.add_argument("--json", action="store_true", help="print JSON: classes, image_size, splits")
    p.add_argument("--image-size", type=_whole(8), default=32, metavar="PX", help="side of the square images (32)")
    p.add_argument("--val-per-class", type=_whole(0), default=500, metavar="N",
                   help="validation images per class carved out of train when the source has no val (500)")
    p.add_argument("--synthetic-per-class", type=_whole(1), default=2000, metavar="N",
                   help="training images per class of the synthetic source (2000)")
    p.add_argument("--seed", type=int, default=0, metavar="K", help="seed of the train/val split (0)")
    p.add_argument("--cache-dir", metavar="DIR", help="data cache (default ~/.cache/resnet_lessons)")
    p.add_argument("--no-download", action="store_true", help="never download CIFAR-10")
    _skip_bad_flag(p)
    p.set_defaults(handler=_run_data)


def _run_data(args: argparse.Namespace) -> int:
    from .data import DataError, DataUnavailable, load

    try:
        d = load(args.source, image_size=args.image_size, val_per_class=args.val_per_class, seed=args.seed,
                 synthetic_per_class=args.synthetic_per_class, cache_dir=args.cache_dir,
                 download=not args.no_download, skip_bad=args.skip_bad)
    except (DataError, DataUnavailable) as error:
        raise CommandError(str(error)) from None
    summary = {
        "classes": list(d.classes),
        "image_size": list(d.train.image_size),
        "splits": {name: {"n": len(s), "per_class": s.counts()} for name, s in d.splits.items()},
    }
    if args.json:
        _print_json(summary)
        return 0
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
    return 0


def _add_export(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "export",
        help="export a checkpoint to ONNX or TorchScript, verified by running the exported file",
        description="Write FILE (ONNX or TorchScript) and FILE.json, its model card: class names, normalisation "
        "(mean, std), input size, model name and versions (the card is also stored inside FILE). The export is "
        "loaded back and run (ONNX through onnxruntime) on images and its logits compared with PyTorch's; "
        "FILE is written only when they match. An existing FILE or FILE.json is replaced only with --force, "
        "and the checkpoint itself never.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a model.pt or checkpoint.pt written by resnet-lessons")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"), help="onnx or torchscript")
    p.add_argument("--out", required=True, metavar="FILE", help="the exported file (FILE.json is written beside it)")
    p.add_argument("--data", metavar="SOURCE", help="verify on validation images of SOURCE (cifar10, synthetic, "
                   "an image folder or .zip), split as the checkpoint records; default: random images")
    p.add_argument("--verify-images", type=_whole(1), default=256, metavar="N", help="images to verify on (256)")
    p.add_argument("--tolerance", type=_positive, default=1e-3, metavar="T",
                   help="largest |logit difference| accepted (1e-3)")
    _force_flag(p, "an existing FILE and FILE.json")
    _skip_bad_flag(p)
    p.set_defaults(handler=_run_export)


def _same_file(a: Path, b: Path) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.abspath(a) == os.path.abspath(b)


def _check_export_target(out: Path, checkpoint: Path, *, force: bool) -> None:
    """Never the checkpoint being exported; an existing file only with --force."""
    from .export import sidecar_path

    targets = (out, sidecar_path(out))
    for target in targets:
        if _same_file(target, checkpoint):
            raise CommandError(f"--out {out} would overwrite the checkpoint {checkpoint} being exported "
                               f"(the export writes {out} and {sidecar_path(out)}); choose another --out")
    existing = [str(t) for t in targets if os.path.lexists(t)]
    if existing and not force:
        raise CommandError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; pass --force "
                           "to replace, or choose another --out")


def _run_export(args: argparse.Namespace) -> int:
    from .checkpoints import CheckpointError
    from .export import ExportError, ModelCard, export_model

    out = Path(args.out).expanduser()
    if out.is_dir():
        raise CommandError(f"--out {out} is a folder; give a file name such as {out / 'model.onnx'}")
    _check_export_target(out, Path(args.checkpoint).expanduser(), force=args.force)
    checkpoint = _load_checkpoint(args.checkpoint)
    size = int(dict(checkpoint.extra.get("data") or {}).get("image_size", 32))
    if args.data:
        source = _source(args.data)
        data, size = _recorded_data(checkpoint, source, skip_bad=args.skip_bad)
        split = "val" if "val" in data.splits else next(iter(data.splits))
        images, inputs = data[split].images[: args.verify_images], f"{source} {split} images"
    else:
        import torch

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
        from ._files import WriteError

        raise CommandError(str(error) if isinstance(error, WriteError) else
                           f"cannot write {out}: {error.strerror or error}") from None
    engine = "onnxruntime" if args.format == "onnx" else "torch.jit"
    print(f"wrote {result.path} ({args.format}, {result.size_bytes / 1e6:.2f} MB) and {result.sidecar}")
    print(f"verified with {engine} on {result.comparison.summary()}")
    return 0


def _add_finetune(commands: argparse._SubParsersAction) -> None:
    from .finetune import STRATEGIES

    p = commands.add_parser(
        "finetune",
        help="fine-tune pretrained weights (ImageNet's, or a file) on a data source",
        description="Load pretrained weights (torchvision's ImageNet weights through the weights API, or a local "
        "file: a resnet-lessons model.pt or a torchvision .pth state dict), replace the head for the data's "
        "classes, freeze what the strategy freezes and train with the one training loop. Writes OUT/model.pt, "
        "OUT/history.csv and OUT/metrics.json, as train does; evaluate and predict read the model.pt.",
    )
    p.add_argument("--weights", required=True, metavar="imagenet|PATH",
                   help="'imagenet' (torchvision's default ImageNet weights; 'imagenet:IMAGENET1K_V1' names a "
                   "version), or a path to a model.pt or a torchvision state dict")
    p.add_argument("--data", required=True, metavar="SOURCE", help="cifar10, synthetic, or an image folder or .zip")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the model, history and metrics")
    p.add_argument("--model", metavar="NAME", help="the architecture (default: resnet18 for imagenet, else the file's)")
    p.add_argument("--strategy", choices=STRATEGIES, default="full",
                   help="linear: train the head only (backbone and BatchNorm statistics frozen); full: train "
                   "everything; discriminative: lower learning rates for lower stages; gradual: unfreeze one "
                   "stage per epoch from the top (default: full)")
    p.add_argument("--image-size", type=_whole(1), metavar="N", help="resize the images to N x N (default: 160 for "
                   "ImageNet weights with their 7x7 stem, which shrink a 32x32 image to 1x1 by the last stage; "
                   "else the data's own 32)")
    p.add_argument("--stem", choices=("imagenet", "cifar"), help="swap the weights' stem: 'cifar' puts a fresh "
                   "3x3 stem without max-pool on ImageNet weights (default: keep the weights' stem)")
    p.add_argument("--new-head", action="store_true", help="replace the head of a resnet-lessons checkpoint "
                   "trained on other classes (torchvision weights always get a new head)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_whole(1), metavar="N", help="passes over the training split")
    length.add_argument("--budget-seconds", type=_positive, metavar="S",
                        help="wall-clock budget: the schedule is planned to end within S seconds")
    p.add_argument("--lr", type=_positive, metavar="LR", help="peak learning rate of the head (default: by strategy)")
    p.add_argument("--seed", type=int, metavar="K", help="seed for splits, the new head and shuffling")
    p.add_argument("--profile", metavar="P", help="smoke, cpu or gpu (default: RESNET_LESSONS_PROFILE, else by hardware)")
    p.add_argument("--hub-dir", metavar="DIR", help="torch hub folder for ImageNet weights (default: "
                   "torch.hub.get_dir(); the weights file lives in its checkpoints/ folder)")
    _force_flag(p, "an earlier run's files in OUT")
    _skip_bad_flag(p)
    p.add_argument("--device", metavar="DEVICE", help="cpu, cuda, cuda:1, mps (default: the best available)")
    p.set_defaults(handler=_run_finetune)


def _weights_error(weights: str, error: Exception) -> CommandError:
    """A weights file that is unsafe gets the refusal every command gives; other failures their own text."""
    from .checkpoints import unsafe_pickle_refusal

    cause = error.__cause__
    refusal = unsafe_pickle_refusal(Path(weights).expanduser(), cause) if cause is not None else None
    return CommandError(str(refusal or error))


def _run_finetune(args: argparse.Namespace) -> int:
    profile, source = _train_settings(args)
    out = _out_folder(args.out)
    with ExitStack() as stack:
        _hold(stack, out, FINETUNE_FILES)
        _check_run_folder(out, FINETUNE_FILES, resume=None, force=args.force)
        _finetune(args, profile, source, out)
    return 0


def _finetune(args: argparse.Namespace, profile, source: str, out: Path) -> None:
    """Fine-tune and write the run into ``out`` (which the caller holds)."""
    import dataclasses
    import types

    from . import finetune, runtime

    try:
        device = runtime.pick_device(args.device)
        if device.type == "cpu":
            runtime.cpu_threads()
        model_name = args.model or ("resnet18" if args.weights.startswith("imagenet") else None)
        weights = finetune.load_weights(args.weights, model_name or "", hub_dir=args.hub_dir, progress=True)
        model_name = model_name or weights.model_name
        if not model_name:
            raise CommandError(f"cannot tell which architecture {args.weights} holds; name it with --model")
        stem = args.stem or weights.model_options.get("stem")
        size = args.image_size or (160 if weights.classes is None and stem == "imagenet" else 32)
        seed = profile.seed if args.seed is None else args.seed
        data = _load_data(source, profile, seed, image_size=size, skip_bad=args.skip_bad)
        runtime.seed_everything(seed)
        ready = finetune.pretrained_model(model_name, len(data.classes), weights, stem=args.stem,
                                          new_head=True if args.new_head else None, classes=data.classes)
    except (finetune.WeightsError, finetune.WeightsUnavailable, RuntimeError, ValueError) as error:
        raise _weights_error(args.weights, error) from None
    data = finetune.with_normalisation(data, ready.mean, ready.std)
    overrides: dict = {"model": model_name, "model_options": ready.model_options, "seed": seed}
    for name in ("epochs", "budget_seconds", "lr"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    cfg = finetune.finetune_config(profile, args.strategy, image_size=size, **overrides)
    if len(data.train) < cfg.batch_size:  # few labels: one batch of all of them (fit refuses less than a batch)
        cfg = dataclasses.replace(cfg, batch_size=len(data.train))
    print(f"fine-tuning {model_name} from {weights.source} ({args.strategy}) on {source} at {size}x{size} "
          f"({len(data.train):,} images) on {runtime.describe_device(device)}", file=sys.stderr)
    result = finetune.finetune(ready.model, data, cfg, strategy=args.strategy, device=device,
                               new_modules=ready.new_modules)
    world = types.SimpleNamespace(world_size=1, device=device)
    metrics = _train_metrics(result, data, cfg, profile, source, world)
    metrics["finetune"] = {"weights": weights.source, "strategy": args.strategy, "image_size": size,
                           "new_modules": list(ready.new_modules), "lr": cfg.lr}
    _write_run(out, ready.model, data, result, cfg, metrics, source=source, profile=profile, seed=seed)


# --- entry point -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet-lessons",
        description="Train, fine-tune, evaluate and export ResNets on CIFAR-10 or your own image folders.",
    )
    parser.add_argument("--version", action="version", version=f"resnet-lessons {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, value in sorted(globals().items()):
        if name.startswith("_add_") and callable(value):
            value(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2 if args.command is None and argv else 0
    try:
        result = args.handler(args)
    except KeyboardInterrupt:
        print("resnet-lessons: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line for the user; the traceback on request
        if args.debug:
            raise
        print(f"resnet-lessons {args.command}: error: {error}", file=sys.stderr)
        return 1
    return int(result or 0)
