"""Memory layouts of a model's tensors: one place that knows channels-last applies to 4-D tensors.

torch's `model.to(memory_format=torch.channels_last)` converts 4-D and 5-D tensors alike and
refuses a 5-D one (a Conv3d weight); here channels-last converts the 4-D tensors only.

>>> import torch, torch.nn as nn
>>> m = nn.Sequential(nn.Conv3d(1, 2, 3), nn.Conv2d(2, 2, 3))
>>> is_channels_last(to_channels_last_(m)), m[0].weight.is_contiguous()
(True, True)
>>> is_channels_last(to_memory_format_(m, torch.contiguous_format))
False
"""
from __future__ import annotations

import itertools

import torch
from torch import nn


def to_channels_last_(model: nn.Module) -> nn.Module:
    """NHWC layout for the model's 4-D parameters and buffers; other ranks (5-D included, which
    have no channels-last layout) stay as they are. Same parameter objects; returns model."""
    return model._apply(lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)


def to_memory_format_(model: nn.Module, fmt: torch.memory_format) -> nn.Module:
    """`model.to(memory_format=fmt)`, except that a model holding 5-D tensors is made channels-last
    by `to_channels_last_` (torch would refuse it)."""
    if fmt == torch.channels_last and any(t.dim() == 5 for t in itertools.chain(model.parameters(), model.buffers())):
        return to_channels_last_(model)
    return model.to(memory_format=fmt)


def is_channels_last(model: nn.Module) -> bool:
    """Whether any 4-D parameter of `model` is laid out channels-last (and not also contiguous)."""
    return any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in model.parameters())
