"""The reference structured pruner: score groups, pick channels, remove them physically.

Targets: exactly one of `channel_ratio` (fraction of each group's channels removed, or of all
channels with scope="global"), `params_fraction` or `macs_fraction` (fraction of the original
parameters/MACs that remains; the removal ratio is found by bisection on an exact cost estimate).
`latency_fraction` is the fraction of the measured latency that remains, on the device, batch,
dtype and memory format that `latency` (LatencyConfig fields; default CPU, float32, batch 1,
1 thread) states: channels go where they buy the most milliseconds for the least importance, and
the pruned model is measured (importance/latency_target.py; met within `latency_tolerance` or
the result says by how much it missed). `round_to` (default 16) rounds kept widths to a multiple
jointly with a params/MACs/latency target (never overshooting it: importance/rounding.py), and
halves the multiple where it would land more than `round_slack` of the model below the target;
"auto" measures the multiple the device rewards (cost/alignment.py); None leaves widths
unaligned. `memory_format` puts the pruned model's 4-D tensors in that format: "contiguous" (the
default; a channels-last model comes back contiguous), "channels_last", or "auto", whichever is
faster on the `latency` settings (result metrics["memory_format"]). `steps` > 1 prunes iteratively along a linear schedule, calling
`between_steps(model, step)` (e.g. a short fine-tune) after each step. `max_ratio` is the most of
each group's channels removed, over all steps together.

`criterion` is a registered name (`importance.criteria.CRITERIA`), "<prefix>:<text>" built by a
registered criterion factory, or any callable `(group, ctx) -> Tensor (group.size,)`; a config
holding a callable records its qualified name in `to_dict` and cannot be replayed from a file.
`prepare_pruning` (surgery/prepared.py) traces and probes once; `magnitude_prune_` is that
preparation followed by the same handler, so both paths run one code.

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
from ..core.errors import ConfigError, PrunekitError, PrunekitWarning, PruningError
from ..engine.batches import out_of_memory
from ..cost.alignment import pick_round_to
from ..cost.latency import LatencyConfig, latency_settings, out_of_memory_as_config_error, timing_device
from ..cost.macs import CostEstimator, cost_after
from ..cost.memory_format import MEMORY_FORMATS, apply_memory_format_, has_4d, memory_format_record
from ..graph import Graph
from ..importance.criteria import REDUCTIONS, Criterion, ScoreContext, resolve_criterion
from ..importance.latency_target import latency_removal
from ..importance.select import NORMALIZERS
from ..importance.step_targets import rounding_note, step_removal
from ..importance.targets import tied_parameters
from ..surgery.copying import adopt_, keep_parameters_, share_copy
from ..surgery.masks import masked_hint
from ..surgery.plan import Plan, make_plan
from ..surgery.prepared import PreparedPruning, prepare_pruning, register_prepared_handler
from ..surgery.shrink import remove_channels_
from ..surgery.verify import build_safe_graph, check_unproven_removal, run_model, training_forward_error
from .result import PruneResult


@dataclasses.dataclass
class MagnitudeConfig(Config):
    criterion: str | Criterion = "l2"
    reduction: str = "mean"
    normalizer: str = "mean"
    scope: str = "local"
    channel_ratio: float | None = None
    params_fraction: float | None = None
    macs_fraction: float | None = None
    max_ratio: float = 0.9
    round_to: int | str | None = 16  # a multiple, "auto" (measured: cost/alignment.py) or None (no alignment)
    round_slack: float | None = 0.02  # rounding landing further from the target than this share of the
    # model (MACs or params kept below it, channels removed either side) halves the multiple (16 -> 8 -> 4 -> 2); None: keep it
    steps: int = 1
    ignore: list[str] = dataclasses.field(default_factory=list)
    seed: int = 0
    probe: bool = True  # check every group on the real model first (see surgery/verify.py)
    latency_fraction: float | None = None
    latency_tolerance: float = 0.05  # |measured fraction - latency_fraction| accepted
    latency: dict = dataclasses.field(default_factory=dict)  # LatencyConfig fields (device, batch_size, ...)
    memory_format: str = "contiguous"

    def validate(self) -> None:
        resolve_criterion(self.criterion)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_choice("normalizer", self.normalizer, NORMALIZERS)
        check_choice("scope", self.scope, ("local", "global"))
        given = [k for k in TARGETS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError("give exactly one target: channel_ratio (fraction of channels removed), "
                              "params_fraction, macs_fraction or latency_fraction (fraction that remains); "
                              f"got {given or 'none'}"
                              + ("; keep one and clear the others (on the command line: "
                                 + " or ".join(f"method.{g}=null" for g in given) + ")" if len(given) > 1 else
                                 "; e.g. MagnitudeConfig(macs_fraction=0.5), on the command line method.macs_fraction=0.5"))
        if self.channel_ratio is not None:
            check_range("channel_ratio", self.channel_ratio, 0.0, 1.0, hi_open=True)
        for k in ("params_fraction", "macs_fraction", "latency_fraction"):
            if getattr(self, k) is not None:
                check_range(k, getattr(self, k), 0.0, 1.0, lo_open=True)
        check_range("max_ratio", self.max_ratio, 0.0, 1.0, hi_open=True)
        if self.round_to is not None and self.round_to != "auto" and (
                not isinstance(self.round_to, int) or isinstance(self.round_to, bool) or self.round_to < 1):
            raise ConfigError(f"round_to={self.round_to!r} must be a positive integer (e.g. 8), 'auto' or null")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ConfigError(f"steps={self.steps!r} must be an integer >= 1")
        check_range("latency_tolerance", self.latency_tolerance, 0.0, 1.0, lo_open=True)
        if self.round_slack is not None:
            check_range("round_slack", self.round_slack, 0.0, 1.0)
        check_choice("memory_format", self.memory_format, MEMORY_FORMATS)
        timed = self.latency_fraction is not None or self.round_to == "auto"
        if latency_config(self).channels_last and self.memory_format == "contiguous" and timed:
            raise ConfigError("latency.channels_last=true times the model channels-last, but memory_format='contiguous' "
                              "hands it back contiguous; set memory_format='channels_last' (or 'auto', which times "
                              "both formats and keeps the faster)")
        if self.latency_fraction is not None and self.steps != 1:
            raise ConfigError("latency_fraction prunes in one step (it measures the pruned model); use steps=1")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if not isinstance(self.criterion, str):  # a Python callable: name it, it cannot be written to a file
            fn = self.criterion
            out["criterion"] = f"<callable {getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}>"
            out["replayable"] = False
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MagnitudeConfig":
        if isinstance(data, dict) and data.get("replayable") is False:
            raise ConfigError(f"this config used the Python callable criterion {data.get('criterion')}, which a file "
                              "cannot hold; pass the callable again, or register it and give its name")
        return super().from_dict(data)


TARGETS = ("channel_ratio", "params_fraction", "macs_fraction", "latency_fraction")


def latency_config(cfg: MagnitudeConfig) -> LatencyConfig:
    """How latency is measured for latency_fraction and memory_format='auto': the `latency`
    fields over defaults of 1 thread, 3 warm-up calls and 20 repeats on the CPU in float32."""
    settings = latency_settings(cfg.latency)
    if cfg.memory_format == "channels_last":
        return dataclasses.replace(settings, channels_last=True)
    # unstated (None): the layout the model will be handed back in; "auto" times both explicitly
    return dataclasses.replace(settings, channels_last=False) if settings.channels_last is None else settings


def score_groups(model: nn.Module, graph: Graph, cfg: MagnitudeConfig, batches: Iterable | None,
                 example_inputs: Any = None, fallbacks: dict[str, str] | None = None,
                 skipped: list[str] | None = None) -> dict[str, torch.Tensor]:
    """One score tensor per prunable group that holds a parameter; groups whose criterion fell back
    are added to `fallbacks`. A group whose members are all buffers or attributes (timm BEiT's
    relative_position_index: a buffer indexed by token position) has nothing to score and nothing
    to save; it is left whole and named in `skipped`."""
    ctx = ScoreContext(model, batches=batches, reduction=cfg.reduction, seed=cfg.seed, example_inputs=example_inputs,
                       graph=graph, criterion=str(cfg.to_dict()["criterion"]))
    criterion = resolve_criterion(cfg.criterion)
    scores = {}
    params = ctx.parameters()
    for g in graph.prunable_groups():
        if not any(m.qualname in params for m in g.tensor_members()):
            if skipped is not None:
                skipped.append(g.name)
            continue
        try:
            s = criterion(g, ctx)
        except PrunekitError:
            raise
        except Exception as err:  # a criterion from outside prunekit failing: say which, and on which group
            if not _user_criterion(cfg.criterion, criterion) or isinstance(err, MemoryError) or (
                    isinstance(err, RuntimeError) and out_of_memory(err)):
                raise  # prunekit's own criteria and memory shortages keep their traceback
            raise ConfigError(f"criterion {cfg.to_dict()['criterion']} raised {type(err).__name__} on group "
                              f"{g.name!r}: {str(err)[:300]}; nothing was removed") from err
        _check_scores(s, g, cfg)
        if s.is_floating_point() and not bool(torch.isfinite(s).all()):  # a ranking of NaN is arbitrary
            bad = int((~torch.isfinite(s)).sum())
            raise PruningError(f"criterion {cfg.to_dict()['criterion']} gave NaN or inf scores to {bad} of the "
                               f"{s.numel()} channels of group {g.name!r}: the criterion itself, or the model's weights or "
                               "calibration data (a diverged training? lower the learning rate) produce NaN/inf; "
                               "nothing was removed")
        scores[g.name] = s.detach()
    if fallbacks is not None:
        fallbacks.update(ctx.fallbacks)
    return scores


def _user_criterion(asked: Any, resolved: Any) -> bool:
    """Whether the criterion is the user's code: a Python callable, one built by a factory from
    text ("evolved:<expression>"), or a registered function defined outside prunekit."""
    if callable(asked) or ":" in str(asked):
        return True
    return not str(getattr(resolved, "__module__", "") or "").startswith("prunekit.")


def _check_scores(s: Any, group, cfg: MagnitudeConfig) -> None:
    """ConfigError unless `s` is a dense real tensor of shape (group.size,): what every target
    (channel ratio, cost bisection, rounding, latency allocation) ranks."""
    what = (type(s).__name__ if not isinstance(s, torch.Tensor)
            else f"a {s.layout} tensor" if s.layout != torch.strided or s.is_nested
            else "a tensor on the meta device (shapes only, no values)" if s.is_meta
            else f"{str(s.dtype).removeprefix('torch.')} scores" if s.is_complex()
            else f"scores of shape {tuple(s.shape)}" if s.shape != (group.size,) else None)
    if what is None:
        return
    hint = ("; reduce per-weight scores to channels (importance.criteria.per_channel)"
            if isinstance(s, torch.Tensor) and s.dim() > 1 else "")
    raise ConfigError(f"criterion {cfg.to_dict()['criterion']} returned {what} for group {group.name!r}; a criterion "
                      f"returns a real tensor of shape ({group.size},), one score per channel{hint}")


def _skipped_note(skipped: list[str]) -> dict[str, Any]:
    if not skipped:
        return {}
    shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
    return {"notes": [f"{len(skipped)} group(s) hold no parameter to score and were left whole: {shown}"],
            "skipped_groups": list(skipped)}


def _check_runs(work: nn.Module, example_inputs: Any, original: nn.Module, probed: bool,
                training_traced: bool = False) -> None:
    """PruningError when the pruned copy `work` no longer runs; `probed`: whether its groups were probed."""
    try:  # a pruned model that no longer runs never reaches the caller
        run_model(work, example_inputs)
    except PrunekitError:
        raise
    except Exception as err:
        tied = tied_parameters(original)  # removal has replaced the pruned copy's tensors
        owners = sorted({name.rpartition(".")[0] for name in tied[0]}) if tied else []
        why = (f"the model ties weights ({' = '.join(tied[0])}), and channel pruning cannot keep a tie: leave "
               f"the modules that share them out with ignore={owners}" if tied else
               "its forward hard-codes a channel count that neither the trace nor the probe (one channel removed "
               "from each group the trace cannot vouch for) can see; ignore the layers involved" if probed else
               "its forward hard-codes a channel count the trace cannot see. Prune with probe=True (the default), "
               "which tests the groups the trace cannot vouch for first, or ignore the layers involved")
        raise PruningError(f"the pruned model no longer runs ({type(err).__name__}: {str(err)[:200]}); {why}; "
                           "the model was left unchanged") from None
    # where the trace followed a training-mode forward too (it runs more modules), that forward is
    # run once on the pruned copy: a branch the trace could not follow would break only there
    failed = training_forward_error(work, example_inputs) if training_traced else None
    if failed is not None and training_forward_error(original, example_inputs) is None:
        raise PruningError(f"the pruned model runs in eval mode but not in training mode ({type(failed).__name__}: "
                           f"{str(failed)[:200]}): its training-mode forward runs layers that the trace, made in eval "
                           "mode, did not see (an auxiliary head, say), so they still expect the channels removed. "
                           "Switch those layers off before pruning (torchvision's GoogLeNet and Inception v3: "
                           "aux_logits=False); the model was left unchanged")


def _check_unproven(model: nn.Module, example_inputs: Any, graph: Graph, plan: Plan) -> None:
    """PruningError when the groups the rules cannot vouch for, pruned at their real widths, no
    longer give what zeroing their removed channels gives (`check_unproven_removal`)."""
    unproven = {g.name for g in graph.groups if not g.proven}
    removal = {n: sorted(set(range(plan.sizes[n])) - set(kept)) for n, kept in plan.groups.items() if n in unproven}
    if not removal:
        return
    check_unproven_removal(model, example_inputs, graph, removal)


def prune_prepared_(prepared: PreparedPruning, model: nn.Module, cfg: MagnitudeConfig, batches: Iterable | None = None,
                    between_steps: Callable[[nn.Module, int], None] | None = None, verify: bool = True) -> PruneResult:
    """Score, select and remove on `model` with the prepared graph (steps > 1 trace again after step 1).

    verify=True runs the pruned model once before handing it back (a model whose code hard-codes
    a width fails here, and `model` is left unchanged). verify=False skips that forward (the
    probe already ran the model with a channel removed from every group) and, when nothing else
    writes into tensors (no batches, no between_steps, one step, memory_format "contiguous"),
    removes channels from `model` directly: surgery checks everything before it writes, so a
    failure still leaves `model` unchanged."""
    graph, estimator, example_inputs = prepared.graph, prepared.estimator, prepared.example_inputs
    nothing = graph.why_nothing_prunable()
    if nothing and (cfg.params_fraction is not None or cfg.macs_fraction is not None
                    or cfg.latency_fraction is not None):
        raise ConfigError(f"impossible target: {nothing}{masked_hint(model)}; the model was left unchanged")
    before = prepared.cost_before
    # the user's model changes only once everything succeeded; scoring on batches (gradients) or
    # fine-tuning between steps writes into tensors, so those need a copy of every weight
    writes = batches is not None or between_steps is not None
    timed = (cfg.memory_format == "auto" and has_4d(model)) or cfg.latency_fraction is not None \
        or cfg.round_to == "auto"
    if timed:  # a machine that cannot time as asked is told before anything changes
        try:
            timing_device(latency_config(cfg))
        except ConfigError as err:  # "device='cuda' was asked for" alone does not say which setting
            raise ConfigError(f"latency: {err}") from None
    # in place only when little can fail after the removal: timing or converting the memory format can
    work = copy.deepcopy(model) if writes else share_copy(model) if (
        verify or cfg.steps > 1 or cfg.memory_format != "contiguous") else model
    plan: Plan | None = None
    fallbacks: dict[str, str] = {}
    metrics: dict[str, Any] = {}
    config = cfg.to_dict()  # as asked (round_to "auto", not the multiple it picks)
    if cfg.round_to == "auto":  # the multiple this device rewards, timed once on the costliest layer
        with out_of_memory_as_config_error(latency_config(cfg), "layer widths for round_to='auto'"):
            metrics["round_to"] = pick_round_to(work, example_inputs, latency_config(cfg))
        cfg = dataclasses.replace(cfg, round_to=metrics["round_to"]["multiple"])
    skipped: list[str] = []
    tied: set[str] = set()  # groups that lost channels whose scores were all alike: removed in index order
    # multiples are taken at the first step's widths: a group already at its multiple is not halved again
    first_widths = {g.name: g.size for g in graph.groups}
    for step in range(1, cfg.steps + 1):
        if step > 1:
            graph = build_safe_graph(work, example_inputs, cfg.ignore, probe=cfg.probe)
            estimator = CostEstimator(work, graph)
        scores = score_groups(work, graph, cfg, batches, example_inputs, fallbacks, skipped)
        if plan is not None:
            scores = {n: s for n, s in scores.items() if graph.group(n).size == _width_left(plan, first_widths, n)}
        if cfg.latency_fraction is not None:
            with out_of_memory_as_config_error(latency_config(cfg), "the model for latency_fraction"):
                removal, metrics["latency"] = latency_removal(
                    work, graph, scores, cfg.latency_fraction, latency_config(cfg), example_inputs,
                    cfg.latency_tolerance, cfg.round_to, cfg.max_ratio, cfg.normalizer, halve=cfg.round_slack is not None)
        else:
            try:
                removal = step_removal(graph, scores, cfg, step, before, estimator, first_widths,
                                        metrics.setdefault("rounding", {}))
            except ConfigError as err:
                raise ConfigError(f"{err}{masked_hint(work)}") from None
        # a group that lost channels on scores all alike lost them in index order (checked only for those)
        tied.update(n for n, idx in removal.items()
                    if len(idx) and n in scores and bool((scores[n] == scores[n][0]).all()))
        step_plan = make_plan(graph, removal, example_inputs, cfg.ignore)
        remove_channels_(work, graph, removal)
        plan = step_plan if plan is None else plan.compose(step_plan)
        if between_steps is not None:
            between_steps(work, step)
    if verify:
        _check_runs(work, example_inputs, model, prepared.probed and (cfg.probe or cfg.steps == 1),
                    prepared.graph.training_traced)
        if between_steps is None:  # `model` still holds the weights `work` was pruned from
            _check_unproven(model, example_inputs, prepared.graph, plan)
    after = cost_after(work, graph, removal, estimator)  # exact: tests compare it with a recount
    # timed on the pruned copy, before the caller's model changes; converted after
    with out_of_memory_as_config_error(latency_config(cfg), "both memory formats for memory_format='auto'"):
        layout = memory_format_record(work, example_inputs, cfg.memory_format, latency_config(cfg))
    if work is not model:
        if writes:  # a deep copy: the caller's unpruned parameters stay the model's
            keep_parameters_(model, work)
        adopt_(model, work)
    metrics["memory_format"] = apply_memory_format_(model, example_inputs, cfg.memory_format, record=layout)
    plan.meta.update({"method": "magnitude", "config": config})
    if fallbacks:
        metrics["criterion_fallbacks"] = fallbacks
    notes = _capped_note(cfg).get("notes", []) + _skipped_note(sorted(set(skipped))).get("notes", [])
    if nothing:
        notes.insert(0, f"nothing was removed: {nothing}")
    if fallbacks:
        shown = "; ".join(f"{g}: {why}" for g, why in list(fallbacks.items())[:3])
        notes.append(f"the criterion fell back to another for {len(fallbacks)} group(s) ({shown}"
                     + (" ..." if len(fallbacks) > 3 else "") + "); all in metrics['criterion_fallbacks']")
    if cfg.latency and not timed:
        notes.append(f"latency={dict(cfg.latency)} was not used: nothing was timed (only latency_fraction, "
                     "round_to='auto' and memory_format='auto' time the model)")
    if hint := masked_hint(model):  # a channel_ratio went on with the other groups, or with none, silently
        notes.append(f"channels kept by weight masks: {hint[2:]}")
    if skipped:
        metrics["skipped_groups"] = sorted(set(skipped))
    if tied:
        metrics["tied_groups"] = sorted(tied)
        shown = ", ".join(metrics["tied_groups"][:3]) + (" ..." if len(tied) > 3 else "")
        notes.append(f"the criterion gave every channel the same score in {len(tied)} group(s) ({shown}): their "
                     "channels were removed in index order (the first ones), not by importance")
    if not metrics.get("rounding"):
        metrics.pop("rounding", None)
    elif metrics["rounding"]["tried"] and (note := rounding_note(metrics["rounding"], cfg.round_slack)):
        notes.append(note)
    if metrics.get("round_to", {}).get("fallback"):
        notes.append(f"round_to='auto' found no multiple whose widths all ran near the best time per unit of work: "
                     f"{metrics['round_to']['fallback']}; narrow widths that run less efficiently for "
                     "other reasons than alignment also cause this")
    if metrics.get("round_to", {}).get("reason"):
        notes.append(f"round_to='auto' timed nothing: {metrics['round_to']['reason']}; widths are unrounded "
                     "(give round_to a multiple to align them)")
    notes += [metrics["latency"][k] for k in ("round_to_note", "note") if metrics.get("latency", {}).get(k)]
    if notes:
        metrics["notes"] = notes
    return PruneResult(plan, before, after, config, metrics)


def _width_left(plan: Plan, first_widths: dict[str, int], name: str) -> int | None:
    """The channels the first step's group `name` has left after `plan`; None for a group the first
    step's trace did not have. A later step's group of another width is not the same channels (a
    grouped conv pruned to one group becomes a plain conv, whose channels trace as groups of their
    own): the plan could not name them in the dense model, so it stays whole."""
    return len(plan.groups[name]) if name in plan.groups else first_widths.get(name)


def magnitude_prune_(model: nn.Module, cfg: MagnitudeConfig, example_inputs: Any, batches: Iterable | None = None,
                     between_steps: Callable[[nn.Module, int], None] | None = None) -> PruneResult:
    prepared = prepare_pruning(model, example_inputs, cfg.ignore, probe=cfg.probe)
    return prune_prepared_(prepared, model, cfg, batches, between_steps)


def _capped_note(cfg: MagnitudeConfig) -> dict[str, Any]:
    """{"notes": [...]} when channel_ratio asks for more than max_ratio lets any group lose."""
    if cfg.channel_ratio is None or cfg.channel_ratio <= cfg.max_ratio:
        return {}
    note = (f"channel_ratio={cfg.channel_ratio} was capped at max_ratio={cfg.max_ratio}: no group loses more "
            "than that share of its channels; raise max_ratio to remove more")
    warnings.warn(note, PrunekitWarning, stacklevel=3)
    return {"notes": [note]}


from . import register_method  # noqa: E402

register_method("magnitude", MagnitudeConfig, magnitude_prune_)
register_prepared_handler(MagnitudeConfig, prune_prepared_)
