"""Deployment: export a trained network, check the export by running it, and make it smaller.

* :func:`export_model` writes TorchScript or ONNX, plus a JSON sidecar ``<file>.json`` (a :class:`ModelCard`:
  class names, normalisation, input size, model name, versions) that a program needs to use the file.
  The card also travels inside the file (ONNX ``metadata_props``, a TorchScript extra file).
* :func:`load_exported` runs an exported file without this library's model code (TorchScript through
  ``torch.jit.load``, ONNX through onnxruntime); :func:`compare` checks its logits against PyTorch's on real
  images, and :func:`export_model` refuses to leave a file that does not match.
* :func:`quantize_static` (int8 post-training quantisation of the whole network, FX graph mode with the
  ``x86`` engine, calibrated on training images), :func:`quantize_dynamic` (int8 ``Linear`` layers only) and
  :func:`prune_global` (global unstructured L1 pruning, made permanent) make variants; :func:`compare_variants`
  measures accuracy, agreement, file size and single-image CPU latency of each, as a table.

``torch.ao.quantization`` and TorchScript are deprecated in recent PyTorch (their successors are torchao's PT2E
quantisation and ``torch.export``); both still work on the CPU and are the simplest complete path, so their
deprecation warnings are silenced here and the book says so.
"""

from __future__ import annotations

import copy
import io
import json
import os
import statistics
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from ._files import atomic_write, replacing

FORMATS = ("onnx", "torchscript")
CARD_FORMAT = "resnet-lessons-export"
CARD_KEY = "resnet_lessons.card"  # ONNX metadata_props key / TorchScript extra-file name of the card
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class ExportError(RuntimeError):
    """An export that could not be written, read, or that does not reproduce the PyTorch model."""


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the deprecation and tracer warnings of torch.jit / torch.ao.quantization / torch.onnx."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecations, TracerWarning, observer notices
        yield


# --- what an exported model needs beside its weights ------------------------------------------------


@dataclass(frozen=True)
class ModelCard:
    """Everything needed to feed an exported network and read its output, as plain JSON."""

    model_name: str | None
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: tuple[int, int, int]  # (channels, height, width)
    model_options: dict[str, Any] = field(default_factory=dict)
    export_format: str | None = None
    library_version: str = __version__
    torch_version: str = str(torch.__version__).split("+")[0]
    input: str = (
        "float32 [batch, 3, height, width], RGB: pixels / 255, minus mean, divided by std (per channel)"
    )
    output: str = "float32 [batch, num_classes] logits: argmax indexes classes, softmax gives probabilities"
    format: str = CARD_FORMAT

    @classmethod
    def from_checkpoint(cls, checkpoint: Any, image_size: int | Sequence[int] = 32) -> ModelCard:
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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, *, where: object = "the card") -> ModelCard:
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
        from .evaluate import normalise

        expected = tuple(self.input_size)
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"expected uint8 images [N, {', '.join(map(str, expected))}]; got {images.dtype} {tuple(images.shape)}"
            )
        return normalise(images, self.mean, self.std)


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the card of the exported file ``path`` lives: ``<path>.json``."""
    return Path(f"{os.fspath(path)}.json")


def write_card(path: str | os.PathLike, card: ModelCard) -> Path:
    """Write ``card`` beside ``path`` (the exported file); return the sidecar's path."""
    return atomic_write(sidecar_path(path), card.to_json() + "\n", what="model card")


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
    with _quiet():
        torch.jit.load(os.fspath(path), map_location="cpu", _extra_files=files)
    return files[CARD_KEY] or None


# --- exporting ----------------------------------------------------------------------------------------


def _plain_model(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DistributedDataParallel
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return copy.deepcopy(model).cpu().float().eval()


def _write_torchscript(model: nn.Module, path: Path, card: ModelCard, example: torch.Tensor) -> None:
    with _quiet(), torch.no_grad():
        # trace records the operations run on the example: the network has no data-dependent branches
        # (its input-shape check becomes a constant), so the trace is the whole network for this input size.
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, os.fspath(path), _extra_files={CARD_KEY: card.to_json()})


def _write_onnx(model: nn.Module, path: Path, card: ModelCard, example: torch.Tensor, opset: int | None) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1)
    name = next(iter(_forward_argument_names(model)), "x")
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            os.fspath(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={name: {0: batch}},
            opset_version=opset,
            external_data=False,  # one self-contained file (fine below 2 GB)
            dynamo=True,
            verbose=False,
        )
    proto = onnx.load(os.fspath(path))
    del proto.metadata_props[:]
    for key, value in {
        CARD_KEY: card.to_json(),
        "classes": json.dumps(list(card.classes)),
        "mean": json.dumps(list(card.mean)),
        "std": json.dumps(list(card.std)),
    }.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"{card.model_name} exported by resnet-lessons {card.library_version}; {card.input}"
    onnx.save(proto, os.fspath(path))


def _forward_argument_names(model: nn.Module) -> list[str]:
    import inspect

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
    if path.is_dir():
        raise ExportError(f"{path} is a folder; give a file name for the exported model")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ExportError(f"cannot create the folder {path.parent}: {error.strerror or error}") from None
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"cannot write into {path.parent}: the folder is not writable")
    card = ModelCard(**{**asdict(card), "export_format": format})
    model = _plain_model(model)
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
            self._session = ort.InferenceSession(
                os.fspath(self.path), options, providers=["CPUExecutionProvider"]
            )
            self._input = self._session.get_inputs()[0].name
        else:
            with _quiet():
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
        return f"ExportedModel({self.format}, {self.path.name}, {self.card.model_name}, {len(self.card.classes)} classes)"


def load_exported(path: str | os.PathLike, *, threads: int | None = None) -> ExportedModel:
    """Open an exported file (ONNX through onnxruntime, TorchScript through ``torch.jit.load``) with its card."""
    return ExportedModel(path, threads=threads)


def _logits(model: Any, images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    if isinstance(model, ExportedModel):
        return model.predict(images)
    from .evaluate import infer

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
    expected = _logits(model, images, card.mean, card.std)
    got = exported.predict(images)
    diff = (expected - got).abs()
    agreement = (expected.argmax(1) == got.argmax(1)).float().mean()
    return Comparison(
        n=len(images),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        agreement=float(agreement),
        tolerance=tolerance,
        inputs=inputs,
    )


# --- making the model smaller ---------------------------------------------------------------------------


def _calibration_batches(
    images: torch.Tensor, mean, std, batch_size: int, batches: int, seed: int = 0
) -> Iterator[torch.Tensor]:
    """``batches`` batches of images drawn at random (a split may be sorted by class), normalised."""
    from .evaluate import normalise

    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[: batch_size * batches]
    for start in range(0, len(order), batch_size):
        yield normalise(images[order[start : start + batch_size]], mean, std)


def quantize_static(
    model: nn.Module,
    calibration_images: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batches: int = 4,
    batch_size: int = 64,
    backend: str = "x86",
    seed: int = 0,
) -> nn.Module:
    """int8 post-training static quantisation of the whole network (FX graph mode, ``torch.ao.quantization``).

    FX traces the network, fuses Conv+BatchNorm(+ReLU) and the residual add with its ReLU, and places
    observers; ``batches`` batches of ``calibration_images`` (training images, never the test set) record
    the range of every activation (the images are drawn at random with ``seed``); ``convert_fx`` then swaps in int8 kernels (``backend``: "x86" uses
    FBGEMM/oneDNN; "qnnpack" is the ARM one). Weights are quantised per output channel, activations per tensor.
    The result takes the same normalised float input and returns float logits, on the CPU only.
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if backend not in torch.backends.quantized.supported_engines:
        raise ValueError(f"quantisation backend {backend!r} is not available here; this build has "
                         f"{', '.join(torch.backends.quantized.supported_engines)}")
    torch.backends.quantized.engine = backend  # the quantised kernels run on the engine they were packed for
    model = _plain_model(model)
    if hasattr(model, "check_input"):
        model.check_input = lambda x: None  # its Python checks on shapes cannot be traced symbolically
    example = next(_calibration_batches(calibration_images, mean, std, batch_size, 1))
    with _quiet(), torch.no_grad():
        prepared = prepare_fx(model, get_default_qconfig_mapping(backend), (example,))
        for x in _calibration_batches(calibration_images, mean, std, batch_size, batches, seed):
            prepared(x)
        return convert_fx(prepared).eval()


def quantize_dynamic(model: nn.Module) -> nn.Module:
    """int8 dynamic quantisation of the ``Linear`` layers (weights int8, activations quantised on the fly).

    Made for networks dominated by ``Linear`` layers (transformers, LSTMs); in a ResNet only the last layer is one.
    """
    from torch.ao.quantization import quantize_dynamic as ao_quantize_dynamic

    with _quiet():
        return ao_quantize_dynamic(_plain_model(model), {nn.Linear}, dtype=torch.qint8).eval()


def prunable_parameters(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, "weight")`` for every convolution and linear layer."""
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def prune_global(model: nn.Module, amount: float) -> nn.Module:
    """A copy of ``model`` with the ``amount`` share (0-1) of its conv/linear weights with the smallest |w| set to zero.

    Global unstructured L1 pruning (``torch.nn.utils.prune.global_unstructured``) ranks all those weights
    together, so layers with many small weights lose more; ``prune.remove`` then makes it permanent (plain
    weights with zeros, no masks). The tensors stay dense: the file shrinks only when compressed, and dense
    kernels run no faster.
    """
    from torch.nn.utils import prune

    if not 0 <= amount < 1:
        raise ValueError(f"amount must be in [0, 1), got {amount}")
    model = _plain_model(model)
    parameters = prunable_parameters(model)
    prune.global_unstructured(parameters, pruning_method=prune.L1Unstructured, amount=float(amount))
    for module, name in parameters:
        prune.remove(module, name)
    return model


def _weights(model: nn.Module) -> Iterator[torch.Tensor]:
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            yield module.weight.detach()
        elif type(module).__module__.startswith("torch.ao.nn.quantized") and callable(getattr(module, "weight", None)):
            yield module.weight().dequantize()  # int8 layers: symmetric weights, so 0 stays exactly 0


def sparsity(model: nn.Module) -> float:
    """Share (0-1) of zero weights in the convolution and linear layers (float or int8)."""
    weights = list(_weights(model))
    if not weights:
        return 0.0
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


def serialized_size(model: Any) -> tuple[int, int]:
    """Bytes of the saved weights (``torch.save`` of the state dict, or the exported file) and zlib-compressed."""
    if isinstance(model, ExportedModel):
        payload = model.path.read_bytes()
    else:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        payload = buffer.getvalue()
    return len(payload), len(zlib.compress(payload, 6))


def latency_ms(
    model: Callable[[torch.Tensor], Any],
    example: torch.Tensor,
    *,
    repeats: int = 50,
    warmup: int = 5,
    threads: int | None = 1,
) -> float:
    """Median milliseconds of one forward pass of ``example`` (one image: ``[1, 3, H, W]``) on the CPU.

    ``threads=1`` (the default) measures what one request costs on one core of a server; torch's thread count is
    restored afterwards. ONNX Runtime uses the threads its session was opened with (``load_exported(threads=)``).
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        times = []
        with torch.no_grad():
            for index in range(warmup + repeats):
                started = time.perf_counter()
                model(example)
                if index >= warmup:
                    times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous)
    return 1000 * statistics.median(times)


def compare_variants(
    variants: Mapping[str, Any],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    reference: str | None = None,
    latency_repeats: int = 50,
    threads: int | None = 1,
):  # -> pandas.DataFrame
    """One row per variant (a PyTorch module or an :class:`ExportedModel`): accuracy on the labelled images,
    agreement of its predictions with ``reference`` (default: the first variant), size of the weights (raw and
    zlib-compressed, kB), sparsity of the conv/linear weights, and median single-image latency (ms) on the CPU."""
    import pandas as pd

    from .evaluate import normalise

    names = list(variants)
    if not names:
        raise ValueError("no variants to compare")
    reference = reference or names[0]
    if reference not in variants:
        raise ValueError(f"reference {reference!r} is not one of the variants {names}")
    example = normalise(images[:1], mean, std)
    predictions = {name: _logits(model, images, mean, std).argmax(1) for name, model in variants.items()}
    rows = []
    for name, model in variants.items():
        raw, packed = serialized_size(model)
        rows.append({
            "variant": name,
            "accuracy": float((predictions[name] == labels).float().mean()),
            f"agrees with {reference}": float((predictions[name] == predictions[reference]).float().mean()),
            "size_kB": raw / 1000,
            "zipped_kB": packed / 1000,
            "sparsity": sparsity(model) if isinstance(model, nn.Module) else float("nan"),
            "latency_ms": latency_ms(model, example, repeats=latency_repeats, threads=threads),
        })
    return pd.DataFrame(rows).set_index("variant")


__all__ = [
    "FORMATS",
    "Comparison",
    "ExportError",
    "ExportResult",
    "ExportedModel",
    "ModelCard",
    "compare",
    "compare_variants",
    "export_model",
    "latency_ms",
    "load_exported",
    "prunable_parameters",
    "prune_global",
    "quantize_dynamic",
    "quantize_static",
    "read_card",
    "serialized_size",
    "sidecar_path",
    "sparsity",
    "write_card",
]
