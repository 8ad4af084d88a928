"""The Gator handler: gated training, final gates, exact conversion, optional fine-tuning.

Registered as method "gator", so `prunekit.methods.prune_(model, GatorConfig(...), example_inputs,
train_loader=..., val_loader=..., train_config=...)` runs it. `train_config` (the engine's
TrainConfig) drives both phases; its `epochs` is replaced by config.epochs, then by
config.finetune_epochs, and the logits follow its learning-rate schedule.

>>> import torch
>>> from torch import nn
>>> from prunekit.engine.train import TrainConfig
>>> net = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.Flatten(),
...                     nn.Linear(512, 2))
>>> data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 2, (8,)))] * 4
>>> r = gator_prune_(net, GatorConfig(target=0.5, epochs=2), data[0][0], train_loader=data,
...                  train_config=TrainConfig(epochs=1, lr=0.05), device="cpu")
>>> r.metrics["target"]["within_tolerance"], r.metrics["conversion"]["max_abs_diff"] <= 1e-5
(True, True)
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ...core.errors import ConfigError, PruningError
from ...cost.differentiable import CostModel, build_cost
from ...layers.gates import GateSet, gateable
from ...surgery.masks import masked_hint
from ...surgery.verify import build_safe_graph, inputs_to
from ..result import PruneResult
from .config import GatorConfig
from .controller import final_masks, rounded_within
from .convert import convert_, keep_output_connected
from .hook import GatorHook

__all__ = ["gator_prune_"]


def gator_prune_(
    model: nn.Module,
    config: GatorConfig,
    example_inputs: Any,
    *,
    train_loader: Iterable,
    val_loader: Iterable | None = None,
    train_config: Any = None,
    progress: bool = False,
    device: str | torch.device | None = None,
    ckpt_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
) -> PruneResult:
    """Prune `model` in place with Gator; returns plan, costs and metrics.

    Metrics: gated_history (per-epoch records with "gator/..." entries), final (threshold search:
    fraction, channels closed), controller ([step, fraction, planned, lambda] samples), target
    (measure, target, achieved, within_tolerance), macs_fraction, params_fraction, conversion
    (cut branches, silent groups, max |gated - converted| on the example inputs), with `round_to`
    settle_rounding (widths rounded when the run settled) and/or rounding (after training),
    skipped_groups, kept_open (group -> why a group whose every gate closed keeps its strongest
    channel: closing it would leave an output that does not depend on the input; also in notes),
    and with a val_loader gated / converted / finetuned accuracy.
    With `ckpt_dir` both training phases checkpoint every epoch (in its subfolders gated/ and
    finetune/); with `resume=True` they continue from there, and a finished phase only reloads.
    """
    from ...cost.macs import cost_from_graph, count_cost
    from ...engine.distributed import env_ranks, resolve_device
    from ...engine.evaluate import evaluate
    from ...engine.train import TrainConfig, train

    if not isinstance(config, GatorConfig):
        raise ConfigError(f"gator_prune_ needs a GatorConfig, got {type(config).__name__}")
    train_config = train_config if train_config is not None else TrainConfig()
    if not hasattr(train_loader, "__len__"):  # its length sets the gates' schedule, before any training
        raise ConfigError(f"train_loader ({type(train_loader).__name__}) has no len(); pass a sized iterable of "
                          "(x, y) batches (a list, a DataLoader)")
    graph, gates, skipped = _gated_graph(model, config, example_inputs)
    before = cost_from_graph(model, graph)
    cost = build_cost(config.cost, model, graph, gates, config.latency, config.latency_grid)
    measure = cost if config.target_measure == config.cost else build_cost(
        config.target_measure, model, graph, gates, config.latency, config.latency_grid)
    _check_reachable(model, config, measure, gates, skipped)
    masked = masked_hint(model)  # such layers keep their channels: said in the notes
    dev = resolve_device(device, env_ranks()[2])
    metrics: dict[str, Any] = {"skipped_groups": skipped, "gated_groups": list(gates.names)}

    masks = _gated_phase(model, graph, gates, cost, measure, config, train_config, train_loader, val_loader, dev,
                         progress, metrics, example_inputs, (_phase_dir(ckpt_dir, "gated"), resume))
    model.cpu()  # surgery indexes with CPU tensors
    gates.cpu()
    example = inputs_to(example_inputs, "cpu")
    conversion = convert_(model, gates, graph, example, config.ignore)
    after = count_cost(model, example)
    model.to(dev)
    metrics["conversion"] = conversion.summary()
    _report_fractions(metrics, before, after, measure, masks, config, cost)
    if val_loader is not None:
        metrics["converted"] = evaluate(model, val_loader, dev)
    if config.finetune_epochs:
        run = train(model, train_loader, val_loader, train_config.replace(epochs=config.finetune_epochs),
                    device=dev, progress=progress, resume=resume, ckpt_dir=_phase_dir(ckpt_dir, "finetune"))
        metrics["finetune_history"] = run.history
        if val_loader is not None:
            metrics["finetuned"] = evaluate(model, val_loader, dev)
    notes = [f"group {g}: {why}; kept its strongest channel" for g, why in metrics.get("kept_open", {}).items()]
    if masked:
        notes.append(f"channels kept by weight masks: {masked[2:]}")
    t = metrics["target"]
    if t["within_tolerance"] is False:  # said where the run reports, not only in metrics
        used = (metrics.get("rounding") or metrics.get("settle_rounding") or {}).get("multiple")
        rounded = (f"; widths are multiples of {used}, which move it in coarse steps (round_to=null, or a smaller "
                   "multiple, lands closer)") if used and used > 1 else ""
        notes.append(f"kept {100 * t['achieved']:.1f}% of the {t['measure']}, not the target {100 * t['target']:g}% "
                     f"± {100 * config.tolerance:g} points{rounded}")
    if notes:
        metrics["notes"] = notes
    plan = conversion.plan
    plan.meta.update({"method": "gator", "config": config.to_dict()})
    return PruneResult(plan, before, after, config.to_dict(), metrics)


def _gated_graph(model: nn.Module, config: GatorConfig, example_inputs: Any) -> tuple[Any, GateSet, dict[str, str]]:
    """The model's (probed) graph, its gates and the groups that cannot be gated (with why)."""
    graph = build_safe_graph(model, example_inputs, config.ignore, probe=config.probe)
    groups, skipped = gateable(model, graph)
    if not groups:
        hint = (f"; ignore={list(config.ignore)} leaves these modules whole: ignore fewer"
                if config.ignore else "") + masked_hint(model)
        raise PruningError(f"no channel group can be gated in this model ({skipped or 'no prunable groups'}){hint}")
    return graph, GateSet(groups, model, config.initial_logit, config.init_noise, config.temperature, config.seed), skipped


def check_gateable(model: nn.Module, config: GatorConfig, example_inputs: Any) -> None:
    """PruningError when no channel group of `model` can be gated (before any dense training)."""
    _gated_graph(model, config, example_inputs)


def check_target_reachable(model: nn.Module, config: GatorConfig, example_inputs: Any) -> None:
    """`gator_prune_`'s up-front target check alone (params or MACs targets; latency ones need the
    tables, timed when pruning starts), for callers that train a dense model first."""
    graph, gates, skipped = _gated_graph(model, config, example_inputs)
    _check_reachable(model, config, build_cost(config.target_measure, model, graph, gates, config.latency,
                                               config.latency_grid), gates, skipped)


def _check_reachable(model: nn.Module, config: GatorConfig, measure: CostModel, gates: GateSet,
                     skipped: dict[str, str]) -> None:
    """ConfigError before any training when even every gated channel closed keeps more of the
    target measure than the target and its tolerance allow."""
    if config.target is None:
        return
    floor = measure.fraction([~gates.prunable(i) for i in range(len(gates.names))])
    if floor > config.target + config.tolerance:
        why = "; ".join(f"{g}: {r}" for g, r in list(skipped.items())[:3]) + ("; ..." if len(skipped) > 3 else "")
        why = f" (groups that cannot be gated: {why})" if why else ""
        least = math.ceil((floor - config.tolerance) * 1000) / 1000  # rounded up: a target it can take
        raise ConfigError(f"impossible target: with every gated channel closed the model still keeps {floor:.3f} "
                          f"of the {config.target_measure}{why}, above target={config.target} + "
                          f"tolerance={config.tolerance}; ask for at least {least:.3f}"
                          + (" or ignore fewer modules" if config.ignore else "") + masked_hint(model)
                          + "; the model was left unchanged")


def _phase_dir(ckpt_dir: str | os.PathLike[str] | None, phase: str) -> Path | None:
    return None if ckpt_dir is None else Path(ckpt_dir) / phase


def _gated_phase(model: nn.Module, graph: Any, gates: GateSet, cost: CostModel, measure: CostModel, config: GatorConfig,
                 train_config: Any, train_loader: Iterable, val_loader: Iterable | None, dev: torch.device,
                 progress: bool, metrics: dict[str, Any], example_inputs: Any,
                 ckpt: tuple[Path | None, bool] = (None, False)) -> list[Tensor]:
    """Train with gates, choose the final open channels (no closed group may cut the output off
    the input) and freeze the gates on them."""
    from ...engine.evaluate import evaluate
    from ...engine.train import lr_factor, train

    steps = len(train_loader)
    phase = train_config.replace(epochs=config.epochs)
    model.to(dev)
    gates.to(dev)
    hook = GatorHook(gates, cost, measure, config, steps * config.epochs,
                     lambda step: phase.lr * lr_factor(phase, step, steps), graph=graph)
    gates.attach(model)
    try:
        run = train(model, train_loader, val_loader, phase, hooks=[hook], device=dev, progress=progress,
                    ckpt_dir=ckpt[0], resume=ckpt[1])
        metrics["gated_history"] = run.history
        n = len(gates.logits)
        logits, prunable = [t.detach().cpu() for t in gates.logits], [gates.prunable(i).cpu() for i in range(n)]
        active = [gates.active(i).cpu() for i in range(n)]
        masks, info = final_masks(logits, active, prunable, measure.fraction, config.target)
        if config.round_to and config.round_to > 1:  # the target, or the unrounded result, is the budget
            budget = info["fraction"] if config.target is None else max(config.target, info["fraction"])
            # channels the final search closed trained all along: rounding may open them again, not those
            # switched off during training
            multiple = hook.rounding["multiple"] if hook.rounding is not None else config.round_to  # as halved on settling
            masks, metrics["rounding"] = rounded_within(masks, logits, prunable, measure.fraction, budget,
                                                        multiple, graph, list(gates.names), trained=active)
            info["fraction"] = metrics["rounding"]["fraction"]
        masks, kept = keep_output_connected(model, gates, masks, inputs_to(example_inputs, dev), config.seed)
        if kept:
            metrics["kept_open"], info["fraction"] = kept, measure.fraction(masks)
        gates.freeze(masks)
        if hook.rounding is not None:
            metrics["settle_rounding"] = hook.rounding
        metrics["final"] = {**info, "lambda": hook.lam}
        if hook.controller is not None:
            history = hook.controller.history
            metrics["controller"] = [list(h) for h in history[:: max(len(history) // 50, 1)]]
        if val_loader is not None:
            metrics["gated"] = evaluate(model, val_loader, dev)
    finally:
        gates.detach()
    return masks


def _report_fractions(metrics: dict[str, Any], before: Any, after: Any, measure: CostModel, masks: list[Tensor],
                      config: GatorConfig, cost: CostModel) -> None:
    """Achieved fractions: counted after removal for params/MACs, table-estimated for latency."""
    metrics["macs_fraction"] = after.macs / max(before.macs, 1)
    metrics["params_fraction"] = after.params / max(before.params, 1)
    estimated = measure.fraction([m.cpu() for m in masks])
    achieved = {"macs": metrics["macs_fraction"], "params": metrics["params_fraction"]}.get(
        config.target_measure, estimated)
    within = None if config.target is None else abs(achieved - config.target) <= config.tolerance
    metrics["target"] = {"measure": config.target_measure, "target": config.target, "achieved": achieved,
                         "estimated": estimated, "within_tolerance": within}
    tables = next((c.latency_tables for c in (cost, measure) if c.kind == "latency"), None)
    if tables is not None:
        metrics["latency_tables"] = [{"spec": t.spec, "device": t.device, "device_name": t.device_name,
                                      "batch": t.batch, "dtype": t.dtype} for t in tables]


def _register() -> None:
    from .. import register_method

    register_method("gator", GatorConfig, gator_prune_)


_register()
