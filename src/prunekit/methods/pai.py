"""Pruning at initialisation: SNIP, GraSP, SynFlow and random masks, on the core's per-weight scores.

Four methods share one handler and differ in their config class (the criterion is the class's):

| method | config | score (importance/elements.py) | data |
|---|---|---|---|
| `snip` | `SNIPConfig` | abs(w * dL/dw) | `batches` calibration batches |
| `grasp` | `GraSPConfig` | w * (H g), logits / temperature | `batches` calibration batches |
| `synflow` | `SynFlowConfig` | abs(w * dR/dw), linearised net, `iterations` rounds | none |
| `random_init` | `RandomInitConfig` | uniform, seeded (scope "layer" by default) | none |

level="element": masks removing exactly `sparsity` of the scored weights (all conv and Linear
weights but those under `ignore`), globally or per layer (`scope`), held as the core's
persistent masks (`surgery.masks`): masked weights read zero and get zero gradient, so training
keeps them at zero, and `save_pruned` / `load_pruned` store and restore them. Parameter and MAC
counts of the dense tensors do not change; the result's metrics give the nonzero views
(`params_nonzero`, and `macs_nonzero`: each layer's MACs times its weight density, attention
by its projections; `cost.macs.nonzero_macs`).

level="channel": the element scores are summed per channel of each of the graph's groups
(`channel_scores_from_elements`) and `sparsity` of the channels (per group with scope "layer",
ranked across groups with "global") are removed physically. SynFlow is then scored once (the
iterative schedule prunes weights, not channels).

>>> import torch, torch.nn as nn
>>> from prunekit.methods import prune_
>>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
>>> r = prune_(m, SynFlowConfig(sparsity=0.75, iterations=10), torch.randn(1, 3, 8, 8))
>>> r.metrics["weights_kept"], r.metrics["weights_total"]
(342, 1368)
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from ..core.config import Config, check_choice, check_int, check_range
from ..core.errors import ConfigError, PrunekitWarning, PruningError
from ..core.modes import SCORE_MODES
from ..core.names import within
from ..cost.macs import cost_from_graph, count_cost, nonzero_macs
from ..graph import build_graph
from ..importance.calibration import check_iterable
from ..importance.elements import (apply_element_masks, channel_scores_from_elements, grasp_scores, random_scores,
                                   select_element_masks, snip_scores, synflow_scores)
from ..importance.select import select_removal
from ..importance.targets import check_not_shared, check_not_torch_pruned, target_weights
from ..layers.ssc import SSCConv2d
from ..surgery.copying import adopt_, share_copy
from ..surgery.masks import get_mask, masked_hint, masked_modules
from ..surgery.plan import empty_plan, make_plan
from ..surgery.shrink import remove_channels_
from ..surgery.verify import build_safe_graph, check_unproven_removal, run_model
from .result import PruneResult


@dataclasses.dataclass
class PaIConfig(Config):
    """Shared fields of the pruning-at-initialisation methods (see the module doc)."""

    criterion: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False
    sparsity: float = 0.9          # element: share of weights removed; channel: share of channels removed
    scope: str = "global"          # global | layer
    level: str = "element"         # element | channel
    batches: int = 1               # calibration batches scored (SNIP, GraSP)
    ignore: list[str] = dataclasses.field(default_factory=list)
    seed: int = 0
    probe: bool = True             # channel level: check every group on the real model first
    score_mode: str = "eval"       # SNIP, GraSP: eval | train (BatchNorm on batch statistics, as GraSP's reference code)

    def validate(self) -> None:
        check_range("sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
        check_choice("scope", self.scope, ("global", "layer"))
        check_choice("level", self.level, ("element", "channel"))
        check_choice("score_mode", self.score_mode, SCORE_MODES)
        if self.score_mode != "eval" and not self.needs_data:
            raise ConfigError(f"score_mode={self.score_mode!r} applies to the scores computed on data (snip, grasp); "
                              f"{self.criterion} scores without batches, so leave score_mode at 'eval'")
        if isinstance(self.batches, bool) or not isinstance(self.batches, int) or self.batches < 1:
            raise ConfigError(f"batches={self.batches!r} must be an integer >= 1 (calibration batches scored)")
        check_int("seed", self.seed, 0)  # it seeds torch.Generator (random masks, SynFlow's input)


@dataclasses.dataclass
class SNIPConfig(PaIConfig):
    """SNIP at initialisation: |w * dL/dw| on calibration batches, global exact-sparsity masks (or channels)."""

    criterion: ClassVar[str] = "snip"
    needs_data: ClassVar[bool] = True


@dataclasses.dataclass
class GraSPConfig(PaIConfig):
    """GraSP at initialisation: keep the highest w * (H g), gradient flow preserved (or channels)."""

    criterion: ClassVar[str] = "grasp"
    needs_data: ClassVar[bool] = True
    temperature: float = 200.0     # the reference code's default

    def validate(self) -> None:
        super().validate()
        check_range("temperature", self.temperature, 0.0, float("inf"), lo_open=True)


@dataclasses.dataclass
class SynFlowConfig(PaIConfig):
    """SynFlow: data-free synaptic-flow scores, pruned over 100 rounds on an exponential schedule."""

    criterion: ClassVar[str] = "synflow"
    iterations: int = 100          # pruning rounds on the exponential schedule (element level)

    def validate(self) -> None:
        super().validate()
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ConfigError(f"iterations={self.iterations!r} must be an integer >= 1 (the reference uses 100)")


@dataclasses.dataclass
class RandomInitConfig(PaIConfig):
    """Random masks at initialisation (seeded), the same density in every layer by default."""

    criterion: ClassVar[str] = "random"
    scope: str = "layer"           # the same density in every layer


def _targets(model: nn.Module, ignore: list[str]) -> list[str]:
    names = {n for n, _ in model.named_modules()}
    unknown = [i for i in ignore if i not in names]
    if unknown:
        raise ConfigError(f"ignore names {unknown}, which the model does not have; use module names from "
                          "model.named_modules()")
    keys = [k for k, (mod, _) in target_weights(model, untied=False).items()
            if not within(mod, ignore)]
    if not keys:
        raise PruningError("no conv or Linear weight left to score; ignore fewer modules")
    kept = target_weights(model, keys)
    check_not_shared(model, kept)  # nor tied to one another, nor to a tensor left out
    check_not_torch_pruned(model, kept)
    return keys


def _refuse_ssc_layers(model: nn.Module, ignore: list[str]) -> None:
    """ConfigError for SSC layers left in scope: their taps are fixed by their support and no
    criterion here scores them, so the sparsity would fall on the model's other weights alone."""
    ssc = {n: m for n, m in model.named_modules() if isinstance(m, SSCConv2d) and not within(n, ignore)}
    if not ssc:
        return
    held = sum(p.numel() for m in ssc.values() for p in m.parameters(recurse=False) if p.dim() > 1)
    rest = sum(getattr(model.get_submodule(mod), p).numel()
               for mod, p in target_weights(model, untied=False).values() if not within(mod, ignore))
    names = ", ".join(list(ssc)[:4]) + (f" and {len(ssc) - 4} more" if len(ssc) > 4 else "")
    raise ConfigError(f"the model holds {len(ssc)} SSC layer(s) ({names}) with {held:,} weights, which pruning at "
                      "initialisation does not score (it masks the weight of conv and Linear layers; an SSC layer's "
                      f"support is fixed when it is made), so the sparsity would fall on the other {rest:,} weights "
                      "alone. Prune the model before converting it to SSC, or put those layers in `ignore` to mask "
                      "only the rest; the model was left unchanged")


def _scores(model: nn.Module, cfg: PaIConfig, example_inputs: Any, batches: list | None, one_shot: bool):
    keys = _targets(model, cfg.ignore)
    if cfg.criterion == "snip":
        return snip_scores(model, batches, targets=keys, mode=cfg.score_mode)
    if cfg.criterion == "grasp":
        return grasp_scores(model, batches, targets=keys, temperature=cfg.temperature, mode=cfg.score_mode)
    if cfg.criterion == "synflow":
        return synflow_scores(model, example_inputs=example_inputs, targets=keys, iterations=cfg.iterations,
                              sparsity=None if one_shot else cfg.sparsity, scope=cfg.scope)
    return random_scores(model, seed=cfg.seed, targets=keys)


def _calibration(cfg: PaIConfig, batches: Iterable | None) -> list | None:
    if not cfg.needs_data:
        return None
    if batches is not None:
        check_iterable(batches, cfg.criterion)
    taken = list(itertools.islice(iter(batches), cfg.batches)) if batches is not None else []
    if not taken:
        raise ConfigError(f"{cfg.criterion.upper()} scores with data and got no batch: pass batches=[(inputs, "
                          "labels), ...] (the CLI hands over `calibration_batches` training batches: set it to 1 or more)")
    return taken


def _nonzero_views(model: nn.Module, masks: dict[str, torch.Tensor], cost, macs: int) -> dict[str, Any]:
    """Parameters and MACs counting only kept weights (`macs`: `cost.macs.nonzero_macs`). Every
    mask the model carries counts, also those of layers this pass ignored."""
    total = sum(int(m.numel()) for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    held = _model_masks(model)
    hidden = sum(int(m.numel() - m.sum()) for m in held.values())
    return {"weights_total": total, "weights_kept": kept, "sparsity": 1 - kept / total,
            "params_nonzero": cost.params - hidden, "macs_nonzero": macs,
            "layer_density": {k.rpartition(".")[0]: float(m.float().mean()) for k, m in masks.items()}}


def _model_masks(model: nn.Module) -> dict[tuple[str, str], torch.Tensor]:
    """{(module name, tensor name): its keep mask, expanded to the tensor's shape} for every masked tensor."""
    return {(mname, pname): get_mask(module, pname).expand_as(getattr(module, pname))
            for mname, module, pname in masked_modules(model)}


def _element_prune(model, cfg, example_inputs, data) -> PruneResult:
    _refuse_ssc_layers(model, cfg.ignore)
    before = count_cost(model, example_inputs, cfg.ignore)
    scores = _scores(model, cfg, example_inputs, data, one_shot=False)
    held = _held_masks(model, scores)
    masks = select_element_masks(_masked_last(scores, held), cfg.sparsity, cfg.scope)
    revived = sum(int((masks[k] & ~keep).sum()) for k, keep in held.items())
    if revived:
        hidden = sum(int((~keep).sum()) for keep in held.values())
        raise ConfigError(f"sparsity={cfg.sparsity} would bring back {revived:,} of the {hidden:,} weights that masks "
                          "on this model already hide: masks only grow. Ask for a higher sparsity, or bake the masks "
                          "first (prunekit.bake_masks_) to start again from the baked weights; the model was left as it was")
    # before the masks: inputs a plan cannot record leave the model as it was. `ignore` is recorded so
    # that a load traces the model as this pruning did; a plan that removes nothing constrains no
    # channel pruning composed after it (Plan.compose takes that one's ignore list)
    plan = empty_plan(example_inputs, cfg.ignore)
    work = share_copy(model)  # the masks reach the caller's model once the pruned one was counted
    apply_element_masks(work, masks)
    plan.meta.update({"method": cfg.criterion if cfg.criterion != "random" else "random_init",
                      "config": cfg.to_dict()})
    graph = build_graph(work, example_inputs, cfg.ignore)  # traced as the count before
    after, macs = cost_from_graph(work, graph), nonzero_macs(work, graph)
    adopt_(model, work)
    return PruneResult(plan, before, after, cfg.to_dict(), _nonzero_views(model, masks, after, macs))


def _held_masks(model: nn.Module, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{weight name: its current keep mask} for the scored weights that already carry a mask."""
    held = {}
    for key in scores:
        module_name, _, pname = key.rpartition(".")
        keep = get_mask(model.get_submodule(module_name), pname)
        if keep is not None:
            held[key] = keep
    return held


def _masked_last(scores: dict[str, torch.Tensor], held: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scores with every weight a mask already hides ranked below all others: a new mask on a
    masked model removes those first and keeps them removed."""
    return {k: s.masked_fill(~held[k], torch.finfo(s.dtype).min) if k in held else s for k, s in scores.items()}


def _channel_prune(model, cfg, example_inputs, data) -> PruneResult:
    graph = build_safe_graph(model, example_inputs, cfg.ignore, probe=cfg.probe)
    before = cost_from_graph(model, graph)
    prunable = {g.name for g in graph.prunable_groups()}
    scores = {n: s for n, s in channel_scores_from_elements(
        graph, _scores(model, cfg, example_inputs, data, one_shot=True)).items() if n in prunable}
    if not scores:
        masked = masked_hint(model)  # the usual cause on a model pruned before: say it first
        raise PruningError(f"no channel group can change width: {masked[2:]}" if masked else
                           graph.why_nothing_prunable() or "no prunable channel group holds a scored weight; "
                           "ignore fewer modules")
    # no cap below the one the core always keeps (one removable channel per group): the selector's
    # default max_ratio=0.9 would turn any sparsity above 0.9 silently into 0.9
    removal = select_removal(graph, scores, cfg.sparsity, "local" if cfg.scope == "layer" else "global", max_ratio=1.0)
    plan = make_plan(graph, removal, example_inputs, cfg.ignore)
    work = share_copy(model)
    remove_channels_(work, graph, removal)
    run_model(work, example_inputs)
    check_unproven_removal(model, example_inputs, graph, removal)  # groups the probe tried with one channel
    plan.meta.update({"method": cfg.criterion if cfg.criterion != "random" else "random_init",
                      "config": cfg.to_dict()})
    plan.stamp(dense=model, pruned=work)
    after = count_cost(work, example_inputs, cfg.ignore)
    adopt_(model, work)
    metrics: dict[str, Any] = {"channels_removed": {n: len(v) for n, v in removal.items()}}
    total = sum(graph.group(n).size for n in scores)
    removed = sum(metrics["channels_removed"].values())
    metrics["channel_sparsity"] = removed / total
    asked = (sum(math.floor(cfg.sparsity * graph.group(n).size) for n in scores) if cfg.scope == "layer"
             else math.floor(cfg.sparsity * total))
    if removed < asked:  # every group keeps a channel (and those no tensor may lose): say so, not in silence
        metrics["notes"] = [f"removed {removed} of {total} channels ({removed / total:.3f}), less than "
                            f"sparsity={cfg.sparsity}: every group keeps at least one channel"]
        warnings.warn(metrics["notes"][0], PrunekitWarning, stacklevel=3)
    return PruneResult(plan, before, after, cfg.to_dict(), metrics)


def pai_prune_(model: nn.Module, cfg: PaIConfig, example_inputs: Any, batches: Iterable | None = None) -> PruneResult:
    """Score at initialisation and prune `model` in place (see module doc)."""
    data = _calibration(cfg, batches)
    if cfg.level == "element":
        return _element_prune(model, cfg, example_inputs, data)
    return _channel_prune(model, cfg, example_inputs, data)


from . import register_method  # noqa: E402

register_method("snip", SNIPConfig, pai_prune_)
register_method("grasp", GraSPConfig, pai_prune_)
register_method("synflow", SynFlowConfig, pai_prune_)
register_method("random_init", RandomInitConfig, pai_prune_)

__all__ = ["GraSPConfig", "PaIConfig", "RandomInitConfig", "SNIPConfig", "SynFlowConfig", "pai_prune_"]
