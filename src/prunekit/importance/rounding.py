"""Round kept widths to a multiple without overshooting a cost target.

Rounding every group's kept count up to a multiple of `round_to` after the target search makes
all widths jump together: a bisection on the ratio then finds that e.g. 16 channels can only be
8 or 16, and resnet56 at `macs_fraction=0.5, round_to=8` lands at 0.25 of the MACs. Here the
rounding is done jointly with the target instead:

1. start from the unrounded removal that meets the target;
2. round each group's kept count *up* to a multiple (the cost is now above the target), or to
   the *nearest* one (`nearest=True`, what the magnitude pruner's local scope uses: the same share
   of every group, as unrounded, and only the margin moves);
3. while the cost is above the target, take one more multiple from the group whose next step
   loses the least normalised importance per unit of cost saved, re-estimating the cost exactly
   after each pick;
4. give multiples back, most importance regained per unit of cost first, while the target still
   holds (the last pick of step 3 can be a large step that left slack).

Tolerance (what the tests check): the result meets the target (cost <= target). Rounded up, it
is below it by at most the largest saving of one step of one group (one multiple of its
channels), since the last pick started above the target. From the nearest multiple the start
may already be below the target (resnet20, multiples of 16: 0.347 of the MACs for 0.5); the
give-back pass (step 4) brings it back (0.484), and callers check the landing (`round_slack`). Step savings shrink as neighbours shrink, so the savings
measured at the start bound the gap (`RoundingResult.max_step`).

>>> import torch
>>> from prunekit.graph import build_graph
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1), torch.nn.Conv2d(16, 2, 1))
>>> g = build_graph(m, torch.randn(1, 3, 2, 2))
>>> cost = lambda rem: 16 - len(rem.get("0", []))  # kept channels stand in for the cost
>>> r = round_to_target(g, {"0": torch.arange(16.)}, {"0": list(range(5))}, 8, cost, target=11)
>>> len(r.removal["0"]), r.cost
(8, 8)
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np
import torch

from ..core.errors import ConfigError
from ..graph import Graph
from .select import _cap, group_multiples, must_keep, normalize, ranking_values, rounded_count


@dataclasses.dataclass
class RoundingResult:
    removal: dict[str, list[int]]
    cost: float  # cost of `removal` (the last exact estimate)
    max_step: float  # largest cost saving of one step of one group at the rounded start
    picks: int  # steps taken after rounding up


def _next_kept(size: int, kept: int, multiple: int) -> int:
    """Largest multiple of `multiple` below `kept` (a full group of odd size steps to its floor)."""
    return (kept - 1) // multiple * multiple


class _Group:
    """One group's removal order (least important first) and its normalised scores."""

    def __init__(self, graph: Graph, name: str, scores: torch.Tensor, keep: torch.Tensor, max_ratio: float,
                 normalizer: str, first: int | None = None):
        g = graph.group(name)
        self.size = g.size
        s = normalize(ranking_values(scores), normalizer)
        masked = s.clone()
        masked[~g.prunable | keep] = float("inf")
        self.ranked = torch.argsort(masked, stable=True).cpu().numpy()
        # prefix[n]: the normalised importance of the n least important channels, in float64
        self.prefix = np.concatenate(([0.0], np.cumsum(s.double().cpu().numpy()[self.ranked])))
        self.cap = _cap(g, max_ratio, keep, first)

    def channels(self, n: int) -> np.ndarray:
        """The `n` least important channels, unsorted (what a cost estimate reads)."""
        return self.ranked[:n]

    def loss(self, n_from: int, n_to: int) -> float:
        return float(self.prefix[n_to] - self.prefix[n_from])


def round_to_target(graph: Graph, scores: Mapping[str, torch.Tensor], removal: Mapping[str, list[int]],
                    round_to: int | Mapping[str, int], cost: Callable[[dict[str, list[int]]], float],
                    target: float, max_ratio: float = 0.9, normalizer: str = "mean",
                    keep: Mapping[str, torch.Tensor] | None = None, refresh_every: int | None = None,
                    best_effort: bool = False, nearest: bool = False,
                    max_kept: Mapping[str, int] | None = None,
                    first_widths: Mapping[str, int] | None = None) -> RoundingResult:
    """Kept counts rounded to multiples of `round_to` with cost(removal) <= target.

    `removal` is an unrounded removal (channels per group, ideally meeting the target); the
    groups to round are those in `scores`. `cost` maps a removal ({group: distinct channel
    indices, an unsorted array}) to the targeted quantity (MACs, params or estimated latency) and
    must not increase when channels are removed.
    `round_to` may differ per group ({group: multiple}); starting from an empty removal with
    multiples of a few percent of each group's width, this is a greedy allocation of the whole
    target. `refresh_every`: re-measure every group's next saving after that many picks (savings
    shrink as neighbours shrink; a long greedy run should not rank groups on stale savings).
    `best_effort`: when every group is at its cap before the target holds, return that removal
    (its cost says how far it got) instead of raising. `nearest`: start from each kept count
    rounded to the *nearest* multiple (at least one) instead of up, so that the allocation of
    `removal` (e.g. the same share of every group) is kept and only the margin is re-allocated.
    `max_kept`: the most channels a group may keep ({group: count}; e.g. the gates still open
    after a gate-based method's training, so that rounding never reopens a closed one): a rounded
    count above it goes down to the multiple below (or to the count itself, below one multiple),
    and no multiple is given back past it; a group never loses more than its cap, so one whose
    protected channels outnumber `max_kept` keeps them. `first_widths`: the widths max_ratio is a
    share of ({group: width} before an iterative pruning's first step; default the widths now).
    """
    if min(round_to.values() if isinstance(round_to, Mapping) else [round_to], default=1) < 1:
        raise ConfigError(f"round_to={round_to} must be >= 1")
    multiples = group_multiples(graph, round_to)  # an integer is halved below narrow groups' widths
    keep = keep or {n: must_keep(graph.group(n), s) for n, s in scores.items()}
    first = first_widths or {}
    groups = {n: _Group(graph, n, s, keep[n], max_ratio, normalizer, first.get(n)) for n, s in scores.items()}
    counts = {}
    limit = {n: g.size for n, g in groups.items()} | {n: int(k) for n, k in (max_kept or {}).items() if n in groups}
    for n, g in groups.items():
        kept = g.size - len(removal.get(n, []))
        counts[n] = rounded_count(g.size, kept, multiples[n], g.cap, nearest)
        if g.size - counts[n] > limit[n]:  # down to max_kept, but never past the cap (protected channels)
            m = multiples[n]
            counts[n] = min(g.cap, g.size - (limit[n] // m * m if limit[n] >= m else limit[n]))
    current = _materialise(groups, counts)
    cur = cost(current)

    def step_of(n: str) -> tuple[tuple[int, float], int, float] | None:
        """(importance lost per cost saved, new count, saving) of `n`'s next multiple; None when capped."""
        g = groups[n]
        new = g.size - _next_kept(g.size, g.size - counts[n], multiples[n])
        if new > g.cap or new <= counts[n]:
            return None
        trial = dict(current)
        trial[n] = g.channels(new)
        saved, loss = cur - cost(trial), g.loss(counts[n], new)
        # a step that saves nothing (a flat stretch of a latency table) stays available, ranked
        # after every step that saves something, least importance first
        return ((0, loss / saved) if saved > 0 else (1, loss)), new, max(saved, 0.0)

    steps = {n: step_of(n) for n in groups}
    max_step = max((s[2] for s in steps.values() if s is not None), default=0.0)
    picks = 0
    while cur > target:
        live = [(s[0], n) for n, s in steps.items() if s is not None]
        if not live:
            if best_effort:
                break
            shown = round_to if not isinstance(round_to, Mapping) else max(round_to.values(), default=1)
            raise ConfigError(f"impossible target with round_to={shown}: every group is at its smallest multiple or "
                              f"at max_ratio={max_ratio} and the cost is still {cur:,.0f} (> {target:,.0f}); use a "
                              "smaller round_to, raise max_ratio or ask for a larger fraction")
        (kind, _), name = min(live)
        if kind == 1 and best_effort:
            break  # only steps that save nothing are left: removing more buys no cost
        counts[name] = steps[name][1]
        current[name] = groups[name].channels(counts[name])
        cur = cost(current)  # exact after each pick; other groups' savings are re-used (they only shrink)
        picks += 1
        refresh = refresh_every and picks % refresh_every == 0
        steps.update({n: step_of(n) for n in (groups if refresh else [name])})
    if cur <= target:
        cur = _give_back(groups, counts, current, multiples, cost, cur, target, limit)
    return RoundingResult({n: np.sort(r).tolist() for n, r in current.items() if len(r)}, cur, max_step, picks)


def _give_back(groups: dict[str, "_Group"], counts: dict[str, int], current: dict[str, list[int]],
               multiples: dict[str, int], cost: Callable[[dict[str, list[int]]], float], cur: float,
               target: float, limit: dict[str, int]) -> float:
    """Fill the slack the last pick left under the target: give one multiple back to the groups
    that regain the most normalised importance per unit of cost, while the target still holds.
    (The last pick may be a large step of a wide group; this lands closer to the target.) Each
    group's restore is costed once, then tried in that order against the exact cost."""
    def restored(n: str) -> int:
        g = groups[n]
        return g.size - min(g.size, g.size - counts[n] + multiples[n])

    ranked = []
    for n, g in groups.items():
        if counts[n] == 0 or g.size - restored(n) > limit[n]:
            continue
        trial = dict(current)
        trial[n] = g.channels(restored(n))
        c = cost(trial)
        if c <= target:
            ranked.append((-g.loss(restored(n), counts[n]) / max(c - cur, 1e-12), n))
    for _, n in sorted(ranked):
        new = restored(n)
        trial = dict(current)
        trial[n] = groups[n].channels(new)
        c = cost(trial)
        if c <= target:
            counts[n], current[n], cur = new, trial[n], c
    return cur


def _materialise(groups: dict[str, _Group], counts: dict[str, int]) -> dict[str, np.ndarray]:
    return {n: groups[n].channels(c) for n, c in counts.items() if c > 0}
