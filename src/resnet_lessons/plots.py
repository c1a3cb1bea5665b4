"""Figures for the book: matplotlib only. Each function takes data (and ``ax=`` where it draws one
panel) and returns the Figure, so chapters, widgets and tests can use the same drawing code."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def subplots(*args, **kwargs):  # type: ignore[no-untyped-def]
    """``plt.subplots`` detached from pyplot, so a notebook shows the returned Figure once, not twice."""
    fig, axes = plt.subplots(*args, **kwargs)
    plt.close(fig)
    return fig, axes


def figure_and_axes(ax: Axes | None, figsize: tuple[float, float] = (5, 3.5)) -> tuple[Figure, Axes]:
    """Draw on ``ax`` when given, else on a new single-panel figure."""
    if ax is not None:
        return ax.figure, ax
    return subplots(figsize=figsize)


def image_grid(
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    classes: Sequence[str] | None = None,
    *,
    ncols: int = 10,
    title: str | None = None,
    scale: float = 1.1,
) -> Figure:
    """uint8 images ``[N, 3, H, W]`` in a grid, each titled with its class name when labels are given."""
    n = images.shape[0]
    nrows = max(1, -(-n // ncols))
    fig, axes = subplots(nrows, ncols, figsize=(ncols * scale, nrows * scale * 1.15), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        if labels is not None and classes is not None:
            ax.set_title(classes[int(labels[i])], fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def class_samples(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], per_class: int = 8) -> Figure:
    """``per_class`` images of every class: one row per class, labelled on the left."""
    rows = [torch.nonzero(labels == c).flatten()[:per_class] for c in range(len(classes))]
    fig, axes = subplots(len(classes), per_class, figsize=(per_class * 0.9, len(classes) * 0.9), squeeze=False)
    for c, index in enumerate(rows):
        for j, ax in enumerate(axes[c]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j < index.numel():
                ax.imshow(images[index[j]].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        axes[c][0].set_ylabel(classes[c], rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig


def gradient_norm_profile(
    table: "pd.DataFrame", *, ax: Axes | None = None, title: str | None = None
) -> Figure:
    """Gradient norm per weight layer (log scale) for several networks: ``table`` has columns
    ``model``, ``layer`` and ``grad_norm``; names starting with ``plain`` are drawn dashed."""
    fig, ax = _figure_and_axes(ax, (7, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    depths = sorted({int("".join(filter(str.isdigit, m)) or 0) for m in table["model"]})
    for model, rows in table.groupby("model", sort=False):
        depth = int("".join(filter(str.isdigit, str(model))) or 0)
        plain = str(model).startswith("plain")
        ax.plot(rows["layer"], rows["grad_norm"], label=str(model), linestyle="--" if plain else "-",
                color=colours[depths.index(depth) % len(colours)], marker="." if len(rows) < 30 else None)
    ax.set_yscale("log")
    ax.set_xlabel("layer (1 = first convolution, last = fc)")
    ax.set_ylabel("gradient norm of the layer's weights")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(True, which="major", alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def jacobian_panels(j_block: torch.Tensor, j_branch: torch.Tensor) -> Figure:
    """Three matrices side by side: the block's Jacobian, the branch's, and their difference."""
    panels = {"d(F(x) + x)/dx": j_block, "dF/dx": j_branch, "difference": j_block - j_branch}
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    for ax, (name, matrix) in zip(axes, panels.items()):
        limit = float(matrix.abs().max()) or 1.0
        image = ax.imshow(matrix.detach().cpu().numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig
