"""The seeded sample order (resnet_lessons.data.random_order) that chapters take subsets with."""

import pytest
import torch

from resnet_lessons.data import random_order


def test_random_order_is_a_seeded_permutation_that_samples_every_class():
    order = random_order(2000, seed=3)
    assert sorted(order.tolist()) == list(range(2000))
    assert torch.equal(order, random_order(2000, seed=3)) and not torch.equal(order, random_order(2000, seed=4))
    labels = torch.arange(10).repeat_interleave(200)  # a split stored sorted by class
    assert labels[:500].unique().numel() == 3  # its first images are not a sample
    counts = torch.bincount(labels[order[:500]], minlength=10)
    assert counts.min() > 25  # every class, near 50 each
    assert random_order(0).numel() == 0
    with pytest.raises(ValueError, match="at least 0"):
        random_order(-1)


def test_flip_tta_accuracy_is_chapter_7s_rule_and_keeps_the_mode():
    from functools import partial

    from resnet_lessons import evaluate, metrics
    from resnet_lessons.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet8", width=0.25).train()
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    labels = torch.randint(0, 10, (12,))
    stats = dict(mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
    plain, tta = evaluate.flip_tta_accuracy(model, images, labels, batch_size=5, **stats)
    predict = partial(evaluate.infer, model, **stats)
    assert plain == metrics.accuracy(predict(images), labels)
    assert tta == metrics.accuracy(metrics.flip_tta(predict, images), labels)
    assert model.training
    assert evaluate.flip_tta_accuracy(model, images[:0], labels[:0], **stats) == (0.0, 0.0)


def test_per_class_accuracy_is_each_classes_recall():
    from resnet_lessons import evaluate

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    result = evaluate.metrics_from_logits(logits, torch.tensor([0, 0, 1, 1]), ["a", "b", "c"])
    assert result.accuracy == 0.5 and result.n == 4
    assert result.per_class["a"] == 0.5 and result.per_class["b"] == 0.5
    assert result.per_class["c"] != result.per_class["c"]  # NaN: no image of class c
