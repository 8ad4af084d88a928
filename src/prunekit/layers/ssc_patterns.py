"""Supports of structured sparse convolutions (SSC): which taps of a k x k filter bank are real.

An `SSCSpec` (the *preset*) fixes the support; `SSCLayout` turns it into index tables for one
layer shape. Tap patterns (which of the k x k positions a spatial channel uses) come from the
`SUPPORTS` registry, so a new pattern is one registered function.

The channel rule (local indices inside one of the G channel groups: input c in [0, C/G),
filter o in [0, O/G); P_s = spatial_period, P_p = point_period):

- filter o has k x k taps on input c  iff  (c - o) mod P_s == 0          (HetConv's shift)
- the residue classes {c : c mod P_s == r} are bundled into P_p *blocks* of P_s / P_p
  consecutive classes (block of class r: r // (P_s / P_p)); filter o has a 1 x 1 (centre) tap on
  every channel of its own block that is not one of its k x k channels.

So each filter sees a 1/P_p share of its group's channels: 1/P_s of the group with k x k taps,
the rest of its block with 1 x 1 taps. With P_p = 1 the block is the whole group and this is
HetConv exactly ("1 x 1 on all the rest"); with P_p = P_s the block is the filter's own class and
there are no 1 x 1 taps. Blocks (rather than an arbitrary 1/P_p of the rest) are what lets both
parts run as grouped convolutions over *one* channel permutation without copying any channel.
`spatial_period=None` means no k x k taps at all (pointwise; then point_period must be 1).

Worked example: C = O = 8, k = 3, G = 1, P_s = 4, P_p = 2. Classes: {0,4} {1,5} {2,6} {3,7};
blocks: {0,4,1,5} and {2,6,3,7}. Filter 1 (class 1, block 0): 3x3 taps on channels 1 and 5,
1x1 taps on 0 and 4. Real weights per filter = 2*9 + 2 = 20 of a dense 8*9 = 72.
Permuting the inputs class by class, [0,4, 1,5, 2,6, 3,7], makes every filter's 3x3 inputs a
contiguous pair (a grouped conv with 4 groups, weight (8, 2, 3, 3)) and its block a contiguous
quadruple (a grouped 1x1 conv with 2 groups, weight (8, 4, 1, 1)).

>>> lay = SSCLayout(8, 8, 3, SSCSpec(groups=1, spatial_period=4, point_period=2))
>>> lay.perm_in.tolist(), lay.real_taps_per_filter()[0].item()
([0, 4, 1, 5, 2, 6, 3, 7], 20)
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

from ..core.config import Config, check_choice
from ..core.errors import ConfigError
from ..core.registry import Registry

# A support generator: (k, j) -> bool (k, k) tap mask of a spatial channel, where j counts the
# filters of one residue class (filter o = r + P_s * j): alternate j can use complementary taps.
SUPPORTS: Registry[Callable[[int, int], np.ndarray]] = Registry("SSC tap pattern")


@SUPPORTS.register("full")
def full_taps(k: int, j: int) -> np.ndarray:
    return np.ones((k, k), dtype=bool)


@SUPPORTS.register("cross")
def cross_taps(k: int, j: int) -> np.ndarray:
    """Middle row and middle column (3x3: the centre and its 4 neighbours, 5 taps)."""
    m = np.zeros((k, k), dtype=bool)
    m[k // 2, :] = True
    m[:, k // 2] = True
    return m


@SUPPORTS.register("checker")
def checker_taps(k: int, j: int) -> np.ndarray:
    """Taps with (row + col) even for even j (3x3: corners + centre, 5), odd for odd j (the 4
    edges): two filters of a class together cover the whole window."""
    a, b = np.indices((k, k))
    return (a + b) % 2 == j % 2


@dataclasses.dataclass
class SSCSpec(Config):
    """The preset of one SSC layer (see module doc). Recorded in plans and results."""

    groups: int = 1
    spatial_period: int | None = 1
    point_period: int = 1
    pattern: str = "full"

    def validate(self) -> None:
        for name in ("groups", "point_period"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} must be an integer >= 1")
        sp = self.spatial_period
        if sp is not None and (isinstance(sp, bool) or not isinstance(sp, int) or sp < 1):
            raise ConfigError(f"spatial_period={sp!r} must be an integer >= 1, or null for a pointwise layer")
        if sp is None and self.point_period != 1:
            raise ConfigError("a pointwise preset (spatial_period=null) needs point_period=1; use groups for a "
                              "grouped 1x1")
        if sp is not None and sp % self.point_period:
            raise ConfigError(f"point_period={self.point_period} must divide spatial_period={sp} "
                              "(blocks hold whole residue classes)")
        check_choice("pattern", self.pattern, SUPPORTS.list())

    def fits(self, in_channels: int, out_channels: int) -> str | None:
        """None if the preset fits these channel counts, else why not."""
        g, sp = self.groups, self.spatial_period or 1
        if in_channels % g or out_channels % g:
            return f"groups={g} must divide in_channels={in_channels} and out_channels={out_channels}"
        if (in_channels // g) % sp or (out_channels // g) % sp:
            return (f"spatial_period={sp} must divide the channels per group "
                    f"({in_channels // g} in, {out_channels // g} out)")
        return None


class SSCLayout:
    """Index tables of one layer: permutations, masks and where each real weight sits in the
    dense (O, C/G, k, k) weight. All arrays are built once, in numpy."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, spec: SSCSpec):
        why = spec.fits(in_channels, out_channels)
        if why is not None:
            raise ConfigError(f"SSC preset {spec.to_dict()} does not fit this layer: {why}")
        self.spec, self.k = spec, kernel_size
        self.c, self.o, g = in_channels, out_channels, spec.groups
        self.cg, self.og = in_channels // g, out_channels // g
        self.spatial = spec.spatial_period is not None
        self.ps = spec.spatial_period or 1
        self.pp = spec.point_period
        self.has_point = (not self.spatial) or self.pp < self.ps
        self.perm_in = torch.from_numpy(_class_order(g, self.cg, self.ps))   # position -> input channel
        self.perm_out = torch.from_numpy(_class_order(g, self.og, self.ps))  # position -> filter
        self.inv_out = torch.argsort(self.perm_out)
        self.n_spatial = self.cg // self.ps if self.spatial else 0  # k x k channels per filter
        self.n_block = self.cg // self.pp                              # channels per 1 x 1 block
        self.tap_mask = torch.from_numpy(self._tap_mask())             # (O, 1, k, k), positions
        self.point_mask = torch.from_numpy(self._point_mask())         # (O, n_block, 1, 1)

    # position p (permuted filter order) -> (group, class r, index j in class)
    def _rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = np.arange(self.o)
        q = p % self.og
        per_class = self.og // self.ps
        return p // self.og, q // per_class, q % per_class

    def _tap_mask(self) -> np.ndarray:
        gen = SUPPORTS.get(self.spec.pattern)
        _, _, j = self._rows()
        cache = {jj: np.asarray(gen(self.k, jj), dtype=bool) for jj in set(j.tolist())}
        if any(m.shape != (self.k, self.k) or not m.any() for m in cache.values()):
            raise ConfigError(f"tap pattern {self.spec.pattern!r} must return a non-empty ({self.k}, {self.k}) mask")
        return np.stack([cache[jj] for jj in j.tolist()])[:, None].astype(np.float32)

    def _point_mask(self) -> np.ndarray:
        m = np.ones((self.o, self.n_block), dtype=np.float32)
        if self.spatial:  # the filter's own class gets k x k taps, not 1 x 1 ones
            _, r, _ = self._rows()
            off = (r % (self.ps // self.pp)) * self.n_spatial
            for p in range(self.o):
                m[p, off[p]:off[p] + self.n_spatial] = 0
        return m[:, :, None, None]

    def real_taps_per_filter(self) -> torch.Tensor:
        """Real (possibly nonzero) weights of each filter, in natural filter order."""
        taps = self.tap_mask.sum((1, 2, 3)) * self.n_spatial
        if self.has_point:
            taps = taps + self.point_mask.sum((1, 2, 3))
        return taps.to(torch.long)[self.inv_out]

    def dense_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat positions in the natural dense weight (O, C/G, k, k) of every entry of the
        spatial weight (O, n_spatial, k, k) and of the 1x1 weight (O, n_block, 1, 1)."""
        k, cg = self.k, self.cg
        _, r, _ = self._rows()
        local_in = _class_order(1, cg, self.ps)  # permuted local column -> natural local column
        rows = self.perm_out.numpy()[:, None]
        s_cols = local_in[r[:, None] * self.n_spatial + np.arange(self.n_spatial)]            # (O, n_s)
        s_idx = ((rows * cg + s_cols)[:, :, None] * k * k + np.arange(k * k)).reshape(-1)
        b = r // (self.ps // self.pp)
        p_cols = local_in[b[:, None] * self.n_block + np.arange(self.n_block)]                 # (O, n_b)
        p_idx = ((rows * cg + p_cols) * k * k + (k // 2) * k + k // 2).reshape(-1)
        return torch.from_numpy(s_idx), torch.from_numpy(p_idx)


def _class_order(groups: int, per_group: int, period: int) -> np.ndarray:
    """Channels of each group listed residue class by class: (g, r, j) -> g*n + r + period*j."""
    g, r, j = np.meshgrid(np.arange(groups), np.arange(period), np.arange(per_group // period), indexing="ij")
    return (g * per_group + r + period * j).reshape(-1).astype(np.int64)


__all__ = ["SSCLayout", "SSCSpec", "SUPPORTS", "checker_taps", "cross_taps", "full_taps"]
