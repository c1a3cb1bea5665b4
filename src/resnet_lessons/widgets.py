"""ipywidgets over plots.py that keep working in the static HTML book.

Widgets here avoid Python callbacks where they can: figures are rendered to PNG up front and the
controls are linked in the browser (``jslink``), so the saved widget state alone is interactive.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import ipywidgets as widgets
from matplotlib.figure import Figure

if TYPE_CHECKING:
    import torch

    from .data import Augment


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def figure_stack(figures: Mapping[str, Figure], description: str = "show", dpi: int = 100) -> widgets.VBox:
    """A slider over prerendered figures: a ``SelectionSlider`` linked in the browser to a ``Stack`` of
    PNG images, so it also works in static HTML. The figures are closed after rendering."""
    import matplotlib.pyplot as plt

    if not figures:
        raise ValueError("figure_stack needs at least one figure")
    labels = list(figures)
    images = []
    for fig in figures.values():
        images.append(widgets.Image(value=figure_png(fig, dpi), format="png"))
        plt.close(fig)
    stack = widgets.Stack(images, selected_index=0)
    slider = widgets.SelectionSlider(options=labels, value=labels[0], description=description)
    widgets.jslink((slider, "index"), (stack, "selected_index"))
    return widgets.VBox([slider, stack])


def augmentation_explorer(
    images: torch.Tensor,
    augment: Mapping[str, Augment] | None = None,
    copies: int = 6,
    seed: int = 0,
    row_labels: Sequence[str] | None = None,
) -> widgets.VBox:
    """A slider over augmentation strengths: for each setting, uint8 ``images [N, 3, H, W]`` beside ``copies``
    augmented draws (the training code path, :func:`resnet_lessons.data.preview`). Static-HTML friendly.

    ``augment`` maps a label to an :class:`~resnet_lessons.data.Augment`; by default none, crop, crop +
    flip, crop + flip + Cutout.
    """
    from .data import Augment, preview
    from .plots import augmentation_grid

    if augment is None:
        augment = {
            "none": Augment(crop_padding=0, flip=False),
            "crop": Augment(flip=False),
            "crop + flip": Augment(),
            "crop + flip + cutout 12": Augment(cutout=12),
        }
    figures = {
        label: augmentation_grid(images, preview(images, aug, copies, seed), row_labels=row_labels, title=label)
        for label, aug in augment.items()
    }
    return figure_stack(figures, description="augment")
