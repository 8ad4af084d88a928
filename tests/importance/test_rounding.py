"""Rounding kept widths jointly with a cost target: never overshoots, lands within one step."""
import pytest
import torch
from torch import nn

from prunekit.cost.macs import count_cost, estimate_cost
from prunekit.graph import build_graph
from prunekit.importance.rounding import round_to_target
from prunekit.importance.select import select_removal
from prunekit.methods import prune_
from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.models.resnet_cifar import create_resnet_cifar


def _kept_widths_aligned(graph, removal, multiple):
    for g in graph.prunable_groups():
        kept = g.size - len(removal.get(g.name, []))
        assert kept == g.size or kept % multiple == 0, (g.name, g.size, kept)


def _resnet_setup(depth):
    """A CIFAR ResNet's graph, random scores, its MACs and an exact MACs estimate of a removal."""
    torch.manual_seed(0)
    model, x = create_resnet_cifar(depth), torch.randn(1, 3, 32, 32)
    graph = build_graph(model, x)
    scores = {g.name: torch.rand(g.size) for g in graph.prunable_groups()}
    return graph, scores, count_cost(model, x).macs, lambda rem: estimate_cost(model, graph, rem)[1]


def test_resnet56_macs_half_round8_lands_within_tolerance():
    graph, scores, before, macs = _resnet_setup(56)
    # the old behaviour: every width rounded up after a ratio search overshoots to ~0.25
    lo, hi = 0.0, 0.9
    for _ in range(20):
        mid = (lo + hi) / 2
        over = macs(select_removal(graph, scores, mid, round_to=8)) > 0.5 * before
        lo, hi = (mid, hi) if over else (lo, mid)
    assert macs(select_removal(graph, scores, hi, round_to=8)) / before < 0.3
    start = select_removal(graph, scores, 0.3)
    res = round_to_target(graph, scores, start, 8, macs, 0.5 * before)
    frac = res.cost / before
    tolerance = max(0.05 * 0.5, res.max_step / before)
    assert 0.5 - tolerance <= frac <= 0.5, (frac, tolerance)
    assert res.cost == macs(res.removal)
    _kept_widths_aligned(graph, res.removal, 8)


def test_prune_macs_fraction_round_to_respects_target():
    torch.manual_seed(1)
    model, x = create_resnet_cifar(20), torch.randn(1, 3, 32, 32)
    r = prune_(model, MagnitudeConfig(macs_fraction=0.5, round_to=8, probe=False), x)
    frac = r.cost_after.macs / r.cost_before.macs
    assert 0.45 <= frac <= 0.5, frac
    assert r.cost_after.macs == count_cost(model, x).macs
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.out_channels not in (10,):
            assert m.out_channels % 8 == 0, m


def test_greedy_takes_the_cheapest_importance_per_cost():
    # two parallel branches of equal cost per channel; branch "a" is far less important, so
    # every extra multiple comes from it
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 32, 1), nn.Conv2d(3, 32, 1)
            self.ha, self.hb = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 2, 1)

        def forward(self, x):
            return self.ha(self.a(x)) + self.hb(self.b(x))

    model, x = Two(), torch.randn(1, 3, 4, 4)
    graph = build_graph(model, x)
    names = {g.members[0].module: g.name for g in graph.prunable_groups()}
    scores = {names["a"]: torch.full((32,), 0.01) + torch.arange(32.) * 1e-4,
              names["b"]: torch.full((32,), 1.0) + torch.arange(32.) * 1e-4}
    # normaliser "none" keeps the scales apart (mean-normalised, both would look alike)
    kept = lambda rem: sum(32 - len(rem.get(n, [])) for n in names.values())
    res = round_to_target(graph, scores, {}, 8, kept, target=40, normalizer="none")
    assert len(res.removal.get(names["a"], [])) == 24 and names["b"] not in res.removal
    assert res.cost == 40 and res.picks == 3


def test_impossible_target_is_a_config_error():
    from prunekit.core.errors import ConfigError
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.Conv2d(16, 2, 1))
    graph = build_graph(model, torch.randn(1, 3, 2, 2))
    name = graph.prunable_groups()[0].name
    with pytest.raises(ConfigError, match="impossible target"):
        round_to_target(graph, {name: torch.rand(16)}, {}, 8, lambda rem: 16 - len(rem.get(name, [])), 1)


def test_narrow_group_steps_by_half_its_width():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.Conv2d(16, 2, 1))
    graph = build_graph(model, torch.randn(1, 3, 2, 2))
    name = graph.prunable_groups()[0].name
    kept = lambda rem: 16 - len(rem.get(name, []))
    res = round_to_target(graph, {name: torch.rand(16)}, {}, 16, kept, target=12)
    assert res.cost == 8  # 16 -> 8: a multiple of 16 would only allow 16


def test_nearest_start_keeps_the_same_share_per_group_and_gives_back_to_the_target():
    """Local scope: every 16-wide group starts at the nearest multiple of its unrounded kept count,
    so uniform widths stay uniform; the give-back pass then lands just under the target."""
    graph, scores, before, macs = _resnet_setup(20)
    lo, hi = 0.0, 0.9  # the unrounded local removal at half the MACs
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(select_removal(graph, scores, mid)) > 0.5 * before else (lo, mid)
    start = select_removal(graph, scores, hi)
    near = round_to_target(graph, scores, start, 8, macs, 0.5 * before, nearest=True)
    up = round_to_target(graph, scores, start, 8, macs, 0.5 * before)
    _kept_widths_aligned(graph, near.removal, 8)
    assert near.cost <= 0.5 * before and up.cost <= 0.5 * before
    assert near.cost / before > 0.47  # given back from a start far below (every 16 -> 8 at once)
    stage1 = {g.size - len(near.removal.get(g.name, [])) for g in graph.prunable_groups() if g.size == 16}
    assert len(stage1) <= 2  # the same share everywhere, a multiple or two given back at the margin


def test_max_kept_caps_every_group_and_its_give_back():
    """`max_kept` (a gate-based method's open channels): the start rounds down to the multiple
    below it, and no multiple is given back past it, even where the target would allow it."""
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1), torch.nn.Conv2d(16, 16, 1), torch.nn.Conv2d(16, 2, 1))
    g = build_graph(m, torch.randn(1, 3, 2, 2))
    scores = {"0": torch.arange(16.0), "1": torch.arange(16.0)}
    kept = lambda rem: 32 - sum(len(v) for v in rem.values())  # kept channels stand in for the cost
    free = round_to_target(g, scores, {"0": [0, 1, 2], "1": [0, 1, 2]}, 8, kept, target=32, nearest=True)
    assert {n: 16 - len(v) for n, v in free.removal.items()} == {} and free.cost == 32  # 13 -> 16 each
    capped = round_to_target(g, scores, {"0": [0, 1, 2], "1": [0, 1, 2]}, 8, kept, target=32, nearest=True,
                             max_kept={"0": 13, "1": 13})
    assert {n: 16 - len(v) for n, v in capped.removal.items()} == {"0": 8, "1": 8} and capped.cost == 16
    assert all(v == list(range(8)) for v in capped.removal.values())  # the lowest scores go


def test_max_kept_never_removes_channels_past_the_cap():
    """A max_kept below what the protected channels allow (five kept by `keep`, or the graph's own
    best channel) stops at the cap instead of removing a protected channel or the whole group."""
    m = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 2, 1))
    g = build_graph(m, torch.randn(1, 3, 4, 4))
    scores = {"0": torch.arange(16.0)}
    cost = lambda rem: 16 - len(rem.get("0", []))
    keep = torch.zeros(16, dtype=torch.bool)
    keep[[11, 12, 13, 14, 15]] = True
    r = round_to_target(g, scores, {"0": list(range(10))}, 4, cost, target=6, max_ratio=1.0, keep={"0": keep},
                        nearest=True, best_effort=True, max_kept={"0": 6})
    assert len(r.removal["0"]) <= 11 and not set(r.removal["0"]) & {11, 12, 13, 14, 15}
    r = round_to_target(g, scores, {}, 4, cost, target=16, max_ratio=1.0, best_effort=True, max_kept={"0": 0})
    assert len(r.removal["0"]) == 15 and 15 not in r.removal["0"]  # the best channel stays
