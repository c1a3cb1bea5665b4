"""Grad-CAM, saliency, feature maps and embeddings on small models whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from resnet_lessons import explain
from resnet_lessons.data import normalise
from resnet_lessons.models import build_model


class TinyNet(nn.Module):
    """conv -> conv (stride 2) -> global average pool -> fc; ``body`` is the 8x8 map Grad-CAM reads."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.stem(x)).mean(dim=(2, 3)))


def quadrant_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """16x16 noise images; only the top-left quadrant says the class: a red (0) or green (1) square."""
    x = 0.3 * torch.randn(n, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    x[torch.arange(n), labels, 2:6, 2:6] += 2.0  # channel 0 (red) for class 0, channel 1 (green) for class 1
    return x, labels


@pytest.fixture(scope="module")
def quadrant_model() -> TinyNet:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(25):
        x, labels = quadrant_images(32, generator)
        loss = nn.functional.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, labels = quadrant_images(200, generator)
    with torch.no_grad():
        assert (model(x).argmax(dim=1) == labels).float().mean() > 0.95  # it learned the task
    return model


def test_grad_cam_puts_its_mass_where_the_class_is(quadrant_model: TinyNet) -> None:
    x, labels = quadrant_images(32, torch.Generator().manual_seed(1))
    cam = explain.grad_cam(quadrant_model, x, "body", target=labels)
    assert cam.shape == (32, 8, 8)
    assert cam.amax(dim=(1, 2)).allclose(torch.ones(32))  # normalised to a maximum of 1
    top_left = cam[:, :4, :4].sum(dim=(1, 2)) / cam.sum(dim=(1, 2))
    assert top_left.mean() > 0.6  # the quadrant is a quarter of the image
    assert (top_left > 0.4).all()
    large = explain.upsample(cam, 16)
    assert large.shape == (32, 16, 16)
    assert (large[:, :8, :8].sum(dim=(1, 2)) / large.sum(dim=(1, 2))).mean() > 0.6


def test_grad_cam_matches_its_definition_and_cleans_up() -> None:
    torch.manual_seed(0)
    model = TinyNet().train()
    x = torch.randn(3, 3, 16, 16)
    cam = explain.grad_cam(model, x, "body", target=1, normalise=False)
    model.eval()
    activation = model.body(model.stem(x)).detach().requires_grad_(True)
    score = model.fc(activation.mean(dim=(2, 3)))[:, 1].sum()
    (gradient,) = torch.autograd.grad(score, activation)
    expected = torch.relu((gradient.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1))
    torch.testing.assert_close(cam, expected.detach())
    assert model.body._forward_hooks == {}
    with pytest.raises(ValueError, match="no layer 'layer9'"):
        explain.grad_cam(model, x, "layer9")


@pytest.mark.parametrize(("name", "options", "side", "side2"), [
    ("resnet20", {}, 8, 16), ("resnet18", {"stem": "cifar", "width": 0.25}, 4, 16), ("resnet9", {"width": 0.25}, 4, 8),
])
def test_grad_cam_resolution_of_each_resnet_stage(name: str, options: dict, side: int, side2: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, **options).train()
    x = torch.randn(2, 3, 32, 32)
    last = model.stage_names[-1]
    assert explain.grad_cam(model, x, last).shape == (2, side, side)
    assert explain.grad_cam(model, x, "layer2").shape == (2, side2, side2)  # ResNet-9 pools in every stage
    assert model.training  # the mode it had is given back
    maps = explain.feature_maps(model, x)
    assert list(maps) == model.stage_names
    assert maps[last].shape[-1] == side
    with torch.no_grad():
        model.eval()
        stem = model.relu(model.bn1(model.conv1(x)))
        torch.testing.assert_close(maps["layer1"], model.layer1(model.maxpool(stem)))


def test_saliency_of_a_linear_model_is_its_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x = torch.randn(2, 3, 4, 4)
    result = explain.saliency(model, x, target=3)
    expected = model[1].weight[3].detach().view(3, 4, 4).abs().amax(dim=0)
    torch.testing.assert_close(result, expected.expand(2, 4, 4))


def test_rank_correlation_matches_scipy_with_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (5, 4, 4), generator=generator).float()  # many ties, as in a ReLU'd 4x4 map
    b = torch.randint(0, 4, (5, 4, 4), generator=generator).float()
    ours = explain.rank_correlation(a, b)
    for i in range(5):
        expected = stats.spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic
        assert ours[i].item() == pytest.approx(expected)
    assert explain.rank_correlation(a, a).tolist() == pytest.approx([1.0] * 5)
    assert explain.rank_correlation(a, -a).tolist() == pytest.approx([-1.0] * 5)
    assert torch.isnan(explain.rank_correlation(torch.zeros(1, 4), torch.arange(4.0)[None])).all()
    with pytest.raises(ValueError, match="one shape"):
        explain.rank_correlation(a, b[:, :2])


def test_penultimate_features_use_features_or_the_fc_input() -> None:
    torch.manual_seed(0)
    model = build_model("resnet8")
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)
    features = explain.penultimate_features(model, images, mean=mean, std=std, batch_size=2)
    with torch.no_grad():
        expected = model.eval().features(normalise(images, mean, std))
    torch.testing.assert_close(features, expected)
    tiny = TinyNet()  # no features(): the input of its fc layer is read with a hook
    small = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    got = explain.penultimate_features(tiny, small, mean=(0, 0, 0), std=(1, 1, 1))
    with torch.no_grad():
        torch.testing.assert_close(got, tiny.body(tiny.stem(small.float() / 255)).mean(dim=(2, 3)))


def test_pca_embedding_matches_sklearn() -> None:
    decomposition = pytest.importorskip("sklearn.decomposition")
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(100, 6, generator=generator) * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    ours = explain.embed_2d(features, "pca")
    theirs = decomposition.PCA(n_components=2).fit_transform(features.numpy())
    np.testing.assert_allclose(np.abs(ours.numpy()), np.abs(theirs), atol=1e-3)
    assert explain.embed_2d(features[:20], "tsne", max_iter=250).shape == (20, 2)
    with pytest.raises(ValueError, match="unknown method"):
        explain.embed_2d(features, "umap")


def test_the_plots_of_chapters_7_to_9_draw() -> None:
    from matplotlib.figure import Figure

    from resnet_lessons import metrics, plots

    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    logits, labels = torch.randn(40, 3), torch.randint(0, 3, (40,))
    maps = {"layer3": torch.rand(4, 2, 2), "saliency": torch.rand(4, 8, 8)}
    figures = [
        plots.confusion_matrix_figure(metrics.confusion_matrix(labels, logits.argmax(1), 3), ["a", "b", "c"]),
        plots.reliability_diagram(metrics.reliability_bins(logits, labels)),
        plots.labelled_images(images, ["w", "x", "y", "z"], ncols=3),
        plots.robustness_curves(metrics.corruption_table(lambda b: torch.zeros(len(b), 3), images, labels[:4],
                                                         severities=(1,))),
        plots.heatmap_rows(images, maps, titles=list("abcd")),
        plots.feature_map_grid({"layer1": torch.rand(4, 8, 8), "layer2": torch.rand(8, 4, 4)}, channels=6),
        plots.embedding_scatter(torch.randn(40, 2), labels, ["a", "b", "c"]),
        plots.retrieval_grid(images[:2], images, torch.tensor([[1, 2], [3, 0]]),
                             relevant=torch.tensor([[True, False], [False, True]])),
    ]
    assert all(isinstance(figure, Figure) for figure in figures)
