"""Evaluation: :func:`infer` runs a model on uint8 images and gives logits; every metric is computed from them.

Keeping inference apart from the metrics (:mod:`resnet_lessons.metrics`) means the same logits feed accuracy,
per-class recall, and later calibration or robustness studies, and a model is run once per question.
:func:`evaluate` is the summary a training run reports (loss, accuracy, per-class accuracy);
:func:`flip_tta_accuracy` the score of the speed benchmark, with and without flip test-time augmentation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import runtime
from .data.images import normalise
from .data.loader import padded_source
from .metrics import accuracy, average_logits, per_class_recall


@torch.no_grad()
def infer(
    model: nn.Module,
    images: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
    output: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
) -> torch.Tensor:
    """Logits ``[N, num_classes]`` (float32, on the CPU) for uint8 images ``[N, 3, H, W]``.

    The model runs in eval mode (BatchNorm uses its running statistics) and is put back in the
    mode it was in. ``output(model, x)`` replaces ``model(x)`` to collect something else per batch
    (penultimate features, for example). ``precision`` (``runtime.autocast``) and ``channels_last`` are
    the speed settings of training, for a model trained with them.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"infer expects uint8 images [N, 3, H, W]; got {images.dtype} {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    outputs = []
    with runtime.eval_mode(model):
        for start in range(0, images.shape[0], batch_size):
            x = normalise(images[start : start + batch_size].to(device), mean, std, memory_format=memory_format)
            with runtime.autocast(precision, device):
                outputs.append((model(x) if output is None else output(model, x)).float().cpu())
    if not outputs:
        return torch.empty(0, 0)
    return torch.cat(outputs)


@dataclass
class EvalResult:
    """Loss (mean cross-entropy), accuracy (0-1), image count and accuracy per class name."""

    loss: float
    accuracy: float
    n: int
    per_class: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"accuracy": self.accuracy, "loss": self.loss, "n": self.n, "per_class": dict(self.per_class)}


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> EvalResult:
    """Loss, accuracy and per-class accuracy (the recall of each class, NaN for a class without images) from
    logits and integer labels."""
    labels = labels.to(logits.device)
    n = int(labels.numel())
    if n == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), n=0, per_class={})
    loss = F.cross_entropy(logits, labels).item()
    correct = logits.argmax(dim=1) == labels
    recall = per_class_recall(logits, labels, len(classes)).tolist()
    per_class = {str(name): value for name, value in zip(classes, recall)}
    return EvalResult(loss=loss, accuracy=float(correct.float().mean()), n=n, per_class=per_class)


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
) -> EvalResult:
    """Loss, accuracy, count and per-class accuracy of ``model`` on uint8 ``images`` with ``labels``."""
    logits = infer(model, images, mean=mean, std=std, batch_size=batch_size, device=device)
    return metrics_from_logits(logits, labels, classes)


def flip_tta_accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, mean: Sequence[float], std: Sequence[float],
    device: str | torch.device = "cpu", batch_size: int = 1000, channels_last: bool = False, precision: str = "fp32",
    translate: int = 0,
) -> tuple[float, float]:
    """Accuracy of ``model`` on uint8 ``images``: plain, and with flip test-time augmentation (the logits of
    each image and of its mirror image averaged by :func:`~resnet_lessons.metrics.average_logits`, the rule of
    chapter 7). ``translate`` > 0 adds the image and its mirror shifted by ``translate`` pixels down-right and
    up-left (reflect padding, as the training crops): six views, as airbench's strongest TTA. The model is put
    back in the mode it was in; no images score ``(0.0, 0.0)``."""
    if images.shape[0] == 0:
        return 0.0, 0.0

    def predict(batch: torch.Tensor) -> torch.Tensor:
        return infer(model, batch, mean=mean, std=std, batch_size=batch_size, device=device, precision=precision,
                     channels_last=channels_last)

    views = [images] + (shifted(images, translate) if translate else [])
    logits = [predict(view) for view in views] + [predict(view.flip(-1)) for view in views]
    return accuracy(logits[0], labels), accuracy(average_logits(*logits), labels)


def shifted(images: torch.Tensor, pixels: int) -> list[torch.Tensor]:
    """``images`` moved ``pixels`` down-right and up-left, the uncovered border filled by reflection."""
    height, width = images.shape[-2:]
    padded = padded_source(images, pixels, flip=False)  # the training crops' reflect padding
    far = 2 * pixels
    return [padded[..., :height, :width], padded[..., far : far + height, far : far + width]]


__all__ = ["EvalResult", "evaluate", "flip_tta_accuracy", "infer", "metrics_from_logits"]
