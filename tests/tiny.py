"""A tiny synthetic DataSplits for tests of the training loop and what calls it."""

from resnet_lessons.data import DataSplits, channel_stats, make_synthetic, stratified_split


def tiny_data(per_class: int = 12, val_per_class: int = 3, size: int = 16, seed: int = 0) -> DataSplits:
    images = make_synthetic(per_class, image_size=size, seed=seed)
    rest, held = stratified_split(images.labels, val_per_class, seed)
    train = images.subset(rest)
    mean, std = channel_stats(train.images)
    return DataSplits("synthetic", {"train": train, "val": images.subset(held)}, mean, std)
