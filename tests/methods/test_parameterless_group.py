"""A group with no parameter (a buffer indexed by position) is left whole, with a note."""
import torch
from torch import nn

from prunekit.graph import build_graph
from prunekit.methods import prune_
from prunekit.methods.magnitude import MagnitudeConfig


class BufferIndexed(nn.Module):
    """Attention-like: a relative-position buffer indexed by a buffer of token ids, as in BEiT."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("pos", torch.randn(5, 8))
        self.register_buffer("idx", torch.arange(5).repeat(5).view(5, 5))

    def forward(self, x):  # x (B, 5 tokens, 8)
        y = self.fc(x)
        att = y @ y.transpose(1, 2) + self.pos[:, :5][self.idx[:, :]].sum(-1)  # (B, 5, 5)
        return att.softmax(-1) @ y


def test_parameterless_group_is_skipped_with_a_note():
    torch.manual_seed(0)
    model, x = BufferIndexed(), torch.randn(2, 5, 8)
    groups = build_graph(model, x).prunable_groups()
    params = {n for n, _ in model.named_parameters()}
    bare = [g.name for g in groups if not any(m.qualname in params for m in g.tensor_members())]
    assert bare, "the toy model must have a group without parameters"
    for probe in (False, True):
        m = BufferIndexed()
        m.load_state_dict(model.state_dict())
        r = prune_(m, MagnitudeConfig(channel_ratio=0.5, probe=probe), x)
        assert m.fc.out_features == 4 and m.idx.shape == (5, 5)
        assert m(x).shape == (2, 5, 4)
        if not probe:
            assert r.metrics["skipped_groups"] == bare
            assert any("no parameter to score" in n for n in r.metrics["notes"])
