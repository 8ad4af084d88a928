"""Trace and probe once, prune many fresh copies: `prepare_pruning`.

Tracing and probing depend on the architecture only, not on the weights. A `PreparedPruning`
holds the probed graph of one model and prunes any fresh copy of the same architecture (same
parameter names, shapes and dtypes, and modules of the same classes) with any method that
registered a prepared handler, skipping the trace and the probe. That is what a search over
thousands of criteria needs.

>>> import copy, torch, torch.nn as nn
>>> from prunekit.methods.magnitude import MagnitudeConfig
>>> dense = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> prepared = prepare_pruning(dense, torch.randn(1, 3, 8, 8))
>>> for crit in ("l1", "l2", lambda group, ctx: torch.arange(group.size, dtype=torch.float)):
...     model = copy.deepcopy(dense)
...     result = prepared.prune_(model, MagnitudeConfig(channel_ratio=0.5, criterion=crit))
>>> model[0].out_channels
4
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from torch import nn

from ..core.config import Config, check_names
from ..core.errors import ConfigError, PruningError
from ..cost.macs import Cost, CostEstimator, cost_from_graph
from ..graph import Graph
from .plan_check import architecture_fingerprint
from .verify import build_safe_graph, module_settings

# config class -> handler(prepared, model, config, **kwargs) -> PruneResult
_PREPARED_HANDLERS: dict[type, Callable] = {}


def register_prepared_handler(config_cls: type[Config], handler: Callable) -> None:
    """Let `PreparedPruning.prune_` prune with configs of `config_cls` (the method's own code path)."""
    _PREPARED_HANDLERS[config_cls] = handler


def _signature(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """{parameter name: (shape, dtype)}: what a copy must share with the prepared model."""
    return {name: (tuple(p.shape), str(p.dtype).removeprefix("torch.")) for name, p in model.named_parameters()}


def _module_classes(model: nn.Module) -> dict[str, tuple[type, tuple]]:
    """{module name: (class, settings)}: modules of another class (a GroupNorm for a BatchNorm, a
    subclass with its own forward, a class defined again) or other plain attributes (a flag that
    turns a branch on) can hold the same parameters and still need another graph."""
    return {name: (type(m), module_settings(m)) for name, m in model.named_modules()}


@dataclass
class PreparedPruning:
    """A model's probed graph plus what every pruning of a copy reuses (costs, estimate table)."""

    graph: Graph
    example_inputs: Any
    ignore: tuple[str, ...]
    probed: bool
    shapes: dict[str, tuple[tuple[int, ...], str]]  # parameter name -> (shape, dtype)
    cost_before: Cost
    estimator: CostEstimator = field(repr=False)
    modules: dict[str, tuple[type, tuple]] = field(default_factory=dict, repr=False)  # name -> (class, settings)
    fingerprint: str | None = None  # architecture_fingerprint of the prepared model, recorded in each plan

    def check(self, model: nn.Module) -> None:
        """PruningError unless `model` has exactly the prepared model's parameter names, shapes and
        dtypes, and modules of the same classes."""
        got = _signature(model)
        if got == self.shapes:
            self._check_classes(model)
            return
        missing = [n for n in self.shapes if n not in got]
        extra = [n for n in got if n not in self.shapes]
        shape = [f"{n} {list(got[n][0])} {got[n][1]} (prepared {list(self.shapes[n][0])} {self.shapes[n][1]})"
                 for n in self.shapes if n in got and got[n] != self.shapes[n]]
        what = "; ".join(part for part in (f"missing {missing[:3]}" if missing else "",
                                           f"unexpected {extra[:3]}" if extra else "",
                                           f"other shapes or dtypes: {', '.join(shape[:3])}" if shape else "") if part)
        raise PruningError(f"this model is not a fresh copy of the prepared one ({what}); prune copies of the "
                           "unpruned model it was prepared on, or call prepare_pruning on this model")

    def _check_classes(self, model: nn.Module) -> None:
        if not self.modules:
            return
        got = _module_classes(model)
        if got == self.modules:
            return
        def said(entry: tuple[type, tuple] | None, other: tuple[type, tuple]) -> str:
            if entry is None:
                return "missing"
            if entry[0] is not other[0]:
                same_name = entry[0].__qualname__ == other[0].__qualname__
                return f"{entry[0].__qualname__}" + (" (a class defined again)" if same_name else "")
            theirs = dict(other[1])
            return f"settings {({k: v for k, v in entry[1] if theirs.get(k, object()) != v})}"
        other = [f"{n or '(the model)'} {said(got.get(n), c)} (prepared {said(c, got.get(n, c))})"
                 for n, c in self.modules.items() if got.get(n) != c]
        other += [f"{n} {c[0].__qualname__} (not in the prepared model)" for n, c in got.items() if n not in self.modules]
        raise PruningError(f"this model is not a fresh copy of the prepared one (other modules: "
                           f"{', '.join(other[:3])}): its graph may differ even where its parameters match; "
                           "prune copies of the model it was prepared on, or call prepare_pruning on this model")

    def prune_(self, model: nn.Module, config: Config, batches: Any = None, **kwargs: Any):
        """Prune `model` (a fresh copy of the prepared architecture) in place; returns a PruneResult.

        No trace and no probe: the prepared graph is reused. Keyword arguments go to the method
        (e.g. `between_steps` for the magnitude method)."""
        handler = _PREPARED_HANDLERS.get(type(config))
        if handler is None:
            raise ConfigError(f"{type(config).__name__} cannot prune from a prepared graph; methods that can: "
                              f"{', '.join(sorted(c.__name__ for c in _PREPARED_HANDLERS)) or '(none)'}")
        if set(getattr(config, "ignore", ()) or ()) != set(self.ignore):  # the same modules, in any order
            raise ConfigError(f"config.ignore={list(getattr(config, 'ignore', []))} differs from the prepared "
                              f"ignore={list(self.ignore)}; prepare with the same ignore list")
        if getattr(config, "probe", False) and not self.probed:
            raise ConfigError("the config asks for probing but the graph was prepared with probe=False; "
                              "prepare with probe=True or set probe=False in the config")
        import inspect

        try:
            inspect.signature(handler).bind(self, model, config, batches=batches, **kwargs)
        except TypeError as err:
            raise ConfigError(f"prepared.prune_ with {type(config).__name__}: {err} (its keyword arguments go to "
                              f"the method; see help({handler.__module__}.{handler.__name__}))") from None
        self.check(model)
        from ..methods import _check_finite  # the checks prune_ makes (methods import this module)

        _check_finite(model, self.example_inputs)
        result = handler(self, model, config, batches=batches, **kwargs)
        if self.fingerprint is not None:  # as prune_ records them: saving or replaying on another model is refused
            result.plan.fingerprint.update(dense=self.fingerprint, pruned=architecture_fingerprint(model))
        return result


def prepare_pruning(model: nn.Module, example_inputs: Any, ignore: Sequence[str] = (),
                    probe: bool = True) -> PreparedPruning:
    """Trace `model` once (and probe its groups, see surgery/verify.py) for repeated pruning of copies.

    The model itself is not changed; prune copies of it (e.g. `copy.deepcopy(model)`) with
    `prepared.prune_(copy, config)`."""
    check_names("ignore", ignore if isinstance(ignore, str) else list(ignore))  # not a bare name
    graph = build_safe_graph(model, example_inputs, list(ignore), probe=probe)
    return PreparedPruning(graph, example_inputs, tuple(ignore), probe, _signature(model),
                           cost_from_graph(model, graph), CostEstimator(model, graph), _module_classes(model),
                           architecture_fingerprint(model))
