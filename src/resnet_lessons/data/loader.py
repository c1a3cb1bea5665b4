"""Feeding a model: the whole split on the device, augmented a batch at a time (the airbench way).

:class:`DeviceLoader` keeps one uint8 tensor of all images on the device. Each step gathers a batch
with a random crop (reflect padding) and a horizontal flip done by one indexing operation, converts it
to float, normalises it and optionally cuts a square out. The random draws are made on the CPU from a
seeded generator, so the same seed gives the same batches on any device.
:func:`torchvision_loader` is the classic path (PIL transforms in a ``DataLoader``) doing the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from .dataset import ImageSet
from .images import scale_and_shift

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class Augment:
    """Training augmentation: random crop after ``crop_padding`` pixels of reflect padding, a random
    horizontal flip, and Cutout of a ``cutout`` x ``cutout`` square (0: none) after normalisation.

    ``alternate_flip``: each image is flipped at random in the first epoch and then the other way every
    epoch after, so that any two consecutive epochs show both its sides (alternating flip, one of the gains of
    Jordan 2024, "94% on CIFAR-10 in 3.29 seconds")."""

    crop_padding: int = 4
    flip: bool = True
    cutout: int = 0
    alternate_flip: bool = False

    def draw(self, n: int, height: int, width: int, generator: torch.Generator) -> Draws:
        """The random choices for ``n`` images, one row each."""
        p = self.crop_padding
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
        cy = torch.randint(0, height, (n,), generator=generator)
        cx = torch.randint(0, width, (n,), generator=generator)
        return Draws(dy, dx, flip, cy, cx)


@dataclass(frozen=True)
class Draws:
    """Per-image random choices: crop offsets in the padded image, flips, Cutout centres."""

    dy: torch.Tensor
    dx: torch.Tensor
    flip: torch.Tensor
    cy: torch.Tensor
    cx: torch.Tensor

    def to(self, device: torch.device) -> Draws:
        return Draws(*(t.to(device, non_blocking=True) for t in (self.dy, self.dx, self.flip, self.cy, self.cx)))


def padded_source(images: torch.Tensor, padding: int, flip: bool) -> torch.Tensor:
    """Reflect-padded images, followed by their mirror images when ``flip``: ``[N or 2N, 3, H+2p, W+2p]``.

    Made once per loader. Every augmented image is then a window of this tensor: the crop picks the
    window's corner, the flip picks the mirrored copy.
    """
    import torch.nn.functional as F

    padded = F.pad(images, (padding,) * 4, mode="reflect") if padding else images
    return torch.cat([padded, padded.flip(3)]).contiguous() if flip else padded.contiguous()


def crop_flip(source: torch.Tensor, rows: torch.Tensor, draws: Draws, padding: int) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]``: image ``rows[b]`` cropped at ``(dy, dx)`` of its padded form, then flipped.

    ``source`` comes from :func:`padded_source`. All windows of ``source`` are one strided view (a
    window starts at any element), so the whole batch is a single ``index_select``: no per-image work.
    """
    _, c, hp, wp = source.shape
    h, w = hp - 2 * padding, wp - 2 * padding
    per_image = c * hp * wp
    extent = (c - 1) * hp * wp + (h - 1) * wp + w  # elements one window spans
    windows = source.as_strided((source.numel() - extent + 1, c, h, w), (1, hp * wp, wp, 1))
    half = source.shape[0] // 2  # the mirrored copies start half-way (flips need padded_source(flip=True))
    # crop then flip = crop the mirrored image at the mirrored corner (2p - dx)
    dx = torch.where(draws.flip, 2 * padding - draws.dx, draws.dx)
    start = (rows + half * draws.flip.long()) * per_image + draws.dy * wp + dx
    return windows.index_select(0, start)


def random_window(x: torch.Tensor, side: int, generator: torch.Generator) -> torch.Tensor:
    """One ``side`` x ``side`` window of the batch ``x [B, C, H, W]`` at a random place, the same for every
    image (progressive resizing's smaller training crops; a side past the image keeps that dimension whole).
    The result is dense, in ``x``'s memory format."""
    height, width = x.shape[-2:]
    top = int(torch.randint(0, max(0, height - side) + 1, (1,), generator=generator))
    left = int(torch.randint(0, max(0, width - side) + 1, (1,), generator=generator))
    window = x[..., top : top + side, left : left + side]
    channels_last = x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return window.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def cutout_mask(draws: Draws, size: int, height: int, width: int) -> torch.Tensor:
    """Bool ``[B, 1, H, W]``: a ``size`` square centred on each draw's (cy, cx), clipped at the borders."""
    y0 = draws.cy.view(-1, 1) - size // 2
    x0 = draws.cx.view(-1, 1) - size // 2
    ar_h = torch.arange(height, device=draws.cy.device)
    ar_w = torch.arange(width, device=draws.cx.device)
    in_y = (ar_h >= y0) & (ar_h < y0 + size)  # [B, H]
    in_x = (ar_w >= x0) & (ar_w < x0 + size)  # [B, W]
    return (in_y.view(-1, 1, height, 1) & in_x.view(-1, 1, 1, width))


class DeviceLoader:
    """Batches ``(x, y)`` from uint8 images kept on ``device``: shuffled, augmented and normalised there.

    ``train=True`` shuffles (seeded by ``seed`` and the epoch) and augments; ``train=False`` does
    neither. ``drop_last`` (default: ``train``) drops a last partial batch. Under DDP each rank takes a
    disjoint shard of the epoch's permutation, all of the same size (train: the remainder of
    ``N / world_size`` is left out, a different one each epoch; eval: the permutation is padded by
    wrapping around, as ``DistributedSampler`` does), so every rank runs the same number of steps.

    ``sample_weights`` (train only, one non-negative number per image) replaces the shuffle by re-sampling:
    each epoch draws ``N`` images with replacement, image ``i`` with probability proportional to
    ``sample_weights[i]`` (``WeightedRandomSampler``'s rule; ``imbalance.class_balanced_weights`` gives
    every class the same share).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
                 mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu",
                 train: bool, augment: Augment = Augment(), seed: int = 0, drop_last: bool | None = None,
                 channels_last: bool = False, rank: int = 0, world_size: int = 1,
                 sample_weights: torch.Tensor | Sequence[float] | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W]; got {images.dtype} {tuple(images.shape)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size; got rank {rank}, world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        if augment.crop_padding >= min(images.shape[2:]):
            raise ValueError(f"crop_padding {augment.crop_padding} must be smaller than the image")
        self.sample_weights = _check_sample_weights(sample_weights, images.shape[0], train)
        self.device = torch.device(device)
        self.images = images.to(self.device)
        # training batches are windows of the padded (and mirrored) images, made once here
        self._source = padded_source(self.images, augment.crop_padding, augment.flip) if train else None
        self.labels = labels.to(self.device)
        self.batch_size, self.train, self.augment, self.seed = batch_size, train, augment, seed
        self.drop_last = train if drop_last is None else drop_last
        self.channels_last, self.rank, self.world_size = channels_last, rank, world_size
        self._scale, self._shift = scale_and_shift(mean, std, self.device)  # made once: x * scale + shift
        n = images.shape[0]
        self.shard_size = n // world_size if train else math.ceil(n / world_size)
        self.epoch = 0
        # alternate_flip: each image's side in even epochs, seeded by the loader's seed alone
        self._first_flip = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5

    def __len__(self) -> int:
        """Steps per epoch (the same on every rank)."""
        if self.drop_last:
            return self.shard_size // self.batch_size
        return math.ceil(self.shard_size / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s shuffle and draws next (iterating also moves on by one epoch)."""
        self.epoch = epoch

    def _generator(self, *salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.seed, self.epoch) + salt) & (2**63 - 1))

    def plan(self) -> Iterator[tuple[torch.Tensor, Draws | None]]:
        """(indices into the images, random draws or None) for each step of the current epoch."""
        n = self.images.shape[0]
        if not self.train:
            order = torch.arange(n)
        elif self.sample_weights is not None:  # re-sampling: n draws with replacement, P(i) ~ weight i
            order = torch.multinomial(self.sample_weights, n, replacement=True, generator=self._generator(0))
        else:
            order = torch.randperm(n, generator=self._generator(0))
        total = self.shard_size * self.world_size
        if total > n:  # eval under DDP: wrap around so that every rank has a full shard
            order = torch.cat([order, order[: total - n]])
        shard = order[self.rank : total : self.world_size]
        generator = self._generator(1, self.rank)
        h, w = self.images.shape[2:]
        for step in range(len(self)):
            rows = shard[step * self.batch_size : (step + 1) * self.batch_size]
            draws = self.augment.draw(rows.numel(), h, w, generator) if self.train else None
            if draws is not None and self.augment.flip and self.augment.alternate_flip:
                draws = replace(draws, flip=self._first_flip[rows] ^ bool(self.epoch % 2))
            yield rows, draws

    def batch(self, rows: torch.Tensor, draws: Draws | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One normalised float32 batch for ``rows`` with ``draws`` applied (see :meth:`plan`)."""
        rows = rows.to(self.device, non_blocking=True)
        if draws is None:
            x = self.images[rows]
        else:
            if self._source is None:
                raise ValueError("random draws apply to a training loader (train=True) only")
            draws = draws.to(self.device)
            x = crop_flip(self._source, rows, draws, self.augment.crop_padding)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.to(torch.float32, memory_format=fmt).mul_(self._scale).add_(self._shift)
        if draws is not None and self.augment.cutout > 0:
            x.masked_fill_(cutout_mask(draws, self.augment.cutout, *x.shape[2:]), 0.0)  # 0 = the mean
        return x, self.labels[rows]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for rows, draws in self.plan():
            yield self.batch(rows, draws)
        self.epoch += 1


def _check_sample_weights(weights: torch.Tensor | Sequence[float] | None, n: int, train: bool) -> torch.Tensor | None:
    """``weights`` as float64 ``[n]`` on the CPU, or a ValueError naming what is wrong with them."""
    if weights is None:
        return None
    if not train:
        raise ValueError("sample_weights re-sample the training split; an evaluation loader (train=False) takes none")
    weights = torch.as_tensor(weights).detach().to("cpu", torch.float64)
    if weights.shape != (n,):
        raise ValueError(f"sample_weights must be one number per image, shape ({n},); got {tuple(weights.shape)}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or not float(weights.sum()) > 0:
        raise ValueError("sample_weights must be finite, non-negative and not all zero")
    return weights


# --- the classic path: PIL transforms in a torch DataLoader -----------------------------------------


class _Cutout:
    """Zero a ``size`` square at a random centre of a normalised ``[3, H, W]`` tensor (as DeVries 2017)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:]
        cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
        y0, x0 = cy - self.size // 2, cx - self.size // 2
        x = x.clone()
        x[:, max(0, y0) : max(0, y0 + self.size), max(0, x0) : max(0, x0 + self.size)] = 0
        return x


class PILImages(torch.utils.data.Dataset):
    """uint8 images as PIL images through ``transform``: the ``torchvision.datasets`` way."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.images = np.ascontiguousarray(images.permute(0, 2, 3, 1).cpu().numpy())  # [N, H, W, 3]
        self.labels = labels.cpu().tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def torchvision_transform(mean: Sequence[float], std: Sequence[float], train: bool, augment: Augment = Augment(),
                          image_size: tuple[int, int] = (32, 32)) -> Callable[[Image.Image], torch.Tensor]:
    """The same augmentation as :class:`DeviceLoader`, written as torchvision transforms on PIL images."""
    from torchvision import transforms as T

    steps = []
    if train:
        steps.append(T.RandomCrop(image_size, padding=augment.crop_padding, padding_mode="reflect"))
        if augment.flip:
            steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if train and augment.cutout > 0:
        steps.append(_Cutout(augment.cutout))
    return T.Compose(steps)


def torchvision_loader(imageset: ImageSet, batch_size: int, mean: Sequence[float], std: Sequence[float], train: bool,
                       num_workers: int = 0, augment: Augment = Augment(),
                       seed: int = 0) -> torch.utils.data.DataLoader:
    """A ``torch.utils.data.DataLoader`` over ``imageset`` with PIL transforms (the article's pipeline)."""
    transform = torchvision_transform(mean, std, train, augment, imageset.image_size)
    return torch.utils.data.DataLoader(
        PILImages(imageset.images, imageset.labels, transform),
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


def preview(images: torch.Tensor, augment: Augment = Augment(), copies: int = 4, seed: int = 0) -> torch.Tensor:
    """uint8 ``[copies, N, 3, H, W]``: ``copies`` augmented versions of each image, for looking at.

    The same code path as training (``DeviceLoader`` with the identity normalisation); Cutout squares
    come out black here, while a model sees them at the mean colour (0 after normalisation).
    """
    n = images.shape[0]
    loader = DeviceLoader(images, torch.zeros(n, dtype=torch.int64), batch_size=n, mean=(0.0, 0.0, 0.0),
                          std=(1 / 255,) * 3, train=True, augment=augment, seed=seed)
    out = []
    for copy in range(copies):
        loader.set_epoch(copy)
        (rows, draws), = loader.plan()
        assert draws is not None  # a training loader draws for every batch
        x, _ = loader.batch(rows.sort().values, _in_order(draws, rows))
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.stack(out)


def _in_order(draws: Draws, rows: torch.Tensor) -> Draws:
    """``draws`` (made for ``rows``) reordered to follow the sorted rows."""
    order = torch.argsort(rows)
    return Draws(*(t[order] for t in (draws.dy, draws.dx, draws.flip, draws.cy, draws.cx)))
