"""LSTM/GRU/RNN: the input features they read are pruned; the hidden size is kept."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from prunekit.cost.macs import count_cost
from prunekit.graph import build_graph
from prunekit.surgery.shrink import remove_channels_
from prunekit.testing.checks import check_removal_matches_zeroing
from prunekit.testing.toy_models import Recurrent

X = torch.randn(2, 6, 5)


def test_recurrent_layers_read_prunable_features():
    torch.manual_seed(0)
    model = Recurrent().eval()
    graph = build_graph(model, X)
    embed = {m.qualname for m in graph.group("embed").members}
    assert {"lstm.weight_ih_l0", "lstm.weight_ih_l0_reverse"} <= embed and "lstm.weight_ih_l1" not in embed
    assert "gru.weight_ih_l0" in {m.qualname for m in graph.group("mix").members}
    removal = {"embed": [0, 5, 11], "mix": [2, 3]}
    check_removal_matches_zeroing(model, X, graph, removal)
    pruned = copy.deepcopy(model)
    remove_channels_(pruned, graph, removal)
    assert (pruned.lstm.input_size, pruned.gru.input_size, pruned.lstm.hidden_size) == (9, 8, 6)


def test_recurrent_macs_match_a_hand_count():
    lstm = nn.LSTM(7, 5, batch_first=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = lstm

        def forward(self, x):
            return self.rnn(x)[0]

    steps = 2 * 6  # batch x sequence, per-sample count divides by the batch
    assert count_cost(Net(), torch.randn(2, 6, 7)).macs == steps * 4 * 5 * (7 + 5) // 2


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_packed_sequences_are_traced_too(kind):
    """The packed call passes (data, batch_sizes, hx, params, ...); an LSTM's state is a tuple."""

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Linear(5, 8), nn.Linear(4, 2)
            self.rnn = (nn.GRU if kind == "gru" else nn.LSTM)(8, 4, batch_first=True)

        def forward(self, x):
            packed = pack_padded_sequence(self.embed(x), torch.tensor([6, 4]), batch_first=True)
            h0 = torch.zeros(1, 2, 4)
            h_n = self.rnn(packed, h0 if kind == "gru" else (h0, h0.clone()))[1]
            return self.head((h_n if kind == "gru" else h_n[0])[-1])

    torch.manual_seed(0)
    model = Packed().eval()
    graph = build_graph(model, X)
    assert "rnn.weight_ih_l0" in {m.qualname for m in graph.group("embed").members}
    check_removal_matches_zeroing(model, X, graph, {"embed": [0, 2, 7]})


def test_initial_state_from_a_layer_keeps_that_layer():
    """h0 made by a Linear has the hidden size, which the rule keeps: that Linear is not pruned."""

    class InitState(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.init, self.rnn = nn.Linear(5, 8), nn.Linear(5, 4), nn.GRU(8, 4, batch_first=True)

        def forward(self, x):
            h0 = torch.tanh(self.init(x.mean(1))).unsqueeze(0)
            return self.rnn(self.embed(x), h0)[0]

    graph = build_graph(InitState(), X)
    assert not bool(graph.group("init").prunable.any())
    assert bool(graph.group("embed").prunable.all())


def test_a_recurrent_layer_with_a_masked_weight_is_still_counted():
    """A mask makes the input weight a computed tensor: the features stay, the MACs count."""
    from prunekit.surgery.masks import apply_mask

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.r = nn.GRU(4, 6, batch_first=True)

        def forward(self, x):
            return self.r(x)[0]

    model, x = Net(), torch.randn(2, 5, 4)
    hand = 5 * (4 * 18 + 6 * 18)  # 5 steps of the input and hidden weights (3 gates x 6)
    assert count_cost(model, x).macs == hand
    apply_mask(model.r, "weight_ih_l0", torch.rand(18, 4) > 0.5)
    assert count_cost(model, x).macs == hand
