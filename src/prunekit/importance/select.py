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

import math
from typing import Mapping

import numpy as np
import torch

from ..core.config import check_choice, check_range
from ..core.errors import ConfigError
from ..graph import Graph, Group

NORMALIZERS = ("mean", "max", "sum", "none")


def normalize(scores: torch.Tensor, how: str) -> torch.Tensor:
    check_choice("normalizer", how, NORMALIZERS)
    if how == "none":
        return scores
    denom = {"mean": scores.mean(), "max": scores.max(), "sum": scores.sum()}[how]
    return scores / denom if float(denom) > 0 else scores


def must_keep(group: Group, scores: torch.Tensor) -> torch.Tensor:
    """Channels that stay so that no tensor is emptied: the best-scoring channel of every member
    lying wholly in this group (a conv whose outputs are one part of a concat, say), when that
    member has no unprunable channel already. Bool mask of shape (group.size,)."""
    keep = np.zeros(group.size, dtype=bool)
    prunable, s = group.prunable.numpy(), scores.detach().float().cpu().numpy()
    for m in group.members:
        ch = m.channel.numpy()
        if ch.size == 0 or ch.min() < 0 or not prunable[ch].all():
            continue
        keep[ch[np.argmax(s[ch])]] = True
    return torch.from_numpy(keep)


def _cap(group: Group, max_ratio: float, keep: torch.Tensor | None = None) -> int:
    """Most channels this group may lose: within max_ratio and keeping one removable channel
    (and every channel in `keep`)."""
    removable = int(group.prunable.sum())
    limit = removable - 1 if keep is None else int((group.prunable & ~keep).sum())
    return max(0, min(removable - 1, limit, int(math.floor(max_ratio * group.size))))


def _round_kept(group: Group, n_remove: int, round_to: int | None, cap: int) -> int:
    if not round_to or round_to <= 1:
        return n_remove
    kept = group.size - n_remove
    kept = min(group.size, int(math.ceil(kept / round_to)) * round_to)
    return max(0, min(cap, group.size - kept))


def select_removal(graph: Graph, scores: Mapping[str, torch.Tensor], ratio: float, scope: str = "local",
                   max_ratio: float = 0.9, round_to: int | None = None, normalizer: str = "mean",
                   keep: Mapping[str, torch.Tensor] | None = None) -> dict[str, list[int]]:
    """Channels to remove per group, lowest scores first. `scores` covers the groups to prune.

    `keep`: `must_keep` of every scored group, when the caller selects at many ratios."""
    check_range("ratio", ratio, 0.0, 1.0, hi_open=True)
    check_range("max_ratio", max_ratio, 0.0, 1.0)
    check_choice("scope", scope, ("local", "global"))
    groups = {name: graph.group(name) for name in scores}
    for name, s in scores.items():
        if s.shape != (groups[name].size,):
            raise ConfigError(f"scores for group {name!r} have shape {tuple(s.shape)}, expected ({groups[name].size},)")
    keep = keep if keep is not None else {n: must_keep(g, scores[n]) for n, g in groups.items()}
    if scope == "local":
        counts = {n: min(_cap(g, max_ratio, keep[n]), int(math.floor(ratio * g.size))) for n, g in groups.items()}
    else:
        counts = _global_counts(groups, scores, ratio, max_ratio, normalizer, keep)
    removal = {}
    for name, n in counts.items():
        g = groups[name]
        n = _round_kept(g, n, round_to, _cap(g, max_ratio, keep[name]))
        if n <= 0:
            continue
        s = scores[name].clone().float()
        s[~g.prunable | keep[name]] = float("inf")
        removal[name] = sorted(torch.argsort(s, stable=True)[:n].tolist())
    return removal


def _global_counts(groups, scores, ratio, max_ratio, normalizer, keep) -> dict[str, int]:
    entries = []
    for name, g in groups.items():
        s = normalize(scores[name].float(), normalizer)
        entries += [(float(s[i]), name) for i in (g.prunable & ~keep[name]).nonzero().flatten().tolist()]
    total = sum(g.size for g in groups.values())
    budget = int(math.floor(ratio * total))
    entries.sort(key=lambda e: e[0])
    counts = {n: 0 for n in groups}
    caps = {n: _cap(g, max_ratio, keep[n]) for n, g in groups.items()}
    for _, name in entries:
        if budget <= 0:
            break
        if counts[name] < caps[name]:
            counts[name] += 1
            budget -= 1
    return counts
