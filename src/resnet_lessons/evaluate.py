"""Evaluation: ``infer`` gives logits; every metric is computed from them.

Keeping inference apart from the metrics means the same logits feed accuracy, per-class accuracy,
and later calibration or robustness studies, and a model is run once per question.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .data import random_order  # re-exported: the chapters sample held-out images with it


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` (0-255) to float32, scaled to 0-1 and standardised per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.to(torch.float32) / 255.0 - mean_t) / std_t


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
) -> torch.Tensor:
    """Logits ``[N, num_classes]`` (float32, on the CPU) for uint8 images ``[N, 3, H, W]``.

    The model runs in eval mode (BatchNorm uses its running statistics) and is put back in the
    mode it was in. ``output(model, x)`` replaces ``model(x)`` to collect something else per batch
    (penultimate features, for example).
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"infer expects uint8 images [N, 3, H, W]; got {images.dtype} {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = normalise(images[start : start + batch_size].to(device), mean, std)
            outputs.append((model(x) if output is None else output(model, x)).float().cpu())
    finally:
        model.train(was_training)
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
    """Loss, accuracy and per-class accuracy from logits and integer labels."""
    labels = labels.to(logits.device)
    n = int(labels.numel())
    if n == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), n=0, per_class={})
    loss = F.cross_entropy(logits, labels).item()
    correct = logits.argmax(dim=1) == labels
    per_class = {}
    for index, name in enumerate(classes):
        members = labels == index
        count = int(members.sum())
        per_class[str(name)] = float(correct[members].float().mean()) if count else float("nan")
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


__all__ = ["EvalResult", "evaluate", "infer", "metrics_from_logits", "normalise", "random_order"]
