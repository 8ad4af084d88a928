"""Named hooks through which methods plug into the training loop, and the state they may read.

The loop in `prunekit.engine.train` stays plain; a method (gates, Lagrangian penalties, an
architecture optimizer, masked retraining) subclasses `Hook` and overrides only what it needs.

Before the loop (once per `train` call):

    param_groups(model) -> [dict]    extra parameter groups of the main optimizer, each with its
                                     own settings ({"params": [...], "weight_decay": 0.0}); their
                                     parameters leave the default group
    owned_parameters(model) -> [P]   parameters the hook steps itself (multipliers, architecture
                                     weights, scores): the main optimizer never sees them (no
                                     weight decay, no momentum) and DDP does not synchronise them
    bind(state)                      called after any resume; `state` is the loop's `TrainState`

Every optimizer step, in this order:

    before_step(model, step)         the batch is on the device (state.batch), nothing computed yet
    extra_loss(model, step)          -> a scalar tensor added to the task loss, or None
    after_backward(model, step)      edit gradients after backward (state.loss is set)
    on_step_end(model, step)         act after the optimizer step (re-apply masks, clamp gates)
    on_epoch_end(model, epoch, metrics)  once per epoch (multiplier updates, schedules); may add
                                     entries to `metrics` (a dict that is logged)

A hook with `state_dict()` / `load_state_dict(state)` is checkpointed (engine/checkpoint.py):
put the state of any optimizer the hook owns in it. On resume `load_state_dict` runs *before*
`bind`, so create an owned optimizer in `__init__` (or in `bind` only when it does not exist yet).

>>> class CountSteps(Hook):
...     def __init__(self): self.n = 0
...     def on_step_end(self, model, step): self.n += 1
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..core.errors import ConfigError


@dataclass
class TrainState:
    """What the loop is doing now; one object per `train` call, updated in place.

    `step` is global (epoch * steps_per_epoch + batch index); `batch` is the current (x, y)
    already on the device and sharded (this rank's rows under DDP); `loss` is the current step's
    total loss (task + extra losses) once computed, else None. `model` is the user's module,
    never the DDP / torch.compile wrapper.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    cfg: Any
    steps_per_epoch: int
    epoch: int = 0
    step: int = 0
    batch: tuple[Any, Any] | None = None
    loss: torch.Tensor | None = None


class Hook:
    """Base class: every method is a no-op, override what you need (see the module doc)."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return []

    def owned_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return []

    def bind(self, state: TrainState) -> None:
        pass

    def before_step(self, model: nn.Module, step: int) -> None:
        pass

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        return None

    def after_backward(self, model: nn.Module, step: int) -> None:
        pass

    def on_step_end(self, model: nn.Module, step: int) -> None:
        pass

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, Any]) -> None:
        pass


@dataclass
class ParameterSplit:
    """Who updates which parameter: the main optimizer's default group, its hook-defined groups,
    or a hook itself (`owned`)."""

    default: list[nn.Parameter]
    groups: list[dict[str, Any]]
    owned: list[nn.Parameter]
    outside: dict[int, list[tuple[int, ...]]] = field(default_factory=dict)  # hook index -> shapes not in the model


def split_parameters(model: nn.Module, hooks: Sequence[Any]) -> ParameterSplit:
    """Ask every hook for its `owned_parameters` and `param_groups`; the model's other trainable
    parameters form the default group. A parameter claimed twice raises ConfigError.

    >>> m = nn.Linear(3, 2)
    >>> class NoDecayBias(Hook):
    ...     def param_groups(self, model): return [{"params": [model.bias], "weight_decay": 0.0}]
    >>> s = split_parameters(m, [NoDecayBias()])
    >>> len(s.default), s.groups[0]["weight_decay"], s.owned
    (1, 0.0, [])
    """
    names = {id(p): n for n, p in model.named_parameters()}
    claimed: dict[int, str] = {}
    outside: dict[int, list[tuple[int, ...]]] = {}

    def claim(p: Any, who: str, hook: int) -> None:
        if not isinstance(p, torch.Tensor):
            raise ConfigError(f"{who} lists a {type(p).__name__}; list torch.nn.Parameter objects")
        what = names.get(id(p), f"a {tuple(p.shape)} parameter outside the model")
        if id(p) not in names and id(p) not in claimed:
            outside.setdefault(hook, []).append(tuple(p.shape))
        if id(p) in claimed:
            raise ConfigError(f"{what} is claimed by both {claimed[id(p)]} and {who}; "
                              "give each parameter to one hook, in one place")
        claimed[id(p)] = who

    owned: list[nn.Parameter] = []
    for i, hook in enumerate(hooks):
        for p in _optional(hook, "owned_parameters", model):
            claim(p, f"hooks[{i}] ({type(hook).__name__}).owned_parameters", i)
            owned.append(p)
    groups: list[dict[str, Any]] = []
    for i, hook in enumerate(hooks):
        for j, group in enumerate(_optional(hook, "param_groups", model)):
            who = f"hooks[{i}] ({type(hook).__name__}).param_groups()[{j}]"
            if not isinstance(group, dict) or "params" not in group:
                raise ConfigError(f"{who} is not a dict with a 'params' list; "
                                  "return e.g. {'params': [p], 'weight_decay': 0.0}")
            params = _as_list(group["params"])
            for p in params:
                claim(p, who, i)
            groups.append({**group, "params": params})
    default = [p for p in model.parameters() if p.requires_grad and id(p) not in claimed]
    return ParameterSplit(default, groups, owned, outside)


def _optional(hook: Any, name: str, model: nn.Module) -> list[Any]:
    method = getattr(hook, name, None)  # hooks written before these methods existed lack them
    return _as_list(method(model)) if callable(method) else []


def _as_list(items: Any) -> list[Any]:
    """`items` as a list; one tensor is a list of itself (as torch.optim takes it), never its rows."""
    if isinstance(items, torch.Tensor):
        return [items]
    return list(items) if items is not None else []
