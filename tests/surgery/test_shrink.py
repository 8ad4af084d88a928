"""Physical removal refuses what it cannot do exactly, before it writes anything."""
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
    with pytest.raises(PruningError, match=r"a\.weight = b\.weight share one tensor"):
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
