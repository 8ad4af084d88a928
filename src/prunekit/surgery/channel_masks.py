"""Channel masks on a traced graph, and the one call that turns them into physical removal.

Searching methods simulate channel pruning before committing to it. A channel mask hides a
group's channels from every *consumer* (the "in" members of the group: the next conv's input
channels, a Linear's H*W columns after flatten, ...) through `surgery.masks.Mask`
parametrizations, so the masked model computes exactly what the physically pruned model will
compute (for exact groups; see `surgery.verify.group_is_exact`). `masks_to_removal_` then
bakes the masks and removes the hidden channels in one step, returning the replayable Plan.

Build the graph *before* masking (a Graph records module/tensor names, which parametrizations
keep), and keep using that graph:

>>> import torch, torch.nn as nn
>>> from prunekit.graph import build_graph
>>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> x = torch.randn(1, 3, 8, 8)
>>> g = build_graph(m, x)
>>> keep = torch.ones(8, dtype=torch.bool); keep[[1, 5]] = False
>>> mask_channels_(m, g, {"0": keep})
>>> masked = m(x)
>>> plan = masks_to_removal_(m, g, x)
>>> m[0].out_channels, plan.groups["0"], torch.allclose(m(x), masked, atol=1e-6)
(6, [0, 2, 3, 4, 6, 7], True)
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..core.errors import PruningError
from ..graph import Graph, Group
from .masks import apply_mask, get_mask, remove_masks
from .plan import Plan, make_plan
from .shrink import remove_channels_, removed_roots

__all__ = ["mask_channels_", "channel_masks", "masks_to_removal_"]


def _keep_vector(group: Group, keep: Any) -> torch.Tensor:
    keep = torch.as_tensor(keep)
    if keep.dtype != torch.bool:
        raise PruningError(f"group {group.name!r}: channel mask must be bool (True = keep), got {keep.dtype}")
    if keep.shape != (group.size,):
        raise PruningError(f"group {group.name!r} has {group.size} channels; got a mask of shape {tuple(keep.shape)}")
    return keep.cpu()


def _consumer_masks(model: nn.Module, graph: Graph, keep: Mapping[str, Any]) -> dict[tuple[str, str], torch.Tensor]:
    """Per consumer tensor, the elementwise keep mask implied by all groups' channel masks."""
    out: dict[tuple[str, str], torch.Tensor] = {}
    for name, vec in keep.items():
        group = graph.group(name)
        vec = _keep_vector(group, vec)
        dead = (~vec).nonzero().flatten().tolist()
        removed_roots(graph, {name: dead})  # same checks as physical removal: fixed channels, emptying
        for m in group.tensor_members():
            if m.role != "in":
                continue
            t = getattr(model.get_submodule(m.module), m.name)
            key = (m.module, m.name)
            cur = out.get(key)
            if cur is None:
                cur = torch.ones(t.shape, dtype=torch.bool)
            along = torch.ones(t.shape[m.dim], dtype=torch.bool)
            sel = m.channel >= 0
            along[sel] = vec[m.channel[sel]]
            shape = [1] * t.dim()
            shape[m.dim] = -1
            out[key] = cur & along.view(shape)
    return out


def mask_channels_(model: nn.Module, graph: Graph, keep: Mapping[str, Any]) -> None:
    """Hide channels: `keep` maps group name -> bool vector (True = keep) of the group's size.

    Masks intersect with masks already on the same tensors (several groups may touch one conv
    weight: its inputs belong to one group, its filters to another). All masks are checked
    before any is applied, so an invalid request leaves the model unchanged.
    """
    wanted = _consumer_masks(model, graph, keep)
    for (mod_name, tname), mask in wanted.items():
        module = model.get_submodule(mod_name)
        old = get_mask(module, tname)
        mask = mask.to(getattr(module, tname).device)
        # a mask of another shape (one entry per filter, (O, 1, 1, 1)) broadcasts: both fit the weight
        wanted[(mod_name, tname)] = mask & old.to(mask.device) if old is not None else mask
    for (mod_name, tname), mask in wanted.items():
        apply_mask(model.get_submodule(mod_name), tname, mask)


def channel_masks(model: nn.Module, graph: Graph) -> dict[str, torch.Tensor]:
    """Read channel masks back: a channel counts as hidden when every consumer slice is masked.

    Groups with no hidden channel are left out.
    """
    result = {}
    for g in graph.prunable_groups():
        hidden = torch.ones(g.size, dtype=torch.bool)
        seen = False
        for m in g.tensor_members():
            if m.role != "in":
                continue
            mask = get_mask(model.get_submodule(m.module), m.name)
            seen = True
            sel = m.channel >= 0
            if mask is None:
                hidden[m.channel[sel]] = False
                continue
            shape = getattr(model.get_submodule(m.module), m.name).shape
            alive = mask.expand(shape).movedim(m.dim, 0).reshape(shape[m.dim], -1).any(1).cpu()
            hidden.scatter_reduce_(0, m.channel[sel], ~alive[sel], "amin")
        hidden &= g.prunable
        if seen and bool(hidden.any()):
            result[g.name] = ~hidden
    return result


def masks_to_removal_(model: nn.Module, graph: Graph, example_inputs: Any, ignore: tuple = ()) -> Plan:
    """Bake every mask into its weights, then physically remove the hidden channels.

    Returns the Plan (original channel numbering). The graph must be the one the masks were
    made with. Other (unstructured) masks are baked too, so the result holds plain parameters.
    """
    keep = channel_masks(model, graph)
    remove = {name: (~vec).nonzero().flatten().tolist() for name, vec in keep.items()}
    removed_roots(graph, remove)  # validate before touching anything
    plan = make_plan(graph, remove, example_inputs, ignore)
    remove_masks(model, bake=True)
    plan.stamp(dense=model)
    remove_channels_(model, graph, remove)
    return plan.stamp(pruned=model)
