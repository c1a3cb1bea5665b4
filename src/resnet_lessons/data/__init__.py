"""Data: every source as uint8 splits (:func:`load`), and loaders that feed a model.

``load("cifar10" | "synthetic" | path)`` returns :class:`DataSplits`; :class:`DeviceLoader` batches a
split on the device; :func:`torchvision_loader` is the classic ``DataLoader`` path. Importing this
package reads nothing and writes nothing.
"""

from .dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    DataSplits,
    DataUnavailable,
    ImageSet,
    channel_stats,
    random_order,
    stratified_split,
    take_per_class,
)
from .images import fit_image, normalise, read_image, resize, to_rgb
from .loader import Augment, DeviceLoader, Draws, preview, torchvision_loader, torchvision_transform
from .sources import CIFAR10_CLASSES, default_cache_dir, load
from .synthetic import SYNTHETIC_CLASSES, make_synthetic

__all__ = [
    "Augment",
    "CIFAR10_CLASSES",
    "DataError",
    "DataSplits",
    "DataUnavailable",
    "DeviceLoader",
    "Draws",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageSet",
    "SYNTHETIC_CLASSES",
    "channel_stats",
    "default_cache_dir",
    "fit_image",
    "load",
    "make_synthetic",
    "normalise",
    "preview",
    "random_order",
    "read_image",
    "resize",
    "stratified_split",
    "take_per_class",
    "to_rgb",
    "torchvision_loader",
    "torchvision_transform",
]
