"""Metrics against hand calculations and scikit-learn; calibration and robustness on synthetic cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resnet_lessons import metrics

sk_metrics = pytest.importorskip("sklearn.metrics")

CLASSES = ("cat", "dog", "ship")


def hand_logits() -> tuple[torch.Tensor, torch.Tensor]:
    # preds: 0, 1, 1, 2, 0, 1 ; labels: 0, 1, 0, 2, 2, 2
    logits = torch.tensor([
        [3.0, 1.0, 0.0],
        [0.0, 2.0, 1.0],
        [1.0, 2.0, 0.0],
        [0.0, 0.5, 1.0],
        [2.0, 0.0, 1.5],
        [0.0, 3.0, 2.9],
    ])
    labels = torch.tensor([0, 1, 0, 2, 2, 2])
    return logits, labels


def test_accuracy_and_top_k_by_hand() -> None:
    logits, labels = hand_logits()
    assert metrics.accuracy(logits, labels) == pytest.approx(3 / 6)
    # top-2: row 2 (label 0 second), row 4 (label 2 second), row 5 (label 2 second) become right
    assert metrics.top_k_accuracy(logits, labels, k=2) == pytest.approx(6 / 6)
    assert metrics.top_k_accuracy(logits, labels, k=1) == metrics.accuracy(logits, labels)
    assert metrics.top_k_accuracy(logits, labels, k=2) == pytest.approx(
        sk_metrics.top_k_accuracy_score(labels.numpy(), logits.numpy(), k=2)
    )


def test_confusion_matrix_and_per_class_table_match_sklearn() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 4, generator=generator)
    logits[:, 3] -= 10  # class 3 is never predicted: precision must be 0, not NaN
    labels = torch.randint(0, 4, (300,), generator=generator)
    preds = logits.argmax(dim=1)
    cm = metrics.confusion_matrix(labels, preds, 4)
    assert cm.tolist() == sk_metrics.confusion_matrix(labels.numpy(), preds.numpy(), labels=range(4)).tolist()

    names = ["a", "b", "c", "d"]
    table = metrics.per_class_table(logits, labels, names)
    p, r, f, s = sk_metrics.precision_recall_fscore_support(
        labels.numpy(), preds.numpy(), labels=range(4), zero_division=0
    )
    np.testing.assert_allclose(table.loc[names, "precision"], p)
    np.testing.assert_allclose(table.loc[names, "recall"], r)
    np.testing.assert_allclose(table.loc[names, "f1"], f)
    assert table.loc[names, "support"].tolist() == s.tolist()
    assert table.loc["d", "precision"] == 0.0
    assert table.loc["macro avg", "f1"] == pytest.approx(
        sk_metrics.f1_score(labels.numpy(), preds.numpy(), average="macro", zero_division=0)
    )
    assert table.loc["macro avg", "support"] == 300


def test_per_class_table_by_hand() -> None:
    logits, labels = hand_logits()
    table = metrics.per_class_table(logits, labels, CLASSES)
    # cat: predicted twice (rows 0, 4), right once; 2 cats, 1 found
    assert table.loc["cat", "precision"] == pytest.approx(1 / 2)
    assert table.loc["cat", "recall"] == pytest.approx(1 / 2)
    # ship: predicted once (row 3), right; 3 ships
    assert table.loc["ship", "precision"] == pytest.approx(1.0)
    assert table.loc["ship", "recall"] == pytest.approx(1 / 3)
    assert table.loc["ship", "f1"] == pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3))


def test_confident_mistakes_by_hand() -> None:
    logits, labels = hand_logits()
    table = metrics.confident_mistakes(logits, labels, CLASSES, k=2)
    probs = logits.softmax(dim=1)
    # wrong rows: 2 (conf p[2,1]), 4 (p[4,0]), 5 (p[5,1]); the two most confident first
    wrong = {2: probs[2, 1].item(), 4: probs[4, 0].item(), 5: probs[5, 1].item()}
    expected = sorted(wrong, key=wrong.get, reverse=True)[:2]
    assert table["index"].tolist() == expected
    assert table["confidence"].tolist() == pytest.approx([wrong[i] for i in expected])
    assert table.loc[0, "label"] == CLASSES[int(labels[expected[0]])]
    assert table["p_label"].iloc[0] == pytest.approx(probs[expected[0], labels[expected[0]]].item())


def test_flip_tta_averages_the_logits_of_image_and_mirror() -> None:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (5, 3, 6, 6), dtype=torch.uint8, generator=generator)
    weight = torch.randn(3 * 6 * 6, 4, generator=generator)

    def predict(batch: torch.Tensor) -> torch.Tensor:  # a position-dependent "model"
        return batch.float().flatten(1) @ weight / 255

    combined = metrics.flip_tta(predict, images)
    torch.testing.assert_close(combined, (predict(images) + predict(images.flip(-1))) / 2)
    torch.testing.assert_close(metrics.flip_tta(predict(images), predict(images.flip(-1))), combined)
    # the one rule: a sum of logits has the same argmax, so the same accuracy
    assert torch.equal(combined.argmax(1), (predict(images) + predict(images.flip(-1))).argmax(1))
    with pytest.raises(ValueError, match="share one shape"):
        metrics.average_logits(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="at least one"):
        metrics.average_logits()


def test_speed_benchmark_uses_the_same_tta_rule() -> None:
    evaluate = pytest.importorskip("resnet_lessons.evaluate")  # where the benchmark's flip_tta_accuracy lives
    assert evaluate.average_logits is metrics.average_logits


def test_accuracy_se_by_hand() -> None:
    assert metrics.accuracy_se(0.9, 10_000) == pytest.approx(0.003)  # sqrt(0.9 * 0.1 / 10,000)
    assert metrics.accuracy_se(0.5, 100) == pytest.approx(0.05)
    assert metrics.accuracy_se(1.0, 50) == 0.0
    # it is the spread of the accuracy of a fixed model over test sets drawn afresh
    generator = torch.Generator().manual_seed(0)
    draws = (torch.rand(4_000, 400, generator=generator) < 0.8).double().mean(dim=1)
    assert draws.std().item() == pytest.approx(metrics.accuracy_se(0.8, 400), rel=0.05)
    with pytest.raises(ValueError, match="between 0 and 1"):
        metrics.accuracy_se(1.2, 10)
    with pytest.raises(ValueError, match="at least one image"):
        metrics.accuracy_se(0.5, 0)


def test_paired_difference_by_hand() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    a = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 1, 1, 0, 0]), 2).float()  # 4 of 8 right
    b = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 1, 1, 1, 1, 0]), 2).float()  # 6 of 8 right
    diff, se = metrics.paired_difference(a, b, labels)
    d = np.array([0, 0, 1, 0, 0, 0, 1, 0], dtype=float)  # b right and a wrong on images 2 and 6, never the reverse
    assert diff == pytest.approx(metrics.accuracy(b, labels) - metrics.accuracy(a, labels)) == pytest.approx(0.25)
    assert se == pytest.approx(d.std() / math.sqrt(8))
    assert metrics.paired_difference(a, a, labels) == (0.0, 0.0)
    with pytest.raises(ValueError, match="share one shape"):
        metrics.paired_difference(a, torch.zeros(8, 3), labels)


def binary_logits(confidence: torch.Tensor) -> torch.Tensor:
    """Two-class logits whose largest softmax probability is ``confidence`` (on class 0)."""
    return torch.stack([confidence.log(), (1 - confidence).log()], dim=1)


def test_reliability_bins_and_ece_by_hand() -> None:
    confidence = torch.tensor([0.55, 0.65, 0.95, 0.95], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 0])  # the first two in bin (0.5, 0.75]: half right; the last two right
    logits = binary_logits(confidence)
    bins = metrics.reliability_bins(logits, labels, n_bins=4)
    assert bins["count"].tolist() == [0, 0, 2, 2]
    assert bins.loc[2, "confidence"] == pytest.approx(0.60)
    assert bins.loc[2, "accuracy"] == pytest.approx(0.5)
    assert bins.loc[3, "gap"] == pytest.approx(0.05)
    assert math.isnan(bins.loc[0, "accuracy"])
    ece = metrics.expected_calibration_error(logits, labels, n_bins=4)
    assert ece == pytest.approx(0.5 * 0.10 + 0.5 * 0.05)


def test_ece_near_zero_when_perfectly_calibrated() -> None:
    generator = torch.Generator().manual_seed(0)
    n = 200_000
    confidence = 0.5 + 0.5 * torch.rand(n, generator=generator, dtype=torch.float64) * 0.999
    right = torch.rand(n, generator=generator, dtype=torch.float64) < confidence  # right with probability = confidence
    labels = torch.where(right, 0, 1)
    ece = metrics.expected_calibration_error(binary_logits(confidence), labels)
    assert ece < 0.01
    # the same model made over-confident is clearly miscalibrated
    assert metrics.expected_calibration_error(binary_logits(confidence) * 4, labels) > 0.1


def test_temperature_scaling_fixes_an_over_confident_model() -> None:
    generator = torch.Generator().manual_seed(0)
    true_logits = 2.0 * torch.randn(10_000, 5, generator=generator)
    labels = torch.multinomial(true_logits.softmax(dim=1), 1, generator=generator).flatten()
    overconfident = 3.0 * true_logits  # sharpened: the same argmax, too sure of it
    val, test = slice(0, 5_000), slice(5_000, None)

    temperature = metrics.fit_temperature(overconfident[val], labels[val])
    assert temperature == pytest.approx(3.0, rel=0.1)
    calibrated = metrics.apply_temperature(overconfident[test], temperature)
    assert metrics.nll(calibrated, labels[test]) < metrics.nll(overconfident[test], labels[test]) - 0.1
    assert metrics.expected_calibration_error(calibrated, labels[test]) < metrics.expected_calibration_error(
        overconfident[test], labels[test]
    )
    assert metrics.accuracy(calibrated, labels[test]) == metrics.accuracy(overconfident[test], labels[test])
    assert metrics.nll(overconfident, labels) == pytest.approx(F.cross_entropy(overconfident, labels).item())


def test_corruptions() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=generator)
    for corruption in metrics.CORRUPTIONS:
        assert torch.equal(metrics.corrupt(images, corruption, 0), images)
        mild = metrics.corrupt(images, corruption, 1)
        strong = metrics.corrupt(images, corruption, 5)
        assert mild.dtype == torch.uint8 and mild.shape == images.shape
        assert (mild.float() - images.float()).abs().mean() < (strong.float() - images.float()).abs().mean()
    noisy = metrics.corrupt(torch.full((8, 3, 32, 32), 128, dtype=torch.uint8), "gaussian_noise", 5)
    assert (noisy.float() / 255).std().item() == pytest.approx(0.10, rel=0.05)
    flat = torch.full((1, 3, 8, 8), 77, dtype=torch.uint8)
    assert torch.equal(metrics.corrupt(flat, "gaussian_blur", 5), flat)
    assert torch.equal(metrics.corrupt(images, "gaussian_noise", 3, seed=4),
                       metrics.corrupt(images, "gaussian_noise", 3, seed=4))


def test_blur_matches_torchvision() -> None:
    tf = pytest.importorskip("torchvision.transforms.functional")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 12, 12), dtype=torch.uint8, generator=generator)
    ours = metrics.corrupt(images, "gaussian_blur", 5)  # sigma 1.0, radius 3
    theirs = tf.gaussian_blur(images.float(), kernel_size=7, sigma=1.0).round().clamp(0, 255).to(torch.uint8)
    assert (ours.int() - theirs.int()).abs().max() <= 1


def test_corruption_table() -> None:
    images = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    images[:3] = 200  # bright = class 1, dark = class 0
    labels = torch.tensor([1, 1, 1, 0, 0, 0])

    def predict(batch: torch.Tensor) -> torch.Tensor:
        brightness = batch.float().mean(dim=(1, 2, 3)) / 255
        return torch.stack([0.5 - brightness, brightness - 0.5], dim=1)

    table = metrics.corruption_table(predict, images, labels, severities=(1, 5))
    assert list(table.index) == list(metrics.CORRUPTIONS)
    assert list(table.columns) == [0, 1, 5]
    assert (table[0] == 1.0).all()
    assert ((table >= 0) & (table <= 1)).all().all()


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="labels must be"):
        metrics.accuracy(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        metrics.accuracy(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="k must be"):
        metrics.top_k_accuracy(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), k=3)
    with pytest.raises(ValueError, match="unknown corruption"):
        metrics.corrupt(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        metrics.corrupt(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "jpeg", 6)
    with pytest.raises(ValueError, match="2 class names"):
        metrics.per_class_table(torch.zeros(3, 3), torch.zeros(3, dtype=torch.long), ["a", "b"])
