"""ResNet from scratch: blocks, networks, plain twins, the registry, and counts.

Two families, both from He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016):

* ``resnet18/34/50``: the ImageNet layout (Table 1), with torchvision's parameter names so that a
  torchvision state dict loads as it is. ``stem="cifar"`` swaps the 7x7/2 + max-pool stem for a 3x3/1 one.
* ``resnet8/20/32/44/56/110``: the CIFAR-10 networks of Sec. 4.2, 6n+2 layers with widths 16/32/64,
  and ``plain20/56/110``: the same networks with the shortcuts removed.

And one from Page, "How to train your ResNet" (2018), the DAWNBench winner: ``resnet9``, a ResNet built for
throughput (few layers at full resolution, max-pool downsampling, two residual blocks), the book's CPU recipe.

And the pre-activation networks of He et al., "Identity Mappings in Deep Residual Networks" (ECCV 2016):
``preact_resnet8/20/32/44/56/110``, the CIFAR family rebuilt from :class:`PreActBlock` (BN-ReLU-conv twice, nothing
after the addition).

The three network classes share :class:`ResNetBase`: torchvision's module names (stem ``conv1``, ``bn1``,
``relu``, ``maxpool``; stages ``layer1..layerN``; ``fc``), the input check and ``forward``. A *stage*, here and
in the paper, is a run of blocks at one resolution and width. Build any network with :func:`build_model`;
:data:`MODELS` maps names to builders. :func:`count_parameters`, :func:`count_flops` and :func:`shape_trace`
measure them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .runtime import eval_mode

if TYPE_CHECKING:
    import pandas as pd

Stem = Literal["imagenet", "cifar"]
Shortcut = Literal["A", "B"]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (the BatchNorm after it has one)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A of He et al. (2016, Sec. 3.3): the identity, subsampled by ``stride`` and padded with
    zero channels when the width grows. It has no parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option A can only add channels, not go from {in_channels} to {out_channels}")
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        # Taking every stride-th pixel gives ceil(H / stride) rows, the same as the branch's 3x3/stride conv.
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self) -> str:
        return f"extra_channels={self.extra_channels}, stride={self.stride}"


def make_shortcut(in_channels: int, out_channels: int, stride: int, shortcut: Shortcut) -> nn.Module | None:
    """The shortcut of a block: ``None`` (plain identity) when the shape is kept, else option A
    (:class:`ZeroPadShortcut`) or option B (1x1 projection + BatchNorm, torchvision's ``downsample``)."""
    if stride == 1 and in_channels == out_channels:
        return None
    if shortcut == "A":
        return ZeroPadShortcut(in_channels, out_channels, stride)
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; the output is ReLU(F(x) + shortcut(x)). ``residual=False`` drops the
    shortcut, which makes the block of a plain network."""

    expansion: int = 1

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.residual:
            if self.downsample is not None:
                identity = self.downsample(x)
            out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """1x1 (reduce), 3x3, 1x1 (expand by 4); the output is ReLU(F(x) + shortcut(x)).

    The stride sits on the 3x3 convolution, as in torchvision ("ResNet v1.5"); the paper puts it on
    the first 1x1."""

    expansion: int = 4

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        residual: bool = True,
    ) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.residual:
            if self.downsample is not None:
                identity = self.downsample(x)
            out += identity
        out = self.relu(out)
        return out


# Pre-activation: He, Zhang, Ren and Sun, "Identity Mappings in Deep Residual Networks" (ECCV 2016), Fig. 4(e)
# and the appendix; where the shortcut taps the block follows the Torch implementations of the paper
# (KaimingHe/resnet-1k-layers, fb.resnet.torch's preresnet.lua): after the shared BN-ReLU when the shape changes.


def make_preact_shortcut(in_channels: int, out_channels: int, stride: int, shortcut: Shortcut) -> nn.Module | None:
    """The shortcut of a :class:`PreActBlock`: ``None`` when the shape is kept, else option A
    (:class:`ZeroPadShortcut`) or option B, a 1x1 projection *without* BatchNorm (the next block
    pre-activates what it receives, so a BatchNorm here would normalise twice)."""
    if stride == 1 and in_channels == out_channels:
        return None
    if shortcut == "A":
        return ZeroPadShortcut(in_channels, out_channels, stride)
    return conv1x1(in_channels, out_channels, stride)


class PreActBlock(nn.Module):
    """The full pre-activation block (He et al. 2016b): BN-ReLU-conv-BN-ReLU-conv; the output is
    F(x) + shortcut(x) with no ReLU after the addition, so the identity path carries x from block to block
    unchanged: x_L = x_l + sum of the residuals between them.

    When the shape changes, the shortcut (``downsample``) is applied to the pre-activated input
    ReLU(BN(x)), which both paths then share. ``preactivate=False`` leaves out the first BN-ReLU: the
    network's first block, whose input the stem has already pre-activated (the paper's appendix)."""

    expansion: int = 1

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        preactivate: bool = True,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels) if preactivate else None
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(in_channels, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width)
        self.downsample = downsample
        self.preactivate = preactivate

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = x
        if self.bn1 is not None:
            out = self.bn1(out)
            out = self.relu(out)
        if self.downsample is not None:
            identity = self.downsample(out)  # the projection sees the pre-activated input

        out = self.conv1(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv2(out)

        out += identity  # no ReLU after the addition: the identity path stays clean
        return out


Block = type[BasicBlock] | type[Bottleneck]


def init_like_torchvision(model: nn.Module) -> None:
    """torchvision's ResNet initialisation: He et al. (2015) for convolutions (fan-out, for ReLU), every BatchNorm
    the identity (weight 1, bias 0)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNetBase(nn.Module):
    """What :class:`ResNet`, :class:`ResNet9` and :class:`PreActResNet` share, under torchvision's module names:
    a stem ``conv1``, ``bn1``, ``relu``, ``maxpool``; stages ``layer1..layerN`` (each added by :meth:`add_stage`);
    ``fc`` on the ``num_features`` penultimate features. A subclass builds them and defines :meth:`features`."""

    conv1: nn.Conv2d
    bn1: nn.BatchNorm2d
    relu: nn.ReLU
    maxpool: nn.Module
    fc: nn.Linear
    num_features: int  # inputs of fc: the channels of the last stage
    min_input_size: int  # the smallest height and width (pixels) that check_input accepts

    def __init__(self, arch: str, in_channels: int, stem: Stem) -> None:
        super().__init__()
        self.arch = arch
        self.in_channels = in_channels
        self.stem_kind = stem
        self.stage_names: list[str] = []

    def add_stage(self, stage: nn.Sequential) -> None:
        """Register ``stage`` as the next ``layerN``."""
        name = f"layer{len(self.stage_names) + 1}"
        self.add_module(name, stage)
        self.stage_names.append(name)

    @property
    def stages(self) -> list[nn.Sequential]:
        """The stages in order; ``stages[-1]`` is the last one (Grad-CAM's usual target)."""
        return [getattr(self, name) for name in self.stage_names]

    def check_input(self, x: Tensor) -> None:
        """Raise a ValueError that names the problem when ``x`` cannot be a batch for this network."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            hint = " (a single image needs a batch dimension: x.unsqueeze(0))" if x.dim() == 3 else ""
            raise ValueError(
                f"{self.arch} expects a batch of shape [batch, {self.in_channels}, height, width] "
                f"(in_channels={self.in_channels}); got {tuple(x.shape)}{hint}"
            )
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"image of {x.shape[-2]}x{x.shape[-1]} is too small for {self.arch} with the {self.stem_kind} "
                f"stem: it needs at least {self.min_input_size}x{self.min_input_size}"
                + (" (or build it with stem='cifar')" if self.stem_kind == "imagenet" else "")
            )

    def stem_and_stages(self, x: Tensor) -> Tensor:
        """Check ``x``, then run the stem and every stage: the last stage's map, before any pooling."""
        self.check_input(x)
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``[batch, num_features]``: what ``fc`` sees."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class ResNet(ResNetBase):
    """Stem, stages ``layer1..layerN`` (the first keeps the resolution, each next one halves it),
    global average pool, ``fc``. Module names follow torchvision."""

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        widths: Sequence[int],
        *,
        num_classes: int = 10,
        stem: Stem = "imagenet",
        shortcut: Shortcut = "B",
        residual: bool = True,
        in_channels: int = 3,
        zero_init_residual: bool = False,
        arch: str = "resnet",
    ) -> None:
        super().__init__(arch, in_channels, stem)
        stem_width = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(in_channels, stem_width)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)

        channels = stem_width
        for index, (blocks, width) in enumerate(zip(layers, widths)):
            stride = 1 if index == 0 else 2
            stage, channels = _make_stage(block, channels, width, blocks, stride, shortcut, residual)
            self.add_stage(stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels
        # The smallest image for which every stride-2 step still halves something: below it the last
        # stages only ever see a 1x1 map that is mostly padding.
        self.min_input_size = (4 if stem == "imagenet" else 1) * 2 ** (len(layers) - 1)

        init_like_torchvision(self)
        if zero_init_residual:
            # Goyal et al. (2017): each block starts as ReLU(shortcut(x)), the net as a shallower one.
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features: the globally pooled output of the last stage, ``[batch, num_features]``."""
        x = self.stem_and_stages(x)
        x = self.avgpool(x)
        return torch.flatten(x, 1)


def _make_stage(
    block: Block,
    in_channels: int,
    width: int,
    blocks: int,
    stride: int,
    shortcut: Shortcut,
    residual: bool,
) -> tuple[nn.Sequential, int]:
    """``blocks`` blocks; only the first changes stride and width. Returns the stage and its out channels."""
    out_channels = width * block.expansion
    downsample = make_shortcut(in_channels, out_channels, stride, shortcut) if residual else None
    layers = [block(in_channels, width, stride, downsample, residual)]
    layers += [block(out_channels, width, 1, None, residual) for _ in range(1, blocks)]
    return nn.Sequential(*layers), out_channels


def _conv_pool(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution, 2x2 max-pool, BatchNorm, ReLU: ResNet-9's way down (pooling before the BatchNorm
    leaves it a quarter of the pixels to normalise)."""
    return nn.Sequential(
        conv3x3(in_channels, out_channels), nn.MaxPool2d(2), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
    )


class ResNet9(ResNetBase):
    """ResNet-9 (Page 2018): a 3x3 stem, three stages that each convolve, pool and (the first and last) add a
    residual :class:`BasicBlock`, global max-pool, a bias-free ``fc`` whose logits are scaled by 1/8.

    Only the stem runs at 32x32: the work sits in a few wide convolutions at 16x16 and below, which keep a
    processor's vector units busier than ResNet-20's narrow full-resolution ones. The interface of
    :class:`ResNetBase` (``stages``, ``features``, ``fc``, ``num_features``, ``check_input``); PyTorch's default
    initialisation, as in Page's runs."""

    logit_scale = 0.125  # Page: a smaller output scale lets the high learning rate train the head stably

    def __init__(self, widths: Sequence[int], *, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__("resnet9", in_channels, "cifar")
        stem, w1, w2, w3 = widths
        self.conv1 = conv3x3(in_channels, stem)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()  # for shape_trace and the stem/stage names shared with ResNet
        self.add_stage(nn.Sequential(_conv_pool(stem, w1), BasicBlock(w1, w1)))
        self.add_stage(nn.Sequential(_conv_pool(w1, w2)))
        self.add_stage(nn.Sequential(_conv_pool(w2, w3), BasicBlock(w3, w3)))
        self.pool = nn.AdaptiveMaxPool2d((1, 1))
        self.fc = nn.Linear(w3, num_classes, bias=False)
        self.num_features = w3
        self.min_input_size = 8  # three 2x2 pools

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features: the globally max-pooled output of the last stage, ``[batch, num_features]``."""
        return torch.flatten(self.pool(self.stem_and_stages(x)), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x)) * self.logit_scale


def _make_preact_stage(in_channels: int, width: int, blocks: int, stride: int, shortcut: Shortcut,
                       preactivate: bool) -> nn.Sequential:
    """``blocks`` :class:`PreActBlock`; only the first changes stride and width, and only it may skip its
    pre-activation (``preactivate=False``: the network's first block, whose input the stem pre-activated)."""
    downsample = make_preact_shortcut(in_channels, width, stride, shortcut)
    layers = [PreActBlock(in_channels, width, stride, downsample, preactivate=preactivate)]
    layers += [PreActBlock(width, width) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class PreActResNet(ResNetBase):
    """The pre-activation ResNet of He et al. (2016b) for CIFAR: a 3x3 stem whose BN-ReLU is the first
    block's pre-activation, stages of :class:`PreActBlock` (widths 16/32/64 for the 6n+2 family), then a
    final BN-ReLU (the last block's output is a sum that no BatchNorm has seen), global average pool, ``fc``.

    The interface of :class:`ResNetBase` (``stages``, ``features``, ``fc``, ``num_features``, ``check_input``,
    ``min_input_size``) and :class:`ResNet`'s initialisation; with option A it has exactly the parameters of the
    original network of the same depth."""

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int],
        *,
        num_classes: int = 10,
        shortcut: Shortcut = "A",
        in_channels: int = 3,
        arch: str = "preact_resnet",
    ) -> None:
        super().__init__(arch, in_channels, "cifar")
        stem_width = widths[0]
        self.conv1 = conv3x3(in_channels, stem_width)
        self.bn1 = nn.BatchNorm2d(stem_width)  # the first block's pre-activation, shared with its shortcut
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()  # for shape_trace and the stem/stage names shared with ResNet

        channels = stem_width
        for index, (blocks, width) in enumerate(zip(layers, widths)):
            stride = 1 if index == 0 else 2
            self.add_stage(_make_preact_stage(channels, width, blocks, stride, shortcut, preactivate=index > 0))
            channels = width
        self.final_bn = nn.BatchNorm2d(channels)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels
        self.min_input_size = 2 ** (len(layers) - 1)
        init_like_torchvision(self)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features: ReLU(BN(last stage)), globally pooled, ``[batch, num_features]``."""
        x = self.stem_and_stages(x)
        x = self.final_bn(x)
        x = self.relu(x)
        x = self.avgpool(x)
        return torch.flatten(x, 1)


def _check_options(arch: str, num_classes: int, width: float, in_channels: int, **choices: str) -> None:
    allowed = {"stem": ("imagenet", "cifar"), "shortcut": ("A", "B")}
    for option, value in choices.items():
        if value not in allowed[option]:
            raise ValueError(f"{arch}: {option}={value!r} is not one of {allowed[option]}")
    for option, number in (("num_classes", num_classes), ("width", width), ("in_channels", in_channels)):
        if not number > 0:
            raise ValueError(f"{arch}: {option} must be positive, got {number!r}")


def _resnet(
    arch: str,
    block: Block,
    layers: Sequence[int],
    base_widths: Sequence[int],
    *,
    num_classes: int,
    width: float,
    in_channels: int,
    stem: Stem,
    shortcut: Shortcut,
    residual: bool = True,
    zero_init_residual: bool = False,
) -> ResNet:
    _check_options(arch, num_classes, width, in_channels, stem=stem, shortcut=shortcut)
    widths = [max(1, round(w * width)) for w in base_widths]
    return ResNet(
        block,
        layers,
        widths,
        num_classes=num_classes,
        stem=stem,
        shortcut=shortcut,
        residual=residual,
        in_channels=in_channels,
        zero_init_residual=zero_init_residual,
        arch=arch,
    )


IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)


def resnet18(
    num_classes: int = 10, *, stem: Stem = "imagenet", shortcut: Shortcut = "B", width: float = 1.0,
    in_channels: int = 3, zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-18 (He et al. 2016, Table 1): BasicBlocks [2, 2, 2, 2]."""
    return _resnet("resnet18", BasicBlock, [2, 2, 2, 2], IMAGENET_WIDTHS, num_classes=num_classes, stem=stem,
                   shortcut=shortcut, width=width, in_channels=in_channels, zero_init_residual=zero_init_residual)


def resnet34(
    num_classes: int = 10, *, stem: Stem = "imagenet", shortcut: Shortcut = "B", width: float = 1.0,
    in_channels: int = 3, zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-34 (He et al. 2016, Table 1): BasicBlocks [3, 4, 6, 3]."""
    return _resnet("resnet34", BasicBlock, [3, 4, 6, 3], IMAGENET_WIDTHS, num_classes=num_classes, stem=stem,
                   shortcut=shortcut, width=width, in_channels=in_channels, zero_init_residual=zero_init_residual)


def resnet50(
    num_classes: int = 10, *, stem: Stem = "imagenet", shortcut: Shortcut = "B", width: float = 1.0,
    in_channels: int = 3, zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-50 (He et al. 2016, Table 1): Bottlenecks [3, 4, 6, 3]."""
    return _resnet("resnet50", Bottleneck, [3, 4, 6, 3], IMAGENET_WIDTHS, num_classes=num_classes, stem=stem,
                   shortcut=shortcut, width=width, in_channels=in_channels, zero_init_residual=zero_init_residual)


def _cifar_resnet(arch: str, n: int, residual: bool) -> Callable[..., ResNet]:
    """A builder for the 6n+2-layer CIFAR network of He et al. (2016, Sec. 4.2)."""
    if residual:

        def build(
            num_classes: int = 10, *, shortcut: Shortcut = "A", width: float = 1.0, in_channels: int = 3,
            zero_init_residual: bool = False,
        ) -> ResNet:
            return _resnet(arch, BasicBlock, [n, n, n], CIFAR_WIDTHS, num_classes=num_classes, stem="cifar",
                           shortcut=shortcut, width=width, in_channels=in_channels,
                           zero_init_residual=zero_init_residual)

        kind = f"ResNet-{6 * n + 2}"
    else:

        def build(num_classes: int = 10, *, width: float = 1.0, in_channels: int = 3) -> ResNet:  # type: ignore[misc]
            return _resnet(arch, BasicBlock, [n, n, n], CIFAR_WIDTHS, num_classes=num_classes, stem="cifar",
                           shortcut="A", width=width, in_channels=in_channels, residual=False)

        kind = f"plain-{6 * n + 2} (ResNet-{6 * n + 2} without shortcuts)"
    build.__name__ = build.__qualname__ = arch
    build.__doc__ = f"{kind}: three stages of {n} BasicBlocks, widths 16/32/64 (He et al. 2016, Sec. 4.2)."
    return build


RESNET9_WIDTHS = (64, 128, 256, 512)


def resnet9(num_classes: int = 10, *, width: float = 1.0, in_channels: int = 3) -> ResNet9:
    """ResNet-9 (Page 2018, "How to train your ResNet"): widths 64/128/256/512, 6.57M parameters."""
    _check_options("resnet9", num_classes, width, in_channels)
    return ResNet9([max(1, round(w * width)) for w in RESNET9_WIDTHS], num_classes=num_classes,
                   in_channels=in_channels)


resnet8 = _cifar_resnet("resnet8", 1, residual=True)
resnet20 = _cifar_resnet("resnet20", 3, residual=True)
resnet32 = _cifar_resnet("resnet32", 5, residual=True)
resnet44 = _cifar_resnet("resnet44", 7, residual=True)
resnet56 = _cifar_resnet("resnet56", 9, residual=True)
resnet110 = _cifar_resnet("resnet110", 18, residual=True)
plain20 = _cifar_resnet("plain20", 3, residual=False)
plain56 = _cifar_resnet("plain56", 9, residual=False)
plain110 = _cifar_resnet("plain110", 18, residual=False)


def _preact_cifar_resnet(arch: str, n: int) -> Callable[..., PreActResNet]:
    """A builder for the 6n+2-layer pre-activation CIFAR network of He et al. (2016b)."""

    def build(
        num_classes: int = 10, *, shortcut: Shortcut = "A", width: float = 1.0, in_channels: int = 3,
    ) -> PreActResNet:
        _check_options(arch, num_classes, width, in_channels, shortcut=shortcut)
        widths = [max(1, round(w * width)) for w in CIFAR_WIDTHS]
        return PreActResNet([n, n, n], widths, num_classes=num_classes, shortcut=shortcut,
                            in_channels=in_channels, arch=arch)

    build.__name__ = build.__qualname__ = arch
    build.__doc__ = (f"Pre-activation ResNet-{6 * n + 2}: three stages of {n} PreActBlocks, widths 16/32/64 "
                     "(He et al. 2016b, \"Identity Mappings in Deep Residual Networks\").")
    return build


preact_resnet8 = _preact_cifar_resnet("preact_resnet8", 1)
preact_resnet20 = _preact_cifar_resnet("preact_resnet20", 3)
preact_resnet32 = _preact_cifar_resnet("preact_resnet32", 5)
preact_resnet44 = _preact_cifar_resnet("preact_resnet44", 7)
preact_resnet56 = _preact_cifar_resnet("preact_resnet56", 9)
preact_resnet110 = _preact_cifar_resnet("preact_resnet110", 18)

MODELS: dict[str, Callable[..., ResNet | ResNet9 | PreActResNet]] = {
    builder.__name__: builder
    for builder in (
        resnet18, resnet34, resnet50,
        resnet8, resnet20, resnet32, resnet44, resnet56, resnet110,
        plain20, plain56, plain110,
        resnet9,
        preact_resnet8, preact_resnet20, preact_resnet32, preact_resnet44, preact_resnet56, preact_resnet110,
    )
}


def model_options(name: str) -> list[str]:
    """The keyword options ``build_model`` accepts for ``name`` (besides ``num_classes``)."""
    return [p for p in inspect.signature(_builder(name)).parameters if p != "num_classes"]


def _builder(name: str) -> Callable[..., ResNet | ResNet9 | PreActResNet]:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


MAX_WIDTH = 16.0  # width multiplier: 16x ResNet-50 already has 6 billion parameters
MAX_CLASSES = 100_000
MAX_IN_CHANNELS = 64


def check_options(name: str, num_classes: Any, options: dict[str, Any]) -> None:
    """Raise a ValueError naming the first option of ``name`` that is unknown, of the wrong type or out of
    range, before any layer is built (a width of 1e6 would otherwise ask for petabytes)."""
    valid = model_options(name)
    for option in options:
        if option not in valid:
            raise ValueError(f"{name} has no option {option!r}; its options are: {', '.join(valid)}")
    limits = {"num_classes": MAX_CLASSES, "in_channels": MAX_IN_CHANNELS}
    for option, value in (("num_classes", num_classes), *options.items()):
        if option in limits and (isinstance(value, bool) or not isinstance(value, int)
                                 or not 1 <= value <= limits[option]):
            raise ValueError(f"{name}: {option} must be a whole number from 1 to {limits[option]}, got {value!r}")
        if option == "width" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value <= MAX_WIDTH):
            raise ValueError(f"{name}: width must be positive and at most {MAX_WIDTH:g}, got {value!r}")
        if option == "zero_init_residual" and not isinstance(value, bool):
            raise ValueError(f"{name}: zero_init_residual must be True or False, got {value!r}")


def build_model(name: str, num_classes: int = 10, **options: Any) -> ResNet | ResNet9 | PreActResNet:
    """The network called ``name`` in :data:`MODELS`, with ``num_classes`` outputs.

    Options (each only where it applies; an unknown one raises a ValueError naming it):
    ``stem`` ("imagenet" or "cifar", ImageNet family), ``shortcut`` ("A" or "B"), ``width`` (multiplier
    of every stage's width), ``in_channels`` and ``zero_init_residual``."""
    builder = _builder(name)
    check_options(name, num_classes, options)
    return builder(num_classes, **options)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as BatchNorm running statistics are not parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _probe(model: nn.Module, input_size: Sequence[int]) -> None:
    """One forward pass of a zero batch of ``input_size`` (on the model's device, in its dtype), in eval mode
    and without gradients; the model goes back to the mode it was in."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    with eval_mode(model), torch.no_grad():
        model(torch.zeros(tuple(input_size), device=device, dtype=dtype))


@torch.no_grad()
def whiten_first_conv(model: nn.Module, x: Tensor, *, eps: float = 5e-4, freeze: bool = True) -> nn.Conv2d:
    """Set the first convolution of ``model`` (``conv1``) to whiten its input patches, from the data.

    ``x``: normalised training images ``[N, C, H, W]``. The covariance of their ``k x k`` patches (``k`` the
    kernel size) has eigenvectors ``v_i`` and eigenvalues ``l_i``; the filters are ``v_i / sqrt(l_i + eps)`` for
    the ``out_channels / 2`` largest ``l_i`` and their negatives (so the ReLU after keeps both signs), and the bias
    is zero. A patch-whitening first layer (hlb-CIFAR10, airbench: Jordan 2024, arXiv:2404.00498) decorrelates
    what the rest of the network sees from the first step on. ``freeze``: the filters are not trained."""
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or conv.out_channels % 2 or conv.groups != 1:
        raise ValueError("whiten_first_conv needs a model whose conv1 is an nn.Conv2d with an even number of "
                         f"output channels, got {conv!r}")
    k, half = conv.kernel_size, conv.out_channels // 2
    dims = conv.in_channels * k[0] * k[1]
    if half > dims:
        raise ValueError(f"conv1 has {conv.out_channels} filters but {dims}-dimensional patches: at most {2 * dims}")
    patches = F.unfold(x.float(), k).transpose(1, 2).reshape(-1, dims).double()  # [patches, C*k*k]
    patches = patches - patches.mean(0)
    values, vectors = torch.linalg.eigh(patches.T @ patches / max(1, patches.shape[0] - 1))
    values, vectors = values.flip(0)[:half], vectors.flip(1)[:, :half]  # the largest first
    filters = (vectors / (values.clamp_min(0) + eps).sqrt()).T.reshape(half, conv.in_channels, *k)
    conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight))
    if conv.bias is not None:
        conv.bias.zero_()
    conv.requires_grad_(not freeze)
    return conv


def count_flops(model: nn.Module, input_size: Sequence[int] = (1, 3, 32, 32)) -> int:
    """FLOPs of one forward pass at ``input_size``, counted by ``torch.utils.flop_counter``.

    A multiply-add counts as 2 FLOPs, so halve the result to compare with the paper's "FLOPs"
    (which are multiply-adds: 1.8e9 for ResNet-18 at 224x224). Only convolutions and matrix
    products are counted; BatchNorm, ReLU, pooling and additions are not."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        _probe(model, input_size)
    return int(counter.get_total_flops())


def shape_trace(model: nn.Module, input_size: Sequence[int] = (1, 3, 32, 32)) -> pd.DataFrame:
    """Output shape after the stem, each stage, the pool and ``fc`` for one forward pass: one row per point of
    the pass, named in the ``stage`` column (``input``, ``stem``, ``layer1``.., ``pool``, ``fc``).

    Works on any network with torchvision's ResNet module names (ours and torchvision's)."""
    import pandas as pd

    stage_names = [name for name, _ in model.named_children() if name.startswith("layer")]
    pool = "avgpool" if hasattr(model, "avgpool") else "pool"  # ResNet-9 max-pools
    points = {"maxpool": "stem", **{name: name for name in stage_names}, pool: "pool", "fc": "fc"}
    rows: list[dict[str, object]] = [{"stage": "input", "shape": tuple(input_size)}]
    handles = [
        getattr(model, module).register_forward_hook(
            lambda _m, _i, out, point=point: rows.append({"stage": point, "shape": tuple(out.shape)})
        )
        for module, point in points.items()
    ]
    try:
        _probe(model, input_size)
    finally:
        for handle in handles:
            handle.remove()
    table = pd.DataFrame(rows)
    table["channels"] = [shape[1] for shape in table["shape"]]
    table["size"] = [f"{s[2]}x{s[3]}" if len(s) == 4 else "-" for s in table["shape"]]
    return table


__all__ = [
    "MODELS",
    "BasicBlock",
    "Bottleneck",
    "PreActBlock",
    "PreActResNet",
    "ResNet",
    "ResNet9",
    "ResNetBase",
    "ZeroPadShortcut",
    "build_model",
    "check_options",
    "count_flops",
    "whiten_first_conv",
    "count_parameters",
    "init_like_torchvision",
    "make_preact_shortcut",
    "make_shortcut",
    "model_options",
    "shape_trace",
    *MODELS,
]
