"""Rules at edges the toy models and random DAGs do not reach: every channel the graph calls
prunable is removed exactly as zeroing it, and valid call forms trace without a crash."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.graph import build_graph
from prunekit.surgery.verify import build_safe_graph, probe_groups
from prunekit.testing.checks import check_removal_matches_zeroing


def _every_prunable_channel_matches_zeroing(model: nn.Module, x) -> None:
    graph = build_graph(model, x)
    for group in graph.prunable_groups():
        for ch in group.prunable.nonzero().flatten().tolist():
            if group.size > 1:
                check_removal_matches_zeroing(model, x, graph, {group.name: [ch]})


class PoolOverChannels(nn.Module):
    """A pool whose window runs along the channels: a Linear's features, or channels-last maps."""

    def __init__(self, pool, channels_last: bool):
        super().__init__()
        self.a, self.b, self.pool, self.channels_last = nn.Linear(3, 8), nn.Linear(8, 2), pool, channels_last

    def forward(self, x):  # x: (B, H, W, 3)
        y = self.a(x)  # (B, H, W, 8): channels last
        y = self.pool(y if self.channels_last else y.flatten(1, 2))  # (B, H*W, 8) for the 1-d pools
        return self.b(y.reshape(y.shape[0], -1, y.shape[-1]))


POOLS = {
    "avg_pool1d": (lambda t: F.avg_pool1d(t, 3, 1, 1), False),
    "max_pool1d": (lambda t: F.max_pool1d(t, 3, 1, 1), False),
    "max_pool2d_channels_last": (lambda t: F.max_pool2d(t, 3, 1, 1), True),
    "avg_pool2d_channels_last": (lambda t: F.avg_pool2d(t, 3, 1, 1, count_include_pad=False), True),
}


@pytest.mark.parametrize("name", sorted(POOLS))
def test_a_pool_along_the_channels_fixes_them(name):
    """The pool keeps the size of the channel dim, but mixes each channel with its neighbours:
    without a channel the same window reads other neighbours, so the channels are fixed."""
    pool, channels_last = POOLS[name]
    torch.manual_seed(0)
    model, x = PoolOverChannels(pool, channels_last).eval(), torch.randn(2, 4, 4, 3)
    assert not build_graph(model, x).group("a").prunable.any()
    _every_prunable_channel_matches_zeroing(model, x)


def test_a_pool_over_spatial_dims_keeps_the_channels_prunable():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.MaxPool2d(3, 1, 1), nn.AvgPool2d(2), nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    assert build_graph(model, x).group("0").prunable.all()
    _every_prunable_channel_matches_zeroing(model, x)


class NamedArguments(nn.Module):
    """Functional calls that name their leading tensor arguments (input=, tensors=, query=, ...)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)
        self.q, self.k, self.v, self.o = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        y = F.conv2d(input=x, weight=self.a.weight, bias=self.a.bias, padding=1)
        y = F.batch_norm(input=y, running_mean=self.bn.running_mean, running_var=self.bn.running_var,
                         weight=self.bn.weight, bias=self.bn.bias)
        y = F.interpolate(input=F.relu(input=y), scale_factor=2)
        y = F.max_pool2d(input=F.pad(input=y, pad=(1, 1, 1, 1)), kernel_size=2)
        y = torch.cat(tensors=[y[:, :, :2], y[:, :, 2:]], dim=2)
        t = torch.flatten(input=self.b(y), start_dim=2).transpose(1, 2)  # (B, tokens, 8)
        a = F.scaled_dot_product_attention(query=self.q(t), key=self.k(t), value=self.v(t), scale=0.5)
        return self.o(torch.mul(input=a, other=torch.sigmoid(input=a)).sum(dim=1))


def test_leading_arguments_given_by_name_trace_like_positional_ones():
    torch.manual_seed(0)
    model, x = NamedArguments().eval(), torch.randn(2, 3, 5, 5)
    graph = build_graph(model, x)
    assert [(g.name, g.size, int(g.prunable.sum())) for g in graph.groups][:4] == [
        ("a", 8, 8), ("b", 8, 8), ("q", 8, 8), ("v", 8, 8)]
    _every_prunable_channel_matches_zeroing(model, x)


class MaskedTokens(nn.Module):
    """Token selection by a mask computed in forward (x[keep], keep: (B, N) bool), and a
    selection of single elements by a mask over every dim (the elements carry all channels)."""

    def __init__(self, every_dim: bool):
        super().__init__()
        self.a, self.score, self.b, self.every_dim = nn.Linear(4, 8), nn.Linear(4, 1), nn.Linear(8, 2), every_dim

    def forward(self, x):  # x: (B, N, 4)
        y = self.a(x)
        if self.every_dim:
            return self.b(y).sum() + y[y > 0].sum()
        keep = self.score(x).squeeze(-1) > 0  # (B, N)
        return self.b(y[keep]).sum(0)


def test_a_mask_index_keeps_its_values_and_fixes_the_channels_it_covers():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4)
    tokens, elements = MaskedTokens(every_dim=False).eval(), MaskedTokens(every_dim=True).eval()
    assert build_graph(tokens, x).group("a").prunable.all()  # the mask covers (B, N), not the channels
    _every_prunable_channel_matches_zeroing(tokens, x)
    assert not build_graph(elements, x).group("a").prunable.any()


class SumOfChannels(nn.Module):
    """Channels summed with no weight slice between: a reduction, a q.k product, an einsum.
    After a sigmoid a zeroed channel is 0.5, not 0, so removing it differs from zeroing it."""

    def __init__(self, kind: str):
        super().__init__()
        self.a, self.k, self.kind = nn.Linear(4, 8), nn.Linear(4, 8), kind

    def forward(self, x):  # x: (B, N, 4)
        x = x[0, 0] if self.kind == "einsum" else x  # einsum joins a channel dim's positions along its other dims
        q = torch.sigmoid(self.a(x))
        if self.kind == "sum":
            return q.sum(-1)
        k = torch.sigmoid(self.k(x))
        if self.kind == "matmul":
            return q @ k.transpose(-1, -2)
        return torch.einsum("c,c->", q, k)


@pytest.mark.parametrize("kind", ["sum", "matmul", "einsum"])
def test_a_sum_over_channels_is_probed(kind):
    torch.manual_seed(0)
    model, x = SumOfChannels(kind).eval(), torch.randn(2, 5, 4)
    graph = build_graph(model, x)
    assert not graph.group("a").proven
    assert probe_groups(model, x, graph, everything=False) == probe_groups(model, x, graph, everything=True)
    assert not build_safe_graph(model, x).group("a").prunable.any()


class GatedBySum(nn.Module):
    """A Linear's features summed: nothing follows them, so zeroed ones are 0 in the sum."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(F.gelu(self.a(x))).sum(-1)


def test_a_sum_over_channels_that_stay_zero_remains_prunable():
    torch.manual_seed(0)
    model, x = GatedBySum().eval(), torch.randn(2, 5, 4)
    assert not build_graph(model, x).group("b").proven
    assert build_safe_graph(model, x).group("b").prunable.any()
    _every_prunable_channel_matches_zeroing(model, x)


class PaddedFeatures(nn.Module):
    """A Linear's features padded by `mode` along the feature dim, then read by another Linear."""

    def __init__(self, mode: str):
        super().__init__()
        self.a, self.b, self.mode = nn.Linear(3, 8), nn.Linear(10, 2), mode

    def forward(self, x):
        return self.b(F.pad(self.a(x).unsqueeze(1), (1, 1), mode=self.mode).squeeze(1))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_that_copies_channels_fixes_them(mode):
    """reflect pads [c1, c0..c7, c6]: without c1 the same code pads with c2."""
    torch.manual_seed(0)
    model, x = PaddedFeatures(mode).eval(), torch.randn(2, 3)
    assert not build_graph(model, x).group("a").prunable.any()
    _every_prunable_channel_matches_zeroing(model, x)


def test_padding_with_a_constant_keeps_the_channels_prunable():
    torch.manual_seed(0)
    model, x = PaddedFeatures("constant").eval(), torch.randn(2, 3)
    assert build_graph(model, x).group("a").prunable.all()
    _every_prunable_channel_matches_zeroing(model, x)


class StackedFusion(nn.Module):
    """BiFPN-style fusion: branches stacked along a new dim and summed over it."""

    def __init__(self, how: str):
        super().__init__()
        self.a, self.b, self.c, self.how = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1), how

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.how == "first":
            return self.c(torch.stack([a, b], 0).sum(0))
        return self.c(torch.sum(torch.stack([0.3 * a, 0.7 * b], dim=-1), dim=-1))


@pytest.mark.parametrize("how", ["first", "last"])
def test_stacked_operands_are_pruned_together(how):
    torch.manual_seed(0)
    model, x = StackedFusion(how).eval(), torch.randn(2, 3, 4, 4)
    graph = build_graph(model, x)
    assert [(g.name, g.size) for g in graph.prunable_groups()] == [("a", 8)]
    assert {m.qualname for m in graph.group("a").members if m.role == "out"} == {"a.weight", "a.bias", "b.weight", "b.bias"}
    assert build_safe_graph(model, x).group("a").prunable.all()
    _every_prunable_channel_matches_zeroing(model, x)


class FeatureOp(nn.Module):
    """A Linear's features (B, L, 8) through `op`, then read by another Linear."""

    def __init__(self, op, width: int = 8):
        super().__init__()
        self.a, self.b, self.op = nn.Linear(3, 8), nn.Linear(width, 2), op

    def forward(self, x):
        return self.b(self.op(self.a(x)))


NUMPY_NAMES = {  # torch takes numpy's axis= and keepdims= for dim= and keepdim=
    "softmax_axis": (lambda t: t.softmax(axis=-1), 8),
    "log_softmax_axis": (lambda t: torch.log_softmax(t, axis=2), 8),
    "cumprod_axis": (lambda t: torch.sigmoid(t).cumprod(axis=-1), 8),
    "unbind_axis": (lambda t: t.unbind(axis=2)[5].unsqueeze(-1), 1),
}


@pytest.mark.parametrize("name", sorted(NUMPY_NAMES))
def test_a_channel_dim_given_as_axis_is_read(name):
    """x.softmax(axis=-1) normalises over the channels as x.softmax(dim=-1) does: they are fixed."""
    op, width = NUMPY_NAMES[name]
    torch.manual_seed(0)
    model, x = FeatureOp(op, width).eval(), torch.randn(2, 5, 3)
    assert not build_graph(model, x).group("a").prunable.any()
    _every_prunable_channel_matches_zeroing(model, x)


def test_reductions_over_other_dims_given_as_axis_keep_the_channels():
    torch.manual_seed(0)
    model, x = FeatureOp(lambda t: t * t.mean(axis=1, keepdims=True) + t.sum(axis=1, keepdims=True)).eval(), torch.randn(2, 5, 3)
    graph = build_graph(model, x)
    assert graph.group("a").prunable.all() and graph.group("a").proven
    _every_prunable_channel_matches_zeroing(model, x)


@pytest.mark.filterwarnings("ignore:Implicit dimension choice")
@pytest.mark.parametrize("rank", [2, 4])
def test_a_softmax_without_dim_fixes_the_channels_it_runs_over(rank):
    """nn.Softmax() and F.softmax(x) pick dim 1 for a 2-d or 4-d input (0 for 1-d and 3-d)."""
    torch.manual_seed(0)
    model, x = FeatureOp(nn.Softmax()).eval(), torch.randn(*[2] * (rank - 1), 3)
    over_the_channels = rank == 2  # (B, 8): dim 1 is the features; (B, 2, 2, 8): it is not
    assert build_graph(model, x).group("a").prunable.any() != over_the_channels
    _every_prunable_channel_matches_zeroing(model, x)


class OneChannelGate(nn.Module):
    """A stream times (or plus, or masked by) a one-channel map that broadcasts over its channels:
    out[:, c] = x[:, c] * a[:, 0], as in CBAM-style spatial attention."""

    def __init__(self, how: str):
        super().__init__()
        self.a, self.g, self.b, self.how = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 1, 1), nn.Conv2d(8, 4, 3), how

    def forward(self, x):
        x = torch.relu(self.a(x))
        gate = torch.sigmoid(self.g(x))
        y = {"mul": lambda: x * gate, "add": lambda: x + gate,
             "where": lambda: torch.where(gate > 0.5, x, -x)}[self.how]()
        return self.b(y)


@pytest.mark.parametrize("how", ["mul", "add", "where"])
def test_a_one_channel_map_broadcast_over_the_channels_couples_none_of_them(how):
    torch.manual_seed(0)
    model, x = OneChannelGate(how).eval(), torch.randn(2, 3, 6, 6)
    graph = build_graph(model, x)
    stream, gate = graph.group("a"), graph.group("g")
    assert stream.size == 8 and stream.prunable.all() and stream.proven  # not joined into one channel
    assert gate.size == 1 and not gate.prunable.any()  # the map's one channel stays
    _every_prunable_channel_matches_zeroing(model, x)


class SpatialAttention(nn.Module):
    """CBAM's spatial attention: a map from the channel mean and max gates the stream."""

    def __init__(self):
        super().__init__()
        self.a, self.g, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(2, 1, 7, padding=3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        x = self.a(x)
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return self.b(x * torch.sigmoid(self.g(pooled)))


def test_spatial_attention_keeps_the_stream_a_group_of_its_own_width():
    torch.manual_seed(0)
    model, x = SpatialAttention().eval(), torch.randn(2, 3, 6, 6)
    graph = build_graph(model, x)
    assert graph.group("a").size == 8 and graph.group("g").size == 1
    # the channel mean and max read every channel (removal changes them), so the stream is kept
    assert not graph.group("a").prunable.any()


class ScalarReshaped(nn.Module):
    """A 0-dim tensor (a total) reshaped to (1, 1) and broadcast against the output."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) * h.sum().reshape(1, 1)


def test_a_reshaped_zero_dim_tensor_traces():
    torch.manual_seed(0)
    model, x = ScalarReshaped(), torch.randn(3, 4)
    graph = build_graph(model, x)
    assert graph.group("a").size == 8 and not graph.group("a").proven  # the total sums the channels: probed
    _every_prunable_channel_matches_zeroing(model, x)


class ShapedLike(nn.Module):
    """A branch given the shape of another branch's output (view_as, reshape_as, expand_as), then
    concatenated with it."""

    def __init__(self, op):
        super().__init__()
        self.a, self.b, self.c, self.op = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(16, 2, 1), op

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return self.c(torch.cat([self.op(a, b), b], 1))


SHAPED_LIKE = {
    "view_as": lambda a, b: a.view_as(b),
    "reshape_as": lambda a, b: a.reshape_as(b),
    "expand_as": lambda a, b: a.mean((2, 3), keepdim=True).expand_as(b),
}


@pytest.mark.parametrize("name", sorted(SHAPED_LIKE))
def test_a_shape_taken_from_another_tensor_pairs_its_channels(name):
    """`a.view_as(b)` has b's shape, which loses a channel when b does: a's channels go with b's,
    position by position (pruned apart, the view fails)."""
    torch.manual_seed(0)
    model, x = ShapedLike(SHAPED_LIKE[name]).eval(), torch.randn(2, 3, 4, 4)
    graph = build_graph(model, x)
    assert [(g.name, g.size) for g in graph.prunable_groups()] == [("a", 8)]
    assert {m.qualname for m in graph.group("a").members if m.role == "out"} == {"a.weight", "a.bias", "b.weight", "b.bias"}
    _every_prunable_channel_matches_zeroing(model, x)



class FunctionalLayerNorm(nn.Module):
    """A LayerNorm written with F.layer_norm (nanoGPT's), or F.rms_norm, in a plain module."""

    def __init__(self, width: int, rms: bool):
        super().__init__()
        self.weight, self.rms = nn.Parameter(torch.ones(width) + 0.1 * torch.randn(width)), rms

    def forward(self, x):
        if self.rms:
            return F.rms_norm(x, self.weight.shape, self.weight)
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_a_functional_norm_over_the_channels_makes_the_group_inexact(rms):
    """The statistics over the channels change when one goes, whatever module makes the call."""
    from prunekit.surgery.verify import group_is_exact

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), FunctionalLayerNorm(8, rms), nn.Linear(8, 2)).eval()
    x = torch.randn(2, 5, 3)
    graph = build_graph(model, x)
    assert graph.group("0").prunable.all() and not group_is_exact(graph.group("0"), model)
    _every_prunable_channel_matches_zeroing(model, x)


class SizeReadOffAnother(nn.Module):
    """A LambdaLayer-style block: its output is given the channel count read off its input
    (`B, C, H, W = x.shape`, then `out.reshape(B, C, H, W)`), though its channels are its own
    (`carried`) or lost in a product of its channels with themselves (`opaque`)."""

    def __init__(self, how: str):
        super().__init__()
        self.a, self.v, self.b, self.how = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 2, 1), how

    def forward(self, x):
        x = self.a(x)
        B, C, H, W = x.shape
        v = self.v(x)
        if self.how == "opaque":
            t = v.flatten(2)
            return self.b((t @ t.transpose(1, 2)).reshape(B, C, 2, 1))  # (B, 4, 4) viewed as (B, 8, 2, 1)
        out = torch.cat([v, v], 2)  # (B, 4, 2H, W)
        return self.b(out.reshape(B, -1 if self.how == "inferred" else C, H, W))


# at side 4 the count read (8) is also the height of the view's input (2H)
@pytest.mark.parametrize("how, side", [("carried", 3), ("carried", 4), ("opaque", 3)])
def test_a_channel_count_read_off_another_tensor_sends_that_tensors_group_to_the_probe(how, side):
    """Without a channel of `a`, C is 7 and the reshape of the untouched output fails."""
    torch.manual_seed(0)
    model, x = SizeReadOffAnother(how).eval(), torch.randn(2, 3, side, side)
    assert not build_graph(model, x).group("a").proven
    assert not build_safe_graph(model, x).group("a").prunable.any()


def test_a_size_read_in_the_models_code_sends_the_group_to_the_probe_which_keeps_it_when_sound():
    """The count read may end up anywhere as a number (here nowhere that matters): the trace cannot
    vouch for the group, the probe finds removal equal to zeroing and keeps every channel prunable."""
    torch.manual_seed(0)
    model, x = SizeReadOffAnother("inferred").eval(), torch.randn(2, 3, 3, 3)
    assert not build_graph(model, x).group("a").proven
    assert build_safe_graph(model, x).group("a").prunable.all()
    _every_prunable_channel_matches_zeroing(model, x)


class _ScaledByWidth(nn.Module):
    """Attention-style scaling by a channel count read as a Python number, in five spellings."""

    def __init__(self, how: str):
        super().__init__()
        self.a, self.head, self.how = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1), how

    def forward(self, x):
        f = torch.relu(self.a(x))
        scale = {"shape": lambda: f.shape[1] ** -0.5, "size": lambda: 1 / f.size(1), "len": lambda: 1 / len(f[0]),
                 "numel": lambda: 1 / f.numel()}[self.how]()
        return self.head(f * scale)


@pytest.mark.parametrize("how", ["shape", "size", "len", "numel"])
def test_a_channel_count_used_as_a_number_is_never_pruned_silently_wrong(how):
    """Removing a channel changes the scale, so removal no longer equals zeroing: the group was
    proven and pruned (outputs off by 0.04 on a 0.26 scale); the probe now keeps it whole."""
    torch.manual_seed(0)
    model, x = _ScaledByWidth(how).eval(), torch.randn(2, 3, 6, 6)
    assert not build_graph(model, x).group("a").proven
    assert not build_safe_graph(model, x).group("a").prunable.any()


class PartialConv(nn.Module):
    """FasterNet's partial conv: a conv over a hard-coded piece of the channels, the rest passed
    on. `forward` is one of two methods, picked in __init__ and kept as an attribute."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.forward = self.forward_split_cat

    def forward_split_cat(self, x):
        x1, x2 = torch.split(x, [4, 4], dim=1)
        return torch.cat((self.conv(x1), x2), 1)


def test_a_forward_kept_as_a_bound_method_runs_on_the_pruned_copy():
    """Surgery works on copies of the modules: the copy's forward must read the copy's conv."""
    from prunekit.methods import prune_
    from prunekit.methods.magnitude import MagnitudeConfig

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, 8, 1), PartialConv(), nn.Conv2d(8, 2, 1)).eval(), torch.randn(2, 3, 4, 4)
    assert build_graph(model, x).group("1.conv").prunable.all()
    _every_prunable_channel_matches_zeroing(model, x)
    prune_(model, MagnitudeConfig(channel_ratio=0.5), x)
    assert model[1].conv.out_channels == 2 and model(x).shape == (2, 2, 4, 4)


class ComputedNormWeight(nn.Module):
    """A norm whose scale is computed in forward from a per-channel parameter (NFNet's
    ScaledStdConv2d: F.batch_norm(..., weight=(gain * scale).view(-1)))."""

    def __init__(self, op: str):
        super().__init__()
        self.a, self.b, self.op = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1), op
        self.gain = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        y = self.a(x)
        if self.op == "batch_norm":
            y = F.batch_norm(y, None, None, weight=self.gain * 2.0, bias=-self.gain, training=True)
        elif self.op == "group_norm":
            y = F.group_norm(y, y.shape[1] // 2, weight=self.gain * 2.0, bias=-self.gain)
        else:
            y = F.layer_norm(y.permute(0, 2, 3, 1), self.gain.shape, weight=self.gain * 2.0).permute(0, 3, 1, 2)
        return self.b(y)


@pytest.mark.parametrize("op", ["batch_norm", "group_norm", "layer_norm"])
def test_a_computed_norm_weight_goes_with_the_channels_it_scales(op):
    """Pruned apart from the channels, the weight no longer fits the norm's input."""
    torch.manual_seed(0)
    model, x = ComputedNormWeight(op).eval(), torch.randn(2, 3, 4, 4)
    graph = build_graph(model, x)
    assert [g.name for g in graph.prunable_groups()] == ["a"]
    assert "gain" in {m.qualname for m in graph.group("a").members}
    _every_prunable_channel_matches_zeroing(model, x)


class OwnLayerNorm(nn.Module):
    """A model's own LayerNorm holding its channel count (the official ConvNeXt's)."""

    def __init__(self, n: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(n) + 0.5), nn.Parameter(torch.rand(n))
        self.normalized_shape = (n,)

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias)


@pytest.mark.parametrize("norm", ["own", "torch"])
def test_a_functional_norm_whose_count_surgery_cannot_update_is_left_to_probing(norm):
    from prunekit.methods import prune_
    from prunekit.methods.magnitude import MagnitudeConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), OwnLayerNorm(16) if norm == "own" else nn.LayerNorm(16), nn.Linear(16, 3))
    x = torch.randn(2, 4)
    assert build_graph(model, x).group("0").proven == (norm == "torch")
    result = prune_(model, MagnitudeConfig(channel_ratio=0.5, round_to=None), x)  # the probe decides, no crash
    assert model[0].out_features == (16 if norm == "own" else 8)
    if norm == "own":
        assert "normalized_shape" in " ".join(result.metrics["notes"])


class FixedWidthOperand(nn.Module):
    """A stream meets a tensor whose width carries no channel ids but is fixed all the same: an
    einsum over a weight's rows (the weight's rows are no channels of the trace) or one value
    expanded to a hard-coded width. Pruned alone, the stream no longer fits it."""

    def __init__(self, how: str):
        super().__init__()
        self.a, self.b, self.how = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), how
        self.c, self.w = nn.Conv2d(8 if how == "stack" else 4, 2, 1), nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        b = self.b(x)
        fixed = (torch.einsum("nchw,dc->ndhw", self.a(x), self.w) if self.how != "expand" else
                 torch.ones(1, 1, 1, 1).expand(2, 4, 4, 4))
        if self.how == "cat":
            return self.c(torch.cat([fixed, b], 2))
        if self.how == "stack":
            return self.c(torch.stack([fixed, b], 2).flatten(1, 2))
        if self.how == "einsum_letter":
            return self.c(torch.einsum("nchw,nchw->nchw", fixed, b))
        if self.how == "sdpa":
            tokens = lambda t: t.flatten(2).transpose(1, 2)
            return self.c(F.scaled_dot_product_attention(tokens(fixed), tokens(b), tokens(b)).transpose(1, 2).view_as(b))
        return self.c(b * fixed)


@pytest.mark.parametrize("how", ["einsum", "expand", "cat", "stack", "einsum_letter", "sdpa"])
def test_a_stream_meeting_a_fixed_width_keeps_its_channels(how):
    torch.manual_seed(0)
    model, x = FixedWidthOperand(how).eval(), torch.randn(2, 3, 4, 4)
    assert not build_graph(model, x).group("b").prunable.any()
    _every_prunable_channel_matches_zeroing(model, x)


class BilinearHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c, self.bil, self.head = nn.Linear(6, 8), nn.Linear(6, 5), nn.Bilinear(8, 5, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bil(torch.relu(self.a(x)), torch.relu(self.c(x)))))


class TransposedDense(nn.Module):
    """GPT-2's Conv1D: weight stored (in, out), applied with torch.addmm(bias, x, weight)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.3)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


class AddmmNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = TransposedDense(6, 10), TransposedDense(10, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.relu(self.fc1(x)))))


class ScoresWithBias(nn.Module):
    """Attention scores as torch.baddbmm(mask, q, k^T): no channel rule can follow it; kept whole."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 5), nn.Linear(5, 2)
        self.register_buffer("mask", torch.zeros(1, 3, 3))

    def forward(self, x):  # x: (B, 3, 6)
        att = torch.baddbmm(self.mask.expand(x.shape[0], 3, 3), self.q(x), self.k(x).transpose(1, 2))
        return self.out(att.softmax(-1) @ self.v(x))


def test_bilinear_and_addmm_prune_exactly_and_count_their_macs():
    """nn.Bilinear: each input and the output are channel dims (linear in each input); addmm with
    a stored (in, out) weight is a Linear kept transposed. Removal equals zeroing, channel by
    channel, and the MACs equal a hand count."""
    from prunekit.cost.macs import count_cost
    from prunekit.methods import prune_
    from prunekit.methods.magnitude import MagnitudeConfig

    torch.manual_seed(0)
    x = torch.randn(4, 6)
    bil = BilinearHead()
    assert [g.name for g in build_graph(bil, x).prunable_groups()] == ["a", "c", "bil"]
    _every_prunable_channel_matches_zeroing(bil, x)
    assert count_cost(bil, x).macs == 6 * 8 + 6 * 5 + 8 * 5 * 7 + 7 * 3
    prune_(bil, MagnitudeConfig(channel_ratio=0.5, round_to=None), x)
    assert (bil.bil.in1_features, bil.bil.in2_features, bil.bil.out_features) == (4, 3, 4)  # round(0.5 x width) kept

    net = AddmmNet()
    assert sorted(g.name for g in build_graph(net, x).prunable_groups()) == ["fc1", "fc2"]
    _every_prunable_channel_matches_zeroing(net, x)
    assert count_cost(net, x).macs == 6 * 10 + 10 * 8 + 8 * 2


def test_a_batched_product_with_an_added_term_keeps_its_channels_and_counts_its_macs():
    torch.manual_seed(0)
    model, x = ScoresWithBias(), torch.randn(2, 3, 6)
    graph = build_graph(model, x)  # no UnsupportedOpError for baddbmm
    assert "q" not in [g.name for g in graph.prunable_groups()] and "k" not in [g.name for g in graph.prunable_groups()]
    _every_prunable_channel_matches_zeroing(model, x)
    from prunekit.cost.macs import count_cost
    per_sample = 3 * (6 * 4 * 2 + 6 * 5) + 3 * 3 * 4 + 3 * 5 * 3 + 3 * 5 * 2  # q,k,v; QK^T; AV; out
    assert count_cost(model, x).macs == per_sample


class _AddmmBias(nn.Module):
    def __init__(self, bias_shape, computed: bool):
        super().__init__()
        self.fc, self.w = nn.Linear(6, 8), nn.Parameter(torch.randn(8, 5) * 0.3)
        self.b = nn.Parameter(torch.randn(bias_shape) * 0.1)
        self.head, self.computed = nn.Linear(5, 2), computed

    def forward(self, x):
        bias = self.b * 2 if self.computed else self.b
        return self.head(torch.relu(torch.addmm(bias, torch.relu(self.fc(x)), self.w)))


@pytest.mark.parametrize("bias_shape, computed", [((1,), False), ((), True), ((5,), True), ((1, 5), True),
                                                  ((4, 5), False)])
def test_addmm_with_a_broadcast_scalar_or_computed_bias_prunes_exactly(bias_shape, computed):
    torch.manual_seed(0)
    model, x = _AddmmBias(bias_shape, computed), torch.randn(4, 6)
    _every_prunable_channel_matches_zeroing(model, x)
    from prunekit.methods import prune_
    from prunekit.methods.magnitude import MagnitudeConfig
    prune_(model, MagnitudeConfig(channel_ratio=0.5, round_to=None), x)  # runs and verifies


def test_bilinear_with_a_computed_bias_ties_its_channels_to_the_outputs():
    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bil, self.extra, self.head = nn.Linear(6, 8), nn.Bilinear(8, 8, 5), nn.Linear(6, 5), nn.Linear(5, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            out = F.bilinear(h, h, self.bil.weight, self.bil.bias * self.extra(x).mean(0))
            return self.head(torch.relu(out))

    torch.manual_seed(0)
    model, x = Computed(), torch.randn(4, 6)
    _every_prunable_channel_matches_zeroing(model, x)
