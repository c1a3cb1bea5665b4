"""Fine-tuning: pretrained weights, a new head, what is frozen, learning rates per stage; then ``train.fit``.

Fine-tuning is the training loop of :mod:`resnet_lessons.train` with a prepared model:

1. **Weights** (:func:`load_weights`): ImageNet weights through torchvision's weights API
   (``ResNet18_Weights.IMAGENET1K_V1`` and the others; never the deprecated ``pretrained=True``), or a
   local file: a resnet-lessons checkpoint or a torchvision ``.pth`` state dict. Weights travel with the
   normalisation they were trained with (ImageNet's mean and std for torchvision's), and the data must be
   normalised the same way (:func:`with_normalisation`).
2. **Model** (:func:`pretrained_model`): the network is built with the weights' own head, loaded strictly,
   then a new ``fc`` *replaces* the old head (:func:`replace_head`): the article instead stacked
   ``Linear(512, 10)`` on top of the 1000 ImageNet logits, which fails at the first batch. Swapping the
   ImageNet stem for the CIFAR one re-initialises the stem (its 7x7 filters do not fit a 3x3 convolution).
3. **Strategy** (:func:`prepare`): ``linear`` (linear probe: backbone frozen, its BatchNorm layers kept in
   eval mode so their running statistics stay), ``full`` (everything trains at one learning rate),
   ``discriminative`` (learning rate shrinks by ``decay`` per stage going down), ``gradual`` (the stages
   are unfrozen one at a time from the top, one more every ``unfreeze_every`` epochs).
4. **Training** (:func:`finetune`): ``train.fit`` with the strategy's parameter groups and hooks.

The offline transfer experiment (pretrain on some classes, fine-tune on the others with few labels,
against training from scratch on the same labels) is :mod:`resnet_lessons.transfer`.
"""

from __future__ import annotations

import socket
import types
import urllib.error
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoints, train
from .data import IMAGENET_MEAN, IMAGENET_STD, DataSplits
from .models import build_model
from .optim import decays

STRATEGIES = ("linear", "full", "discriminative", "gradual")
TORCHVISION_WEIGHTS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights"}
DOWNLOAD_TIMEOUT_S = 30.0  # seconds a stalled connection may stay silent before a weights download gives up
STEM_KEYS = ("conv1.", "bn1.")  # the stem of a ResNet (the blocks' own conv1/bn1 sit under layerN.)
HEAD_KEYS = ("fc.",)


class WeightsError(ValueError):
    """Weights that cannot be used: a damaged file, not a state dict, another architecture, a head that
    does not fit the classes."""


class WeightsUnavailable(RuntimeError):
    """ImageNet weights that are not in the torch hub cache and cannot be downloaded here."""


# --- weights --------------------------------------------------------------------------------------


@dataclass
class Weights:
    """A state dict and what it is: the architecture, its head, the normalisation it was trained with."""

    state: dict[str, torch.Tensor]
    model_name: str  # the architecture the weights are for
    source: str  # where they came from, for messages and checkpoints
    mean: tuple[float, ...]  # the normalisation the weights expect
    std: tuple[float, ...]
    model_options: dict[str, Any] = field(default_factory=dict)  # build_model options they were trained with
    classes: tuple[str, ...] | None = None  # class names of the head (None: ImageNet's 1000, or unnamed)

    @property
    def num_outputs(self) -> int:
        return int(self.state["fc.weight"].shape[0]) if "fc.weight" in self.state else 0

    @classmethod
    def from_model(cls, model: nn.Module, model_name: str, *, classes: Sequence[str], mean: Sequence[float],
                   std: Sequence[float], model_options: Mapping[str, Any] | None = None,
                   source: str = "a model in memory") -> Weights:
        """The weights of a model trained here (the pretraining step of the transfer experiment)."""
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return cls(state, model_name, source, tuple(mean), tuple(std), dict(model_options or {}), tuple(classes))


def imagenet_weights(model_name: str, version: str = "DEFAULT"):  # -> torchvision.models.WeightsEnum
    """torchvision's weights enum member for ``model_name``: ``ResNet18_Weights.IMAGENET1K_V1`` etc.

    ``version`` is a member name (``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"``) or ``"DEFAULT"`` (the best
    one torchvision has: V1 for ResNet-18/34, V2 for ResNet-50)."""
    import torchvision.models

    if model_name not in TORCHVISION_WEIGHTS:
        raise WeightsError(
            f"torchvision has ImageNet weights for {', '.join(TORCHVISION_WEIGHTS)}, not for {model_name!r}; "
            "pretrain one yourself (see resnet_lessons.transfer) or pick one of those models"
        )
    enum = getattr(torchvision.models, TORCHVISION_WEIGHTS[model_name])
    try:
        return enum[version]
    except KeyError:
        raise WeightsError(f"{enum.__name__} has no {version!r}; it has {', '.join(enum.__members__)}") from None


def hub_checkpoint_dir(hub_dir: str | Path | None = None) -> Path:
    """Where torch keeps downloaded weights: ``torch.hub.get_dir()/checkpoints`` (or ``hub_dir/checkpoints``)."""
    return Path(hub_dir if hub_dir is not None else torch.hub.get_dir()) / "checkpoints"


def weights_file_name(model_name: str, version: str = "DEFAULT") -> str:
    """The file name torchvision's weights have in the hub cache, e.g. ``resnet18-f37072fd.pth``."""
    return Path(imagenet_weights(model_name, version).url).name


def _unavailable(member: Any, model_name: str, folder: Path, reason: str) -> WeightsUnavailable:
    name = Path(member.url).name
    return WeightsUnavailable(
        f"ImageNet weights for {model_name} ({type(member).__name__}.{member.name}) are not in the torch hub "
        f"cache {folder} and cannot be had: {reason}. Either download {member.url} on a machine with "
        f"internet and place it by hand as {folder / name} (the folder is torch.hub.get_dir()/checkpoints), "
        f"or pass the file itself: weights='path/to/{name}' (command line: --weights path/to/{name}). "
        "Any torchvision state dict of the same architecture, or a resnet-lessons checkpoint, works too."
    )


def download_imagenet_state(
    model_name: str, *, version: str = "DEFAULT", hub_dir: str | Path | None = None, download: bool = True,
    progress: bool = False, timeout: float = DOWNLOAD_TIMEOUT_S,
) -> dict[str, torch.Tensor]:
    """The ImageNet state dict of ``model_name`` from the torch hub cache, downloaded there if allowed.

    Raises :class:`WeightsUnavailable` (naming the cache folder and the file to place in it) when the file is
    not cached and cannot be downloaded, and :class:`WeightsError` when the cached file is damaged."""
    member = imagenet_weights(model_name, version)
    folder = hub_checkpoint_dir(hub_dir)
    cached = folder / Path(member.url).name
    if not cached.exists() and not download:
        raise _unavailable(member, model_name, folder, "downloading was turned off (download=False)")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        # torchvision's own path (WeightsEnum.get_state_dict), with the folder passed explicitly
        return torch.hub.load_state_dict_from_url(
            member.url, model_dir=str(folder), progress=progress, check_hash=True, map_location="cpu",
            weights_only=True,
        )
    except (urllib.error.URLError, TimeoutError, ConnectionError, socket.gaierror) as error:
        reason = getattr(error, "reason", None) or error
        raise _unavailable(member, model_name, folder, f"the download failed ({reason})") from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "hash" in text:
            raise WeightsError(f"the download of {member.url} is corrupt ({text}); try again") from error
        if cached.exists():
            raise WeightsError(
                f"the cached weights file {cached} is damaged ({type(error).__name__}: {text[:200]}); "
                "delete it and download again, or place a good copy there by hand"
            ) from error
        raise _unavailable(member, model_name, folder, f"{type(error).__name__}: {text[:200]}") from error
    finally:
        socket.setdefaulttimeout(previous)


def _unwrap_state(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict from a loaded file: also accepts ``{"state_dict": ...}`` and
    ``{"model": ...}`` wrappers and the ``module.`` prefix of DistributedDataParallel."""
    if isinstance(raw, Mapping):
        for key in ("model_state", "state_dict", "model"):
            if key in raw and isinstance(raw[key], Mapping):
                raw = raw[key]
                break
    if not isinstance(raw, Mapping) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        kind = type(raw).__name__ if not isinstance(raw, Mapping) else "a dict whose values are not all tensors"
        raise WeightsError(f"{path} is not a state dict (a dict of parameter names to tensors); it holds {kind}")
    state = {}
    for key, value in raw.items():
        for prefix in ("module.", "_orig_mod."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        state[str(key)] = value
    return state


def load_weights_file(path: str | Path) -> Weights:
    """Weights from a local file: a resnet-lessons checkpoint, or a torchvision-format state dict (assumed
    to be trained with ImageNet normalisation). Read with ``weights_only=True``: no pickled code runs."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"no weights file at {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the weights-only unpickler raises many kinds on a damaged or unsafe file
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsError(
            f"cannot read {path} as PyTorch weights: it is damaged, truncated, not a PyTorch file, or holds "
            f"objects other than tensors ({type(error).__name__}: {text[:200]})"
        ) from error
    if isinstance(raw, Mapping) and raw.get("format") == checkpoints.FORMAT:
        ckpt = checkpoints.load(path)
        if not ckpt.model_name:
            raise WeightsError(f"{path} does not name its model, so its architecture cannot be checked")
        return Weights(dict(ckpt.model_state), ckpt.model_name, str(path), ckpt.mean, ckpt.std,
                       dict(ckpt.model_options), ckpt.classes)
    state = _unwrap_state(raw, path)
    guess = guess_architecture(state)
    name, options = guess if guess else ("", {})  # unknown: the shape check of pretrained_model speaks
    return Weights(state, name, str(path), IMAGENET_MEAN, IMAGENET_STD, options, None)


def load_weights(
    weights: str | Path | Weights, model_name: str, *, hub_dir: str | Path | None = None, download: bool = True,
    progress: bool = False,
) -> Weights:
    """``"imagenet"`` (torchvision's default ImageNet weights for ``model_name``; ``"imagenet:IMAGENET1K_V1"``
    names a version), a path to a local file, or :class:`Weights` already loaded."""
    if isinstance(weights, Weights):
        return weights
    text = str(weights)
    if text == "imagenet" or text.startswith("imagenet:"):
        version = text.partition(":")[2] or "DEFAULT"
        member = imagenet_weights(model_name, version)
        state = download_imagenet_state(model_name, version=version, hub_dir=hub_dir, download=download,
                                        progress=progress)
        return Weights(dict(state), model_name, f"{type(member).__name__}.{member.name}", IMAGENET_MEAN,
                       IMAGENET_STD, {"stem": "imagenet", "shortcut": "B"}, None)
    return load_weights_file(text)


def guess_architecture(state: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, Any]] | None:
    """``(model name, options)`` a ResNet state dict was made by, read from its keys and shapes; None if unknown."""
    blocks: dict[int, set[int]] = {}
    for key in state:
        parts = key.split(".")
        if parts[0].startswith("layer") and parts[0][5:].isdigit() and len(parts) > 1 and parts[1].isdigit():
            blocks.setdefault(int(parts[0][5:]), set()).add(int(parts[1]))
    if not blocks or "conv1.weight" not in state:
        return None
    counts = tuple(len(blocks[i]) for i in sorted(blocks))
    bottleneck = "layer1.0.conv3.weight" in state
    stem = "imagenet" if state["conv1.weight"].shape[-1] == 7 else "cifar"
    known = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34", ((3, 4, 6, 3), True): "resnet50",
             ((3, 4, 23, 3), True): "resnet101", ((3, 8, 36, 3), True): "resnet152"}
    if (counts, bottleneck) in known:
        return known[(counts, bottleneck)], {"stem": stem}
    if len(counts) == 3 and len(set(counts)) == 1 and not bottleneck:
        return f"resnet{6 * counts[0] + 2}", {}  # or plain{6n+2}: option-A shortcuts have no weights
    return None


# --- the model: load, check, replace the head --------------------------------------------------------


def replace_head(model: nn.Module, num_classes: int) -> nn.Linear:
    """Put a new ``fc`` with ``num_classes`` outputs *in place of* the old head (not on top of it)."""
    old = model.fc
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
    download: bool = True, progress: bool = False,
) -> Pretrained:
    """``model_name`` with ``weights`` loaded (checked strictly) and a head of ``num_classes`` outputs.

    ``new_head``: None (the default) replaces the head of torchvision-format weights (ImageNet's 1000 classes)
    and keeps the head of a resnet-lessons checkpoint; a kept head must fit (``num_classes`` outputs, and the
    checkpoint's class names when ``classes`` is given), else :class:`WeightsError`. True always replaces it.
    ``stem``: None keeps the weights' stem; "cifar" on ImageNet weights swaps in a fresh 3x3 stem.
    """
    loaded = load_weights(weights, model_name, hub_dir=hub_dir, download=download, progress=progress)
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


def _is_frozen_norm(module: nn.Module) -> bool:
    params = list(module.parameters(recurse=False))
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and bool(params) and not any(
        p.requires_grad for p in params)


def _train_keeping_frozen_norms(self: nn.Module, mode: bool = True) -> nn.Module:
    type(self).train(self, mode)  # the class's own train(): sets every submodule
    if mode:
        for module in self.modules():
            if _is_frozen_norm(module):
                module.eval()  # normalise with the running statistics and leave them as they are
    return self


def keep_frozen_batchnorm_in_eval(model: nn.Module) -> nn.Module:
    """Make ``model.train()`` leave every BatchNorm layer whose parameters are frozen in eval mode.

    A frozen BatchNorm in train mode would still normalise with the batch's statistics and overwrite its
    running statistics: the "frozen" backbone would change. Decided at each ``train()`` call, so a stage
    unfrozen later (gradual unfreezing) trains its BatchNorm layers again from the next epoch."""
    model.train = types.MethodType(_train_keeping_frozen_norms, model)  # type: ignore[method-assign]
    model.train(model.training)
    return model


@dataclass
class Plan:
    """What a strategy does to a model: the parameter groups (with their learning rates) and the hooks."""

    strategy: str
    groups: list[dict[str, Any]]  # torch optimiser groups: params, lr, lr_scale, weight_decay, name
    hooks: list[Any]
    frozen: tuple[str, ...]  # stages frozen at the start

    def learning_rates(self) -> dict[str, float]:
        """Peak learning rate per stage (the schedule scales all of them by the same factor)."""
        return {g["name"].split(" ")[0]: g["lr"] for g in self.groups}


class GradualUnfreezing(train.Hook):
    """Unfreeze the next stage down every ``every`` epochs (ULMFiT's gradual unfreezing)."""

    def __init__(self, model: nn.Module, order: Sequence[str], every: int = 1) -> None:
        self.model, self.order, self.every = model, list(order), max(1, every)
        self.unfrozen: list[tuple[int, str]] = []  # (after epoch, stage)

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        epoch = int(row["epoch"])
        if epoch % self.every == 0 and len(self.unfrozen) < len(self.order):
            stage = self.order[len(self.unfrozen)]
            set_trainable(self.model, [stage])
            self.unfrozen.append((epoch, stage))


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
    decay: float = 0.5, unfreeze_every: int = 1, decay_norm_and_bias: bool = False,
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
        params = [(n, p) for n, p in model.named_parameters() if stage_of(n) == stage]
        decay_params = [p for n, p in params if decays(p, decay_norm_and_bias)]
        other = [p for n, p in params if not decays(p, decay_norm_and_bias)]
        for suffix, members, wd in (("", decay_params, weight_decay), (" (no decay)", other, 0.0)):
            if members:
                groups.append({"name": stage + suffix, "params": members, "lr": lr * scales[stage],
                               "lr_scale": scales[stage], "weight_decay": wd})
    hooks: list[Any] = []
    if strategy == "gradual":
        hooks.append(GradualUnfreezing(model, list(reversed(backbone)), unfreeze_every))
    return Plan(strategy, groups, hooks, frozen)


def finetune(
    model: nn.Module, data: DataSplits, cfg: train.TrainConfig, *, strategy: str = "full", device: Any,
    new_modules: Sequence[str] = ("fc",), decay: float = 0.5, unfreeze_every: int = 1, hooks: Iterable[Any] = (),
    checkpoint_dir: str | Path | None = None,
) -> train.FitResult:
    """Prepare ``model`` for ``strategy`` and train it with ``train.fit`` (``cfg.lr`` is the head's peak lr).

    ``data`` must be normalised as the weights expect (:func:`with_normalisation`). Each step, every parameter
    group gets its ``lr_scale`` times the scheduled lr (``train.fit(param_groups=...)``)."""
    plan = prepare(model, strategy, lr=cfg.lr, weight_decay=cfg.weight_decay, new_modules=new_modules, decay=decay,
                   unfreeze_every=unfreeze_every, decay_norm_and_bias=cfg.decay_norm_and_bias)
    return train.fit(model, data, cfg, device=device, hooks=[*plan.hooks, *hooks], checkpoint_dir=checkpoint_dir,
                     param_groups=plan.groups)


# --- data: the weights' normalisation ---------------------------------------------------------------------


def with_normalisation(data: DataSplits, mean: Sequence[float], std: Sequence[float]) -> DataSplits:
    """``data`` normalised with the statistics the weights were trained with (ImageNet's for torchvision's)."""
    return replace(data, mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))


# --- recipes ---------------------------------------------------------------------------------------------

STRATEGY_LR = {"linear": 1.0, "full": 0.25, "discriminative": 0.5, "gradual": 0.25}
"""Peak learning rate of the head per strategy, as a share of the linear probe's. A linear probe trains a
fresh layer on fixed features and takes a large step; full fine-tuning moves pretrained weights, which a
large step would wreck; the discriminative head can go higher because the stages below it get less."""


def finetune_config(profile: Any, strategy: str, *, image_size: int = 32, **overrides: Any) -> train.TrainConfig:
    """A fine-tuning recipe from a profile: SGD + Nesterov, one-cycle, a third of the profile's epochs, a
    batch of at most 128 above 64 pixels, a peak head lr of 0.1 per 128 images (times :data:`STRATEGY_LR`),
    and random crops padded in proportion to the image size."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    batch = overrides.pop("batch_size", profile.batch_size if image_size <= 64 else min(profile.batch_size, 128))
    values: dict[str, Any] = dict(
        batch_size=batch, lr=0.1 * batch / 128 * STRATEGY_LR[strategy], epochs=max(1, profile.epochs // 3),
        crop_padding=max(1, round(4 * image_size / 32)),
    )
    values.update(overrides)
    return train.config_from_profile(profile, **values)


__all__ = [
    "GradualUnfreezing",
    "Plan",
    "Pretrained",
    "STRATEGIES",
    "STRATEGY_LR",
    "Weights",
    "WeightsError",
    "WeightsUnavailable",
    "download_imagenet_state",
    "finetune",
    "finetune_config",
    "guess_architecture",
    "hub_checkpoint_dir",
    "imagenet_weights",
    "keep_frozen_batchnorm_in_eval",
    "load_weights",
    "load_weights_file",
    "lr_scales",
    "prepare",
    "pretrained_model",
    "replace_head",
    "set_trainable",
    "stage_of",
    "stages",
    "weights_file_name",
    "with_normalisation",
]
