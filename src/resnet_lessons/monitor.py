"""Input-drift monitoring: do the images arriving in production look like the training images?

A deployed model is only as good as the match between what it sees and what it was trained on. This module
compares simple statistics of a *batch* of incoming images with those of the training set:

* per image, the mean of each channel (brightness and colour) and the standard deviation of each channel
  (contrast): six numbers;
* the batch's average of each number is compared with the training average, in units of its image-to-image
  spread in training; the **score** is the largest such shift over the six;
* the **threshold** is ``z / sqrt(n)`` for a batch of ``n`` images: the average of ``n`` independent images
  spreads ``1 / sqrt(n)`` as much as one image, and ``z = 5`` such spreads leaves room for features that are
  far from Gaussian (image contrast is heavy-tailed), so same-distribution batches of a few dozen images or
  more practically never raise it; never below ``floor``, the smallest shift worth an alarm however large
  the batch. Judge batches, not single images: one image is allowed to be unusual;
* the brightness histogram's population stability index (PSI) is reported beside it (a common rule of thumb:
  under 0.1 no change, over 0.25 a large one).

It sees pixel statistics only: a flipped, rotated or otherwise rearranged image, or a new kind of object
with the usual colours, passes unnoticed. It is an alarm for broken cameras, new pipelines and new
lighting, not a guarantee that the model is right.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

FEATURES = ("mean_R", "mean_G", "mean_B", "contrast_R", "contrast_G", "contrast_B")
SHIFTS = ("brightness", "contrast", "colour", "noise", "blur", "flip")


def image_features(images: torch.Tensor) -> torch.Tensor:
    """``[N, 6]`` float64: per image, each channel's mean and standard deviation on the 0-1 scale."""
    _check(images)
    x = images.reshape(images.shape[0], images.shape[1], -1).to(torch.float64) / 255.0
    return torch.cat([x.mean(dim=2), x.std(dim=2, correction=0)], dim=1)


def brightness_histogram(images: torch.Tensor, bins: int = 16) -> torch.Tensor:
    """Share of pixels in each of ``bins`` equal brightness bins on [0, 1] (brightness: the mean of R, G, B)."""
    _check(images)
    brightness = images.to(torch.float64).mean(dim=1).flatten() / 255.0
    counts = torch.histc(brightness, bins=bins, min=0.0, max=1.0)
    return counts / counts.sum()


def psi(expected: torch.Tensor, actual: torch.Tensor, eps: float = 1e-4) -> float:
    """Population stability index ``sum((a - e) * ln(a / e))`` of two histograms of shares."""
    e = expected.clamp_min(eps)
    a = actual.clamp_min(eps)
    return float(((a - e) * torch.log(a / e)).sum())


def _check(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(
            f"expected a non-empty batch of uint8 images [N, C, H, W]; got {images.dtype} {tuple(images.shape)}"
        )


@dataclass
class DriftReport:
    """The verdict on one batch: ``drifted`` when ``score`` exceeds ``threshold``."""

    n: int
    score: float  # the largest standardised shift of a feature's batch average
    threshold: float  # max(z / sqrt(n), floor)
    psi: float  # population stability index of the brightness histogram (reported, not decisive)
    shifts: dict[str, float] = field(default_factory=dict)  # per feature, signed, in training spreads

    @property
    def drifted(self) -> bool:
        return self.score > self.threshold

    @property
    def worst(self) -> str:
        return max(self.shifts, key=lambda k: abs(self.shifts[k]))

    def as_dict(self) -> dict[str, Any]:
        """One row of a table of batches: the verdict and its numbers (the per-feature shifts left out)."""
        return {"images": self.n, "score": self.score, "threshold": self.threshold, "drifted": self.drifted,
                "worst feature": self.worst, "brightness PSI": self.psi}

    def summary(self) -> str:
        verdict = "DRIFT" if self.drifted else "ok"
        return (f"{verdict}: score {self.score:.3f} vs threshold {self.threshold:.3f} on {self.n} images "
                f"(largest shift: {self.worst} {self.shifts[self.worst]:+.2f}); brightness PSI {self.psi:.3f}")


@dataclass(frozen=True)
class DriftReference:
    """The training statistics a batch is compared with; plain numbers, so it can ship as JSON beside a model."""

    feature_mean: tuple[float, ...]
    feature_std: tuple[float, ...]  # image-to-image spread of each feature in training
    histogram: tuple[float, ...]
    n: int  # training images it was computed from
    z: float = 5.0
    floor: float = 0.05

    @classmethod
    def fit(cls, images: torch.Tensor, *, bins: int = 16, z: float = 5.0, floor: float = 0.05,
            chunk: int = 4096) -> DriftReference:
        """Statistics of the training images (uint8 ``[N, 3, H, W]``)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images [N, 3, H, W]; got {tuple(images.shape)}")
        starts = range(0, len(images), chunk)
        features = torch.cat([image_features(images[i : i + chunk]) for i in starts])
        histogram = torch.zeros(bins, dtype=torch.float64)
        for i in starts:  # each chunk's shares, weighted by its number of images
            batch = images[i : i + chunk]
            histogram += brightness_histogram(batch, bins) * len(batch)
        histogram /= len(images)
        return cls(
            feature_mean=tuple(features.mean(0).tolist()),
            feature_std=tuple(features.std(0).clamp_min(1e-6).tolist()),
            histogram=tuple(histogram.tolist()),
            n=len(images),
            z=z,
            floor=floor,
        )

    def threshold(self, n: int) -> float:
        return max(self.z / math.sqrt(n), self.floor)

    def check(self, images: torch.Tensor) -> DriftReport:
        """Compare a batch of incoming uint8 images with the training statistics."""
        features = image_features(images)
        shifts = (features.mean(0) - torch.tensor(self.feature_mean, dtype=torch.float64)) / torch.tensor(
            self.feature_std, dtype=torch.float64
        )
        histogram = brightness_histogram(images, len(self.histogram))
        return DriftReport(
            n=len(images),
            score=float(shifts.abs().max()),
            threshold=self.threshold(len(images)),
            psi=psi(torch.tensor(self.histogram, dtype=torch.float64), histogram),
            shifts=dict(zip(FEATURES, shifts.tolist())),
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers, for JSON; :meth:`from_dict` reads them back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DriftReference:
        values = dict(raw)
        for key in ("feature_mean", "feature_std", "histogram"):
            values[key] = tuple(values[key])
        return cls(**values)


def shift_images(images: torch.Tensor, kind: str, amount: float = 1.0, *, seed: int = 0) -> torch.Tensor:
    """uint8 images changed the way a camera or a pipeline changes them, to test the drift check.

    ``brightness``: + ``40 * amount`` grey levels; ``contrast``: scaled towards the image mean by
    ``1 - 0.5 * amount``; ``colour``: red + ``30 * amount``, blue - ``30 * amount``; ``noise``: Gaussian noise of
    ``20 * amount`` grey levels; ``blur``: a 3x3 box blur; ``flip``: a horizontal flip (content moves, statistics
    do not: the check cannot see it).
    """
    _check(images)
    x = images.to(torch.float32)
    if kind == "brightness":
        x = x + 40 * amount
    elif kind == "contrast":
        centre = x.mean(dim=(1, 2, 3), keepdim=True)
        x = centre + (x - centre) * (1 - 0.5 * amount)
    elif kind == "colour":
        x = x + torch.tensor([30.0, 0.0, -30.0]).view(1, 3, 1, 1) * amount
    elif kind == "noise":
        generator = torch.Generator().manual_seed(seed)
        x = x + torch.randn(x.shape, generator=generator) * 20 * amount
    elif kind == "blur":
        x = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    elif kind == "flip":
        x = x.flip(-1)
    else:
        raise ValueError(f"unknown shift {kind!r}; choose one of {', '.join(SHIFTS)}")
    return x.round().clamp(0, 255).to(torch.uint8)


__all__ = [
    "FEATURES",
    "SHIFTS",
    "DriftReference",
    "DriftReport",
    "brightness_histogram",
    "image_features",
    "psi",
    "shift_images",
]
