"""The reference structured pruner: score groups, pick channels, remove them physically.

Targets: exactly one of `channel_ratio` (fraction of each group's channels removed, or of all
channels with scope="global"), `params_fraction` or `macs_fraction` (fraction of the original
parameters/MACs that remains; the removal ratio is found by bisection on an exact cost estimate).
`steps` > 1 prunes iteratively along a linear schedule, calling `between_steps(model, step)`
(e.g. a short fine-tune) after each step.

>>> import torch, torch.nn as nn
>>> from prunekit.methods import prune_
>>> m = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Conv2d(64, 4, 1))
>>> r = prune_(m, MagnitudeConfig(macs_fraction=0.5, scope="global"), torch.randn(1, 3, 12, 12))
>>> 0.47 < r.cost_after.macs / r.cost_before.macs <= 0.5
True
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..core.config import Config, check_choice, check_range
from ..core.errors import ConfigError, PrunekitError, PruningError
from ..cost.macs import cost_after, cost_from_graph, estimate_cost
from ..graph import Graph
from ..importance.criteria import CRITERIA, REDUCTIONS, ScoreContext
from ..importance.select import NORMALIZERS, select_removal
from ..surgery.copying import adopt_, share_copy
from ..surgery.plan import Plan, make_plan
from ..surgery.shrink import remove_channels_
from ..surgery.verify import build_safe_graph, run_model
from .result import PruneResult


@dataclasses.dataclass
class MagnitudeConfig(Config):
    criterion: str = "l2"
    reduction: str = "mean"
    normalizer: str = "mean"
    scope: str = "local"
    channel_ratio: float | None = None
    params_fraction: float | None = None
    macs_fraction: float | None = None
    max_ratio: float = 0.9
    round_to: int | None = None
    steps: int = 1
    ignore: list[str] = dataclasses.field(default_factory=list)
    seed: int = 0
    probe: bool = True  # check every group on the real model first (see surgery/verify.py)

    def validate(self) -> None:
        check_choice("criterion", self.criterion, CRITERIA.list())
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_choice("normalizer", self.normalizer, NORMALIZERS)
        check_choice("scope", self.scope, ("local", "global"))
        given = [k for k in ("channel_ratio", "params_fraction", "macs_fraction") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError("give exactly one target: channel_ratio (fraction of channels removed), "
                              f"params_fraction or macs_fraction (fraction that remains); got {given or 'none'}")
        if self.channel_ratio is not None:
            check_range("channel_ratio", self.channel_ratio, 0.0, 1.0, hi_open=True)
        for k in ("params_fraction", "macs_fraction"):
            if getattr(self, k) is not None:
                check_range(k, getattr(self, k), 0.0, 1.0, lo_open=True)
        check_range("max_ratio", self.max_ratio, 0.0, 1.0, hi_open=True)
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise ConfigError(f"round_to={self.round_to!r} must be a positive integer (e.g. 8) or null")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps={self.steps!r} must be an integer >= 1")


def score_groups(model: nn.Module, graph: Graph, cfg: MagnitudeConfig, batches: Iterable | None,
                 example_inputs: Any = None) -> dict[str, torch.Tensor]:
    ctx = ScoreContext(model, batches=batches, reduction=cfg.reduction, seed=cfg.seed, example_inputs=example_inputs)
    criterion = CRITERIA.get(cfg.criterion)
    return {g.name: criterion(g, ctx) for g in graph.prunable_groups()}


def _removal_at(graph, scores, cfg, ratio):
    return select_removal(graph, scores, ratio, cfg.scope, cfg.max_ratio, cfg.round_to, cfg.normalizer)


def _search_ratio(model, graph, scores, cfg, which: str, target: float) -> dict[str, list[int]]:
    """Smallest ratio whose estimated cost ({which}) is <= target (absolute count)."""
    pick = 0 if which == "params" else 1
    cost = lambda r: estimate_cost(model, graph, _removal_at(graph, scores, cfg, r))[pick]
    hi = cfg.max_ratio if cfg.max_ratio < 1 else 0.999
    if cost(hi) > target:
        raise ConfigError(f"impossible target: removing up to max_ratio={cfg.max_ratio} of every group still "
                          f"leaves {cost(hi):,} {which} (> {int(target):,}); raise max_ratio, use scope='global' "
                          "or ask for a larger fraction")
    lo = 0.0
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) > target else (lo, mid)
    return _removal_at(graph, scores, cfg, hi)


def magnitude_prune_(model: nn.Module, cfg: MagnitudeConfig, example_inputs: Any, batches: Iterable | None = None,
                     between_steps: Callable[[nn.Module, int], None] | None = None) -> PruneResult:
    graph = build_safe_graph(model, example_inputs, cfg.ignore, probe=cfg.probe)
    before = cost_from_graph(model, graph)
    # the user's model changes only once everything succeeded; scoring on batches (gradients) or
    # fine-tuning between steps writes into tensors, so those need a copy of every weight
    work = share_copy(model) if batches is None and between_steps is None else copy.deepcopy(model)
    plan: Plan | None = None
    for step in range(1, cfg.steps + 1):
        if step > 1:
            graph = build_safe_graph(work, example_inputs, cfg.ignore, probe=cfg.probe)
        scores = score_groups(work, graph, cfg, batches, example_inputs)
        frac = step / cfg.steps
        if cfg.channel_ratio is not None:
            done = cfg.channel_ratio * (step - 1) / cfg.steps
            removal = _removal_at(graph, scores, cfg, (cfg.channel_ratio * frac - done) / (1 - done))
        else:
            which = "params" if cfg.params_fraction is not None else "macs"
            final = cfg.params_fraction if which == "params" else cfg.macs_fraction
            goal = (1 - (1 - final) * frac) * (before.params if which == "params" else before.macs)
            removal = _search_ratio(work, graph, scores, cfg, which, goal)
        step_plan = make_plan(graph, removal, example_inputs, cfg.ignore)
        remove_channels_(work, graph, removal)
        plan = step_plan if plan is None else plan.compose(step_plan)
        if between_steps is not None:
            between_steps(work, step)
    try:  # a pruned model that no longer runs never reaches the caller
        run_model(work, example_inputs)
    except PrunekitError:
        raise
    except Exception as err:
        raise PruningError(
            f"the pruned model no longer runs ({type(err).__name__}: {str(err)[:200]}); its forward hard-codes "
            "a channel count the trace cannot see. Prune with probe=True (the default), which tests every group "
            "first, or ignore the layers involved; the model was left unchanged") from None
    after = cost_after(work, graph, removal)  # exact: tests compare it with a recount
    adopt_(model, work)
    plan.meta.update({"method": "magnitude", "config": cfg.to_dict()})
    return PruneResult(plan, before, after, cfg.to_dict(), metrics=_capped_note(cfg))


def _capped_note(cfg: MagnitudeConfig) -> dict[str, Any]:
    """{"notes": [...]} when channel_ratio asks for more than max_ratio lets any group lose."""
    if cfg.channel_ratio is None or cfg.channel_ratio <= cfg.max_ratio:
        return {}
    note = (f"channel_ratio={cfg.channel_ratio} was capped at max_ratio={cfg.max_ratio}: no group loses more "
            "than that share of its channels; raise max_ratio to remove more")
    warnings.warn(note, stacklevel=3)
    return {"notes": [note]}


from . import register_method  # noqa: E402

register_method("magnitude", MagnitudeConfig, magnitude_prune_)
