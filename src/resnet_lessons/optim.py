"""The recipe of a run and its optimiser: :class:`TrainConfig`, the learning-rate schedules, parameter groups.

:func:`resnet_lessons.train.fit` reads everything it does from a :class:`TrainConfig` (also importable from
:mod:`resnet_lessons.train`). Two parts of the recipe live here as plain functions:

* the schedule is a pure function of the step (:func:`lr_at`), so resuming a run is exact and a plotted
  curve (:func:`schedule_curve`) shows exactly the numbers the training used;
* the optimiser (:func:`make_optimizer`) is built over parameter groups: by default two
  (:func:`decay_groups`: weight decay on convolution and linear weights only), or the caller's own, each
  with an ``lr_scale`` that multiplies the scheduled learning rate for that group (fine-tuning's
  discriminative learning rates).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from . import checkpoints

if TYPE_CHECKING:
    from .profiles import Profile

Optimizer = Literal["sgd", "adamw", "adam", "muon"]
Schedule = Literal["onecycle", "cosine", "step", "constant"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe. Frozen: derive variants with ``dataclasses.replace(cfg, lr=0.1)``."""

    # what is trained (recorded in checkpoints so that they can rebuild the network)
    model: str | None = None  # registry name from resnet_lessons.models; None for a hand-made network
    model_options: dict[str, Any] = field(default_factory=dict)  # build_model keyword arguments
    # how long
    epochs: int = 10  # passes over the training split; a budget run plans its own number of steps instead
    budget_seconds: float | None = None  # wall-clock seconds for the whole fit; None: train for `epochs`
    budget_probe_steps: int = 8  # steps timed (after 2 warm-up steps, at most 5% of the budget) to plan a budget run
    # batches
    batch_size: int = 128  # images per optimiser step, over all processes together (the global batch)
    eval_batch_size: int = 1000  # images per forward pass when evaluating (no gradients, so it can be large)
    # optimiser
    optimizer: Optimizer = "sgd"  # "sgd" (with momentum), "adamw" (decoupled decay), "adam" (the article's), "muon"
    lr: float = 0.1  # peak learning rate (the schedule scales it per step)
    momentum: float = 0.9  # SGD momentum, and beta1 of Adam/AdamW
    nesterov: bool = True  # Nesterov momentum for SGD: a look-ahead step, a little better for one-cycle
    # "muon": convolution filters take orthogonalised steps (MuonSGD), the rest SGD at `lr`, `momentum`
    # peak lr of the filters' orthogonalised steps, each filter bank held at norm sqrt(out channels); 0.08-0.12
    # did best for half-width ResNet-9 in 180 s probes on a CPU (airbench94_muon uses 0.24 for its own network)
    muon_lr: float = 0.1
    muon_momentum: float = 0.6  # Nesterov momentum of the filters' gradients before they are orthogonalised
    weight_decay: float = 5e-4  # L2 penalty (SGD, Adam) or decoupled decay (AdamW) per step
    decay_norm_and_bias: bool = False  # also decay BatchNorm and bias parameters (off: they do not overfit)
    grad_clip: float | None = None  # clip the global gradient norm to this value; None: no clipping
    freeze_bn_scale: bool = False  # BatchNorm scales stay at 1 and only the shifts train (Page 2018, airbench94)
    # weight of each new batch in BatchNorm's running statistics (torch's `momentum`); None: the model's own
    # (torch's default 0.1). airbench94 uses 0.4: a network that changes fast needs statistics that keep up
    bn_momentum: float | None = None
    # schedule (a pure function of the step: see lr_at)
    schedule: Schedule = "onecycle"  # "onecycle", "cosine" (with warm-up), "step" (the paper), "constant"
    warmup_fraction: float = 0.2  # share of all steps spent warming up (onecycle, cosine)
    start_factor: float = 0.04  # onecycle: first lr = lr * start_factor (1/25, as torch's OneCycleLR)
    final_factor: float = 0.0  # onecycle and cosine: last lr = lr * final_factor
    step_milestones: tuple[float, ...] = (0.5, 0.75)  # step: shares of all steps where lr is multiplied
    step_gamma: float = 0.1  # step: the factor at each milestone (He et al.: /10 at 32k and 48k of 64k)
    # loss
    label_smoothing: float = 0.0  # target smoothing epsilon in the cross-entropy (0.1 is usual)
    # initialisation from the data
    whiten: bool = False  # conv1 whitens 3x3 patches of 1,000 training images, frozen (models.whiten_first_conv)
    # every 3x3 convolution's first filters (as many as it has inputs) start as identities, the rest as
    # initialised (airbench94's Dirac init: each layer starts close to passing its input through)
    dirac_init: bool = False
    # augmentation (DeviceLoader's Augment)
    crop_padding: int = 4  # random crop after zero padding by this many pixels; 0: no crop
    flip: bool = True  # random horizontal flips
    alternate_flip: bool = False  # flip each image the other way each epoch after a random first (Augment)
    # progressive resizing: early steps see smaller crops, which cost about (side / full side)^2 of a step
    progressive_size: int = 0  # side (px) of the crops of the first `progressive_fraction` of steps; 0: off
    progressive_fraction: float = 0.5  # share of all steps that train on progressive_size crops
    cutout: int = 0  # side of a random square blanked out; 0: none
    # weight averaging: Lookahead as airbench94 schedules it (:class:`Lookahead`)
    lookahead_every: int = 0  # steps between pulls of the weights to their slow average (airbench94: 5); 0: off
    # speed ("auto": bf16 + channels_last where the hardware computes bf16, fp16 on older GPUs, else fp32)
    precision: Precision = "auto"  # autocast: bf16, or fp16 with a gradient scaler (train.resolve_precision)
    channels_last: bool | None = None  # NHWC memory layout; None: on with CUDA or with bf16 on a CPU
    seed: int = 0  # seeds the shuffling and augmentation (initialise the model with runtime.seed_everything)

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be at least 1, got {self.epochs}")
        if self.budget_seconds is not None and not self.budget_seconds > 0:
            problems.append(f"budget_seconds must be more than 0, got {self.budget_seconds}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            problems.append(f"lr must be more than 0, got {self.lr}")
        if self.optimizer not in ("sgd", "adamw", "adam", "muon"):
            problems.append(f"optimizer must be 'sgd', 'adamw', 'adam' or 'muon', got {self.optimizer!r}")
        if not self.muon_lr > 0:
            problems.append(f"muon_lr must be more than 0, got {self.muon_lr}")
        if self.schedule not in ("onecycle", "cosine", "step", "constant"):
            problems.append(f"schedule must be onecycle, cosine, step or constant, got {self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            problems.append(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if not 0 <= self.warmup_fraction < 1:
            problems.append(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.progressive_size < 0 or not 0 <= self.progressive_fraction <= 1:
            problems.append(f"progressive_size must be at least 0 and progressive_fraction in [0, 1], got "
                            f"{self.progressive_size} and {self.progressive_fraction}")
        if self.bn_momentum is not None and not 0 < self.bn_momentum <= 1:
            problems.append(f"bn_momentum must be in (0, 1] or None (the model's own), got {self.bn_momentum}")
        if self.lookahead_every < 0:
            problems.append(f"lookahead_every must be at least 0 (0: off), got {self.lookahead_every}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if problems:
            raise ValueError("; ".join(problems))

    def as_dict(self) -> dict[str, Any]:
        return checkpoints._plain(asdict(self))


@dataclass(frozen=True)
class RunOptions:
    """How a run is watched, stopped and kept, beside its recipe. None of these is compared when a run resumes,
    so each may differ between a run and its resume; the recipe (:class:`TrainConfig`) may not."""

    quiet: bool = False  # no progress bars or per-epoch lines (tests, CI logs, a rendered book)
    eval_batch_size: int = 1000  # images per forward pass when validating (no gradients, so it can be large)
    compile: bool = False  # torch.compile the model (minutes of compiling; pays off for long GPU runs)
    checkpoint_every: int = 1  # epochs between checkpoints when fit has a checkpoint_dir
    # early stopping on the validation split (the article's step 6): hooks.EarlyStopping
    patience: int | None = None  # stop after this many epochs without a better validation score; None: never
    monitor: Literal["val_accuracy", "val_loss"] = "val_accuracy"  # what "better" means
    restore_best: bool = True  # with early stopping: end with the weights of the best epoch

    def __post_init__(self) -> None:
        problems = []
        if self.eval_batch_size < 1:
            problems.append(f"eval_batch_size must be at least 1, got {self.eval_batch_size}")
        if self.checkpoint_every < 1:
            problems.append(f"checkpoint_every must be at least 1, got {self.checkpoint_every}")
        if self.patience is not None and self.patience < 1:
            problems.append(f"patience must be at least 1 (or None), got {self.patience}")
        if self.monitor not in ("val_accuracy", "val_loss"):
            problems.append(f"monitor must be val_accuracy or val_loss, got {self.monitor!r}")
        if problems:
            raise ValueError("; ".join(problems))


# How each optimiser steps, in words (the chapters say which one a recipe uses)
OPTIMIZER_NAMES = {
    "sgd": "SGD with Nesterov momentum",
    "adamw": "AdamW",
    "adam": "Adam",
    "muon": "Muon for the convolution filters and SGD with Nesterov momentum for the rest",
}

# The fields of a Profile that are also fields of its recipe (the rest of the recipe is TrainConfig's default).
PROFILE_RECIPE = ("model", "model_options", "epochs", "batch_size", "lr", "weight_decay", "label_smoothing",
                  "precision", "seed", "optimizer", "muon_lr")


def config_from_profile(profile: Profile, **overrides: Any) -> TrainConfig:
    """The recipe of a :class:`resnet_lessons.profiles.Profile`: TrainConfig's one-cycle schedule, at the profile's
    model, epochs, batch size, peak lr, weight decay, label smoothing, precision and optimiser (SGD with
    Nesterov, or Muon for the filters): :data:`PROFILE_RECIPE`."""
    unknown = set(overrides) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise TypeError(f"TrainConfig has no field(s) {sorted(unknown)}")
    values: dict[str, Any] = {name: getattr(profile, name) for name in PROFILE_RECIPE}
    values["model_options"] = dict(profile.model_options)
    return TrainConfig(**{**values, **overrides})


def options_from_profile(profile: Profile, **overrides: Any) -> RunOptions:
    """The run options of a profile: its quietness and validation batch size."""
    return RunOptions(**{"quiet": profile.quiet, "eval_batch_size": profile.eval_batch_size, **overrides})


# --- the learning-rate schedule ------------------------------------------------------------------


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """The learning rate for optimiser step ``step`` (0-based) of ``total_steps``: a pure function, so a
    resumed run and a plotted curve give exactly the numbers the training used."""
    total = max(1, total_steps)
    t = min(step, total - 1)
    peak = cfg.lr
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "step":
        factor = 1.0
        for milestone in cfg.step_milestones:
            if t >= round(milestone * total):
                factor *= cfg.step_gamma
        return peak * factor
    warmup = round(cfg.warmup_fraction * total)
    start = peak * cfg.start_factor if cfg.schedule == "onecycle" else 0.0
    end = peak * cfg.final_factor
    if t < warmup:  # linear warm-up; the first step already moves (1/warmup of the way)
        return start + (peak - start) * (t + 1) / warmup
    progress = (t - warmup) / max(1, total - 1 - warmup)  # 0 at the peak, 1 at the last step
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


def size_at(step: int, total_steps: int, cfg: TrainConfig) -> int | None:
    """The side of the square training crops at step ``step`` of ``total_steps``: ``cfg.progressive_size`` for
    the first ``cfg.progressive_fraction`` of the steps, then None (the whole image). Pure, as :func:`lr_at`."""
    if not cfg.progressive_size or step >= round(cfg.progressive_fraction * max(1, total_steps)):
        return None
    return cfg.progressive_size


def crop_work(first: int, end: int, total_steps: int, cfg: TrainConfig, height: int, width: int) -> float:
    """What steps ``first .. end-1`` of a run of ``total_steps`` cost in steps on whole ``height`` x ``width``
    images: a step on crops costs the share of the pixels it keeps (every layer of a convnet works per pixel).
    The budget clock plans with it (:class:`resnet_lessons.budget.BudgetClock`)."""
    side = size_at(0, total_steps, cfg)
    if side is None:
        return float(end - first)
    switch = round(cfg.progressive_fraction * max(1, total_steps))
    cheap = max(0, min(end, switch) - first)
    return cheap * min(side, height) * min(side, width) / (height * width) + (end - first - cheap)


def schedule_curve(cfg: TrainConfig, total_steps: int) -> list[float]:
    """The learning rate at every step of a run of ``total_steps`` steps (for plots)."""
    return [lr_at(step, total_steps, cfg) for step in range(total_steps)]


# --- parameter groups and the optimiser ----------------------------------------------------------


def decays(parameter: torch.Tensor, decay_norm_and_bias: bool) -> bool:
    """Whether weight decay applies to ``parameter``: convolution and linear weights always; BatchNorm
    and bias parameters (one dimension or none) only when ``decay_norm_and_bias``."""
    return parameter.ndim > 1 or decay_norm_and_bias


def decay_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The default parameter groups: the trainable parameters with ``cfg.weight_decay``, then (unless
    ``cfg.decay_norm_and_bias``) the BatchNorm and bias ones without. Frozen parameters are left out."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if decays(parameter, cfg.decay_norm_and_bias) else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _given_groups(model: nn.Module, param_groups: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the caller's groups (so that the loop's learning rates do not land in them), checked."""
    known = {id(p) for p in model.parameters()}
    groups = []
    for index, group in enumerate(param_groups):
        if not isinstance(group, Mapping) or "params" not in group:
            got = f"a dict with keys {sorted(group)}" if isinstance(group, Mapping) else type(group).__name__
            raise ValueError(f"param_groups[{index}] must be a dict with 'params' (a list of parameters); got {got}")
        scale = group.get("lr_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"param_groups[{index}]['lr_scale'] must be a number of at least 0, got {scale!r}")
        params = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
        strangers = sum(id(p) not in known for p in params)
        if strangers:
            raise ValueError(f"param_groups[{index}] holds {strangers} parameter(s) that are not the model's")
        groups.append({**group, "params": params})
    if not groups:
        raise ValueError("param_groups is empty: give at least one group, or None for the default groups")
    return groups


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, param_groups: Iterable[Mapping[str, Any]] | None = None
) -> torch.optim.Optimizer:
    """The optimiser of ``cfg`` over ``param_groups``, or by default over :func:`decay_groups` (weight decay
    skips BatchNorm and bias parameters unless asked for).

    Given groups are used as they are, frozen parameters included (a stage unfrozen later trains from then
    on); a group without ``weight_decay`` gets ``cfg.weight_decay``. Each group's ``lr`` is set by
    :func:`resnet_lessons.train.fit` at every step: the scheduled lr times the group's ``lr_scale`` (1 if absent)."""
    groups = decay_groups(model, cfg) if param_groups is None else _given_groups(model, param_groups)
    lr, decay = cfg.lr, cfg.weight_decay
    if cfg.optimizer == "muon":
        return MuonSGD(filter_groups(groups, cfg), lr=lr, momentum=cfg.momentum, weight_decay=decay,
                       filter_momentum=cfg.muon_momentum)
    if cfg.optimizer == "sgd":
        nesterov = cfg.nesterov and cfg.momentum > 0
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=nesterov, weight_decay=decay)
    optimizer = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer(groups, lr=lr, betas=(cfg.momentum, 0.999), weight_decay=decay)


# --- Muon for convolution filters ----------------------------------------------------------------

# The quintic Newton-Schulz iteration of Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"):
# coefficients chosen so that five steps push every singular value of a matrix of norm <= 1 close to 1.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 5


def orthogonalise(matrix: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to ``matrix`` ``[m, n]`` (its singular values set to about 1, the
    singular vectors kept), by Newton-Schulz iteration in bfloat16, which is accurate enough for a step."""
    a, b, c = NEWTON_SCHULZ
    x = matrix.bfloat16()
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T  # iterate on the side whose Gram matrix is the smaller
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(matrix.dtype)


def filter_groups(groups: list[dict[str, Any]], cfg: TrainConfig) -> list[dict[str, Any]]:
    """``groups`` with the convolution filters (4-d weights) of each moved to a group of their own that
    :class:`MuonSGD` orthogonalises, at ``cfg.muon_lr`` (as an ``lr_scale`` of the scheduled lr)."""
    split: list[dict[str, Any]] = []
    for group in groups:
        filters = [p for p in group["params"] if p.ndim == 4]
        rest = [p for p in group["params"] if p.ndim != 4]
        scale = group.get("lr_scale", 1.0)
        if filters:
            split.append({**group, "params": filters, "orthogonalise": True,
                          "lr_scale": scale * cfg.muon_lr / cfg.lr})
        if rest:
            split.append({**group, "params": rest, "orthogonalise": False})
    return split


class MuonSGD(torch.optim.Optimizer):
    """Muon for the groups marked ``orthogonalise`` (convolution filters), SGD with Nesterov momentum for the
    others (BatchNorm, biases, the linear head), in one optimiser so that a checkpoint holds one state.

    A filter bank ``W [out, in, k, k]`` steps along the orthogonalised Nesterov momentum of its gradient, read
    as a matrix ``[out, in*k*k]``: every direction of the update gets the same size, so rare directions are
    not drowned by common ones. Before each step ``W`` is rescaled to the norm ``sqrt(out)``; a BatchNorm
    follows every such convolution, so the scale is free and holding it fixes the effective step size (this
    replaces weight decay on the filters, as in Jordan's airbench94_muon). ``torch.optim.Muon`` takes 2-d
    parameters only, hence this class."""

    def __init__(self, params: Iterable[dict[str, Any]], *, lr: float, momentum: float, weight_decay: float,
                 filter_momentum: float) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "filter_momentum": filter_momentum, "orthogonalise": False})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            orthogonal = group["orthogonalise"]
            momentum = group["filter_momentum"] if orthogonal else group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad if orthogonal else p.grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                buffer.mul_(momentum).add_(grad)
                direction = grad.add(buffer, alpha=momentum)  # Nesterov
                if orthogonal:
                    p.mul_(math.sqrt(p.shape[0]) / (p.norm() + 1e-12))
                    direction = orthogonalise(direction.reshape(p.shape[0], -1)).view_as(p)
                p.add_(direction, alpha=-group["lr"])


# --- Lookahead: the weights pulled to a slow average of themselves -------------------------------------


class Lookahead:
    """Lookahead (Zhang et al. 2019) as airbench94 schedules it: a slow copy of the model's floating-point state
    (weights and BatchNorm statistics). After every ``every``-th step the slow copy moves toward the live state,
    ``slow = d * slow + (1 - d) * live``, and the live state is reset to it, with ``d = 0.95**every * progress**3``:
    early steps (``d`` near 0) are hardly averaged, the last ones over about the last 20 steps. :meth:`finish`
    leaves the model on the slow copy (the steps since the last pull are dropped, as in airbench94)."""

    base = 0.95  # the decay per step at the end of the run (airbench94)

    def __init__(self, model: nn.Module, every: int) -> None:
        self.every = every
        self.live = {name: t for name, t in model.state_dict().items() if t.is_floating_point()}
        self.slow = {name: t.detach().clone() for name, t in self.live.items()}

    def decay_at(self, step: int, total: int) -> float:
        return self.base ** self.every * min(1.0, step / max(1, total)) ** 3

    @torch.no_grad()
    def step(self, step: int, total: int) -> None:
        """After optimiser step number ``step`` (counted from 1) of a run of ``total`` steps."""
        if step % self.every:
            return
        decay = self.decay_at(step, total)
        for name, live in self.live.items():
            self.slow[name].lerp_(live, 1.0 - decay)
        self.finish()

    @torch.no_grad()
    def finish(self) -> None:
        """The live state set to the slow copy."""
        for name, live in self.live.items():
            live.copy_(self.slow[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.slow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, slow in self.slow.items():
                slow.copy_(state[name])


__all__ = [
    "OPTIMIZER_NAMES",
    "PROFILE_RECIPE",
    "Lookahead",
    "MuonSGD",
    "RunOptions",
    "TrainConfig",
    "config_from_profile",
    "crop_work",
    "decay_groups",
    "decays",
    "lr_at",
    "filter_groups",
    "make_optimizer",
    "options_from_profile",
    "orthogonalise",
    "schedule_curve",
    "size_at",
]
