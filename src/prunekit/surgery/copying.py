"""Working copies for surgery, and handing a finished result back to the caller's model.

Surgery never writes into a tensor: `remove_channels_` assigns new, smaller tensors and
`zero_contributions_` assigns zeroed copies. A working copy therefore needs its own module
objects and attribute containers, but can share every parameter and buffer with the original:
`share_copy` costs microseconds per module where `copy.deepcopy` copies every weight (60 ms for a
ResNet-50 on one CPU thread). Code that writes into tensors (training, backward passes that fill
`.grad`) must work on `copy.deepcopy` instead.

`adopt_` makes the caller's model the finished copy *in place*: every module of the original
takes the state of its counterpart, so references the caller holds (to the model, to a
submodule, to parameters that were not pruned) stay valid and see the result.

>>> import torch.nn as nn
>>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
>>> work = share_copy(m)
>>> work[0] is m[0], work[0].weight is m[0].weight
(False, True)
>>> work[0].out_channels = 4; m[0].out_channels
8
>>> first = m[0]; adopt_(m, work); first.out_channels, m[0] is first
(4, True)
"""
from __future__ import annotations

import copy
import re
import types

import torch
from torch import nn
from torch.nn.utils import parametrize


def share_copy(model: nn.Module) -> nn.Module:
    """New module objects with their own attribute containers, sharing every tensor."""
    return _copy(model, {})


def _copy(mod: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    if id(mod) in memo:  # a module used twice stays one module
        return memo[id(mod)]
    cls = type(mod)
    try:
        new = cls.__new__(cls)  # no __init__: the state is copied below
    except TypeError:  # a class whose __new__ wants arguments
        new = copy.copy(mod)
    memo[id(mod)] = new
    new.__dict__.update({key: value.copy() if isinstance(value, (dict, list, set)) else _rebound(value, mod, new)
                         for key, value in mod.__dict__.items()})
    for key, child in mod._modules.items():
        new._modules[key] = None if child is None else _copy(child, memo)
    return new


def adopt_(model: nn.Module, work: nn.Module) -> None:
    """Make `model` the modified copy `work`, in place.

    Modules are paired by name and class (a class and its parametrized form count as one: a
    layer that gained or lost weight masks); each original takes its counterpart's attributes
    (tensors, sizes, children, class) but keeps its own hooks, and children point back to the
    original objects. Modules `work` added or replaced (a removed branch) are taken as they are.
    """
    originals, modified = dict(model.named_modules()), list(work.named_modules())
    pairs = [(originals[name], new) for name, new in modified
             if name in originals and _plain_class(originals[name]) is _plain_class(new)]
    back = {id(new): old for old, new in pairs}
    for _, new in modified:
        for key, child in new._modules.items():
            if child is not None and id(child) in back:
                new._modules[key] = back[id(child)]
    for old, new in pairs:
        if old is not new:
            old.__dict__.update({k: _rebound(v, new, old) for k, v in new.__dict__.items() if "hooks" not in k})
            old.__class__ = type(new)


def keep_parameters_(model: nn.Module, work: nn.Module) -> None:
    """Put `model`'s parameter objects into `work`, a deep copy, wherever `work` holds a parameter
    of the same name, shape, dtype and device, with `work`'s values and requires_grad copied into them.

    Call it just before `adopt_(model, work)`: the caller's parameters (which an optimizer built
    before the call may hold) then stay the model's parameters. A weight that gained a mask in
    `work` (`conv.parametrizations.weight.original`) is matched to the caller's `conv.weight`.
    """
    originals = dict(model.named_parameters(remove_duplicate=False))
    for mod_name, mod in work.named_modules(remove_duplicate=False):
        for name, p in mod._parameters.items():
            full = f"{mod_name}.{name}" if mod_name else name
            old = originals.get(full, originals.get(_unparametrized(full)))
            if p is None or old is None or old is p or _form(old) != _form(p):
                continue
            with torch.no_grad():
                old.copy_(p)
            old.requires_grad_(p.requires_grad)
            mod._parameters[name] = old


def _form(t: torch.Tensor) -> tuple:
    return t.shape, t.dtype, t.device


def _unparametrized(name: str) -> str:
    """The plain name of a parametrized tensor (`conv.parametrizations.weight.original` ->
    `conv.weight`); any other name as it is."""
    return re.sub(r"(^|\.)parametrizations\.([^.]+)\.original$", r"\1\2", name)


def _plain_class(mod: nn.Module) -> type:
    """The module's class, or the class parametrize derived its `Parametrized...` class from."""
    return type(mod).__bases__[0] if parametrize.is_parametrized(mod) else type(mod)


def _rebound(value, source: nn.Module, target: nn.Module):
    """A method of `source` kept as an attribute (`self.forward = self.forward_split_cat`, as timm's
    FasterNet picks its forward) is bound to `target`: called there, it must see `target`'s children."""
    if isinstance(value, types.MethodType) and value.__self__ is source:
        return types.MethodType(value.__func__, target)
    return value
