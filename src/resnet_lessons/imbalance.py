"""Class imbalance: long-tailed training splits, class-balanced sampling, losses that correct for the
imbalance, and the metrics that show it.

* **Long tail.** :func:`long_tail_counts` is the exponential profile of Cao et al. (2019) and Cui et al.
  (2019): class ``i`` of ``C`` keeps ``n_max * ratio ** (-i / (C - 1))`` images, so the most frequent
  class has ``ratio`` times as many as the rarest. :func:`long_tail` cuts such a subset out of a
  :class:`~resnet_lessons.data.ImageSet`, :func:`long_tail_splits` out of the training split of a
  :class:`~resnet_lessons.data.DataSplits` (validation and test stay balanced).
* **Re-sampling.** :func:`class_balanced_weights` gives each image the weight ``1 / n_y``: drawn with
  replacement in proportion to it (``DeviceLoader(sample_weights=...)``, ``train.fit(sample_weights=...)``),
  every class makes up the same share of a batch on average.
* **Re-weighting.** :func:`class_weights` scales each class's loss by its inverse frequency or by the
  inverse *effective number of samples* ``(1 - beta ** n) / (1 - beta)`` (Cui et al. 2019).
* **Other losses.** :class:`FocalLoss` (Lin et al. 2017) down-weights the easy, well-classified
  examples; :class:`LogitAdjustedLoss` (Menon et al. 2021) adds ``tau * log prior`` to the logits
  during training, and :func:`adjust_logits` subtracts it after training (post-hoc), which needs no
  retraining at all.
* **Metrics.** :func:`recall_table` compares methods class by class, head against tail, with
  :func:`resnet_lessons.metrics.per_class_recall` and :func:`resnet_lessons.metrics.balanced_accuracy`.

Every loss is a ``torch.nn.Module`` called as ``loss(logits, labels)``, the form ``train.fit(loss_fn=...)``
takes; class weights and priors are buffers, so ``.to(device)`` moves them with the module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .data import DataSplits, ImageSet, channel_stats
from .metrics import per_class_recall

WeightScheme = Literal["inverse", "effective"]


# --- long-tailed subsets --------------------------------------------------------------------------


def long_tail_counts(n_max: int, num_classes: int, ratio: float) -> list[int]:
    """Images kept per class: ``int(n_max * ratio ** (-i / (num_classes - 1)))`` for class ``i``.

    The exponential profile of Cao et al. (2019, the LDAM code) and Cui et al. (2019). With
    ``n_max=5000`` and ``ratio=100`` this is CIFAR-10-LT: 5000, 2997, ..., 50 (12,406 images).
    """
    if num_classes < 2:
        raise ValueError(f"a long tail needs at least 2 classes; got {num_classes}")
    if not ratio >= 1:
        raise ValueError(f"ratio (largest class / smallest class) must be at least 1; got {ratio}")
    if n_max < 1:
        raise ValueError(f"n_max must be at least 1; got {n_max}")
    counts = [int(n_max * ratio ** (-i / (num_classes - 1))) for i in range(num_classes)]
    if counts[-1] < 1:
        raise ValueError(f"ratio {ratio} leaves no image of the rarest class with n_max {n_max}")
    return counts


def long_tail_indices(labels: torch.Tensor, ratio: float, *, n_max: int | None = None, num_classes: int | None = None,
                      order: Sequence[int] | None = None, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a long-tailed subset of ``labels``.

    ``order`` lists the classes from most to least frequent (default: label order, 0 the head);
    ``n_max`` is the head's count (default: the smallest class size, so every class can supply its
    share). Which images of a class are kept is a seeded random choice.
    """
    labels = labels.detach().cpu().long()
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    available = torch.bincount(labels, minlength=num_classes)
    order = list(range(num_classes)) if order is None else [int(c) for c in order]
    if sorted(order) != list(range(num_classes)):
        raise ValueError(f"order must list each of the {num_classes} classes once; got {order}")
    n_max = int(available.min()) if n_max is None else n_max
    counts = long_tail_counts(n_max, num_classes, ratio)
    generator = torch.Generator().manual_seed(seed)
    kept = []
    for rank, c in enumerate(order):
        members = torch.nonzero(labels == c).flatten()
        if members.numel() < counts[rank]:
            raise ValueError(f"class {c} has {members.numel()} images; the long tail asks for {counts[rank]}")
        kept.append(members[torch.randperm(members.numel(), generator=generator)[: counts[rank]]])
    return torch.cat(kept).sort().values


def long_tail(images: ImageSet, ratio: float, *, n_max: int | None = None, order: Sequence[int] | None = None,
              seed: int = 0) -> ImageSet:
    """A long-tailed subset of ``images`` (see :func:`long_tail_indices`)."""
    index = long_tail_indices(images.labels, ratio, n_max=n_max, num_classes=len(images.classes), order=order,
                              seed=seed)
    return images.subset(index)


def long_tail_splits(data: DataSplits, ratio: float, *, n_max: int | None = None, order: Sequence[int] | None = None,
                     seed: int = 0) -> DataSplits:
    """``data`` with a long-tailed training split; the other splits are kept (balanced), and ``mean``/``std``
    are recomputed from the new training split, as the :class:`DataSplits` contract asks."""
    train = long_tail(data["train"], ratio, n_max=n_max, order=order, seed=seed)
    mean, std = channel_stats(train.images)
    note = f"long-tailed training split: imbalance ratio {ratio:g}, {len(train):,} images"
    return replace(data, splits={**data.splits, "train": train}, mean=mean, std=std, notes=(*data.notes, note))


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 ``[num_classes]``: images per class."""
    return torch.bincount(labels.detach().cpu().long(), minlength=num_classes)


# --- re-sampling and re-weighting ------------------------------------------------------------------


def class_balanced_weights(labels: torch.Tensor, num_classes: int | None = None, power: float = 1.0) -> torch.Tensor:
    """float64 ``[N]``: image ``i`` weighs ``1 / n_{y_i} ** power`` (normalised to sum to 1).

    Drawn in proportion to these weights, class ``c`` is picked with probability ``n_c ** (1 - power)``
    over the sum of those: ``power=1`` gives every class the same share (class-balanced sampling),
    ``power=0.5`` square-root sampling, ``power=0`` the data as it is.
    """
    labels = labels.detach().cpu().long()
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    counts = class_counts(labels, num_classes).double()
    weights = counts.clamp_min(1).pow(-power)[labels]
    return weights / weights.sum()


def effective_number(counts: torch.Tensor | Sequence[int], beta: float) -> torch.Tensor:
    """float64: ``(1 - beta ** n) / (1 - beta)`` per class (Cui et al. 2019, Eq. 3). It is 1 for ``beta = 0``
    (every class counts as one sample) and tends to ``n`` as ``beta`` tends to 1."""
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1); got {beta}")
    n = torch.as_tensor(counts, dtype=torch.float64)
    return (1 - torch.pow(beta, n)) / (1 - beta)


def class_weights(counts: torch.Tensor | Sequence[int], scheme: WeightScheme = "effective",
                  beta: float = 0.9999) -> torch.Tensor:
    """float32 ``[C]`` loss weights, normalised to sum to ``C`` (so that balanced data gets all ones).

    ``"inverse"``: ``1 / n_c``. ``"effective"``: ``1 / E_c`` with ``E_c`` the effective number of samples
    (Cui et al. 2019): ``beta`` near 1 approaches inverse frequency, ``beta = 0`` gives equal weights.
    """
    n = torch.as_tensor(counts, dtype=torch.float64)
    if bool((n < 1).any()):
        raise ValueError(f"every class needs at least one image to be weighted; counts {n.long().tolist()}")
    if scheme == "inverse":
        raw = 1.0 / n
    elif scheme == "effective":
        raw = 1.0 / effective_number(n, beta)
    else:
        raise ValueError(f"scheme must be 'inverse' or 'effective'; got {scheme!r}")
    return (raw * n.numel() / raw.sum()).float()


# --- losses ----------------------------------------------------------------------------------------


def _as_buffer(values: torch.Tensor | Sequence[float] | None) -> torch.Tensor | None:
    return None if values is None else torch.as_tensor(values, dtype=torch.float32).detach().clone()


class WeightedCrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy with a weight per class: ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` (torch's weighted mean);
    ``nn.CrossEntropyLoss(weight=...)``, taking the weights as any sequence (kept as a float32 buffer)."""

    def __init__(self, weight: torch.Tensor | Sequence[float]) -> None:
        super().__init__(weight=_as_buffer(weight))


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): ``-alpha_y (1 - p_y) ** gamma * log p_y``, averaged over the batch.

    ``gamma = 0`` and no ``alpha`` is the cross-entropy; a larger ``gamma`` takes weight off the images
    the model already gets right with confidence. ``alpha`` (optional) is a weight per class, for
    instance :func:`class_weights` (Cui et al. combine the two).
    """

    alpha: torch.Tensor | None

    def __init__(self, gamma: float = 2.0, alpha: torch.Tensor | Sequence[float] | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be at least 0; got {gamma}")
        self.gamma = gamma
        self.register_buffer("alpha", _as_buffer(alpha))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
        loss = -((1 - log_p.exp()).clamp_min(0) ** self.gamma) * log_p
        if self.alpha is not None:
            loss = loss * self.alpha.to(loss.dtype)[labels]
        return loss.mean()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"


class LogitAdjustedLoss(nn.Module):
    """Logit-adjusted cross-entropy (Menon et al. 2021, Eq. 10): ``CE(logits + tau * log prior, y)``.

    Adding the log prior during training makes the network learn logits *without* the prior, so its
    plain argmax is balanced. ``tau = 0`` is the cross-entropy; Menon et al. use ``tau = 1``.
    """

    log_prior: torch.Tensor

    def __init__(self, prior: torch.Tensor | Sequence[float], tau: float = 1.0) -> None:
        super().__init__()
        prior = _check_prior(prior)
        self.tau = tau
        self.register_buffer("log_prior", prior.log())

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + self.tau * self.log_prior.to(logits.dtype), labels)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


def _check_prior(prior: torch.Tensor | Sequence[float]) -> torch.Tensor:
    prior = torch.as_tensor(prior, dtype=torch.float64)
    if prior.ndim != 1 or not bool((prior > 0).all()):
        raise ValueError(f"prior must be positive, one number per class; got {prior.tolist()}")
    return (prior / prior.sum()).float()


def class_prior(counts: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """float32 ``[C]``: each class's share of the training images."""
    return _check_prior(counts)


def adjust_logits(logits: torch.Tensor, prior: torch.Tensor | Sequence[float], tau: float = 1.0) -> torch.Tensor:
    """Post-hoc logit adjustment (Menon et al. 2021, Eq. 9): ``logits - tau * log prior``, for a model trained
    on the long tail with the plain cross-entropy. Nothing is retrained."""
    log_prior = _check_prior(prior).log().to(logits.device, logits.dtype)
    if logits.ndim != 2 or logits.shape[1] != log_prior.numel():
        raise ValueError(f"logits must be [N, {log_prior.numel()}]; got {tuple(logits.shape)}")
    return logits - tau * log_prior


def make_loss(name: str, counts: torch.Tensor | Sequence[int], *, beta: float = 0.9999, gamma: float = 2.0,
              tau: float = 1.0) -> nn.Module:
    """A training loss by name, from the training split's class counts: ``"ce"``, ``"inverse"``,
    ``"effective"`` (re-weighted cross-entropy), ``"focal"`` or ``"logit_adjusted"``."""
    if name == "ce":
        return nn.CrossEntropyLoss()
    if name in ("inverse", "effective"):
        return WeightedCrossEntropy(class_weights(counts, name, beta))  # type: ignore[arg-type]
    if name == "focal":
        return FocalLoss(gamma)
    if name == "logit_adjusted":
        return LogitAdjustedLoss(class_prior(counts), tau)
    raise ValueError(f"unknown loss {name!r}; choose ce, inverse, effective, focal or logit_adjusted")


# --- metrics ---------------------------------------------------------------------------------------


def recall_table(logits: dict[str, torch.Tensor], labels: torch.Tensor, classes: Sequence[str],
                 train_counts: torch.Tensor | Sequence[int]) -> pd.DataFrame:
    """Per-class recall of several methods: one row per class (with its training count), one column per
    method, then summary rows: ``balanced accuracy``, the mean recall of the ``head`` (the most frequent
    third of the classes) and of the ``tail`` (the rarest third)."""
    counts = torch.as_tensor(train_counts).long()
    table = pd.DataFrame(
        {name: per_class_recall(values, labels, len(classes)).numpy() for name, values in logits.items()},
        index=pd.Index([str(c) for c in classes], name="class"),
    )
    table.insert(0, "train images", counts.numpy())
    table = table.sort_values("train images", ascending=False, kind="stable")
    third = max(1, len(classes) // 3)
    summary = pd.DataFrame(
        {name: [table[name].mean(), table[name].iloc[:third].mean(), table[name].iloc[-third:].mean()]
         for name in logits},
        index=["balanced accuracy", "head (most frequent third)", "tail (rarest third)"],
    )
    summary.insert(0, "train images", [int(counts.sum()), int(table["train images"].iloc[:third].sum()),
                                       int(table["train images"].iloc[-third:].sum())])
    return pd.concat([table, summary])


__all__ = [
    "FocalLoss",
    "LogitAdjustedLoss",
    "WeightedCrossEntropy",
    "adjust_logits",
    "class_balanced_weights",
    "class_counts",
    "class_prior",
    "class_weights",
    "effective_number",
    "long_tail",
    "long_tail_counts",
    "long_tail_indices",
    "long_tail_splits",
    "make_loss",
    "recall_table",
]
