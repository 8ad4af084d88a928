"""Genotypes (the derived cells), their derivation from alpha, and the reference cells.

A genotype lists, for each intermediate node of a cell in order, two (op, input) pairs; input
0 and 1 are the cell's two inputs, input i + 2 is node i. `concat` names the nodes whose outputs
are concatenated (DARTS: all 4 intermediate nodes, [2, 3, 4, 5]).

Derivation is DARTS's: per node, rank its incoming edges by their largest softmax weight over
ops other than `none`, keep the top 2 (a stable sort: ties keep the lower input index), and give
each kept edge its argmax op other than `none` (ties: the op listed first in PRIMITIVES).

Genotypes travel as JSON and are strictly validated (`Genotype.from_dict`): nothing is eval'ed.

>>> g = Genotype.from_dict(DARTS_V2.to_dict()); g == DARTS_V2, g.steps
(True, 4)
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ...core.errors import CheckpointError
from .ops import PARAMETER_FREE, PRIMITIVES

Gene = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Genotype:
    normal: Gene
    normal_concat: tuple[int, ...]
    reduce: Gene
    reduce_concat: tuple[int, ...]

    @property
    def steps(self) -> int:
        return len(self.normal) // 2

    def to_dict(self) -> dict[str, Any]:
        return {"normal": [list(e) for e in self.normal], "normal_concat": list(self.normal_concat),
                "reduce": [list(e) for e in self.reduce], "reduce_concat": list(self.reduce_concat)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any) -> "Genotype":
        """Build from plain data, rejecting anything that is not a well-formed DARTS cell."""
        if not isinstance(data, Mapping) or set(data) != {"normal", "normal_concat", "reduce", "reduce_concat"}:
            raise CheckpointError("a genotype is a mapping with exactly the keys normal, normal_concat, reduce, "
                                  f"reduce_concat; got {sorted(data) if isinstance(data, Mapping) else type(data).__name__}")
        parts = {}
        for kind in ("normal", "reduce"):
            gene, concat = _check_gene(kind, data[kind]), _check_concat(kind, data[f"{kind}_concat"], 0)
            parts[kind], parts[f"{kind}_concat"] = gene, concat
        steps = len(parts["normal"]) // 2
        if len(parts["reduce"]) != len(parts["normal"]):
            raise CheckpointError("normal and reduce cells must have the same number of nodes")
        for kind in ("normal", "reduce"):
            _check_concat(kind, parts[f"{kind}_concat"], steps)
        return cls(**parts)

    @classmethod
    def from_json(cls, text: str) -> "Genotype":
        try:
            return cls.from_dict(json.loads(text))
        except (ValueError, RecursionError) as err:
            raise CheckpointError(f"genotype JSON is malformed ({str(err)[:200]})") from None

    def parameter_free_share(self) -> float:
        """Share of the cell edges (normal and reduce) that carry a parameter-free op."""
        ops = [op for op, _ in self.normal + self.reduce]
        return sum(op in PARAMETER_FREE for op in ops) / len(ops)


def _check_gene(kind: str, gene: Any) -> Gene:
    if not isinstance(gene, (list, tuple)) or not gene or len(gene) % 2:
        raise CheckpointError(f"genotype {kind}: needs a non-empty, even-length list of [op, input] pairs")
    out = []
    for pos, edge in enumerate(gene):
        if not isinstance(edge, (list, tuple)) or len(edge) != 2:
            raise CheckpointError(f"genotype {kind}[{pos}]: {edge!r} is not an [op, input] pair")
        op, j = edge
        if op not in PRIMITIVES or op == "none":
            raise CheckpointError(f"genotype {kind}[{pos}]: unknown op {op!r}; use one of {', '.join(PRIMITIVES[1:])}")
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < pos // 2 + 2:
            raise CheckpointError(f"genotype {kind}[{pos}]: input {j!r} must be an integer in [0, {pos // 2 + 1}] "
                                  f"(node {pos // 2} sees the two cell inputs and the nodes before it)")
        out.append((op, j))
    return tuple(out)


def _check_concat(kind: str, concat: Any, steps: int) -> tuple[int, ...]:
    if not isinstance(concat, (list, tuple)) or not concat or \
            any(isinstance(i, bool) or not isinstance(i, int) for i in concat):
        raise CheckpointError(f"genotype {kind}_concat must be a non-empty list of node indices")
    if steps and (len(set(concat)) != len(concat) or not all(2 <= i < steps + 2 for i in concat)):
        raise CheckpointError(f"genotype {kind}_concat {list(concat)} must list distinct nodes in [2, {steps + 1}]")
    return tuple(concat)


def derive_gene(weights: torch.Tensor, steps: int) -> Gene:
    """Top-2 incoming edges per node and their best op other than `none`, from softmax weights
    (edges, ops) laid out node by node (node i has i + 2 edges)."""
    none = PRIMITIVES.index("none")
    w = weights.detach().double().cpu().tolist()
    gene, start = [], 0
    for i in range(steps):
        rows = w[start:start + i + 2]
        best = [max(v for k, v in enumerate(r) if k != none) for r in rows]
        edges = sorted(range(i + 2), key=lambda j: -best[j])[:2]  # stable: ties keep the lower input
        for j in edges:
            k_best = max((k for k in range(len(rows[j])) if k != none), key=lambda k: (rows[j][k], -k))
            gene.append((PRIMITIVES[k_best], j))
        start += i + 2
    return tuple(gene)


def derive_genotype(alpha_normal: torch.Tensor, alpha_reduce: torch.Tensor, steps: int = 4,
                    multiplier: int = 4) -> Genotype:
    """DARTS's genotype of a supernet with these alphas (logits, (edges, ops) each)."""
    concat = tuple(range(2 + steps - multiplier, steps + 2))
    return Genotype(derive_gene(alpha_normal.softmax(-1), steps), concat,
                    derive_gene(alpha_reduce.softmax(-1), steps), concat)


def alpha_entropy(alpha: torch.Tensor) -> float:
    """Mean over edges of the entropy (nats) of softmax(alpha); log(8) = 2.079 is uniform."""
    p = alpha.detach().double().softmax(-1)
    return float(-(p * p.clamp_min(1e-300).log()).sum(-1).mean())


def parameter_free_mass(alpha: torch.Tensor) -> float:
    """Mean softmax weight that edges give to parameter-free ops (none, pools, skip)."""
    p = alpha.detach().double().softmax(-1)
    idx = [PRIMITIVES.index(op) for op in PARAMETER_FREE]
    return float(p[:, idx].sum(-1).mean())


def random_genotype(seed: int, steps: int = 4) -> Genotype:
    """A uniformly random cell: per node two distinct inputs and an op other than `none` each."""
    gen = torch.Generator().manual_seed(seed)
    def gene() -> Gene:
        out = []
        for i in range(steps):
            for j in sorted(torch.randperm(i + 2, generator=gen)[:2].tolist()):
                out.append((PRIMITIVES[1 + int(torch.randint(len(PRIMITIVES) - 1, (1,), generator=gen))], j))
        return tuple(out)
    concat = tuple(range(2, steps + 2))
    return Genotype(gene(), concat, gene(), concat)


def _g(normal: Sequence, reduce: Sequence) -> Genotype:
    return Genotype.from_dict({"normal": normal, "normal_concat": [2, 3, 4, 5],
                               "reduce": reduce, "reduce_concat": [2, 3, 4, 5]})


# DARTS (second order), Liu et al. 2019, as published with the DARTS code (genotypes.py "DARTS_V2").
DARTS_V2 = _g([("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
               ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
              [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
               ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)])
# The cell found by the DASS/PR-DARTS authors at 99% sparsity ("DARTS_prune_three_for" in their code).
DASS = _g([("avg_pool_3x3", 0), ("skip_connect", 1), ("dil_conv_5x5", 1), ("skip_connect", 2),
           ("avg_pool_3x3", 2), ("skip_connect", 1), ("skip_connect", 4), ("skip_connect", 3)],
          [("max_pool_3x3", 1), ("sep_conv_3x3", 0), ("max_pool_3x3", 1), ("dil_conv_3x3", 2),
           ("skip_connect", 0), ("dil_conv_3x3", 2), ("max_pool_3x3", 1), ("skip_connect", 4)])
REFERENCE_GENOTYPES = {"darts_v2": DARTS_V2, "dass": DASS}
UNIFORM_ENTROPY = math.log(len(PRIMITIVES))
