"""Pretrained weights: torchvision's ImageNet weights, local files, and what architecture a state dict is for.

:func:`load_weights` is the entry point. ``"imagenet"`` goes through torchvision's weights API
(``ResNet18_Weights.IMAGENET1K_V1`` and the others; never the deprecated ``pretrained=True``): the file comes
from the torch hub cache, or is downloaded into it under a socket timeout (:func:`download_imagenet_state`). A
path is a resnet-lessons checkpoint or a torchvision ``.pth`` state dict (:func:`load_weights_file`), read with
``weights_only=True``; the wrappers and key prefixes that DataParallel and ``torch.compile`` add are stripped,
and the architecture is read off the keys and shapes (:func:`guess_architecture`). Weights travel with the
normalisation they were trained with (:class:`Weights`: ImageNet's mean and std for torchvision's). Putting them
into a network is :func:`resnet_lessons.finetune.pretrained_model`.
"""

from __future__ import annotations

import socket
import urllib.error
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import checkpoints
from .data import IMAGENET_MEAN, IMAGENET_STD
from .data.sources import DOWNLOAD_TIMEOUT_S, socket_timeout  # one timeout for every download

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

TORCHVISION_WEIGHTS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights"}
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # key prefixes of DistributedDataParallel and torch.compile
STATE_KEYS = ("model_state", "state_dict", "model")  # where a training script's file keeps the state dict


class WeightsError(ValueError):
    """Weights that cannot be used: a damaged file, not a state dict, another architecture, a head that
    does not fit the classes."""


class WeightsUnavailable(RuntimeError):
    """ImageNet weights that are not in the torch hub cache and cannot be downloaded here."""


@dataclass
class Weights:
    """A state dict and what it is: the architecture, its head, the normalisation it was trained with."""

    state: dict[str, torch.Tensor]
    model_name: str  # the architecture the weights are for ("" when it cannot be told)
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


# --- torchvision's ImageNet weights and the hub cache ----------------------------------------------------


def imagenet_weights(model_name: str, version: str = "DEFAULT") -> WeightsEnum:
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


def weights_file_name(model_name: str) -> str:
    """The file name torchvision's default weights have in the hub cache, e.g. ``resnet18-f37072fd.pth``."""
    return Path(imagenet_weights(model_name).url).name


def _first_line(error: BaseException) -> str:
    """The first line of an error's text, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _unavailable(member: WeightsEnum, model_name: str, folder: Path, reason: str) -> WeightsUnavailable:
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
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The ImageNet state dict of ``model_name`` from the torch hub cache, downloaded there if allowed (a
    connection silent for ``data.sources.DOWNLOAD_TIMEOUT_S`` seconds gives up).

    Raises :class:`WeightsUnavailable` (naming the cache folder and the file to place in it) when the file is
    not cached and cannot be downloaded, and :class:`WeightsError` when the cached file is damaged."""
    member = imagenet_weights(model_name, version)
    folder = hub_checkpoint_dir(hub_dir)
    cached = folder / Path(member.url).name
    if not cached.exists() and not download:
        raise _unavailable(member, model_name, folder, "downloading was turned off (download=False)")
    try:
        with socket_timeout(DOWNLOAD_TIMEOUT_S):
            # torchvision's own path (WeightsEnum.get_state_dict), with the folder passed explicitly
            return torch.hub.load_state_dict_from_url(
                member.url, model_dir=str(folder), progress=progress, check_hash=True, map_location="cpu",
                weights_only=True,
            )
    except (urllib.error.URLError, TimeoutError, ConnectionError, socket.gaierror) as error:
        reason = getattr(error, "reason", None) or error
        raise _unavailable(member, model_name, folder, f"the download failed ({reason})") from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        text = _first_line(error)
        if "hash" in text:
            raise WeightsError(f"the download of {member.url} is corrupt ({text}); try again") from error
        if cached.exists():
            raise WeightsError(
                f"the cached weights file {cached} is damaged ({type(error).__name__}: {text[:200]}); "
                "delete it and download again, or place a good copy there by hand"
            ) from error
        raise _unavailable(member, model_name, folder, f"{type(error).__name__}: {text[:200]}") from error


# --- local files -------------------------------------------------------------------------------------------


def _strip_prefixes(key: str) -> str:
    """``key`` without the prefixes DistributedDataParallel (``module.``) and ``torch.compile`` (``_orig_mod.``)
    put in front of every name."""
    for prefix in WRAPPER_PREFIXES:
        key = key[len(prefix):] if key.startswith(prefix) else key
    return key


def _unwrap_state(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict from a loaded file: also accepts ``{"state_dict": ...}`` and
    ``{"model": ...}`` wrappers (:data:`STATE_KEYS`) and the key prefixes of :data:`WRAPPER_PREFIXES`."""
    if isinstance(raw, Mapping):
        for key in STATE_KEYS:
            if key in raw and isinstance(raw[key], Mapping):
                raw = raw[key]
                break
    if not isinstance(raw, Mapping) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        kind = type(raw).__name__ if not isinstance(raw, Mapping) else "a dict whose values are not all tensors"
        raise WeightsError(f"{path} is not a state dict (a dict of parameter names to tensors); it holds {kind}")
    return {_strip_prefixes(str(key)): value for key, value in raw.items()}


def load_weights_file(path: str | Path) -> Weights:
    """Weights from a local file: a resnet-lessons checkpoint, or a torchvision-format state dict (assumed
    to be trained with ImageNet normalisation). Read with ``weights_only=True``: no pickled code runs."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"no weights file at {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the weights-only unpickler raises many kinds on a damaged or unsafe file
        raise WeightsError(
            f"cannot read {path} as PyTorch weights: it is damaged, truncated, not a PyTorch file, or holds "
            f"objects other than tensors ({type(error).__name__}: {_first_line(error)[:200]})"
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


# --- which architecture ------------------------------------------------------------------------------------

# (blocks per stage, bottleneck blocks) -> name, for the ImageNet family
IMAGENET_FAMILY: dict[tuple[tuple[int, ...], bool], str] = {
    ((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34", ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101", ((3, 8, 36, 3), True): "resnet152",
}


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
    if (counts, bottleneck) in IMAGENET_FAMILY:
        return IMAGENET_FAMILY[(counts, bottleneck)], {"stem": stem}
    if len(counts) == 3 and len(set(counts)) == 1 and not bottleneck:
        return f"resnet{6 * counts[0] + 2}", {}  # or plain{6n+2}: option-A shortcuts have no weights
    return None


__all__ = [
    "TORCHVISION_WEIGHTS",
    "Weights",
    "WeightsError",
    "WeightsUnavailable",
    "download_imagenet_state",
    "guess_architecture",
    "hub_checkpoint_dir",
    "imagenet_weights",
    "load_weights",
    "load_weights_file",
    "weights_file_name",
]
