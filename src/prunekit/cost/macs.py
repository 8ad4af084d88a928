"""Parameters and MACs counted from the traced graph.

Convention (stated in every report): MACs are multiply-accumulates *per sample* of convolutions
(incl. transposed and grouped), Linear layers, matmul/bmm, two-operand einsum and attention
products (QK^T and AV). Normalisation, activations, pooling and elementwise ops are not counted
(they are a few percent and memory-bound). A conv's MACs = out_elements * (C_in / groups) * k_h
* k_w. Parameters are all unique trainable and frozen parameters (buffers excluded), less the
entries a module declares zero by construction: a module with a `fixed_zero_params()` method (a
structured sparse layer such as `prunekit.layers.ssc.SSCConv2d`) counts only its real weights,
and its traced op counts only its real taps as MACs.

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
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.errors import ConfigError, UnsupportedOpError
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


def _fixed_zeros(module: nn.Module) -> int:
    """Parameter entries of `module` itself that are zero by construction (structured sparse layers)."""
    fn = getattr(module, "fixed_zero_params", None)
    return int(fn()) if callable(fn) else 0


def cost_from_graph(model: nn.Module, graph: Graph) -> Cost:
    return _cost(model, graph, [node.macs for node in graph.nodes])


def _cost(model: nn.Module, graph: Graph, node_macs: list[int]) -> Cost:
    """Totals plus the per-module table: the nodes' MACs for the traced batch (as given) summed per
    module and then made per sample (a node's own share is not rounded: a layer run on each sample
    alone has one node per sample), params and widths read from `model`."""
    batch = max(graph.batch, 1)
    raw: dict[str, int] = defaultdict(int)
    for node, macs in zip(graph.nodes, node_macs):
        raw[node.params[0].rsplit(".", 1)[0] if node.params else node.module] += macs
    per: dict[str, dict[str, int]] = defaultdict(lambda: {"params": 0, "macs": 0, "out": 0})
    for owner, macs in raw.items():
        per[owner]["macs"] = per_sample(macs, batch)
    total, seen = 0, set()  # the model's unique parameters less fixed zeros, in the same walk
    for name, mod in model.named_modules():
        own = list({id(p): p for p in mod._parameters.values() if p is not None}.values())  # one tensor, two names: once
        zeros = _fixed_zeros(mod)
        total += sum(p.numel() for p in own if id(p) not in seen) - zeros
        seen.update(id(p) for p in own)
        if name in per:
            # a masked tensor is stored under the module's parametrizations, not in its own parameters
            lists = getattr(mod, "parametrizations", None)
            stored = list(lists.parameters()) if isinstance(lists, nn.ModuleDict) else []
            per[name]["params"] = sum(p.numel() for p in own + stored) - zeros
            w = getattr(mod, "weight", None)
            if w is None and isinstance(getattr(mod, "out_channels", None), int):
                per[name]["out"] = mod.out_channels  # layers storing their weight in parts (SSCConv2d)
            elif w is not None and w.dim() >= 1:
                transposed = isinstance(mod, nn.modules.conv._ConvTransposeNd)
                per[name]["out"] = int(mod.out_channels if transposed else w.shape[0])
    return Cost(total, per_sample(sum(node_macs), batch), dict(per))


def per_sample(macs: int, batch: int) -> int:
    """MACs counted over a traced batch, per sample (rounded to the nearest)."""
    return (int(macs) + batch // 2) // batch


def count_cost(model: nn.Module, example_inputs: Any, ignore: Iterable[str] = ()) -> Cost:
    """Trace and count. Use `cost_from_graph` when a graph is already at hand. Modules under
    `ignore` are traced as opaque (their ops counted where a rule knows them, an op without one
    not refused), as a pruning with that ignore list traces them."""
    try:
        return cost_from_graph(model, build_graph(model, example_inputs, ignore))
    except UnsupportedOpError as err:  # counting meets the same ops a pruning does
        raise UnsupportedOpError(f"{err} To count the model as it is, pass that ignore list to count_cost too "
                                 "(count_cost(model, inputs, ignore=[...]): ignored modules are still counted)") from None


class CostEstimator:
    """(params, MACs) of a graph's model after any removal, for many removals of one graph.

    Every member position and every id of a parameter-free product is mapped once to an index
    into the graph's channel classes; a removal then marks dead classes in a boolean array and
    reads all positions with one numpy gather. Where every member holds each channel of one
    group equally often (a conv's filters, a flattened Linear's H*W columns per channel) and no
    parameter-free product is counted, a member's dead positions are that multiple of the
    channels removed from its group, and a removal is read from its counts alone (the greedy
    rounding asks thousands of estimates). `cost_after` and `estimate_cost` use it too, so there
    is one way to count. Built from the model's parameter sizes: valid for any copy with the
    same shapes. Calling it checks the removal (repeats dropped, indices within each group's
    width); `of_distinct` skips that check for removals that selectors made.
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
        self._scale_plan: tuple[np.ndarray, ...] | None = None
        # a node without weights reads the extra last scale entry, which stays 1
        self._node_param = np.array([names[n.params[0]] if n.params and not n.terms else len(names)
                                     for n in graph.nodes], dtype=np.int64)
        self._node_base = np.array([n.macs for n in graph.nodes], dtype=np.int64)  # for the traced batch
        self._terms = {i: [(part, [self._index(ids.numpy().reshape(-1)) for ids in idss]) for part, idss in n.terms]
                       for i, n in enumerate(graph.nodes) if n.terms and not n.params}
        self._by_count: tuple[dict[str, int], np.ndarray, np.ndarray] | None | bool = None  # see _count_plan

    def _count_plan(self) -> tuple[dict[str, int], np.ndarray, np.ndarray] | None:
        """({group: index}, group index of every live member (-1: none), its multiplicity) when
        every live member holds each channel of one group the same number of times and no node
        has terms; None otherwise (removals are then read position by position)."""
        if self._by_count is not None:
            return self._by_count or None
        self._by_count = False
        groups = self.graph.groups
        if self._terms or len({g.name for g in groups}) != len(groups):
            return None
        n_roots = len(self._roots)
        group_of = np.full(n_roots + 1, -1, dtype=np.int64)
        for gi, g in enumerate(groups):
            group_of[self._index(g.classes.numpy())] = gi
        sizes = np.asarray(self._sizes, dtype=np.int64)
        member = np.repeat(np.arange(sizes.size), sizes)
        inside = self._pos < n_roots
        pairs, count = np.unique(member[inside] * (n_roots + 1) + self._pos[inside], return_counts=True)
        owner, cls = pairs // (n_roots + 1), pairs % (n_roots + 1)  # sorted by owner
        n = sizes.size
        lo_g, hi_g, lo_c, hi_c = (np.zeros(n, dtype=np.int64) for _ in range(4))
        if owner.size:
            first = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
            at, grp = owner[first], group_of[cls]
            lo_g[at], hi_g[at] = np.minimum.reduceat(grp, first), np.maximum.reduceat(grp, first)
            lo_c[at], hi_c[at] = np.minimum.reduceat(count, first), np.maximum.reduceat(count, first)
        distinct = np.bincount(owner, minlength=n)
        has = distinct > 0
        g_size = np.array([g.size for g in groups] + [0], dtype=np.int64)
        uniform = ~has | ((lo_g == hi_g) & (lo_c == hi_c) & (distinct == g_size[np.where(has, hi_g, -1)]))
        if not bool(uniform[self._live].all()):
            return None
        live = self._live
        self._by_count = ({g.name: i for i, g in enumerate(groups)}, np.where(has[live], hi_g[live], -1),
                          np.where(has[live], hi_c[live], 0))
        return self._by_count

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

    def _param_scale(self, dead: np.ndarray | None, removal: Mapping[str, Sequence[int]] | None = None) -> np.ndarray:
        """Kept fraction of every parameter: product over its channel dims of the kept share, from
        the dead classes, or (dead=None, only with a count plan) from the removal's counts."""
        if self._scale_plan is None:
            self._scale_plan = self._plan_scale()
        ends, sizes, by_key, key_starts, keys, by_param, param_starts, params = self._scale_plan
        if dead is None:
            index, group, mult = self._count_plan()
            removed = np.zeros(len(index) + 1, dtype=np.int64)  # the last entry answers for "no group"
            for name, idx in removal.items():
                if len(idx):
                    removed[index[name] if name in index else self._group_position(name)] = len(idx)
            n_dead = mult * removed[group]
        else:
            running = np.concatenate([[0], np.cumsum(dead[self._pos], dtype=np.int64)])
            n_dead = running[ends] - running[ends - sizes]
        part = 1.0 - n_dead / np.maximum(sizes, 1)  # kept share per live member
        frac = np.ones(len(self._param_of_key))  # per (name, dim): the smallest kept share of its members
        if by_key.size:
            frac[keys] = np.minimum.reduceat(part[by_key], key_starts)
        scale = np.ones(self._n_names + 1)
        if by_param.size:
            scale[params] = np.multiply.reduceat(frac[by_param], param_starts)
        return scale

    def _plan_scale(self) -> tuple[np.ndarray, ...]:
        """What `_param_scale` reads for every removal: the live members' end offsets and sizes
        (members without ids read a kept share of 1), and the orders that gather them per
        (name, dim) key and the keys per parameter, for exact min/product reductions."""
        all_sizes = np.asarray(self._sizes, dtype=np.int64)
        ends = np.cumsum(all_sizes)[self._live] if self._live.size else np.zeros(0, dtype=np.int64)
        sizes = all_sizes[self._live] if self._live.size else np.zeros(0, dtype=np.int64)

        def segments(owner: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            order = np.argsort(owner, kind="stable")
            uniq, starts = np.unique(owner[order], return_index=True)
            return order, starts, uniq
        by_key, key_starts, keys = segments(self._key_of)
        by_param, param_starts, params = segments(self._param_of_key)
        return ends, sizes, by_key, key_starts, keys, by_param, param_starts, params

    def node_macs(self, removal: dict[str, list[int]], dead: np.ndarray | None = None,
                  scale: np.ndarray | None = None) -> list[int]:
        """MACs of every node after the removal, for the traced batch (`_cost` makes them per
        sample): conv/linear nodes shrink by the kept fractions of their weight's channel dims,
        parameter-free products (matmul, attention) by those of the positions in each of their terms."""
        if scale is None:
            removal = self._checked(removal)
        return self._node_array(removal, dead, scale).tolist()

    def _node_array(self, removal: Mapping[str, Sequence[int]], dead: np.ndarray | None = None,
                    scale: np.ndarray | None = None) -> np.ndarray:
        if scale is None:
            dead, scale = self._read(removal)
        out = np.rint(self._node_base * scale[self._node_param]).astype(np.int64)
        if not self._terms:
            return out
        dead = self._dead(removal) if dead is None else dead
        part = lambda pos: 1.0 - float(np.count_nonzero(dead[pos])) / pos.size if pos.size else 1.0
        for i, terms in self._terms.items():
            out[i] = int(round(sum(p * math.prod(part(pos) for pos in poss) for p, poss in terms)))
        return out

    def _group_position(self, name: str) -> int:
        """Index of group `name` in the count plan (its names are re-read if groups were renamed)."""
        index = self._by_count[0]
        index.clear()
        index.update({g.name: i for i, g in enumerate(self.graph.groups)})
        if name not in index:
            self.graph.group(name)  # raises ConfigError naming the groups there are
        return index[name]

    def _checked(self, removal: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
        """The removal with every group's indices made distinct and checked against its width."""
        out = {}
        for name, idx in removal.items():
            a = np.unique(np.asarray(idx, dtype=np.int64))
            if a.size:
                size = self.graph.group(name).size
                if a[0] < 0 or a[-1] >= size:
                    raise ConfigError(f"group {name!r} has {size} channels; a removal names channel "
                                      f"{int(a[0] if a[0] < 0 else a[-1])}")
            out[name] = a
        return out

    def _read(self, removal: Mapping[str, Sequence[int]]) -> tuple[np.ndarray | None, np.ndarray]:
        """(dead classes or None, parameter scales) of a removal: by counts where the plan allows."""
        if self._count_plan() is not None:
            return None, self._param_scale(None, removal)
        dead = self._dead(removal)
        return dead, self._param_scale(dead)

    def __call__(self, removal: Mapping[str, Sequence[int]]) -> tuple[int, int]:
        """(params, MACs) after `removal` ({group: channel indices}; repeats are ignored)."""
        return self.of_distinct(self._checked(removal))

    def of_distinct(self, removal: Mapping[str, Sequence[int]]) -> tuple[int, int]:
        """`self(removal)` for a removal whose indices are distinct and in range within each
        group, as selectors give them (not checked: the greedy searches call this thousands of
        times)."""
        dead, scale = self._read(removal)
        params = int(np.rint(self._numel * scale[: len(self._numel)]).sum())
        return params, per_sample(int(self._node_array(removal, dead, scale).sum()), max(self.graph.batch, 1))


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


_WEIGHTED_OPS = frozenset({"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                           "conv_transpose3d", "linear"})


def nonzero_macs(model: nn.Module, graph: Graph) -> int:
    """MACs per sample over nonzero weights only, what a sparse kernel could at best execute.

    Every entry of a conv or Linear weight is used equally often, so a weighted node counts its
    MACs times the nonzero fraction of the (effective, masked) weight it reads. An
    nn.MultiheadAttention counts by its parts: the q, k and v projections each by their own rows
    of the in-projection, the out-projection by its weight, the attention products in full.
    Nodes without weights count in full.
    """
    batch = max(graph.batch, 1)
    total = 0.0
    for node in graph.nodes:
        owner = model.get_submodule(node.module)
        if node.op == "multi_head_attention_forward" and isinstance(owner, nn.MultiheadAttention):
            total += _mha_nonzero_macs(owner, node)
            continue
        weight = None
        if node.params:
            name, _, tensor = node.params[0].rpartition(".")
            weight = getattr(model.get_submodule(name), tensor, None)
        elif node.op in _WEIGHTED_OPS or parametrize.is_parametrized(owner, "weight"):
            # a masked weight is computed at each call (also inside a layer's own matmul), so the node
            # names no parameter: the module's weight is the one it reads
            weight = getattr(owner, "weight", None)
        total += node.macs * (_nonzero_fraction(weight) if isinstance(weight, torch.Tensor) else 1.0)
    return int(round(total / batch))


def _nonzero_fraction(t: torch.Tensor) -> float:
    return float(torch.count_nonzero(t.detach())) / t.numel() if t.numel() else 1.0


def _mha_nonzero_macs(mha: nn.MultiheadAttention, node) -> float:
    (L, *rest), key, value = node.in_shapes[0], node.in_shapes[1], node.in_shapes[2]
    B, S, E = (rest[0] if len(rest) == 2 else 1), key[0], mha.embed_dim
    out_w = mha.out_proj.weight
    if mha._qkv_same_embed_dim:
        w = mha.in_proj_weight
        projections = (w[:E], w[E:2 * E], w[2 * E:])
    else:
        projections = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    linear = [B * L * E * E, B * S * E * key[-1], B * S * E * value[-1], B * L * E * out_w.shape[0]]
    dense = [_nonzero_fraction(p) for p in (*projections, out_w)]
    return node.macs - sum(linear) + sum(m * d for m, d in zip(linear, dense))
