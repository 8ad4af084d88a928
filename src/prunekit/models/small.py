"""Small models: LeNet-5 and the CNN that `prunekit run` trains on scikit-learn digits.

LeNet-5 (LeCun et al. 1998, with ReLU and max-pooling): conv5x5(6)-pool-conv5x5(16)-pool-
fc120-fc84-fc, no padding, so the flattened size is 16 * s * s with s = ((H - 4) // 2 - 4) // 2:
4 for 1x28x28 inputs (256 features), 5 for 3x32x32 inputs (400 features).

`SmallCNN` is sized for 1x8x8 digits: two conv3x3-BN-ReLU layers at 8x8, a 2x2 max-pool, then
a conv3x3-BN-ReLU whose output is added to its input (so the graph has a residual coupling to
prune around), global average pooling and Linear(64, classes).

>>> create_lenet5(in_channels=3, input_size=32).fc1.in_features
400
>>> SmallCNN()(torch.zeros(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.errors import ConfigError
from .registry import MODELS, ModelSpec


class LeNet5(nn.Module):
    """LeNet-5 for square `input_size` x `input_size` images with `in_channels` channels."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28):
        super().__init__()
        side = ((input_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ConfigError(f"LeNet-5 needs input_size >= 16 (two 5x5 convs and two pools), got {input_size}")
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))  # (N, 6, (H-4)/2, (W-4)/2)
        x = self.pool2(self.relu2(self.conv2(x)))  # (N, 16, side, side)
        x = self.relu4(self.fc2(self.relu3(self.fc1(self.flatten(x)))))
        return self.fc(x)


class SmallCNN(nn.Module):
    """The demo CNN for 8x8 digits; see the module docstring. About 57k parameters."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.relu3 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))  # (N, 32, 8, 8)
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))  # (N, 64, 4, 4)
        # The residual add ties conv2's and conv3's output channels into one prunable group.
        x = x + self.relu3(self.bn3(self.conv3(x)))  # (N, 64, 4, 4)
        return self.fc(self.flatten(self.avgpool(x)))


def create_lenet5(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> LeNet5:
    """Build LeNet-5 for 1x28x28 (default) or e.g. 3x32x32 inputs."""
    return LeNet5(num_classes, in_channels, input_size)


def create_small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> SmallCNN:
    """Build the small digits CNN (1x8x8 inputs by default)."""
    return SmallCNN(num_classes, in_channels, width)


MODELS.register("lenet5", ModelSpec(create_lenet5, (1, 28, 28), 10, "LeNet-5 (ReLU, max-pool) for 28x28 or 32x32"))
MODELS.register("small_cnn", ModelSpec(create_small_cnn, (1, 8, 8), 10, "small residual CNN for 8x8 digits"))
