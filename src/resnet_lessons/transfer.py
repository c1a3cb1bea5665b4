"""The offline transfer experiment of chapter 6 and the tables around it.

Pretrain on some classes (CIFAR-10's six animals), fine-tune on the others (the four vehicles) with few
labels, against training from scratch on the same labels (:func:`transfer_experiment`), optionally beside
recipes of their own such as the article's (:data:`ARTICLE_RECIPE`); what feeding 32x32 images to an ImageNet
ResNet costs (:func:`input_handling_costs`); and how far fine-tuning moves the BatchNorm statistics of the
pretrained network (:func:`batchnorm_statistics`, :func:`batchnorm_shift`). The data it needs (a subset of the
classes, a few labels, resized splits) comes from :mod:`resnet_lessons.data.subsets`; the fine-tuning itself is
:mod:`resnet_lessons.finetune`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import train
from .data import DataSplits, few_labels, select_classes
from .finetune import STRATEGIES, STRATEGY_LR, finetune, pretrained_model, stage_of, with_normalisation
from .models import build_model, count_flops
from .optim import RunOptions, TrainConfig
from .weights import Weights

if TYPE_CHECKING:
    import pandas as pd

# --- input handling for 32x32 images: the cost side ------------------------------------------------------

INPUT_HANDLING = (
    ("ImageNet stem at 32x32 (the article)", "imagenet", 32),
    ("CIFAR stem at 32x32", "cifar", 32),
    ("upsampled to 64x64", "imagenet", 64),
    ("upsampled to 128x128", "imagenet", 128),
    ("upsampled to 224x224", "imagenet", 224),
)


def input_handling_costs(model_name: str = "resnet18",
                         choices: Sequence[tuple[str, str, int]] = INPUT_HANDLING) -> pd.DataFrame:
    """One row per way of feeding 32x32 images to an ImageNet ResNet: the feature map the last stage sees,
    and GFLOPs per image (multiply-adds, as in the paper) relative to the article's choice."""
    import pandas as pd

    rows = []
    for label, stem, size in choices:
        model = build_model(model_name, num_classes=10, stem=stem)
        last = size // (32 if stem == "imagenet" else 8)
        rows.append({"input": label, "stem": stem, "image size": size, "last stage map": f"{last}x{last}",
                     "GMACs per image": count_flops(model, (1, 3, size, size)) / 2e9,
                     "pretrained stem kept": stem == "imagenet"})
    table = pd.DataFrame(rows)
    table["cost vs article"] = table["GMACs per image"] / table["GMACs per image"].iloc[0]
    return table


# --- BatchNorm statistics -----------------------------------------------------------------------------------


def batchnorm_statistics(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every BatchNorm layer's running mean and variance, by layer name."""
    statistics = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None and m.running_var is not None:
            statistics[name] = (m.running_mean.detach().cpu().clone(), m.running_var.detach().cpu().clone())
    return statistics


def batchnorm_shift(before: Mapping[str, tuple[torch.Tensor, ...]],
                    after: Mapping[str, tuple[torch.Tensor, ...]]) -> pd.DataFrame:
    """Per BatchNorm layer: how far its running statistics moved (largest absolute change of the mean, and
    of the log of the variance). Zero means bit-identical."""
    import pandas as pd

    rows = []
    for name, (mean0, var0) in before.items():
        mean1, var1 = after[name]
        log_var_shift = (var1.clamp_min(1e-12).log() - var0.clamp_min(1e-12).log()).abs().max()
        rows.append({"layer": name or "(model)", "stage": stage_of(name + "."),
                     "mean shift": float((mean1 - mean0).abs().max()),
                     "log-variance shift": float(log_var_shift),
                     "identical": bool(torch.equal(mean0, mean1) and torch.equal(var0, var1))})
    return pd.DataFrame(rows)


# --- the offline transfer experiment ----------------------------------------------------------------------

CIFAR10_ANIMALS = ("bird", "cat", "deer", "dog", "frog", "horse")
CIFAR10_VEHICLES = ("airplane", "automobile", "ship", "truck")


def transfer_classes(classes: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(pretraining classes, target classes): CIFAR-10's six animals and four vehicles; for any other
    ten classes (the synthetic stand-in) the first six and the last four; otherwise the two halves."""
    classes = tuple(classes)
    if set(CIFAR10_ANIMALS + CIFAR10_VEHICLES) <= set(classes) and len(classes) == 10:
        return CIFAR10_ANIMALS, CIFAR10_VEHICLES
    if len(classes) < 4:
        raise ValueError(f"the transfer experiment needs at least 4 classes, got {len(classes)}")
    cut = 6 if len(classes) == 10 else len(classes) // 2
    return classes[:cut], classes[cut:]


def steps_config(cfg: TrainConfig, n_train: int, min_steps: int) -> TrainConfig:
    """``cfg`` adjusted to a small training split: a batch of at most a quarter of the split (at least 8
    images, never more than the split), and enough epochs for at least ``min_steps`` optimiser steps."""
    batch = max(1, min(cfg.batch_size, n_train, max(8, n_train // 4)))
    steps_per_epoch = max(1, n_train // batch)
    return replace(cfg, batch_size=batch, epochs=max(cfg.epochs, math.ceil(min_steps / steps_per_epoch)))


@dataclass(frozen=True)
class Recipe:
    """A fine-tuning method of its own for :func:`transfer_experiment`: a strategy, changes to the fine-tuning
    recipe (``TrainConfig`` fields, applied as they are: an ``lr`` here is not scaled by the strategy), and the
    normalisation of its inputs (None: the pretrained weights' own statistics)."""

    strategy: str
    changes: Mapping[str, Any] = field(default_factory=dict)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        unknown = sorted(set(self.changes) - {f.name for f in fields(TrainConfig)})
        if unknown:
            raise ValueError(f"TrainConfig has no field(s) {unknown}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")

    def config(self, finetune_cfg: TrainConfig) -> TrainConfig:
        """``finetune_cfg`` with this recipe's changes; its lr scaled by :data:`STRATEGY_LR` unless they set one."""
        return replace(finetune_cfg, **{"lr": finetune_cfg.lr * STRATEGY_LR[self.strategy], **self.changes})

    def statistics(self, weights: Weights) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The (mean, std) its inputs are normalised with: its own, else those the weights were trained with."""
        if self.mean is not None and self.std is not None:
            return self.mean, self.std
        return weights.mean, weights.std


ARTICLE_RECIPE = Recipe(
    "full",
    {"optimizer": "adam", "lr": 1e-3, "schedule": "constant", "weight_decay": 0.0, "label_smoothing": 0.0,
     "crop_padding": 0, "flip": False},
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
)
"""The article's fine-tuning (its section 5.2), with its head fixed: every layer trains, Adam at a constant 1e-3,
no weight decay, no augmentation, no label smoothing, inputs normalised with (0.5, 0.5, 0.5), at 32x32."""


@dataclass
class TransferResult:
    """The table (one row per labels fraction and method), every run's history, how far each fine-tuned
    run moved the BatchNorm statistics of the pretrained network, and the pretrained weights."""

    table: pd.DataFrame
    histories: dict[tuple[float, str], pd.DataFrame]
    batchnorm_shifts: dict[tuple[float, str], pd.DataFrame]
    pretrained: Weights
    pretrain_history: pd.DataFrame


@dataclass(frozen=True)
class _Runs:
    """What every run on the target classes shares: the network, the pretrained weights, where and how to train."""

    model_name: str
    model_options: Mapping[str, Any]
    num_classes: int
    weights: Weights
    device: str | torch.device
    options: RunOptions | None

    def from_scratch(self, data: DataSplits, cfg: TrainConfig) -> tuple[nn.Module, DataSplits, train.FitResult]:
        net = build_model(self.model_name, num_classes=self.num_classes, **self.model_options)
        return net, data, train.fit(net, data, cfg, device=self.device, options=self.options)

    def fine_tuned(self, recipe: Recipe, data: DataSplits,
                   cfg: TrainConfig) -> tuple[nn.Module, DataSplits, train.FitResult]:
        ready = pretrained_model(self.model_name, self.num_classes, self.weights, new_head=True)
        data = with_normalisation(data, *recipe.statistics(self.weights))
        result = finetune(ready.model, data, cfg, strategy=recipe.strategy, device=self.device,
                          new_modules=ready.new_modules, options=self.options)
        return ready.model, data, result


def transfer_experiment(
    data: DataSplits, *, model_name: str, model_options: Mapping[str, Any] | None = None,
    pretrain_cfg: TrainConfig, finetune_cfg: TrainConfig, scratch_cfg: TrainConfig | None = None,
    fractions: Sequence[float] = (0.01, 0.1),
    strategies: Sequence[str] | Mapping[float, Sequence[str]] = ("linear", "full"),
    lrs: Mapping[str, float] | None = None, min_steps: int = 30, device: str | torch.device, seed: int = 0,
    recipes: Mapping[str, Recipe] | None = None, options: RunOptions | None = None,
) -> TransferResult:
    """Pretrain on some classes (:func:`transfer_classes`), then for each labels fraction fine-tune on the
    other classes with each strategy, and train from scratch on the same few labels.

    Every run takes at least ``min_steps`` optimiser steps (:func:`steps_config`); ``lrs`` maps a strategy
    (or ``"scratch"``) to its peak learning rate (default: ``finetune_cfg.lr`` scaled by
    :data:`resnet_lessons.finetune.STRATEGY_LR`, and ``scratch_cfg.lr`` from scratch). Accuracy is measured
    once at the end on the target classes' test split (val when there is none). Only the runs with the largest
    fraction of labels evaluate on val after every epoch, for the curves: with a handful of images an epoch is
    one step, and evaluating after each would cost more than the training. ``strategies`` may map a fraction to
    its own list (for example all four strategies at 10% and two at 1%). ``recipes`` names methods of their own
    (for example ``{"article": ARTICLE_RECIPE}``) that ``strategies`` may then list beside the four strategies;
    ``lrs`` may override their learning rate too. ``options``: every run's ``train.fit`` options."""
    import pandas as pd

    from .evaluate import evaluate

    recipes, lrs = dict(recipes or {}), dict(lrs or {})
    clash = sorted(set(recipes) & {"scratch", *STRATEGY_LR})
    if clash:
        raise ValueError(f"recipe names {clash} are taken by the built-in methods; choose other names")
    source_classes, target_classes = transfer_classes(data.classes)
    source = select_classes(data, source_classes)
    torch.manual_seed(seed)
    model = build_model(model_name, num_classes=len(source_classes), **dict(model_options or {}))
    pre = train.fit(model, source, pretrain_cfg, device=device, options=options)
    weights = Weights.from_model(model, model_name, classes=source_classes, mean=source.mean, std=source.std,
                                 model_options=model_options,
                                 source=f"{model_name} pretrained on {', '.join(source_classes)}")
    pretrained_stats = batchnorm_statistics(model)
    runs = _Runs(model_name, dict(model_options or {}), len(target_classes), weights, device, options)
    target = select_classes(data, target_classes)
    split = "test" if "test" in target.splits else "val"
    rows, histories, shifts = [], {}, {}
    for fraction in fractions:
        few = few_labels(target, fraction, seed=seed)
        curves = fraction == max(fractions) and "val" in few.splits  # evaluate after every epoch
        few_run = replace(few, splits={"train": few.train, **({"val": few.val} if curves else {})})
        methods = strategies.get(fraction, ()) if isinstance(strategies, Mapping) else strategies
        for method in ("scratch", *methods):
            torch.manual_seed(seed)
            recipe = None if method == "scratch" else recipes.get(method) or Recipe(method)
            base = recipe.config(finetune_cfg) if recipe is not None else scratch_cfg or finetune_cfg
            cfg = steps_config(base, len(few.train), min_steps)
            cfg = replace(cfg, lr=lrs[method]) if method in lrs else cfg
            if recipe is None:
                net, run, result = runs.from_scratch(few_run, cfg)
            else:
                net, run, result = runs.fine_tuned(recipe, few_run, cfg)
                shifts[(fraction, method)] = batchnorm_shift(pretrained_stats, batchnorm_statistics(net))
            scores = evaluate(net, target[split].images, target[split].labels, classes=target.classes,
                              mean=run.mean, std=run.std, device=device)
            histories[(fraction, method)] = result.history
            rows.append({"labels": f"{fraction:.0%}", "per class": len(few.train) // len(target_classes),
                         "method": method, f"{split} accuracy": scores.accuracy, "lr": cfg.lr, "steps": result.steps,
                         "seconds": result.seconds})
    return TransferResult(pd.DataFrame(rows), histories, shifts, weights, pre.history)


__all__ = [
    "ARTICLE_RECIPE",
    "CIFAR10_ANIMALS",
    "CIFAR10_VEHICLES",
    "INPUT_HANDLING",
    "Recipe",
    "TransferResult",
    "batchnorm_shift",
    "batchnorm_statistics",
    "input_handling_costs",
    "steps_config",
    "transfer_classes",
    "transfer_experiment",
]
