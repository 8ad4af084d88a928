"""From scores to a removal: which channels of which groups go, local or global.

Local: every group loses the same fraction. Global: channels of all groups compete after
per-group normalisation (scores divided by the group mean, so a wide layer with small weights
is not emptied just because of its scale). Both respect a per-group maximum ratio, always keep
at least one removable channel, and can round kept counts up to a multiple of `round_to`
(GPU kernels slow down sharply off multiples of 8).

>>> import torch
>>> from prunekit.graph import build_graph
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 2, 1))
>>> g = build_graph(m, torch.randn(1, 3, 2, 2))
>>> select_removal(g, {"0": torch.arange(8.)}, ratio=0.5)
{'0': [0, 1, 2, 3]}
"""
from __future__ import annotations

import copy
import math
from typing import Mapping

import numpy as np
import torch

from ..core.config import check_choice, check_range
from ..core.errors import ConfigError
from ..graph import Graph, Group

NORMALIZERS = ("mean", "max", "sum", "none")


def normalize(scores: torch.Tensor, how: str) -> torch.Tensor:
    """`scores` divided by their mean, max or sum of magnitudes ("none": as they are), so that
    groups of different sizes and scales rank on one scale. Magnitudes, so that signed scores
    (GraSP's) are scaled like any others rather than left raw where their mean is not positive;
    for scores >= 0 it is the plain mean, max or sum. An all-zero group stays as it is."""
    check_choice("normalizer", how, NORMALIZERS)
    if how == "none":
        return scores
    size = scores.abs()
    denom = {"mean": size.mean(), "max": size.max(), "sum": size.sum()}[how]
    return scores / denom if float(denom) > 0 else scores


def ranking_values(scores: torch.Tensor) -> torch.Tensor:
    """`scores` detached in the float type they are ranked in: float32, or float64 when they are
    float64 (SynFlow's exceed float32's range on deep nets; close scores would tie in float32)."""
    return scores.detach().to(torch.promote_types(scores.dtype, torch.float32))


def must_keep(group: Group, scores: torch.Tensor) -> torch.Tensor:
    """Channels that stay so that no tensor is emptied: the best-scoring channel of every member
    lying wholly in this group (a conv whose outputs are one part of a concat, say), when that
    member has no unprunable channel already. Bool mask of shape (group.size,)."""
    keep = np.zeros(group.size, dtype=bool)
    s = ranking_values(scores).cpu().numpy()
    for ch in _whole_members(group):
        keep[ch[np.argmax(s[ch])]] = True
    return torch.from_numpy(keep)


def _whole_members(group: Group) -> list[np.ndarray]:
    """Channel positions of every member that lies wholly in prunable channels of `group` (each
    distinct list once: a conv's filters, its norm and the next layer's inputs share one); kept on
    the group (a reused graph selects thousands of times) while its members' channel tensors and
    the values of `prunable` stay the same."""
    prunable, channels = group.prunable.cpu().numpy(), [m.channel for m in group.members]
    cached = getattr(group, "_whole", None)
    if (cached is not None and np.array_equal(cached[0], prunable) and len(cached[1]) == len(channels)
            and all(a is b for a, b in zip(cached[1], channels))):
        return cached[2]
    out, seen = [], set()
    for ch in channels:
        ch = ch.numpy()
        key = (ch.dtype.str, ch.tobytes())  # a conv's filters, its norm and the next input: one channel list
        if ch.size and ch.min() >= 0 and prunable[ch].all() and key not in seen:
            seen.add(key)
            out.append(ch)
    group._whole = (prunable.copy(), channels, out)
    return out


def _cap(group: Group, max_ratio: float, keep: torch.Tensor | None = None, first: int | None = None) -> int:
    """Most channels this group may lose: within max_ratio of `first` (its width before an
    iterative pruning began, less what it lost since; default its width now) and keeping one
    removable channel (and every channel in `keep`)."""
    removable = int(group.prunable.sum())
    limit = removable - 1 if keep is None else int((group.prunable & ~keep).sum())
    first = group.size if first is None else max(first, group.size)
    return max(0, min(removable - 1, limit, int(math.floor(max_ratio * first)) - (first - group.size)))


def smaller_multiple(multiple: int) -> int:
    """The multiple tried after `multiple`: the largest power of two below it (16 -> 8 -> 4 -> 2;
    24 -> 16 and 1000 -> 512, where halving would reach odd multiples such as 3); 1 below 2."""
    return 1 << max(0, (int(multiple) - 1).bit_length() - 1) if multiple > 1 else 1


def group_multiple(size: int, round_to: int) -> int:
    """The multiple a group of `size` channels is rounded to: `round_to`, lowered through
    `smaller_multiple` until it is below the width, so that a group no wider than the multiple can
    still shrink (8 channels with round_to=8 step by 4; 12 channels keep 8 or all 12)."""
    step = max(1, round_to)
    while step >= size and step > 1:
        step = smaller_multiple(step)
    return step


def group_multiples(graph: Graph, round_to: int | Mapping[str, int] | None) -> dict[str, int]:
    """{group: multiple} for every group of `graph`: a mapping is taken as given (groups it does
    not name are not rounded), an integer goes through `group_multiple` at each group's width."""
    if isinstance(round_to, Mapping):
        return {g.name: max(1, int(round_to.get(g.name, 1))) for g in graph.groups}
    return {g.name: group_multiple(g.size, round_to) if round_to else 1 for g in graph.groups}


def rounded_count(size: int, kept: int, step: int, cap: int, nearest: bool = False) -> int:
    """Channels removed when `kept` of `size` is rounded to a multiple of `step`: up (removing at
    most what was asked) or to the nearest multiple (at least one), and never beyond `cap`
    removed: a group held at its cap keeps the next multiple above (or all its channels)."""
    if step <= 1:
        return max(0, min(cap, size - kept))
    kept = max(step, math.floor(kept / step + 0.5) * step) if nearest else math.ceil(kept / step) * step
    kept = max(min(size, kept), min(size, math.ceil((size - cap) / step) * step))
    return max(0, size - kept)


def _round_kept(group: Group, n_remove: int, step: int, cap: int, nearest: bool = False) -> int:
    return rounded_count(group.size, group.size - n_remove, step, cap, nearest)


def select_removal(graph: Graph, scores: Mapping[str, torch.Tensor], ratio: float | Mapping[str, float],
                   scope: str = "local", max_ratio: float = 0.9, round_to: int | Mapping[str, int] | None = None,
                   normalizer: str = "mean", nearest: bool = False) -> dict[str, list[int]]:
    """Channels to remove per group, lowest scores first. `scores` covers the groups to prune;
    `ratio` may be one per group in local scope; kept counts are rounded up to `round_to`, or to
    the nearest multiple with `nearest`."""
    return RemovalSelector(graph, scores, scope, max_ratio, round_to, normalizer, nearest).select(ratio)


class RemovalSelector:
    """`select_removal` of one set of scores at many ratios (a cost-target bisection asks ~20).

    What does not depend on the ratio is computed once: every group's must-keep channels, cap and
    removal order, and for scope="global" the sorted normalised scores with, for each, whether
    its group may still lose it (its rank within the group is below the group's cap). Removing
    a budget B globally takes the first B such entries in score order: the same channels as
    walking the sorted list and skipping groups that reached their cap. Caps are max_ratio of
    `first_widths` where given (an iterative pruning's widths before its first step).
    """

    def __init__(self, graph: Graph, scores: Mapping[str, torch.Tensor], scope: str = "local",
                 max_ratio: float = 0.9, round_to: int | Mapping[str, int] | None = None, normalizer: str = "mean",
                 nearest: bool = False, first_widths: Mapping[str, int] | None = None):
        check_range("max_ratio", max_ratio, 0.0, 1.0)
        check_choice("scope", scope, ("local", "global"))
        check_choice("normalizer", normalizer, NORMALIZERS)
        self.groups = {name: graph.group(name) for name in scores}
        for name, s in scores.items():
            if s.shape != (self.groups[name].size,):
                raise ConfigError(f"scores for group {name!r} have shape {tuple(s.shape)}, expected ({self.groups[name].size},)")
        self.graph, self.scope, self.max_ratio = graph, scope, max_ratio
        self.multiples, self.nearest = group_multiples(graph, round_to), nearest
        keep = {n: must_keep(g, scores[n]) for n, g in self.groups.items()}
        first = first_widths or {}
        self.caps = {n: _cap(g, max_ratio, keep[n], first.get(n)) for n, g in self.groups.items()}
        self.order = {}
        for name, g in self.groups.items():
            s = ranking_values(scores[name]).clone()
            s[~g.prunable | keep[name]] = float("inf")
            self.order[name] = torch.argsort(s, stable=True).cpu().numpy()  # (size,) removal order, lowest first
        if scope == "global":
            self._global_table(scores, normalizer, keep)

    def _global_table(self, scores, normalizer, keep) -> None:
        names = list(self.groups)
        vals, owner = [], []
        for i, (name, g) in enumerate(self.groups.items()):
            s = normalize(ranking_values(scores[name]), normalizer)
            v = s.cpu()[g.prunable & ~keep[name]].double().numpy()  # the ranked values, in channel order
            vals.append(v)
            owner.append(np.full(v.size, i, dtype=np.int64))
        vals_np = np.concatenate(vals) if vals else np.zeros(0)
        owner_np = np.concatenate(owner) if owner else np.zeros(0, dtype=np.int64)
        ranked = owner_np[np.argsort(vals_np, kind="stable")]  # group of each entry, lowest score first
        by_group = np.argsort(ranked, kind="stable")  # entries grouped, score order within a group
        starts = np.concatenate([[0], np.cumsum(np.bincount(ranked, minlength=len(names)))[:-1]])
        rank = np.empty(ranked.size, dtype=np.int64)
        rank[by_group] = np.arange(ranked.size) - starts[ranked[by_group]]
        caps = np.array([self.caps[n] for n in names], dtype=np.int64)
        self._names, self._eligible = names, ranked[rank < caps[ranked]] if ranked.size else ranked
        self._total = sum(g.size for g in self.groups.values())

    def rounded(self, round_to: int | Mapping[str, int] | None, nearest: bool = False) -> "RemovalSelector":
        """This selector with kept counts rounded to `round_to` instead: the rankings are shared,
        nothing is recomputed."""
        other = copy.copy(self)
        other.multiples, other.nearest = group_multiples(self.graph, round_to), nearest
        return other

    def select(self, ratio: float | Mapping[str, float]) -> dict[str, list[int]]:
        """`at` for a ratio given by a caller: checked first (`select_removal`)."""
        if isinstance(ratio, Mapping) and self.scope != "local":
            raise ConfigError("a ratio per group needs scope='local'")
        if isinstance(ratio, Mapping):
            names = {g.name for g in self.graph.groups}
            unknown = [n for n in ratio if n not in names]
            if unknown:
                raise ConfigError(f"ratio names no group {unknown[0]!r}; groups: {', '.join(sorted(names))}")
        for r in ratio.values() if isinstance(ratio, Mapping) else [ratio]:
            check_range("ratio", r, 0.0, 1.0, hi_open=True)
        return self.at(ratio)

    def counts(self, ratio: float | Mapping[str, float]) -> dict[str, int]:
        """How many channels each group loses at `ratio`, before rounding to `round_to`."""
        if self.scope == "local":  # `ratio` may be one per group ({group: ratio}) in local scope
            per = ratio if isinstance(ratio, Mapping) else dict.fromkeys(self.groups, ratio)
            return {n: min(self.caps[n], int(math.floor(per.get(n, 0.0) * g.size))) for n, g in self.groups.items()}
        budget = max(0, int(math.floor(ratio * self._total)))
        taken = np.bincount(self._eligible[:budget], minlength=len(self._names))
        return dict(zip(self._names, taken.tolist()))

    def at(self, ratio: float | Mapping[str, float]) -> dict[str, list[int]]:
        """Channels to remove per group at `ratio` (see `select_removal`), sorted."""
        return {name: np.sort(idx).tolist() for name, idx in self.indices_at(ratio).items()}

    def indices_at(self, ratio: float | Mapping[str, float]) -> dict[str, np.ndarray]:
        """The same channels as `at`, unsorted arrays (what a cost estimate needs, cheaper)."""
        removal = {}
        for name, n in self.counts(ratio).items():
            n = _round_kept(self.groups[name], n, self.multiples[name], self.caps[name], self.nearest)
            if n > 0:
                removal[name] = self.order[name][:n]
        return removal
