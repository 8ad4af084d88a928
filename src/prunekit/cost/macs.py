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
from typing import Any

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
    per: dict[str, dict[str, int]] = defaultdict(lambda: {"params": 0, "macs": 0, "out": 0})
    total = 0
    batch = max(graph.batch, 1)
    for node in graph.nodes:
        macs = node.macs // batch
        total += macs
        owner = node.params[0].rsplit(".", 1)[0] if node.params else node.module
        per[owner]["macs"] += macs
    for name, mod in model.named_modules():
        if name in per:
            per[name]["params"] = sum(p.numel() for p in mod.parameters(recurse=False))
            w = getattr(mod, "weight", None)
            if w is not None and w.dim() >= 1:
                transposed = isinstance(mod, nn.modules.conv._ConvTransposeNd)
                per[name]["out"] = int(mod.out_channels if transposed else w.shape[0])
    return Cost(count_params(model), total, dict(per))


def count_cost(model: nn.Module, example_inputs: Any) -> Cost:
    """Trace and count. Use `cost_from_graph` when a graph is already at hand."""
    return cost_from_graph(model, build_graph(model, example_inputs))


def estimate_cost(model: nn.Module, graph: Graph, removal: dict[str, list[int]]) -> tuple[int, int]:
    """(params, MACs) the model would have after `removal`, without touching it.

    Each parameter shrinks by the kept fraction of every dim a channel touches; each conv/linear
    node's MACs shrink by the kept fractions of its weight's two channel dims; parameter-free
    products (matmul, attention) shrink by the kept fractions of their contracted and output
    positions. Exact for these ops (tests compare it with a recount after removal).
    """
    import torch

    dead = set()
    for name, idx in removal.items():
        dead.update(graph.group(name).classes[list(idx)].tolist())
    dead_t = torch.tensor(sorted(dead), dtype=torch.long)
    frac: dict[tuple[str, int], float] = {}
    for m in graph.members:
        if m.name.startswith("#"):
            continue
        gone = torch.isin(m.ids, dead_t)
        frac[(m.qualname, m.dim)] = min(frac.get((m.qualname, m.dim), 1.0), 1.0 - float(gone.float().mean()))
    by_name: dict[str, list[float]] = defaultdict(list)
    for (name, _), f in frac.items():
        by_name[name].append(f)
    kept_of = lambda q: by_name.get(q, [])
    params = 0
    for q, p in model.named_parameters():
        scale = 1.0
        for f in kept_of(q):
            scale *= f
        params += int(round(p.numel() * scale))
    kept_part = lambda ids: 1.0 - float(torch.isin(ids, dead_t).float().mean()) if ids.numel() else 1.0
    macs = 0
    batch = max(graph.batch, 1)
    for node in graph.nodes:
        if node.terms and not node.params:
            total = 0.0
            for part, idss in node.terms:
                for ids in idss:
                    part *= kept_part(ids)
                total += part
            macs += int(round(total)) // batch
            continue
        scale = 1.0
        for f in (kept_of(node.params[0]) if node.params else []):
            scale *= f
        macs += int(round(node.macs // batch * scale))
    return params, macs
