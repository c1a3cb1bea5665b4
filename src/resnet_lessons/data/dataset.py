"""The one in-memory form of every data source: uint8 images ``[N, 3, H, W]`` and int64 labels."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # statistics the torchvision ImageNet weights were trained with
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """Bad input: a corrupt image, an empty class folder, mismatched splits, an unsafe zip entry, ..."""


class DataUnavailable(RuntimeError):
    """A named source (CIFAR-10) cannot be had here: no download, no files in the cache."""


@dataclass(frozen=True)
class ImageSet:
    """One split: images as uint8 ``[N, 3, H, W]`` (RGB, 0-255), labels as int64 ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 [N, 3, H, W]; got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be int64 [N] with N = {self.images.shape[0]}; "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.classes)

    def counts(self) -> dict[str, int]:
        """Images per class, in label order."""
        per_class = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, per_class))


@dataclass(frozen=True)
class DataSplits:
    """A data source after splitting: named splits that share one class list.

    ``mean`` and ``std`` are per-channel statistics of the training split on the 0-1 scale; they
    travel with every model trained on it.
    """

    source: str
    splits: dict[str, ImageSet]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    notes: tuple[str, ...] = field(default=())  # what a reader must know (e.g. "JPEG copy of CIFAR-10")

    @property
    def classes(self) -> tuple[str, ...]:
        return next(iter(self.splits.values())).classes

    @property
    def train(self) -> ImageSet:
        return self.splits["train"]

    @property
    def val(self) -> ImageSet:
        return self.splits["val"]

    def __getitem__(self, name: str) -> ImageSet:
        try:
            return self.splits[name]
        except KeyError:
            raise KeyError(f"no split {name!r}; this source has {', '.join(self.splits)}") from None


def channel_stats(images: torch.Tensor, chunk: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images, on the 0-1 scale.

    Sums of values and squares are taken per image in float32, then across images in float64. CPU
    tensors go through NumPy: one thread, so a busy machine does not stall a pool of torch threads.
    """
    if images.shape[0] == 0:
        raise ValueError("cannot compute channel statistics of an empty split")
    n, pixels = images.shape[0], images.shape[2] * images.shape[3]
    total, total_sq = np.zeros(3), np.zeros(3)
    flat = images.reshape(n, 3, pixels)
    for start in range(0, n, chunk):
        sums, squares = _pixel_sums(flat[start : start + chunk])
        total += sums.sum(axis=0, dtype=np.float64)
        total_sq += squares.sum(axis=0, dtype=np.float64)
    mean = total / (n * pixels)
    var = np.maximum(total_sq / (n * pixels) - mean * mean, 0.0)
    return tuple((mean / 255.0).tolist()), tuple((np.sqrt(var) / 255.0).tolist())


def _pixel_sums(block: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per image and channel of uint8 ``[n, 3, pixels]``: the sum of the values and of their squares (float32)."""
    if block.device.type == "cpu":
        x = block.numpy().astype(np.float32)
        return x.sum(axis=-1), np.einsum("ncp,ncp->nc", x, x)
    y = block.float()
    return y.sum(dim=-1).double().cpu().numpy(), (y * y).sum(dim=-1).double().cpu().numpy()


def _first_per_class(labels: torch.Tensor, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices of the first ``per_class`` images of each class in a seeded shuffle, and the
    images per label. Vectorised: one shuffle and one stable sort by label, no loop over classes."""
    labels = labels.cpu()
    perm = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))
    shuffled = labels[perm]
    order = torch.argsort(shuffled, stable=True)  # grouped by class, shuffled within each class
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(labels.numel()) - starts[shuffled[order]]  # position within its class
    return perm[order[rank < per_class]].sort().values, counts


def stratified_split(
    labels: torch.Tensor, per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(rest, held_out)``: ``per_class`` images of each class held out, chosen by ``seed``.

    The same labels and seed always give the same split; the two index sets are disjoint and sorted.
    """
    held, counts = _first_per_class(labels, per_class, seed)
    present = counts[counts > 0]
    if per_class >= int(present.min()):
        c = int(torch.nonzero((counts > 0) & (counts <= per_class))[0])
        raise ValueError(f"cannot hold out {per_class} images of class {c}: it has only {int(counts[c])}")
    mask = torch.ones(labels.numel(), dtype=torch.bool)
    mask[held] = False
    return torch.nonzero(mask).flatten(), held


def random_order(n: int, seed: int = 0) -> torch.Tensor:
    """A seeded random permutation of ``range(n)`` (int64). Its first ``k`` entries are a uniform random sample,
    and two disjoint slices of it are two disjoint samples; :func:`resnet_lessons.data.load` puts every split in
    such an order (folders and zips list their images class by class)."""
    if n < 0:
        raise ValueError(f"n must be at least 0, got {n}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def take_per_class(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Sorted indices of the first ``per_class`` images of each class after a seeded shuffle."""
    return _first_per_class(labels, per_class, seed)[0]
