"""Physical removal refuses what it cannot do exactly, before it writes anything."""
import re

import numpy as np
import pytest
import torch
from torch import nn

from prunekit.core.errors import PruningError
from prunekit.graph import build_graph
from prunekit.surgery.shrink import remove_channels_


def test_a_tied_weight_is_refused_before_anything_is_cut():
    """Two convs holding one weight tensor, their outputs added: the graph sees the tensor under
    one name, so slicing it would leave the other holder on the old tensor. PruningError naming
    both, and the model as it was (it still runs, still tied)."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(4, 8, 1), nn.Conv2d(4, 8, 1), nn.Conv2d(8, 3, 1)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.c(torch.relu(self.a(x) + self.b(x)))

    model, x = Tied(), torch.randn(1, 4, 5, 5)
    graph = build_graph(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match=r"a\.weight = b\.weight share one tensor.*ignore=\['a', 'b'\]"):
        remove_channels_(model, graph, {"a": [1, 2]})
    assert model.b.weight is model.a.weight and model(x).shape == (1, 3, 5, 5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_removal_keeps_a_channels_last_model_channels_last():
    """Slicing made every cut 4-D weight contiguous, so a channels-last model came out of channel
    pruning (Gator, pruning at initialisation, SLR filters) half in one layout, half in the other."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(8, 4, 3)).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    remove_channels_(model, build_graph(model, x), {"0": [1, 5], "3": [0]})
    assert model[0].weight.shape == (6, 3, 3, 3) and model[3].weight.shape == (7, 6, 3, 3)
    for conv in (model[0], model[3], model[5]):
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()


@pytest.mark.parametrize("bad, said", [
    ([False] * 5 + [True] * 3, "a boolean mask"),  # read as channels 0 and 1 before
    (torch.tensor([False] * 5 + [True] * 3), "a boolean mask"),
    ([1.5], "1.5 (float)"),  # read as channel 1
    (torch.tensor([1.0]), "torch.float32 values"),
    (np.array([2.7]), "float64 values"),
    (3, "3 (int)"),
])
def test_channels_to_remove_must_be_channel_numbers(bad, said):
    from prunekit.surgery.plan import prune_channels_

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match=f"whole channel numbers, got {re.escape(said)}.*mask.nonzero"):
        prune_channels_(model, torch.randn(1, 3, 6, 6), {"0": bad})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("ok", [[5, 6, 7], (7, 6, 5, 5), torch.tensor([5, 6, 7]), np.array([5, 6, 7]),
                                [np.int64(5), torch.tensor(6), 7]])
def test_channel_numbers_may_come_as_lists_tensors_or_arrays(ok):
    from prunekit.surgery.plan import prune_channels_

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    plan = prune_channels_(model, torch.randn(1, 3, 6, 6), {"0": ok})
    assert model[0].out_channels == 5 and plan.groups["0"] == [0, 1, 2, 3, 4]
