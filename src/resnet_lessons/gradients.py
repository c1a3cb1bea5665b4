"""Gradients through residual blocks: per-layer norms at initialisation and a check of the block derivative.

For a block whose output (before its last ReLU) is y = F(x) + x, the chain rule gives
dL/dx = dL/dy (1 + dF/dx) (He et al. 2016, "Identity Mappings in Deep Residual Networks", eq. 5):
the identity path hands dL/dy back unchanged, whatever the branch F does. The pre-activation block
(:class:`~resnet_lessons.models.PreActBlock`) has no ReLU after the addition, so there the formula holds
for the whole block.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import BasicBlock, Bottleneck, PreActBlock
from .runtime import eval_mode

Block = BasicBlock | Bottleneck | PreActBlock


def _preactivated(block: PreActBlock, x: Tensor) -> Tensor:
    """ReLU(BN(x)), the input that a pre-activation block's branch (and a projecting shortcut) sees."""
    return x if block.bn1 is None else block.relu(block.bn1(x))


def residual_branch(block: Block, x: Tensor) -> Tensor:
    """F(x): the block's convolutions and BatchNorms, without the shortcut and the last ReLU (a
    pre-activation block: BN-ReLU-conv-BN-ReLU-conv, which has no ReLU after the addition)."""
    if isinstance(block, PreActBlock):
        return block.conv2(block.relu(block.bn2(block.conv1(_preactivated(block, x)))))
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    if isinstance(block, Bottleneck):
        out = block.bn3(block.conv3(block.relu(out)))
    return out


def shortcut(block: Block, x: Tensor) -> Tensor:
    """The shortcut path: x itself, or option A / option B when the shape changes (in a pre-activation
    block applied to the pre-activated input, as the block does)."""
    if block.downsample is None:
        return x
    return block.downsample(_preactivated(block, x) if isinstance(block, PreActBlock) else x)


def check_block_gradient(block: Block, x: Tensor, grad_output: Tensor | None = None, seed: int = 0) -> pd.Series:
    """Compare autograd's dL/dx through ``y = F(x) + x`` with the formula ``dL/dy + dL/dy dF/dx``.

    ``grad_output`` plays dL/dy (random when not given). Also checks the full block,
    ReLU(F(x) + x), where the formula becomes ``g + g dF/dx`` with ``g = dL/dz * (y > 0)``; a pre-activation
    block has no ReLU after the addition, so there the whole block is y itself and ``g = dL/dz``.
    Needs an identity shortcut (stride 1, same width). Returns gradient norms and the largest
    differences between autograd and the formula ("max error: ...")."""
    if block.downsample is not None:
        raise ValueError("the check needs a block with an identity shortcut (stride 1, same channels)")
    x = x.detach().clone().requires_grad_(True)
    branch = residual_branch(block, x)
    y = branch + x
    if grad_output is None:
        grad_output = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y)
    (autograd,) = torch.autograd.grad(y, x, grad_output, retain_graph=True)
    (through_branch,) = torch.autograd.grad(branch, x, grad_output, retain_graph=True)  # dL/dy dF/dx
    formula = grad_output + through_branch

    preact = isinstance(block, PreActBlock)
    z = block(x)  # the block as the network runs it: ReLU(F(x) + x), or F(x) + x for a pre-activation block
    (autograd_block,) = torch.autograd.grad(z, x, grad_output)
    gated = grad_output if preact else grad_output * (y > 0)
    (gated_branch,) = torch.autograd.grad(branch, x, gated)
    whole = "max error: z = F(x) + x (the whole block)" if preact else "max error: z = ReLU(F(x) + x)"
    return pd.Series({
        "norm: dL/dy (shortcut path)": grad_output.norm().item(),
        "norm: dL/dy dF/dx (branch path)": through_branch.norm().item(),
        "norm: dL/dx (autograd)": autograd.norm().item(),
        "max error: y = F(x) + x": (autograd - formula).abs().max().item(),
        whole: (autograd_block - (gated + gated_branch)).abs().max().item(),
    })


def block_jacobians(block: Block, x: Tensor) -> tuple[Tensor, Tensor]:
    """Full Jacobians of ``F(x) + shortcut(x)`` and of ``F(x)`` for one small input, each
    ``[x.numel(), x.numel()]`` when the shape is kept. With an identity shortcut their difference is I."""
    x = x.detach()
    flat = lambda fn: lambda v: fn(v.view_as(x)).flatten()  # noqa: E731 (jacobian wants a 1-d function)
    j_block = torch.autograd.functional.jacobian(flat(lambda v: residual_branch(block, v) + shortcut(block, v)),
                                                 x.flatten())
    j_branch = torch.autograd.functional.jacobian(flat(lambda v: residual_branch(block, v)), x.flatten())
    return j_block, j_branch


def gradient_norms(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> pd.DataFrame:
    """Norm of the loss gradient for each weight layer (convolution or linear), input to output.

    One forward and backward pass in training mode (BatchNorm uses batch statistics, as at the first step).
    The model's gradients, BatchNorm statistics and mode are left as they were. Columns: ``layer`` (1 = first),
    ``name``, ``grad_norm``, ``weight_norm`` and ``relative`` (``grad_norm / weight_norm``). A convolution
    followed by BatchNorm is scale-invariant (BN(a W x) = BN(W x) for a > 0), so its gradient scales with
    1 / ||W||: ``relative`` is the size of a gradient step measured against the weights it moves."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    saved = {name: p.grad for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
        with eval_mode(model):  # used for its exit: the model goes back to the mode it was in
            model.train()  # the pass runs in training mode (BatchNorm on batch statistics), as the first step does
            loss = loss_fn(model(images), labels)
            weights = [m.weight for _, m in layers]
            grads = torch.autograd.grad(loss, weights)
    finally:
        for name, p in model.named_parameters():
            p.grad = saved[name]
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    grad_norms = [g.norm().item() for g in grads]
    weight_norms = [w.detach().norm().item() for w in weights]
    return pd.DataFrame({
        "layer": range(1, len(layers) + 1),
        "name": [name for name, _ in layers],
        "grad_norm": grad_norms,
        "weight_norm": weight_norms,
        "relative": [g / w if w > 0 else float("nan") for g, w in zip(grad_norms, weight_norms)],
    })


__all__ = ["block_jacobians", "check_block_gradient", "gradient_norms", "residual_branch", "shortcut"]
