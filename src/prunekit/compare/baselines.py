"""Outside baselines a comparison can run beside prunekit's methods: Torch-Pruning.

The Torch-Pruning arm uses that library the way its own examples do (its `benchmarks/main.py`
"progressive pruning"): `tp.pruner.MetaPruner` with `tp.importance.GroupMagnitudeImportance`
(group L-p norm, mean reduction and normaliser), `pruning_ratio=1.0` spread over
`iterative_steps` equal steps, and `pruner.step()` until the pruned model keeps at most
`macs_fraction` (or `params_fraction`) of the dense model. The stopping test counts MACs with
prunekit's counter (`prunekit.cost.macs`), the number the comparison reports, so every arm is
held to the same yardstick. The classifier (every Linear whose output is the logits) is not
pruned, as in its examples. When torch_pruning cannot be imported, the arm is skipped with a
note instead of failing the comparison.

>>> cfg = TorchPruningConfig(macs_fraction=0.5, round_to=8)
>>> cfg.p, cfg.iterative_steps
(2, 400)
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import torch
from torch import nn

from ..core.config import Config, check_range
from ..core.errors import ConfigError, PruningError
from ..core.registry import Registry
from ..cost.macs import count_cost
from ..methods.result import PruneResult
from ..surgery.plan import empty_plan

# name -> (config class, handler, importer of the library the handler needs)
BASELINES: Registry[tuple[type[Config], Callable, Callable[[], Any]]] = Registry("baseline")


@dataclasses.dataclass
class TorchPruningConfig(Config):
    """Torch-Pruning's group-norm magnitude pruner, stepped until a MACs or params fraction."""

    macs_fraction: float | None = None
    params_fraction: float | None = None
    p: int = 2
    iterative_steps: int = 400
    round_to: int | None = None
    global_pruning: bool = False
    seed: int = 0

    def validate(self) -> None:
        given = [k for k in ("macs_fraction", "params_fraction") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError("give exactly one of macs_fraction or params_fraction (the share that remains)")
        check_range(given[0], getattr(self, given[0]), 0.0, 1.0, lo_open=True, hi_open=True)
        for name, low in (("p", 1), ("iterative_steps", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}={value!r} must be an integer >= {low}")
        if self.round_to is not None and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
                                          or self.round_to < 1):
            raise ConfigError(f"round_to={self.round_to!r} must be an integer >= 1 or null")


def import_torch_pruning() -> Any:
    """The torch_pruning module (ImportError when it is not installed)."""
    return importlib.import_module("torch_pruning")


def torch_pruning_prune_(model: nn.Module, config: TorchPruningConfig, example_inputs: torch.Tensor) -> PruneResult:
    """Prune `model` in place with Torch-Pruning until the fraction is reached; see the module doc."""
    tp = import_torch_pruning()
    before = count_cost(model, example_inputs)
    model.eval()
    with torch.no_grad():
        logits = model(example_inputs)
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == logits.shape[-1]]
    importance = tp.importance.GroupMagnitudeImportance(p=config.p)
    pruner = tp.pruner.MetaPruner(model, example_inputs, importance=importance, pruning_ratio=1.0,
                                  iterative_steps=config.iterative_steps, ignored_layers=ignored,
                                  round_to=config.round_to, global_pruning=config.global_pruning)
    metric = "macs" if config.macs_fraction is not None else "params"
    goal = config.macs_fraction if metric == "macs" else config.params_fraction
    now, steps = before, 0
    while getattr(now, metric) > goal * getattr(before, metric):
        if pruner.current_step >= pruner.iterative_steps:
            raise PruningError(f"Torch-Pruning reached its last step with {getattr(now, metric) / getattr(before, metric):.3f} "
                               f"of the {metric} left, above {goal}; raise iterative_steps")
        pruner.step()
        steps += 1
        now = count_cost(model, example_inputs)
    metrics = {"steps": steps, "library": "torch_pruning", f"{metric}_fraction": getattr(now, metric) / getattr(before, metric)}
    plan = empty_plan(example_inputs)
    plan.meta.update({"method": "torch_pruning", "note": "pruned by Torch-Pruning; no prunekit plan to replay"})
    return PruneResult(plan, before, now, config.to_dict(), metrics)


def resolve(name: str) -> tuple[type[Config], Callable, str | None]:
    """(config class, handler, skip reason or None): the reason says why the baseline cannot run."""
    config_cls, handler, importer = BASELINES.get(name)
    try:
        importer()
    except ImportError as err:
        return config_cls, handler, (f"{name} skipped: its library is not importable here ({err}); "
                                     "`pip install -e .[bench]` installs it")
    return config_cls, handler, None


# The lambda looks the importer up at call time, so tests can replace it.
BASELINES.register("torch_pruning", (TorchPruningConfig, torch_pruning_prune_, lambda: import_torch_pruning()))
