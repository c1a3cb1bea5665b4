"""What a chapter calls: profile, device, seed and data (with a visible fallback), the chapter's clock and
the reference model that several chapters study.

A chapter's set-up cell installs the package when it is missing (Colab), then calls :func:`setup`. Every
training run asks the session for its share of the chapter's budget (:meth:`Session.budget`), so a chapter
ends in its profile's time on any machine and a faster machine trains more epochs. The last cell calls
:func:`finish`, which glues the chapter's measured time. The command line never uses the data fallback: it
stops with the data error instead.
"""

from __future__ import annotations

import hashlib
import html
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, checkpoints, runtime, train
from .data import DataSplits, DataUnavailable, default_cache_dir, load
from .models import build_model
from .profiles import Profile, Settings, from_env


def load_for_profile(profile: Profile, source: str, *, download: bool = True) -> DataSplits:
    """The data a profile asks for from ``source``: its split sizes, subset and seed."""
    return load(source, seed=profile.seed, download=download, **profile.data_sizes())


class ChapterClock:
    """A chapter's wall-clock budget, counted from its set-up cell. Training runs take shares of it."""

    RESERVE = 0.1  # of the budget, kept for the cells after a run (evaluation, figures)
    FLOOR = 0.02  # of the budget, the least a share gets when the chapter is already late

    def __init__(self, budget_seconds: float, now: Callable[[], float] = time.perf_counter) -> None:
        if not budget_seconds > 0:
            raise ValueError(f"a chapter budget must be more than 0 seconds, got {budget_seconds}")
        self.budget_seconds, self._now = float(budget_seconds), now
        self.started = now()

    def elapsed(self) -> float:
        return self._now() - self.started

    def remaining(self) -> float:
        return max(0.0, self.budget_seconds - self.elapsed())

    def share(self, fraction: float, runs: int = 1) -> float:
        """Seconds for each of ``runs`` training runs that together may take ``fraction`` of the budget:
        never more than what is left after the reserve, never less than the floor (a late chapter trains
        less instead of running over)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"a share of the chapter's budget is in (0, 1], got {fraction}")
        if runs < 1:
            raise ValueError(f"runs must be at least 1, got {runs}")
        left = self.remaining() - self.RESERVE * self.budget_seconds
        seconds = max(min(fraction * self.budget_seconds, left), self.FLOOR * self.budget_seconds)
        return seconds / runs


@dataclass
class Session:
    """What a chapter works with: the resolved settings, the device, the data and the chapter's clock."""

    settings: Settings
    device: torch.device
    data: DataSplits | None
    fallback_reason: str | None = None  # why the synthetic stand-in replaced the requested source
    facts: dict[str, str] = field(default_factory=dict)
    clock: ChapterClock | None = None

    @property
    def profile(self) -> Profile:
        return self.settings.profile

    @property
    def source(self) -> str:
        """The data source in use (``synthetic`` after a fallback)."""
        return "synthetic" if self.fallback_reason else self.settings.source

    @property
    def data_label(self) -> str:
        """What every figure of this chapter was measured on, in a few words."""
        if self.source == "synthetic":
            return "the synthetic stand-in, validation"
        notes = " ".join(self.data.notes if self.data is not None else ())
        if "JPEG copy of CIFAR-10" in notes:
            return "the JPEG copy of CIFAR-10, validation"
        name = "CIFAR-10" if self.source == "cifar10" else Path(self.source).name
        return f"{name}, validation"

    def budget(self, fraction: float, runs: int = 1) -> float:
        """Seconds for each of ``runs`` training runs sharing ``fraction`` of this chapter's budget."""
        if self.clock is None:
            self.clock = ChapterClock(self.profile.chapter_seconds)
        return self.clock.share(fraction, runs)

    def recipe(self, fraction: float, runs: int = 1, **overrides: Any) -> train.TrainConfig:
        """The profile's recipe with ``budget_seconds`` set to this run's share of the chapter's budget."""
        return train.config_from_profile(self.profile, budget_seconds=self.budget(fraction, runs), **overrides)

    def options(self, **overrides: Any) -> train.RunOptions:
        """The profile's run options (quiet in a rendered book, its validation batch size), with ``overrides``."""
        return train.options_from_profile(self.profile, **overrides)


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
    elif session.source == "synthetic" or session.profile.name == "smoke":
        banner += _note_html(_test_build_note(session))
    return banner


def _test_build_note(session: Session) -> str:
    parts = []
    if session.profile.name == "smoke":
        parts.append("This page was built in the smoke profile, for tests: each chapter trains for seconds.")
    if session.source == "synthetic":
        parts.append("It runs on the synthetic stand-in (drawn shapes), not on CIFAR-10.")
    parts.append("Its numbers show that the code runs; they say nothing about what ResNet reaches on CIFAR-10, "
                 "and sentences that read them (which classes are confused, which recipe wins) may not hold "
                 "here. The published edition is built in the cpu profile on real CIFAR-10.")
    return " ".join(parts)


def _note_html(text: str) -> str:
    return (
        "<div class='admonition note resnet-lessons-smoke' style='border-left:4px solid #0071bc;"
        "background:#eef6fc;padding:0.5em 1em'><p class='admonition-title'><strong>A test build</strong></p>"
        f"<p>{html.escape(text)}</p></div>"
    )


def setup(title: str, *, with_data: bool = True, env: dict[str, str] | None = None) -> Session:
    """Resolve profile and data source, pick the device, seed everything, load the data, show a banner."""
    settings = from_env(env)
    clock = ChapterClock(settings.profile.chapter_seconds)  # the chapter's time counts from here
    runtime.cpu_threads()
    device = runtime.pick_device()
    runtime.seed_everything(settings.profile.seed)
    data, reason = _load_with_fallback(settings) if with_data else (None, None)
    session = Session(settings=settings, device=device, data=data, fallback_reason=reason,
                      clock=clock)
    session.facts = {
        "profile": settings.profile.summary(),
        "data": _describe_data(session),
        "device": runtime.describe_device(device),
        "versions": f"resnet_lessons {__version__}, torch {torch.__version__}",
    }
    _show(_banner_html(title, session), "\n".join(f"{k}: {v}" for k, v in session.facts.items()))
    glue("data_label", session.data_label)
    glue("chapter_budget", f"{settings.profile.chapter_seconds:.0f} s")
    return session


def finish(session: Session) -> None:
    """The chapter's last cell: glue and show how long it ran (from its set-up cell) against its budget."""
    clock = session.clock or ChapterClock(session.profile.chapter_seconds)
    seconds = clock.elapsed()
    verdict = "within" if seconds <= clock.budget_seconds else "OVER"
    text = (f"This chapter ran in {seconds:.0f} s, {verdict} its budget of {clock.budget_seconds:.0f} s "
            f"(profile {session.profile.name!r}, {runtime.describe_device(session.device)}).")
    glue("chapter_seconds", f"{seconds:.0f} s")
    _show(f"<p class='resnet-lessons-time'>{html.escape(text)}</p>", text)


def _describe_data(session: Session) -> str:
    if session.data is None:
        return f"{session.source} (not loaded)"
    sizes = ", ".join(f"{name} {len(split):,}" for name, split in session.data.splits.items())
    text = f"{session.source}: {sizes} images of {session.data.train.image_size[0]}px"
    if session.fallback_reason:
        text += f" (requested {session.settings.source!r}: unavailable, see the warning)"
    return "; ".join([text, *session.data.notes])


def _show(html_text: str, plain: str) -> None:
    """HTML in a notebook, the plain text in a terminal (IPython picks from the bundle) or without IPython."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display({"text/html": html_text, "text/plain": plain}, raw=True)
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


# --- the reference model: trained once per profile, data and recipe, then reused -------------------------


@dataclass
class Reference:
    """The network that the chapters on evaluation, looking inside, applications and deployment study."""

    model: nn.Module  # in eval mode, on the session's device
    history: Any  # pandas.DataFrame, one row per epoch of its training
    cfg: train.TrainConfig
    path: Path  # its file in the cache
    trained_now: bool  # False: loaded from the cache
    seconds: float  # wall-clock time of its training (when it was trained)
    epochs: float  # passes over the training split it trained for

    def describe(self) -> str:
        how = "trained in this chapter" if self.trained_now else f"loaded from {self.path}"
        return f"{self.cfg.model}, {self.epochs:.1f} epochs in {self.seconds:.0f} s, {how}"


def reference_recipe(profile: Profile) -> train.TrainConfig:
    """The reference model's recipe: the profile's, within the profile's ``reference_seconds``."""
    return train.config_from_profile(profile, budget_seconds=profile.reference_seconds)


def reference_key(profile: Profile, data: DataSplits, cfg: train.TrainConfig) -> str:
    """A digest of what the reference model depends on: profile, recipe (not run options) and every image."""
    digest = hashlib.sha256(json.dumps(
        {"profile": profile.name, "recipe": cfg.as_dict(), "classes": list(data.classes), "library": __version__},
        sort_keys=True).encode())
    for name in ("train", "val"):
        split = data[name]
        digest.update(name.encode())
        digest.update(split.images.contiguous().numpy().tobytes())
        digest.update(split.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def _load_reference(path: Path, key: str) -> checkpoints.Checkpoint | None:
    """The cached checkpoint at ``path`` if it is whole and was made for ``key``; None means: train anew."""
    if not path.exists():
        return None
    try:
        saved = checkpoints.load(path)
    except checkpoints.CheckpointError:
        return None  # damaged, truncated or foreign: rebuilt, never trusted
    if saved.extra.get("reference_key") != key:
        return None
    return saved


def reference_model(session: Session, *, cache_dir: str | Path | None = None) -> Reference:
    """The profile's reference model on this session's data: loaded from the cache when a whole file made by
    the same profile, data and recipe is there, else trained (within ``profile.reference_seconds``) and cached
    under ``cache_dir`` (default ``~/.cache/resnet_lessons/reference``) when it trained at least one epoch."""
    if session.data is None:
        raise ValueError("the reference model needs data: call book.setup(...) with with_data=True")
    profile, data = session.profile, session.data
    cfg = reference_recipe(profile)
    key = reference_key(profile, data, cfg)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "reference"
    path = folder / f"{profile.name}-{key}.pt"
    saved = _load_reference(path, key)
    if saved is not None:
        try:
            model = saved.build_model(session.device)
        except checkpoints.CheckpointError:
            saved = None
    if saved is not None:
        return Reference(model=model, history=saved.history_frame(), cfg=cfg, path=path, trained_now=False,
                         seconds=float(saved.extra["seconds"]), epochs=float(saved.extra["epochs"]))
    runtime.seed_everything(profile.seed)
    assert cfg.model is not None  # the profile's recipe names its network
    model = build_model(cfg.model, num_classes=len(data.classes), **cfg.model_options)
    result = train.fit(model, data, cfg, device=session.device, options=session.options())
    payload = checkpoints.make_checkpoint(
        model, model_name=cfg.model, model_options=cfg.model_options, classes=data.classes, mean=data.mean,
        std=data.std, history=result.history,
        extra={"reference_key": key, "seconds": result.seconds, "epochs": result.epochs_trained,
               "profile": profile.name, "recipe": cfg.as_dict()})
    if result.epochs_trained >= 1:  # a busy machine's fraction of an epoch is used here, never cached for the rest
        checkpoints.save(payload, path)
    return Reference(model=model.eval(), history=result.history, cfg=cfg, path=path, trained_now=True,
                     seconds=result.seconds, epochs=result.epochs_trained)


# --- benchmark results: what the chapters show from bench/results ----------------------------------


def results_dirs() -> list[Path]:
    """Where ``bench/results`` may be: next to a chapter (``../bench/results``), in the working directory, and
    in the repository checkout the package was installed from (editable installs)."""
    package_root = Path(__file__).resolve().parents[2]
    return [Path("../bench/results"), Path("bench/results"), package_root / "bench" / "results"]


def find_result(name: str) -> tuple[dict[str, Any] | None, Path | None]:
    """The benchmark result ``bench/results/<name>.json`` and its path, or ``(None, None)`` when this
    installation has none (Colab installs the library without the repository's results). A ``--smoke`` run's
    output (``"smoke": true``) is a test of the script, not a measurement: it counts as none."""
    for folder in results_dirs():
        path = folder / f"{name}.json"
        if path.is_file():
            result = json.loads(path.read_text())
            return (None, None) if result.get("smoke") else (result, path.resolve())
    return None, None


def describe_result(result: dict[str, Any] | None) -> str:
    """One line that labels a figure: the hardware and the date of a benchmark result."""
    if not result:
        return "no measurement in this installation"
    hw = result.get("hardware", {})
    threads = hw.get("torch_threads") or hw.get("cpu_count")
    where = hw.get("cuda") or f"{hw.get('cpu', 'unknown CPU')} ({threads} threads)"
    return f"{where}, torch {result.get('versions', {}).get('torch', '?')}, {str(result.get('date', '?'))[:10]}"
