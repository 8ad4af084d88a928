"""Differentiable costs of gated groups (any gate-based method): per-channel: parameters, MACs or latency, as functions of open widths.

Every cost here is a function C(u) of the open state u of all gated channels (u in [0, 1]: 1 =
open; channels of ungated groups count as open). The cost of a channel is the derivative
dC/du_c at the *current* expected widths, so it adapts as neighbouring groups shrink: a conv
with k x k kernels and an H x W output costs k*k*H*W*in_open*out_open MACs, so one of its output
channels costs k*k*H*W*in_open, and halving the input group halves that price.

- params: each parameter costs numel * prod_d(kept fraction of its channel dims d);
- macs:   each traced conv/linear/matmul node costs its per-sample MACs * prod_d(kept fraction
          of its weight's channel dims), the convention of `cost.macs` (exact after removal);
- latency: each conv2d/linear costs table.lookup_tensor(open inputs, open outputs) of a latency
          table measured on the current device (`cost.lut`); other ops are not modelled.

Worked numbers: conv a (3 -> 8, 3x3, pad 1) on 8x8, then conv b (8 -> 4, 3x3, no pad, 6x6 out).
A channel of a costs 3*9*64 = 1728 MACs in a and 4*9*36 = 1296 in b: 3024 in all.

>>> import torch.nn as nn
>>> from prunekit.graph import build_graph
>>> from prunekit.layers.gates import GateSet
>>> m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3)); x = torch.randn(1, 3, 8, 8)
>>> graph = build_graph(m, x); gates = GateSet.from_graph(m, graph)
>>> cost = build_cost("macs", m, graph, gates)
>>> cost.per_channel(gates.open_probs(), at_full=True)[0][0].item()
3024.0
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import ConfigError
from .latency import LatencyConfig
from .lut import LatencyTable, LayerSpec, build_conv_lut, pruning_grid
from ..graph import Graph
from ..layers.gates import GateSet


class CostModel:
    """C(u) = sum of product terms coef * prod(factors) + sum of latency-table terms.

    A factor is the open fraction of one (tensor, dim): the mean of u over its positions.
    """

    def __init__(self, kind: str, graph: Graph, gates: GateSet):
        self.kind = kind
        self.sizes = list(gates.sizes)
        self._lookup = _root_lookup(graph, gates)
        self._keys: dict[tuple, int] = {}  # (tensor, dim) or ("#ids", the ids' bytes) -> factor
        self._index: list[torch.Tensor] = []
        self.products: list[tuple[float, list[int]]] = []
        self.tables: list[tuple[LatencyTable, int, int, int, int]] = []  # table, f_in, c_in, f_out, c_out
        self.latency_tables: list[LatencyTable] = []
        self.members: dict[tuple[str, int], torch.Tensor] = {}
        for m in graph.members:
            if not m.name.startswith("#"):
                self.members.setdefault((m.qualname, m.dim), m.ids)
        self.device = torch.device("cpu")
        self.full = 0.0

    # ---- building ---------------------------------------------------------------------
    def factor(self, qualname: str, dim: int) -> int:
        """Index of the open-fraction factor of (tensor, dim); -1 when it has no channels."""
        key = (qualname, dim)
        if key not in self.members:
            return -1
        return self._factor(key, self.members[key].numpy())

    def factor_of_ids(self, ids: np.ndarray) -> int:
        """Index of the open-fraction factor of a set of channel ids (the operand of a parameter-free
        product such as q @ k^T), kept once per distinct set."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        return self._factor(("#ids", ids.tobytes()), ids)

    def _factor(self, key: tuple, ids: np.ndarray) -> int:
        """The factor kept under `key`: the mean of u over the positions of `ids` (-1: always open)."""
        if key not in self._keys:
            self._keys[key] = len(self._index)
            self._index.append(torch.from_numpy(np.where(ids >= 0, self._lookup[np.maximum(ids, 0)], 0)))
        return self._keys[key]

    def dims_of(self, qualname: str) -> list[int]:
        return sorted({d for (q, d) in self.members if q == qualname})

    def add_product(self, coef: float, factors: list[int]) -> None:
        if coef:
            self.products.append((float(coef), [f for f in factors if f >= 0]))

    def finish(self) -> "CostModel":
        lengths = [len(ix) for ix in self._index]
        self._cat = torch.cat(self._index) if self._index else torch.zeros(0, dtype=torch.long)
        self._seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
        self._len = torch.tensor(lengths, dtype=torch.float64).clamp(min=1)
        width = max([len(f) for _, f in self.products] + [1])
        pad = len(lengths)  # points at the extra factor of `_fractions` that is always 1
        self._coef = torch.tensor([c for c, _ in self.products], dtype=torch.float64)
        rows = [f + [pad] * (width - len(f)) for _, f in self.products]
        self._fac = torch.tensor(rows, dtype=torch.long) if rows else torch.zeros((0, 1), dtype=torch.long)
        ones = [torch.ones(s, dtype=torch.float64) for s in self.sizes]
        self.full = float(self.total(ones))
        if not self.full > 0:
            raise ConfigError(f"the model has no {self.kind} cost that the gated groups can change")
        return self

    def to(self, device: Any) -> "CostModel":
        self.device = torch.device(device)
        for name in ("_cat", "_seg", "_len", "_coef", "_fac"):
            setattr(self, name, getattr(self, name).to(self.device))
        return self

    # ---- evaluating -------------------------------------------------------------------
    def _fractions(self, opens: list[torch.Tensor]) -> torch.Tensor:
        u = torch.cat([torch.ones(1, dtype=torch.float64, device=self.device)]
                      + [o.to(self.device, torch.float64) for o in opens])
        sums = torch.zeros(len(self._len), dtype=torch.float64, device=self.device).index_add(0, self._seg, u[self._cat])
        return torch.cat([sums / self._len, torch.ones(1, dtype=torch.float64, device=self.device)])

    def total(self, opens: list[torch.Tensor]) -> torch.Tensor:
        """C(u) for per-group open vectors (bool or float), as a float64 scalar tensor."""
        f = self._fractions(opens)
        out = (self._coef * f[self._fac].prod(dim=1)).sum()
        for table, f_in, c_in, f_out, c_out in self.tables:
            n_in = f[f_in] * c_in
            out = out + (table.lookup_tensor(n_in) if table.depthwise else table.lookup_tensor(n_in, f[f_out] * c_out))
        return out

    def fraction(self, opens: list[torch.Tensor]) -> float:
        """C(u) / C(everything open)."""
        return float(self.total(opens)) / self.full

    def per_channel(self, opens: list[torch.Tensor], at_full: bool = False) -> list[torch.Tensor]:
        """dC/du_c for every gated channel, at `opens` (or with everything open)."""
        point = [torch.ones(s, dtype=torch.float64, device=self.device) for s in self.sizes] if at_full else opens
        leaves = [p.detach().to(self.device, torch.float64).requires_grad_(True) for p in point]
        with torch.enable_grad():
            grads = torch.autograd.grad(self.total(leaves), leaves, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)]


def _root_lookup(graph: Graph, gates: GateSet) -> np.ndarray:
    """Union-find root -> position in u (1 + offset of the gate + channel); 0 = always open."""
    top = max([int(m.ids.max()) for m in graph.members if m.ids.numel()] + [0]) + 1
    lookup = np.zeros(top, dtype=np.int64)
    offset = 1
    by_name = {g.name: g for g in graph.groups}
    for i, name in enumerate(gates.names):
        g = by_name[name]
        roots = g.classes.numpy()
        sel = g.prunable.numpy() & (roots < top)
        lookup[roots[sel]] = offset + np.arange(g.size)[sel]
        offset += g.size
    return lookup


def _params(model: nn.Module, graph: Graph, gates: GateSet) -> CostModel:
    cm = CostModel("params", graph, gates)
    for q, p in model.named_parameters():
        cm.add_product(p.numel(), [cm.factor(q, d) for d in cm.dims_of(q)])
    return cm.finish()


def _macs(model: nn.Module, graph: Graph, gates: GateSet) -> CostModel:
    cm = CostModel("macs", graph, gates)
    batch = max(graph.batch, 1)
    for node in graph.nodes:
        if node.terms and not node.params:  # attention products: each term scales with its operands' channels
            for part, idss in node.terms:
                cm.add_product(part / batch, [cm.factor_of_ids(ids.numpy()) for ids in idss])
        elif node.macs:
            q = node.params[0] if node.params else None
            cm.add_product(node.macs // batch, [cm.factor(q, d) for d in cm.dims_of(q)] if q else [])
    return cm.finish()


def _latency(model: nn.Module, graph: Graph, gates: GateSet, cfg: LatencyConfig, grid: int) -> CostModel:
    cm = CostModel("latency", graph, gates)
    cache: dict[str, LatencyTable] = {}
    for node in graph.nodes:
        if not node.params or not node.in_shapes:
            continue
        q = node.params[0]
        mod_name, pname = q.rsplit(".", 1) if "." in q else ("", q)
        mod = model.get_submodule(mod_name)
        if pname != "weight" or not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        shape = node.in_shapes[0]
        hw = tuple(shape[2:4]) if isinstance(mod, nn.Conv2d) else (math.prod(shape[1:-1]) or 1, 1)
        try:
            spec = LayerSpec.from_module(mod, hw)
        except ConfigError:
            continue  # e.g. padding="same": not in the tables
        if spec.groups != 1 and not spec.depthwise:
            continue
        key = json.dumps(spec.to_dict(), sort_keys=True)
        if key not in cache:
            counts = (pruning_grid(spec.in_channels, grid) if spec.depthwise else
                      (pruning_grid(spec.in_channels, grid), pruning_grid(spec.out_channels, grid)))
            cache[key] = build_conv_lut(spec, counts, cfg)
        # a missing factor (-1) reads the last entry of the fractions, which is always 1
        f_in, f_out = cm.factor(q, 0 if spec.depthwise else 1), cm.factor(q, 0)
        cm.tables.append((cache[key], f_in, spec.in_channels, f_out, spec.out_channels))
    cm.latency_tables = list(cache.values())
    return cm.finish()


def build_cost(kind: str, model: nn.Module, graph: Graph, gates: GateSet,
               latency: LatencyConfig | None = None, grid: int = 4) -> CostModel:
    """The cost model `kind` ("params", "macs", "latency") of `model` over `gates`' groups."""
    if kind == "params":
        return _params(model, graph, gates)
    if kind == "macs":
        return _macs(model, graph, gates)
    if kind == "latency":
        return _latency(model, graph, gates, latency or LatencyConfig(device="auto", warmup=3, repeats=10), grid)
    raise ConfigError(f"cost {kind!r} is unknown; use params, macs or latency")
