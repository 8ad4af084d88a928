"""Graph bookkeeping that reused graphs rely on."""
import torch
from torch import nn

from prunekit.graph import build_graph
from prunekit.importance.select import must_keep


def test_member_ids_are_computed_once_and_again_after_a_member_changes():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1))
    g = build_graph(m, torch.randn(1, 3, 6, 6))
    flat, sizes = g.member_ids()
    assert g.member_ids()[0] is flat  # cached: a reused graph asks at every pruning
    assert not flat.flags.writeable
    g.members[0].ids = g.members[0].ids.clone() + 1000
    again, _ = g.member_ids()
    assert again is not flat and int(again[0]) == int(flat[0]) + 1000


def test_must_keep_follows_a_changed_prunable_mask():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1))
    g = build_graph(m, torch.randn(1, 3, 6, 6)).group("0")
    scores = torch.arange(8.0)
    assert must_keep(g, scores).nonzero().flatten().tolist() == [7]  # conv 0's best filter stays
    g.prunable = torch.tensor([True] * 7 + [False])  # a probe fixed channel 7: nothing more must stay
    assert not bool(must_keep(g, scores).any())
    g.prunable = torch.ones(8, dtype=torch.bool)
    assert must_keep(g, scores).nonzero().flatten().tolist() == [7]
    g.prunable[7] = False  # an edit in place is seen too
    assert not bool(must_keep(g, scores).any())
    g.prunable[7] = True
    whole = g.members[0]
    g.members = [type(whole)(whole.module, whole.name, whole.dim, torch.tensor([0, 1, 2, 3, 4, 5, 6, -1]), whole.role)
                 for _ in g.members]  # same count, no member wholly inside any more
    assert not bool(must_keep(g, scores).any())
