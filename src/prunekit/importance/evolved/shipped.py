"""The evolved functions and the seed metrics as criteria of the core pruner.

Registered names: ga_func1..ga_func4 (ga_func2 = the paper's Eq. 3), abs_snr, fdr, sym_div,
t_stat (class statistics of the scored activation, see `stats.py`; they need calibration
batches of (inputs, labels)) and seed_l1, seed_l2, seed_geo_median (the seeds' weight metrics
on each channel's incoming filters; data-free). The seed weight metrics differ from the core's
`l1`/`l2` on purpose: they read only the producing filters (the authors' WI), not the whole
group, and drop the constant factor C (number of classes) the authors' class loop multiplies in.

>>> import torch
>>> from prunekit.methods import prune_
>>> from prunekit.methods.magnitude import MagnitudeConfig
>>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 36, 3))
>>> data = [(torch.randn(12, 1, 8, 8), torch.arange(12) % 3)]
>>> r = prune_(m, MagnitudeConfig(criterion="ga_func2", channel_ratio=0.5), torch.zeros(1, 1, 8, 8), batches=data)
>>> m[0].out_channels
4
"""
from __future__ import annotations

import torch

from ...core.errors import ConfigError
from ...graph import Group
from ..criteria import CRITERIA, ScoreContext, register_criterion_factory
from .closed_forms import FILTER_FUNCTIONS, STAT_FUNCTIONS
from .stats import ClassStats, collect_class_stats


def class_stats(group: Group, ctx: ScoreContext, who: str = "class-statistics") -> ClassStats:
    """The group's streamed class statistics, computed once per context (one pass for every
    prunable group of `ctx.graph` when it is set)."""
    cache = ctx.cache.setdefault("class_stats", {})
    if group.name not in cache:
        batches = ctx.require_batches(who)
        groups = ctx.graph.prunable_groups() if ctx.graph is not None else [group]
        if group.name not in {g.name for g in groups}:
            groups = [group]
        cache.update(collect_class_stats(ctx.model, groups, batches))
    return cache[group.name]


def incoming_filters(group: Group, ctx: ScoreContext) -> torch.Tensor:
    """(K, F): each channel's producing weights (all "out" weight members, flattened and joined);
    a group with no producer uses its consumers' input slices instead."""
    params = ctx.parameters()
    for roles in (("out",), ("in",)):
        rows = []
        for m in group.tensor_members():
            if m.role in roles and m.name == "weight" and m.qualname in params:
                w = params[m.qualname].detach().double().cpu()  # scored on the CPU in float64
                flat = w.movedim(m.dim, 0).reshape(w.shape[m.dim], -1)
                per = [flat[(m.channel == k).nonzero().flatten()].reshape(-1) for k in range(group.size)]
                if len({p.numel() for p in per}) == 1 and per[0].numel() > 0:
                    rows.append(torch.stack(per))
        if rows:
            return torch.cat(rows, 1)
    raise ConfigError(f"group {group.name!r} has no weight to score; use a data criterion such as ga_func2")


DESCRIPTIONS = {  # one line each, for `prunekit info criteria`
    "ga_func1": "evolved GA_Func1 (Liu et al.) on per-class activation statistics (needs labelled data)",
    "ga_func2": "evolved GA_Func2 = the paper's Eq. 3, factor D kept (needs labelled data)",
    "ga_func3": "evolved GA_Func3 (Liu et al.) on per-class activation statistics (needs labelled data)",
    "ga_func4": "evolved GA_Func4 (Liu et al.) on per-class activation statistics (needs labelled data)",
    "abs_snr": "seed metric: one-vs-rest |mu_P - mu_Q| / (std_P + std_Q), summed over classes (needs labelled data)",
    "fdr": "seed metric: Fisher discriminant ratio, one-vs-rest, summed over classes (needs labelled data)",
    "sym_div": "seed metric: symmetric divergence, one-vs-rest, summed over classes (needs labelled data)",
    "t_stat": "seed metric: two-sample t statistic, one-vs-rest, summed over classes (needs labelled data)",
    "seed_l1": "seed metric: L1 norm of each channel's producing filters only (not the whole group)",
    "seed_l2": "seed metric: L2 norm of each channel's producing filters only (not the whole group)",
    "seed_geo_median": "seed metric: distance of each channel's filters to the layer's medoid filter (FPGM-like)",
}


def _stat_criterion(name, fn):
    def criterion(group: Group, ctx: ScoreContext) -> torch.Tensor:
        return fn(class_stats(group, ctx, name).moments()).float()
    criterion.__doc__ = f"{DESCRIPTIONS[name]}.\n\n{fn.__doc__}"
    return criterion


def _filter_criterion(name, fn):
    def criterion(group: Group, ctx: ScoreContext) -> torch.Tensor:
        return fn(incoming_filters(group, ctx)).float()
    criterion.__doc__ = f"{DESCRIPTIONS[name]}.\n\n{fn.__doc__}"
    return criterion


for _name, _fn in STAT_FUNCTIONS.items():
    CRITERIA.register(_name, _stat_criterion(_name, _fn))
for _name, _fn in FILTER_FUNCTIONS.items():
    CRITERIA.register(_name, _filter_criterion(_name, _fn))


def _evolved_factory(text: str):
    from .tree_eval import create_evolved_criterion  # imports DEAP only when an expression is used

    return create_evolved_criterion(text)


register_criterion_factory("evolved", _evolved_factory)
