"""Looking inside a trained network: Grad-CAM, saliency, feature maps, embeddings, retrieval.

All functions take a model and *normalised* float inputs ``x [B, 3, H, W]`` (what the model's
``forward`` sees; ``evaluate.normalise`` makes them from uint8 images), except those that work on
uint8 images end to end (:func:`penultimate_features`, :func:`search`), which take ``mean`` and
``std`` like ``evaluate.infer``. Layers are named as in ``model.named_modules()``: ``"layer3"`` is
the last stage of a CIFAR ResNet, ``"layer2.1"`` the second block of the second stage.

Grad-CAM (Selvaraju et al., 2017) weights each channel of a layer's output by the mean gradient of
the class score over that channel, sums the weighted channels and keeps the positive part. Its
resolution is the layer's: 8x8 for the last stage of resnet20 on 32x32 images, 4x4 for the CIFAR
ResNet-18, so each cell of the map speaks for a 4x4 or 8x8 block of pixels.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .evaluate import infer


def _layer(model: nn.Module, layer: str | nn.Module) -> nn.Module:
    if isinstance(layer, nn.Module):
        return layer
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in model.named_children()]
        raise ValueError(f"the model has no layer {layer!r}; its top-level layers are: {', '.join(names)}") from None


def _targets(logits: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    """One class index per image: the given one(s), or the predicted class when ``target`` is None."""
    if target is None:
        return logits.argmax(dim=1)
    t = torch.as_tensor(target, dtype=torch.long, device=logits.device)
    return t.expand(logits.shape[0]) if t.ndim == 0 else t


class _Capture:
    """A forward hook that keeps a layer's output (and hands a copy on, so later in-place ops leave it intact)."""

    def __init__(self, module: nn.Module) -> None:
        self.output: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self)

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"{type(module).__name__} returns {type(output).__name__}, not a tensor: pick another layer")
        self.output = output
        return output.clone()

    def __enter__(self) -> _Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


class _EvalMode:
    """Eval mode (BatchNorm running statistics) for the duration of a with-block, then the previous mode."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> nn.Module:
        return self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def grad_cam(
    model: nn.Module,
    x: torch.Tensor,
    layer: str | nn.Module = "layer3",
    target: int | Sequence[int] | torch.Tensor | None = None,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """Grad-CAM maps ``[B, h, w]`` at the resolution of ``layer``'s output, for class ``target`` (default: predicted).

    ``cam = ReLU(sum_k alpha_k A_k)`` with ``A_k`` the k-th channel of the layer's output and
    ``alpha_k`` the spatial mean of ``d score / d A_k``. With ``normalize`` each map is divided by
    its maximum (an all-zero map stays zero). :func:`upsample` brings a map to the image's size.
    """
    with _EvalMode(model), _Capture(_layer(model, layer)) as capture, torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)  # gradients flow even if the weights are frozen
        logits = model(x)
        activation = capture.output
        if activation is None or activation.ndim != 4:
            raise ValueError(f"layer {layer!r} must output a feature map [B, C, h, w] for Grad-CAM")
        target = _targets(logits, target)
        score = logits.gather(1, target[:, None]).sum()  # images are independent in eval mode
        (gradient,) = torch.autograd.grad(score, activation)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1)).detach()
    if normalize:
        cam = cam / cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return cam


def upsample(maps: torch.Tensor, size: tuple[int, int] | int) -> torch.Tensor:
    """Maps ``[B, h, w]`` resized to ``size`` (bilinear), for drawing over the images."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def saliency(
    model: nn.Module, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """Input-gradient saliency ``[B, H, W]``: the largest ``|d score / d pixel|`` over the three channels.

    It answers "which pixels would change the class score most if nudged", at full resolution.
    """
    with _EvalMode(model), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        logits = model(x)
        score = logits.gather(1, _targets(logits, target)[:, None]).sum()
        (gradient,) = torch.autograd.grad(score, x)
    return gradient.abs().amax(dim=1)


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor; tied values share the mean of their ranks (as scipy's ``rankdata``)."""
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    below = torch.cumsum(counts, 0) - counts  # values strictly smaller than each distinct value
    return (below + (counts + 1) / 2).to(torch.float64)[inverse]


def rank_correlation(maps_a: torch.Tensor, maps_b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of each pair of maps ``[B, ...]`` (one number per image, NaN for a constant map).

    The similarity measure of the sanity checks of Adebayo et al. (2018): the map of a trained network and the
    map of the same network with random weights should *not* be similar, or the map does not show what the
    network learned.
    """
    if maps_a.shape != maps_b.shape or maps_a.ndim < 2:
        raise ValueError(f"need two batches of maps of one shape [B, ...]; got {tuple(maps_a.shape)} and "
                         f"{tuple(maps_b.shape)}")
    out = []
    for a, b in zip(maps_a.detach().cpu().flatten(1), maps_b.detach().cpu().flatten(1)):
        ra, rb = _average_ranks(a) - (len(a) + 1) / 2, _average_ranks(b) - (len(b) + 1) / 2
        denominator = (ra.square().sum() * rb.square().sum()).sqrt()
        out.append((ra * rb).sum() / denominator if denominator > 0 else torch.tensor(float("nan")))
    return torch.stack(out).to(torch.float64)


def stage_names(model: nn.Module) -> list[str]:
    """The stages of a ResNet (``layer1``, ``layer2``, ...), or the model's top-level children otherwise."""
    names = getattr(model, "stage_names", None)
    return list(names) if names else [name for name, _ in model.named_children()]


@torch.no_grad()
def feature_maps(model: nn.Module, x: torch.Tensor, layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The output of each named layer (default: every stage) for inputs ``x``, captured with forward hooks."""
    layers = stage_names(model) if layers is None else list(layers)
    captures = {name: _Capture(_layer(model, name)) for name in layers}
    try:
        with _EvalMode(model):
            model(x)
    finally:
        for capture in captures.values():
            capture.handle.remove()
    return {name: capture.output.detach() for name, capture in captures.items()}


# --- penultimate features and a 2-D map of them ---------------------------------------------------


@torch.no_grad()
def penultimate_features(
    model: nn.Module,
    images: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 500,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """What the final linear layer sees: ``[N, num_features]`` float32 on the CPU, for uint8 images.

    Uses ``model.features(x)`` when the model has it; otherwise the input of its ``fc`` layer, read
    with a forward pre-hook.
    """
    return infer(model, images, mean=mean, std=std, batch_size=batch_size, device=device, output=_features)


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "features") and callable(model.features):
        return model.features(x)
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Module):
        raise ValueError("the model has neither a features(x) method nor an fc layer whose input to read")
    seen: list[torch.Tensor] = []
    handle = fc.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[-1].flatten(1)


def embed_2d(features: torch.Tensor, method: str = "pca", *, seed: int = 0, **tsne_options: Any) -> torch.Tensor:
    """Points ``[N, 2]`` for plotting ``[N, D]`` features: ``"pca"`` (the two directions of largest
    variance, via ``torch.pca_lowrank``) or ``"tsne"`` (scikit-learn's t-SNE, which keeps near
    neighbours near and says little about large distances; ``tsne_options`` go to ``TSNE``)."""
    if features.ndim != 2 or features.shape[0] < 3:
        raise ValueError(f"need features [N, D] with N >= 3; got {tuple(features.shape)}")
    features = features.float().cpu()
    if method == "pca":
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # pca_lowrank uses random projections
        try:
            centred = features - features.mean(dim=0)
            _, _, v = torch.pca_lowrank(centred, q=min(6, *features.shape), center=False)
        finally:
            torch.random.set_rng_state(generator_state)
        points = centred @ v[:, :2]
        # fix each axis' sign (an eigenvector is only defined up to sign) so reruns draw the same picture
        signs = torch.sign(points.gather(0, points.abs().argmax(dim=0, keepdim=True)))
        return points * signs
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError as error:
            raise ImportError("t-SNE needs scikit-learn: pip install scikit-learn (or use method='pca')") from error
        perplexity = float(min(30, max(2, (features.shape[0] - 1) // 3)))
        options = {"perplexity": perplexity, "init": "pca", "random_state": seed, **tsne_options}
        tsne = TSNE(n_components=2, **options)
        # One thread: scikit-learn's OpenMP threads next to PyTorch's (another OpenMP runtime in the same
        # process) can slow t-SNE down more than tenfold on a small machine; one thread takes seconds.
        from threadpoolctl import threadpool_limits  # installed with scikit-learn

        with threadpool_limits(limits=1):
            points = tsne.fit_transform(features.numpy())
        return torch.from_numpy(points.astype(np.float32))
    raise ValueError(f"unknown method {method!r}; use 'pca' or 'tsne'")


# --- image retrieval ------------------------------------------------------------------------------


def nearest_neighbours(
    query_features: torch.Tensor, gallery_features: torch.Tensor, k: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(similarity, index)``, each ``[Q, k]``: the ``k`` gallery rows most similar (cosine) to each query, best first."""
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


Item = torch.Tensor | str | Path


def _read(item: Item) -> torch.Tensor:
    """One image as uint8 ``[3, H, W]``: a tensor as it is, or a file path read with Pillow (as RGB)."""
    if isinstance(item, (str, Path)):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(item) as image:
                array = np.asarray(image.convert("RGB")).copy()
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise ValueError(f"cannot read {str(item)!r} as an image: {error}") from None
        return torch.from_numpy(array).permute(2, 0, 1)
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


def _load(kind: str, collection: torch.Tensor | Sequence[Item], size: tuple[int, int] | None,
          errors: dict[str, str]) -> tuple[list[int], list[torch.Tensor]]:
    """Read every item; keep those of ``size``, record an error for every other one."""
    kept, images = [], []
    for i, item in enumerate(_items(collection)):
        try:
            image = _read(item)
        except ValueError as error:
            errors[f"{kind} {i}"] = str(error)
            continue
        found = tuple(image.shape[1:])
        if size is not None and found != size:
            errors[f"{kind} {i}"] = (
                f"image of {found[0]}x{found[1]} pixels, but the search compares {size[0]}x{size[1]} images "
                "(features of different sizes are not comparable): resize it first"
            )
            continue
        kept.append(i)
        images.append(image)
    return kept, images


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
    image_size: int | tuple[int, int] | None = None,
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
    size = (image_size, image_size) if isinstance(image_size, int) else (tuple(image_size) if image_size else None)
    if size is None:
        readable = [tuple(t.shape[1:]) for t in _items(gallery)
                    if isinstance(t, torch.Tensor) and t.ndim == 3]
        size = Counter(readable).most_common(1)[0][0] if readable else None
    gallery_kept, gallery_images = _load("gallery", gallery, size, errors)
    if size is None and gallery_images:  # a gallery of paths: the first readable image sets the size
        size = tuple(gallery_images[0].shape[1:])
        gallery_kept, gallery_images = _load("gallery", gallery, size, errors)
    query_kept, query_images = _load("query", queries, size, errors)
    if not gallery_images:
        errors["gallery"] = "the gallery is empty (or none of its images could be used): nothing to search in"
    if not query_images:
        errors["queries"] = "the query set is empty (or none of its images could be used): nothing to search for"
    columns = ["query", "rank", "gallery_index", "similarity"]
    if not gallery_images or not query_images:
        return SearchResult(pd.DataFrame(columns=columns), errors, [], gallery_kept)
    if not 1 <= k <= len(gallery_images):
        raise ValueError(f"k must be between 1 and the usable gallery size ({len(gallery_images)}); got {k}")

    features = dict(mean=mean, std=std, batch_size=batch_size, device=device)
    gallery_features = penultimate_features(model, torch.stack(gallery_images), **features)
    query_features = penultimate_features(model, torch.stack(query_images), **features)
    similarity, index = nearest_neighbours(query_features, gallery_features, k)
    gallery_ids = torch.as_tensor(gallery_kept)[index]  # positions in the gallery as given
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
    return SearchResult(table, errors, query_kept, gallery_kept)


__all__ = [
    "SearchResult",
    "embed_2d",
    "feature_maps",
    "grad_cam",
    "nearest_neighbours",
    "penultimate_features",
    "precision_at_k",
    "rank_correlation",
    "saliency",
    "search",
    "stage_names",
    "upsample",
]
