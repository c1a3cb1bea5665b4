"""Image tensors: uint8 ``[N, 3, H, W]`` (0-255) is how every split is stored; these turn them into what a
model reads (:func:`normalise`, whose multiply-add :func:`scale_and_shift` gives), change their size
(:func:`resize`), and read one image file as RGB (:func:`read_image`, with :func:`to_rgb` and
:func:`fit_image`, which the folder decoder shares)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError


def scale_and_shift(mean: Sequence[float], std: Sequence[float],
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``[1, C, 1, 1]`` tensors with ``x_uint8 * scale + shift == (x_uint8 / 255 - mean) / std``.

    One multiply-add instead of a division, a subtraction and a division per pixel; :func:`normalise` and
    :class:`~resnet_lessons.data.DeviceLoader` (which keeps them for every batch) both take them from here."""
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return 1.0 / (255.0 * std_t), -mean_t / std_t


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], *,
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` (0-255) to float32, scaled to 0-1 and standardised per channel:
    ``(x / 255 - mean) / std``, computed as one multiply-add on the device the images are on."""
    scale, shift = scale_and_shift(mean, std, images.device)
    return images.to(torch.float32, memory_format=memory_format).mul_(scale).add_(shift)


def resize(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 ``[N, 3, h, w]`` to ``[N, 3, size, size]``: bilinear, antialiased when shrinking, rounded back
    to uint8. Unchanged when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    shrink = size < images.shape[-1]
    parts = [F.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bilinear", align_corners=False,
                           antialias=shrink).round().clamp(0, 255).to(torch.uint8)
             for i in range(0, images.shape[0], chunk)]
    return torch.cat(parts) if parts else images.new_empty((0, 3, size, size))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB whatever the mode: grayscale and palettes expand, transparency is laid over white."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image if image.mode == "RGB" else image.convert("RGB")


def fit_image(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and crop the centre square (no-op at the right size)."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    w2, h2 = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((w2, h2), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (w2 - size) // 2, (h2 - size) // 2
    return image.crop((left, top, left + size, top + size))


def read_image(source: str | os.PathLike | bytes, size: int | None = None) -> torch.Tensor:
    """One image file (a path, or its bytes) as uint8 ``[3, H, W]`` RGB (:func:`to_rgb`); with ``size``,
    fitted to ``size`` x ``size`` (:func:`fit_image`). A file Pillow cannot read is a ``ValueError`` naming it."""
    name = "the image bytes" if isinstance(source, bytes) else repr(os.fspath(source))
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()
            rgb = to_rgb(image)
            array = np.asarray(rgb if size is None else fit_image(rgb, size))
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read {name} as an image: {error}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


__all__ = ["fit_image", "normalise", "read_image", "resize", "scale_and_shift", "to_rgb"]
