"""Groups with nothing to score are left whole with a note; computed biases and attention masks
follow the channels they meet (timm BEiT)."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit.graph import build_graph
from prunekit.methods import prune_
from prunekit.methods.magnitude import MagnitudeConfig, _skipped_note, score_groups


def _as_buffers(module: nn.Module) -> None:
    for name in ("weight", "bias"):
        t = module._parameters.pop(name)
        module.register_buffer(name, t.detach())


def test_parameterless_group_is_skipped_with_a_note():
    # the graph is traced on a model with parameters; scoring then sees the first two convs'
    # weights and biases as buffers: group "0" holds nothing to score
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 2, 1)), torch.randn(1, 3, 4, 4)
    graph = build_graph(model, x)
    _as_buffers(model[0])
    _as_buffers(model[1])
    skipped: list[str] = []
    scores = score_groups(model, graph, MagnitudeConfig(channel_ratio=0.5), None, x, skipped=skipped)
    assert skipped == ["0"] and sorted(scores) == ["1"]
    note = _skipped_note(skipped)
    assert note["skipped_groups"] == ["0"] and "no parameter to score" in note["notes"][0]


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
    r = prune_(model, MagnitudeConfig(channel_ratio=0.25, probe=False, round_to=None), x)
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


@pytest.mark.slow
def test_beit_base_prunes_without_probing():
    """timm beit_base_patch16_224 with probe=False failed twice: 'no parameter to score', then a
    broken model (q/k/v biases and the relative position bias pruned on their own)."""
    tools = Path(__file__).resolve().parents[3] / "shared" / "tools"
    if not tools.is_dir() or importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (see ../shared/tools/torchvision_cpu.py)")
    sys.path.insert(0, str(tools))
    import torchvision_cpu  # noqa: F401
    import timm
    torch.manual_seed(0)
    model, x = timm.create_model("beit_base_patch16_224").eval(), torch.randn(1, 3, 224, 224)
    r = prune_(model, MagnitudeConfig(channel_ratio=0.5, probe=False), x)
    assert model(x).shape == (1, 1000) and r.cost_after.macs < 0.75 * r.cost_before.macs


class ComputedConvBias(nn.Module):
    """The same for a convolution: its bias is computed from two parameters in forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.b1, self.b2 = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        bias = torch.cat((self.b1, self.b2))
        return self.head(nn.functional.conv2d(x, self.conv.weight, bias))


def test_computed_conv_bias_follows_the_outputs():
    torch.manual_seed(0)
    model, x = ComputedConvBias(), torch.randn(2, 3, 6, 6)
    graph = build_graph(model, x)
    group_of = {m.qualname: g.name for g in graph.groups for m in g.tensor_members() if m.dim == 0}
    assert group_of["b1"] == group_of["conv.weight"] == group_of["b2"], group_of
    r = prune_(model, MagnitudeConfig(channel_ratio=0.25, probe=False, round_to=None), x)
    assert model(x).shape == (2, 2, 4, 4) and r.cost_after.params < r.cost_before.params
