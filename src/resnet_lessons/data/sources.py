"""Every data source becomes :class:`DataSplits`: CIFAR-10, the synthetic stand-in, image folders and zips.

``load(source)`` is the one entry point. ``source`` is ``"cifar10"``, ``"synthetic"`` or a path to a
folder or ``.zip`` of images. A validation split is carved out of train (stratified, seeded) wherever
the source has none; a test split is never invented.
"""

from __future__ import annotations

import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from . import folders
from .dataset import (
    DataError,
    DataSplits,
    DataUnavailable,
    ImageSet,
    channel_stats,
    random_order,
    stratified_split,
    take_per_class,
)
from .images import resize
from .synthetic import make_synthetic

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
DOWNLOAD_TIMEOUT_S = 30.0  # seconds a stalled connection may stay silent before the download gives up
SPLIT_ORDER = ("train", "val", "test")


def default_cache_dir() -> Path:
    """``~/.cache/resnet_lessons``: downloads and decoded image arrays live here."""
    return Path.home() / ".cache" / "resnet_lessons"


@contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """Give every socket opened inside the block a timeout of ``seconds``, so a hung host cannot hang a
    download (CIFAR-10 here, ImageNet weights in :mod:`resnet_lessons.weights`); the old default comes back after."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _unavailable(root: Path, reason: str) -> DataUnavailable:
    return DataUnavailable(
        f"CIFAR-10 is not in {root} and cannot be had: {reason}. Either download {CIFAR10_ARCHIVE} "
        f"(from {CIFAR10_URL}) and place it in {root} by hand (it is checked and unpacked on the next "
        "load), or use another source: 'synthetic' (a procedurally drawn stand-in), or a folder or .zip "
        "of images laid out <split>/<class>/<image> or <class>/<image>, such as "
        "../shared/data/cifar10-train-jpeg.zip (set RESNET_LESSONS_DATA to it)."
    )


def _fetch_cifar10(root: Path, download: bool, timeout: float = DOWNLOAD_TIMEOUT_S) -> tuple:
    """The official train and test sets as torchvision datasets, downloaded (with checksum) if allowed."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity, extract_archive

    archive = root / CIFAR10_ARCHIVE
    try:
        root.mkdir(parents=True, exist_ok=True)
        unpacked = (root / CIFAR10.base_folder).is_dir()
        if not unpacked and archive.is_file() and check_integrity(str(archive), CIFAR10.tgz_md5):
            extract_archive(str(archive), str(root))  # placed by hand: no network needed
        with socket_timeout(timeout):
            train = CIFAR10(str(root), train=True, download=download)
            test = CIFAR10(str(root), train=False, download=False)
    except TimeoutError as error:
        raise _unavailable(root, f"the download timed out (no answer for {timeout:g} s): {error}") from error
    except (OSError, RuntimeError) as error:
        if "timed out" in str(error):
            raise _unavailable(root, f"the download timed out (no answer for {timeout:g} s)") from error
        reason = str(error) if download else "downloading was turned off (download=False)"
        raise _unavailable(root, reason) from error
    return train, test


def _cifar10(cache_dir: Path, image_size: int, download: bool,
             timeout: float = DOWNLOAD_TIMEOUT_S) -> tuple[dict[str, ImageSet], list[str]]:
    train, test = _fetch_cifar10(cache_dir / "cifar10", download, timeout)
    splits = {}
    for name, ds in (("train", train), ("test", test)):
        images = resize(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), image_size)
        splits[name] = ImageSet(images, torch.tensor(ds.targets, dtype=torch.int64), tuple(ds.classes))
    return splits, ["official CIFAR-10 (Krizhevsky 2009): train 50,000, test 10,000; val is carved from train"]


def _synthetic(per_class: int, image_size: int, seed: int) -> tuple[dict[str, ImageSet], list[str]]:
    """One seeded generation: ``per_class`` images per class for train (val is carved out of them later)
    and a fifth as many again for test."""
    test_per_class = max(1, per_class // 5)
    pool = make_synthetic(per_class + test_per_class, image_size=image_size, seed=seed)
    rest, test = stratified_split(pool.labels, test_per_class, seed)
    note = f"synthetic stand-in (seed {seed}): procedurally drawn shapes, not photographs"
    return {"train": pool.subset(rest), "test": pool.subset(test)}, [note]


def _folder(path: Path, image_size: int, cache_dir: Path, skip_bad: bool) -> tuple[dict[str, ImageSet], list[str]]:
    listing, array, bad_names = folders.read(path, image_size, cache_dir)
    keep = np.ones(len(listing.names), dtype=bool)
    if bad_names:
        where = "zip" if listing.is_zip else "folder"
        shown = "; ".join(f"{name} ({reason})" for name, reason in bad_names[:3])
        more = f" and {len(bad_names) - 3} more" if len(bad_names) > 3 else ""
        if not skip_bad:
            raise DataError(f"cannot read {len(bad_names)} image(s) in the {where} {path}: {shown}{more}. "
                            "Fix or remove them, or skip them with --skip-bad (skip_bad=True in Python).")
        warnings.warn(f"skipped {len(bad_names)} unreadable image(s) in {path}: {shown}{more}", stacklevel=3)
        index = {name: i for i, name in enumerate(listing.names)}
        keep[[index[name] for name, _ in bad_names]] = False
    images = torch.from_numpy(array)
    labels = torch.tensor(listing.label_of, dtype=torch.int64)
    split_of = torch.tensor(listing.split_of, dtype=torch.int64)
    keep_t = torch.from_numpy(keep)
    splits = {}
    for k, name in enumerate(listing.splits):
        mask = (split_of == k) & keep_t
        if bool(mask.all()):  # the whole array is this split: no copy
            splits[name] = ImageSet(images, labels, listing.classes)
        else:
            chosen = torch.nonzero(mask).flatten()
            splits[name] = ImageSet(images[chosen], labels[chosen], listing.classes)
    return splits, [f"image {'zip' if listing.is_zip else 'folder'} {path} ({', '.join(listing.splits)})"]


def _carve_val(train: ImageSet, per_class: int, seed: int) -> tuple[ImageSet, ImageSet]:
    counts = train.counts()
    short = {c: n for c, n in counts.items() if n <= per_class}
    if short:
        name, n = next(iter(short.items()))
        raise DataError(
            f"cannot carve {per_class} validation images per class out of train: class {name!r} has only "
            f"{n} training image(s) (and one must stay in train); pass a smaller val_per_class"
        )
    rest, held = stratified_split(train.labels, per_class, seed)
    return train.subset(rest), train.subset(held)


def _shuffled(split: ImageSet, seed: int) -> ImageSet:
    """``split`` in one seeded random order. Folders and zips list their images class by class, so without it a
    split's first n images would all be of one class; with it, any prefix is a fair sample."""
    return split.subset(random_order(len(split), seed + 2))


def _is_cifar10_jpeg(splits: dict[str, ImageSet]) -> bool:
    train = splits.get("train")
    return (train is not None and set(splits) == {"train"} and train.classes == CIFAR10_CLASSES and len(train) == 50_000
            and train.image_size == (32, 32))


def load(
    source: str | Path,
    *,
    image_size: int = 32,
    val_per_class: int = 500,
    train_per_class: int | None = None,
    synthetic_per_class: int = 2000,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    download: bool = True,
    skip_bad: bool = False,
    require_train: bool = True,
) -> DataSplits:
    """Load ``source`` as uint8 splits with the training split's per-channel statistics.

    ``val_per_class`` images of each class are carved out of train (stratified, by ``seed``) when the
    source has no val split of its own; ``train_per_class`` then keeps that many training images per
    class. ``require_train=False`` accepts a source without a train split (``test/<class>/<image>`` to
    evaluate on): nothing is carved and ``mean``/``std`` are then those of its first split. Raises
    :class:`DataUnavailable` when CIFAR-10 cannot be had and :class:`DataError` for bad input (fewer than
    two classes among them). Only ``cache_dir`` (default ``~/.cache/resnet_lessons``) is ever written.
    """
    if image_size < 8:
        raise DataError(f"image_size must be at least 8 pixels; got {image_size}")
    if val_per_class < 0 or (train_per_class is not None and train_per_class < 1):
        raise DataError(f"need val_per_class >= 0 and train_per_class >= 1 (or None); "
                        f"got {val_per_class}, {train_per_class}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = str(source)
    if name == "cifar10":
        splits, notes = _cifar10(cache, image_size, download)
    elif name == "synthetic":
        splits, notes = _synthetic(synthetic_per_class, image_size, seed)
    elif Path(name).expanduser().exists():
        splits, notes = _folder(Path(name).expanduser(), image_size, cache, skip_bad)
    else:
        raise DataError(f"data source {name!r} is neither 'cifar10', 'synthetic' nor an existing "
                        f"folder or .zip of images: {Path(name).expanduser().resolve()} does not exist")
    classes = next(iter(splits.values())).classes
    if len(classes) < 2:
        raise DataError(f"data source {name!r} has only one class ({', '.join(classes) or 'none'}); a classifier "
                        "needs at least two classes, one folder of images each")
    if "train" not in splits and require_train:
        raise DataError(f"data source {name!r} has no train split (it has {', '.join(splits)})")
    if "train" not in splits:
        notes.append(f"no train split in the source: mean and std are those of its {next(iter(splits))} split")
    cifar_jpeg = _is_cifar10_jpeg(splits)
    if "train" in splits and "val" not in splits and val_per_class > 0:
        splits["train"], splits["val"] = _carve_val(splits["train"], val_per_class, seed)
        if "test" not in splits:
            notes.append(f"no test split in the source: val ({val_per_class} per class) is carved out of "
                         "train, so report its figures as validation accuracy")
    if cifar_jpeg:
        notes.append("this is the JPEG copy of CIFAR-10's training split (lossy: pixels differ slightly "
                     "from the official release); figures on it are validation accuracy on the JPEG copy")
    if train_per_class is not None and "train" in splits:
        splits["train"] = splits["train"].subset(take_per_class(splits["train"].labels, train_per_class, seed + 1))
    ordered = {k: _shuffled(splits[k], seed) for k in sorted(splits, key=lambda s: (SPLIT_ORDER + (s,)).index(s))}
    mean, std = channel_stats(ordered.get("train", next(iter(ordered.values()))).images)
    return DataSplits(source=name, splits=ordered, mean=mean, std=std, notes=tuple(notes))
