"""MobileNetV2 (Sandler et al. 2018) adapted to 32x32 inputs.

Inverted residual blocks: 1x1 expand (t x) -> 3x3 depthwise -> 1x1 linear projection, with a
residual add when the block keeps both resolution and width. For CIFAR the stem conv and the
first two stride-2 stages (24 and 32 channels) use stride 1, so the resolution goes
32 -> 16 (64-ch stage) -> 8 (160-ch stage) and the 1280-ch head sees 8x8 maps (the ImageNet
stride schedule, total stride 32, would leave 1x1 maps of a 32x32 input).

>>> m = create_mobilenetv2_cifar(num_classes=10)
>>> m(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.errors import ConfigError
from .registry import MODELS, ModelSpec

# (expansion t, output channels c, blocks n, stride of the first block s). The ImageNet
# strides of the 24- and 32-channel stages are 2; they are 1 here (see module docstring).
STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 1), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled width to a multiple of `divisor`, never dropping more than 10 %."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn_relu6(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """conv (no bias) -> BN -> ReLU6, padded to keep the size at stride 1."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """expand 1x1 (skipped when t == 1) -> depthwise 3x3 -> project 1x1 + BN, optional residual."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        self.use_residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn_relu6(c_in, hidden, 1))
        layers += [
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2 for 32x32 inputs; `width_mult` scales every width (rounded to multiples of 8)."""

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.0, in_channels: int = 3):
        super().__init__()
        if not 0 < width_mult <= 4:
            raise ConfigError(f"width_mult={width_mult!r} is out of range; use a value in (0, 4]")
        if not 0 <= dropout < 1:
            raise ConfigError(f"dropout={dropout!r} is out of range; use a value in [0, 1)")
        c_in = make_divisible(STEM_CHANNELS * width_mult)
        layers: list[nn.Module] = [conv_bn_relu6(in_channels, c_in, 3, 1)]
        for expansion, channels, blocks, stride in STAGES:
            c_out = make_divisible(channels * width_mult)
            for i in range(blocks):
                layers.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expansion))
                c_in = c_out
        head = make_divisible(HEAD_CHANNELS * max(1.0, width_mult))
        layers.append(conv_bn_relu6(c_in, head, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(head, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 1280, 8, 8) for a 32x32 input at width 1.0
        return self.classifier(self.dropout(self.flatten(self.avgpool(x))))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def create_mobilenetv2_cifar(num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.0, in_channels: int = 3) -> MobileNetV2Cifar:
    """Build MobileNetV2 for CIFAR-sized inputs."""
    return MobileNetV2Cifar(num_classes, width_mult, dropout, in_channels)


MODELS.register(
    "mobilenetv2_cifar",
    ModelSpec(create_mobilenetv2_cifar, (3, 32, 32), 10, "MobileNetV2 (width 1.0) with strides adapted to 32x32"),
)
