"""Compression: make a trained network smaller, and measure what that bought.

* :func:`quantize_static` (int8 post-training quantisation of the whole network, FX graph mode with the
  ``x86`` engine, calibrated on training images) and :func:`quantize_dynamic` (int8 ``Linear`` layers only);
* :func:`prune_global` (global unstructured L1 pruning, made permanent) and :func:`sparsity`;
* :func:`serialized_size` (bytes of the weights, raw and zlib-compressed) and :func:`latency_ms` (median
  single-image CPU latency, measured with ``torch.utils.benchmark.Timer``);
* :func:`compare_variants`: accuracy, agreement, size, sparsity and latency of each variant, as a table.

A variant is a PyTorch module or an exported file (:class:`resnet_lessons.export.ExportedModel`).
``torch.ao.quantization`` is deprecated in recent PyTorch (its successor is torchao's PT2E quantisation); it
still works on the CPU and is the simplest complete path, so its deprecation warnings are silenced here and
the book says so.
"""

from __future__ import annotations

import contextlib
import io
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import fx, nn
from torch.utils import benchmark

from .data.images import normalise
from .export import ExportedModel, plain_copy, predict_logits, quiet_warnings
from .runtime import eval_mode

if TYPE_CHECKING:
    import pandas as pd

Variant = nn.Module | ExportedModel


# --- quantisation ---------------------------------------------------------------------------------------


def _calibration_batches(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], batch_size: int, batches: int, seed: int = 0
) -> Iterator[torch.Tensor]:
    """``batches`` batches of images drawn at random (a split may be sorted by class), normalised."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[: batch_size * batches]
    for start in range(0, len(order), batch_size):
        yield normalise(images[order[start : start + batch_size]], mean, std)


class _ShapedInput(fx.Proxy):
    """The traced input, with the shape of the example batch: a network's Python checks on its input's shape
    (``check_input``) run once on the example, as under ``torch.jit.trace``, instead of failing on a symbol."""

    def __init__(self, node: fx.Node, tracer: fx.Tracer, shape: torch.Size) -> None:
        super().__init__(node, tracer)
        self.shape = shape

    def dim(self) -> int:
        return len(self.shape)


class _ExampleShapeTracer(fx.Tracer):
    """FX's symbolic tracer, with the input's shape known (batch size included, so a network that computed
    with its input's shape would have it fixed, as torch.jit.trace fixes it). Every other value stays symbolic."""

    def __init__(self, example: torch.Tensor) -> None:
        super().__init__()
        self.shape = example.shape

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapedInput(node, self, self.shape) if node.op == "placeholder" else super().proxy(node)


def _traced(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """``model`` as an FX graph without Python control flow, which ``prepare_fx`` traces again. Its layers keep
    their names; functions called inside a submodule (the option-A shortcut's pad) lose that module's scope,
    which matters only to per-module qconfigs (the mapping used here is global)."""
    return fx.GraphModule(model, _ExampleShapeTracer(example).trace(model))


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
    the range of every activation (the images are drawn at random with ``seed``); ``convert_fx`` then swaps
    in int8 kernels (``backend``: "x86" uses FBGEMM/oneDNN; "qnnpack" is the ARM one). Weights are quantised
    per output channel, activations per tensor. The result takes the same normalised float input and returns
    float logits, on the CPU only.
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if backend not in torch.backends.quantized.supported_engines:
        raise ValueError(f"quantisation backend {backend!r} is not available here; this build has "
                         f"{', '.join(torch.backends.quantized.supported_engines)}")
    torch.backends.quantized.engine = backend  # the quantised kernels run on the engine they were packed for
    example = next(_calibration_batches(calibration_images, mean, std, batch_size, 1))
    with quiet_warnings(), torch.no_grad():
        graph = _traced(plain_copy(model), example)
        prepared = prepare_fx(graph, get_default_qconfig_mapping(backend), (example,))
        for x in _calibration_batches(calibration_images, mean, std, batch_size, batches, seed):
            prepared(x)
        return convert_fx(prepared).eval()


def quantize_dynamic(model: nn.Module) -> nn.Module:
    """int8 dynamic quantisation of the ``Linear`` layers (weights int8, activations quantised on the fly).

    Made for networks dominated by ``Linear`` layers (transformers, LSTMs); in a ResNet only the last layer is one.
    """
    from torch.ao.quantization import quantize_dynamic as ao_quantize_dynamic

    with quiet_warnings():
        return ao_quantize_dynamic(plain_copy(model), {nn.Linear}, dtype=torch.qint8).eval()


# --- pruning ----------------------------------------------------------------------------------------------


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
    model = plain_copy(model)
    parameters = prunable_parameters(model)
    prune.global_unstructured(parameters, pruning_method=prune.L1Unstructured, amount=float(amount))
    for module, name in parameters:
        prune.remove(module, name)
    return model


def _weights(model: nn.Module) -> Iterator[torch.Tensor]:
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            yield module.weight.detach()
        elif type(module).__module__.startswith("torch.ao.nn.quantized"):
            weight = getattr(module, "weight", None)  # int8 layers unpack their weight with a method
            if callable(weight):
                yield weight().dequantize()  # symmetric weights, so 0 stays exactly 0


def sparsity(model: nn.Module) -> float:
    """Share (0-1) of zero weights in the convolution and linear layers (float or int8)."""
    weights = list(_weights(model))
    if not weights:
        return 0.0
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


# --- measuring ----------------------------------------------------------------------------------------------


def serialized_size(model: Variant) -> tuple[int, int]:
    """Bytes of the saved weights (``torch.save`` of the state dict, or the exported file) and zlib-compressed."""
    if isinstance(model, ExportedModel):
        payload = model.path.read_bytes()
    else:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        payload = buffer.getvalue()
    return len(payload), len(zlib.compress(payload, 6))


def latency_ms(model: Variant, example: torch.Tensor, *, repeats: int = 50, threads: int | None = 1) -> float:
    """Median milliseconds of one forward pass of ``example`` (one image: ``[1, 3, H, W]``) on the CPU.

    Each of the ``repeats`` samples is one pass timed by ``torch.utils.benchmark.Timer`` (``timeit(1)``, which
    runs untimed passes before it), so the median is of single requests and a stall in one does not move it.
    ``threads=1`` (the default) measures what one request costs on one core of a server; ``None`` keeps torch's
    thread count. The Timer restores the count afterwards. ONNX Runtime uses the threads its session was opened
    with (``load_exported(threads=)``). A PyTorch module runs in eval mode, then goes back to its mode.
    """
    timer = benchmark.Timer(
        stmt="model(example)",
        globals={"model": model, "example": example},
        num_threads=threads or torch.get_num_threads(),
    )
    modes = eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext()
    with torch.no_grad(), modes:
        samples = [timer.timeit(1) for _ in range(repeats)]
    return 1000 * benchmark.Measurement.merge(samples)[0].median


def compare_variants(
    variants: Mapping[str, Variant],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    reference: str | None = None,
    latency_repeats: int = 50,
    threads: int | None = 1,
) -> pd.DataFrame:
    """One row per variant (a PyTorch module or an :class:`ExportedModel`): accuracy on the labelled images,
    agreement of its predictions with ``reference`` (default: the first variant), size of the weights (raw and
    zlib-compressed, kB), sparsity of the conv/linear weights, and median single-image latency (ms) on the CPU."""
    import pandas as pd

    names = list(variants)
    if not names:
        raise ValueError("no variants to compare")
    reference = reference or names[0]
    if reference not in variants:
        raise ValueError(f"reference {reference!r} is not one of the variants {names}")
    example = normalise(images[:1], mean, std)
    predictions = {name: predict_logits(model, images, mean=mean, std=std).argmax(1)
                   for name, model in variants.items()}
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
    "compare_variants",
    "latency_ms",
    "prunable_parameters",
    "prune_global",
    "quantize_dynamic",
    "quantize_static",
    "serialized_size",
    "sparsity",
]
