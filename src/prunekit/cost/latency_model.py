"""Estimated latency of a graph's model after any channel removal, from per-layer tables.

Every Conv2d (groups=1 or depthwise), Linear, BatchNorm2d, one-dimensional LayerNorm and
batch_first nn.MultiheadAttention (its projections and attention products, by embedding width) is
timed standalone on a grid of widths on the target device (`cost.lut`, one table per distinct
layer shape, shared by identical layers). A removal's estimate is

    fixed_ms + (measured_ms - fixed_ms) * (sum of table lookups at the kept widths) / (sum at full widths)

where fixed_ms is the per-call overhead of every leaf module (one call of a trivial module
timed on the device, times the number of leaf modules, at most the measured time): it does not
shrink with channels. The rest of the measured time scales like the tabled layers: layers run
slower inside the model than standalone (caches, the activations, adds and pooling around
them; resnet56 at batch 1 on this CPU: tables sum to 5 ms of 14 ms), and those shrink with the
channels too. The estimate is calibrated to the whole model's measured latency; callers check a
result with a real measurement and correct (importance/latency_target.py).

Tables are made non-decreasing in each width (`_monotone`), so timing noise never makes removing
a channel look slower.

>>> import torch, torch.nn as nn
>>> from prunekit.graph import build_graph
>>> from prunekit.cost.latency import LatencyConfig
>>> m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1))
>>> x = torch.randn(1, 3, 16, 16)
>>> est = LatencyModel(m, build_graph(m, x), x, LatencyConfig(warmup=1, repeats=3, threads=1))
>>> est({}) == est.measured_ms and est({"0": list(range(8))}) <= est.measured_ms
True
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.modes import evaluating
from ..graph import Graph
from ..graph.inputs import batch_size_of
from .latency import LatencyConfig, measure_latency
from .lut import LatencyTable, LayerSpec, build_conv_lut, pruning_grid

TABLED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm, nn.MultiheadAttention)


def per_sample_inputs(example_inputs: Any, batch_size: int | None = None) -> Any:
    """Inputs to time at `batch_size`: the per-sample shape of a single floating example tensor
    (the timing builds a random batch), and a tuple of tensors with each one's samples repeated
    (or cut) to `batch_size` along dim 0, so that the whole model is timed at the batch its layer
    tables use. A single integer tensor (token ids) is taken as a tuple of one, so that its values
    stay valid ids; a list of tensors is taken as a tuple. Other inputs (and any input when
    `batch_size` is None) are returned unchanged."""
    if isinstance(example_inputs, torch.Tensor):
        if example_inputs.is_floating_point():
            return tuple(example_inputs.shape[1:])
        example_inputs = (example_inputs,)
    if batch_size and isinstance(example_inputs, list):  # positional arguments, as run_model takes them
        example_inputs = tuple(example_inputs)
    if batch_size and isinstance(example_inputs, tuple) and batch_size_of(example_inputs, 0):
        batch = batch_size_of(example_inputs)  # tensors with another first size (a shared mask) stay as they are
        return tuple(t[torch.arange(batch_size) % batch] if _batched(t, batch) else t for t in example_inputs)
    return example_inputs


def _batched(t: Any, batch: int) -> bool:
    """Whether `t` is a tensor holding `batch` samples along dim 0 (a shared mask does not)."""
    return isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch and batch > 0


def _input_grids(model: nn.Module, example_inputs: Any) -> dict[str, tuple[int, int]]:
    """(H, W) of each tabled module's input: spatial size for convs/BN, token count for
    Linear/LayerNorm (as (tokens, 1))."""
    grids, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, TABLED):
            def hook(module, args, name=name):
                if not args or not isinstance(args[0], torch.Tensor):
                    return  # called with keywords only: not tabled
                if isinstance(module, nn.MultiheadAttention) and not (len(args) >= 3 and args[0] is args[1] is args[2]):
                    return  # cross-attention: the table times self-attention only
                shape = args[0].shape
                if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
                    grids[name] = (int(shape[-2]), int(shape[-1]))
                else:
                    grids[name] = (int(np.prod(shape[1:-1])) if len(shape) > 2 else 1, 1)
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad(), evaluating(model):  # the caller's train/eval mode, module by module, after
            inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
            batch = batch_size_of(inputs, 0)
            model(*[t[:1] if _batched(t, batch) else t for t in inputs])  # one sample of each batched input
    finally:
        for h in hooks:
            h.remove()
    return grids


def _call_overhead_ms(cfg: LatencyConfig) -> float:
    """Time of one call of a trivial module (ReLU on one element) on the device: the per-module
    cost that channel removal cannot reduce."""
    return measure_latency(nn.ReLU(), (1,), dataclasses.replace(cfg, batch_size=1)).median_ms


def _monotone(table: LatencyTable) -> np.ndarray:
    """Non-decreasing in each width: every value is lowered to the least value at any larger
    width. Timing noise on a loaded machine is upward (a descheduled repeat), so lowering the
    outlier keeps the table's slope; raising later values to it would flatten the table."""
    v = np.asarray(table.values_ms, dtype=np.float64)
    low = lambda a, axis: np.flip(np.minimum.accumulate(np.flip(a, axis), axis=axis), axis)
    return low(low(v, 0), 1)


class LatencyModel:
    """Callable: removal {group: channels} -> estimated latency in ms (see the module doc)."""

    def __init__(self, model: nn.Module, graph: Graph, example_inputs: Any, cfg: LatencyConfig,
                 grid_steps: int = 4):
        grids = _input_grids(model, example_inputs)
        self.cfg, self.layers, self.tables = cfg, [], {}
        for name, mod in model.named_modules():
            if name not in grids:
                continue
            try:
                spec = LayerSpec.from_module(mod, grids[name])
            except ConfigError:  # grouped convs, string padding: left in `rest`
                continue
            key = json.dumps(spec.to_dict(), sort_keys=True)
            if key not in self.tables:
                counts, outs = pruning_grid(spec.in_channels, grid_steps), pruning_grid(spec.out_channels, grid_steps)
                grid = counts if spec.one_axis else (counts, outs)
                table = build_conv_lut(spec, grid, cfg)
                table.values_ms = _monotone(table).tolist()
                self.tables[key] = table
            self.layers.append((name, spec, key))
        self._grids = {k: (np.asarray(t.in_counts, dtype=np.float64), np.asarray(t.out_counts, dtype=np.float64),
                           np.asarray(t.values_ms, dtype=np.float64)) for k, t in self.tables.items()}
        self._dims = self._member_dims(graph)
        self.tabled_groups = set(self._dims)  # groups whose removal changes a tabled layer's width
        self.measured_ms = measure_latency(model, per_sample_inputs(example_inputs, cfg.batch_size), cfg).median_ms
        self.full_table_ms = self._table_sum({})
        leaves = sum(1 for m in model.modules() if not list(m.children()))
        self.fixed_ms = min(self.measured_ms, leaves * _call_overhead_ms(cfg))

    def _member_dims(self, graph: Graph) -> dict[str, tuple[int, list[tuple[int, str, np.ndarray]]]]:
        """group -> (size, [(layer index, 'in'|'out', channel of each position)]) for tabled weights."""
        axis = {}
        for i, (name, spec, _) in enumerate(self.layers):
            if spec.kind == "attention":  # in_proj_weight (3C, C): its inputs are the embedding channels
                axis[(f"{name}.in_proj_weight", 1)] = (i, "in")
                continue
            axis[(f"{name}.weight", 0)] = (i, "out")
            if not spec.one_axis:
                axis[(f"{name}.weight", 1)] = (i, "in")  # conv (out, in, kh, kw), linear (out, in)
        out = {}
        for g in graph.groups:
            hits = [(axis[(m.qualname, m.dim)], m.channel.numpy()) for m in g.tensor_members()
                    if (m.qualname, m.dim) in axis]
            if hits:
                out[g.name] = (g.size, [(layer, side, ch[ch >= 0]) for (layer, side), ch in hits])
        return out

    def widths(self, removal: Mapping[str, list[int]]) -> list[tuple[int, int]]:
        """(in, out) kept widths of every tabled layer after `removal` (one-axis: out twice)."""
        dead = [[0, 0] for _ in self.layers]
        for gname, idx in removal.items():
            if len(idx) == 0 or gname not in self._dims:
                continue
            size, hits = self._dims[gname]
            gone = np.zeros(size, dtype=bool)
            gone[np.asarray(idx, dtype=np.int64)] = True
            for layer, side, channel in hits:
                dead[layer][0 if side == "in" else 1] += int(gone[channel].sum())
        out = []
        for (name, spec, _), (d_in, d_out) in zip(self.layers, dead):
            if spec.kind == "attention":
                out.append((spec.in_channels - d_in, spec.in_channels - d_in))
            elif spec.one_axis:  # depthwise (C*mult, 1, kh, kw): C follows the outputs
                c = spec.in_channels - d_out // (spec.out_channels // spec.in_channels)
                out.append((c, c))
            else:
                out.append((spec.in_channels - d_in, spec.out_channels - d_out))
        return out

    def _table_sum(self, removal: Mapping[str, list[int]]) -> float:
        # numpy bilinear interpolation, clamped at the grid's edges (= LatencyTable.lookup, which
        # builds torch tensors per call: too slow for a greedy search of thousands of estimates)
        total = 0.0
        for (name, spec, key), (c_in, c_out) in zip(self.layers, self.widths(removal)):
            ins, outs, values = self._grids[key]
            if spec.one_axis:
                total += float(np.interp(c_out, ins, values[:, 0]))
            else:
                row = np.array([np.interp(c_out, outs, values[i]) for i in range(len(ins))])
                total += float(np.interp(c_in, ins, row))
        return total

    def __call__(self, removal: Mapping[str, list[int]]) -> float:
        if not removal or self.full_table_ms <= 0:
            return self.measured_ms
        scale = self._table_sum(removal) / self.full_table_ms
        return self.fixed_ms + (self.measured_ms - self.fixed_ms) * scale

    def describe(self) -> dict[str, Any]:
        return {"layers": len(self.layers), "tables": len(self.tables), "measured_ms": self.measured_ms,
                "tabled_ms": self.full_table_ms, "fixed_ms": self.fixed_ms,
                "device": self.cfg.device, "dtype": self.cfg.dtype, "batch": self.cfg.batch_size,
                "channels_last": self.cfg.channels_last, "threads": self.cfg.threads}
