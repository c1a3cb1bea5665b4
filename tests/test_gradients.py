"""gradients.py against references: autograd on the block as the network runs it, a hand-built identity, and
the scale invariance of a convolution followed by BatchNorm (a hand calculation)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from resnet_lessons.gradients import (
    block_jacobians,
    check_block_gradient,
    gradient_norms,
    residual_branch,
    shortcut,
)
from resnet_lessons.models import (
    BasicBlock,
    Bottleneck,
    PreActBlock,
    build_model,
    make_preact_shortcut,
    make_shortcut,
)


def _blocks() -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        BasicBlock(4, 4),
        BasicBlock(4, 8, 2, make_shortcut(4, 8, 2, "A")),
        BasicBlock(4, 8, 2, make_shortcut(4, 8, 2, "B")),
        Bottleneck(8, 2),
        Bottleneck(8, 4, 2, make_shortcut(8, 16, 2, "B")),
        PreActBlock(4, 4),
        PreActBlock(4, 4, preactivate=False),
        PreActBlock(4, 8, 2, make_preact_shortcut(4, 8, 2, "A")),
        PreActBlock(4, 8, 2, make_preact_shortcut(4, 8, 2, "B")),
    ]


def _rebuild(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block from its two paths: ReLU(F(x) + shortcut(x)), or F(x) + shortcut(x) after pre-activation."""
    total = residual_branch(block, x) + shortcut(block, x)
    return total if isinstance(block, PreActBlock) else torch.relu(total)


@pytest.mark.parametrize("block", _blocks(), ids=lambda b: type(b).__name__)
@pytest.mark.parametrize("training", [True, False])
def test_branch_and_shortcut_rebuild_the_block(block: nn.Module, training: bool) -> None:
    block.train(training)
    x = torch.randn(2, block.conv1.in_channels, 6, 6)
    torch.testing.assert_close(_rebuild(block, x), block(x))


@pytest.mark.parametrize("training", [True, False])
def test_block_gradient_formula(training: bool) -> None:
    torch.manual_seed(0)
    block = BasicBlock(4, 4).train(training)
    result = check_block_gradient(block, torch.randn(3, 4, 5, 5))
    assert result["max error: y = F(x) + x"] < 1e-5
    assert result["max error: z = ReLU(F(x) + x)"] < 1e-5
    assert result["norm: dL/dy dF/dx (branch path)"] > 0


@pytest.mark.parametrize("training", [True, False])
def test_block_gradient_formula_for_the_preactivation_block(training: bool) -> None:
    torch.manual_seed(0)
    block = PreActBlock(4, 4).train(training)
    result = check_block_gradient(block, torch.randn(3, 4, 5, 5))
    assert "max error: z = ReLU(F(x) + x)" not in result  # no ReLU after the addition
    assert result["max error: y = F(x) + x"] < 1e-5
    assert result["max error: z = F(x) + x (the whole block)"] < 1e-5


def test_preactivation_jacobian_difference_is_identity_for_the_whole_block() -> None:
    torch.manual_seed(0)
    block = PreActBlock(2, 2).eval()
    x = torch.randn(1, 2, 3, 3)
    j_block, j_branch = block_jacobians(block, x)
    torch.testing.assert_close(j_block - j_branch, torch.eye(18))
    whole = torch.autograd.functional.jacobian(lambda v: block(v.view_as(x)).flatten(), x.flatten())
    torch.testing.assert_close(whole, j_block)  # nothing after the addition: the block is F(x) + x


def test_block_gradient_needs_identity_shortcut() -> None:
    with pytest.raises(ValueError, match="identity shortcut"):
        check_block_gradient(_blocks()[1], torch.randn(2, 4, 6, 6))


def test_jacobian_difference_is_identity() -> None:
    torch.manual_seed(0)
    block = BasicBlock(2, 2).eval()
    j_block, j_branch = block_jacobians(block, torch.randn(1, 2, 3, 3))
    assert j_block.shape == (18, 18)
    torch.testing.assert_close(j_block - j_branch, torch.eye(18))


def test_gradient_norms_match_manual_backward_and_leave_no_trace() -> None:
    torch.manual_seed(0)
    model = build_model("resnet8")
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = gradient_norms(model.eval(), images, labels)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert table["layer"].tolist() == list(range(1, 9)) and table["name"].iloc[-1] == "fc"

    model.train()
    nn.functional.cross_entropy(model(images), labels).backward()  # the reference: a plain backward pass
    expected = [model.get_submodule(name).weight.grad.norm().item() for name in table["name"]]
    assert table["grad_norm"].tolist() == pytest.approx(expected, rel=1e-5)
    weights = [model.get_submodule(name).weight.norm().item() for name in table["name"]]
    assert table["weight_norm"].tolist() == pytest.approx(weights, rel=1e-6)
    assert table["relative"].tolist() == pytest.approx([g / w for g, w in zip(expected, weights)], rel=1e-5)


def test_a_convolution_before_batchnorm_gets_a_gradient_in_proportion_to_one_over_its_norm() -> None:
    """Scale invariance, by hand: BN(a W x) = BN(W x), so L(a W) = L(W) and dL/dW at a W is (1/a) dL/dW.
    Doubling one convolution's weights halves its gradient, quarters ``relative`` and leaves the loss."""
    torch.manual_seed(0)
    model = build_model("resnet8")
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    before = gradient_norms(model, images, labels).set_index("name")
    with torch.no_grad():
        model.layer2[0].conv1.weight.mul_(2.0)
    after = gradient_norms(model, images, labels).set_index("name")
    row = "layer2.0.conv1"
    assert after.loc[row, "grad_norm"] == pytest.approx(before.loc[row, "grad_norm"] / 2, rel=1e-3)
    assert after.loc[row, "weight_norm"] == pytest.approx(2 * before.loc[row, "weight_norm"], rel=1e-6)
    assert after.loc[row, "relative"] == pytest.approx(before.loc[row, "relative"] / 4, rel=1e-3)
    others = after.drop(index=row)["grad_norm"]
    assert others.tolist() == pytest.approx(before.drop(index=row)["grad_norm"].tolist(), rel=1e-3)


def test_gradient_plot_and_depth_widget() -> None:
    from resnet_lessons import plots, widgets

    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    norms = gradient_norms(build_model("resnet8"), images, labels).assign(model="resnet8")
    fig = plots.gradient_norm_profile(norms)
    assert len(fig.axes[0].lines) == 1 and fig.axes[0].get_yscale() == "log"
    box = widgets.figure_stack({"8": fig, "8 again": plots.gradient_norm_profile(norms)}, description="depth")
    slider, stack = box.children
    assert list(slider.options) == ["8", "8 again"] and len(stack.children) == 2
    assert bytes(stack.children[0].value).startswith(b"\x89PNG")
