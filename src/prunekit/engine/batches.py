"""The form of a training or evaluation batch, checked before the model sees it.

The engine trains and evaluates on (inputs, labels) pairs: a tensor of N samples and N integer
class labels. `split_batch` returns the pair or raises one ConfigError saying what the batch is
instead; `check_labels` compares the labels with the number of classes the model gives.

>>> import torch
>>> x, y = split_batch((torch.zeros(2, 3), torch.tensor([0, 1])), 0, "training")
>>> split_batch(torch.zeros(2, 3), 0, "training")
Traceback (most recent call last):
...
prunekit.core.errors.ConfigError: training batch 0 is a Tensor; the engine takes (inputs, labels) pairs of tensors, as a DataLoader over a labelled dataset yields
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.errors import ConfigError


def class_labels(y: Tensor) -> bool:
    """Whether `y` holds one integer class index per sample (1-D, not float, complex or bool)."""
    return y.dim() == 1 and not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)


def split_batch(batch: Any, index: int, what: str) -> tuple[Tensor, Tensor]:
    """(inputs, labels) of `batch`; ConfigError unless it is a pair of tensors with one integer
    label per sample."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        kind = f"{type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
        raise ConfigError(f"{what} batch {index} is a {kind}; the engine takes (inputs, labels) pairs of tensors, "
                          "as a DataLoader over a labelled dataset yields")
    x, y = batch
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ConfigError(f"{what} batch {index} holds ({type(x).__name__}, {type(y).__name__}); give tensors "
                          "(torch.as_tensor converts arrays)")
    if not class_labels(y) or x.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ConfigError(f"{what} batch {index} has inputs {tuple(x.shape)} and labels {tuple(y.shape)} of "
                          f"{y.dtype}; give one integer class label per sample")
    return x, y if y.dtype in (torch.int64, torch.uint8) else y.long()  # cross-entropy takes Long or Byte


def labels_outside(out: Any, y: Tensor) -> tuple[int, int, int] | None:
    """(lowest, highest, classes) when class-index labels (1-D integers) fall outside the classes
    of an (N, classes) output, else None; other targets (soft labels, regression) are the loss's
    to judge."""
    if not (class_labels(y) and y.numel() and isinstance(out, Tensor) and out.dim() == 2):
        return None
    lo, hi, classes = int(y.min()), int(y.max()), out.shape[1]
    return (lo, hi, classes) if lo < 0 or hi >= classes else None


def check_labels(logits: Tensor, y: Tensor, what: str) -> None:
    """ConfigError when labels fall outside the model's classes (cross-entropy would index out of
    range, or silently skip -100)."""
    bad = labels_outside(logits, y)
    if bad is not None:
        lo, hi, classes = bad
        raise ConfigError(f"{what} labels run from {lo} to {hi} but the model gives {classes} classes; give "
                          f"labels in 0..{classes - 1} (or build the model with num_classes={hi + 1})")


def out_of_memory(err: BaseException) -> bool:
    """An allocation failure (CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError): never
    blamed on the batch, so it passes through the checks that reword a failed forward."""
    text = str(err).lower()
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text
