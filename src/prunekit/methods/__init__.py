"""Pruning methods: one config class and one handler each, dispatched on the config's type.

>>> import torch, torch.nn as nn
>>> from prunekit.methods.magnitude import MagnitudeConfig
>>> m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 1))
>>> result = prune_(m, MagnitudeConfig(channel_ratio=0.5), torch.randn(1, 3, 8, 8))
>>> m[0].out_channels, result.cost_after.params < result.cost_before.params
(8, True)
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from ..core.config import Config
from ..core.errors import ConfigError
from ..core.modules import require_module, unwrap_model
from ..core.registry import Registry
from .result import PruneResult

METHODS: Registry[tuple[type[Config], Callable]] = Registry("method")
_HANDLERS: dict[type, Callable] = {}


# Method names that stand for another method with some fields fixed.
METHOD_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {"admm": ("slr", {"optimization": "admm"})}


def resolve_alias(name: str, fields: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(method, fields) for a method name that may be an alias ("admm": slr with optimization
    admm); ConfigError when the fields contradict what the alias fixes."""
    if name not in METHOD_ALIASES:
        return name, fields
    target, fixed = METHOD_ALIASES[name]
    for key, value in fixed.items():
        if fields.get(key, value) != value:
            raise ConfigError(f"method {name!r} means {target} with {key}={value!r}; "
                              f"remove {key}={fields[key]!r} or use name: {target}")
    return target, {**fields, **fixed}


def register_method(name: str, config_cls: type[Config], handler: Callable) -> None:
    METHODS.register(name, (config_cls, handler))
    _HANDLERS[config_cls] = handler


def get_config_class(name: str) -> type[Config]:
    return METHODS.get(name)[0]


# The fields of a training method's config that set how many epochs each of its phases trains.
TRAINED_EPOCH_FIELDS = ("epochs", "finetune_epochs", "retrain_epochs")


def check_training_phases(config: Config, train_config: Any, section: str = "method_train") -> None:
    """ConfigError when a phase of a training method cannot train under `train_config` with its
    epochs replaced by the phase's (a warm-up as long as the phase): found before any training,
    not when the phase starts. `section` names where `train_config` comes from."""
    for name in TRAINED_EPOCH_FIELDS:
        epochs = getattr(config, name, None)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            continue
        try:
            train_config.replace(epochs=epochs)
        except ConfigError as err:
            raise ConfigError(f"the method's {name}={epochs} phase trains with {section} for {epochs} "
                              f"epoch{'s' if epochs != 1 else ''}, for which {err}; lower {section}.warmup_epochs "
                              f"or raise the method's {name}") from None


def prune_(model: nn.Module, config: Config, example_inputs: Any, **kwargs: Any) -> PruneResult:
    """Prune `model` in place with the method `config` belongs to; returns plan + costs."""
    require_module(model)
    _check_prunable_object(model)
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise ConfigError(f"{type(config).__name__} is not a registered method config; "
                          f"methods: {', '.join(METHODS.list())}")
    from ..core.modes import kept_modes
    from ..surgery.plan_check import architecture_fingerprint

    try:
        inspect.signature(handler).bind(model, config, example_inputs, **kwargs)
    except TypeError as err:  # e.g. a method that trains, called without its train_loader
        raise ConfigError(f"{type(config).__name__}: {err} (prune_'s keyword arguments go to the method; see "
                          f"help({handler.__module__}.{handler.__name__}))") from None
    _check_recordable(model, example_inputs)
    _check_finite(model, example_inputs)
    dense = architecture_fingerprint(model)
    with kept_modes(model):  # methods that train (or add layers) hand back the caller's train/eval modes
        result = handler(model, config, example_inputs, **kwargs)
    # The plan names the architecture it starts from and the one it produces: replaying it on
    # another model, or saving it with another model, is then refused with a clear message.
    result.plan.fingerprint.update(dense=dense, pruned=architecture_fingerprint(model))
    return result


def _check_prunable_object(model: nn.Module) -> None:
    """ConfigError for a wrapper or a model without real tensors: what to pass instead."""
    if unwrap_model(model) is not model:
        raise ConfigError(f"prune the module inside this {type(model).__name__} wrapper (model.module for "
                          "DistributedDataParallel, model._orig_mod for torch.compile), then wrap the pruned model "
                          "again: its widths change, so a compiled or replicated copy is stale")
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ConfigError("this model's tensors are on the meta device (no values): build it on the CPU or GPU, or "
                          "load its weights first (model.to_empty(device='cpu') then load_state_dict)")


def _check_recordable(model: nn.Module, example_inputs: Any) -> None:
    """Every method's plan records the example inputs as positional tensors: another form (a
    dict of keyword tensors, say) fails here, before any timing or training. Inputs the model
    cannot run on at all get the message build_graph gives (what was given, what it takes)."""
    from ..core.errors import PruningError
    from ..core.modes import evaluating
    from ..graph.inputs import check_inputs_fit, split_inputs
    from ..surgery.plan import plan_inputs

    try:
        plan_inputs(example_inputs)
    except PruningError as err:
        args, kwargs = split_inputs(example_inputs)
        with evaluating(model):  # a plain forward in eval mode: the caller's BatchNorm statistics stay
            check_inputs_fit(model, args, kwargs, err.__cause__ or RuntimeError(str(err)))
        raise


def _check_finite(model: nn.Module, example_inputs: Any) -> None:
    """ConfigError naming the first parameter that is not finite, or the first buffer or example
    input holding NaN (buffers may hold -inf on purpose, as attention masks do): every method would
    otherwise hand back a model whose outputs are NaN, whatever its criterion reads."""
    from ..core.modules import first_nonfinite, nonfinite_words

    bad = first_nonfinite(model)
    if bad is not None:
        kind, name = bad
        raise ConfigError(f"{kind} {name} holds {nonfinite_words(kind)} (a diverged training?); nothing can be "
                          "pruned from it: retrain with a lower learning rate or load weights that are finite")
    tensors = example_inputs.values() if isinstance(example_inputs, dict) else (
        example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,))
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.isnan().any():
            raise ConfigError("the example inputs hold NaN; give inputs of the kind the model is run on")


from . import magnitude  # noqa: E402,F401  (registers the reference method)
from . import slr  # noqa: E402,F401  (registers "slr"; ADMM is SLRConfig(optimization="admm"))
from . import gator  # noqa: E402,F401  (registers "gator")
from . import hydra  # noqa: E402,F401  (registers "hydra": learned per-weight score masks)
from . import ssc  # noqa: E402,F401  (registers "ssc")
from . import pai  # noqa: E402,F401  (registers "snip", "grasp", "synflow", "random_init")
