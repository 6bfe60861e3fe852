"""The networks: the recipe's LRN CNN, the deeper VGG-style stacks the recipe points to, and the fast network.
Residual networks are in resnets.py."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def channel_band(channels: int, depth_radius: int, like: torch.Tensor) -> torch.Tensor:
    """The 0/1 matrix that sums each channel's window of 2r+1 neighbours (symmetric)."""
    index = torch.arange(channels, device=like.device)
    return ((index[:, None] - index[None, :]).abs() <= depth_radius).to(like.dtype)


def power(d: torch.Tensor, exponent: float) -> torch.Tensor:
    """d ** exponent; the recipe's -0.75 as rsqrt(d) * sqrt(rsqrt(d)), which is 3-4x faster than pow on the CPU."""
    if exponent == -0.75:
        inverse_root = d.rsqrt()
        return inverse_root.sqrt().mul_(inverse_root)
    return d.pow(exponent)


class _LocalResponseNorm(torch.autograd.Function):
    """y = x * d^-beta, d = bias + alpha * band(x^2), with a hand-written backward:
    dx = g * d^-beta - 2 * alpha * beta * x * band(g * x * d^-beta / d). It saves half the
    kernels of autograd's version of the same formula, which matters at a few ms a step.

    Autocast is off in both directions: in bf16 the matmul would round d, which sits near 2 where
    bf16's spacing is 1/64, and lose most of its data-dependent term.
    """

    @staticmethod
    def forward(ctx, x, depth_radius, bias, alpha, beta):
        with torch.autocast(x.device.type, enabled=False):
            band = channel_band(x.shape[1], depth_radius, x)
            x_last = x.permute(0, 2, 3, 1)  # channels innermost: a plain view in channels_last memory
            # alpha scales the 64x64 band rather than the activations: one pass fewer over them.
            d = torch.matmul(x_last * x_last, band * alpha).add_(bias)
            scale = power(d, -beta)
            y = x_last * scale
        ctx.save_for_backward(x_last, d, scale, band)
        ctx.alpha_beta = alpha * beta
        return y.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad):
        x_last, d, scale, band = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            # After the flatten, the gradient arrives in NCHW order; a batched matmul over a strided view
            # would copy the band matrix once per row, far more than copying the gradient once.
            g_scaled = grad.permute(0, 2, 3, 1).contiguous() * scale
            window = torch.matmul((g_scaled * x_last).div_(d), band)
            dx = g_scaled.addcmul_(x_last, window, value=-2 * ctx.alpha_beta)
        return dx.permute(0, 3, 1, 2), None, None, None, None


def local_response_norm(x: torch.Tensor, depth_radius: int = 5, bias: float = 2.0, alpha: float = 1e-3,
                        beta: float = 0.75) -> torch.Tensor:
    """TensorFlow's LRN: x / (bias + alpha * sum of x^2 over the 2r+1 channels around)^beta.

    The channel window sum is one matmul with a banded 0/1 matrix over the channel axis, which is
    the innermost axis in channels_last memory: far faster than torch's pooling-based version, and
    alpha is not divided by the window size as torch.nn.LocalResponseNorm does. Inputs narrower
    than float32 (bf16 under autocast) are computed and returned in float32.
    """
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return _LocalResponseNorm.apply(x, depth_radius, bias, alpha, beta)


class LocalResponseNorm(nn.Module):
    def __init__(self, depth_radius: int = 5, bias: float = 2.0, alpha: float = 1e-3, beta: float = 0.75):
        super().__init__()
        self.depth_radius, self.bias, self.alpha, self.beta = depth_radius, bias, alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_response_norm(x, self.depth_radius, self.bias, self.alpha, self.beta)


def same_max_pool(x: torch.Tensor, side: int) -> torch.Tensor:
    """3x3 stride-2 max-pool with TensorFlow's 'SAME' padding of square inputs `side` pixels wide:
    ceil(side / 2) outputs a side.

    TF pads an even side by 0 before and 1 after, which is ceil_mode with no padding; an odd side
    by 1 on each side, which is padding=1 (ceil_mode then changes nothing). torch pads with -inf,
    as TF's padding never wins the max. The side is given, not read from x, so that the padding is
    a constant when the network is traced for ONNX export.
    """
    return F.max_pool2d(x, 3, 2, padding=side % 2, ceil_mode=True)


def truncated_normal_init(module: nn.Module, std: float = 0.05) -> None:
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(layer.bias)


class RecipeCNN(nn.Module):
    """conv5x5(64) -> pool -> LRN -> conv5x5(64) -> pool -> LRN -> FC 384 -> FC 192 -> FC classes,
    for square inputs `input_size` pixels wide."""

    def __init__(self, num_classes: int = 10, input_size: int = 24, channels: int = 64, hidden=(384, 192)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 5, padding=2)
        self.conv2 = nn.Conv2d(channels, channels, 5, padding=2)
        self.norm = LocalResponseNorm()
        self.pool_sides = (input_size, math.ceil(input_size / 2))
        side = math.ceil(self.pool_sides[1] / 2)
        sizes = [channels * side * side, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.head = nn.Linear(sizes[-1], num_classes)
        truncated_normal_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ReLU after the max-pool equals ReLU before it (both are monotone) on a quarter of the values.
        x = self.norm(F.relu(same_max_pool(self.conv1(x), self.pool_sides[0])))
        x = self.norm(F.relu(same_max_pool(self.conv2(x), self.pool_sides[1])))
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.head(x)


class DeepCNN(nn.Module):
    """Blocks of (conv3x3 + BatchNorm + ReLU) x convs_per_block, each block ending in a 2x2 max-pool,
    then global max-pool and a linear classifier."""

    def __init__(self, num_classes: int = 10, widths=(64, 128, 256), convs_per_block: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            for _ in range(convs_per_block):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.amax(self.features(x), dim=(2, 3)))


def whitening_width(channels: int = 3, size: int = 2) -> int:
    """How many filters `whitening_filters` gives: an eigenvector of the channels x size x size patch
    covariance each, and its negative."""
    return 2 * channels * size * size


def whitening_filters(images: torch.Tensor, size: int = 2, eps: float = 5e-4) -> torch.Tensor:
    """Conv filters that whiten size x size patches of `images` (N, C, H, W, float), with their negatives.

    Each eigenvector v of the patch covariance, scaled by 1/sqrt(eigenvalue + eps), is a filter whose
    output has unit variance and no correlation with the others; the negated copies let a following
    GELU keep both signs.
    """
    c = images.shape[1]
    patches = images.unfold(2, size, 1).unfold(3, size, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * size * size)
    patches = patches.double()
    patches = patches - patches.mean(dim=0)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).flip(0)
    filters = filters.reshape(-1, c, size, size).float()
    return torch.cat([filters, -filters])


class ConvGroup(nn.Module):
    """conv3x3 -> max-pool 2 -> BatchNorm -> GELU -> conv3x3 -> BatchNorm -> GELU."""

    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(out_channels, momentum=bn_momentum, eps=1e-12)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels, momentum=bn_momentum, eps=1e-12)
        for conv in (self.conv1, self.conv2):
            # Identity start: the first in_channels filters pass their input through unchanged.
            nn.init.dirac_(conv.weight.data[: conv.in_channels])
        for norm in (self.norm1, self.norm2):
            norm.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class FastCNN(nn.Module):
    """The fast-training network: a frozen 2x2 whitening conv, three conv groups, a scaled linear head.

    Built on the published fast CIFAR-10 training techniques (airbench, arXiv 2404.00498): the
    whitening weights come from the training data (`init_whitening`), the convs start as identities,
    and BatchNorm has fixed scales and fast-moving statistics.
    """

    def __init__(self, num_classes: int = 10, widths=(64, 256, 256), whiten_width: int = whitening_width(),
                 bn_momentum: float = 0.4, head_scale: float = 1 / 9):
        super().__init__()
        self.whiten = nn.Conv2d(3, whiten_width, 2)
        self.whiten.weight.requires_grad_(False)
        sizes = [whiten_width, *widths]
        self.groups = nn.Sequential(*(ConvGroup(a, b, bn_momentum) for a, b in zip(sizes, sizes[1:])))
        self.head = nn.Linear(sizes[-1], num_classes, bias=False)
        self.head_scale = head_scale

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor) -> None:
        filters = whitening_filters(images, self.whiten.kernel_size[0])
        self.whiten.weight.copy_(filters[: self.whiten.out_channels])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(F.gelu(self.whiten(x)))
        return self.head(torch.amax(x, dim=(2, 3))) * self.head_scale
