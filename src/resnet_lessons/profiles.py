"""Run profiles: how much compute a chapter, a test or a command-line run may use.

This module is the one place that reads our environment variables (``RESNET_LESSONS_PROFILE``,
``RESNET_LESSONS_DATA``, ``RESNET_LESSONS_CHAPTER_SECONDS`` and ``RESNET_LESSONS_QUIET``); torchrun's own
variables are read by one function, :func:`resnet_lessons.distributed.torchrun_env`. Everything else takes a
:class:`Profile` or explicit arguments. Profiles are frozen: derive a variant with :func:`dataclasses.replace`,
never mutate one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypedDict

PROFILE_ENV = "RESNET_LESSONS_PROFILE"
DATA_ENV = "RESNET_LESSONS_DATA"
CHAPTER_ENV = "RESNET_LESSONS_CHAPTER_SECONDS"  # a chapter budget other than the profile's (a quick look, a GPU check)
QUIET_ENV = "RESNET_LESSONS_QUIET"  # 1: no progress output (`make book`: a rendered page shows no half-drawn bars)
NAMED_SOURCES = ("cifar10", "synthetic")


class DataSizes(TypedDict):
    """How :func:`resnet_lessons.data.load` sizes the splits (its keyword arguments of the same names)."""

    train_per_class: int | None
    val_per_class: int
    synthetic_per_class: int


@dataclass(frozen=True)
class Profile:
    """How big a run is. Every field is plain data so a profile can be printed, compared and saved."""

    name: str
    description: str
    default_source: str  # data source when RESNET_LESSONS_DATA is unset
    train_per_class: int | None  # training images kept per class (None: all of them)
    val_per_class: int  # validation images carved out of train, per class (500 x 10 = the usual 5,000)
    synthetic_per_class: int  # images per class when the synthetic stand-in is used
    model: str  # the recipe's model, a name from resnet_lessons.models
    epochs: int  # passes over the training split when a run has no time budget (the command line's default)
    batch_size: int  # images per optimiser step
    lr: float  # peak learning rate of the one-cycle schedule (SGD + Nesterov)
    weight_decay: float  # L2 penalty per step, applied to conv/linear weights only
    label_smoothing: float  # target smoothing epsilon in the cross-entropy loss
    eval_batch_size: int  # images per forward pass when only predicting
    seed: int  # one seed for data splits, initialisation and shuffling
    quiet: bool  # no progress bars (tests, CI logs)
    chapter_seconds: float  # wall-clock budget of one chapter, set-up to last cell; its training runs share it
    reference_seconds: float  # training budget of the reference model that chapters 7, 8, 9, 12 and 13 study
    model_options: dict[str, object] = field(default_factory=dict)  # build_model keyword arguments
    precision: str = "auto"  # TrainConfig.precision: "auto" is bf16 where the hardware computes it natively
    optimizer: str = "sgd"  # TrainConfig.optimizer: "muon" steps the convolution filters with Muon (optim.MuonSGD)
    muon_lr: float = 0.1  # with "muon": the filters' peak learning rate

    def data_sizes(self) -> DataSizes:
        """The keyword arguments of :func:`resnet_lessons.data.load` that size the splits."""
        return {"train_per_class": self.train_per_class, "val_per_class": self.val_per_class,
                "synthetic_per_class": self.synthetic_per_class}

    def summary(self) -> str:
        train = "all" if self.train_per_class is None else f"{self.train_per_class}/class"
        return (
            f"profile {self.name!r}: {self.description}; model {self.model}, batch {self.batch_size}, "
            f"train {train}, val {self.val_per_class}/class; each chapter trains within {self.chapter_seconds:.0f} s"
        )


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        description="tests and CI: synthetic data, tiny models, seconds per chapter on 2 CPU cores",
        default_source="synthetic",
        train_per_class=None,
        val_per_class=50,
        synthetic_per_class=250,
        model="resnet8",
        epochs=10,
        batch_size=64,
        lr=0.2,
        weight_decay=5e-4,
        label_smoothing=0.0,
        eval_batch_size=500,
        seed=0,
        quiet=True,
        chapter_seconds=30.0,  # the bound is 60 s on 2 cores; CI executes every chapter twice
        reference_seconds=10.0,
        model_options={"width": 0.5},  # half width: 0.84 validation accuracy at 70% of the full width's cost
        precision="fp32",  # the same numbers on every CPU, with or without bf16 instructions
    ),
    "cpu": Profile(
        name="cpu",
        description="a laptop CPU: a real CIFAR-10 subset, minutes per chapter",
        default_source="cifar10",
        train_per_class=1000,
        val_per_class=200,
        synthetic_per_class=600,
        model="resnet9",
        epochs=10,
        batch_size=256,
        lr=0.4,
        weight_decay=5e-4,
        label_smoothing=0.2,
        eval_batch_size=1000,
        seed=0,
        quiet=False,
        chapter_seconds=300.0,  # 5 minutes a chapter on 2 cores, about 40 minutes for the whole book
        reference_seconds=180.0,
        # Half-width ResNet-9 in bf16: the best of the probes in bench/time_to_accuracy.py on 2 cores.
        model_options={"width": 0.5},
        # Issue 18 (bench/results/recipe_changes.json, chapter 14): Muon for the filters paid; alternating flips
        # and progressive resizing did not at 180 s (bench/results/probes/), nor Lookahead and frozen BatchNorm
        # scales (recipe_changes_600.json), nor BatchNorm momentum 0.4 and Dirac initialisation
        # (recipe_changes_600_bn_dirac.json) at 600 s, so the recipe leaves them out.
        optimizer="muon",
        muon_lr=0.1,
    ),
    "gpu": Profile(
        name="gpu",
        description="Colab or any CUDA GPU: full CIFAR-10, full schedules",
        default_source="cifar10",
        train_per_class=None,
        val_per_class=500,
        synthetic_per_class=2000,
        model="resnet18",
        epochs=30,
        batch_size=512,
        lr=0.4,
        weight_decay=5e-4,
        label_smoothing=0.1,
        eval_batch_size=2000,
        seed=0,
        quiet=False,
        chapter_seconds=600.0,  # 10 minutes a chapter on a free Colab GPU (T4 class)
        reference_seconds=300.0,
        model_options={"stem": "cifar"},
    ),
}


class SettingsError(ValueError):
    """A profile name or data source that cannot be used; the message lists the valid choices."""


def get_profile(name: str) -> Profile:
    """The named profile, or a :class:`SettingsError` that lists the valid names."""
    try:
        return PROFILES[name]
    except KeyError:
        raise SettingsError(
            f"unknown profile {name!r}; valid profiles: {', '.join(PROFILES)}"
        ) from None


def check_source(source: str) -> str:
    """Return ``source`` if it is a named source or an existing path, else raise :class:`SettingsError`."""
    if source in NAMED_SOURCES:
        return source
    path = Path(source).expanduser()
    if not path.exists():
        raise SettingsError(
            f"data source {source!r} is neither a named source ({', '.join(NAMED_SOURCES)}) "
            f"nor an existing path: {path.resolve()} does not exist"
        )
    return str(path)


def with_chapter_seconds(profile: Profile, seconds: float) -> Profile:
    """``profile`` with another chapter budget; the reference model's budget keeps its share of it."""
    share = profile.reference_seconds / profile.chapter_seconds
    return replace(profile, chapter_seconds=seconds, reference_seconds=share * seconds)


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not (seconds > 0 and seconds != float("inf")):
        raise SettingsError(f"{CHAPTER_ENV} must be a number of seconds above 0, got {text!r}")
    return seconds


def default_profile_name(cuda_available: bool | None = None) -> str:
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return "gpu" if cuda_available else "cpu"


@dataclass(frozen=True)
class Settings:
    """What the environment asks for: a profile and a data source."""

    profile: Profile
    source: str
    source_from_env: bool  # False when the profile's default source is used


def profile_from_env(env: Mapping[str, str] | None = None, cuda_available: bool | None = None) -> Profile:
    """The profile the environment asks for (``RESNET_LESSONS_PROFILE``, ``RESNET_LESSONS_CHAPTER_SECONDS``), else
    the one for this hardware. ``RESNET_LESSONS_DATA`` is not read: a caller with an explicit source needs it not."""
    env = os.environ if env is None else env
    profile = get_profile(env.get(PROFILE_ENV, "").strip() or default_profile_name(cuda_available))
    raw_seconds = env.get(CHAPTER_ENV, "").strip()
    if raw_seconds:
        profile = with_chapter_seconds(profile, _seconds(raw_seconds))
    quiet = env.get(QUIET_ENV, "").strip().lower()
    if quiet not in ("", "0", "1"):
        raise SettingsError(f"{QUIET_ENV} must be 1 (no progress output) or 0, got {quiet!r}")
    return replace(profile, quiet=True) if quiet == "1" else profile


def from_env(env: Mapping[str, str] | None = None, cuda_available: bool | None = None) -> Settings:
    """Read ``RESNET_LESSONS_PROFILE`` and ``RESNET_LESSONS_DATA``; the only reader of the environment."""
    env = os.environ if env is None else env
    profile = profile_from_env(env, cuda_available)
    raw_source = env.get(DATA_ENV, "").strip()
    source = check_source(raw_source) if raw_source else profile.default_source
    return Settings(profile=profile, source=source, source_from_env=bool(raw_source))


__all__ = [
    "PROFILES",
    "Profile",
    "Settings",
    "SettingsError",
    "check_source",
    "from_env",
    "profile_from_env",
    "with_chapter_seconds",
    "get_profile",
    "replace",
]
