"""The SLR/ADMM handler: penalised training, hard prune, optional BN recalibration and masked
retraining, then either (filter sparsity) physical channel removal or (every other kind) the
model handed back with its `Mask` parametrizations, which keep the zeros through later training
and are saved by `save_pruned`.

Registered as method "slr" (ADMM is `SLRConfig(optimization="admm")`), so
`prunekit.methods.prune_(model, SLRConfig(...), example_inputs, train_loader=..., ...)` runs it.

>>> import torch
>>> from torch import Tensor, nn
>>> from prunekit.engine.train import TrainConfig
>>> from prunekit.methods.slr import SLRConfig
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 2))
>>> data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 2, (8,)))]
>>> r = slr_prune_(net, SLRConfig(sparsity=0.5, epochs=2), data[0][0], train_loader=data,
...                train_config=TrainConfig(epochs=1, lr=0.01))
>>> r.metrics["sparsity"]["2.weight"]["masked"], len(r.metrics["slr_history"])
(72, 2)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from torch import nn

from ...core.errors import ConfigError
from ...core.integrity import atomic_write_text
from ...importance.targets import target_weights
from ...engine.checkpoint import CHECKPOINT_NAME
from ...surgery.masks import sparsity_report
from ...surgery.plan import empty_plan
from ...surgery.verify import inputs_to
from ..result import PruneResult
from .config import SLRConfig
from .hook import SLRHook
from .prune import hard_prune_, recalibrate_bn, shrink_

__all__ = ["slr_prune_"]


def slr_prune_(
    model: nn.Module,
    config: SLRConfig,
    example_inputs: Any,
    *,
    train_loader: Iterable,
    val_loader: Iterable | None = None,
    train_config: Any = None,
    check_batches: Iterable | None = None,
    progress: bool = False,
    ckpt_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
) -> PruneResult:
    """Run SLR or ADMM on `model` in place; returns plan, costs and per-phase metrics.

    `train_config` is the engine's TrainConfig for both phases (its `epochs` is replaced by
    config.epochs, then config.retrain_epochs; each phase builds a fresh optimizer). Metrics:
    slr_history (per-epoch records with the "slr/..." entries), hard_pruned, hard_pruned_bn,
    retrained (val loss/acc, when val_loader is given), sparsity (per masked tensor).
    With `ckpt_dir` both phases checkpoint every epoch (in its subfolders penalised/ and
    retrain/); with `resume=True` they continue from there, and a finished phase only reloads.
    """
    from ...cost.macs import count_cost
    from ...engine.evaluate import evaluate
    from ...engine.train import TrainConfig, train

    if not isinstance(config, SLRConfig):
        raise ConfigError(f"slr_prune_ needs an SLRConfig, got {type(config).__name__}")
    train_config = train_config if train_config is not None else TrainConfig()
    before = count_cost(model, example_inputs)
    hook = SLRHook(model, config, check_batches=check_batches)
    metrics: dict[str, Any] = {"slr_history": []}
    if config.epochs:
        run = train(model, train_loader, val_loader, train_config.replace(epochs=config.epochs),
                    hooks=[hook], progress=progress, resume=resume, ckpt_dir=_phase_dir(ckpt_dir, "penalised"))
        metrics["slr_history"] = run.history
    example_inputs = inputs_to(example_inputs, next(model.parameters()).device)  # train() may have moved the model
    closing = example_inputs if config.sparsity_type == "filter" else None
    hard_prune_(model, hook, example_inputs=closing)
    # scores of the hard-pruned model, kept beside the checkpoints: a resumed run recalibrates
    # BatchNorm on other batches (the retrain checkpoint then restores the statistics it trained
    # with), so it reports the scores of the model it actually retrained
    # (only when that checkpoint exists: without it the model goes on from this recalibration)
    retrain_ckpt = _phase_dir(ckpt_dir, "retrain")
    scored = _saved_scores(ckpt_dir) if resume and config.retrain_epochs and retrain_ckpt is not None \
        and (retrain_ckpt / CHECKPOINT_NAME).is_file() else {}
    if val_loader is not None:
        metrics["hard_pruned"] = scored.get("hard_pruned") or evaluate(model, val_loader)
    if config.recalibrate_bn:
        recalibrate_bn(model, train_loader, config.recalibrate_batches)
        if val_loader is not None:
            metrics["hard_pruned_bn"] = scored.get("hard_pruned_bn") or evaluate(model, val_loader)
    if ckpt_dir is not None and not scored:
        kept = {k: metrics[k] for k in ("hard_pruned", "hard_pruned_bn") if k in metrics}
        atomic_write_text(Path(ckpt_dir) / _SCORES, json.dumps(kept, indent=1) + "\n")
    if config.retrain_epochs:
        run = train(model, train_loader, val_loader, train_config.replace(epochs=config.retrain_epochs),
                    progress=progress, resume=resume, ckpt_dir=_phase_dir(ckpt_dir, "retrain"))
        metrics["retrain_history"] = run.history
        if val_loader is not None:
            metrics["retrained"] = evaluate(model, val_loader)
    metrics["sparsity"] = sparsity_report(model)
    if config.sparsity_type == "filter":
        plan = shrink_(model, example_inputs)
        left = zero_filters(model)
        if left:  # each shares its channel with a live filter (a residual add joins them): removal cannot take it
            metrics["zero_filters_left"] = left
            shown = ", ".join(f"{k}: {v}" for k, v in list(left.items())[:4]) + (", ..." if len(left) > 4 else "")
            metrics.setdefault("notes", []).append(
                f"{sum(left.values())} zeroed filter(s) could not be removed ({shown}): each shares its channel with "
                "a layer whose filter stayed (layers joined by a residual add, say), so they stay in the model as "
                "zero filters; the projection is per layer, not per channel group")
    else:  # the masks stay on the model, so fine-tuning keeps the zeros and save_pruned stores them
        plan = empty_plan(example_inputs)
    plan.meta.update({"method": "slr", "config": config.to_dict()})
    return PruneResult(plan, before, count_cost(model, example_inputs), config.to_dict(), metrics)


def zero_filters(model: nn.Module) -> dict[str, int]:
    """{conv/Linear name: its output filters whose weights are all exactly zero} (those with any)."""
    out = {}
    for module, pname in target_weights(model, untied=False).values():  # the weight of every conv and Linear
        w = getattr(model.get_submodule(module), pname).detach()
        dead = int((w.flatten(1) == 0).all(1).sum()) if w.dim() >= 2 else 0
        if dead:
            out[module] = dead
    return out


_SCORES = "hard_pruned_scores.json"


def _saved_scores(ckpt_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The hard-pruned model's scores an earlier run of this checkpoint folder wrote ({} if none,
    or if the file is damaged: they are then measured again)."""
    path = None if ckpt_dir is None else Path(ckpt_dir) / _SCORES
    if path is None or not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in saved.items() if isinstance(v, dict)} if isinstance(saved, dict) else {}


def _phase_dir(ckpt_dir: str | os.PathLike[str] | None, phase: str) -> Path | None:
    return None if ckpt_dir is None else Path(ckpt_dir) / phase


def _register() -> None:
    from .. import register_method

    register_method("slr", SLRConfig, slr_prune_)


_register()
