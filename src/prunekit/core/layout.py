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

import contextlib
import itertools
from typing import Iterator

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
# uxlfoundation/oneDNN#6035 (open). Padded, grouped and contiguous (NCHW) convolutions take other kernels;
# the kernel is chosen when the input or the weight looks channels-last, and a 1x1 weight strided
# (C, 1, C, C) does, so both are given row-major strides.
ONEDNN_CHANNEL_BLOCK = 16


def channels_last_unsafe(module: nn.Module) -> bool:
    """Whether `module` is a Conv2d whose gradient in channels-last layout on a CPU hits the oneDNN
    defect above: 1x1 kernel, a stride above 1, no padding, one group, fewer than 16 input channels.

    >>> [channels_last_unsafe(m) for m in (nn.Conv2d(4, 8, 1, stride=2), nn.Conv2d(8, 8, 1, stride=2, padding=1),
    ...                                     nn.Conv2d(16, 8, 1, stride=2), nn.Conv2d(8, 8, 3, stride=2))]
    [True, False, False, False]
    """
    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and max(module.stride) > 1
            and module.groups == 1 and module.in_channels < ONEDNN_CHANNEL_BLOCK
            and (module.padding == "valid" or (not isinstance(module.padding, str) and not any(module.padding))))


def _row_major(t: torch.Tensor) -> bool:
    """Whether `t` has exactly the strides of a fresh contiguous tensor (size-1 dims included: oneDNN
    reads a 1x1 weight strided (C, 1, C, C), which `.contiguous()` leaves as it is, as channels-last)."""
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= size
    return tuple(reversed(expected)) == t.stride()


def _contiguous_cpu_input(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args else None
    if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.device.type == "cpu" and channels_last_unsafe(module)):
        return None
    if not all(_row_major(t) for t in itertools.chain(module.parameters(), module.buffers()) if t.dim() == 4):
        # the weight (a masked one's original and mask too) in plain row-major strides: the same values,
        # and, being 1x1, contiguous in both layouts as before; the parameter objects stay
        module._apply(lambda t: t.clone(memory_format=torch.contiguous_format) if t.dim() == 4 else t)
    return None if _row_major(x) else (x.contiguous(), *args[1:])


@contextlib.contextmanager
def onednn_safe() -> Iterator[None]:
    """Within: every layer that `channels_last_unsafe` names gets its CPU input, and its 1x1 weight,
    in plain row-major strides (a global forward pre-hook, read at each call, so layers that surgery
    narrows while training count too): a channels-last model trains and takes gradients without
    oneDNN's defective kernel, and every other layer keeps its layout. Nothing is attached to any
    model (a copy made inside carries no hook); the hook is removed on exit, also after an error.

    >>> m = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2)).to(memory_format=torch.channels_last)
    >>> seen = []
    >>> _ = m[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
    >>> x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    >>> with onednn_safe():
    ...     _ = m(x)
    >>> _ = m(x)
    >>> seen
    [True, False]
    """
    handle = nn.modules.module.register_module_forward_pre_hook(_contiguous_cpu_input)
    try:
        yield
    finally:
        handle.remove()


def is_channels_last(model: nn.Module) -> bool:
    """Whether any 4-D parameter of `model` is laid out channels-last (and not also contiguous)."""
    return any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in model.parameters())
