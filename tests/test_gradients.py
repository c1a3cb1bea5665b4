"""gradients.py against references: autograd on the block as the network runs it, and a hand-built identity."""

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
from resnet_lessons.models import BasicBlock, Bottleneck, build_model, make_shortcut


def _blocks() -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        BasicBlock(4, 4),
        BasicBlock(4, 8, 2, make_shortcut(4, 8, 2, "A")),
        BasicBlock(4, 8, 2, make_shortcut(4, 8, 2, "B")),
        Bottleneck(8, 2),
        Bottleneck(8, 4, 2, make_shortcut(8, 16, 2, "B")),
    ]


@pytest.mark.parametrize("block", _blocks(), ids=lambda b: type(b).__name__)
@pytest.mark.parametrize("training", [True, False])
def test_branch_and_shortcut_rebuild_the_block(block: nn.Module, training: bool) -> None:
    block.train(training)
    x = torch.randn(2, block.conv1.in_channels, 6, 6)
    torch.testing.assert_close(torch.relu(residual_branch(block, x) + shortcut(block, x)), block(x))


@pytest.mark.parametrize("training", [True, False])
def test_block_gradient_formula(training: bool) -> None:
    torch.manual_seed(0)
    block = BasicBlock(4, 4).train(training)
    result = check_block_gradient(block, torch.randn(3, 4, 5, 5))
    assert result["max error: y = F(x) + x"] < 1e-5
    assert result["max error: z = ReLU(F(x) + x)"] < 1e-5
    assert result["norm: dL/dy dF/dx (branch path)"] > 0


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
