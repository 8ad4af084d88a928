"""Facts about a model's modules and tensors that every part of prunekit reads the same way."""
from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError


def require_module(model: object, what: str = "model") -> None:
    """ConfigError unless `model` is a torch.nn.Module (a name, a path or None is a common slip)."""
    if not isinstance(model, nn.Module):
        hint = (f"; build it first, e.g. prunekit.models.create_model({model!r}, num_classes)"
                if isinstance(model, str) else "")
        raise ConfigError(f"{what} must be a torch.nn.Module, got {type(model).__name__}{hint}")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel and/or torch.compile wrappers (ConfigError
    for anything that is not a module)."""
    require_module(model)
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def torch_pruned(module: nn.Module) -> list[str]:
    """Names of `module`'s tensors that torch.nn.utils.prune computes in a forward pre-hook (from
    "<name>_orig" and "<name>_mask"): not parameters of their own, so nothing may score, mask or
    copy them as if they were."""
    from torch.nn.utils import prune as torch_prune

    return [h._tensor_name for h in module._forward_pre_hooks.values()
            if isinstance(h, torch_prune.BasePruningMethod) and hasattr(h, "_tensor_name")]


def torch_pruned_error(name: str, tensors: list[str]) -> str:
    """The message for a layer pruned with torch.nn.utils.prune: what to do first."""
    first = tensors[0]
    return (f"layer {name!r} was pruned with torch.nn.utils.prune ({first} is computed from {first}_orig * "
            f"{first}_mask in a forward pre-hook); make that pruning permanent first "
            f"(torch.nn.utils.prune.remove(module, {first!r})), or leave the layer out with ignore=[...]")


def first_nonfinite(model: nn.Module) -> tuple[str, str] | None:
    """("parameter" or "buffer", name) of the first tensor that cannot be right, or None.

    A parameter must be finite. A buffer must not hold NaN, but may hold -inf or inf on purpose
    (additive attention masks do). One reduction a tensor (NaN reaches both ends of aminmax) and one
    host synchronisation a kind, so the check stays cheap on large models and on a GPU.
    """
    for kind, named in (("parameter", list(model.named_parameters())), ("buffer", list(model.named_buffers()))):
        named = [(n, t.detach()) for n, t in named if t.is_floating_point() and t.numel()]
        if not named or _all_norms_finite([t for _, t in named]):  # finite norms: no NaN nor inf anywhere
            continue
        ends = torch.stack([e.float().cpu() for _, t in named for e in torch.aminmax(t)])
        ok = torch.isfinite(ends) if kind == "parameter" else ~ends.isnan()
        if not bool(ok.all()):
            return kind, next(n for i, (n, _) in enumerate(named) if not ok[2 * i:2 * i + 2].all())
    return None


def _all_norms_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor's 2-norm is finite, by one multi-tensor kernel: then none holds NaN or
    inf. False also when a finite tensor's norm overflows, or the kernel cannot take the list: the
    caller then looks element by element."""
    try:
        norms = torch._foreach_norm(tensors)
        return bool(torch.isfinite(torch.stack(norms)).all())  # one host synchronisation
    except (RuntimeError, TypeError):
        return False


def nonfinite_words(kind: str) -> str:
    """What a tensor of that kind was refused for: "NaN or inf" (parameters) or "NaN" (buffers)."""
    return "NaN or inf" if kind == "parameter" else "NaN"
