"""RemovalSelector (ranks once, many ratios) against the plain walk over sorted channels."""
import math

import pytest
import torch

from prunekit.core.errors import ConfigError
from prunekit.graph import build_graph
from prunekit.importance.select import RemovalSelector, select_removal
from prunekit.models import create_model


def _normalize(scores, how):
    """Plain Python: scores over their group's mean, max or sum (unchanged when that is not > 0)."""
    values = [float(v) for v in scores]
    denom = {"mean": sum(values) / len(values), "max": max(values), "sum": sum(values), "none": 1.0}[how]
    return torch.tensor([v / denom if denom > 0 else v for v in values])


def _must_keep(group, scores):
    """The best-scoring channel (the first of equal ones) of every member that lies wholly in
    prunable channels of the group, so that no tensor is emptied."""
    prunable, s = group.prunable.tolist(), scores.tolist()
    keep = [False] * group.size
    for member in group.members:
        ch = member.channel.tolist()
        if ch and min(ch) >= 0 and all(prunable[c] for c in ch):
            keep[max(ch, key=lambda c: s[c])] = True  # max() returns the first of equal maxima
    return torch.tensor(keep, dtype=torch.bool)


def _cap(group, max_ratio, keep):
    """Most channels a group may lose: within max_ratio, keeping one prunable channel and all of `keep`."""
    prunable = group.prunable.tolist()
    removable = sum(prunable)
    free = sum(1 for p, k in zip(prunable, keep.tolist()) if p and not k)
    return max(0, min(removable - 1, free, int(math.floor(max_ratio * group.size))))


def _walk(graph, scores, ratio, scope, max_ratio, round_to, normalizer):
    """Reference: sort every removable channel, walk up, skip groups at their cap."""
    groups = {n: graph.group(n) for n in scores}
    keep = {n: _must_keep(g, scores[n]) for n, g in groups.items()}
    caps = {n: _cap(g, max_ratio, keep[n]) for n, g in groups.items()}
    if scope == "local":
        counts = {n: min(caps[n], int(math.floor(ratio * g.size))) for n, g in groups.items()}
    else:
        entries = []
        for n, g in groups.items():
            s = _normalize(scores[n].float(), normalizer)
            entries += [(float(s[i]), n) for i in (g.prunable & ~keep[n]).nonzero().flatten().tolist()]
        entries.sort(key=lambda e: e[0])
        budget = int(math.floor(ratio * sum(g.size for g in groups.values())))
        counts = {n: 0 for n in groups}
        for _, n in entries:
            if budget <= 0:
                break
            if counts[n] < caps[n]:
                counts[n] += 1
                budget -= 1
    out = {}
    for n, c in counts.items():
        if round_to:  # kept rounded up to the multiple, halved while it is not below the width
            m, size = round_to, groups[n].size
            while m >= size and m > 1:
                m //= 2
            c = max(0, min(caps[n], size - min(size, -(-(size - c) // m) * m)))
        if c > 0:
            s = scores[n].clone().float()
            s[~groups[n].prunable | keep[n]] = float("inf")
            out[n] = sorted(torch.argsort(s, stable=True)[:c].tolist())
    return out


@pytest.mark.parametrize("scope, normalizer, round_to", [("global", "mean", None), ("global", "max", 4),
                                                         ("global", "none", None), ("local", "mean", 8)])
def test_selector_matches_the_walk_at_every_ratio(scope, normalizer, round_to):
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10)
    graph = build_graph(model, torch.randn(1, 3, 32, 32))
    gen = torch.Generator().manual_seed(1)
    scores = {g.name: torch.rand(g.size, generator=gen).round(decimals=1) for g in graph.prunable_groups()}  # ties
    selector = RemovalSelector(graph, scores, scope, 0.6, round_to, normalizer)
    for ratio in (0.0, 0.1, 0.37, 0.5, 0.8, 0.99):
        expected = _walk(graph, scores, ratio, scope, 0.6, round_to, normalizer)
        assert selector.at(ratio) == expected == select_removal(graph, scores, ratio, scope, 0.6, round_to, normalizer)
        assert {n: sorted(v.tolist()) for n, v in selector.indices_at(ratio).items()} == expected


@pytest.mark.parametrize("scope", ["global", "local"])
def test_a_rounded_selector_shares_the_ranking_and_matches_the_walk(scope):
    """rounded(m) answers like a selector built with round_to=m, and leaves the unrounded one as it was."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10)
    graph = build_graph(model, torch.randn(1, 3, 32, 32))
    gen = torch.Generator().manual_seed(2)
    scores = {g.name: torch.rand(g.size, generator=gen).round(decimals=1) for g in graph.prunable_groups()}
    plain = RemovalSelector(graph, scores, scope, 0.6)
    four = plain.rounded(4)
    assert four.order is plain.order  # the ranking is shared, not recomputed
    for ratio in (0.1, 0.37, 0.5, 0.8):
        assert four.at(ratio) == _walk(graph, scores, ratio, scope, 0.6, 4, "mean")
        assert plain.at(ratio) == _walk(graph, scores, ratio, scope, 0.6, None, "mean")


def test_select_checks_a_callers_ratio():
    graph = build_graph(create_model("resnet20", num_classes=10), torch.randn(1, 3, 32, 32))
    scores = {g.name: torch.rand(g.size) for g in graph.prunable_groups()}
    with pytest.raises(Exception, match="ratio"):
        RemovalSelector(graph, scores).select(1.0)
    with pytest.raises(Exception, match="scope='local'"):
        RemovalSelector(graph, scores, "global").select({n: 0.5 for n in scores})


@pytest.mark.parametrize("scope", ["local", "global"])
def test_float64_scores_rank_at_their_own_precision(scope):
    """Scores beyond float32's range (SynFlow's on a deep net) or closer than its resolution
    rank by their float64 values, not as ties broken by index."""
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 1), torch.nn.Conv2d(6, 2, 1), torch.nn.Conv2d(2, 6, 1),
                            torch.nn.Conv2d(6, 2, 1))
    graph = build_graph(m, torch.randn(1, 3, 2, 2))
    huge = torch.tensor([5e60, 1e60, 6e60, 2e60, 4e60, 3e60], dtype=torch.float64)
    close = 1.0 + torch.tensor([5, 1, 6, 2, 4, 3], dtype=torch.float64) * 1e-12
    for s in (huge, close):
        expected = sorted(torch.argsort(s)[:3].tolist())  # the three lowest: channels 1, 3, 5
        assert expected == [1, 3, 5]
        assert select_removal(graph, {"0": s}, ratio=0.5, scope=scope) == {"0": expected}
        scores = {"0": s, "2": s.flip(0)}
        got = select_removal(graph, scores, ratio=0.5, scope=scope, normalizer="none")
        assert got == {"0": expected, "2": sorted(5 - i for i in expected)}


def test_a_ratio_per_group_naming_no_group_is_refused():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 2, 1))
    graph = build_graph(m, torch.randn(1, 3, 2, 2))
    scores = {"0": torch.arange(8.0)}
    assert select_removal(graph, scores, {"0": 0.5}) == {"0": [0, 1, 2, 3]}
    with pytest.raises(ConfigError, match="'conv0'.*groups: 0"):
        select_removal(graph, scores, {"conv0": 0.5})


def test_signed_scores_are_normalised_by_their_magnitudes():
    """Every group is scaled by the same kind of number: a group of signed scores (GraSP's) whose
    mean is not positive was left raw beside groups divided by their mean."""
    from prunekit.importance.select import normalize

    signed = torch.tensor([-3.0, 1.0, -2.0, 0.0])  # mean -1: was returned unscaled
    for how, denom in (("mean", 1.5), ("max", 3.0), ("sum", 6.0)):
        torch.testing.assert_close(normalize(signed, how), signed / denom)
    positive = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(normalize(positive, "mean"), positive / 2.0)  # unchanged for scores >= 0
    assert torch.equal(normalize(torch.zeros(3), "mean"), torch.zeros(3))
