"""Checkpoints you can trust: self-describing, written atomically, loaded without running pickled code.

A checkpoint is one ``torch.save`` file holding a plain dictionary of tensors, numbers, strings, lists
and dicts, so ``torch.load(..., weights_only=True)`` can read it and refuses anything else (a pickle
that would run code on load is rejected before its payload runs). It names everything needed to use
the model without the code that trained it: model name and options, class names, the normalisation,
the history, the library version; and, to resume, the optimizer, schedule and RNG states.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, distributed
from ._files import atomic_write

FORMAT = "resnet-lessons-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is missing, damaged, not a checkpoint of this library, or unsafe to load."""


class ClassMismatch(ValueError):
    """A checkpoint's class names differ from those of the data it is used with."""


def _plain(value: Any) -> Any:
    """``value`` with tuples turned into lists and numpy/torch scalars into Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, torch.Tensor):
        return value.item()
    return value


def make_checkpoint(
    model: nn.Module,
    *,
    model_name: str | None,
    model_options: Mapping[str, Any] | None,
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    history: Any = None,
    train_state: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The dictionary that :func:`save` writes. ``history`` may be a DataFrame or a list of row dicts."""
    if history is not None and hasattr(history, "to_dict"):
        history = history.to_dict("records")
    model = distributed.unwrap(model)  # DistributedDataParallel and torch.compile wrap the model
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "torch_version": str(torch.__version__),
        "model_name": model_name,
        "model_options": _plain(dict(model_options or {})),
        "classes": [str(c) for c in classes],
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "history": _plain(list(history or [])),
        "model_state": state,
        "train_state": dict(train_state) if train_state is not None else None,
        "extra": _plain(dict(extra or {})),
    }


def save(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (:func:`resnet_lessons._files.atomic_write`): a new
    temporary file in the same folder, flushed to disk, then renamed; a link at ``path`` is replaced, never
    followed. If anything fails on the way (a full disk) the temporary file is removed, the file that was
    at ``path`` is untouched, and the ``OSError`` says so: "cannot write PATH: the disk is full (...); the
    last good checkpoint PATH is kept"."""
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create the checkpoint folder {folder}: {error.strerror or error}") from error
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot write a checkpoint into {folder}: the folder is not writable")
    payload = dict(checkpoint)
    return atomic_write(path, lambda stream: torch.save(payload, stream), what="checkpoint")


@dataclass
class Checkpoint:
    """A loaded checkpoint. ``build_model()`` rebuilds the network with its weights."""

    path: Path
    model_name: str | None
    model_options: dict[str, Any]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    history: list[dict[str, Any]]
    model_state: dict[str, torch.Tensor]
    train_state: dict[str, Any] | None
    library_version: str
    extra: dict[str, Any] = field(default_factory=dict)

    def build_model(self, device: str | torch.device = "cpu") -> nn.Module:
        """The network of this checkpoint with its weights, in eval mode, on ``device``."""
        if not self.model_name:
            raise CheckpointError(
                f"{self.path} does not name its model, so it cannot be rebuilt; "
                "load its model_state into a network you build yourself"
            )
        from .models import build_model  # models imports nothing of ours; a late import keeps this light

        name = self.model_name

        def build() -> nn.Module:
            return build_model(name, num_classes=len(self.classes), **self.model_options)

        described = f"{self.model_name} with options {self.model_options}"
        model = None
        try:  # first on the meta device (no memory): the options and weights are checked before allocating
            with torch.device("meta"):
                expected = build().state_dict()
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"{self.path}: cannot rebuild {described}: {error}") from None
        except RuntimeError:  # an operation without a meta kernel: check against the real network instead
            model = build()
            expected = model.state_dict()
        problems = state_mismatch(expected, self.model_state)
        if problems:
            raise CheckpointError(
                f"{self.path}: the weights do not fit {described} ({problems}); the file holds another "
                "architecture's weights, or it is damaged"
            )
        model = model if model is not None else build()
        model.load_state_dict(self.model_state)
        return model.to(device).eval()

    def history_frame(self):  # -> pandas.DataFrame
        import pandas as pd

        return pd.DataFrame(self.history)

    def check_classes(self, classes: Sequence[str], *, what: str = "the data") -> None:
        check_classes(self.classes, classes, what=what, path=self.path)


def state_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any]) -> str:
    """How ``given`` weights differ from a model's ``expected`` state dict, in one phrase ("" when they fit)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [k for k in expected if k in given and tuple(expected[k].shape) != tuple(given[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} weight(s) missing, such as {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, such as {unexpected[0]}")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of another shape, such as {k}: {list(given[k].shape)} in the file, "
                     f"{list(expected[k].shape)} in the model")
    return "; ".join(parts)


def check_classes(
    checkpoint_classes: Sequence[str], data_classes: Sequence[str], *, what: str = "the data", path: Any = None
) -> None:
    """Raise :class:`ClassMismatch` naming both class lists when they differ (names and order)."""
    if tuple(checkpoint_classes) != tuple(data_classes):
        where = f" {path}" if path else ""
        raise ClassMismatch(
            f"the checkpoint{where} was trained on classes {list(checkpoint_classes)} "
            f"but {what} has classes {list(data_classes)}"
        )


_OBJECT_OPCODES = {ord(op) for op in (pickle.INST, pickle.OBJ, pickle.GLOBAL, pickle.STACK_GLOBAL, pickle.EXT1,
                                       pickle.EXT2, pickle.EXT4, pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.REDUCE)}


def unsafe_pickle_refusal(path: str | os.PathLike, error: BaseException) -> CheckpointError | None:
    """The refusal for a ``torch.load(weights_only=True)`` that stopped at objects that could run code, or
    None when ``error`` is another failure (a damaged file). Every command refuses with this one text."""
    text = str(error)
    if not isinstance(error, pickle.UnpicklingError):
        return None
    operand = re.search(r"Unsupported operand (\d+)", text)
    if operand is not None:  # an opcode that builds objects is unsafe; a byte that is no opcode is damage
        if int(operand.group(1)) not in _OBJECT_OPCODES:
            return None
    elif not re.search(r"Unsupported (global|class)|GLOBAL", text):
        return None
    found = re.search(r"GLOBAL (\S+)", text)
    asks = f" (it asks for {found.group(1)})" if found else ""
    return CheckpointError(
        f"refused to load {path}: it holds objects other than tensors and plain data{asks}, which "
        "could run code when unpickled; torch.load(weights_only=True) stopped before running any. "
        "Only load files from sources you trust."
    )


REQUIRED_KEYS = ("classes", "mean", "std", "model_state")


def _check_fields(raw: Mapping[str, Any], path: Path) -> None:
    """A CheckpointError naming the first missing or malformed field of a resnet-lessons checkpoint."""
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(repr(k) for k in missing)}: it is damaged, or was not "
                              "written by resnet-lessons")
    classes, state, options = raw["classes"], raw["model_state"], raw.get("model_options") or {}
    if not isinstance(classes, (list, tuple)) or len(classes) < 1 or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{path}: 'classes' must be a list of class names, got {str(classes)[:80]}")
    for key in ("mean", "std"):
        value = raw[key]
        numbers = isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value)
        if not numbers or len(value) != 3:
            raise CheckpointError(f"{path}: {key!r} must be three numbers (one per channel), got {str(value)[:80]}")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'model_state' must map parameter names to tensors")
    if not isinstance(options, Mapping):
        raise CheckpointError(f"{path}: 'model_options' must be a dict, got {type(options).__name__}")


def load_raw(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dictionary, read with ``weights_only=True``; clear errors for every bad file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the file does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # the weights-only unpickler raises many kinds on a damaged file
        refusal = unsafe_pickle_refusal(path, error)
        if refusal is not None:
            raise refusal from error
        text = str(error)
        message = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        raise CheckpointError(
            f"{path} is damaged or truncated, or not a PyTorch file ({type(error).__name__}: {message[:200]})"
        ) from error
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        kind = "a state dict or another program's checkpoint" if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{path} is not a resnet-lessons checkpoint (it is {kind})")
    if int(raw.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {raw['format_version']}, newer than this library reads "
            f"({FORMAT_VERSION}); upgrade resnet-lessons (it was written by {raw.get('library_version')})"
        )
    return raw


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """A :class:`Checkpoint` read safely from ``path``."""
    raw = load_raw(path, map_location)
    _check_fields(raw, Path(path))
    return Checkpoint(
        path=Path(path),
        model_name=raw.get("model_name"),
        model_options=dict(raw.get("model_options") or {}),
        classes=tuple(raw["classes"]),
        mean=tuple(raw["mean"]),
        std=tuple(raw["std"]),
        history=list(raw.get("history") or []),
        model_state=raw["model_state"],
        train_state=raw.get("train_state"),
        library_version=str(raw.get("library_version")),
        extra=dict(raw.get("extra") or {}),
    )


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the network saved at ``path`` with its weights, in eval mode."""
    return load(path).build_model(device)


# --- resuming a run -------------------------------------------------------------------------------


def rng_state(device: torch.device) -> dict[str, Any]:
    """The random-number generator states a resumed run needs (the CPU's, and the GPU's on CUDA)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def check_resumable(saved: Mapping[str, Any], recipe: Mapping[str, Any], path: Path,
                    defaults: Mapping[str, Any] | None = None) -> None:
    """The recipe must be the one the checkpoint was trained with; run options (quietness, validation batch,
    early stopping, checkpoint frequency) are not part of it and may change. ``defaults``: what a field the
    checkpoint does not name was (a field added to the recipe after the checkpoint was written)."""
    saved = {**(defaults or {}), **saved}
    changed = [k for k, v in recipe.items() if saved.get(k) != v]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {recipe[k]!r}" for k in changed)
        raise ValueError(
            f"cannot resume {path}: the recipe changed ({details}); resume with the same settings "
            "or start a new run in another folder"
        )


def load_training(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
                  recipe: Mapping[str, Any], device: torch.device,
                  defaults: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Resume from ``path``: check the recipe, load the weights, optimiser, scaler and RNG states; return the
    checkpoint's ``train_state`` and history."""
    raw = load_raw(path, map_location=device)
    train_state = raw.get("train_state") or {}
    if "optimizer" not in train_state:
        raise CheckpointError(f"{path} holds no training state to resume from")
    check_resumable(train_state["config"], recipe, path, defaults)
    model.load_state_dict(raw["model_state"])
    optimizer.load_state_dict(train_state["optimizer"])
    if scaler is not None and train_state.get("scaler"):
        scaler.load_state_dict(train_state["scaler"])
    set_rng_state(train_state["rng"], device)
    return train_state, list(raw["history"])


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ClassMismatch",
    "check_classes",
    "check_resumable",
    "load",
    "load_model",
    "load_raw",
    "load_training",
    "make_checkpoint",
    "rng_state",
    "save",
    "set_rng_state",
    "state_mismatch",
    "unsafe_pickle_refusal",
]
