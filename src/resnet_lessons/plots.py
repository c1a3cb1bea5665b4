"""Figures for the book: matplotlib only. Each function takes data (and ``ax=`` where it draws one
panel) and returns the Figure, so chapters, widgets and tests can use the same drawing code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from numpy.typing import NDArray


def subplots(*args: Any, **kwargs: Any) -> tuple[Figure, Any]:
    """``plt.subplots`` detached from pyplot, so a notebook shows the returned Figure once, not twice. The
    second item is an Axes, or an array of them (as from ``plt.subplots``)."""
    fig, axes = plt.subplots(*args, **kwargs)
    plt.close(fig)
    return fig, axes


def figure_and_axes(ax: Axes | None, figsize: tuple[float, float] = (5, 3.5)) -> tuple[Figure, Axes]:
    """Draw on ``ax`` when given, else on a new single-panel figure."""
    if ax is not None:
        return cast(Figure, ax.figure), ax  # a SubFigure's axes give the SubFigure, which draws the same way
    return subplots(figsize=figsize)


def _epoch_panels(fig: Figure, axes: Sequence[Axes], ylabels: Sequence[str], *, legend_on: Axes,
                  title: str | None, legend_size: int = 8) -> Figure:
    """Label per-epoch panels (x: epoch, a grid), put the legend on one of them, add the title."""
    for ax, ylabel in zip(axes, ylabels):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    legend_on.legend(fontsize=legend_size)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _as_rgb(image: torch.Tensor) -> NDArray[np.uint8]:
    """uint8 ``[3, H, W]`` as an ``[H, W, 3]`` array for ``imshow``."""
    return image.permute(1, 2, 0).cpu().numpy()


def class_samples(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], per_class: int = 8) -> Figure:
    """``per_class`` images of every class: one row per class, labelled on the left."""
    rows = [torch.nonzero(labels == c).flatten()[:per_class] for c in range(len(classes))]
    fig, axes = subplots(len(classes), per_class, figsize=(per_class * 0.9, len(classes) * 0.9), squeeze=False)
    for c, index in enumerate(rows):
        for j, ax in enumerate(axes[c]):
            ax.set_xticks([])
            ax.set_yticks([])
            if j < index.numel():
                ax.imshow(_as_rgb(images[index[j]]), interpolation="nearest")
        axes[c][0].set_ylabel(classes[c], rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig


def gradient_norm_profile(
    table: pd.DataFrame, *, ax: Axes | None = None, title: str | None = None
) -> Figure:
    """Gradient norm per weight layer (log scale) for several networks: ``table`` has columns
    ``model``, ``layer`` and ``grad_norm``; names starting with ``plain`` are drawn dashed."""
    fig, ax = figure_and_axes(ax, (7, 4))
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
    fig, axes = subplots(1, 3, figsize=(10, 3.4))
    for ax, (name, matrix) in zip(axes, panels.items()):
        limit = float(matrix.abs().max()) or 1.0
        image = ax.imshow(matrix.detach().cpu().numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def degradation_curves(curves: pd.DataFrame, *, metric: str = "train_accuracy") -> Figure:
    """Training error (1 - ``metric``) per epoch in two panels, plain networks left and residual ones
    (pre-activation ones too) right, as in He et al. (2016), Figure 6. ``curves`` has columns ``model``,
    ``epoch`` and ``metric``."""
    fig, axes = subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, kind in zip(axes, ("plain", "resnet")):
        residual = ~curves["model"].str.startswith("plain")
        for model, rows in curves[residual if kind == "resnet" else ~residual].groupby("model", sort=False):
            ax.plot(rows["epoch"], 100 * (1 - rows[metric]), marker="o", label=str(model),
                    linestyle="--" if kind == "plain" else "-")
        ax.set_title("plain networks" if kind == "plain" else "residual networks")
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("training error (%)")
    fig.tight_layout()
    return fig


# --- evaluation and looking inside (chapters 7-9) ------------------------------------------------


def confusion_matrix_figure(
    cm: torch.Tensor, classes: Sequence[str], *, normalise: bool = True, ax: Axes | None = None
) -> Figure:
    """The confusion matrix (rows: true class, columns: predicted); ``normalise`` shows each row as shares."""
    fig, ax = figure_and_axes(ax, (6, 5))
    values = cm.double()
    if normalise:
        values = values / values.sum(dim=1, keepdim=True).clamp_min(1)
    image = ax.imshow(values.numpy(), cmap="Blues", vmin=0, vmax=1 if normalise else None)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j].item()
            text = f"{v:.2f}".lstrip("0") if normalise else str(int(v))
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if v > 0.6 * float(values.max()) else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def reliability_diagram(bins: pd.DataFrame, *, title: str | None = None, ax: Axes | None = None) -> Figure:
    """Accuracy per confidence bin (bars) against the diagonal of perfect calibration.

    ``bins`` is ``metrics.reliability_bins``' table (``lo``, ``hi``, ``count``, ``confidence``,
    ``accuracy``); red hatching marks each filled bin's gap to its mean confidence."""
    fig, ax = figure_and_axes(ax, (4.2, 4))
    filled = bins[bins["count"] > 0]
    width = filled["hi"] - filled["lo"]
    ax.bar(filled["lo"], filled["accuracy"], width=width, align="edge", color="#4c72b0", edgecolor="black",
           linewidth=0.5, label="accuracy")
    ax.bar(filled["lo"], filled["confidence"] - filled["accuracy"], bottom=filled["accuracy"], width=width,
           align="edge", color="none", edgecolor="#c44e52", hatch="//", linewidth=0.5, label="gap to confidence")
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (largest softmax probability)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8, loc="upper left")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def labelled_images(
    images: torch.Tensor, titles: Sequence[str], *, ncols: int = 8, scale: float = 1.4, title: str | None = None
) -> Figure:
    """uint8 images ``[N, 3, H, W]`` in a grid, each with its own title (e.g. "cat -> dog 0.97")."""
    n = images.shape[0]
    nrows = max(1, -(-n // ncols))
    fig, axes = subplots(nrows, ncols, figsize=(ncols * scale, nrows * scale * 1.25), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(_as_rgb(images[i]), interpolation="nearest")
            ax.set_title(titles[i], fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def robustness_curves(table: pd.DataFrame, *, title: str | None = None, ax: Axes | None = None) -> Figure:
    """Accuracy against severity, one line per corruption (``metrics.corruption_table``' table)."""
    fig, ax = figure_and_axes(ax, (5, 3.5))
    for corruption, row in table.iterrows():
        ax.plot([int(s) for s in row.index], row.values, marker="o", label=str(corruption))
    ax.set_xticks([int(s) for s in table.columns])
    ax.set_xlabel("severity (0 = clean images)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def heatmap_rows(
    images: torch.Tensor,
    maps: dict[str, torch.Tensor],
    *,
    titles: Sequence[str] | None = None,
    interpolation: str = "nearest",
    alpha: float = 0.55,
    scale: float = 1.5,
) -> Figure:
    """The images in the first row, then one row per named map ``[N, h, w]`` laid over them.

    A map of any resolution covers its whole image, so ``interpolation="nearest"`` shows each cell of
    a 4x4 or 8x8 Grad-CAM map as the block of pixels it stands for."""
    n = images.shape[0]
    fig, axes = subplots(len(maps) + 1, n, figsize=(n * scale, (len(maps) + 1) * scale), squeeze=False)
    height, width = images.shape[-2:]
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)
    for j in range(n):
        axes[0][j].imshow(_as_rgb(images[j]), interpolation="nearest")
        if titles is not None:
            axes[0][j].set_title(titles[j], fontsize=7)
        for i, (name, values) in enumerate(maps.items(), start=1):
            ax = axes[i][j]
            ax.imshow(_as_rgb(images[j]), interpolation="nearest")
            ax.imshow(values[j].detach().cpu().numpy(), cmap="jet", alpha=alpha, extent=extent,
                      interpolation=interpolation, vmin=0, vmax=float(values[j].max()) or 1.0)
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def feature_map_grid(maps: dict[str, torch.Tensor], *, channels: int = 8, scale: float = 1.1) -> Figure:
    """For one image: the first ``channels`` channels of each named feature map ``[C, h, w]``, a row per map."""
    fig, axes = subplots(len(maps), channels, figsize=(channels * scale, len(maps) * scale * 1.1), squeeze=False)
    for row, (name, values) in zip(axes, maps.items()):
        for c, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if c < values.shape[0]:
                ax.imshow(values[c].detach().cpu().numpy(), cmap="viridis", interpolation="nearest")
        row[0].set_ylabel(f"{name}\n{values.shape[0]}x{values.shape[1]}x{values.shape[2]}", fontsize=8)
    fig.tight_layout()
    return fig


def embedding_scatter(
    points: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], *, title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """2-D points ``[N, 2]`` coloured by class, with a legend of class names."""
    fig, ax = figure_and_axes(ax, (5.5, 4.5))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c, name in enumerate(classes):
        members = labels == c
        if members.any():
            ax.scatter(points[members, 0].numpy(), points[members, 1].numpy(), s=6, color=cmap(c % cmap.N),
                       label=str(name), alpha=0.7)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1, 0.5))
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def retrieval_grid(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    neighbours: torch.Tensor,
    *,
    relevant: torch.Tensor | None = None,
    scale: float = 1.2,
) -> Figure:
    """One row per query: the query image, then its ``k`` nearest gallery images (``neighbours [Q, k]``).

    With ``relevant [Q, k]`` (same class as the query) each neighbour is framed green (yes) or red (no)."""
    q, k = neighbours.shape
    fig, axes = subplots(q, k + 1, figsize=((k + 1) * scale, q * scale), squeeze=False)
    for i in range(q):
        axes[i][0].imshow(_as_rgb(queries[i]), interpolation="nearest")
        axes[i][0].set_ylabel("query", fontsize=8)
        for j in range(k):
            ax = axes[i][j + 1]
            ax.imshow(_as_rgb(gallery[int(neighbours[i, j])]), interpolation="nearest")
            if relevant is not None:
                colour = "#2ca02c" if bool(relevant[i, j]) else "#d62728"
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(3)
            if i == 0:
                ax.set_title(f"#{j + 1}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


# --- data (chapter 2) --------------------------------------------------------------------------------


def _mosaic(tiles: torch.Tensor, gap: int = 2, fill: int = 255) -> NDArray[np.uint8]:
    """uint8 ``[R, C, 3, H, W]`` as one ``[R*(H+gap), C*(W+gap), 3]`` array with white gaps."""
    r, c, _, h, w = tiles.shape
    out = torch.full((r, h + gap, c, w + gap, 3), fill, dtype=torch.uint8)
    out[:, :h, :, :w] = tiles.permute(0, 3, 1, 4, 2).cpu()
    return out.reshape(r * (h + gap), c * (w + gap), 3)[:-gap, :-gap].numpy()


def augmentation_grid(
    originals: torch.Tensor,
    augmented: torch.Tensor,
    *,
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Originals ``[N, 3, H, W]`` (first column) beside augmented copies ``[K, N, 3, H, W]`` (uint8)."""
    tiles = torch.cat([originals.unsqueeze(0), augmented]).transpose(0, 1)  # [N, 1 + K, 3, H, W]
    n, k = tiles.shape[:2]
    fig, ax = figure_and_axes(ax, figsize=(0.75 * k + 0.8, 0.75 * n))
    ax.imshow(_mosaic(tiles), interpolation="nearest")
    h, w = originals.shape[2:]
    ax.set_xticks([(w + 2) * j + w / 2 for j in range(k)], ["original"] + [f"#{j}" for j in range(1, k)], fontsize=8)
    ax.set_yticks([(h + 2) * i + h / 2 for i in range(n)], list(row_labels) if row_labels else [""] * n, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title)
    return fig


def class_balance(counts: pd.DataFrame, *, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Images per class (rows) in each split (columns) as grouped horizontal bars."""
    fig, ax = figure_and_axes(ax, figsize=(6, 0.3 * len(counts) + 1.2))
    height = 0.8 / max(1, counts.shape[1])
    for j, split in enumerate(counts.columns):
        ax.barh([i + j * height for i in range(len(counts))], counts[split], height=height, label=str(split))
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(counts))], list(counts.index))
    ax.invert_yaxis()
    ax.set_xlabel("images")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    if title:
        ax.set_title(title)
    return fig


def channel_histograms(images: torch.Tensor, *, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Distribution of pixel values (0-1) per RGB channel of uint8 images, with each channel's mean."""
    fig, ax = figure_and_axes(ax)
    values = torch.arange(256, dtype=torch.float64) / 255
    for c, (name, colour) in enumerate(zip("RGB", ("#d62728", "#2ca02c", "#1f77b4"))):
        counts = torch.bincount(images[:, c].reshape(-1).long(), minlength=256).double()
        share = counts / counts.sum()
        ax.plot(values, share, color=colour, label=f"{name}: mean {float((share * values).sum()):.3f}")
        ax.axvline(float((share * values).sum()), color=colour, linestyle=":", linewidth=1)
    ax.set_xlabel("pixel value (0-1)")
    ax.set_ylabel("share of pixels")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return fig


def throughput_bars(rates: Mapping[str, float], *, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Images per second of each pipeline as horizontal bars, each labelled with its speed-up over the first."""
    fig, ax = figure_and_axes(ax, figsize=(6, 0.5 * len(rates) + 1))
    names, values = list(rates), list(rates.values())
    ax.barh(names, values, color=["#999999"] * (len(values) - 1) + ["#1f77b4"])
    finite = [v for v in values if v == v and v not in (float("inf"), float("-inf"))]
    for i, v in enumerate(values):
        label = f" {v:,.0f}/s ({v / values[0]:.0f}x)" if v in finite and values[0] in finite else " n/a"
        ax.text(v if v in finite else 0, i, label, va="center", fontsize=8)
    ax.invert_yaxis()
    if finite:
        ax.set_xlim(0, max(finite) * 1.35)
    ax.set_xlabel("training images per second")
    if title:
        ax.set_title(title)
    return fig


# --- fine-tuning (chapter 6) ----------------------------------------------------------------------

METHOD_COLOURS = {"scratch": "#888888", "linear": "#1f77b4", "full": "#ff7f0e", "discriminative": "#2ca02c",
                  "gradual": "#d62728"}  # the same colour for a fine-tuning strategy in every figure


def strategy_curves(histories: Mapping[str, pd.DataFrame], *, title: str | None = None) -> Figure:
    """Validation accuracy and training loss per epoch, one line per fine-tuning strategy (or run)."""
    fig, (left, right) = subplots(1, 2, figsize=(10, 3.6))
    for name, history in histories.items():
        colour = METHOD_COLOURS.get(str(name))
        left.plot(history["epoch"], history["val_accuracy"], marker=".", label=str(name), color=colour)
        right.plot(history["epoch"], history["train_loss"], marker=".", label=str(name), color=colour)
    return _epoch_panels(fig, (left, right), ("validation accuracy", "training loss"), legend_on=left, title=title)


def batchnorm_shift_bars(shifts: Mapping[str, pd.DataFrame], *, ax: Axes | None = None,
                         title: str | None = None) -> Figure:
    """How far the BatchNorm running means moved in each stage (largest change), a group of bars per stage
    and one bar per strategy; ``shifts`` maps a strategy to ``transfer.batchnorm_shift``'s table."""
    fig, ax = figure_and_axes(ax, (7, 3.5))
    names = list(shifts)
    stage_order = list(dict.fromkeys(s for table in shifts.values() for s in table["stage"]))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        per_stage = shifts[name].groupby("stage")["mean shift"].max().reindex(stage_order).fillna(0.0)
        positions = [k + (i - (len(names) - 1) / 2) * width for k in range(len(stage_order))]
        bars = ax.bar(positions, per_stage.values, width=width, label=str(name), color=METHOD_COLOURS.get(str(name)))
        ax.bar_label(bars, labels=["0" if v == 0 else "" for v in per_stage.values], fontsize=7)
    ax.set_xticks(range(len(stage_order)), stage_order)
    ax.set_ylabel("largest change of a running mean")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def transfer_bars(table: pd.DataFrame, *, metric: str, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Accuracy of each method (bars) for each labels fraction (groups): ``transfer.transfer_experiment``'s
    table with columns ``labels``, ``method`` and ``metric``."""
    fig, ax = figure_and_axes(ax, (7, 3.5))
    groups = list(dict.fromkeys(table["labels"]))
    methods = list(dict.fromkeys(table["method"]))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        rows = table[table["method"] == method].set_index("labels").reindex(groups)
        positions = [k + (i - (len(methods) - 1) / 2) * width for k in range(len(groups))]
        bars = ax.bar(positions, rows[metric].values, width=width, label=str(method),
                      color=METHOD_COLOURS.get(str(method)))
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(groups)), [f"{g} of the labels" for g in groups])
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1.08)
    ax.legend(fontsize=8, ncol=len(methods))
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def lr_schedules(
    curves: Mapping[str, Sequence[float]], *, log: bool = True, ax: Axes | None = None, title: str | None = None
) -> Figure:
    """Learning rate against optimiser step, one line per schedule (log scale so 1e-3 and 0.4 both show)."""
    fig, ax = figure_and_axes(ax, figsize=(6, 3.5))
    for name, curve in curves.items():
        ax.plot(range(len(curve)), list(curve), label=str(name))
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("learning rate")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def training_curves(histories: Mapping[str, pd.DataFrame], *, title: str | None = None) -> Figure:
    """Loss and accuracy per epoch from ``train.fit`` histories: training solid, validation dashed."""
    fig, (left, right) = subplots(1, 2, figsize=(10, 3.6))
    for index, (name, history) in enumerate(histories.items()):
        colour = f"C{index}"
        for ax, metric in ((left, "loss"), (right, "accuracy")):
            ax.plot(history["epoch"], history[f"train_{metric}"], color=colour, marker=".", label=f"{name}, train")
            ax.plot(history["epoch"], history[f"val_{metric}"], color=colour, marker=".", linestyle="--",
                    label=f"{name}, validation")
    return _epoch_panels(fig, (left, right), ("loss (cross-entropy)", "accuracy"), legend_on=right,
                         title=title, legend_size=7)


# --- overfitting and class imbalance (chapters 10 and 11) ------------------------------------------


def gap_panels(histories: Mapping[str, pd.DataFrame], *, metric: str = "accuracy", ncols: int = 4,
               title: str | None = None) -> Figure:
    """One small panel per run: training (solid) and validation (dashed) ``metric`` per epoch from
    ``train.fit`` histories, the gap between them shaded. Panels share their axes, so gaps compare."""
    n = len(histories)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = subplots(nrows, ncols, figsize=(3.0 * ncols, 2.4 * nrows), sharex=True, sharey=True, squeeze=False)
    for ax, (name, history) in zip(axes.flat, histories.items()):
        epochs, fit, held = history["epoch"], history[f"train_{metric}"], history[f"val_{metric}"]
        ax.plot(epochs, fit, color="C0", marker=".", label="train")
        ax.plot(epochs, held, color="C1", marker=".", linestyle="--", label="validation")
        ax.fill_between(epochs, fit, held, color="C3", alpha=0.15, label="gap")
        ax.set_title(str(name), fontsize=9)
        ax.grid(True, alpha=0.3)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(metric)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def recall_by_class(table: pd.DataFrame, methods: Sequence[str] | None = None, *, ax: Axes | None = None,
                    title: str | None = None) -> Figure:
    """Per-class recall of each method (lines) with the training images per class (grey bars, log scale, right
    axis), classes from the most to the least frequent: ``imbalance.recall_table``'s table (class rows only)."""
    fig, ax = figure_and_axes(ax, (8, 3.8))
    rows = table.drop(index=[name for name in _SUMMARY_ROWS if name in table.index])
    methods = [c for c in rows.columns if c != "train images"] if methods is None else list(methods)
    positions = range(len(rows))
    counts = ax.twinx()
    counts.bar(positions, rows["train images"], color="#cccccc", zorder=0)
    counts.set_yscale("log")
    counts.set_ylim(1, 1.5 * float(rows["train images"].max()))  # bars start at 1 image, so short ones show
    counts.set_ylabel("training images (bars)")
    ax.set_zorder(counts.get_zorder() + 1)
    ax.patch.set_visible(False)
    for method in methods:
        ax.plot(positions, rows[method], marker="o", label=str(method))
    ax.set_xticks(list(positions), list(rows.index), rotation=30, ha="right")
    ax.set_ylabel("recall on the validation split")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.12, 1.0), frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


_SUMMARY_ROWS = ("balanced accuracy", "head (most frequent third)", "tail (rarest third)")


# --- performance (chapter 14) ----------------------------------------------------------------------


def speedup_bars(table: pd.DataFrame, *, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Speed-up over a baseline (1 = as fast): one group of horizontal bars per row of ``table`` (e.g. models),
    one bar per column (e.g. speed features); a missing value (not measured) leaves a gap."""
    rows, columns = list(table.index), list(table.columns)
    fig, ax = figure_and_axes(ax, (7, 0.35 * len(rows) * len(columns) + 1.2))
    height = 0.8 / max(1, len(columns))
    for j, column in enumerate(columns):
        positions = [i + j * height for i in range(len(rows))]
        ax.barh(positions, table[column].astype(float), height=height, color=f"C{j}", label=str(column))
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(rows))], [str(r) for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("training images per second, relative to the baseline (x)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def accuracy_over_time(curves: Mapping[str, pd.DataFrame], *, targets: Sequence[float] = (), x: str = "train_s",
                       y: str = "accuracy_tta", ax: Axes | None = None, title: str | None = None) -> Figure:
    """Accuracy (``y``) against training seconds (``x``) for each run, with dotted lines at the ``targets``."""
    fig, ax = figure_and_axes(ax, (6, 3.6))
    for name, curve in curves.items():
        ax.plot(curve[x], curve[y], marker=".", label=str(name))
    for target in targets:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.text(ax.get_xlim()[0], target, f" {target:.0%}", va="bottom", fontsize=8, color="grey")
    ax.set_xlabel("training seconds (evaluation excluded)" if x == "train_s" else x)
    ax.set_ylabel("accuracy" + (" (flip TTA)" if y == "accuracy_tta" else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def ladder(rungs: Sequence[Mapping], *, ax: Axes | None = None, title: str | None = None) -> Figure:
    """What each correction buys (``bench/ladder.py``): one row per rung, its mean validation accuracy as a bar,
    every seed as a dot, from the article's recipe (top) to the book's (bottom)."""
    fig, ax = figure_and_axes(ax, (7, 0.45 * len(rungs) + 1.2))
    names = [f"{rung['rung']}. {rung['id'].replace('_', ' ')}" for rung in rungs]
    positions = range(len(rungs))
    ax.barh(positions, [rung["mean"] for rung in rungs], color="#9ecae1")
    for y, rung in zip(positions, rungs):
        ax.plot(rung["values"], [y] * len(rung["values"]), "o", color="#08519c", markersize=4)
        ax.text(rung["mean"] + 0.01, y, f"{rung['mean']:.3f}", va="center", fontsize=8)
    ax.set_yticks(list(positions), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("validation accuracy (bar: mean over seeds; dots: each seed)")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
