"""Parameters and MACs counted from the traced graph.

Convention (stated in every report): MACs are multiply-accumulates *per sample* of convolutions
(incl. transposed and grouped), Linear layers, matmul/bmm and attention products (QK^T and AV).
Normalisation, activations, pooling and elementwise ops are not counted (they are a few percent
and memory-bound). A conv's MACs = out_elements * (C_in / groups) * k_h * k_w. Parameters are
all unique trainable and frozen parameters (buffers excluded), less the entries a module declares
zero by construction: a module with a `fixed_zero_params()` method (a structured sparse layer such
as `prunekit.layers.ssc.SSCConv2d`) counts only its real weights, and its traced op counts only
its real taps as MACs.

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
from ..graph.ids import IdSet

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
    stored = sum(p.numel() for p in model.parameters())  # parameters() already skips shared duplicates
    return stored - sum(_fixed_zeros(m) for m in model.modules())


def _fixed_zeros(module: nn.Module) -> int:
    """Parameter entries of `module` itself that are zero by construction (structured sparse layers)."""
    fn = getattr(module, "fixed_zero_params", None)
    return int(fn()) if callable(fn) else 0


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
            per[name]["params"] = sum(p.numel() for p in mod.parameters(recurse=False)) - _fixed_zeros(mod)
            w = getattr(mod, "weight", None)
            if w is None and isinstance(getattr(mod, "out_channels", None), int):
                per[name]["out"] = mod.out_channels  # layers storing their weight in parts (SSCConv2d)
            elif w is not None and w.dim() >= 1:
                transposed = isinstance(mod, nn.modules.conv._ConvTransposeNd)
                per[name]["out"] = int(mod.out_channels if transposed else w.shape[0])
    return Cost(count_params(model), sum(node_macs), dict(per))


def count_cost(model: nn.Module, example_inputs: Any) -> Cost:
    """Trace and count. Use `cost_from_graph` when a graph is already at hand."""
    return cost_from_graph(model, build_graph(model, example_inputs))


class _Kept:
    """Kept fractions after `removal`: of each (parameter, dim) and of any id tensor of the graph."""

    def __init__(self, graph: Graph, removal: dict[str, list[int]]):
        dead: set[int] = set()
        for name, idx in removal.items():
            dead.update(graph.group(name).classes[list(idx)].tolist())
        self.dead = IdSet(dead)
        frac: dict[tuple[str, int], float] = {}
        flat, sizes = graph.member_ids()
        for m, n, n_dead in zip(graph.members, sizes, _counts(self.dead.contains(flat), sizes)):
            if not m.name.startswith("#"):
                part = 1.0 - n_dead / n if n else 1.0
                frac[(m.qualname, m.dim)] = min(frac.get((m.qualname, m.dim), 1.0), part)
        self.of_param: dict[str, list[float]] = defaultdict(list)
        for (name, _), f in frac.items():
            self.of_param[name].append(f)

    def part(self, ids: torch.Tensor) -> float:
        if ids.numel() == 0:
            return 1.0
        return 1.0 - float(np.count_nonzero(self.dead.contains(ids))) / ids.numel()

    def param_scale(self, qualname: str) -> float:
        return math.prod(self.of_param.get(qualname, []))


def _counts(flags: np.ndarray, sizes: list[int]) -> list[int]:
    """How many of `flags` are set in each consecutive run of `sizes` entries."""
    running = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    ends = np.cumsum(np.asarray(sizes, dtype=np.int64))
    return (running[ends] - running[ends - np.asarray(sizes, dtype=np.int64)]).tolist()


def _node_macs_after(graph: Graph, kept: _Kept) -> list[int]:
    """Per-sample MACs of every node after the removal: conv/linear nodes shrink by the kept
    fractions of their weight's channel dims, parameter-free products (matmul, attention) by
    those of the positions in each of their terms."""
    batch = max(graph.batch, 1)
    out = []
    for node in graph.nodes:
        if node.terms and not node.params:
            out.append(int(round(sum(part * math.prod(kept.part(ids) for ids in idss)
                                     for part, idss in node.terms))) // batch)
        else:
            scale = kept.param_scale(node.params[0]) if node.params else 1.0
            out.append(int(round(node.macs // batch * scale)))
    return out


def estimate_cost(model: nn.Module, graph: Graph, removal: dict[str, list[int]]) -> tuple[int, int]:
    """(params, MACs) the model would have after `removal`, without touching it.

    Each parameter shrinks by the kept fraction of every dim a channel touches; MACs as in
    `_node_macs_after`. Exact for these ops (tests compare it with a recount after removal).
    """
    kept = _Kept(graph, removal)
    params = sum(int(round(p.numel() * kept.param_scale(q))) for q, p in model.named_parameters())
    return params, sum(_node_macs_after(graph, kept))


def cost_after(pruned: nn.Module, graph: Graph, removal: dict[str, list[int]]) -> Cost:
    """Cost of `pruned` (the graph's model with `removal` applied) without tracing it again:
    params and widths read from the pruned modules, MACs from the graph as in `estimate_cost`."""
    return _cost(pruned, graph, _node_macs_after(graph, _Kept(graph, removal)))
