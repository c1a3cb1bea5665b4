"""What the commands share: the error they raise, the argument types and flags they repeat, and how they
read a profile, a data source and a checkpoint.

A bad argument value is a usage error (argparse's exit code 2); a failure the user can act on is a
:class:`CommandError` (one line, exit code 1). The library is imported inside the functions, so that
``resnet-lessons --help`` answers without importing torch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from ..checkpoints import Checkpoint
    from ..data import DataSplits
    from ..profiles import Profile

    Commands = argparse._SubParsersAction[argparse.ArgumentParser]  # what add_parser is called on


class CommandError(Exception):
    """A failure the user can act on; printed as one line, exit code 1."""


def print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


# --- argument types: a bad value is a usage error (exit code 2) ----------------------------------


def whole(minimum: int) -> Callable[[str], int]:
    """An argument type: a whole number of at least ``minimum``."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return whole_number


def positive(text: str) -> float:
    """An argument type: a finite number more than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):  # nan and inf too
        raise argparse.ArgumentTypeError(f"must be a finite number more than 0, got {text}")
    return value


def per_class(text: str) -> int | None:
    """An argument type: a positive whole number, or ``all`` (None)."""
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number or 'all', got {text!r}")
    return int(text)


# --- the flags several commands take, each defined once -------------------------------------------

SOURCE_HELP = "cifar10, synthetic, or a path to an image folder or .zip"


def add_checkpoint(p: argparse.ArgumentParser, what: str = "a model.pt written by resnet-lessons") -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT", help=what)


def add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="SOURCE", help=SOURCE_HELP)


def add_out_folder(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the model, history and metrics")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", metavar="DEVICE", help="cpu, cuda, cuda:1, mps (default: the best available)")


def add_seed(p: argparse.ArgumentParser, what: str) -> None:
    """--seed, default None: the profile's seed. ``what`` says what it seeds."""
    p.add_argument("--seed", type=int, metavar="K", help=f"seed for {what}")


def add_profile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", metavar="P",
                   help="smoke, cpu or gpu (default: RESNET_LESSONS_PROFILE, else by hardware)")


def add_length(p: argparse.ArgumentParser) -> None:
    """--epochs or --budget-seconds (not both); neither: the profile's epochs."""
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=whole(1), metavar="N", help="passes over the training split")
    length.add_argument("--budget-seconds", type=positive, metavar="S",
                        help="wall-clock budget: the schedule is planned to end within S seconds")


def add_skip_bad(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-bad", action="store_true",
                   help="skip images that cannot be read (corrupt files, links outside the data folder) with a "
                   "warning naming them, instead of stopping")


def add_force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"replace {what} (never done without it)")


# --- settings, data and checkpoints -------------------------------------------------------------


def source(text: str) -> str:
    """The --data source, checked (a missing path is an error here, before any folder is created)."""
    from ..profiles import SettingsError, check_source

    try:
        return check_source(text)
    except SettingsError as error:
        raise CommandError(str(error)) from None


def train_settings(args: argparse.Namespace) -> tuple[Profile, str]:
    """The profile (--profile, else RESNET_LESSONS_PROFILE, else by hardware) and the --data source; the
    command line uses all the data unless --train-per-class says otherwise (the chapters' subsets are theirs)."""
    from ..profiles import SettingsError, get_profile, profile_from_env

    try:
        if args.profile:
            profile = get_profile(args.profile)
        else:  # --data is required: RESNET_LESSONS_DATA is neither needed, nor read, nor checked
            profile = profile_from_env()
    except SettingsError as error:
        raise CommandError(str(error)) from None
    return replace(profile, train_per_class=getattr(args, "train_per_class", None)), source(args.data)


def load_data(source: str, sizes: Mapping[str, Any], seed: int, image_size: int = 32, *, skip_bad: bool = False,
              require_train: bool = True, cache_dir: str | None = None, download: bool = True) -> DataSplits:
    """``source`` split into ``sizes`` (keywords of :func:`resnet_lessons.data.load`, as
    :meth:`Profile.data_sizes` gives them); never a silent fallback to synthetic data when it cannot be had."""
    from ..data import DataError, DataUnavailable, load

    try:
        return load(source, seed=seed, image_size=image_size, skip_bad=skip_bad, require_train=require_train,
                    cache_dir=cache_dir, download=download, **sizes)
    except (DataUnavailable, DataError) as error:
        raise CommandError(str(error)) from None


def recorded_image_size(checkpoint: Checkpoint) -> int:
    """The image side the checkpoint's model was trained at (32 when it does not say)."""
    return int(dict(checkpoint.extra.get("data") or {}).get("image_size", 32))


def recorded_data(checkpoint: Checkpoint, source: str, *, skip_bad: bool = False) -> tuple[DataSplits, int]:
    """``source`` split the way the checkpoint's training run split it (sizes, seed, image size), and that
    image size. The source needs no train split: evaluating uses the checkpoint's own normalisation."""
    from ..profiles import get_profile

    recorded = dict(checkpoint.extra.get("data") or {})
    smoke = get_profile("smoke")
    sizes = {
        "val_per_class": recorded.get("val_per_class", smoke.val_per_class if source == "synthetic" else 500),
        "train_per_class": recorded.get("train_per_class"),
        "synthetic_per_class": recorded.get("synthetic_per_class", smoke.synthetic_per_class),
    }
    size = recorded_image_size(checkpoint)
    data = load_data(source, sizes, recorded.get("seed", 0), image_size=size, skip_bad=skip_bad, require_train=False)
    return data, size


def load_checkpoint(path: str | Path) -> Checkpoint:
    from .. import checkpoints

    try:
        return checkpoints.load(path)
    except checkpoints.CheckpointError as error:
        raise CommandError(str(error)) from None
