"""The DARTS search network (supernet): stacked cells of mixed ops, alphas for normal and
reduction cells, every conv and the classifier score-masked.

A mixed edge computes sum_o softmax(alpha_edge)_o * o(x) over the 8 primitives; pools get an
affine-free BN after them, as in DARTS. A cell has `steps` nodes, node i summing the mixed edges
from its two inputs and the nodes before it (2 + 3 + 4 + 5 = 14 edges for 4 steps), and outputs
the concatenation of its last `multiplier` nodes. Reductions sit at layers // 3 and 2 layers // 3.

The alphas are parameters of the network (so they move with `.to()` and save in the state dict)
but are kept `requires_grad=False` outside the architect step: a plain optimizer over
`requires_grad` parameters then never trains them (see `PRDartsConfig.alpha_in_weight_optimizer`).

>>> import torch
>>> net = SuperNet(channels=4, num_classes=10, layers=3, steps=2, multiplier=2)
>>> net(torch.randn(2, 3, 16, 16)).shape, tuple(net.alpha_normal.shape)
(torch.Size([2, 10]), (5, 8))
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...layers.sparse import SparseLinear
from .genotype import Genotype, derive_genotype
from .ops import OPS, PRIMITIVES, FactorizedReduce, ReLUConvBN, sparse_conv


class MixedOp(nn.Module):
    def __init__(self, channels: int, stride: int, density: float):
        super().__init__()
        ops = []
        for name in PRIMITIVES:
            op = OPS[name](channels, stride, False, density)
            if "pool" in name:
                op = nn.Sequential(op, nn.BatchNorm2d(channels, affine=False))
            ops.append(op)
        self.ops = nn.ModuleList(ops)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class SearchCell(nn.Module):
    def __init__(self, steps: int, multiplier: int, c_pp: int, c_p: int, c: int, reduction: bool,
                 reduction_prev: bool, density: float):
        super().__init__()
        self.reduction, self.steps, self.multiplier = reduction, steps, multiplier
        self.preprocess0 = (FactorizedReduce(c_pp, c, False, density) if reduction_prev
                            else ReLUConvBN(c_pp, c, 1, 1, 0, False, density))
        self.preprocess1 = ReLUConvBN(c_p, c, 1, 1, 0, False, density)
        self.edges = nn.ModuleList(MixedOp(c, 2 if reduction and j < 2 else 1, density)
                                   for i in range(steps) for j in range(2 + i))

    def forward(self, s0: Tensor, s1: Tensor, weights: Tensor) -> Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.steps):
            states.append(sum(self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states)))
            offset += len(states) - 1
        return torch.cat(states[-self.multiplier:], dim=1)  # (N, multiplier * C, H, W)


def reduction_layers(layers: int) -> tuple[int, ...]:
    return tuple(sorted({layers // 3, 2 * layers // 3}))


class SuperNet(nn.Module):
    """DARTS's search network with sparse convs; `density` is every sparse layer's kept share."""

    def __init__(self, channels: int = 16, num_classes: int = 10, layers: int = 8, steps: int = 4,
                 multiplier: int = 4, stem_multiplier: int = 3, in_channels: int = 3, density: float = 1.0,
                 alpha_init_std: float = 1e-3):
        super().__init__()
        self.steps, self.multiplier = steps, multiplier
        c_curr = stem_multiplier * channels
        self.stem = nn.Sequential(sparse_conv(in_channels, c_curr, 3, padding=1, density=density),
                                  nn.BatchNorm2d(c_curr))
        c_pp, c_p, c_curr = c_curr, c_curr, channels
        cells, reduction_prev = [], False
        for i in range(layers):
            reduction = i in reduction_layers(layers)
            c_curr = c_curr * 2 if reduction else c_curr
            cells.append(SearchCell(steps, multiplier, c_pp, c_p, c_curr, reduction, reduction_prev, density))
            reduction_prev = reduction
            c_pp, c_p = c_p, multiplier * c_curr
        self.cells = nn.ModuleList(cells)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = SparseLinear(c_p, num_classes, density=density)
        edges = sum(2 + i for i in range(steps))
        self.alpha_normal = nn.Parameter(alpha_init_std * torch.randn(edges, len(PRIMITIVES)), requires_grad=False)
        self.alpha_reduce = nn.Parameter(alpha_init_std * torch.randn(edges, len(PRIMITIVES)), requires_grad=False)

    def alphas(self) -> list[nn.Parameter]:
        return [self.alpha_normal, self.alpha_reduce]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter except the alphas."""
        ids = {id(a) for a in self.alphas()}
        return [p for p in self.parameters() if id(p) not in ids]

    def forward(self, x: Tensor) -> Tensor:
        s0 = s1 = self.stem(x)
        w_normal, w_reduce = self.alpha_normal.softmax(-1), self.alpha_reduce.softmax(-1)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, w_reduce if cell.reduction else w_normal)
        return self.classifier(self.global_pooling(s1).flatten(1))

    def genotype(self) -> Genotype:
        return derive_genotype(self.alpha_normal, self.alpha_reduce, self.steps, self.multiplier)
