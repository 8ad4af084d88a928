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
