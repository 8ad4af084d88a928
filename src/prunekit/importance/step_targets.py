"""How many channels one pruning step removes, and which: the channel-ratio, params or MACs
target of step `step` of `cfg.steps`, searched unrounded and then aligned to a multiple of
`cfg.round_to` (halved where it would land more than `cfg.round_slack` from the target).

`cfg` is a `MagnitudeConfig` (methods/magnitude.py): every channel method built on it shares this
selection. Latency targets have their own allocation (importance/latency_target.py).
"""
from __future__ import annotations

from typing import Any, Callable

from ..core.errors import ConfigError
from ..cost.macs import Cost, CostEstimator
from ..graph import Graph
from .rounding import round_to_target
from .select import RemovalSelector, group_multiple, smaller_multiple


def search_ratio(graph: Graph, scores, cfg: Any, which: str, target: float,
                  estimator: CostEstimator, first_widths: dict[str, int]) -> dict[str, list[int]]:
    """Smallest unrounded ratio whose estimated cost ({which}) is <= target (absolute count).

    The estimate table (`estimator`) and the ranking of channels (`RemovalSelector`) are built
    once for all bisection steps; max_ratio is a share of `first_widths`."""
    pick = 0 if which == "params" else 1
    selector = RemovalSelector(graph, scores, cfg.scope, cfg.max_ratio, None, cfg.normalizer,
                               first_widths=first_widths)
    cost = lambda r: estimator.of_distinct(selector.indices_at(r))[pick]
    hi = cfg.max_ratio if cfg.max_ratio < 1 else 0.999
    at_hi = cost(hi)
    if at_hi > target:
        # every group already at its cap: scope cannot help, only a higher cap or a looser target
        raise ConfigError(f"impossible target: removing up to max_ratio={cfg.max_ratio} of every group still "
                          f"leaves {at_hi:,} {which} (> {int(target):,}); "
                          + ("raise max_ratio or " if cfg.max_ratio < 0.999 else "")
                          + "ask for a larger fraction (what is left is the share max_ratio keeps in every group and the "
                          "layers no prunable group shrinks: the input and output layers, ignored layers and "
                          "groups that cannot be pruned)")
    lo = 0.0
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) > target else (lo, mid)
    return selector.at(hi)


Attempt = Callable[[dict[str, int] | None], tuple[dict[str, list[int]], float]]


def aligned_removal(cfg: Any, first_widths: dict[str, int], attempt: Attempt, record: dict[str, Any],
             target: str, step: int = 1) -> dict[str, list[int]]:
    """`attempt(multiples)` -> (removal, shortfall: how far it lands short of the target, as a share
    of the model), with cfg.round_to at the first step's widths; where the rounded removal cannot
    meet the target or lands further from it than `round_slack`, the multiple is lowered (16, 8, 4,
    2; `smaller_multiple`). When every multiple lands further than that, the last one that met the target is kept
    (the note says so); the unrounded removal only when none can meet it. What was used goes
    into `record`."""
    if not cfg.round_to or cfg.round_to <= 1:
        return attempt(None)[0]
    # an earlier step's halved multiple carries forward, so that every step's widths stay aligned to it
    m, tried, removal, used = min(cfg.round_to, record.get("multiple") or cfg.round_to), [], None, 1
    while m >= 2:
        try:
            rounded, short = attempt({n: group_multiple(w, m) for n, w in first_widths.items()})
        except ConfigError as err:  # the rounded widths cannot reach the target
            tried.append({"multiple": m, "error": str(err)[:200], "step": step})
        else:
            tried.append({"multiple": m, "shortfall": short, "step": step})
            removal, used = rounded, m
            if cfg.round_slack is None or abs(short) <= cfg.round_slack:  # either way: channels may land over
                break
        m = smaller_multiple(m)
    if removal is None:
        removal, used = attempt(None)[0], 1
    record.update(round_to=cfg.round_to, multiple=used, tried=record.get("tried", []) + tried, target=target,
                  steps=cfg.steps)
    return removal


def step_removal(graph: Graph, scores, cfg: Any, step: int, before: Cost,
                  estimator: CostEstimator, first_widths: dict[str, int], record: dict[str, Any]) -> dict[str, list[int]]:
    frac = step / cfg.steps
    nearest = cfg.scope == "local"  # local: the same share of every group, only the margin moves
    if cfg.channel_ratio is not None:
        if cfg.scope == "local":  # each group's share still due, from its first width (rounding may have held it back)
            ratio = {g.name: max(0.0, 1 - first_widths.get(g.name, g.size) * (1 - cfg.channel_ratio * frac) / g.size)
                     for g in graph.groups}
        else:  # the global share still due, from the channels actually left
            left = sum(graph.group(n).size for n in scores) / max(1, sum(first_widths.get(n, 0) for n in scores))
            ratio = max(0.0, min(0.999, 1 - (1 - cfg.channel_ratio * frac) / max(left, 1e-9)))
        total = sum(first_widths.get(n, graph.group(n).size) for n in scores)  # shares of the model given
        selector = RemovalSelector(graph, scores, cfg.scope, cfg.max_ratio, None, cfg.normalizer,
                                   first_widths=first_widths)
        unrounded = selector.select(ratio)
        due = sum(len(v) for v in unrounded.values())

        def by_ratio(multiples):
            if multiples is None:
                return unrounded, 0.0
            removal = selector.rounded(multiples, nearest).at(ratio)
            return removal, (due - sum(len(v) for v in removal.values())) / max(total, 1)
        return aligned_removal(cfg, first_widths, by_ratio, record, "channels", step)
    which = "params" if cfg.params_fraction is not None else "macs"
    final = cfg.params_fraction if which == "params" else cfg.macs_fraction
    whole = before.params if which == "params" else before.macs  # shortfalls are shares of the model given
    goal = (1 - (1 - final) * frac) * whole
    pick = 0 if which == "params" else 1
    start = search_ratio(graph, scores, cfg, which, goal, estimator, first_widths)
    exact = lambda removal: estimator.of_distinct(removal)[pick]

    def by_cost(multiples):
        if multiples is None:
            return start, (goal - exact(start)) / max(whole, 1)
        res = round_to_target(graph, scores, start, multiples, exact, goal, cfg.max_ratio, cfg.normalizer,
                              nearest=nearest, first_widths=first_widths)
        return res.removal, (goal - res.cost) / max(whole, 1)
    return aligned_removal(cfg, first_widths, by_cost, record, which, step)


def rounding_note(r: dict[str, Any], slack: float | None) -> str | None:
    """What the rounding did, in plain words, when it used a smaller multiple than round_to or kept
    one that lands further than `slack` from the target; None when neither.

    >>> print(rounding_note({"multiple": 2, "round_to": 16, "target": "macs", "tried": [
    ...     {"multiple": 16, "shortfall": 0.062}, {"multiple": 8, "shortfall": 0.06},
    ...     {"multiple": 4, "shortfall": 0.054}, {"multiple": 2, "shortfall": 0.025}]}, 0.02))
    widths rounded to multiples of 2 instead of 16: with multiples of 4 the model would keep 5.4% of its MACs less than the target, more than round_slack=0.02 allows. Multiples of 2 still miss it by 2.5% (also more than round_slack) and are kept, being the finest rounding tried. round_to=null leaves widths unaligned (not necessarily nearer the target: each group still moves in whole channels); round_slack=null keeps the coarsest multiple that meets the target.
    """
    used = r["multiple"]
    own = next((t for t in reversed(r["tried"]) if t["multiple"] == used and "shortfall" in t), None)
    beyond = own is not None and slack is not None and abs(own["shortfall"]) > slack
    exact = ("round_to=null leaves widths unaligned (not necessarily nearer the target: each group still "
             "moves in whole channels)")
    if used >= r["round_to"]:  # nothing smaller was used: said only when the multiple kept is beyond the slack
        if not beyond:
            return None
        return (f"widths rounded to multiples of {used} miss the target by {abs(own['shortfall']):.1%} of the model, "
                f"more than round_slack={slack} allows; no finer multiple is tried. {exact}.")
    first = next((t for t in reversed(r["tried"]) if t["multiple"] > used), r["tried"][0])  # the last one refused
    if "error" in first:
        why = f"with multiples of {first['multiple']} the target cannot be met"
    elif r["target"] == "channels":
        off = first["shortfall"]
        why = (f"with multiples of {first['multiple']} the model would lose {abs(off):.1%} of its channels "
               f"{'fewer' if off > 0 else 'more'} than asked, more than round_slack={slack} allows")
    else:
        what = {"macs": "MACs", "params": "params"}[r["target"]]
        why = (f"with multiples of {first['multiple']} the model would keep {first['shortfall']:.1%} of its {what} "
               f"less than the target, more than round_slack={slack} allows")
    if (r.get("steps") or 1) > 1 and "step" in first:  # a multiple lowered at one step holds for the later ones
        why = f"at step {first['step']} of {r['steps']}, {why}"
    now = f"rounded to multiples of {used}" if used > 1 else "left unrounded"
    text = f"widths {now} instead of {r['round_to']}: {why}."
    if beyond:  # kept as the closest that meets it
        text += (f" Multiples of {used} still miss it by {abs(own['shortfall']):.1%} (also more than round_slack) "
                 "and are kept, being the finest rounding tried.")
    if used > 1:
        text += f" {exact}"
        text += "; round_slack=null keeps the coarsest multiple that meets the target." if slack is not None else "."
    return text
