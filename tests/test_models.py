"""models.py against trusted references: torchvision's ResNets, the paper's Table 6, hand-computed shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from resnet_lessons.models import (
    MODELS,
    BasicBlock,
    Bottleneck,
    PreActResNet,
    ResNet,
    ResNet9,
    ResNetBase,
    ZeroPadShortcut,
    build_model,
    count_flops,
    count_parameters,
    make_shortcut,
    shape_trace,
)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_imagenet_family_is_torchvision(name: str) -> None:
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).eval()
    ours = build_model(name, num_classes=1000).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert count_parameters(ours) == count_parameters(reference)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)


def test_resnet18_parameter_count() -> None:
    assert count_parameters(build_model("resnet18", num_classes=1000)) == 11_689_512


# Exact counts with option A and 10 classes, next to He et al. (2016), Table 6.
CIFAR_COUNTS = {
    "resnet20": (269_722, 0.27e6),
    "resnet32": (464_154, 0.46e6),
    "resnet44": (658_586, 0.66e6),
    "resnet56": (853_018, 0.85e6),
    "resnet110": (1_727_962, 1.7e6),
}


@pytest.mark.parametrize("name", list(CIFAR_COUNTS))
def test_cifar_family_parameter_counts(name: str) -> None:
    exact, paper = CIFAR_COUNTS[name]
    count = count_parameters(build_model(name))
    assert count == exact
    assert count == pytest.approx(paper, rel=0.02)  # the paper rounds to two significant figures


def test_plain_nets_have_the_same_parameters_and_no_shortcuts() -> None:
    plain, residual = build_model("plain20"), build_model("resnet20")
    assert count_parameters(plain) == count_parameters(residual)  # option A shortcuts have no parameters
    assert all(not b.residual for b in plain.modules() if isinstance(b, BasicBlock))
    assert not any(isinstance(m, ZeroPadShortcut) for m in plain.modules())


def test_depth_of_cifar_family() -> None:
    for name in ("resnet8", "resnet20", "resnet56", "plain110"):
        layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in build_model(name).modules())
        assert layers == int(name.removeprefix("resnet").removeprefix("plain"))


def test_option_b_adds_projections() -> None:
    a, b = build_model("resnet20", shortcut="A"), build_model("resnet20", shortcut="B")
    # two projections: 16->32 and 32->64, each a 1x1 conv + BatchNorm
    assert count_parameters(b) - count_parameters(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


@pytest.mark.parametrize("block_type, in_channels, width, stride", [
    (BasicBlock, 8, 8, 1), (BasicBlock, 8, 16, 2), (Bottleneck, 16, 4, 1), (Bottleneck, 16, 8, 2),
])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_zero_gamma_block_is_relu_of_shortcut(block_type, in_channels, width, stride, shortcut) -> None:
    torch.manual_seed(0)
    out_channels = width * block_type.expansion
    block = block_type(in_channels, width, stride, make_shortcut(in_channels, out_channels, stride, shortcut))
    last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
    nn.init.zeros_(last_bn.weight)
    x = torch.randn(2, in_channels, 6, 6)
    for mode in (True, False):
        block.train(mode)
        shortcut_x = x if block.downsample is None else block.downsample(x)
        torch.testing.assert_close(block(x), torch.relu(shortcut_x), atol=0, rtol=0)


def test_zero_init_residual_option() -> None:
    model = build_model("resnet20", zero_init_residual=True)
    assert all(b.bn2.weight.abs().sum() == 0 for b in model.modules() if isinstance(b, BasicBlock))
    model = build_model("resnet50", zero_init_residual=True)
    assert all(b.bn3.weight.abs().sum() == 0 for b in model.modules() if isinstance(b, Bottleneck))


def test_option_a_shortcut_by_hand() -> None:
    x = torch.arange(2 * 5 * 5, dtype=torch.float32).reshape(1, 2, 5, 5)
    out = ZeroPadShortcut(2, 4, stride=2)(x)
    assert out.shape == (1, 4, 3, 3)
    torch.testing.assert_close(out[:, :2], x[:, :, ::2, ::2])
    assert out[:, 2:].abs().sum() == 0


def _trace(model: nn.Module, size: int) -> dict[str, tuple[int, ...]]:
    return dict(zip(*shape_trace(model, (1, 3, size, size))[["stage", "shape"]].to_dict("list").values()))


def test_shapes_imagenet_stem() -> None:
    assert _trace(build_model("resnet18"), 32) == {
        "input": (1, 3, 32, 32), "stem": (1, 64, 8, 8), "layer1": (1, 64, 8, 8), "layer2": (1, 128, 4, 4),
        "layer3": (1, 256, 2, 2), "layer4": (1, 512, 1, 1), "pool": (1, 512, 1, 1), "fc": (1, 10),
    }
    assert _trace(build_model("resnet50"), 64)["layer4"] == (1, 2048, 2, 2)


def test_shapes_cifar_stem() -> None:
    assert _trace(build_model("resnet18", stem="cifar"), 32) == {
        "input": (1, 3, 32, 32), "stem": (1, 64, 32, 32), "layer1": (1, 64, 32, 32), "layer2": (1, 128, 16, 16),
        "layer3": (1, 256, 8, 8), "layer4": (1, 512, 4, 4), "pool": (1, 512, 1, 1), "fc": (1, 10),
    }
    assert _trace(build_model("resnet20"), 32) == {
        "input": (1, 3, 32, 32), "stem": (1, 16, 32, 32), "layer1": (1, 16, 32, 32), "layer2": (1, 32, 16, 16),
        "layer3": (1, 64, 8, 8), "pool": (1, 64, 1, 1), "fc": (1, 10),
    }


def test_shape_trace_matches_torchvision() -> None:
    ours, theirs = shape_trace(build_model("resnet18", 1000)), shape_trace(torchvision.models.resnet18(weights=None))
    assert ours["shape"].tolist() == theirs["shape"].tolist()


def test_features_and_width() -> None:
    model = build_model("resnet8", width=2, num_classes=7).eval()
    x = torch.randn(3, 3, 32, 32)
    features = model.features(x)
    assert features.shape == (3, 128) and model.num_features == 128
    torch.testing.assert_close(model.fc(features), model(x))
    assert model.stages[-1] is model.layer3


def test_in_channels_option() -> None:
    model = build_model("resnet8", in_channels=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_count_flops_against_hand_count() -> None:
    # resnet8 by hand: stem 3->16 at 32x32; stage1 two 16->16 convs at 32x32; stage2 16->32 and 32->32
    # at 16x16; stage3 32->64 and 64->64 at 8x8; fc 64->10. Multiply-adds, 2 FLOPs each.
    macs = 9 * (3 * 16 * 32 * 32 + 2 * 16 * 16 * 32 * 32 + (16 * 32 + 32 * 32) * 16 * 16
                + (32 * 64 + 64 * 64) * 8 * 8) + 64 * 10
    assert count_flops(build_model("resnet8")) == 2 * macs


def test_registry_and_errors() -> None:
    assert {"resnet8", "resnet20", "resnet56", "resnet110", "plain20", "plain56", "plain110",
            "resnet18", "resnet34", "resnet50"} <= set(MODELS)
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*resnet18.*resnet20"):
        build_model("resnet19")
    with pytest.raises(ValueError, match="no option 'depth'.*width"):
        build_model("resnet20", depth=3)
    with pytest.raises(ValueError, match="no option 'shortcut'"):
        build_model("plain20", shortcut="B")
    with pytest.raises(ValueError, match="no option 'stem'"):
        build_model("resnet20", stem="imagenet")
    with pytest.raises(ValueError, match="stem='tiny'"):
        build_model("resnet18", stem="tiny")
    with pytest.raises(ValueError, match="width must be positive"):
        build_model("resnet8", width=0)


def test_bad_input_errors() -> None:
    model = build_model("resnet8")
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\].*\(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="batch dimension"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="16x16 is too small for resnet18 with the imagenet stem.*32x32.*cifar"):
        build_model("resnet18")(torch.randn(2, 3, 16, 16))
    assert build_model("resnet18", stem="cifar")(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_resnet9_parameters_and_flops_by_hand() -> None:
    # Page's ResNet-9: 3x3 convs 3->64 (stem), 64->128, two 128->128 (block), 128->256, 256->512, two
    # 512->512 (block); a BatchNorm (2 parameters per channel) after each; a bias-free 512->10 fc.
    convs = [(3, 64, 32), (64, 128, 32), (128, 128, 16), (128, 128, 16), (128, 256, 16), (256, 512, 8),
             (512, 512, 4), (512, 512, 4)]  # (in, out, resolution the conv runs at: it pools after)
    params = sum(9 * i * o + 2 * o for i, o, _ in convs) + 512 * 10
    assert params == 6_573_120  # the 6.57M usually quoted for it
    assert count_parameters(build_model("resnet9")) == params
    macs = sum(9 * i * o * r * r for i, o, r in convs) + 512 * 10
    assert count_flops(build_model("resnet9")) == 2 * macs


def test_resnet9_shapes_blocks_and_logit_scale() -> None:
    model = build_model("resnet9", width=0.5, num_classes=7)
    table = shape_trace(model)
    assert list(table["stage"]) == ["input", "stem", "layer1", "layer2", "layer3", "pool", "fc"]
    assert list(table["size"])[1:5] == ["32x32", "16x16", "8x8", "4x4"]
    assert list(table["channels"])[1:6] == [32, 64, 128, 256, 256]
    assert [type(m) for m in model.modules() if isinstance(m, BasicBlock)] == [BasicBlock, BasicBlock]
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(model(x), model.fc(model.features(x)) / 8)
    assert model.features(x).shape == (3, model.num_features) == (3, 256)
    assert [name for name, _ in model.named_children() if name.startswith("layer")] == model.stage_names
    with pytest.raises(ValueError, match="4x4 is too small for resnet9.*8x8"):
        model(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="no option 'stem'"):
        build_model("resnet9", stem="cifar")


@pytest.mark.parametrize("name", ["resnet8", "plain20", "resnet18", "resnet9", "preact_resnet8"])
def test_every_network_shares_one_base_and_restores_its_mode(name: str) -> None:
    model = build_model(name, width=0.5)
    assert isinstance(model, ResNetBase) and isinstance(model, ResNet) == (name not in ("resnet9", "preact_resnet8"))
    for method in ("check_input", "stem_and_stages", "add_stage"):
        assert all(method not in vars(cls) for cls in (ResNet, ResNet9, PreActResNet))  # inherited, not copied
    assert model.stage_names == [f"layer{i + 1}" for i in range(len(model.stages))]
    model.train()
    count_flops(model)
    shape_trace(model)
    assert model.training
    model.eval()
    count_flops(model)
    assert not model.training



def test_whiten_first_conv_decorrelates_the_patches_it_was_fitted_on():
    from resnet_lessons.models import whiten_first_conv

    generator = torch.Generator().manual_seed(0)
    mix = torch.randn(3, 3, generator=generator)  # correlated colour channels, then blurred: correlated pixels
    x = torch.einsum("ij,njhw->nihw", mix, torch.randn(64, 3, 12, 12, generator=generator))
    x = F.avg_pool2d(x, 3, stride=1, padding=1)
    model = build_model("resnet9", width=0.5)  # conv1: 3 -> 32 filters of 3x3: 16 directions and their negatives
    conv = whiten_first_conv(model, x, eps=1e-6)
    assert not conv.weight.requires_grad and (conv.bias is None or not conv.bias.any())
    y = F.conv2d(x, conv.weight)  # no padding: exactly the patches the covariance was taken over
    half = y[:, :16].transpose(0, 1).reshape(16, -1)
    cov = torch.cov(half)
    assert torch.allclose(cov, torch.eye(16), atol=1e-3)  # unit variance, uncorrelated
    assert torch.equal(y[:, 16:], -y[:, :16])
    with pytest.raises(ValueError, match="even number"):
        whiten_first_conv(torch.nn.Sequential(), x)
