"""The optimizer a `train` call builds: SGD or AdamW, with the parameter groups hooks ask for."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

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
        opt.add_param_group(group)
    return opt
