"""Channel rules at their edges: hard-coded cuts of a channel dim, and views that split channels
into groups (the remaining gap is kept as a strict xfail until the rule is fixed).

Each test states the correct behaviour: for every channel the graph calls prunable, removing
it equals zeroing its contributions (and the forward still runs). A fix turns the xfail into
an unexpected pass, which fails the suite (strict) so the marker gets removed.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.graph import build_graph
from prunekit.testing.checks import check_removal_matches_zeroing
from prunekit.testing.toy_models import ShuffleOfWidthOne


def _every_single_channel_removal_matches_zeroing(model: nn.Module, x: torch.Tensor) -> None:
    graph = build_graph(model, x)
    for group in graph.prunable_groups():
        for ch in group.prunable.nonzero().flatten().tolist():
            if group.size > 1:
                check_removal_matches_zeroing(model, x, graph, {group.name: [ch]})


class CutThenConv(nn.Module):
    """conv (8 channels) -> a hard-coded piece of the channels -> conv."""

    def __init__(self, cut, width: int = 4):
        super().__init__()
        self.a, self.b, self.cut = nn.Conv2d(3, 8, 1), nn.Conv2d(width, 2, 1), cut

    def forward(self, x):
        return self.b(self.cut(self.a(x)))


CUTS = {  # hard-coded pieces of the channels: every call form reads its own dim argument
    "split_sizes_list": (lambda t: torch.split(t, [4, 4], dim=1)[0], 4),
    "split_size_int": (lambda t: t.split(4, dim=1)[0], 4),
    "split_positional_dim": (lambda t: torch.split(t, 4, 1)[1], 4),
    "narrow": (lambda t: t.narrow(1, 2, 4), 4),
    "tensor_split": (lambda t: torch.tensor_split(t, 2, dim=1)[0], 4),
    "select": (lambda t: t.select(1, 3).unsqueeze(1), 1),
    "unbind": (lambda t: t.unbind(1)[5].unsqueeze(1), 1),
}


@pytest.mark.parametrize("name", sorted(CUTS))
def test_hard_coded_channel_cuts_are_fixed(name):
    cut, width = CUTS[name]
    torch.manual_seed(0)
    model, x = CutThenConv(cut, width), torch.randn(2, 3, 4, 4)
    _every_single_channel_removal_matches_zeroing(model, x)
    assert not build_graph(model, x).group("a").prunable.any()


def test_cuts_along_other_dims_leave_channels_prunable():
    torch.manual_seed(0)
    model, x = CutThenConv(lambda t: t.narrow(2, 1, 2).split(1, dim=3)[0], 8), torch.randn(2, 3, 4, 4)
    assert build_graph(model, x).group("a").prunable.all()
    _every_single_channel_removal_matches_zeroing(model, x)


def test_hard_coded_channel_cuts_by_indexing_are_fixed():
    """The same cuts written as x[:, a:b] are handled (the contrast to the xfails above)."""
    torch.manual_seed(0)
    model = CutThenConv(lambda t: t[:, 2:6])
    graph = build_graph(model, torch.randn(2, 3, 4, 4))
    assert not graph.group("a").prunable.any()


class HeadsOfWidthOne(nn.Module):
    """Attention-style head split of a 2-wide projection into 2 heads of width 1."""

    def __init__(self):
        super().__init__()
        self.v, self.o = nn.Linear(4, 2), nn.Linear(2, 4)

    def forward(self, x):
        b, n, _ = x.shape
        heads = self.v(x).view(b, n, 2, -1).transpose(1, 2)  # (B, heads, N, 1)
        return self.o((heads * 2.0).transpose(1, 2).reshape(b, n, -1))


@pytest.mark.xfail(strict=True, reason="rules_shape._join_split does not couple a view that splits a channel "
                                       "dim into (groups, 1): the per-group width 1 is not a varying dim, so each "
                                       "group's channel stays independently prunable and view(b, g, -1, ...) fails")
@pytest.mark.parametrize("make, shape", [(ShuffleOfWidthOne, (2, 3, 4, 4)), (HeadsOfWidthOne, (2, 3, 4))],
                         ids=["channel_shuffle", "attention_heads"])
def test_split_into_groups_of_width_one_is_coupled(make, shape):
    torch.manual_seed(0)
    _every_single_channel_removal_matches_zeroing(make(), torch.randn(*shape))


def test_split_into_groups_of_width_two_is_coupled():
    """With two channels per group the same view is coupled correctly (the contrast)."""

    class Shuffle(ShuffleOfWidthOne):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    torch.manual_seed(0)
    _every_single_channel_removal_matches_zeroing(Shuffle(), torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize("make, shape", [(ShuffleOfWidthOne, (2, 3, 4, 4)), (HeadsOfWidthOne, (2, 3, 4))],
                         ids=["channel_shuffle", "attention_heads"])
def test_probing_makes_groups_of_width_one_safe(make, shape):
    """What the trace misses, the probe (on by default in the pruners) catches: every group it
    leaves prunable can lose any single channel and still equal zeroing."""
    from prunekit.surgery.verify import build_safe_graph

    torch.manual_seed(0)
    model, x = make(), torch.randn(*shape)
    graph = build_safe_graph(model, x)
    first = graph.groups[0]
    assert not first.prunable.any() and "forward fails after removal" in first.note
    for group in graph.prunable_groups():
        for ch in group.prunable.nonzero().flatten().tolist():
            if group.size > 1:
                check_removal_matches_zeroing(model, x, graph, {group.name: [ch]})
