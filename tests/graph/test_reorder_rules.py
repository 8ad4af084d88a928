"""Reorders and element-wise selections between two convs: removing any channel the graph calls
prunable equals zeroing it, and a reorder that does not survive pruning (a roll of the channels)
fixes them, as indexing does."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.graph import build_graph
from prunekit.testing.checks import check_removal_matches_zeroing, random_removal


class Between(nn.Module):
    """a, g: conv 3 -> 8 (g only feeds the op as condition / bound); op(a, g) -> conv b."""

    def __init__(self, op, width: int = 8):
        super().__init__()
        self.a, self.g, self.b, self.op = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(width, 2, 1), op

    def forward(self, x):
        return self.b(self.op(self.a(x), self.g(x)))


# name: (op, width read by b, is `a` still prunable afterwards)
OPS = {
    "roll_channels": (lambda t, u: torch.roll(t, 1, dims=1), 8, False),
    "roll_channels_method_negative": (lambda t, u: t.roll(-3, 1), 8, False),
    "roll_channels_and_h": (lambda t, u: torch.roll(t, (1, 2), dims=(2, 1)), 8, False),
    "roll_flattened": (lambda t, u: torch.roll(t, 5), 8, False),
    "roll_h_only": (lambda t, u: torch.roll(t, 1, dims=2), 8, True),
    "roll_negative_dim_w": (lambda t, u: t.roll(2, -1), 8, True),
    "flip_channels": (lambda t, u: torch.flip(t, dims=(1,)), 8, True),
    "tile_channels": (lambda t, u: t.tile((1, 2, 1, 1)), 16, True),
    "where_condition": (lambda t, u: torch.where(u > 0, t, -0.5 * t), 8, True),
    "masked_fill_mask": (lambda t, u: t.masked_fill(u > 0, 0.25), 8, True),
    "clamp_tensor_min": (lambda t, u: torch.clamp(t, min=u), 8, True),
    "clamp_max_method": (lambda t, u: t.clamp_max(u), 8, True),
}


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    op, width, _ = OPS[name]
    torch.manual_seed(0)
    model = Between(op, width).eval()
    with torch.no_grad():  # biases far from zero, so a misplaced channel shows in the output
        for conv in (model.a, model.g):
            conv.bias.uniform_(-1.0, 1.0)
    return model, torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize("name", sorted(OPS))
def test_removing_any_prunable_channel_equals_zeroing_it(name):
    model, x = _model(name)
    graph = build_graph(model, x)
    for group in graph.prunable_groups():
        for ch in group.prunable.nonzero().flatten().tolist():
            check_removal_matches_zeroing(model, x, graph, {group.name: [ch]}, atol=1e-5)
    for seed in range(4):
        check_removal_matches_zeroing(model, x, graph, random_removal(graph, 0.5, torch.Generator().manual_seed(seed)),
                                      atol=1e-5)


@pytest.mark.parametrize("name", sorted(OPS))
def test_only_order_preserving_ops_leave_the_channels_prunable(name):
    model, x = _model(name)
    group = next(g for g in build_graph(model, x).groups if any(m.module == "a" for m in g.members))
    assert bool(group.prunable.any()) == OPS[name][2]


@pytest.mark.parametrize("name", ["where_condition", "masked_fill_mask", "clamp_tensor_min"])
def test_a_condition_or_bound_is_pruned_with_the_data_it_meets(name):
    model, x = _model(name)
    group = next(g for g in build_graph(model, x).groups if any(m.module == "a" for m in g.members))
    assert any(m.module == "g" for m in group.members)


def test_channel_roll_through_the_pruner_gives_the_zeroed_model():
    from prunekit import MagnitudeConfig, prune_

    model, x = _model("roll_channels")
    ref = model(x)
    prune_(model, MagnitudeConfig(channel_ratio=0.5), x)
    assert model.a.out_channels == 8 and torch.allclose(model(x), ref, atol=1e-5)
