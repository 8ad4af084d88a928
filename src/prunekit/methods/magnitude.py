"""The reference structured pruner: score groups, pick channels, remove them physically.

Targets: exactly one of `channel_ratio` (fraction of each group's channels removed, or of all
channels with scope="global"), `params_fraction` or `macs_fraction` (fraction of the original
parameters/MACs that remains; the removal ratio is found by bisection on an exact cost estimate).
`latency_fraction` is the fraction of the measured latency that remains, on the device, batch,
dtype and memory format that `latency` (LatencyConfig fields; default CPU, float32, batch 1,
1 thread) states: channels go where they buy the most milliseconds for the least importance, and
the pruned model is measured (importance/latency_target.py; met within `latency_tolerance` or
the result says by how much it missed). `round_to` rounds kept widths to a multiple jointly with
a params/MACs/latency target (never overshooting it: importance/rounding.py); "auto" measures
the multiple the device rewards (cost/alignment.py). `memory_format` "channels_last" converts the
pruned model, "auto" keeps whichever format is faster on the `latency` settings (result
metrics["memory_format"]). `steps` > 1 prunes iteratively along a linear schedule, calling
`between_steps(model, step)` (e.g. a short fine-tune) after each step.

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
from ..cost.alignment import pick_round_to
from ..cost.latency import LatencyConfig
from ..cost.macs import cost_after, cost_from_graph, estimate_cost
from ..cost.memory_format import MEMORY_FORMATS, apply_memory_format_
from ..importance.latency_target import latency_removal
from ..graph import Graph
from ..importance.criteria import CRITERIA, REDUCTIONS, ScoreContext
from ..importance.rounding import round_to_target
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
    round_to: int | str | None = None  # a multiple, "auto" (measured: cost/alignment.py) or None
    steps: int = 1
    ignore: list[str] = dataclasses.field(default_factory=list)
    seed: int = 0
    probe: bool = True  # check every group on the real model first (see surgery/verify.py)
    latency_fraction: float | None = None
    latency_tolerance: float = 0.05  # |measured fraction - latency_fraction| accepted
    latency: dict = dataclasses.field(default_factory=dict)  # LatencyConfig fields (device, batch_size, ...)
    memory_format: str = "contiguous"

    def validate(self) -> None:
        check_choice("criterion", self.criterion, CRITERIA.list())
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_choice("normalizer", self.normalizer, NORMALIZERS)
        check_choice("scope", self.scope, ("local", "global"))
        given = [k for k in TARGETS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError("give exactly one target: channel_ratio (fraction of channels removed), "
                              "params_fraction, macs_fraction or latency_fraction (fraction that remains); "
                              f"got {given or 'none'}")
        if self.channel_ratio is not None:
            check_range("channel_ratio", self.channel_ratio, 0.0, 1.0, hi_open=True)
        for k in ("params_fraction", "macs_fraction", "latency_fraction"):
            if getattr(self, k) is not None:
                check_range(k, getattr(self, k), 0.0, 1.0, lo_open=True)
        check_range("max_ratio", self.max_ratio, 0.0, 1.0, hi_open=True)
        if self.round_to is not None and self.round_to != "auto" and (
                not isinstance(self.round_to, int) or isinstance(self.round_to, bool) or self.round_to < 1):
            raise ConfigError(f"round_to={self.round_to!r} must be a positive integer (e.g. 8), 'auto' or null")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps={self.steps!r} must be an integer >= 1")
        check_range("latency_tolerance", self.latency_tolerance, 0.0, 1.0, lo_open=True)
        check_choice("memory_format", self.memory_format, MEMORY_FORMATS)
        latency_config(self)
        if self.latency_fraction is not None and self.steps != 1:
            raise ConfigError("latency_fraction prunes in one step (it measures the pruned model); use steps=1")


TARGETS = ("channel_ratio", "params_fraction", "macs_fraction", "latency_fraction")


def latency_config(cfg: MagnitudeConfig) -> LatencyConfig:
    """How latency is measured for latency_fraction and memory_format='auto': the `latency`
    fields over defaults of 1 thread, 3 warm-up calls and 20 repeats on the CPU in float32."""
    if not isinstance(cfg.latency, dict):
        raise ConfigError(f"latency={cfg.latency!r} must be a mapping of LatencyConfig fields, e.g. "
                          "{'device': 'cpu', 'batch_size': 16}")
    fields = {f.name for f in dataclasses.fields(LatencyConfig)}
    unknown = sorted(set(cfg.latency) - fields)
    if unknown:
        raise ConfigError(f"latency has unknown field(s) {unknown}; use {sorted(fields)}")
    settings = {"threads": 1, "warmup": 3, "repeats": 20, **cfg.latency}
    if cfg.memory_format == "channels_last":
        settings["channels_last"] = True
    return LatencyConfig(**settings)


def score_groups(model: nn.Module, graph: Graph, cfg: MagnitudeConfig, batches: Iterable | None,
                 example_inputs: Any = None, skipped: list[str] | None = None) -> dict[str, torch.Tensor]:
    """One score tensor per prunable group that holds a parameter. A group whose members are all
    buffers or attributes (timm BEiT's relative_position_index: a buffer indexed by token
    position) has nothing to score and nothing to save; it is left whole and named in `skipped`."""
    ctx = ScoreContext(model, batches=batches, reduction=cfg.reduction, seed=cfg.seed, example_inputs=example_inputs)
    criterion = CRITERIA.get(cfg.criterion)
    params = {name for name, _ in model.named_parameters()}
    scores = {}
    for g in graph.prunable_groups():
        if not any(m.qualname in params for m in g.tensor_members()):
            if skipped is not None:
                skipped.append(g.name)
            continue
        scores[g.name] = criterion(g, ctx)
    return scores


def _skipped_note(skipped: list[str]) -> dict[str, Any]:
    if not skipped:
        return {}
    shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
    return {"notes": [f"{len(skipped)} group(s) hold no parameter to score and were left whole: {shown}"],
            "skipped_groups": list(skipped)}


def _removal_at(graph, scores, cfg, ratio):
    return select_removal(graph, scores, ratio, cfg.scope, cfg.max_ratio, cfg.round_to, cfg.normalizer)


def _search_ratio(model, graph, scores, cfg, which: str, target: float) -> dict[str, list[int]]:
    """Smallest ratio whose estimated cost ({which}) is <= target (absolute count).

    With round_to, the ratio is searched unrounded and the widths are then rounded jointly
    with the target (importance/rounding.py), so rounding never overshoots it."""
    pick = 0 if which == "params" else 1
    exact = lambda removal: estimate_cost(model, graph, removal)[pick]
    if cfg.round_to and cfg.round_to > 1:
        unrounded = dataclasses.replace(cfg, round_to=None)
        start = _search_ratio(model, graph, scores, unrounded, which, target)
        return round_to_target(graph, scores, start, cfg.round_to, exact, target, cfg.max_ratio,
                               cfg.normalizer).removal
    cost = lambda r: exact(_removal_at(graph, scores, cfg, r))
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
    metrics: dict[str, Any] = {}
    if cfg.round_to == "auto":  # the multiple this device rewards, timed once on the costliest layer
        metrics["round_to"] = pick_round_to(work, example_inputs, latency_config(cfg))
        cfg = dataclasses.replace(cfg, round_to=metrics["round_to"]["multiple"])
    skipped: list[str] = []
    latency_report: dict[str, Any] = {}
    for step in range(1, cfg.steps + 1):
        if step > 1:
            graph = build_safe_graph(work, example_inputs, cfg.ignore, probe=cfg.probe)
        scores = score_groups(work, graph, cfg, batches, example_inputs, skipped)
        frac = step / cfg.steps
        if cfg.latency_fraction is not None:
            removal, latency_report = latency_removal(
                work, graph, scores, cfg.latency_fraction, latency_config(cfg), example_inputs, cfg.latency_tolerance,
                cfg.round_to, cfg.max_ratio, cfg.normalizer)
        elif cfg.channel_ratio is not None:
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
    fmt = apply_memory_format_(model, example_inputs, cfg.memory_format, latency_config(cfg))
    plan.meta.update({"method": "magnitude", "config": cfg.to_dict()})
    metrics.update(_capped_note(cfg))
    for key, value in _skipped_note(sorted(set(skipped))).items():
        metrics[key] = metrics.get(key, []) + value
    metrics["memory_format"] = fmt
    if latency_report:
        metrics["latency"] = latency_report
        if latency_report.get("note"):
            metrics["notes"] = metrics.get("notes", []) + [latency_report["note"]]
    return PruneResult(plan, before, after, cfg.to_dict(), metrics=metrics)


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
