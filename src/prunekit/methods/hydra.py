"""HYDRA-style pruning of a trained network: learn one score per weight, keep the top-k.

Every Conv2d/Linear (except `ignore`) becomes a `SparseConv2d`/`SparseLinear` sharing its
weights, with scores initialised from |w| (scaled as HYDRA does, so the first mask is the
magnitude mask) and the per-layer top-k at `density`. The scores are trained with the weights
(and, unless `train_bn`, every other parameter) frozen; then each layer returns to its plain
class carrying the learned mask as a persistent `Mask` parametrization. The model saves as
masks + weights (`save_pruned` stores the masks, `load_pruned` puts them back),
and nonzeros are counted from the effective weights. No channel is removed: the MACs of dense
kernels do not change (see `metrics["nonzero"]`).

>>> import torch
>>> from torch import nn
>>> from prunekit.engine.train import TrainConfig
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
>>> data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 2, (8,)))]
>>> r = hydra_prune_(net, HydraConfig(density=0.1, epochs=1), data[0][0], train_loader=data,
...                  train_config=TrainConfig(epochs=1, lr=0.1))
>>> r.metrics["nonzero"], r.metrics["total"]
(33, 324)
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.config import Config, check_choice, check_range
from ..core.errors import ConfigError, PruningError
from ..core.names import within
from ..graph.groups import check_ignore
from ..importance.targets import check_not_shared, target_weights
from ..layers.sparse import SCORE_INITS, count_nonzeros, harden_, sparsifiable, sparsify_
from ..surgery.copying import adopt_, keep_parameters_
from ..surgery.masks import sparsity_report
from ..surgery.plan import empty_plan
from .result import PruneResult


@dataclasses.dataclass
class HydraConfig(Config):
    """HYDRA: one learned score per weight of a trained network; each layer keeps its top-k weights.

    density: kept share of each layer's weights (per-layer top-k); epochs: score training;
    lr: of the score optimizer (the train_config's optimizer, SGD by default, with its momentum and weight decay);
    score_init: "scaled" (HYDRA's |w|-ranked init) or "kaiming"; train_bn: also train
    BatchNorm affine parameters while the scores learn; ignore: layer names kept dense."""

    density: float = 0.1
    epochs: int = 1
    lr: float = 0.1
    score_init: str = "scaled"
    train_bn: bool = False
    ignore: list[str] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        check_range("density", self.density, 0.0, 1.0, lo_open=True)
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise ConfigError(f"epochs={self.epochs!r} must be an integer >= 0 (0: magnitude top-k only)")
        check_range("lr", self.lr, 0.0, float("inf"), lo_open=True)
        check_choice("score_init", self.score_init, SCORE_INITS)


def _freeze_all_but_scores(model: nn.Module, train_bn: bool) -> None:
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            keep = name == "scores" or (train_bn and isinstance(mod, nn.modules.batchnorm._NormBase))
            p.requires_grad_(keep)


def hydra_prune_(model: nn.Module, config: HydraConfig, example_inputs: Any, *,
                 train_loader: Iterable | None = None, val_loader: Iterable | None = None,
                 train_config: Any = None, progress: bool = False) -> PruneResult:
    """Learn per-weight score masks at `config.density` and leave `model` masked in place."""
    from ..cost.macs import count_cost
    from ..engine.train import TrainConfig, train

    if not isinstance(config, HydraConfig):
        raise ConfigError(f"hydra_prune_ needs a HydraConfig, got {type(config).__name__}")
    check_ignore(model, config.ignore)
    _check_targets(model, config.ignore)
    if config.epochs and train_loader is None:
        raise ConfigError("hydra with epochs > 0 needs train_loader=...; or set epochs=0 for the magnitude top-k")
    before = count_cost(model, example_inputs)
    work = copy.deepcopy(model)  # the caller's model changes only once everything succeeded
    requires = {n: p.requires_grad for n, p in work.named_parameters()}
    swapped = sparsify_(work, config.density, config.score_init, freeze_weights=True, ignore=config.ignore)
    if not swapped:
        raise PruningError("the model has no Conv2d or Linear outside `ignore`; nothing to prune")
    metrics: dict[str, Any] = {}
    if config.epochs:
        _freeze_all_but_scores(work, config.train_bn)
        cfg = (train_config or TrainConfig()).replace(epochs=config.epochs, lr=config.lr)
        metrics["score_history"] = train(work, train_loader, val_loader, cfg, progress=progress).history
    harden_(work)
    for name, p in work.named_parameters():  # masked weights are "parametrizations.weight.original"
        p.requires_grad_(requires.get(name, requires.get(name.replace(".parametrizations.weight.original",
                                                                      ".weight"), True)))
    metrics.update(count_nonzeros(work), sparsity=sparsity_report(work))
    example_inputs = _on_device(work, example_inputs)
    plan = empty_plan(example_inputs)
    plan.meta.update({"method": "hydra", "config": config.to_dict()})
    plan.stamp(dense=work, pruned=work)  # masks change no architecture
    after = count_cost(work, example_inputs)  # the last step that may fail: the caller's model is still whole
    keep_parameters_(model, work)
    adopt_(model, work)
    return PruneResult(plan, before, after, config.to_dict(), metrics)


def _check_targets(model: nn.Module, ignore: list[str]) -> None:
    """Refuse, before any change, layers HYDRA cannot give a mask of their own: one already masked, a
    weight tied to another module (masked on one name, the other would read it whole, or two masks
    would untie it)."""
    masked = [n for n, m in model.named_modules() if parametrize.is_parametrized(m, "weight")
              and type(m).__bases__[0] in (nn.Conv2d, nn.Linear) and not within(n, ignore)]
    if masked:
        raise ConfigError(f"layers {masked} already carry weight masks; HYDRA learns a fresh mask for each layer "
                          f"from its dense weights: bake the masks first (prunekit.bake_masks_), or leave those "
                          f"layers as they are with ignore={masked!r}")
    check_not_shared(model, target_weights(model, [f"{n}.weight" for n in sparsifiable(model, ignore)]))


def _on_device(model: nn.Module, example: Any) -> Any:
    device = next(model.parameters()).device
    return example.to(device) if isinstance(example, torch.Tensor) else example


def _register() -> None:
    from . import register_method

    register_method("hydra", HydraConfig, hydra_prune_)


_register()
