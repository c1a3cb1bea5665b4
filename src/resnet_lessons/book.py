"""What a chapter's first cell calls: profile, device, seed and data, with a visible fallback.

A chapter's set-up cell installs the package when it is missing (Colab), then calls :func:`setup`.
The command line never uses the fallback: it stops with the data error instead.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import torch

from . import __version__, runtime
from .data import DataSplits, DataUnavailable, load
from .profiles import Profile, Settings, from_env


def load_for_profile(profile: Profile, source: str, *, download: bool = True) -> DataSplits:
    """The data a profile asks for from ``source``: its split sizes, subset and seed."""
    return load(
        source,
        val_per_class=profile.val_per_class,
        train_per_class=profile.train_per_class,
        synthetic_per_class=profile.synthetic_per_class,
        seed=profile.seed,
        download=download,
    )


@dataclass
class Session:
    """What a chapter works with: the resolved settings, the device and the data."""

    settings: Settings
    device: torch.device
    data: DataSplits | None
    fallback_reason: str | None = None  # why the synthetic stand-in replaced the requested source
    facts: dict[str, str] = field(default_factory=dict)

    @property
    def profile(self) -> Profile:
        return self.settings.profile

    @property
    def source(self) -> str:
        """The data source in use (``synthetic`` after a fallback)."""
        return "synthetic" if self.fallback_reason else self.settings.source


def _load_with_fallback(settings: Settings) -> tuple[DataSplits, str | None]:
    try:
        return load_for_profile(settings.profile, settings.source), None
    except DataUnavailable as error:
        if settings.source != "cifar10":
            raise
        return load_for_profile(settings.profile, "synthetic"), str(error)


def _banner_html(title: str, session: Session) -> str:
    rows = "".join(
        f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th>"
        f"<td style='text-align:left'>{html.escape(v)}</td></tr>"
        for k, v in session.facts.items()
    )
    banner = f"<div class='resnet-lessons-setup'><strong>{html.escape(title)}</strong><table>{rows}</table></div>"
    if session.fallback_reason:
        banner += (
            "<div class='admonition warning' style='border-left:4px solid #e69500;background:#fff4e0;"
            "padding:0.5em 1em'><p class='admonition-title'><strong>Not the real CIFAR-10</strong></p>"
            "<p>CIFAR-10 could not be loaded, so this chapter runs on the <em>synthetic stand-in</em>: "
            "its numbers say nothing about CIFAR-10. To use the real images, connect to the internet "
            "(torchvision downloads them), or place the files by hand as the message below says, or set "
            "<code>RESNET_LESSONS_DATA</code> to an image folder or zip.</p>"
            f"<pre style='white-space:pre-wrap'>{html.escape(session.fallback_reason)}</pre></div>"
        )
    return banner


def setup(title: str, *, with_data: bool = True, env: dict[str, str] | None = None) -> Session:
    """Resolve profile and data source, pick the device, seed everything, load the data, show a banner."""
    settings = from_env(env)
    runtime.cpu_threads()
    device = runtime.pick_device()
    runtime.seed_everything(settings.profile.seed)
    data, reason = _load_with_fallback(settings) if with_data else (None, None)
    session = Session(settings=settings, device=device, data=data, fallback_reason=reason)
    session.facts = {
        "profile": settings.profile.summary(),
        "data": _describe_data(session),
        "device": runtime.describe_device(device),
        "versions": f"resnet_lessons {__version__}, torch {torch.__version__}",
    }
    _show(_banner_html(title, session), "\n".join(f"{k}: {v}" for k, v in session.facts.items()))
    return session


def _describe_data(session: Session) -> str:
    if session.data is None:
        return f"{session.source} (not loaded)"
    sizes = ", ".join(f"{name} {len(split):,}" for name, split in session.data.splits.items())
    text = f"{session.source}: {sizes} images of {session.data.train.image_size[0]}px"
    if session.fallback_reason:
        text += f" (requested {session.settings.source!r}: unavailable, see the warning)"
    return "; ".join([text, *session.data.notes])


def _show(html_text: str, plain: str) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        get_ipython = None  # type: ignore[assignment]
    if get_ipython is not None and get_ipython() is not None:
        display(HTML(html_text))
    else:
        print(plain)


def glue(name: str, value: object, *, display: bool = False) -> object:
    """Hand ``value`` to the book's text under ``name`` (myst-nb's ``glue``); return it.

    Outside a Jupyter Book build (Colab, plain Jupyter) myst-nb may be missing: the value is then
    shown when ``display`` is true, and the chapter goes on.
    """
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()  # NumPy and torch scalars glue as plain numbers, so format specs work
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        if display:
            _show(html.escape(str(value)), str(value))
        return value
    myst_glue(name, value, display=display)
    return value
