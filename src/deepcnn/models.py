"""The networks: the recipe's LRN CNN and the deeper VGG-style stacks the recipe points to."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def local_response_norm(x: torch.Tensor, depth_radius: int = 5, bias: float = 2.0, alpha: float = 1e-3,
                        beta: float = 0.75) -> torch.Tensor:
    """TensorFlow's LRN: x / (bias + alpha * sum of x^2 over the 2r+1 channels around)^beta.

    The channel window sum is one matmul with a banded 0/1 matrix over the channel axis, which is
    the innermost axis in channels_last memory: far faster than torch's pooling-based version, and
    alpha is not divided by the window size as torch.nn.LocalResponseNorm does.
    """
    channels = x.shape[1]
    index = torch.arange(channels, device=x.device)
    band = ((index[:, None] - index[None, :]).abs() <= depth_radius).to(x.dtype)
    window_sum = torch.matmul(x.square().permute(0, 2, 3, 1), band).permute(0, 3, 1, 2)
    return x * (bias + alpha * window_sum).pow(-beta)


class LocalResponseNorm(nn.Module):
    def __init__(self, depth_radius: int = 5, bias: float = 2.0, alpha: float = 1e-3, beta: float = 0.75):
        super().__init__()
        self.depth_radius, self.bias, self.alpha, self.beta = depth_radius, bias, alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_response_norm(x, self.depth_radius, self.bias, self.alpha, self.beta)


def same_max_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-2 max-pool with TensorFlow's 'SAME' padding: for even sizes the window at the
    far edge runs one past the border, which is exactly ceil_mode with no padding."""
    return F.max_pool2d(x, 3, 2, ceil_mode=True)


def truncated_normal_init(module: nn.Module, std: float = 0.05) -> None:
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(layer.bias)


class RecipeCNN(nn.Module):
    """conv5x5(64) -> pool -> LRN -> conv5x5(64) -> pool -> LRN -> FC 384 -> FC 192 -> FC classes."""

    def __init__(self, num_classes: int = 10, crop_size: int = 24, channels: int = 64, hidden=(384, 192)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 5, padding=2)
        self.conv2 = nn.Conv2d(channels, channels, 5, padding=2)
        self.norm = LocalResponseNorm()
        side = math.ceil(math.ceil(crop_size / 2) / 2)
        sizes = [channels * side * side, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.head = nn.Linear(sizes[-1], num_classes)
        truncated_normal_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ReLU after the max-pool equals ReLU before it (both are monotone) on a quarter of the values.
        x = self.norm(F.relu(same_max_pool(self.conv1(x))))
        x = self.norm(F.relu(same_max_pool(self.conv2(x))))
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
