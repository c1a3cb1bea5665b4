"""The pre-activation ResNet (He et al. 2016b) against references: a hand count of its parameters, the block
composed by hand from torch.nn.functional ops, hand-computed shapes, a tiny training run, and its exports run back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_lessons import checkpoints, export
from resnet_lessons.data import normalise
from resnet_lessons.models import (
    MODELS,
    PreActBlock,
    PreActResNet,
    ZeroPadShortcut,
    build_model,
    count_flops,
    count_parameters,
    make_preact_shortcut,
    shape_trace,
)


def hand_count(n: int, shortcut: str = "A", num_classes: int = 10) -> int:
    """Parameters of the pre-activation 6n+2 network, counted layer by layer."""
    conv = lambda i, o, k=3: k * k * i * o  # noqa: E731 - bias-free convolutions
    bn = lambda c: 2 * c  # noqa: E731 - gamma and beta
    total = conv(3, 16) + bn(16)  # stem: conv1 and the BN of the first block's pre-activation
    channels = 16
    for stage, width in enumerate((16, 32, 64)):
        for position in range(n):
            first_of_net = stage == 0 and position == 0
            total += (0 if first_of_net else bn(channels))  # bn1: pre-activation of the block's input
            total += conv(channels, width) + bn(width) + conv(width, width)  # conv1, bn2, conv2
            if channels != width and shortcut == "B":
                total += conv(channels, width, k=1)  # the projection, no BatchNorm
            channels = width
    return total + bn(64) + 64 * num_classes + num_classes  # final BN, fc


@pytest.mark.parametrize("n, name", [(1, "preact_resnet8"), (3, "preact_resnet20"), (9, "preact_resnet56"),
                                     (18, "preact_resnet110")])
def test_parameter_count_by_hand(n: int, name: str) -> None:
    assert count_parameters(build_model(name)) == hand_count(n)
    assert count_parameters(build_model(name, shortcut="B")) == hand_count(n, "B")
    assert count_parameters(build_model(name, num_classes=100)) == hand_count(n, num_classes=100)


def test_same_parameters_as_the_original_at_equal_depth() -> None:
    # Pre-activation moves the BatchNorms, it does not add any: the stem's BN is the first block's pre-activation
    # and the final BN replaces the first block's own; at stage transitions bn1 sees in_channels, not width.
    for depth in (20, 56):
        assert count_parameters(build_model(f"preact_resnet{depth}")) == count_parameters(build_model(f"resnet{depth}"))
    assert count_parameters(build_model("preact_resnet20")) == 269_722  # the paper's 0.27M


@pytest.mark.parametrize("name, depth", [("preact_resnet20", 20), ("preact_resnet56", 56)])
def test_depth_counts_weight_layers(name: str, depth: int) -> None:
    model = build_model(name)
    assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()) == depth
    blocks = [m for m in model.modules() if isinstance(m, PreActBlock)]
    assert len(blocks) == (depth - 2) // 2
    assert blocks[0].bn1 is None and all(b.bn1 is not None for b in blocks[1:])  # the stem pre-activates block 1


def _bn(x: torch.Tensor, bn: nn.BatchNorm2d, training: bool) -> torch.Tensor:
    if training:  # batch statistics, biased variance
        return F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)


def reference_block(block: PreActBlock, x: torch.Tensor, stride: int, shortcut: str | None,
                    training: bool) -> torch.Tensor:
    """The block written out in functional ops from the paper's Fig. 4(e)."""
    pre = F.relu(_bn(x, block.bn1, training)) if block.bn1 is not None else x
    if shortcut is None:
        identity = x
    elif shortcut == "A":
        identity = pre[:, :, ::stride, ::stride]
        extra = block.conv2.out_channels - x.shape[1]
        identity = torch.cat([identity, identity.new_zeros(identity.shape[0], extra, *identity.shape[2:])], 1)
    else:
        identity = F.conv2d(pre, block.downsample.weight, stride=stride)
    out = F.conv2d(pre, block.conv1.weight, stride=stride, padding=1)
    out = F.relu(_bn(out, block.bn2, training))
    out = F.conv2d(out, block.conv2.weight, padding=1)
    return out + identity


@pytest.mark.parametrize("in_channels, width, stride, shortcut, preactivate", [
    (8, 8, 1, None, True), (8, 8, 1, None, False), (8, 16, 2, "A", True), (8, 16, 2, "B", True),
    (8, 16, 1, "B", True),
])
@pytest.mark.parametrize("training", [True, False])
def test_block_is_the_hand_composed_reference(in_channels, width, stride, shortcut, preactivate, training) -> None:
    torch.manual_seed(0)
    downsample = make_preact_shortcut(in_channels, width, stride, shortcut or "A")
    assert (downsample is None) == (shortcut is None)
    block = PreActBlock(in_channels, width, stride, downsample, preactivate=preactivate)
    for bn in (m for m in block.modules() if isinstance(m, nn.BatchNorm2d)):  # not the identity of a fresh BN
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.normal_(bn.bias, std=0.2)
        bn.running_mean.normal_(std=0.3)
        bn.running_var.uniform_(0.5, 2.0)
    block.train(training)
    x = torch.randn(4, in_channels, 9, 9)  # odd size: the stride-2 paths must agree on ceil(9 / 2) = 5
    expected = reference_block(block, x, stride, shortcut, training)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    assert block(x).shape == (4, width, 5 if stride == 2 else 9, 5 if stride == 2 else 9)


def test_nothing_follows_the_addition() -> None:
    # With the residual branch silenced the block is the identity, exactly: negative values pass untouched.
    torch.manual_seed(0)
    block = PreActBlock(8, 8)
    nn.init.zeros_(block.conv2.weight)
    x = torch.randn(2, 8, 6, 6)
    for mode in (True, False):
        block.train(mode)
        torch.testing.assert_close(block(x), x, atol=0, rtol=0)


def test_projection_sees_the_pre_activated_input() -> None:
    torch.manual_seed(0)
    shortcut = make_preact_shortcut(8, 16, 2, "B")
    assert isinstance(shortcut, nn.Conv2d) and shortcut.bias is None  # a 1x1 projection, no BatchNorm after it
    assert isinstance(make_preact_shortcut(8, 16, 2, "A"), ZeroPadShortcut)
    block = PreActBlock(8, 16, 2, shortcut).eval()
    nn.init.zeros_(block.conv2.weight)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(block(x), shortcut(torch.relu(block.bn1(x))))


def test_shapes_features_and_interface() -> None:
    model = build_model("preact_resnet20", num_classes=7).eval()
    table = shape_trace(model)
    assert dict(zip(table["stage"], table["shape"])) == {
        "input": (1, 3, 32, 32), "stem": (1, 16, 32, 32), "layer1": (1, 16, 32, 32), "layer2": (1, 32, 16, 16),
        "layer3": (1, 64, 8, 8), "pool": (1, 64, 1, 1), "fc": (1, 7),
    }
    x = torch.randn(3, 3, 32, 32)
    features = model.features(x)
    assert features.shape == (3, model.num_features) == (3, 64)
    assert (features >= 0).all()  # after the final BN-ReLU
    torch.testing.assert_close(model.fc(features), model(x))
    assert model.stages[-1] is model.layer3 and model.stage_names == ["layer1", "layer2", "layer3"]
    assert isinstance(model, PreActResNet) and model.arch == "preact_resnet20"
    # the same convolutions as ResNet-20, so the same FLOPs
    assert count_flops(model) == count_flops(build_model("resnet20", num_classes=7))
    wide = build_model("preact_resnet8", width=2, in_channels=1)
    assert wide(torch.randn(2, 1, 32, 32)).shape == (2, 10) and wide.num_features == 128


def test_registry_options_and_errors() -> None:
    assert {f"preact_resnet{d}" for d in (8, 20, 32, 44, 56, 110)} <= set(MODELS)
    with pytest.raises(ValueError, match="no option 'stem'"):
        build_model("preact_resnet20", stem="imagenet")
    with pytest.raises(ValueError, match="no option 'zero_init_residual'"):
        build_model("preact_resnet20", zero_init_residual=True)
    with pytest.raises(ValueError, match="shortcut='C'"):
        build_model("preact_resnet20", shortcut="C")
    model = build_model("preact_resnet8")
    with pytest.raises(ValueError, match="batch dimension"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="2x2 is too small for preact_resnet8.*4x4"):
        model(torch.randn(1, 3, 2, 2))


def test_it_trains_on_a_tiny_batch() -> None:
    torch.manual_seed(0)
    model = build_model("preact_resnet8", width=0.5).train()
    x, y = torch.randn(32, 3, 32, 32), torch.arange(32) % 10
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(40):  # memorise 32 random images
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.fixture(scope="module")
def calibrated():
    """preact_resnet8 with BatchNorm statistics from images (not the 0/1 of a fresh network), and the images."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    model = build_model("preact_resnet8").train()
    with torch.no_grad():
        model(normalise(images, mean, std))
    return model.eval(), images, mean, std


def test_checkpoint_rebuilds_it(tmp_path, calibrated) -> None:
    model, images, mean, std = calibrated
    payload = checkpoints.make_checkpoint(model, model_name="preact_resnet8", model_options={"shortcut": "A"},
                                          classes=[str(i) for i in range(10)], mean=mean, std=std)
    rebuilt = checkpoints.load_model(checkpoints.save(payload, tmp_path / "model.pt"))
    x = normalise(images[:8], mean, std)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_it_exports_like_the_others(tmp_path, calibrated, fmt) -> None:
    model, images, mean, std = calibrated
    card = export.ModelCard(model_name="preact_resnet8", classes=tuple(str(i) for i in range(10)), mean=mean,
                            std=std, input_size=(3, 32, 32))
    result = export.export_model(model, tmp_path / ("m.onnx" if fmt == "onnx" else "m.pt"), format=fmt, card=card,
                                 images=images[:16])
    assert result.comparison.ok and result.comparison.agreement == 1.0
