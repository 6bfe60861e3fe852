"""The small-map weight-gradient speed-up for the CPU, as a swap of `nn.Conv2d` that building a model applies.

oneDNN's weight-gradient kernel is slow on small output maps; there a convolution's weight gradient is one
matrix product instead, the output gradient against the input's unfolded patches. Networks are written with
plain `nn.Conv2d`; `use_patch_gradients` turns each into a `PatchGradConv2d`, which has the same parameters,
state-dict keys and forward values, and takes the matrix product only when a pass trains on the CPU over a
map of at most `SMALL_MAP` positions (elsewhere it is `nn.Conv2d`'s own forward). bench/RESULTS.md has the
timings that set `SMALL_MAP`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SMALL_MAP = 25


class PatchGradConv(torch.autograd.Function):
    """A stride-1 convolution whose weight gradient is one matrix product, the output gradient against the
    input's unfolded patches, instead of oneDNN's weight-gradient kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return F.conv2d(x, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        (pad_h, pad_w), (k_h, k_w) = ctx.padding, weight.shape[2:]
        # With the real input, not the shape alone as torch.nn.grad.conv2d_input passes: oneDNN then keeps its
        # channels-last layout.
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], list(ctx.padding), [1, 1],
                                                         False, [0, 0], 1, [True, False, False])[0]
        # Rows: output positions; columns: the (kh, kw, channel) patch, channels innermost so that the
        # unfolding copies whole channel runs of the channels-last input.
        patches = F.pad(x, (pad_w, pad_w, pad_h, pad_h)).permute(0, 2, 3, 1).unfold(1, k_h, 1).unfold(2, k_w, 1)
        patches = patches.permute(0, 1, 2, 4, 5, 3).reshape(-1, k_h * k_w * x.shape[1])
        rows = grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1])
        grad_weight = (rows.t() @ patches).view(-1, k_h, k_w, x.shape[1]).permute(0, 3, 1, 2)
        grad_bias = grad.sum((0, 2, 3)) if ctx.has_bias else None
        return grad_x, grad_weight, grad_bias, None


class PatchGradConv2d(nn.Conv2d):
    """`nn.Conv2d` whose training passes over small maps on the CPU take `PatchGradConv`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.patch_gradient(x):
            return super().forward(x)
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled("cpu"):
            # The casts autocast would make inside F.conv2d, made here so that the backward pass sees those tensors.
            dtype = torch.get_autocast_dtype("cpu")
            x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        return PatchGradConv.apply(x, weight, bias, self.padding)

    def patch_gradient(self, x: torch.Tensor) -> bool:
        """Whether this pass takes `PatchGradConv`: training on a CPU, a plain convolution, a small output map."""
        if not (self.stride == (1, 1) and self.dilation == (1, 1) and self.groups == 1
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple)):
            return False
        sizes = zip(x.shape[-2:], self.padding, self.kernel_size)
        positions = math.prod(size + 2 * pad - k + 1 for size, pad, k in sizes)
        return (x.device.type == "cpu" and torch.is_grad_enabled() and self.weight.requires_grad
                and 0 < positions <= SMALL_MAP)


def use_patch_gradients(model: nn.Module) -> nn.Module:
    """Every plain `nn.Conv2d` of `model` becomes a `PatchGradConv2d`, in place (same parameters); returns `model`."""
    for layer in model.modules():
        if type(layer) is nn.Conv2d:
            layer.__class__ = PatchGradConv2d
    return model
