"""A learnable offline stand-in for CIFAR-10: ten classes of procedurally drawn 32x32 RGB images.

Each class is a shape (disc, square, ring, ...) drawn at a random place, size and colour over a random
background with Gaussian noise. Colour hints at the class but overlaps between classes, so a network has
to learn shape; a small ResNet learns it in a few epochs, not in one step. Same seed, same images.
"""

from __future__ import annotations

import math

import torch

from .dataset import ImageSet

SYNTHETIC_CLASSES = (
    "disc",
    "square",
    "ring",
    "cross",
    "triangle",
    "diamond",
    "hstripes",
    "vstripes",
    "checker",
    "dots",
)


def _shape_masks(labels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Float masks ``[N, size, size]`` in {0, 1}: the shape of each image's class at a random place."""
    n = labels.numel()
    scale = size / 32.0

    def uniform(low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(n, generator=generator)).view(n, 1, 1) * scale

    cx, cy = uniform(10, 22), uniform(10, 22)
    r = uniform(5, 9)
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    dy = grid.view(1, size, 1) - cy
    dx = grid.view(1, 1, size) - cx
    dist = torch.sqrt(dx * dx + dy * dy)
    thick = 1.6 * scale
    period = uniform(3, 5)
    inside_box = (dx.abs() < r) & (dy.abs() < r)
    masks = torch.stack(
        [
            dist < r,
            (dx.abs() < 0.8 * r) & (dy.abs() < 0.8 * r),
            (dist - r).abs() < thick,
            ((dx.abs() < thick) & (dy.abs() < r)) | ((dy.abs() < thick) & (dx.abs() < r)),
            (dy.abs() < 0.8 * r) & (dx.abs() < (dy + 0.8 * r) / 2),
            dx.abs() + dy.abs() < r,
            inside_box & (torch.sin(2 * math.pi * dy / period) > 0),
            inside_box & (torch.sin(2 * math.pi * dx / period) > 0),
            inside_box & ((torch.floor(dx / period) + torch.floor(dy / period)) % 2 == 0),
            ((dx - r / 2) ** 2 + dy**2 < (r / 3) ** 2) | ((dx + r / 2) ** 2 + dy**2 < (r / 3) ** 2),
        ],
        dim=1,
    )  # [N, 10, size, size]
    return masks[torch.arange(n), labels].float()


def _class_colours(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Foreground RGB ``[N, 3]``: a hue around the class's own, spread wide enough to overlap others."""
    n = labels.numel()
    hue = (labels.float() / len(SYNTHETIC_CLASSES) + 0.25 * torch.randn(n, generator=generator)) % 1.0
    phases = torch.tensor([0.0, 1 / 3, 2 / 3])
    rgb = 0.5 + 0.5 * torch.cos(2 * math.pi * (hue.view(n, 1) - phases.view(1, 3)))
    brightness = 0.6 + 0.4 * torch.rand(n, 1, generator=generator)
    return rgb * brightness


def make_synthetic(per_class: int, image_size: int = 32, seed: int = 0) -> ImageSet:
    """``per_class`` images of each of the ten classes, deterministic in ``seed``, labels interleaved."""
    if per_class < 1 or image_size < 16:
        raise ValueError(f"need per_class >= 1 and image_size >= 16; got {per_class}, {image_size}")
    generator = torch.Generator().manual_seed(seed)
    num_classes = len(SYNTHETIC_CLASSES)
    labels = torch.arange(num_classes).repeat(per_class)
    n = labels.numel()
    masks = _shape_masks(labels, image_size, generator).unsqueeze(1)  # [N, 1, H, W]
    foreground = _class_colours(labels, generator).view(n, 3, 1, 1)
    background = (0.15 + 0.7 * torch.rand(n, 3, 1, 1, generator=generator)).expand(n, 3, image_size, image_size)
    images = background * (1 - masks) + foreground * masks
    images = images + 0.12 * torch.randn(images.shape, generator=generator)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageSet(images=images, labels=labels.to(torch.int64), classes=SYNTHETIC_CLASSES)
