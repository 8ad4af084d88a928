"""Memory format of a pruned model: contiguous (NCHW) or channels-last (NHWC), measured.

Channels-last changes which convolution kernels run. Whether it helps depends on the device,
the widths and the batch: on this project's CPU it made torchvision resnet50 faster and CIFAR
resnet56 at batch 1 slower (docs/latency.md). So `apply_memory_format_(model, x, "auto", cfg)`
times both formats interleaved on the stated device/batch/dtype and keeps the faster; "contiguous"
and "channels_last" apply the format without timing. 4-D parameters and buffers are converted in
place (module.to(memory_format=...)); PyTorch convolutions then run channels-last even on a
contiguous input, so callers need not convert inputs (the CLI bench/eval may, for the same result).

>>> import torch, torch.nn as nn
>>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
>>> apply_memory_format_(m, torch.randn(1, 3, 8, 8), "channels_last")["choice"]
'channels_last'
>>> m[0].weight.is_contiguous(memory_format=torch.channels_last)
True
"""
from __future__ import annotations

import dataclasses
import itertools
import statistics
from typing import Any

import torch
from torch import nn

from ..core.config import check_choice
from ..core.layout import is_channels_last, to_memory_format_
from .latency import LatencyConfig, compare_latency

MEMORY_FORMATS = ("contiguous", "channels_last", "auto")


def has_4d(model: nn.Module) -> bool:
    return any(t.dim() == 4 for t in itertools.chain(model.parameters(), model.buffers()))  # stops at the first


def choose_memory_format(model: nn.Module, inputs: Any, cfg: LatencyConfig) -> dict[str, Any]:
    """{"choice", "contiguous_ms", "channels_last_ms", settings}: both formats timed interleaved."""
    arms = {"contiguous": dataclasses.replace(cfg, channels_last=False),
            "channels_last": dataclasses.replace(cfg, channels_last=True)}
    # compare_latency takes one config for all models; channels-last is applied to the copy it times
    # and to the inputs, so the arms are timed in two interleaved runs with the same model
    times = {}
    for _ in range(2):
        for name, c in arms.items():
            times.setdefault(name, []).append(compare_latency({name: model}, inputs, c).results[name].median_ms)
    ms = {k: statistics.median(v) for k, v in times.items()}  # of the two rounds: their mean
    choice = "channels_last" if ms["channels_last"] < ms["contiguous"] else "contiguous"
    return {"choice": choice, "contiguous_ms": ms["contiguous"], "channels_last_ms": ms["channels_last"],
            "device": cfg.device, "dtype": cfg.dtype, "batch": cfg.batch_size, "threads": cfg.threads}


def memory_format_record(model: nn.Module, inputs: Any, how: str, cfg: LatencyConfig | None = None) -> dict[str, Any]:
    """The format `how` names for `model` and why ("auto": both timed, the faster kept), without
    converting anything: a timing that fails leaves the model as it was."""
    check_choice("memory_format", how, MEMORY_FORMATS)
    if not has_4d(model):
        return {"choice": "contiguous", "reason": "no 4-D tensor"}
    if how != "auto":
        return {"choice": how}
    from .latency_model import per_sample_inputs
    cfg = cfg or LatencyConfig(threads=1)
    return choose_memory_format(model, per_sample_inputs(inputs, cfg.batch_size), cfg)


def apply_memory_format_(model: nn.Module, inputs: Any, how: str, cfg: LatencyConfig | None = None,
                         record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Put `model` in the format `how` names ("auto": the faster one, measured), or in the one
    `record` (from `memory_format_record`) chose; returns the record."""
    record = record if record is not None else memory_format_record(model, inputs, how, cfg)
    if not has_4d(model):
        return record
    fmt = torch.channels_last if record["choice"] == "channels_last" else torch.contiguous_format
    if not _in_format(model, fmt):
        to_memory_format_(model, fmt)  # "contiguous" also converts a model that arrived channels-last
    return record


def bench_config(fields: dict[str, Any]) -> LatencyConfig:
    """A recipe's `bench` section: LatencyConfig fields, where channels_last left unstated times
    each run's models in the layout the pruned model runs in (see `timed_as_it_runs`)."""
    if not isinstance(fields, dict):
        return LatencyConfig.from_dict(fields)  # its own message
    return LatencyConfig.from_dict({"channels_last": None, **fields})


def timed_as_it_runs(model: nn.Module, cfg: LatencyConfig) -> LatencyConfig:
    """`cfg` with channels_last=None (unstated) made `model`'s own layout, so that a model is timed
    in the layout it runs in (memory_format may have chosen channels-last) and every model timed
    with the result is timed in that one layout; a stated true or false is kept."""
    return cfg.replace(channels_last=is_channels_last(model)) if cfg.channels_last is None else cfg


def _in_format(model: nn.Module, fmt: torch.memory_format) -> bool:
    """Whether `to_memory_format_(model, fmt)` would leave every tensor as it is (it converts the
    4-D ones, and the 5-D ones to contiguous only: they have no channels-last layout)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.dim() == 4 and not t.is_contiguous(memory_format=fmt):
            return False
        if t.dim() == 5 and fmt == torch.contiguous_format and not t.is_contiguous():
            return False
    return True
