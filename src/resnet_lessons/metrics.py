"""Metrics from logits: accuracy, per-class scores (recall, balanced accuracy, the per-class table),
test-time augmentation, calibration and robustness.

Everything here starts from what a model *said* (``logits [N, C]``) and what was *true*
(``labels [N]``), never from the model itself: inference runs once (``evaluate.infer``) and every
question is then a cheap computation on its output. The two exceptions take a ``predict`` callable,
uint8 images ``[N, 3, H, W]`` -> logits (for instance ``functools.partial(evaluate.infer, model,
mean=..., std=...)``), because they must change the images before predicting: flip test-time
augmentation and the robustness table. (``evaluate.flip_tta_accuracy``, which runs the model itself for the
speed benchmark, combines the views by the same rule, :func:`average_logits`.)

Calibration follows Guo et al. (2017): a model is calibrated when, among the images it gives 80 %
confidence, 80 % are right. The reliability diagram bins the confidence, the expected calibration
error (ECE) is the count-weighted gap between confidence and accuracy over the bins, and temperature
scaling divides the logits by one number ``T`` fitted on the validation split.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from .data.images import read_image

Predict = Callable[[torch.Tensor], torch.Tensor]  # uint8 images [N, 3, H, W] -> logits [N, C]


def _check(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits as float [N, C] and labels as int64 [N] on the CPU, or a ValueError naming the problem."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, num_classes]; got shape {tuple(logits.shape)}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must be [N] with N = {logits.shape[0]} (one per row of logits); got {tuple(labels.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError("no predictions: logits and labels are empty")
    return logits.detach().float().cpu(), labels.detach().long().cpu()


# --- accuracy and per-class scores ---------------------------------------------------------------


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share (0-1) of rows whose largest logit is the label."""
    logits, labels = _check(logits, labels)
    return float((logits.argmax(dim=1) == labels).float().mean())


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    """Share (0-1) of rows whose label is among the ``k`` largest logits."""
    logits, labels = _check(logits, labels)
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must be between 1 and the number of classes ({logits.shape[1]}); got {k}")
    top = logits.topk(k, dim=1).indices
    return float((top == labels[:, None]).any(dim=1).float().mean())


def accuracy_se(p: float, n: int) -> float:
    """Binomial standard error ``sqrt(p (1 - p) / n)`` of an accuracy ``p`` (0-1) measured on ``n`` images.

    It is the spread that the accuracy would show over test sets of ``n`` images drawn like this one, with the
    model fixed; it leaves out the spread over training runs (seeds), which only several runs can measure.
    """
    if not 0 <= p <= 1:
        raise ValueError(f"an accuracy is between 0 and 1, got {p}")
    if n < 1:
        raise ValueError(f"a standard error needs at least one image, got n = {n}")
    return math.sqrt(p * (1 - p) / n)


def paired_difference(
    logits_a: torch.Tensor, logits_b: torch.Tensor, labels: torch.Tensor
) -> tuple[float, float]:
    """Accuracy of ``b`` minus accuracy of ``a`` on the same images, and the standard error of that difference.

    Per image ``d = right_b - right_a`` is -1, 0 or 1; the difference is ``mean(d)`` and its standard error
    ``std(d) / sqrt(n)`` (population std). Only the images on which the two disagree count, so on the same
    images this is much smaller than the error of two independent accuracies.
    """
    logits_a, labels = _check(logits_a, labels)
    logits_b, _ = _check(logits_b, labels)
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"logits to compare must share one shape; got {tuple(logits_a.shape)} and "
                         f"{tuple(logits_b.shape)}")
    d = (logits_b.argmax(1) == labels).double() - (logits_a.argmax(1) == labels).double()
    return float(d.mean()), float(d.std(correction=0) / math.sqrt(len(d)))


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 ``[C, C]``: row = true class, column = predicted class (scikit-learn's convention)."""
    labels, preds = labels.long().cpu(), preds.long().cpu()
    if labels.shape != preds.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and preds {tuple(preds.shape)} differ in shape")
    for name, values in (("labels", labels), ("preds", preds)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must lie in 0..{num_classes - 1}; got {values.min()}..{values.max()}")
    flat = labels * num_classes + preds
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def _preds(logits_or_preds: torch.Tensor) -> torch.Tensor:
    """Predicted classes int64 ``[N]`` on the CPU: the argmax of logits ``[N, C]``, or the predictions as given."""
    x = logits_or_preds.detach().cpu()
    return x.argmax(dim=1) if x.ndim == 2 else x.long()


def per_class_recall(logits_or_preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """float64 ``[C]``: share of each class's images predicted as that class (NaN for a class with none).

    It is the per-class accuracy of ``evaluate`` and the recall of :func:`per_class_table`.
    """
    preds, labels = _preds(logits_or_preds), labels.detach().cpu().long()
    if preds.shape != labels.shape:
        raise ValueError(f"{tuple(preds.shape)} predictions for {tuple(labels.shape)} labels")
    total = torch.bincount(labels, minlength=num_classes).double()
    right = torch.bincount(labels[preds == labels], minlength=num_classes).double()
    return torch.where(total > 0, right / total.clamp_min(1), torch.full_like(total, math.nan))


def balanced_accuracy(logits_or_preds: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> float:
    """The mean per-class recall over the classes present in ``labels`` (scikit-learn's
    ``balanced_accuracy_score``): every class counts the same, however many images it has. On a balanced
    split it equals the accuracy."""
    labels = labels.detach().cpu().long()
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    recall = per_class_recall(logits_or_preds, labels, num_classes)
    return float(recall[~recall.isnan()].mean())


def per_class_table(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class, read off the confusion matrix.

    precision = right predictions of the class / all predictions of it (column), recall = right
    predictions / all images of it (row), F1 = their harmonic mean. A class never predicted gets
    precision 0 (scikit-learn's ``zero_division=0``). The last row, ``macro avg``, is the plain mean
    of the class rows.
    """
    logits, labels = _check(logits, labels)
    if logits.shape[1] != len(classes):
        raise ValueError(f"{len(classes)} class names for {logits.shape[1]} logits per image")
    cm = confusion_matrix(labels, logits.argmax(dim=1), len(classes)).double()
    right = cm.diag()
    predicted, actual = cm.sum(dim=0), cm.sum(dim=1)
    precision = torch.where(predicted > 0, right / predicted.clamp_min(1), torch.zeros_like(right))
    recall = per_class_recall(logits, labels, len(classes)).nan_to_num(0.0)  # a class without images: 0
    both = precision + recall
    f1 = torch.where(both > 0, 2 * precision * recall / both.clamp_min(1e-12), torch.zeros_like(right))
    table = pd.DataFrame(
        {"precision": precision.numpy(), "recall": recall.numpy(), "f1": f1.numpy(),
         "support": actual.long().numpy()},
        index=pd.Index([str(c) for c in classes], name="class"),
    )
    table.loc["macro avg"] = [precision.mean().item(), recall.mean().item(), f1.mean().item(), int(actual.sum())]
    table["support"] = table["support"].astype(int)
    return table


def confident_mistakes(
    logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str] | None = None, k: int = 10
) -> pd.DataFrame:
    """The ``k`` wrong predictions made with the highest confidence (softmax probability), most confident first.

    Columns: ``index`` (row in the evaluated split), ``label``, ``pred``, ``confidence``, and
    ``p_label`` (the probability the model gave the true class).
    """
    logits, labels = _check(logits, labels)
    probs = logits.softmax(dim=1)
    confidence, preds = probs.max(dim=1)
    wrong = torch.nonzero(preds != labels).flatten()
    order = wrong[confidence[wrong].argsort(descending=True)][:k]
    names: Sequence[object] = range(logits.shape[1]) if classes is None else classes
    return pd.DataFrame({
        "index": order.numpy(),
        "label": [names[int(c)] for c in labels[order]],
        "pred": [names[int(c)] for c in preds[order]],
        "confidence": confidence[order].numpy(),
        "p_label": probs[order, labels[order]].numpy(),
    })


# --- test-time augmentation ----------------------------------------------------------------------


def average_logits(*logits: torch.Tensor) -> torch.Tensor:
    """The book's one test-time-augmentation rule: the mean of the views' logits, ``mean_i logits_i``.

    Chapter 7's flip TTA (:func:`flip_tta`), chapter 14's speed benchmark (``evaluate.flip_tta_accuracy``) and
    the ladder of ``bench/`` all combine views through this function.
    """
    # Why the mean of the logits, not of the probabilities (VGG's rule, also common): it is the rule of airbench,
    # the CIFAR-10 speed benchmark that chapter 14 compares with (``0.5 * net(x) + 0.5 * net(x.flip(-1))``); a
    # sum has the same argmax, so "sum" and "mean" give exactly the same accuracy; the result is still logits
    # on their usual scale (softmax of the mean is the normalised geometric mean of the views' probabilities),
    # so softmax, cross-entropy and temperature scaling apply unchanged; and it is one addition on the device,
    # also under autocast. Where the views agree the two rules give the same class; they can differ only on
    # images whose views disagree.
    if not logits:
        raise ValueError("average_logits needs at least one logits tensor")
    shapes = {tuple(t.shape) for t in logits}
    if len(shapes) != 1:
        raise ValueError(f"logits to average must share one shape; got {sorted(shapes)}")
    return torch.stack([t.float() for t in logits]).mean(dim=0)


def flip_tta(predict_or_logits: Predict | torch.Tensor, images_or_flipped: torch.Tensor) -> torch.Tensor:
    """Flip test-time augmentation: the logits of each image and of its mirror image, averaged.

    Either ``flip_tta(predict, images)`` with ``predict`` uint8 images -> logits, which predicts the
    images and their horizontal flips; or ``flip_tta(logits, flipped_logits)`` when both were
    computed already. Returns logits (:func:`average_logits`, the book's one rule).
    """
    if callable(predict_or_logits):
        images = images_or_flipped
        logits, flipped = predict_or_logits(images), predict_or_logits(images.flip(-1))
    else:
        logits, flipped = predict_or_logits, images_or_flipped
    return average_logits(logits, flipped)


# --- calibration (Guo et al. 2017) ---------------------------------------------------------------


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels (the cross-entropy loss)."""
    logits, labels = _check(logits, labels)
    return float(F.cross_entropy(logits, labels))


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> pd.DataFrame:
    """The reliability diagram as a table: confidence split into ``n_bins`` equal-width bins ``(lo, hi]``.

    Per bin: ``count``, mean ``confidence`` (largest softmax probability), ``accuracy`` and
    ``gap`` = accuracy - confidence (negative: over-confident). Empty bins have NaN means.
    """
    logits, labels = _check(logits, labels)
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    confidence, preds = logits.softmax(dim=1).max(dim=1)
    correct = (preds == labels).double()
    confidence = confidence.double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # bin b holds confidences in (edges[b], edges[b + 1]]; a confidence of exactly 0 cannot occur
    index = (torch.bucketize(confidence, edges, right=False) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(index, minlength=n_bins).double()
    conf_sum = torch.bincount(index, weights=confidence, minlength=n_bins)
    acc_sum = torch.bincount(index, weights=correct, minlength=n_bins)
    nan = torch.full_like(count, float("nan"))
    mean_conf = torch.where(count > 0, conf_sum / count.clamp_min(1), nan)
    mean_acc = torch.where(count > 0, acc_sum / count.clamp_min(1), nan)
    return pd.DataFrame({
        "lo": edges[:-1].numpy(), "hi": edges[1:].numpy(), "count": count.long().numpy(),
        "confidence": mean_conf.numpy(), "accuracy": mean_acc.numpy(), "gap": (mean_acc - mean_conf).numpy(),
    })


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE = sum over bins of (images in the bin / all images) * |accuracy - confidence| (0 is perfect)."""
    bins = reliability_bins(logits, labels, n_bins)
    filled = bins[bins["count"] > 0]
    weights = filled["count"] / bins["count"].sum()
    return float((weights * (filled["accuracy"] - filled["confidence"]).abs()).sum())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 50) -> float:
    """The temperature ``T > 0`` that minimises the NLL of ``softmax(logits / T)`` on these (validation) logits.

    One parameter, ``log T`` (so that ``T`` stays positive), fitted by L-BFGS. ``T > 1`` softens an
    over-confident model; the argmax, and so the accuracy, never changes.
    """
    logits, labels = _check(logits, labels)
    logits = logits.double()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature):
        raise RuntimeError("temperature scaling diverged: are the logits finite?")
    return temperature


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Calibrated logits ``logits / T``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be more than 0, got {temperature}")
    return logits / temperature


# --- robustness: corrupted images ----------------------------------------------------------------

# Five severities per corruption, the parameters of CIFAR-10-C (Hendrycks and Dietterich, 2019).
SEVERITIES: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise standard deviation, on the 0-1 pixel scale
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # blur standard deviation in pixels
    "jpeg": (80, 65, 58, 50, 40),  # JPEG quality (lower: coarser)
}
CORRUPTIONS = tuple(SEVERITIES)


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """A Gaussian blur of standard deviation ``sigma`` pixels, over ``3 sigma`` on each side, reflected borders."""
    from torchvision.transforms.v2.functional import gaussian_blur

    size = 2 * max(1, math.ceil(3 * sigma)) + 1
    return gaussian_blur(images, kernel_size=[size, size], sigma=[sigma, sigma])  # uint8 in, rounded uint8 out


def _jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Each image saved as a JPEG of ``quality`` by Pillow and read back."""
    from PIL import Image

    out = torch.empty_like(images)
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
        out[i] = read_image(buffer.getvalue())
    return out


def corrupt(images: torch.Tensor, corruption: str, severity: int, *, seed: int = 0) -> torch.Tensor:
    """A corrupted copy of uint8 images ``[N, 3, H, W]``; ``severity`` 1-5 (0 returns the images unchanged).

    ``gaussian_noise`` adds seeded noise, ``gaussian_blur`` blurs with a Gaussian kernel (reflected
    borders), ``jpeg`` round-trips each image through Pillow's JPEG encoder.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"corrupt expects uint8 images [N, 3, H, W]; got {images.dtype} {tuple(images.shape)}")
    if corruption not in SEVERITIES:
        raise ValueError(f"unknown corruption {corruption!r}; known: {', '.join(CORRUPTIONS)}")
    levels = SEVERITIES[corruption]
    if not 0 <= severity <= len(levels):
        raise ValueError(f"severity must be 0 (clean) to {len(levels)}, got {severity}")
    if severity == 0 or images.shape[0] == 0:
        return images.clone()
    level = levels[severity - 1]
    images = images.cpu()
    if corruption == "gaussian_noise":
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(images.shape, generator=generator) * (level * 255.0)
        return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)
    if corruption == "gaussian_blur":
        return _blur(images, float(level))
    return _jpeg(images, int(level))


def corruption_table(
    predict: Predict,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = (1, 3, 5),
    seed: int = 0,
) -> pd.DataFrame:
    """Accuracy under corruption: one row per corruption, one column per severity (column 0 = clean images).

    ``predict`` maps uint8 images to logits; the clean images are predicted once.
    """
    clean = accuracy(predict(images), labels)
    rows = {}
    for corruption in corruptions:
        row = {0: clean}
        for severity in severities:
            row[severity] = accuracy(predict(corrupt(images, corruption, severity, seed=seed)), labels)
        rows[corruption] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "corruption"
    table.columns.name = "severity"
    return table


__all__ = [
    "accuracy", "top_k_accuracy", "accuracy_se", "paired_difference", "confusion_matrix", "per_class_recall",
    "balanced_accuracy", "per_class_table", "confident_mistakes",  # accuracy and per-class scores
    "average_logits", "flip_tta",  # test-time augmentation
    "nll", "reliability_bins", "expected_calibration_error", "fit_temperature", "apply_temperature",  # calibration
    "SEVERITIES", "CORRUPTIONS", "corrupt", "corruption_table",  # robustness
]
