"""Differentiable per-channel costs of gated groups against hand counts and pruned copies."""
import copy

import torch
from torch import nn

from prunekit.cost.differentiable import build_cost
from prunekit.cost.macs import count_cost
from prunekit.graph import build_graph
from prunekit.layers.gates import GateSet


def test_per_channel_macs_and_params_equal_hand_counts():
    a, b, c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(6, 2, 3)
    model, x = nn.Sequential(a, nn.ReLU(), b, nn.ReLU(), c), torch.randn(1, 3, 8, 8)
    graph = build_graph(model, x)
    gates = GateSet.from_graph(model, graph)
    assert gates.names == ["0", "2"]
    macs = build_cost("macs", model, graph, gates)
    assert macs.full == count_cost(model, x).macs == 8 * 64 * 27 + 6 * 64 * 72 + 2 * 36 * 54
    full = macs.per_channel(None, at_full=True)
    # a channel of a: its filter (3*9 MACs at 64 positions) + its slice of b (6 filters * 9 at 64)
    assert full[0].tolist() == [3 * 9 * 64 + 6 * 9 * 64] * 8
    # a channel of b: 8*9 at 64 positions + its slice of c (2 * 9 at 36 positions)
    assert full[1].tolist() == [8 * 9 * 64 + 2 * 9 * 36] * 6
    # adaptive: with 4 of a's channels and 3 of b's open, prices follow the open widths
    opens = [torch.tensor([1.0] * 4 + [0.0] * 4, dtype=torch.float64), torch.tensor([1.0] * 3 + [0.0] * 3, dtype=torch.float64)]
    cost = macs.per_channel(opens)
    assert cost[0].tolist() == [3 * 9 * 64 + 3 * 9 * 64] * 8
    assert cost[1].tolist() == [4 * 9 * 64 + 2 * 9 * 36] * 6
    params = build_cost("params", model, graph, gates)
    assert params.per_channel(opens)[0].tolist() == [27 + 1 + 3 * 9] * 8  # filter, bias, b's slices
    # the estimate is exact: equal to counting the physically pruned copy
    pruned = copy.deepcopy(model)
    from prunekit.surgery.shrink import remove_channels_
    remove_channels_(pruned, graph, {"0": [4, 5, 6, 7], "2": [3, 4, 5]})
    bool_opens = [o.bool() for o in opens]
    assert macs.total(bool_opens).item() == count_cost(pruned, x).macs
    assert params.total(bool_opens).item() == count_cost(pruned, x).params


def test_latency_cost_keeps_falling_below_a_quarter_of_the_width(monkeypatch):
    """The latency tables reach down to 1/16 of each width (as the latency model's do): closing
    channels of a group that is under 25% open still saves modelled time, with a gradient. The
    tables are timed for real, then given times proportional to in x out so the test is exact."""
    import prunekit.cost.differentiable as diff
    from prunekit.cost.latency import LatencyConfig
    from prunekit.layers.gates import GateSet

    real = diff.build_conv_lut

    def proportional(spec, counts, cfg):
        table = real(spec, counts, cfg)
        table.values_ms = [[0.001 * i * o for o in table.out_counts] for i in table.in_counts]
        return table
    monkeypatch.setattr(diff, "build_conv_lut", proportional)
    m = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1))
    x = torch.randn(1, 64, 6, 6)
    graph = build_graph(m, x)
    gates = GateSet.from_graph(m, graph)
    cost = diff.build_cost("latency", m, graph, gates, LatencyConfig(warmup=1, repeats=1, threads=1))
    assert cost.latency_tables[0].in_counts[0] == 4  # 64 // 16
    i = gates.names.index("0")
    totals, grads = {}, {}
    for k in (16, 6):
        u = [torch.ones(s, dtype=torch.float64) for s in gates.sizes]
        u[i][k:] = 0
        totals[k] = float(cost.total(u))
        grads[k] = float(cost.per_channel(u)[i][:k].mean())
    assert totals[6] < totals[16] and grads[6] > 0


def test_macs_cost_scales_the_attention_products_with_their_channels():
    """Hand count, per sample, T=10 tokens, c=16, d=8: q and k (2*T*c*d) and q @ k^T (T*T*d) stay;
    half of v's channels closed halves v (T*c*d), attn @ v (T*T*d) and o (T*d*c). The products
    without parameters scaled as constants before, which gave 0.81 instead of 0.75."""
    class Attn(nn.Module):
        def __init__(self, c=16, d=8):
            super().__init__()
            self.q, self.k, self.v, self.o = nn.Linear(c, d), nn.Linear(c, d), nn.Linear(c, d), nn.Linear(d, c)

        def forward(self, x):
            a = (self.q(x) @ self.k(x).transpose(-1, -2)).softmax(-1)
            return self.o(a @ self.v(x))

    torch.manual_seed(0)
    m, x = Attn(), torch.randn(1, 10, 16)
    graph = build_graph(m, x)
    gates = GateSet.from_graph(m, graph)
    cost = build_cost("macs", m, graph, gates)
    T, c, d = 10, 16, 8
    full = 2 * T * c * d + T * T * d + T * c * d + T * T * d + T * d * c
    assert count_cost(m, x).macs == full and cost.full == full
    opens = [torch.ones(n, dtype=torch.float64) for n in gates.sizes]
    opens[gates.names.index("v")][:4] = 0
    half = 2 * T * c * d + T * T * d + (T * c * d + T * T * d + T * d * c) / 2
    assert float(cost.total(opens)) == half
    per = cost.per_channel(opens, at_full=True)[gates.names.index("v")]
    assert float(per[0]) == T * c + T * T + T * c  # one v channel: its row of v, its column of attn @ v and of o
