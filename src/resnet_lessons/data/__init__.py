"""Data: every source as uint8 splits (:func:`load`), and loaders that feed a model.

``load("cifar10" | "synthetic" | path)`` returns :class:`DataSplits` (``dataset.py``; the sources in
``sources.py``, ``folders.py`` with its ``cache.py``, ``synthetic.py``); ``subsets.py`` makes smaller or resized
ones; ``images.py`` holds the image-tensor helpers (normalise, resize, read one file). :class:`DeviceLoader`
batches a split on the device; :func:`torchvision_loader` is the classic ``DataLoader`` path (``loader.py``).
Nothing here imports the rest of the library but its file-writing helpers (``resnet_lessons._files``).
Importing this package reads nothing and writes nothing.
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
from .images import fit_image, normalise, read_image, resize, scale_and_shift, to_rgb
from .loader import Augment, DeviceLoader, Draws, preview, random_window, torchvision_loader, torchvision_transform
from .sources import CIFAR10_CLASSES, default_cache_dir, load, socket_timeout
from .subsets import few_labels, resize_splits, select_classes
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
    "few_labels",
    "fit_image",
    "load",
    "make_synthetic",
    "normalise",
    "preview",
    "random_window",
    "random_order",
    "read_image",
    "resize",
    "resize_splits",
    "scale_and_shift",
    "select_classes",
    "socket_timeout",
    "stratified_split",
    "take_per_class",
    "to_rgb",
    "torchvision_loader",
    "torchvision_transform",
]
