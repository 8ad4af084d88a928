"""The running statistics (BatchNorm's and tracking InstanceNorm's buffers) a training step moves,
and a cheap per-step copy of them so that a diverged step can be undone."""
from __future__ import annotations

import torch
from torch import nn


def running_statistics(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, buffer) of every running statistic a training forward updates (BatchNorm, and
    InstanceNorm with track_running_stats): what one step changes besides the parameters."""
    out = []
    for prefix, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            out += [(f"{prefix}.{n}" if prefix else n, b) for n, b in m.named_buffers(recurse=False) if b is not None]
    return out


class StepStatistics:
    """The running statistics one step may move, copied before its forward so that a diverged
    step can put them back. The list of buffers is read once an epoch and the copies are made in
    place into tensors kept for the run: a step costs one fused copy, not a walk of the model."""

    def __init__(self) -> None:
        self.live: list[torch.Tensor] = []
        self.saved: list[torch.Tensor] = []

    def refresh(self, model: nn.Module) -> None:
        self.live = [t for _, t in running_statistics(model)]
        self.saved = [t.detach().clone() for t in self.live]

    def snapshot(self) -> None:
        if self.live:
            torch._foreach_copy_(self.saved, self.live)

    def restore(self) -> None:
        if self.live:
            with torch.no_grad():
                torch._foreach_copy_(self.live, self.saved)
