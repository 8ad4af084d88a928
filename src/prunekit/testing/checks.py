"""Reusable oracle checks: removing channels must equal zeroing their contributions.

Zeroing a channel's *input slices in every consumer* (the "in" members: the next conv's input
channels, a Linear's H*W columns after flatten, ...) is what removal means mathematically; the
two models must then give the same outputs. Groups whose channels feed statistics over the
channel dim (LayerNorm over features) change those statistics when a channel goes, so for them
only shapes and finiteness are compared.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..graph import Graph, build_graph
from ..surgery.copying import share_copy
from ..surgery.shrink import remove_channels_
from ..surgery.verify import group_is_exact, run_model as _run, zero_channels_
from ..importance.select import must_keep


def check_removal_matches_zeroing(model: nn.Module, inputs: Any, graph: Graph,
                                  removal: dict[str, Sequence[int]], atol: float = 1e-5) -> float:
    """Remove `removal` channels from a copy, zero them in another copy; return max |diff|.

    Raises AssertionError when they differ (beyond atol) for exact groups.
    """
    zeroed, shrunk = share_copy(model), share_copy(model)
    exact = True
    zero_channels_(zeroed, [(graph.group(name), chans) for name, chans in removal.items()])
    for name in removal:
        exact &= group_is_exact(graph.group(name), model)
    remove_channels_(shrunk, graph, removal)
    ref, out = _run(zeroed, inputs), _run(shrunk, inputs)
    assert ref.shape == out.shape, f"output shape changed: {tuple(ref.shape)} -> {tuple(out.shape)}"
    assert torch.isfinite(out).all(), "pruned model produced non-finite outputs"
    diff = float((ref - out).abs().max())
    if exact:
        assert diff <= atol * max(1.0, float(ref.abs().max())), f"removal != zeroing: max diff {diff:.3g}"
    return diff


def randomise_norms_(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm random statistics and affine terms (fresh ones hold mean 0, variance 1,
    scale 1, shift 0), so that a wrongly sliced norm tensor changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                if mod.affine:
                    mod.weight.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                    mod.bias.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
    return model


def random_removal(graph: Graph, fraction: float, generator: torch.Generator) -> dict[str, list[int]]:
    """Pick up to `fraction` of the prunable channels of every group (at least one channel kept,
    and one of every tensor lying wholly in the group, as the pruners do)."""
    removal = {}
    for g in graph.prunable_groups():
        keep = must_keep(g, torch.rand(g.size, generator=generator))
        cand = (g.prunable & ~keep).nonzero().flatten()
        n = min(int(round(fraction * g.size)), cand.numel() - (0 if bool(keep.any()) else 1))
        if n > 0:
            pick = cand[torch.randperm(cand.numel(), generator=generator)[:n]]
            removal[g.name] = sorted(pick.tolist())
    return removal


def build_and_check(model: nn.Module, inputs: Any, fraction: float = 0.5, seed: int = 0) -> float:
    graph = build_graph(model, inputs)
    removal = random_removal(graph, fraction, torch.Generator().manual_seed(seed))
    return check_removal_matches_zeroing(model, inputs, graph, removal)
