"""Channel rules run after the forward: what the model changes later must not leak back.

The tracer queues each call and applies the rules once the forward is done (or just before an
op that reshapes a tensor in place), so the arguments are frozen at call time: a list the model
keeps appending to (DenseNet's feature list) and a tensor reshaped in place afterwards must
look to each rule as they were when the op ran.
"""
import torch
from torch import nn

from prunekit.graph import build_graph
from prunekit.testing.checks import build_and_check


class GrowingList(nn.Module):
    """DenseNet-style: each conv reads torch.cat(features), then its output joins the same list."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layers = nn.ModuleList([nn.Conv2d(4 + 3 * i, 3, 3, padding=1) for i in range(3)])
        self.head = nn.Conv2d(4 + 3 * 3, 2, 1)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(torch.relu(layer(torch.cat(features, 1))))
        return self.head(torch.cat(features, 1))


class ReshapedInPlace(nn.Module):
    """A conv output flattened, then given a new leading dim in place before a Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc = nn.Linear(6 * 2 * 2, 3)

    def forward(self, x):
        y = self.conv(x).flatten(1)
        y.unsqueeze_(0)  # (1, B, 24): the queued flatten must still see (B, 24)
        return self.fc(y).squeeze(0)


def test_a_list_appended_to_after_a_call_is_seen_as_it_was():
    model, x = GrowingList().eval(), torch.randn(2, 3, 5, 5)
    graph = build_graph(model, x)
    # each layer's input width is what the list held when that layer ran
    widths = {m.module: m.ids.numel() for m in graph.members if m.name == "weight" and m.role == "in"}
    assert widths == {"stem": 3, "layers.0": 4, "layers.1": 7, "layers.2": 10, "head": 13}
    for seed in range(3):
        build_and_check(model, x, fraction=0.5, seed=seed)


def test_an_in_place_reshape_after_a_call_is_seen_after_it():
    model, x = ReshapedInPlace().eval(), torch.randn(2, 3, 4, 4)
    graph = build_graph(model, x)
    assert graph.group("conv").size == 6 and bool(graph.group("conv").prunable.all())
    build_and_check(model, x, fraction=0.5, seed=0)
