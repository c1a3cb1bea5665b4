"""The synthetic stand-in: deterministic, balanced, CIFAR-shaped, and learnable but not trivially."""

import torch

from resnet_lessons import runtime
from resnet_lessons.book import load_for_profile
from resnet_lessons.data import make_synthetic
from resnet_lessons.models import build_model
from resnet_lessons.profiles import PROFILES
from resnet_lessons.train import config_from_profile, fit


def test_same_seed_same_images_other_seed_other_images():
    a, b, c = make_synthetic(20, seed=1), make_synthetic(20, seed=1), make_synthetic(20, seed=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_cifar_shaped_and_balanced():
    data = make_synthetic(30)
    assert data.images.shape == (300, 3, 32, 32) and data.images.dtype == torch.uint8
    assert set(data.counts().values()) == {30} and len(data.classes) == 10


def test_not_learnable_from_colour_alone():
    """A nearest-class-mean classifier on mean colour stays far below what a ResNet reaches."""
    data = make_synthetic(200, seed=3)
    colour = data.images.float().mean(dim=(2, 3))
    centres = torch.stack([colour[data.labels == c].mean(0) for c in range(10)])
    held_out = make_synthetic(100, seed=4)
    test_colour = held_out.images.float().mean(dim=(2, 3))
    preds = torch.cdist(test_colour, centres).argmin(1)
    assert (preds == held_out.labels).float().mean() < 0.4


def test_smoke_recipe_learns_it_far_above_chance():
    """The bar stated by the foundation issue: >= 60% validation accuracy in the smoke budget (chance: 10%)."""
    profile = PROFILES["smoke"]
    runtime.seed_everything(profile.seed)
    data = load_for_profile(profile, "synthetic")
    model = build_model(profile.model, num_classes=len(data.classes), **profile.model_options)
    result = fit(model, data, config_from_profile(profile), device=torch.device("cpu"))
    first, last = result.history["val_accuracy"].iloc[0], result.history["val_accuracy"].iloc[-1]
    assert last >= 0.60, result.history
    assert first < last  # learned over several epochs, not in one step
