"""The evaluation network: DARTS's stacked cells built from a genotype, with sparse convs.

Per cell: preprocess the two inputs (FactorizedReduce after a reduction), then for each node
apply its two ops to its two inputs and add them; drop path (during training, with probability
`drop_path_prob`, zeroing a whole sample's op output and scaling survivors by 1 / keep) acts on
every op except identity. The auxiliary head (DARTS CIFAR: ReLU, 5x5 avg-pool stride 3 to 2x2,
1x1 conv to 128, 2x2 conv to 768, linear) reads the cell at 2 layers // 3 and leaves its logits
in `aux_logits` during training; `forward` returns the main logits only, so the engine's loop
and evaluation work unchanged (`EvalTrainingHook` adds the auxiliary loss).

All convs and the classifiers are `SparseConv2d`/`SparseLinear` at `density` (trained with
`set_density_` and hardened, or fixed masks). The genotype rides along as JSON in the plan meta
(`GENOTYPE_META`): `build_from_meta` rebuilds the architecture from it, strictly validated.

>>> import torch
>>> from prunekit.methods.prdarts.genotype import DARTS_V2
>>> net = EvalNetwork(DARTS_V2, channels=4, num_classes=10, layers=3, auxiliary=True)
>>> _ = net.train(); net(torch.randn(2, 3, 32, 32)).shape, net.aux_logits.shape
(torch.Size([2, 10]), torch.Size([2, 10]))
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...core.errors import CheckpointError, ConfigError
from ...layers.sparse import SparseLinear
from .genotype import Genotype
from .ops import OPS, FactorizedReduce, Identity, ReLUConvBN, sparse_conv
from .supernet import reduction_layers

GENOTYPE_META = "prdarts_network"  # plan.meta key: {"genotype", "channels", "layers", ...}


def drop_path(x: Tensor, prob: float) -> Tensor:
    """Zero whole samples with probability `prob`, scale the rest by 1 / (1 - prob)."""
    keep = 1.0 - prob
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x / keep * mask


class EvalCell(nn.Module):
    def __init__(self, genotype: Genotype, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool,
                 density: float):
        super().__init__()
        self.preprocess0 = (FactorizedReduce(c_pp, c, True, density) if reduction_prev
                            else ReLUConvBN(c_pp, c, 1, 1, 0, True, density))
        self.preprocess1 = ReLUConvBN(c_p, c, 1, 1, 0, True, density)
        gene, concat = (genotype.reduce, genotype.reduce_concat) if reduction else (genotype.normal, genotype.normal_concat)
        self.reduction, self.concat, self.indices = reduction, list(concat), [j for _, j in gene]
        self.ops = nn.ModuleList(OPS[name](c, 2 if reduction and j < 2 else 1, True, density) for name, j in gene)
        self.multiplier = len(concat)

    def forward(self, s0: Tensor, s1: Tensor, drop_prob: float) -> Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(len(self.ops) // 2):
            outs = []
            for k in (2 * i, 2 * i + 1):
                h = self.ops[k](states[self.indices[k]])
                if self.training and drop_prob > 0 and not isinstance(self.ops[k], Identity):
                    h = drop_path(h, drop_prob)
                outs.append(h)
            states.append(outs[0] + outs[1])
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """DARTS's CIFAR auxiliary classifier for an 8x8 input."""

    def __init__(self, channels: int, num_classes: int, density: float):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False), nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),
            sparse_conv(channels, 128, 1, density=density), nn.BatchNorm2d(128), nn.ReLU(inplace=False),
            sparse_conv(128, 768, 2, density=density), nn.BatchNorm2d(768), nn.ReLU(inplace=False),
            nn.AdaptiveAvgPool2d(1))
        self.classifier = SparseLinear(768, num_classes, density=density)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class EvalNetwork(nn.Module):
    def __init__(self, genotype: Genotype, channels: int = 36, num_classes: int = 10, layers: int = 20,
                 auxiliary: bool = False, in_channels: int = 3, density: float = 1.0, stem_multiplier: int = 3):
        super().__init__()
        self.genotype, self.drop_path_prob, self.aux_logits = genotype, 0.0, None
        self.spec = {"genotype": genotype.to_dict(), "channels": channels, "num_classes": num_classes,
                     "layers": layers, "auxiliary": auxiliary, "in_channels": in_channels,
                     "stem_multiplier": stem_multiplier}
        c_curr = stem_multiplier * channels
        self.stem = nn.Sequential(sparse_conv(in_channels, c_curr, 3, padding=1, density=density), nn.BatchNorm2d(c_curr))
        c_pp, c_p, c_curr = c_curr, c_curr, channels
        cells, reduction_prev, self.aux_after = [], False, 2 * layers // 3
        c_aux = c_p
        for i in range(layers):
            reduction = i in reduction_layers(layers)
            c_curr = c_curr * 2 if reduction else c_curr
            cell = EvalCell(genotype, c_pp, c_p, c_curr, reduction, reduction_prev, density)
            cells.append(cell)
            reduction_prev = reduction
            c_pp, c_p = c_p, cell.multiplier * c_curr
            if i == self.aux_after:
                c_aux = c_p
        self.cells = nn.ModuleList(cells)
        self.auxiliary_head = AuxiliaryHead(c_aux, num_classes, density) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = SparseLinear(c_p, num_classes, density=density)

    def forward(self, x: Tensor) -> Tensor:
        self.aux_logits = None
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_after and self.auxiliary_head is not None and self.training:
                if min(s1.shape[-2:]) < 8:  # its 5x5 pool (stride 3) and 2x2 conv need 8x8 maps
                    raise ConfigError(
                        f"the auxiliary head needs feature maps of at least 8x8 after cell {i} (32x32 inputs, as "
                        f"CIFAR's); inputs of {tuple(x.shape[-2:])} give {tuple(s1.shape[-2:])} there: build the "
                        "network with auxiliary=False (evaluate.auxiliary=false in a search recipe) for smaller images")
                self.aux_logits = self.auxiliary_head(s1)
        return self.classifier(self.global_pooling(s1).flatten(1))


def build_from_meta(meta: Any) -> EvalNetwork:
    """A fresh (dense, untrained) EvalNetwork from plan.meta[GENOTYPE_META], strictly validated
    (files written without `stem_multiplier` have DARTS's 3)."""
    keys = {"genotype", "channels", "num_classes", "layers", "auxiliary", "in_channels"}
    if not isinstance(meta, dict) or set(meta) not in (keys, keys | {"stem_multiplier"}):
        raise CheckpointError(f"{GENOTYPE_META} must hold exactly genotype, channels, num_classes, layers, "
                              "auxiliary, in_channels (and stem_multiplier)")
    meta = {"stem_multiplier": 3, **meta}
    for key in ("channels", "num_classes", "layers", "in_channels", "stem_multiplier"):
        if isinstance(meta[key], bool) or not isinstance(meta[key], int) or not 1 <= meta[key] <= 4096:
            raise CheckpointError(f"{GENOTYPE_META}.{key}={meta[key]!r} must be an integer in [1, 4096]")
    if not isinstance(meta["auxiliary"], bool):
        raise CheckpointError(f"{GENOTYPE_META}.auxiliary must be true or false")
    return EvalNetwork(Genotype.from_dict(meta["genotype"]), meta["channels"], meta["num_classes"], meta["layers"],
                       meta["auxiliary"], meta["in_channels"], stem_multiplier=meta["stem_multiplier"])
