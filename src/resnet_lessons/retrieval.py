"""Image retrieval (chapter 9): the gallery images nearest to a query in penultimate-feature space.

:func:`nearest_neighbours` ranks gallery rows by cosine similarity, :func:`precision_at_k` scores a ranking
against class labels, and :func:`search` does both end to end on uint8 images or image files, with the features
of :func:`resnet_lessons.explain.penultimate_features`. A bad item (an unreadable file, a non-image, an image of
another size) does not stop a search: it is left out and named in :attr:`SearchResult.errors`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .data.images import read_image
from .explain import penultimate_features

Item = torch.Tensor | str | Path  # a uint8 image [3, H, W], or the path of an image file
Size = tuple[int, int]  # (height, width) in pixels


def nearest_neighbours(
    query_features: torch.Tensor, gallery_features: torch.Tensor, k: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(similarity, index)``, each ``[Q, k]``: the ``k`` gallery rows most similar (cosine) to each query,
    best first."""
    if query_features.ndim != 2 or gallery_features.ndim != 2 or query_features.shape[1] != gallery_features.shape[1]:
        raise ValueError(
            f"query features {tuple(query_features.shape)} and gallery features {tuple(gallery_features.shape)} "
            "must be [Q, D] and [G, D] with the same D"
        )
    if not 1 <= k <= gallery_features.shape[0]:
        raise ValueError(f"k must be between 1 and the gallery size ({gallery_features.shape[0]}); got {k}")
    similarity = F.normalize(query_features.float(), dim=1) @ F.normalize(gallery_features.float(), dim=1).T
    return similarity.topk(k, dim=1)


def precision_at_k(neighbour_labels: torch.Tensor, query_labels: torch.Tensor) -> torch.Tensor:
    """Per query ``[Q]``: the share of its ``k`` retrieved images (``neighbour_labels [Q, k]``) of the query's class."""
    return (neighbour_labels == query_labels[:, None]).float().mean(dim=1)


@dataclass
class SearchResult:
    """What :func:`search` found: one row per (query, rank), the per-item errors, and precision@k."""

    neighbours: pd.DataFrame  # query, rank, gallery_index, similarity (+ query_label, gallery_label, relevant)
    errors: dict[str, str] = field(default_factory=dict)  # "query 3" / "gallery 7" / "queries" -> what was wrong
    query_index: list[int] = field(default_factory=list)  # the queries that were searched
    gallery_index: list[int] = field(default_factory=list)  # the gallery images that were used

    @property
    def precision_at_k(self) -> float:
        """Mean precision@k over the searched queries (NaN without labels or without queries)."""
        if "relevant" not in self.neighbours or self.neighbours.empty:
            return float("nan")
        return float(self.neighbours.groupby("query")["relevant"].mean().mean())

    def indices(self) -> torch.Tensor:
        """Gallery indices ``[Q, k]`` of the searched queries, best first (a convenience for plots)."""
        if self.neighbours.empty:
            return torch.empty(0, 0, dtype=torch.long)
        table = self.neighbours.pivot(index="query", columns="rank", values="gallery_index")
        return torch.tensor(table.loc[self.query_index].to_numpy(), dtype=torch.long)


# --- reading the items of a search ----------------------------------------------------------------


def _read(item: Item) -> torch.Tensor:
    """One image as uint8 ``[3, H, W]``: a tensor as it is, or a file read as RGB (:func:`~.data.read_image`)."""
    if isinstance(item, (str, Path)):
        return read_image(item)
    if not isinstance(item, torch.Tensor):
        raise ValueError(f"expected an image tensor or a file path, got {type(item).__name__}")
    if item.dtype != torch.uint8 or item.ndim != 3 or item.shape[0] != 3:
        raise ValueError(f"expected a uint8 image [3, H, W], got {item.dtype} {tuple(item.shape)}")
    return item


def _items(collection: torch.Tensor | Sequence[Item]) -> list[Item]:
    if isinstance(collection, torch.Tensor):
        if collection.ndim != 4:
            raise ValueError(f"a stack of images must be [N, 3, H, W]; got {tuple(collection.shape)}")
        return list(collection.unbind(0))
    return list(collection)


def _load(kind: str, collection: torch.Tensor | Sequence[Item], size: Size | None,
          errors: dict[str, str]) -> tuple[list[int], list[torch.Tensor]]:
    """Read every item; keep those of ``size``, record an error for every other one."""
    kept, images = [], []
    for i, item in enumerate(_items(collection)):
        try:
            image = _read(item)
        except ValueError as error:
            errors[f"{kind} {i}"] = str(error)
            continue
        found = (image.shape[1], image.shape[2])
        if size is not None and found != size:
            errors[f"{kind} {i}"] = (
                f"image of {found[0]}x{found[1]} pixels, but the search compares {size[0]}x{size[1]} images "
                "(features of different sizes are not comparable): resize it first"
            )
            continue
        kept.append(i)
        images.append(image)
    return kept, images


def _common_size(gallery: torch.Tensor | Sequence[Item], image_size: int | Size | None) -> Size | None:
    """``image_size`` as (height, width), else the most common size among the gallery's tensors (None for
    a gallery of paths: the first readable file sets it)."""
    if isinstance(image_size, int):
        return image_size, image_size
    if image_size:
        return image_size[0], image_size[1]
    readable = [(t.shape[1], t.shape[2]) for t in _items(gallery) if isinstance(t, torch.Tensor) and t.ndim == 3]
    return Counter(readable).most_common(1)[0][0] if readable else None


def _table(query_kept: list[int], gallery_ids: torch.Tensor, similarity: torch.Tensor,
           query_labels: torch.Tensor | Sequence[int] | None,
           gallery_labels: torch.Tensor | Sequence[int] | None) -> pd.DataFrame:
    """One row per (query, rank); with both label sets, whether the neighbour is of the query's class."""
    k = gallery_ids.shape[1]
    table = pd.DataFrame({
        "query": np.repeat(query_kept, k),
        "rank": np.tile(np.arange(1, k + 1), len(query_kept)),
        "gallery_index": gallery_ids.flatten().numpy(),
        "similarity": similarity.flatten().numpy(),
    })
    if query_labels is not None and gallery_labels is not None:
        q_labels = torch.as_tensor(query_labels)[query_kept]
        g_labels = torch.as_tensor(gallery_labels)[gallery_ids]
        table["query_label"] = np.repeat(q_labels.numpy(), k)
        table["gallery_label"] = g_labels.flatten().numpy()
        table["relevant"] = table["query_label"] == table["gallery_label"]
    return table


def search(
    model: nn.Module,
    queries: torch.Tensor | Sequence[Item],
    gallery: torch.Tensor | Sequence[Item],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    k: int = 5,
    query_labels: torch.Tensor | Sequence[int] | None = None,
    gallery_labels: torch.Tensor | Sequence[int] | None = None,
    image_size: int | Size | None = None,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
) -> SearchResult:
    """Image retrieval: for each query image, the ``k`` gallery images nearest in penultimate-feature space (cosine).

    ``queries`` and ``gallery`` are uint8 stacks ``[N, 3, H, W]`` or lists of uint8 ``[3, H, W]``
    images or file paths. Bad items do not stop the search: an unreadable file, a non-image, or an
    image of another size than ``image_size`` (default: the most common size in the gallery) is
    left out and named in ``result.errors``; so is an empty query set or gallery. With labels,
    each row says whether the neighbour is of the query's class (``relevant``) and
    ``result.precision_at_k`` is measured.
    """
    errors: dict[str, str] = {}
    size = _common_size(gallery, image_size)
    gallery_kept, gallery_images = _load("gallery", gallery, size, errors)
    if size is None and gallery_images:  # a gallery of paths: the first readable image sets the size
        size = (gallery_images[0].shape[1], gallery_images[0].shape[2])
        gallery_kept, gallery_images = _load("gallery", gallery, size, errors)
    query_kept, query_images = _load("query", queries, size, errors)
    if not gallery_images:
        errors["gallery"] = "the gallery is empty (or none of its images could be used): nothing to search in"
    if not query_images:
        errors["queries"] = "the query set is empty (or none of its images could be used): nothing to search for"
    if not gallery_images or not query_images:
        empty = pd.DataFrame(columns=["query", "rank", "gallery_index", "similarity"])
        return SearchResult(empty, errors, [], gallery_kept)
    if not 1 <= k <= len(gallery_images):
        raise ValueError(f"k must be between 1 and the usable gallery size ({len(gallery_images)}); got {k}")

    def features(images: list[torch.Tensor]) -> torch.Tensor:
        return penultimate_features(model, torch.stack(images), mean=mean, std=std, batch_size=batch_size,
                                    device=device)

    similarity, index = nearest_neighbours(features(query_images), features(gallery_images), k)
    gallery_ids = torch.as_tensor(gallery_kept)[index]  # positions in the gallery as given
    table = _table(query_kept, gallery_ids, similarity, query_labels, gallery_labels)
    return SearchResult(table, errors, query_kept, gallery_kept)


__all__ = ["Item", "SearchResult", "nearest_neighbours", "precision_at_k", "search"]
