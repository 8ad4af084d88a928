"""Named hooks through which methods plug into the training loop.

The loop in `prunekit.engine.train` stays plain; a method (gates, Lagrangian penalties, masked
retraining) subclasses `Hook` and overrides only what it needs:

    extra_loss(model, step)          -> a scalar tensor added to the task loss, or None
    after_backward(model, step)      edit gradients after backward, before the optimizer step
    on_step_end(model, step)         act after the optimizer step (re-apply masks, clamp gates)
    on_epoch_end(model, epoch, metrics)  act once per epoch (multiplier updates, schedules);
                                     may add entries to `metrics` (a dict that is logged)

>>> class CountSteps(Hook):
...     def __init__(self): self.n = 0
...     def on_step_end(self, model, step): self.n += 1
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Hook:
    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        return None

    def after_backward(self, model: nn.Module, step: int) -> None:
        pass

    def on_step_end(self, model: nn.Module, step: int) -> None:
        pass

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, Any]) -> None:
        pass
