"""evaluate: the seeded sample order that chapters take subsets with."""

import pytest
import torch

from resnet_lessons.evaluate import random_order


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
