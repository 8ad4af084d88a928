"""Activation statistics streamed over a loader: per channel, optionally per class.

For a group, the statistic is read at the output of its first producing layer (a conv or
Linear), reduced over every dim but the channel dim. With labels, per-class means are kept too
(shape (num_classes, channels)). It keeps one row per image; the evolved criteria use
`importance.evolved.stats` instead, which streams per-class sums and reads after norm+activation.

>>> import torch, torch.nn as nn
>>> from prunekit.graph import build_graph
>>> m = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Flatten(), nn.Linear(8, 2))
>>> g = build_graph(m, torch.randn(1, 1, 2, 2)).group("0")
>>> s = activation_stats(m, g, [(torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 1, 0]))], num_classes=2)
>>> s["mean_abs"].shape, s["class_mean"].shape
(torch.Size([2]), torch.Size([2, 2]))
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.modes import evaluating
from ..graph import Group
from .calibration import forward, labelled


def producer_module(group: Group) -> tuple[str, int]:
    """(module name, channel position map) of the group's first conv/Linear producer."""
    for m in group.tensor_members():
        if m.role == "out" and m.name == "weight":
            return m.module, m.dim
    raise ConfigError(f"group {group.name!r} has no producing layer to read activations from")


def activation_stats(model: nn.Module, group: Group, batches: Iterable, num_classes: int | None = None) -> dict:
    """mean |a| and mean a per channel (and per class when num_classes is given)."""
    name, _ = producer_module(group)
    mod = model.get_submodule(name)
    member = next(m for m in group.tensor_members() if m.module == name and m.role == "out" and m.name == "weight")
    sums: dict[str, torch.Tensor] = {}
    labels: list[torch.Tensor] = []

    def hook(_m, _inp, out):
        ch_dim = 1 if isinstance(mod, nn.modules.conv._ConvNd) else out.dim() - 1
        per = out.detach().movedim(ch_dim, -1).reshape(out.shape[0], -1, out.shape[ch_dim])
        sums.setdefault("abs", []).append(per.abs().mean(1))
        sums.setdefault("mean", []).append(per.mean(1))

    handle = mod.register_forward_hook(hook)
    try:
        with torch.no_grad(), evaluating(model):
            labels_used = "classes" if num_classes is not None else "ignored"
            for i, x, y in labelled(batches, "activation statistics", labels_used):
                forward(model, x, i, "activation statistics")
                labels.append(y)
    finally:
        handle.remove()
    per_abs, per_mean = torch.cat(sums["abs"]), torch.cat(sums["mean"])  # (N, C_layer)
    sel = member.channel >= 0
    to_group = lambda v: torch.zeros(v.shape[0], group.size, dtype=v.dtype).index_add_(1, member.channel[sel],
                                                                                        v[:, sel])
    out = {"mean_abs": to_group(per_abs).mean(0), "mean": to_group(per_mean).mean(0)}
    if num_classes is not None:
        y = torch.cat(labels)
        g = to_group(per_mean)
        counts = torch.bincount(y, minlength=num_classes).clamp(min=1).unsqueeze(1)
        out["class_mean"] = torch.zeros(num_classes, group.size, dtype=g.dtype).index_add_(0, y, g) / counts
    return out
