"""Which weights element criteria score, and where their gradients land.

>>> import torch.nn as nn
>>> sorted(target_weights(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Linear(2, 2))))
['0.weight', '2.weight']
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.errors import ConfigError, PruningError
from ..core.modules import torch_pruned, torch_pruned_error

_DEFAULT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def target_weights(model: nn.Module, targets: type | str | Sequence[type | str] | None = None,
                   untied: bool = True) -> dict[str, tuple[str, str]]:
    """Key "<module>.<param>" -> (module name, param name) of every weight to score.

    untied=True: a PruningError when two of them are one tensor (`check_untied`); False lists them
    (for a caller that filters the list and then asks again with the names it keeps).

    targets=None: the `weight` of every conv and Linear. Otherwise a module class or a list or
    tuple of module classes and names: a class stands for the `weight` of every module of that
    class; a name is "<module>.<param>", or a module name (its `weight`).
    """
    modules = dict(model.named_modules())
    if targets is None:
        targets = (_DEFAULT_TYPES,)
    elif isinstance(targets, (type, str)):
        targets = (targets,)
    elif not isinstance(targets, (list, tuple)):
        raise ConfigError(f"targets={targets!r}; give module classes (nn.Linear) or names like "
                          "'layer1.0.conv1.weight', alone or in a list")
    out = {}
    for t in targets:
        if isinstance(t, type) or (isinstance(t, tuple) and all(isinstance(c, type) for c in t)):
            out.update({_key(n, "weight"): (n, "weight") for n, m in modules.items()
                        if isinstance(m, t) and isinstance(getattr(m, "weight", None), torch.Tensor)})
            continue
        if not isinstance(t, str):
            raise ConfigError(f"targets holds {t!r}; give module classes (nn.Linear) or names like "
                              "'layer1.0.conv1.weight'")
        mod, _, pname = t.rpartition(".") if t not in modules else (t, "", "weight")
        if mod not in modules or not isinstance(getattr(modules[mod], pname, None), torch.Tensor):
            raise ConfigError(f"target {t!r} names no tensor of the model; use '<module>.<param>' with a module "
                              f"from model.named_modules(), e.g. {next(iter(target_weights(model)), '0.weight')!r}")
        out[_key(mod, pname)] = (mod, pname)
    return check_untied(model, out) if untied else out


def check_not_torch_pruned(model: nn.Module, weights: dict[str, tuple[str, str]]) -> None:
    """ConfigError for a weight torch.nn.utils.prune computes in a forward pre-hook: a method that
    masks weights needs the stored tensor (then "<name>_orig"), and its own masks on top of that
    hook would be undone or doubled."""
    for mod, pname in weights.values():
        if pname in torch_pruned(model.get_submodule(mod)):
            raise ConfigError(torch_pruned_error(mod, [pname]))


def tied_parameters(model: nn.Module) -> list[list[str]]:
    """Names of the parameters held by more than one name (tied weights), one list per tensor."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [n for n in names.values() if len(n) > 1]


def check_untied(model: nn.Module, weights: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """`weights`, or a PruningError when two of them are one tensor (tied weights): a score or mask
    kept per name would then differ between the names of one tensor."""
    seen: dict[int, str] = {}
    held = []  # the tensors compared stay alive, so that no two of them can share an id
    for key, (mod, pname) in weights.items():
        module = model.get_submodule(mod)
        # a parametrized weight is computed afresh on every read: compare the tensor it is stored as
        stored = (module.parametrizations[pname].original if parametrize.is_parametrized(module, pname)
                  else getattr(module, pname))
        held.append(stored)
        other = seen.setdefault(id(stored), key)
        if other != key:
            raise PruningError(f"{other} and {key} are one tensor (tied weights); weights are scored and masked one "
                               "name at a time, which would untie them: leave both modules out with ignore=[...] "
                               "or untie the weights")
    return weights


def check_not_shared(model: nn.Module, weights: dict[str, tuple[str, str]], leave_out: str = "ignore=['{module}']") -> None:
    """PruningError when a weight of `weights` is also held by a module outside them (a Linear
    head tied to an embedding): a mask on its one name would leave the other module reading the
    whole tensor, masked entries included. One module reached under two names is one reader.
    `leave_out` says how the caller's config leaves a module out ({module} is its name)."""
    readers: dict[int, dict[int, str]] = {}  # id(stored tensor) -> {id(module): a name it holds it under}
    for mname, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, parametrize.ParametrizationList):
            continue  # holds the original of a parametrized weight for the module it belongs to
        held = dict(module._parameters)
        if parametrize.is_parametrized(module):
            held.update({pname: plist.original for pname, plist in module.parametrizations.items()})
        for pname, p in held.items():
            if p is not None:
                readers.setdefault(id(p), {}).setdefault(id(module), _key(mname, pname))
    scored = {id(model.get_submodule(mod)) for mod, _ in weights.values()}
    for key, (mod, pname) in weights.items():
        module = model.get_submodule(mod)
        stored = (module.parametrizations[pname].original if parametrize.is_parametrized(module, pname)
                  else getattr(module, pname))
        outside = [name for at, name in readers.get(id(stored), {}).items() if at not in scored]
        if outside:
            raise PruningError(f"{key} is one tensor with {outside[0]} (tied weights), which is not pruned here: a "
                               f"mask on {key} would leave {outside[0]} reading the whole tensor; leave it out with "
                               f"{leave_out.format(module=mod)} or untie the weights")


def _key(module: str, pname: str) -> str:
    return f"{module}.{pname}" if module else pname


def leaf_names(model: nn.Module, weights: dict[str, tuple[str, str]]) -> dict[str, str]:
    """Key -> name in `model.named_parameters()` of the tensor gradients flow into (the stored
    original of a parametrized weight: "<module>.parametrizations.<param>.original")."""
    out = {}
    for key, (mod, pname) in weights.items():
        module = model.get_submodule(mod)
        stored = f"parametrizations.{pname}.original" if parametrize.is_parametrized(module, pname) else pname
        out[key] = _key(mod, stored)
    return out


