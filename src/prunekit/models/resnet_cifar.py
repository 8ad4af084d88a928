"""CIFAR ResNets (He et al. 2016, section 4.2): ResNet-20/32/44/56/110.

A 3x3 stem conv (3->16), then three stages of n BasicBlocks with widths 16/32/64 at 32x32,
16x16 and 8x8 (depth = 6n + 2), global average pooling and one Linear layer. Where a stage
halves the resolution and doubles the width, the shortcut is either

- "projection" (default): 1x1 conv with stride 2 + BatchNorm, 2 * (c_in*c_out + c_out) params;
- "zeropad" ("option A" of the paper): take every second pixel and pad the new channels with
  zeros; no parameters, so ResNet-56 has 853,018 params instead of 855,770.

>>> m = create_resnet_cifar(56, num_classes=10)
>>> sum(p.numel() for p in m.parameters())
855770
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from .registry import MODELS, ModelSpec

DEPTHS = (20, 32, 44, 56, 110)
SHORTCUTS = ("projection", "zeropad")
STAGE_WIDTHS = (16, 32, 64)


class ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut: subsample by `stride`, zero-pad channels c_in -> c_out.

    The new channels are split evenly before and after the old ones, so channel k of the input
    lands at channel k + (c_out - c_in) // 2 of the output.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ConfigError(f"zero-pad shortcut cannot shrink channels ({in_channels} -> {out_channels})")
        self.stride = stride
        self.pad_before = (out_channels - in_channels) // 2
        self.pad_after = out_channels - in_channels - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (N, c_in, H/s, W/s)
        # F.pad lists dims last-first: (W left, W right, H top, H bottom, C before, C after).
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            if shortcut == "projection":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                    nn.BatchNorm2d(out_channels),
                )
            else:
                self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """A CIFAR ResNet of depth 6n+2; see the module docstring."""

    def __init__(self, depth: int = 56, num_classes: int = 10, shortcut: str = "projection", in_channels: int = 3):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"ResNet depth {depth!r} is not 6n+2 with n >= 1; the usual ones are {DEPTHS}")
        if shortcut not in SHORTCUTS:
            raise ConfigError(f"shortcut={shortcut!r} is not allowed; choose one of: {', '.join(SHORTCUTS)}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, STAGE_WIDTHS[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        self.relu = nn.ReLU()
        stages = []
        width_in = STAGE_WIDTHS[0]
        for i, width in enumerate(STAGE_WIDTHS):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(width_in, width, stride, shortcut))
                width_in = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(STAGE_WIDTHS[-1], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (N, 16, 32, 32)
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 64, 8, 8)
        return self.fc(self.flatten(self.avgpool(x)))  # (N, num_classes)


def _init_weights(model: nn.Module) -> None:
    # He init keeps activation variance steady through ReLU stacks; BN starts as identity.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def create_resnet_cifar(depth: int, num_classes: int = 10, shortcut: str = "projection", in_channels: int = 3) -> ResNetCifar:
    """Build a CIFAR ResNet; `shortcut` is "projection" or "zeropad"."""
    return ResNetCifar(depth, num_classes, shortcut, in_channels)


def _builder(depth: int):
    def build(num_classes: int = 10, shortcut: str = "projection", in_channels: int = 3) -> ResNetCifar:
        return ResNetCifar(depth, num_classes, shortcut, in_channels)

    return build


for _depth in DEPTHS:
    MODELS.register(
        f"resnet{_depth}",
        ModelSpec(_builder(_depth), (3, 32, 32), 10, f"CIFAR ResNet-{_depth} (BasicBlock, widths 16/32/64)"),
    )
