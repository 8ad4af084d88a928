"""How probing finds the groups that break a model: few trials, every culprit, nothing else."""
import torch
from torch import nn

from prunekit.graph import build_graph
from prunekit.graph.groups import Group
from prunekit.surgery.verify import _descend, find_bad, probe_groups


def _groups(n: int) -> list[Group]:
    return [Group(f"g{i}", torch.arange(4), torch.ones(4, dtype=torch.bool)) for i in range(n)]


def _fake_trial(bad: set[str], pairs: list[set[str]], log: list[int]):
    """Fails when a bad group is in the set, or both groups of an interacting pair are."""
    def trial(groups):
        log.append(len(groups))
        names = {g.name for g in groups}
        if names & bad:
            return "bad: " + ",".join(sorted(names & bad))
        if any(p <= names for p in pairs):
            return "pair"
        return ""
    return trial


def test_one_bad_group_is_found_by_halving():
    groups, log, found, aside = _groups(16), [], {}, []
    _descend(groups, "x", _fake_trial({"g11"}, [], log), found, aside)
    assert list(found) == ["g11"]
    assert len(log) <= 2 * 4  # at most two trials per halving step
    assert [g.name for part in aside for g in part] == ["g12", "g13", "g14", "g15"]


def test_one_bad_group_costs_one_passing_trial():
    log = []
    found = find_bad(_groups(13), _fake_trial({"g2"}, [], log))
    assert list(found) == ["g2"]
    # 13 fail, 6 fail (7 set aside), 3 fail (3 set aside), 1 pass, 2 fail, 1 pass, 1 fail: g2;
    # then the 10 set aside pass together in one trial
    assert log == [13, 6, 3, 1, 2, 1, 1, 10]


def test_every_bad_group_is_found_when_most_are_bad():
    bad = {f"g{i}" for i in range(48) if i % 4}
    found = find_bad(_groups(48), _fake_trial(bad, [], []))
    assert set(found) == bad


def test_a_pair_split_between_parts_set_aside_is_still_blamed():
    # g2 is found first; g5 and g12 end up in different halves set aside, each fine alone
    found = find_bad(_groups(16), _fake_trial({"g2"}, [{"g5", "g12"}], []))
    assert "g2" in found and {"g5", "g12"} <= set(found)
    assert "together" in found["g5"]


def test_a_clean_model_costs_one_trial():
    log = []
    assert find_bad(_groups(20), _fake_trial(set(), [], log)) == {} and log == [20]


def test_groups_that_fail_only_together_are_all_blamed():
    groups, log, found = _groups(2), [], {}
    _descend(groups, "pair", _fake_trial(set(), [{"g0", "g1"}], log), found, [])
    assert set(found) == {"g0", "g1"} and all("together" in r for r in found.values())


class _TwoHardCoded(nn.Module):
    """Two convs whose outputs are reshaped with channel counts written in the code, and one
    clean conv: probing must blame exactly the two."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(3, 5, 1)
        self.head = nn.Linear(8 * 4 + 6 * 4 + 5, 2)

    def forward(self, x):
        a = self.a(x).reshape(x.shape[0], 8, 4)  # 8 and 6 are constants, not read from a tensor
        b = self.b(x).reshape(x.shape[0], 6, 4)
        c = self.c(x).mean((2, 3))
        return self.head(torch.cat([a.flatten(1), b.flatten(1), c], 1))


def test_probe_blames_every_hard_coded_group_and_only_those():
    model, x = _TwoHardCoded().eval(), torch.randn(2, 3, 2, 2)
    graph = build_graph(model, x)
    bad = probe_groups(model, x, graph)
    assert set(bad) == {"a", "b"}, bad
    assert all("forward fails" in r for r in bad.values())
