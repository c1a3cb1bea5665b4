"""Fine-tuning: a pretrained network with a new head, what is frozen, learning rates per stage; then ``train.fit``.

Fine-tuning is the training loop of :mod:`resnet_lessons.train` with a prepared model:

1. **Model** (:func:`pretrained_model`): the network is built with the weights' own head (the weights come
   from :mod:`resnet_lessons.weights`: torchvision's ImageNet weights or a local file), loaded strictly, then a
   new ``fc`` *replaces* the old head (:func:`replace_head`): the article instead stacked ``Linear(512, 10)`` on
   top of the 1000 ImageNet logits, which fails at the first batch. Swapping the ImageNet stem for the CIFAR
   one re-initialises the stem (its 7x7 filters do not fit a 3x3 convolution). The data must be normalised as
   the weights were trained (:func:`with_normalisation`).
2. **Strategy** (:func:`prepare`): ``linear`` (linear probe: backbone frozen, its BatchNorm layers kept in
   eval mode so their running statistics stay: :class:`FreezableBatchNorm2d`), ``full`` (everything trains at
   one learning rate), ``discriminative`` (learning rate shrinks by ``decay`` per stage going down),
   ``gradual`` (the stages are unfrozen one at a time from the top, one more after every epoch).
3. **Training** (:func:`finetune`): ``train.fit`` with the strategy's parameter groups and hooks.

The offline transfer experiment (pretrain on some classes, fine-tune on the others with few labels,
against training from scratch on the same labels) is :mod:`resnet_lessons.transfer`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import train
from .data import DataSplits
from .hooks import Hook
from .models import build_model
from .optim import RunOptions, TrainConfig, config_from_profile, decays
from .weights import Weights, WeightsError, guess_architecture, load_weights

if TYPE_CHECKING:
    from .profiles import Profile

STRATEGIES = ("linear", "full", "discriminative", "gradual")
STEM_KEYS = ("conv1.", "bn1.")  # the stem of a ResNet (the blocks' own conv1/bn1 sit under layerN.)


# --- the model: load, check, replace the head --------------------------------------------------------


def replace_head(model: nn.Module, num_classes: int) -> nn.Linear:
    """Put a new ``fc`` with ``num_classes`` outputs *in place of* the old head (not on top of it)."""
    old = model.fc
    if not isinstance(old, nn.Linear):
        raise TypeError(f"the head model.fc must be an nn.Linear to be replaced; it is {type(old).__name__}")
    model.fc = nn.Linear(old.in_features, num_classes).to(old.weight.device)
    return model.fc


def _state_problems(model: nn.Module, state: Mapping[str, torch.Tensor], skip: Sequence[str]) -> list[str]:
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(skip))}
    given = {k: v for k, v in state.items() if not k.startswith(tuple(skip))}
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in given and given[k].shape != v.shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            problems.append(f"{len(items)} {label} (e.g. {', '.join(items[:2])})")
    return problems


@dataclass
class Pretrained:
    """A network ready to fine-tune, and what is new in it (trained at the full learning rate, never frozen)."""

    model: nn.Module
    weights: Weights
    model_name: str
    model_options: dict[str, Any]
    new_modules: tuple[str, ...]  # "fc" when the head was replaced, "conv1"/"bn1" when the stem was swapped

    @property
    def mean(self) -> tuple[float, ...]:
        return self.weights.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.weights.std


def pretrained_model(
    model_name: str, num_classes: int, weights: str | Path | Weights, *, stem: str | None = None,
    new_head: bool | None = None, classes: Sequence[str] | None = None, hub_dir: str | Path | None = None,
) -> Pretrained:
    """``model_name`` with ``weights`` loaded (checked strictly) and a head of ``num_classes`` outputs.

    ``new_head``: None (the default) replaces the head of torchvision-format weights (ImageNet's 1000 classes)
    and keeps the head of a resnet-lessons checkpoint; a kept head must fit (``num_classes`` outputs, and the
    checkpoint's class names when ``classes`` is given), else :class:`WeightsError`. True always replaces it.
    ``stem``: None keeps the weights' stem; "cifar" on ImageNet weights swaps in a fresh 3x3 stem.
    """
    loaded = load_weights(weights, model_name, hub_dir=hub_dir)
    if loaded.model_name and loaded.model_name != model_name:
        raise WeightsError(f"{loaded.source} holds weights for {loaded.model_name}, not for {model_name}: "
                           f"build {loaded.model_name} instead, or use weights made for {model_name}")
    options = {k: v for k, v in loaded.model_options.items() if k in ("stem", "shortcut", "width", "in_channels")}
    swap_stem = stem is not None and "stem" in options and options["stem"] != stem
    if stem is not None:
        options["stem"] = stem  # a network without a stem option (the CIFAR family) refuses it below
    if loaded.classes is None:  # a torchvision-format state dict: its head is ImageNet's, replaced by default
        new_head = True if new_head is None else new_head
        head_fits = loaded.num_outputs == num_classes
    else:  # a checkpoint of ours: its head is kept by default, and must then fit the classes
        new_head = False if new_head is None else new_head
        head_fits = loaded.num_outputs == num_classes and (classes is None or tuple(classes) == loaded.classes)
    if not new_head and not head_fits:
        have = f"classes {list(loaded.classes)}" if loaded.classes else "ImageNet's classes"
        want = f"classes {list(classes)}" if classes is not None else f"{num_classes} classes"
        raise WeightsError(
            f"the head of {loaded.source} has {loaded.num_outputs} outputs ({have}) but the data has {want}; "
            "ask for a new head (new_head=True, command line --new-head) to replace it"
        )
    try:
        model = build_model(model_name, num_classes=loaded.num_outputs or num_classes, **options)
    except (TypeError, ValueError) as error:
        raise WeightsError(f"cannot build {model_name} with the options of {loaded.source}: {error}") from error
    skip = STEM_KEYS if swap_stem else ()
    problems = _state_problems(model, loaded.state, skip)
    if problems:
        guess = guess_architecture(loaded.state)
        found = f"{guess[0]} (stem {guess[1].get('stem', 'cifar')})" if guess else "another architecture"
        raise WeightsError(
            f"{loaded.source} holds weights for {found} that do not fit {model_name} with options {options}: "
            + "; ".join(problems)
        )
    state = {k: v for k, v in loaded.state.items() if not k.startswith(skip)} if skip else loaded.state
    model.load_state_dict(state, strict=not skip)
    new = ["conv1", "bn1"] if swap_stem else []
    if new_head:
        replace_head(model, num_classes)
        new.append("fc")
    return Pretrained(model, loaded, model_name, options, tuple(new))


def with_normalisation(data: DataSplits, mean: Sequence[float], std: Sequence[float]) -> DataSplits:
    """``data`` normalised with the statistics the weights were trained with (ImageNet's for torchvision's)."""
    return replace(data, mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))


# --- strategies: what is frozen, learning rates per stage ----------------------------------------------


def stage_of(parameter_name: str) -> str:
    """The stage a parameter belongs to: ``stem`` (conv1, bn1), ``layer1``..``layerN``, or ``fc``."""
    top = parameter_name.split(".", 1)[0]
    return "stem" if top in ("conv1", "bn1", "maxpool") else top


def stages(model: nn.Module) -> list[str]:
    """Stage names from the input to the head: ``["stem", "layer1", ..., "fc"]``."""
    names: list[str] = []
    for name, _ in model.named_parameters():
        stage = stage_of(name)
        if stage not in names:
            names.append(stage)
    return names


def set_trainable(model: nn.Module, stage_names: Iterable[str], trainable: bool = True) -> None:
    """Freeze (``trainable=False``) or unfreeze the parameters of the named stages."""
    wanted = set(stage_names)
    for name, parameter in model.named_parameters():
        if stage_of(name) in wanted:
            parameter.requires_grad_(trainable)


class FreezableBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that stays in eval mode while its weight and bias are frozen (``requires_grad=False``).

    A frozen BatchNorm in train mode would still normalise with the batch's statistics and overwrite its
    running statistics: the "frozen" backbone would change. Decided at each ``train()`` call, so a layer
    unfrozen later (gradual unfreezing) trains again from the next ``model.train()``, the next epoch."""

    @property
    def frozen(self) -> bool:
        parameters = list(self.parameters(recurse=False))
        return bool(parameters) and not any(p.requires_grad for p in parameters)

    def train(self, mode: bool = True) -> FreezableBatchNorm2d:
        return super().train(mode and not self.frozen)  # frozen: normalise with the running statistics, keep them

    @classmethod
    def taking_over(cls, norm: nn.BatchNorm2d) -> FreezableBatchNorm2d:
        """A layer holding ``norm``'s own parameters and buffers: the same tensors, so the state dict, an
        optimiser's parameter groups and any other reference to them stay valid."""
        layer = cls(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
        for name, tensor in [*norm.named_parameters(recurse=False), *norm.named_buffers(recurse=False)]:
            setattr(layer, name, tensor)
        return layer.train(norm.training)


def keep_frozen_batchnorm_in_eval(model: nn.Module) -> nn.Module:
    """Make ``model.train()`` leave every BatchNorm layer whose parameters are frozen in eval mode: each
    ``nn.BatchNorm2d`` becomes a :class:`FreezableBatchNorm2d` holding the same tensors (the state dict, and so
    checkpoints, are unchanged)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:  # exactly: a FreezableBatchNorm2d already is one
                setattr(parent, name, FreezableBatchNorm2d.taking_over(child))
    return model.train(model.training)


@dataclass
class Plan:
    """What a strategy does to a model: the parameter groups (with their learning rates) and the hooks."""

    strategy: str
    groups: list[dict[str, Any]]  # torch optimiser groups: params, lr, lr_scale, weight_decay, name
    hooks: list[Hook]
    frozen: tuple[str, ...]  # stages frozen at the start

    def learning_rates(self) -> dict[str, float]:
        """Peak learning rate per stage (the schedule scales all of them by the same factor)."""
        return {g["name"].split(" ")[0]: g["lr"] for g in self.groups}


class GradualUnfreezing(Hook):
    """Unfreeze the next stage down after every epoch (ULMFiT's gradual unfreezing), ``order`` from the top."""

    def __init__(self, model: nn.Module, order: Sequence[str]) -> None:
        self.model, self.order = model, list(order)
        self.unfrozen: list[tuple[int, str]] = []  # (after epoch, stage)

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        if len(self.unfrozen) < len(self.order):
            stage = self.order[len(self.unfrozen)]
            set_trainable(self.model, [stage])
            self.unfrozen.append((int(row["epoch"]), stage))


def lr_scales(
    model: nn.Module, strategy: str, *, decay: float = 0.5, new_modules: Sequence[str] = ("fc",)
) -> dict[str, float]:
    """The learning rate of each stage as a multiple of the head's: 1 everywhere except ``discriminative``,
    where each stage below the head gets ``decay`` times the one above it (new modules keep 1)."""
    names = stages(model)
    new_stages = {stage_of(m + ".") for m in new_modules}
    if strategy != "discriminative":
        return {s: 1.0 for s in names}
    scales, depth = {}, 0
    for stage in reversed(names):
        if stage in new_stages:
            scales[stage] = 1.0
        else:
            depth += 1
            scales[stage] = decay ** depth
    return {s: scales[s] for s in names}


def prepare(
    model: nn.Module, strategy: str, *, lr: float, weight_decay: float, new_modules: Sequence[str] = ("fc",),
    decay: float = 0.5, decay_norm_and_bias: bool = False,
) -> Plan:
    """Freeze what ``strategy`` freezes, keep frozen BatchNorm layers in eval mode, and build the parameter
    groups: one per stage (two when weight decay skips BatchNorm and bias parameters), each with its ``lr``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    new_stages = {stage_of(m + ".") for m in new_modules}
    backbone = [s for s in stages(model) if s not in new_stages]
    frozen = tuple(backbone) if strategy in ("linear", "gradual") else ()
    set_trainable(model, stages(model), True)
    set_trainable(model, frozen, False)
    keep_frozen_batchnorm_in_eval(model)
    scales = lr_scales(model, strategy, decay=decay, new_modules=new_modules)
    groups = []
    for stage in stages(model):
        if strategy == "linear" and stage in frozen:
            continue  # never trained: not in the optimiser at all
        params = [p for n, p in model.named_parameters() if stage_of(n) == stage]
        decay_params = [p for p in params if decays(p, decay_norm_and_bias)]
        other = [p for p in params if not decays(p, decay_norm_and_bias)]
        for suffix, members, wd in (("", decay_params, weight_decay), (" (no decay)", other, 0.0)):
            if members:
                groups.append({"name": stage + suffix, "params": members, "lr": lr * scales[stage],
                               "lr_scale": scales[stage], "weight_decay": wd})
    hooks: list[Hook] = [GradualUnfreezing(model, list(reversed(backbone)))] if strategy == "gradual" else []
    return Plan(strategy, groups, hooks, frozen)


def finetune(
    model: nn.Module, data: DataSplits, cfg: TrainConfig, *, strategy: str = "full", device: str | torch.device,
    new_modules: Sequence[str] = ("fc",), decay: float = 0.5, options: RunOptions | None = None,
) -> train.FitResult:
    """Prepare ``model`` for ``strategy`` and train it with ``train.fit`` (``cfg.lr`` is the head's peak lr;
    ``options`` are fit's run options).

    ``data`` must be normalised as the weights expect (:func:`with_normalisation`). Each step, every parameter
    group gets its ``lr_scale`` times the scheduled lr (``train.fit(param_groups=...)``)."""
    plan = prepare(model, strategy, lr=cfg.lr, weight_decay=cfg.weight_decay, new_modules=new_modules, decay=decay,
                   decay_norm_and_bias=cfg.decay_norm_and_bias)
    return train.fit(model, data, cfg, device=device, options=options, hooks=plan.hooks, param_groups=plan.groups)


# --- recipes ---------------------------------------------------------------------------------------------

STRATEGY_LR = {"linear": 1.0, "full": 0.25, "discriminative": 0.5, "gradual": 0.25}
"""Peak learning rate of the head per strategy, as a share of the linear probe's. A linear probe trains a
fresh layer on fixed features and takes a large step; full fine-tuning moves pretrained weights, which a
large step would wreck; the discriminative head can go higher because the stages below it get less."""


def finetune_config(profile: Profile, strategy: str, *, image_size: int = 32, **overrides: Any) -> TrainConfig:
    """A fine-tuning recipe from a profile: SGD + Nesterov, one-cycle, a third of the profile's epochs, a
    batch of at most 128 above 64 pixels, a peak head lr of 0.1 per 128 images (times :data:`STRATEGY_LR`),
    and random crops padded in proportion to the image size, every step on whole images.

    SGD even where the profile trains from scratch with Muon: Muon holds each filter bank at a fixed norm, which
    would rescale pretrained filters at the first step, and a frozen BatchNorm (the ``linear`` strategy's, or
    ``freeze_bn``) does not undo a rescaling. Progressive resizing is a trick for short runs from scratch; a
    pretrained network is shown whole images, as it will be at test time."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    batch = overrides.pop("batch_size", profile.batch_size if image_size <= 64 else min(profile.batch_size, 128))
    values: dict[str, Any] = dict(
        batch_size=batch, lr=0.1 * batch / 128 * STRATEGY_LR[strategy], epochs=max(1, profile.epochs // 3),
        crop_padding=max(1, round(4 * image_size / 32)), optimizer="sgd", progressive_size=0,
    )
    values.update(overrides)
    return config_from_profile(profile, **values)


__all__ = [
    "FreezableBatchNorm2d",
    "GradualUnfreezing",
    "Plan",
    "Pretrained",
    "STRATEGIES",
    "STRATEGY_LR",
    "finetune",
    "finetune_config",
    "keep_frozen_batchnorm_in_eval",
    "lr_scales",
    "prepare",
    "pretrained_model",
    "replace_head",
    "set_trainable",
    "stage_of",
    "stages",
    "with_normalisation",
]
