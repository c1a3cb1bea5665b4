"""New :class:`DataSplits` from old ones: some of the classes (:func:`select_classes`), a few labels per class
(:func:`few_labels`), every split at another size (:func:`resize_splits`). Chapter 6's transfer experiment
(:mod:`resnet_lessons.transfer`) is built from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from .dataset import DataSplits, ImageSet, channel_stats, take_per_class
from .images import resize


def select_classes(data: DataSplits, classes: Sequence[str]) -> DataSplits:
    """Only the images of ``classes``, relabelled 0..k-1 in that order; statistics of the new train split."""
    missing = [c for c in classes if c not in data.classes]
    if missing:
        raise ValueError(f"classes {missing} are not in the data (it has {list(data.classes)})")
    old = torch.tensor([data.classes.index(c) for c in classes])
    relabel = torch.full((len(data.classes),), -1, dtype=torch.int64)  # old label -> new label
    relabel[old] = torch.arange(len(classes))
    splits = {}
    for name, split in data.splits.items():
        keep = torch.isin(split.labels, old)
        splits[name] = ImageSet(split.images[keep], relabel[split.labels[keep]], tuple(classes))
    mean, std = channel_stats(splits["train"].images)
    return replace(data, splits=splits, mean=mean, std=std)


def few_labels(data: DataSplits, fraction: float, *, seed: int = 0) -> DataSplits:
    """Keep ``fraction`` of the training images of each class (at least one); other splits unchanged."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    smallest = min(data.train.counts().values())
    per_class = max(1, round(fraction * smallest))
    train_split = data.train.subset(take_per_class(data.train.labels, per_class, seed))
    mean, std = channel_stats(train_split.images)
    return replace(data, splits={**data.splits, "train": train_split}, mean=mean, std=std)


def resize_splits(data: DataSplits, size: int) -> DataSplits:
    """Every split of ``data`` at ``size`` x ``size`` (:func:`resnet_lessons.data.resize`). Loading with
    ``data.load(..., image_size=size)`` gives the same, done once at load time."""
    splits = {k: ImageSet(resize(s.images, size), s.labels, s.classes) for k, s in data.splits.items()}
    return replace(data, splits=splits)


__all__ = ["few_labels", "resize_splits", "select_classes"]
