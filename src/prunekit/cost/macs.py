"""Parameters and MACs counted from the traced graph.

Convention (stated in every report): MACs are multiply-accumulates *per sample* of convolutions
(incl. transposed and grouped), Linear layers, matmul/bmm and attention products (QK^T and AV).
Normalisation, activations, pooling and elementwise ops are not counted (they are a few percent
and memory-bound). A conv's MACs = out_elements * (C_in / groups) * k_h * k_w. Parameters are
all unique trainable and frozen parameters (buffers excluded).

>>> import torch, torch.nn as nn
>>> c = count_cost(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 2)),
...                torch.randn(2, 3, 4, 4))
>>> c.macs == 8 * 4 * 4 * 3 * 9 + 128 * 2, c.params == 8 * 3 * 9 + 8 + 128 * 2 + 2
(True, True)
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..graph import Graph, build_graph

CONVENTION = ("MACs = multiply-accumulates per sample of conv/linear/matmul/attention products; "
              "norms, activations, pooling and elementwise ops excluded. Params = unique parameters.")


@dataclass
class Cost:
    params: int
    macs: int
    per_module: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> {params, macs, out}

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params, "macs": self.macs, "convention": CONVENTION, "per_module": self.per_module}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() already skips shared duplicates


def cost_from_graph(model: nn.Module, graph: Graph) -> Cost:
    batch = max(graph.batch, 1)
    return _cost(model, graph, [node.macs // batch for node in graph.nodes])


def _cost(model: nn.Module, graph: Graph, node_macs: list[int]) -> Cost:
    """Totals plus the per-module table: MACs per node as given, params and widths read from `model`."""
    per: dict[str, dict[str, int]] = defaultdict(lambda: {"params": 0, "macs": 0, "out": 0})
    for node, macs in zip(graph.nodes, node_macs):
        owner = node.params[0].rsplit(".", 1)[0] if node.params else node.module
        per[owner]["macs"] += macs
    for name, mod in model.named_modules():
        if name in per:
            per[name]["params"] = sum(p.numel() for p in mod.parameters(recurse=False))
            w = getattr(mod, "weight", None)
            if w is not None and w.dim() >= 1:
                transposed = isinstance(mod, nn.modules.conv._ConvTransposeNd)
                per[name]["out"] = int(mod.out_channels if transposed else w.shape[0])
    return Cost(count_params(model), sum(node_macs), dict(per))


def count_cost(model: nn.Module, example_inputs: Any) -> Cost:
    """Trace and count. Use `cost_from_graph` when a graph is already at hand."""
    return cost_from_graph(model, build_graph(model, example_inputs))


class CostEstimator:
    """(params, MACs) of a graph's model after any removal, for many removals of one graph.

    Every member position and every id of a parameter-free product is mapped once to an index
    into the graph's channel classes; a removal then marks dead classes in a boolean array and
    reads all positions with one numpy gather. `cost_after` and `estimate_cost` use it too, so
    there is one way to count. Built from the model's parameter sizes: valid for any copy with
    the same shapes.
    """

    def __init__(self, model: nn.Module, graph: Graph):
        self.graph = graph
        self._group_index: dict[str, np.ndarray] = {}
        classes = [g.classes.numpy() for g in graph.groups]
        self._roots = np.unique(np.concatenate(classes)) if classes else np.zeros(0, dtype=np.int64)
        flat, self._sizes = graph.member_ids()
        self._pos = self._index(flat)  # (sum of member sizes,) class index, len(roots) = no class
        # one index space for every name a scale is asked for: parameters, members, node weights
        params = dict(model.named_parameters())
        names: dict[str, int] = {q: i for i, q in enumerate(params)}
        for q in [m.qualname for m in graph.members] + [n.params[0] for n in graph.nodes if n.params]:
            names.setdefault(q, len(names))
        self._numel = np.array([p.numel() for p in params.values()], dtype=np.float64)
        self._n_names = len(names)
        keys: dict[tuple[str, int], int] = {}
        key_of, param_of_key = [], []
        self._live = np.array([i for i, m in enumerate(graph.members) if not m.name.startswith("#")], dtype=np.int64)
        for i in self._live.tolist():
            m = graph.members[i]
            if (m.qualname, m.dim) not in keys:
                keys[(m.qualname, m.dim)] = len(keys)
                param_of_key.append(names[m.qualname])
            key_of.append(keys[(m.qualname, m.dim)])
        self._key_of, self._param_of_key = np.asarray(key_of, dtype=np.int64), np.asarray(param_of_key, dtype=np.int64)
        batch = max(graph.batch, 1)
        # a node without weights reads the extra last scale entry, which stays 1
        self._node_param = np.array([names[n.params[0]] if n.params and not n.terms else len(names)
                                     for n in graph.nodes], dtype=np.int64)
        self._node_base = np.array([n.macs // batch for n in graph.nodes], dtype=np.int64)
        self._terms = {i: [(part, [self._index(ids.numpy().reshape(-1)) for ids in idss]) for part, idss in n.terms]
                       for i, n in enumerate(graph.nodes) if n.terms and not n.params}

    def _index(self, ids: np.ndarray) -> np.ndarray:
        at = np.minimum(np.searchsorted(self._roots, ids), max(len(self._roots) - 1, 0))
        hit = self._roots[at] == ids if len(self._roots) else np.zeros(ids.shape, dtype=bool)
        return np.where(hit, at, len(self._roots))

    def _dead(self, removal: dict[str, list[int]]) -> np.ndarray:
        dead = np.zeros(len(self._roots) + 1, dtype=bool)  # the last entry answers for "no class"
        for name, idx in removal.items():
            if len(idx):
                at = self._group_index.get(name)
                if at is None:  # each group's channels -> class indices, once
                    at = self._group_index[name] = self._index(self.graph.group(name).classes.numpy())
                dead[at[np.asarray(idx, dtype=np.int64)]] = True
        return dead

    def _param_scale(self, dead: np.ndarray) -> np.ndarray:
        """Kept fraction of every parameter: product over its channel dims of the kept share."""
        n_dead = np.asarray(_counts(dead[self._pos], self._sizes), dtype=np.float64)
        sizes, live = np.asarray(self._sizes, dtype=np.float64), self._live
        part = np.where(sizes[live] > 0, 1.0 - n_dead[live] / np.maximum(sizes[live], 1), 1.0)
        frac = np.ones(len(self._param_of_key))  # per (name, dim): the smallest kept share of its members
        np.minimum.at(frac, self._key_of, part)
        scale = np.ones(self._n_names + 1)
        np.multiply.at(scale, self._param_of_key, frac)
        return scale

    def node_macs(self, removal: dict[str, list[int]], dead: np.ndarray | None = None,
                  scale: np.ndarray | None = None) -> list[int]:
        """Per-sample MACs of every node after the removal: conv/linear nodes shrink by the kept
        fractions of their weight's channel dims, parameter-free products (matmul, attention) by
        those of the positions in each of their terms."""
        dead = self._dead(removal) if dead is None else dead
        scale = self._param_scale(dead) if scale is None else scale
        out = np.rint(self._node_base * scale[self._node_param]).astype(np.int64).tolist()
        batch = max(self.graph.batch, 1)
        part = lambda pos: 1.0 - float(np.count_nonzero(dead[pos])) / pos.size if pos.size else 1.0
        for i, terms in self._terms.items():
            out[i] = int(round(sum(p * math.prod(part(pos) for pos in poss) for p, poss in terms))) // batch
        return out

    def __call__(self, removal: dict[str, list[int]]) -> tuple[int, int]:
        dead = self._dead(removal)
        scale = self._param_scale(dead)
        params = int(np.rint(self._numel * scale[: len(self._numel)]).sum())
        return params, sum(self.node_macs(removal, dead, scale))


def _counts(flags: np.ndarray, sizes: list[int]) -> list[int]:
    """How many of `flags` are set in each consecutive run of `sizes` entries."""
    running = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    ends = np.cumsum(np.asarray(sizes, dtype=np.int64))
    return (running[ends] - running[ends - np.asarray(sizes, dtype=np.int64)]).tolist()


def estimate_cost(model: nn.Module, graph: Graph, removal: dict[str, list[int]]) -> tuple[int, int]:
    """(params, MACs) the model would have after `removal`, without touching it.

    Each parameter shrinks by the kept fraction of every dim a channel touches; MACs as in
    `_node_macs_after`. Exact for these ops (tests compare it with a recount after removal).
    """
    return CostEstimator(model, graph)(removal)


def cost_after(pruned: nn.Module, graph: Graph, removal: dict[str, list[int]],
               estimator: CostEstimator | None = None) -> Cost:
    """Cost of `pruned` (the graph's model with `removal` applied) without tracing it again:
    params and widths read from the pruned modules, MACs from the graph as in `estimate_cost`
    (`estimator`: one already built for this graph)."""
    estimator = estimator if estimator is not None else CostEstimator(pruned, graph)
    return _cost(pruned, graph, estimator.node_macs(removal))
