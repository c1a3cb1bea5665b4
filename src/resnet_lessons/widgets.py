"""ipywidgets over plots.py that keep working in the static HTML book.

Widgets here avoid Python callbacks where they can: figures are rendered to PNG up front and the
controls are linked in the browser (``jslink``), so the saved widget state alone is interactive.
"""

from __future__ import annotations

import io
from typing import Mapping

import ipywidgets as widgets
from matplotlib.figure import Figure


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
