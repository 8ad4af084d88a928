"""The learning-rate schedule of the training loop: one multiplier of the base lr per optimizer step.

`cfg` is a `TrainConfig` (engine/train.py): its `schedule`, `epochs` and `warmup_epochs` decide
the curve; the scheduler's state holds only plain numbers, so checkpoints stay pickle-free.
"""
from __future__ import annotations

import math
from typing import Any

import torch

# OneCycle as in Smith & Topin (2018): start at lr/25, peak at lr, end at lr/(25 * 1e4).
_ONECYCLE_DIV, _ONECYCLE_FINAL_DIV, _ONECYCLE_DEFAULT_PCT = 25.0, 1e4, 0.3


def lr_factor(cfg: Any, step: int, steps_per_epoch: int) -> float:
    """Multiplier of `cfg.lr` for optimizer step `step` (0-based) under `cfg.schedule`.

    >>> from prunekit.engine.train import TrainConfig
    >>> cfg = TrainConfig(epochs=2, schedule="cosine")
    >>> [round(lr_factor(cfg, s, 2), 3) for s in range(4)]
    [1.0, 0.854, 0.5, 0.146]
    """
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        pct = cfg.warmup_epochs / cfg.epochs if cfg.warmup_epochs > 0 else _ONECYCLE_DEFAULT_PCT
        rise = min(max(round(pct * total), 1), total - 1) if total > 1 else 0
        low, end = 1.0 / _ONECYCLE_DIV, 1.0 / (_ONECYCLE_DIV * _ONECYCLE_FINAL_DIV)
        if step < rise:
            return _cos_interp(low, 1.0, step / rise)
        return _cos_interp(1.0, end, min((step - rise) / max(total - rise, 1), 1.0))
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        warm = min(warm, total - 1)
    if step < warm:
        return (step + 1) / warm  # linear ramp reaching the full lr on the last warm-up step
    if cfg.schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min((step - warm) / (total - warm), 1.0)))


def _cos_interp(start: float, stop: float, t: float) -> float:
    return stop + (start - stop) * (1.0 + math.cos(math.pi * t)) / 2.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR following `lr_factor`; its state_dict holds only plain numbers."""
    def factor(step: int) -> float:
        return lr_factor(cfg, step, steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
