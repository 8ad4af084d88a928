"""Calibration batches as every data-dependent criterion reads them: checked once, here.

Criteria that score with data (Taylor, SNIP, GraSP, activation statistics, class statistics and
evolved functions) read `batches`, an iterable of (inputs, labels). `labelled` yields them with
their index after checking their form, and `forward` / `loss_of` run the model and the loss with
any failure turned into one ConfigError naming the criterion and the batch. A run that meets no
sample at all is a ConfigError too: every score would be zero and the channels removed would be
decided by ties.

>>> import torch
>>> batches = [(torch.randn(4, 3), torch.tensor([0, 1, 2, 1]))]
>>> [(i, tuple(x.shape)) for i, x, y in labelled(batches, "taylor")]
[(0, (4, 3))]
>>> list(labelled([(torch.randn(0, 3), torch.zeros(0, dtype=torch.long))], "taylor"))
Traceback (most recent call last):
...
prunekit.core.errors.ConfigError: criterion 'taylor' got no calibration samples (1 batch, all empty); give batches with at least one sample (in a recipe, calibration_batches of 1 or more)
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from ..core.errors import ConfigError
from ..engine.batches import class_labels, labels_outside, out_of_memory

NEEDS_DATA = "pass batches=[(inputs, labels), ...]; in a recipe, set calibration_batches to 1 or more"


def labelled(batches: Iterable | None, who: str, labels: str = "targets") -> Iterator[tuple[int, Tensor, Any]]:
    """(index, inputs, labels) of every batch; ConfigError at the first batch of the wrong form, and
    after the last when no batch held a sample.

    labels: "targets" (the loss's targets: any tensor with one entry per sample along its first
    dimension, e.g. class indices, soft labels, regression targets), "classes" (one integer class
    label per sample: class statistics index classes with them) or "ignored" (only the inputs are
    read: the second item may be anything)."""
    check_iterable(batches, who)
    samples, count = 0, 0
    for i, batch in enumerate(batches):
        count += 1
        if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not isinstance(batch[0], Tensor):
            raise ConfigError(f"criterion {who!r}: calibration batch {i} is a {_describe(batch)}, not a pair "
                              "(inputs tensor, labels); these criteria need labelled data")
        x, y = batch
        n = x.shape[0] if x.dim() else 0
        if labels != "ignored":
            y = torch.as_tensor(y) if not isinstance(y, Tensor) else y
            whole = labels == "classes" and not class_labels(y)
            if y.dim() == 0 or len(y) != n or (n and whole):
                need = "one integer class label per sample" if labels == "classes" else "one target per sample"
                raise ConfigError(f"criterion {who!r}: calibration batch {i} has inputs {tuple(x.shape)} and labels "
                                  f"{tuple(y.shape)} of {y.dtype}; give {need}")
        if n:
            samples += n
            yield i, x, y
    if samples == 0:
        what = f"{count} batch{'es' if count != 1 else ''}, all empty" if count else "no batches"
        raise ConfigError(f"criterion {who!r} got no calibration samples ({what}); give batches with at least "
                          "one sample (in a recipe, calibration_batches of 1 or more)")


def check_iterable(batches: Any, who: str) -> None:
    """ConfigError unless `batches` is an iterable of batches (None: the criterion needs data)."""
    if batches is None:
        raise ConfigError(f"criterion {who!r} needs data: {NEEDS_DATA}")
    if isinstance(batches, (Tensor, str, bytes, dict)) or not hasattr(batches, "__iter__"):
        raise ConfigError(f"criterion {who!r}: batches is a {type(batches).__name__}, not an iterable of "
                          f"(inputs, labels) pairs; {NEEDS_DATA}")


def forward(model: nn.Module, x: Tensor, index: int, who: str) -> Any:
    """model(x), with a failure turned into one ConfigError naming the criterion and the batch."""
    try:
        return model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        if out_of_memory(err):
            raise
        raise ConfigError(f"criterion {who!r}: the model cannot run calibration batch {index} (inputs "
                          f"{tuple(x.shape)}, {x.dtype}): {_first_line(err)}; give batches the model takes (if "
                          "they are, the error is in the model's forward: see the error above)") from err


def loss_of(loss_fn: Callable, out: Any, y: Tensor, index: int, who: str) -> Tensor:
    """loss_fn(out, y); labels outside the model's classes are one ConfigError (not an IndexError)."""
    check_labels(out, y, index, who)
    try:
        return loss_fn(out, y)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise ConfigError(f"criterion {who!r}: the loss of calibration batch {index} cannot be computed: "
                          f"{_first_line(err)}") from None


def check_labels(out: Any, y: Tensor, index: int, who: str) -> None:
    """ConfigError when class-index labels fall outside the classes of the model's output."""
    bad = labels_outside(out, y)
    if bad is not None:
        lo, hi, classes = bad
        raise ConfigError(f"criterion {who!r}: calibration batch {index} has labels {lo}..{hi} "
                          f"but the model gives {classes} classes; give labels in 0..{classes - 1}")


def _describe(batch: Any) -> str:
    if isinstance(batch, (tuple, list)):
        return f"{type(batch).__name__} of {len(batch)} ({', '.join(type(b).__name__ for b in batch[:3])})"
    return type(batch).__name__


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"
