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


# oneDNN's 1x1 backward-weights kernels on x86 CPUs (used by PyTorch's CPU build, 2.13 included) write
# past their workspace when the source is channels-last, the stride is above 1 with no padding and the
# input channels are fewer than the kernel's channel block (8 with AVX2, 16 with AVX-512): the heap is
# corrupted (a crash, sometimes later) or the weight gradient is wrong. Reported upstream as
# uxlfoundation/oneDNN#6035 (open). Padded, grouped and contiguous (NCHW) convolutions take other kernels.
ONEDNN_CHANNEL_BLOCK = 16


def channels_last_unsafe_convs(model: nn.Module) -> list[str]:
    """Names of the Conv2d layers whose training step in channels-last layout on a CPU hits the oneDNN
    defect above: 1x1 kernel, a stride above 1, no padding, one group, fewer than 16 input channels.

    >>> channels_last_unsafe_convs(nn.Sequential(nn.Conv2d(4, 8, 1, stride=2), nn.Conv2d(8, 8, 1, stride=2, padding=1),
    ...                                          nn.Conv2d(16, 8, 1, stride=2), nn.Conv2d(8, 8, 3, stride=2)))
    ['0']
    """
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and max(m.stride) > 1
            and m.groups == 1 and m.in_channels < ONEDNN_CHANNEL_BLOCK
            and (m.padding == "valid" or (not isinstance(m.padding, str) and not any(m.padding)))]


def is_channels_last(model: nn.Module) -> bool:
    """Whether any 4-D parameter of `model` is laid out channels-last (and not also contiguous)."""
    return any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in model.parameters())
