"""Export: write a trained network as a file that runs without this library, with the card it needs, and check it.

* :func:`export_model` writes TorchScript or ONNX, plus a JSON sidecar ``<file>.json`` (a :class:`ModelCard`:
  class names, normalisation, input size, model name, versions) that a program needs to use the file.
  The card also travels inside the file (ONNX ``metadata_props``, a TorchScript extra file).
* :func:`load_exported` runs an exported file without this library's model code (TorchScript through
  ``torch.jit.load``, ONNX through onnxruntime); :func:`compare` checks its logits against PyTorch's on real
  images, and :func:`export_model` refuses to leave a file that does not match.

Making the network smaller (quantisation, pruning) and measuring it (size, latency) is :mod:`.compress`.
TorchScript is deprecated in recent PyTorch (its successor is ``torch.export``); it still works on the CPU and
is what many C++ servers load, so its deprecation warnings are silenced here and the book says so.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from . import __version__
from ._files import atomic_write, replacing
from .data.images import normalise
from .distributed import unwrap
from .evaluate import infer

if TYPE_CHECKING:
    from .checkpoints import Checkpoint

FORMATS = ("onnx", "torchscript")
CARD_FORMAT = "resnet-lessons-export"
CARD_KEY = "resnet_lessons.card"  # ONNX metadata_props key / TorchScript extra-file name of the card
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class ExportError(RuntimeError):
    """An export that could not be written, read, or that does not reproduce the PyTorch model."""


@contextmanager
def quiet_warnings() -> Iterator[None]:
    """Silence the deprecation and tracer warnings of torch.jit / torch.ao.quantization / torch.onnx."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecations, TracerWarning, observer notices
        yield


def plain_copy(model: nn.Module) -> nn.Module:
    """A float32 CPU copy of the network inside any DDP / ``torch.compile`` wrapper, in eval mode and the standard
    memory layout (a model fresh from a bf16 fit is channels_last, which pruning's flattening cannot view): what
    is exported or compressed, leaving the caller's model as it was."""
    copied = copy.deepcopy(unwrap(model)).cpu().float().eval()
    return copied.to(memory_format=torch.contiguous_format)


# --- what an exported model needs beside its weights ------------------------------------------------


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to feed an exported network and read its output, as plain JSON."""

    model_name: str | None
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel (R, G, B), on the 0-1 scale
    std: tuple[float, ...]
    input_size: tuple[int, ...]  # (channels, height, width)
    model_options: dict[str, Any] = field(default_factory=dict)
    export_format: str | None = None
    library_version: str = __version__
    torch_version: str = str(torch.__version__).split("+")[0]
    input: str = "float32 [batch, 3, height, width], RGB: pixels / 255, minus mean, divided by std (per channel)"
    output: str = "float32 [batch, num_classes] logits: argmax indexes classes, softmax gives probabilities"
    format: str = CARD_FORMAT

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, image_size: int | Sequence[int] = 32) -> ModelCard:
        """The card of a :class:`resnet_lessons.checkpoints.Checkpoint` (which does not record the image size)."""
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        return cls(
            model_name=checkpoint.model_name,
            model_options=dict(checkpoint.model_options),
            classes=tuple(checkpoint.classes),
            mean=tuple(checkpoint.mean),
            std=tuple(checkpoint.std),
            input_size=(3, int(height), int(width)),
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, text: str, *, where: object = "the card") -> ModelCard:
        """The card in ``text``; an :class:`ExportError` naming ``where`` when it is not one."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise ExportError(f"{where} is not valid JSON: {error}") from None
        if not isinstance(raw, dict) or raw.get("format") != CARD_FORMAT:
            raise ExportError(f"{where} is not a resnet-lessons model card (no \"format\": \"{CARD_FORMAT}\")")
        missing = [k for k in ("classes", "mean", "std", "input_size") if k not in raw]
        if missing:
            raise ExportError(f"{where} lacks {', '.join(missing)}")
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in raw.items() if k in known}
        for key in ("classes", "mean", "std", "input_size"):
            values[key] = tuple(values[key])
        return cls(**values)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]`` images as the float32 input the exported network expects."""
        expected = tuple(self.input_size)
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"expected uint8 images [N, {', '.join(map(str, expected))}]; got {images.dtype} {tuple(images.shape)}"
            )
        return normalise(images, self.mean, self.std)


def _card_text(card: ModelCard) -> str:
    return json.dumps(card.as_dict(), indent=2)


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the card of the exported file ``path`` lives: ``<path>.json``."""
    return Path(f"{os.fspath(path)}.json")


def write_card(path: str | os.PathLike, card: ModelCard) -> Path:
    """Write ``card`` beside ``path`` (the exported file); return the sidecar's path."""
    return atomic_write(sidecar_path(path), _card_text(card) + "\n", what="model card")


def read_card(path: str | os.PathLike) -> ModelCard:
    """The card of an exported file: its sidecar, else the copy inside the file."""
    path = Path(path)
    side = sidecar_path(path)
    if side.exists():
        return ModelCard.from_json(side.read_text(), where=side)
    embedded = _embedded_card(path)
    if embedded is None:
        raise ExportError(f"{path} has no sidecar {side.name} and carries no model card inside")
    return ModelCard.from_json(embedded, where=f"the card inside {path}")


def _embedded_card(path: Path) -> str | None:
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(os.fspath(path), load_external_data=False).metadata_props}
        return props.get(CARD_KEY)
    files = {CARD_KEY: ""}
    with quiet_warnings():
        torch.jit.load(os.fspath(path), map_location="cpu", _extra_files=files)
    return files[CARD_KEY] or None


# --- exporting ----------------------------------------------------------------------------------------


def _write_torchscript(model: nn.Module, path: Path, card: ModelCard, example: torch.Tensor) -> None:
    with quiet_warnings(), torch.no_grad():
        # trace records the operations run on the example: the network has no data-dependent branches
        # (its input-shape check becomes a constant), so the trace is the whole network for this input size.
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, os.fspath(path), _extra_files={CARD_KEY: _card_text(card)})


def _write_onnx(model: nn.Module, path: Path, card: ModelCard, example: torch.Tensor, opset: int | None) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1)
    name = next(iter(_forward_argument_names(model)), "x")
    with quiet_warnings(), torch.no_grad():
        torch.onnx.export(model, (example,), os.fspath(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes={name: {0: batch}}, opset_version=opset, dynamo=True, verbose=False,
                          external_data=False)  # one self-contained file (fine below 2 GB)
    proto = onnx.load(os.fspath(path))
    del proto.metadata_props[:]
    for key, value in {
        CARD_KEY: _card_text(card),
        "classes": json.dumps(list(card.classes)),
        "mean": json.dumps(list(card.mean)),
        "std": json.dumps(list(card.std)),
    }.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"{card.model_name} exported by resnet-lessons {card.library_version}; {card.input}"
    onnx.save(proto, os.fspath(path))


def _forward_argument_names(model: nn.Module) -> list[str]:
    return [p for p in inspect.signature(model.forward).parameters if p != "self"]


@dataclass
class Comparison:
    """How closely an exported file reproduces the PyTorch model on ``n`` images."""

    n: int
    max_abs_diff: float  # largest |logit difference|
    mean_abs_diff: float
    agreement: float  # share of images with the same predicted class (0-1)
    tolerance: float  # the max_abs_diff allowed
    inputs: str = "images"

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        return (
            f"{self.n} {self.inputs}: max |logit difference| {self.max_abs_diff:.2e} "
            f"(tolerance {self.tolerance:.0e}), same prediction on {self.agreement:.1%}"
        )


@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    card: ModelCard
    comparison: Comparison
    size_bytes: int
    seconds: float


def _check_destination(path: Path) -> None:
    """``path`` can become the exported file: not a folder, and its folder exists (created) and is writable."""
    if path.is_dir():
        raise ExportError(f"{path} is a folder; give a file name for the exported model")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExportError(f"cannot create the folder {path.parent}: {error.strerror or error}") from None
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"cannot write into {path.parent}: the folder is not writable")


def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str,
    card: ModelCard,
    images: torch.Tensor,
    tolerance: float = 1e-3,
    opset: int | None = None,
    inputs: str = "images",
) -> ExportResult:
    """Export ``model`` to ``path`` as ``format`` ("onnx" or "torchscript") with its sidecar, then verify it.

    The file is written under a temporary name, loaded back and run on ``images`` (uint8 ``[N, 3, H, W]``);
    only when its logits match PyTorch's within ``tolerance`` does it replace ``path``, so a failed export
    never destroys a good file that was there. ``inputs`` names the images in the summary.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    started = time.perf_counter()
    path = Path(path)
    _check_destination(path)
    card = dataclasses.replace(card, export_format=format)
    model = plain_copy(model)
    example = card.normalise(images[:2])
    suffix = ".onnx" if format == "onnx" else ".pt"  # loading goes by the suffix
    card_temporary: Path | None = None
    try:
        with replacing(path, what="exported model", suffix=suffix) as temporary:
            if format == "onnx":
                _write_onnx(model, temporary, card, example, opset)
            else:
                _write_torchscript(model, temporary, card, example)
            card_temporary = write_card(temporary, card)
            comparison = compare(model, load_exported(temporary), images, tolerance=tolerance, inputs=inputs)
            if not comparison.ok:
                raise ExportError(
                    f"the exported {format} model does not reproduce PyTorch's outputs: {comparison.summary()}"
                )
        os.replace(card_temporary, sidecar_path(path))  # a rename: the card was written and synced already
    finally:
        if card_temporary is not None:
            card_temporary.unlink(missing_ok=True)
    return ExportResult(path, sidecar_path(path), card, comparison, path.stat().st_size, time.perf_counter() - started)


# --- running an exported file -------------------------------------------------------------------------


class ExportedModel:
    """An exported file, ready to run: ``model(x)`` on normalised float input, ``predict`` on uint8 images."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"no exported model at {self.path}: the file does not exist")
        self.card = read_card(self.path)
        self.format = "onnx" if self.path.suffix == ".onnx" or self.card.export_format == "onnx" else "torchscript"
        if self.format == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            self._session = ort.InferenceSession(os.fspath(self.path), options, providers=["CPUExecutionProvider"])
            self._input = self._session.get_inputs()[0].name
        else:
            with quiet_warnings():
                self._module = torch.jit.load(os.fspath(self.path), map_location="cpu").eval()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a normalised float32 batch ``x``."""
        if self.format == "onnx":
            array = x.detach().cpu().numpy().astype(np.float32, copy=False)
            return torch.from_numpy(self._session.run(None, {self._input: array})[0])
        with torch.no_grad():
            return self._module(x)

    def predict(self, images: torch.Tensor, *, batch_size: int = 500) -> torch.Tensor:
        """Logits ``[N, num_classes]`` for uint8 images, normalised with the card's mean and std."""
        outputs = [self(self.card.normalise(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
        return torch.cat(outputs).float()

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def __repr__(self) -> str:
        card = self.card
        return f"ExportedModel({self.format}, {self.path.name}, {card.model_name}, {len(card.classes)} classes)"


def load_exported(path: str | os.PathLike, *, threads: int | None = None) -> ExportedModel:
    """Open an exported file (ONNX through onnxruntime, TorchScript through ``torch.jit.load``) with its card."""
    return ExportedModel(path, threads=threads)


def predict_logits(
    model: nn.Module | ExportedModel, images: torch.Tensor, *, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Logits ``[N, num_classes]`` of a PyTorch network or an exported file for uint8 images (an exported
    file normalises with its own card's mean and std)."""
    if isinstance(model, ExportedModel):
        return model.predict(images)
    return infer(model, images, mean=mean, std=std, batch_size=500)


def compare(
    model: nn.Module,
    exported: ExportedModel,
    images: torch.Tensor,
    *,
    tolerance: float = 1e-3,
    inputs: str = "images",
) -> Comparison:
    """Run ``model`` (PyTorch) and ``exported`` on the same uint8 images; how far apart are the logits?"""
    card = exported.card
    expected = predict_logits(model, images, mean=card.mean, std=card.std)
    got = exported.predict(images)
    diff = (expected - got).abs()
    agreement = (expected.argmax(1) == got.argmax(1)).float().mean()
    return Comparison(n=len(images), max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                      agreement=float(agreement), tolerance=tolerance, inputs=inputs)


__all__ = [
    "FORMATS",
    "Comparison",
    "ExportError",
    "ExportResult",
    "ExportedModel",
    "ModelCard",
    "compare",
    "export_model",
    "load_exported",
    "plain_copy",
    "predict_logits",
    "quiet_warnings",
    "read_card",
    "sidecar_path",
    "write_card",
]
