"""Looking inside a trained network: Grad-CAM, saliency, feature maps, and embeddings of the penultimate layer.

All functions take a model and *normalised* float inputs ``x [B, 3, H, W]`` (what the model's
``forward`` sees; :func:`resnet_lessons.data.normalise` makes them from uint8 images), except
:func:`penultimate_features`, which works on uint8 images end to end and takes ``mean`` and ``std`` like
``evaluate.infer``. Layers are named as in ``model.named_modules()``: ``"layer3"`` is the last stage of a CIFAR
ResNet, ``"layer2.1"`` the second block of the second stage. Retrieval on these features (chapter 9) is in
:mod:`resnet_lessons.retrieval`.

Grad-CAM (Selvaraju et al., 2017) weights each channel of a layer's output by the mean gradient of
the class score over that channel, sums the weighted channels and keeps the positive part. Its
resolution is the layer's: 8x8 for the last stage of resnet20 on 32x32 images, 4x4 for the CIFAR
ResNet-18, so each cell of the map speaks for a 4x4 or 8x8 block of pixels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .evaluate import infer
from .runtime import eval_mode


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
            raise ValueError(
                f"{type(module).__name__} returns {type(output).__name__}, not a tensor: pick another layer"
            )
        self.output = output
        return output.clone()

    def __enter__(self) -> _Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def grad_cam(
    model: nn.Module,
    x: torch.Tensor,
    layer: str | nn.Module = "layer3",
    target: int | Sequence[int] | torch.Tensor | None = None,
    *,
    normalise: bool = True,
) -> torch.Tensor:
    """Grad-CAM maps ``[B, h, w]`` at the resolution of ``layer``'s output, for class ``target`` (default: predicted).

    ``cam = ReLU(sum_k alpha_k A_k)`` with ``A_k`` the k-th channel of the layer's output and
    ``alpha_k`` the spatial mean of ``d score / d A_k``. With ``normalise`` each map is divided by
    its maximum (an all-zero map stays zero). :func:`upsample` brings a map to the image's size.
    """
    with eval_mode(model), _Capture(_layer(model, layer)) as capture, torch.enable_grad():
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
    if normalise:
        cam = cam / cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return cam


def upsample(maps: torch.Tensor, size: tuple[int, int] | int) -> torch.Tensor:
    """Maps ``[B, h, w]`` resized to ``size`` (bilinear), for drawing over the images."""
    height, width = (size, size) if isinstance(size, int) else size
    return F.interpolate(maps[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]


def saliency(
    model: nn.Module, x: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """Input-gradient saliency ``[B, H, W]``: the largest ``|d score / d pixel|`` over the three channels.

    It answers "which pixels would change the class score most if nudged", at full resolution.
    """
    with eval_mode(model), torch.enable_grad():
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
    with contextlib.ExitStack() as hooks, eval_mode(model):
        captures = {name: hooks.enter_context(_Capture(_layer(model, name))) for name in layers}
        model(x)
    outputs = {}
    for name, capture in captures.items():
        if capture.output is None:
            raise ValueError(f"layer {name!r} did not run in the model's forward pass")
        outputs[name] = capture.output.detach()
    return outputs


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


__all__ = [
    "embed_2d",
    "feature_maps",
    "grad_cam",
    "penultimate_features",
    "rank_correlation",
    "saliency",
    "stage_names",
    "upsample",
]
