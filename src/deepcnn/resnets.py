"""Residual networks for 32x32 images: the CIFAR ResNet of He et al. 2016 ("Deep Residual Learning",
section 4.2), its pre-activation form ("Identity Mappings in Deep Residual Networks") and the wide ResNet
of Zagoruyko & Komodakis 2016. Global average pooling makes them independent of the input size."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepcnn.errors import SettingsError
from deepcnn.settings import BOOLEAN, check_value, integer, is_int, number

SHORTCUTS = ("A", "B")


def blocks_per_stage(depth, extra: int, name: str, examples: str) -> int:
    """n for a network of three stages of n two-convolution blocks, depth = 6n + extra; any other depth is
    refused in one line."""
    if not is_int(depth) or depth < 6 + extra or (depth - extra) % 6:
        raise SettingsError(f"model.depth: got {depth!r}; a {name}'s depth is 6n+{extra} with n >= 1 "
                            f"({examples}, ...)")
    return (depth - extra) // 6


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class ZeroPadShortcut(nn.Module):
    """The paper's option A: the identity, subsampled by the stride, with zero channels added (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def shortcut(kind: str, in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity where the shape is kept; else option A (zero padding) or B (a 1x1 projection with BatchNorm)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if kind == "A":
        return ZeroPadShortcut(in_channels, out_channels, stride)
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, kind: str):
        super().__init__()
        self.conv1, self.norm1 = conv3x3(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
        self.conv2, self.norm2 = conv3x3(out_channels, out_channels), nn.BatchNorm2d(out_channels)
        self.shortcut = shortcut(kind, in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))
        return F.relu(y + self.shortcut(x))


class PreActBlock(nn.Module):
    """BN -> ReLU -> conv3x3 -> BN -> ReLU -> (dropout) -> conv3x3, plus the shortcut, nothing after the sum.
    A projection shortcut takes the pre-activated input, as both papers' code does."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, kind: str, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(in_channels), conv3x3(in_channels, out_channels, stride)
        self.norm2, self.conv2 = nn.BatchNorm2d(out_channels), conv3x3(out_channels, out_channels)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.shortcut = shortcut(kind, in_channels, out_channels, stride)
        self.projects = isinstance(self.shortcut, nn.Sequential)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.norm1(x))
        y = self.conv2(self.dropout(F.relu(self.norm2(self.conv1(activated)))))
        return y + self.shortcut(activated if self.projects else x)


class ResidualStages(nn.Module):
    """A 3x3 stem, three stages of `n` blocks at `widths` (stride 2 at the start of stages 2 and 3), global
    average pooling and a linear classifier; pre-activation networks end with BN and ReLU before the pooling."""

    def __init__(self, num_classes: int, n: int, stem: int, widths: tuple[int, int, int], preact: bool,
                 kind: str, dropout: float = 0.0):
        super().__init__()
        if kind not in SHORTCUTS:
            raise SettingsError(f"model.shortcut: got {kind!r}; choose A (zero padding) or B (1x1 projections)")
        self.stem = conv3x3(3, stem)
        layers, channels = [], stem
        for stage, width in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                block = PreActBlock(channels, width, stride, kind, dropout) if preact else \
                    BasicBlock(channels, width, stride, kind)
                layers.append(block)
                channels = width
        self.stages = nn.Sequential(*layers)
        # After the stem in the original form; in the pre-activation form, before the pooling.
        self.preact, self.norm = preact, nn.BatchNorm2d(channels if preact else stem)
        self.head = nn.Linear(channels, num_classes)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x if self.preact else F.relu(self.norm(x)))
        if self.preact:
            x = F.relu(self.norm(x))
        return self.head(x.mean((2, 3)))


class ResNet(ResidualStages):
    """The CIFAR ResNet: depth 6n+2 (20, 32, 44, 56, 110, ...), stages of 16, 32 and 64 channels."""

    def __init__(self, num_classes: int = 10, depth: int = 20, shortcut: str = "A", preact: bool = False):
        n = blocks_per_stage(depth, 2, "CIFAR ResNet", "20, 32, 44, 56, 110")
        check_value("model.preact", preact, *BOOLEAN)
        super().__init__(num_classes, n, 16, (16, 32, 64), preact, shortcut)


class WideResNet(ResidualStages):
    """WRN-depth-widen: pre-activation blocks at 16k, 32k and 64k channels (k = widen), depth 6n+4, dropout
    between each block's convolutions, 1x1 projections where the shape changes."""

    def __init__(self, num_classes: int = 10, depth: int = 28, widen: int = 10, dropout: float = 0.3):
        n = blocks_per_stage(depth, 4, "wide ResNet", "16, 22, 28, 40")
        check_value("model.widen", widen, *integer(1))
        check_value("model.dropout", dropout, *number(0, 1, high_open=True))
        super().__init__(num_classes, n, 16, (16 * widen, 32 * widen, 64 * widen), True, "B", dropout)
