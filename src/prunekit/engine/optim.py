"""The optimizer a `train` call builds: SGD or AdamW, with the parameter groups hooks ask for."""
from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from ..core.errors import ConfigError
from .hooks import ParameterSplit, split_parameters

if TYPE_CHECKING:
    from .train import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, hooks: Sequence[Any] = ()) -> torch.optim.Optimizer:
    """SGD or AdamW over the model's trainable parameters, as `cfg` says.

    Group 0 holds the parameters no hook claims, with `cfg`'s settings; each hook's
    `param_groups` follow with their own settings (missing ones default to `cfg`'s; a group's lr
    follows the same schedule); `owned_parameters` are left out entirely.
    """
    return optimizer_from_split(split_parameters(model, hooks), cfg)


def optimizer_from_split(split: ParameterSplit, cfg: TrainConfig) -> torch.optim.Optimizer:
    if not split.default and not any(g["params"] for g in split.groups) and not split.owned:
        raise ConfigError("the model has no trainable parameters; unfreeze some before training")
    main = [{"params": split.default}]
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(main, lr=cfg.lr, momentum=cfg.momentum,
                                                     nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(main, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for group in split.groups:
        unknown = sorted(set(group) - {"params"} - set(opt.defaults))
        if unknown:
            raise ConfigError(f"a hook's parameter group sets {unknown}, which {type(opt).__name__} does not "
                              f"know; use some of {sorted(opt.defaults)}")
        for key, value in group.items():
            if key != "params":
                _check_setting(key, value, opt.defaults[key], type(opt).__name__)
        opt.add_param_group(group)
    return opt


def _check_setting(key: str, value: Any, default: Any, optimizer: str) -> None:
    """A hook group's setting has the kind of value the optimizer's default has: a finite number
    >= 0 (lr, weight_decay, momentum, ...), a flag, or betas in [0, 1)."""
    def real(v: Any) -> float | None:
        """`v` as a float when it is one real number (Python, NumPy or a one-element tensor)."""
        if isinstance(v, (bool, np.bool_)):
            return None
        if isinstance(v, torch.Tensor):
            return float(v) if v.numel() == 1 and not v.dtype.is_complex and v.dtype != torch.bool else None
        if isinstance(v, np.ndarray):
            return float(v) if v.size == 1 and np.isrealobj(v) and v.dtype != np.bool_ else None
        return float(v) if isinstance(v, numbers.Real) else None

    def number(v: Any) -> bool:
        f = real(v)
        return f is not None and math.isfinite(f) and f >= 0

    if isinstance(default, bool) or default is None:
        ok, want = value is None or isinstance(value, (bool, np.bool_)), "true, false or null"
    elif isinstance(default, (int, float)):
        ok, want = number(value), "a finite number >= 0"
    elif key == "betas":
        try:  # a 0-d array or tensor cannot be listed: not a pair
            pair = list(value) if isinstance(value, (tuple, list, np.ndarray, torch.Tensor)) else []
        except TypeError:
            pair = []
        ok = len(pair) == 2 and all(number(b) and real(b) < 1 for b in pair)
        want = "two numbers in [0, 1), e.g. (0.9, 0.999)"
    else:
        return
    if not ok:
        raise ConfigError(f"a hook's parameter group sets {key}={value!r}; {optimizer} needs {want} there")
