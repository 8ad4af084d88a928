"""CIFAR VGG-11/13/16/19 with BatchNorm (Simonyan & Zisserman 2015, configs A/B/D/E).

`features` is a stack of conv3x3-BN-ReLU layers with five 2x2 max-pools, so a 32x32 input
leaves it as (N, 512, 1, 1); `classifier` is one Linear(512, num_classes) after flattening,
the usual CIFAR variant of the network.

>>> m = create_vgg_cifar("vgg16", num_classes=10)
>>> m(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.errors import ConfigError
from .registry import MODELS, ModelSpec

POOL = "M"
# Output channels of each conv in order; "M" is a 2x2 max-pool with stride 2.
CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    "vgg13": (64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    "vgg16": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL),
    "vgg19": (
        64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL,
        512, 512, 512, 512, POOL, 512, 512, 512, 512, POOL,
    ),
}


class VGGCifar(nn.Module):
    """VGG with BatchNorm for 32x32 inputs; `cfg` is one of the `CONFIGS` tuples."""

    def __init__(self, cfg: tuple[int | str, ...], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == POOL:
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 512, 1, 1) for a 32x32 input
        return self.classifier(self.flatten(x))


def create_vgg_cifar(variant: str, num_classes: int = 10, in_channels: int = 3) -> VGGCifar:
    """Build "vgg11", "vgg13", "vgg16" or "vgg19" (always with BatchNorm)."""
    if variant not in CONFIGS:
        raise ConfigError(f"VGG variant {variant!r} is unknown; choose one of: {', '.join(CONFIGS)}")
    return VGGCifar(CONFIGS[variant], num_classes, in_channels)


def _builder(variant: str):
    def build(num_classes: int = 10, in_channels: int = 3) -> VGGCifar:
        return VGGCifar(CONFIGS[variant], num_classes, in_channels)

    return build


for _variant, _cfg in CONFIGS.items():
    _convs = sum(1 for c in _cfg if c != POOL)
    MODELS.register(
        f"{_variant}_bn",
        ModelSpec(_builder(_variant), (3, 32, 32), 10, f"CIFAR VGG-{_variant[3:]} with BatchNorm ({_convs} convs, one Linear)"),
    )
