"""Retrieval: nearest neighbours and precision@k on toy features, and searches with known answers and bad items."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from resnet_lessons import retrieval


def test_nearest_neighbours_and_precision_on_a_toy_set() -> None:
    gallery = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    gallery_labels = torch.tensor([0, 0, 1, 1, 2])
    queries = torch.tensor([[10.0, 0.5], [0.0, 3.0]])  # cosine ignores length
    similarity, index = retrieval.nearest_neighbours(queries, gallery, k=3)
    assert index[:, :2].tolist() == [[0, 1], [2, 3]]
    brute = torch.nn.functional.cosine_similarity(queries[:, None], gallery[None], dim=2)
    torch.testing.assert_close(similarity, brute.sort(dim=1, descending=True).values[:, :3])
    precision = retrieval.precision_at_k(gallery_labels[index], torch.tensor([0, 1]))
    torch.testing.assert_close(precision, torch.tensor([2 / 3, 2 / 3]))


class MeanColour(nn.Module):
    """Features = the mean of each channel: images of the same colour are each other's neighbours."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def solid(rgb: tuple[int, int, int], size: int = 8) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, size, size).clone()


def test_search_finds_known_neighbours_and_reports_bad_items(tmp_path) -> None:
    gallery = [solid((250, 0, 0)), solid((200, 20, 0)), solid((0, 250, 0)), solid((0, 0, 250)),
               solid((250, 0, 0), size=16), solid((0, 200, 30))]
    gallery_labels = [0, 0, 1, 2, 0, 1]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    good = tmp_path / "green.png"
    Image.fromarray(solid((10, 240, 10)).permute(1, 2, 0).numpy()).save(good)
    queries = [solid((240, 10, 0)), solid((0, 0, 255), size=12), str(broken), good, "missing.jpg"]
    query_labels = [0, 2, 0, 1, 1]
    result = retrieval.search(MeanColour(), queries, gallery, mean=(0, 0, 0), std=(1, 1, 1), k=2,
                            query_labels=query_labels, gallery_labels=gallery_labels)
    assert result.query_index == [0, 3]
    assert result.gallery_index == [0, 1, 2, 3, 5]
    assert set(result.errors) == {"gallery 4", "query 1", "query 2", "query 4"}
    assert "16x16" in result.errors["gallery 4"] and "8x8" in result.errors["gallery 4"]
    assert "cannot read" in result.errors["query 2"]
    assert result.indices().tolist() == [[0, 1], [2, 5]]
    assert result.precision_at_k == pytest.approx(1.0)
    assert result.neighbours["relevant"].all()


def test_search_with_an_empty_query_set_or_gallery() -> None:
    gallery = torch.stack([solid((250, 0, 0)), solid((0, 250, 0))])
    result = retrieval.search(MeanColour(), [], gallery, mean=(0, 0, 0), std=(1, 1, 1), k=1)
    assert "query set is empty" in result.errors["queries"]
    assert result.neighbours.empty and np.isnan(result.precision_at_k)
    result = retrieval.search(MeanColour(), gallery, [solid((1, 2, 3), size=4)], mean=(0, 0, 0), std=(1, 1, 1),
                            k=1, image_size=8)
    assert "gallery is empty" in result.errors["gallery"]
    assert "4x4" in result.errors["gallery 0"]


def test_a_file_with_transparency_is_read_as_rgb_over_white(tmp_path) -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent black: white once laid over white
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "clear.png")
    Image.fromarray(np.full((8, 8), 250, dtype=np.uint8), mode="L").save(tmp_path / "grey.png")
    gallery = [solid((255, 255, 255)), solid((0, 0, 0))]
    result = retrieval.search(MeanColour(), [tmp_path / "clear.png", tmp_path / "grey.png"], gallery,
                              mean=(0.5, 0.5, 0.5), std=(1, 1, 1), k=1)  # centred: white and black point apart
    assert not result.errors and result.indices().tolist() == [[0], [0]]
