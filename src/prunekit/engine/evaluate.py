"""Loss and top-1 accuracy of a classifier over a loader, in eval mode and without gradients.

The loss is plain cross-entropy (no label smoothing), averaged over samples, so values compare
across training configs. Under an initialised process group every rank must call `evaluate`:
each scores its shard of every batch and the sums are added over ranks.

>>> model = nn.Linear(4, 3)
>>> batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
>>> sorted(evaluate(model, batches))
['acc', 'loss', 'n']
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.modes import evaluating
from ..core.modules import unwrap_model
from .batches import check_labels, split_batch
from .distributed import DistContext, all_reduce_sums, env_ranks, shard_batch


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a stateless model."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """Move a batch tensor to `device` unless it is already there; NHWC layout when asked."""
    if x.device != device:
        x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def autocast_context(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked; a no-op otherwise (CPU runs stay in float32)."""
    if bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], device: str | torch.device | None = None, *,
             bf16: bool = False, channels_last: bool = False,
             distributed: bool | None = None) -> dict[str, float]:
    """Return {"loss": mean CE, "acc": top-1 accuracy in [0, 1], "n": number of samples}.

    `loader` yields (x, y) batches, on `device` or not. `device` defaults to the model's.
    `distributed=None` shards batches and sums results over ranks whenever a process group is
    initialised; pass False to score the whole loader on this process alone. The model's
    train/eval mode is restored afterwards.

    >>> evaluate(nn.Linear(2, 2), [(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))])["n"]
    4
    """
    model = unwrap_model(model)
    device = torch.device(device) if device is not None else model_device(model)
    ctx = _dist_context(distributed)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n, checked, refused = 0, False, None
    with evaluating(model):  # afterwards each module's mode as it was (a frozen BatchNorm stays frozen)
        for i, batch in enumerate(loader):
            x, global_y = split_batch(batch, i, "evaluation")
            x = shard_batch(to_device(x, device, channels_last), ctx)
            y = shard_batch(to_device(global_y, device), ctx)
            if y.numel() == 0:
                continue
            with autocast_context(device, bf16):
                logits = model(x)
            # on the first batch with samples, then on every batch whose labels are on the host (no device sync)
            if not checked or global_y.device.type == "cpu":
                what, checked = f"evaluation batch {i}" if checked else "evaluation", True
                try:
                    check_labels(logits, global_y, what)
                except ConfigError as err:
                    if not ctx.enabled:
                        raise
                    # under DDP a rank stops only with the others: the refusal is summed with the results
                    # below, so a rank whose share held no sample (and could not check) raises too
                    refused = refused or str(err)
                    continue
            # Accumulate on the device: one host sync at the end instead of one per batch.
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(dim=1) == y).sum()
            n += y.numel()
    loss_total, correct_total, n_total, refusals = all_reduce_sums([loss_sum, correct, n, refused is not None], ctx,
                                                                   device)
    if refusals:
        raise ConfigError(refused or "evaluation labels outside the model's classes on another rank; give labels in "
                                     "0..classes-1 (or build the model with more classes)")
    if n_total == 0:
        raise ConfigError("evaluate: the loader yielded no samples; pass a loader with at least one batch")
    return {"loss": loss_total / n_total, "acc": correct_total / n_total, "n": int(n_total)}


def _dist_context(distributed: bool | None) -> DistContext:
    active = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = active
    if not distributed:
        return DistContext()
    if not active:
        raise ConfigError("evaluate(distributed=True) needs an initialised process group; "
                          "call it inside train/torchrun or pass distributed=False")
    _, _, local = env_ranks()
    return DistContext(dist.get_rank(), dist.get_world_size(), local)
