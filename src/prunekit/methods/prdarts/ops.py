"""The 8 DARTS primitives, every convolution a score-masked `SparseConv2d`.

Ops follow DARTS's CNN operations: ReLU -> conv -> BN blocks, separable convs as two
(depthwise, pointwise) stacks, dilated convs as one, and FactorizedReduce (two offset 1x1 convs
with stride 2, concatenated) for a strided skip. `affine=False` BNs in the search network, as
DARTS does (a learned BN scale would let an op's weight hide inside BN instead of alpha).

>>> import torch
>>> op = OPS["sep_conv_3x3"](8, 2, False, 0.5)
>>> op(torch.randn(2, 8, 8, 8)).shape
torch.Size([2, 8, 4, 4])
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ...layers.sparse import SparseConv2d

PRIMITIVES = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
              "dil_conv_3x3", "dil_conv_5x5")
PARAMETER_FREE = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect")


def sparse_conv(c_in: int, c_out: int, k: int, stride: int = 1, padding: int = 0, dilation: int = 1,
                groups: int = 1, density: float = 1.0) -> SparseConv2d:
    return SparseConv2d(c_in, c_out, k, stride, padding, dilation, groups, bias=False, density=density)


class ReLUConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, k: int, stride: int, padding: int, affine: bool, density: float):
        super().__init__(nn.ReLU(inplace=False), sparse_conv(c_in, c_out, k, stride, padding, density=density),
                         nn.BatchNorm2d(c_out, affine=affine))


class DilConv(nn.Sequential):
    """ReLU, depthwise k x k (dilated), pointwise 1x1, BN."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, padding: int, dilation: int, affine: bool,
                 density: float):
        super().__init__(nn.ReLU(inplace=False),
                         sparse_conv(c_in, c_in, k, stride, padding, dilation, groups=c_in, density=density),
                         sparse_conv(c_in, c_out, 1, density=density), nn.BatchNorm2d(c_out, affine=affine))


class SepConv(nn.Sequential):
    """Two DilConv(dilation 1) stacks; only the first is strided."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int, padding: int, affine: bool, density: float):
        super().__init__(DilConv(c_in, c_in, k, stride, padding, 1, affine, density),
                         DilConv(c_in, c_out, k, 1, padding, 1, affine, density))


class Identity(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


class Zero(nn.Module):
    """The `none` op: zeros of the (strided) output shape."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve H, W: two 1x1 stride-2 convs, the second on the input shifted by one pixel, concatenated."""

    def __init__(self, c_in: int, c_out: int, affine: bool, density: float):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = sparse_conv(c_in, c_out // 2, 1, 2, density=density)
        self.conv_2 = sparse_conv(c_in, c_out - c_out // 2, 1, 2, density=density)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(x)
        # (N, C, H, W) -> two (N, C/2, H/2, W/2) halves; odd sizes pad the shifted half
        shifted = nn.functional.pad(x[:, :, 1:, 1:], (0, x.shape[3] % 2, 0, x.shape[2] % 2))
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


OpFactory = Callable[[int, int, bool, float], nn.Module]  # (channels, stride, affine, density) -> op
OPS: dict[str, OpFactory] = {
    "none": lambda c, s, affine, d: Zero(s),
    "avg_pool_3x3": lambda c, s, affine, d: nn.AvgPool2d(3, stride=s, padding=1, count_include_pad=False),
    "max_pool_3x3": lambda c, s, affine, d: nn.MaxPool2d(3, stride=s, padding=1),
    "skip_connect": lambda c, s, affine, d: Identity() if s == 1 else FactorizedReduce(c, c, affine, d),
    "sep_conv_3x3": lambda c, s, affine, d: SepConv(c, c, 3, s, 1, affine, d),
    "sep_conv_5x5": lambda c, s, affine, d: SepConv(c, c, 5, s, 2, affine, d),
    "dil_conv_3x3": lambda c, s, affine, d: DilConv(c, c, 3, s, 2, 2, affine, d),
    "dil_conv_5x5": lambda c, s, affine, d: DilConv(c, c, 5, s, 4, 2, affine, d),
}
