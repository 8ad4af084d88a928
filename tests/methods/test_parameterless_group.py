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


class ComputedBias(nn.Module):
    """F.linear with a bias built by cat(q_bias, zero buffer, v_bias), as timm's BEiT attention."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 12, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
        self.register_buffer("k_bias", torch.zeros(4), persistent=False)
        self.proj = nn.Linear(12, 3)

    def forward(self, x):
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        return self.proj(nn.functional.linear(x, self.qkv.weight, bias))


def test_computed_linear_bias_follows_the_outputs():
    torch.manual_seed(0)
    model, x = ComputedBias(), torch.randn(2, 8)
    graph = build_graph(model, x)
    names = {m.qualname for g in graph.prunable_groups() for m in g.tensor_members()}
    group_of = {m.qualname: g.name for g in graph.groups for m in g.tensor_members() if m.dim == 0}
    assert group_of["q_bias"] == group_of["qkv.weight"] == group_of["v_bias"], group_of
    assert "qkv.weight" in names
    r = prune_(model, MagnitudeConfig(channel_ratio=0.25, probe=False), x)
    assert model(x).shape == (2, 3) and r.cost_after.params < r.cost_before.params


class MaskedAttention(nn.Module):
    """SDPA with an additive per-head mask gathered from a table, as timm's BEiT relative bias."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)
        self.table = nn.Parameter(torch.randn(9, 2))  # (positions, heads)
        self.register_buffer("index", torch.randint(0, 9, (5 * 5,)))

    def forward(self, x):  # (B, 5, 8), 2 heads of 4
        b = x.shape[0]
        q, k, v = self.qkv(x).reshape(b, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index].view(5, 5, -1).permute(2, 0, 1).unsqueeze(0)  # (1, heads, 5, 5)
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(y.transpose(1, 2).reshape(b, 5, 8))


def test_sdpa_mask_channels_are_kept():
    torch.manual_seed(0)
    model, x = MaskedAttention(), torch.randn(2, 5, 8)
    graph = build_graph(model, x)
    for g in graph.prunable_groups():
        assert all(m.qualname != "table" for m in g.tensor_members()), g
    prune_(model, MagnitudeConfig(channel_ratio=0.5, probe=False), x)
    assert model(x).shape == (2, 5, 8) and model.table.shape == (9, 2)
