"""MACs and parameters from the traced graph against hand counts."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from prunekit.cost.macs import count_cost, estimate_cost
from prunekit.graph import build_graph
from prunekit.models import create_model
from prunekit.testing.checks import random_removal
from prunekit.testing.toy_models import TOY_MODELS


def conv_macs(cin, cout, k, hw, groups=1):
    return cout * (cin // groups) * k * k * hw * hw


def resnet_cifar_macs(depth, shortcut):
    """Hand count: stem, 3 stages of (depth-2)/6 basic blocks, downsampling shortcuts, fc."""
    n = (depth - 2) // 6
    total = conv_macs(3, 16, 3, 32)
    cin = 16
    for width, hw in ((16, 32), (32, 16), (64, 8)):
        for b in range(n):
            total += conv_macs(cin, width, 3, hw) + conv_macs(width, width, 3, hw)
            if cin != width and shortcut == "projection":
                total += conv_macs(cin, width, 1, hw)
            cin = width
    return total + 64 * 10


@pytest.mark.parametrize("shortcut", ["projection", "zeropad"])
def test_resnet56_cifar_hand_count(shortcut):
    model = create_model("resnet56", num_classes=10, shortcut=shortcut)
    cost = count_cost(model, torch.randn(1, 3, 32, 32))
    assert cost.macs == resnet_cifar_macs(56, shortcut)
    assert cost.params == sum(p.numel() for p in model.parameters())
    if shortcut == "zeropad":  # the figure the literature quotes for ResNet-56 (option A)
        assert round(cost.macs / 1e6, 2) == 125.49


def test_macs_are_per_sample():
    model = create_model("resnet20", num_classes=10)
    one = count_cost(model, torch.randn(1, 3, 32, 32)).macs
    assert count_cost(model, torch.randn(4, 3, 32, 32)).macs == one


def test_grouped_transposed_linear_attention_hand_count():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.gc = nn.Conv2d(8, 16, 1, groups=4)
            self.up = nn.ConvTranspose2d(16, 6, 3, stride=2, groups=2)  # 4x4 -> 9x9: in and out pixels differ
            self.q, self.k, self.v = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(6, 5)

        def forward(self, x):
            x = self.up(self.gc(self.dw(x)))  # (B, 6, 9, 9)
            t = x.flatten(2).transpose(1, 2)  # (B, 81 tokens, 6)
            a = torch.softmax(self.q(t) @ self.k(t).transpose(1, 2), -1)  # (B, 81, 81)
            return a @ self.v(t)

    cost = count_cost(Net(), torch.randn(2, 8, 4, 4))
    hand = (8 * 1 * 9 * 16          # depthwise 3x3 at 4x4
            + 16 * 2 * 1 * 16       # grouped 1x1: each output sees 8/4 inputs
            + 16 * 16 * 3 * 3 * 3   # transposed conv: each of the 16x16 input values meets (6/2)*3*3 weights
            + 3 * 81 * 6 * 5        # q, k, v projections over 81 tokens
            + 81 * 81 * 5           # QK^T
            + 81 * 81 * 5)          # AV
    assert cost.macs == hand


@pytest.mark.parametrize("name", sorted(TOY_MODELS))
def test_estimate_matches_count_after_removal(name):
    build, make_input = TOY_MODELS[name]
    model, x = build().eval(), make_input()
    graph = build_graph(model, x)
    removal = random_removal(graph, 0.4, torch.Generator().manual_seed(0))
    params, macs = estimate_cost(model, graph, removal)
    from prunekit.surgery.shrink import remove_channels_
    remove_channels_(model, graph, removal)
    after = count_cost(model, x)
    assert params == after.params
    assert macs == after.macs


def _torchvision():
    tools = Path(__file__).resolve().parents[2].parent / "shared" / "tools"
    if tools.exists() and str(tools) not in sys.path:
        sys.path.insert(0, str(tools))
    try:
        import torchvision_cpu  # noqa: F401
    except ImportError:
        pass
    return pytest.importorskip("torchvision.models", reason="torchvision is not installed")


def test_torchvision_resnet50_hand_count():
    tvm = _torchvision()
    model = tvm.resnet50(weights=None)
    cost = count_cost(model, torch.randn(1, 3, 224, 224))
    hand = conv_macs(3, 64, 7, 112)
    cin, hw = 64, 56
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            out_hw = hw // stride if b == 0 else hw
            hand += conv_macs(cin, width, 1, hw)             # 1x1 reduce (at input resolution)
            hand += conv_macs(width, width, 3, out_hw)       # 3x3 (stride here, torchvision v1.5)
            hand += conv_macs(width, width * 4, 1, out_hw)   # 1x1 expand
            if b == 0:
                hand += conv_macs(cin, width * 4, 1, out_hw)  # downsample projection
            cin, hw = width * 4, out_hw
    hand += 2048 * 1000
    assert cost.macs == hand == 4_089_184_256
    assert cost.params == 25_557_032


@pytest.mark.parametrize("name", sorted(TOY_MODELS))
@pytest.mark.parametrize("steps", [1, 2])
def test_reported_cost_after_pruning_equals_a_recount(name, steps):
    """prune_ reports the pruned cost from the graph it already has (no second trace): it must
    equal tracing and counting the pruned model, totals and per-module table alike."""
    from prunekit.methods import prune_
    from prunekit.methods.magnitude import MagnitudeConfig

    build, make_input = TOY_MODELS[name]
    torch.manual_seed(0)
    model, x = build(), make_input()
    result = prune_(model, MagnitudeConfig(channel_ratio=0.5, steps=steps), x)
    recount = count_cost(model, x)
    assert (result.cost_after.params, result.cost_after.macs) == (recount.params, recount.macs)
    assert result.cost_after.per_module == recount.per_module


def test_ignored_modules_are_still_counted():
    """Ignoring a layer keeps its channels; its MACs still count (same totals as without ignore)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    x = torch.randn(2, 3, 8, 8)
    plain, ignored = build_graph(model, x), build_graph(model, x, ignore=["3"])
    from prunekit.cost.macs import cost_from_graph
    assert cost_from_graph(model, ignored).macs == cost_from_graph(model, plain).macs == 8 * 36 * 27 + 288 * 4
    assert not ignored.prunable_groups()  # the conv feeds the ignored Linear: fixed


def test_convs_and_linears_with_computed_weights_are_counted():
    """Weight standardisation computes the conv weight in forward: channels stay fixed, MACs count."""
    import torch.nn.functional as F

    class StdConv(nn.Conv2d):
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return F.linear(x, self.weight * 0.5, self.bias)

    model = nn.Sequential(StdConv(3, 8, 3), nn.Flatten(), ScaledLinear(8 * 6 * 6, 4))
    graph = build_graph(model, torch.randn(2, 3, 8, 8))
    assert not graph.prunable_groups()
    assert count_cost(model, torch.randn(2, 3, 8, 8)).macs == 8 * 36 * 27 + 288 * 4


@pytest.mark.parametrize("name", sorted(TOY_MODELS))
def test_estimate_by_counts_equals_the_position_by_position_reading(name):
    """Where the estimator reads removals from their counts alone, it gives what marking every
    dead position gives, on many random removals (and on the graphs where it cannot, it reads
    positions: concat, attention products)."""
    from prunekit.cost.macs import CostEstimator, per_sample
    build, make_input = TOY_MODELS[name]
    model, x = build().eval(), make_input()
    graph = build_graph(model, x)
    est = CostEstimator(model, graph)
    plan = est._count_plan()
    gen = torch.Generator().manual_seed(1)
    for fraction in (0.1, 0.3, 0.5, 0.8):
        removal = random_removal(graph, fraction, gen)
        dead = est._dead(removal)
        scale = est._param_scale(dead)
        by_position = (int(torch.tensor(est._numel * scale[: len(est._numel)]).round().sum()),
                       per_sample(int(est._node_array(removal, dead, scale).sum()), max(graph.batch, 1)))
        assert est(removal) == by_position
        assert est({k: list(reversed(v)) for k, v in removal.items()}) == by_position  # order does not matter
    if name in ("concat", "transformer_mha", "attention_heads", "linear_attention"):
        assert plan is None  # a member across groups, or attention products counted by position
    elif name in ("residual_projection", "convnext", "mobilenet", "norms"):
        assert plan is not None


def test_estimate_cost_and_cost_after_ignore_repeated_indices():
    from prunekit.cost.macs import CostEstimator, cost_after
    from prunekit.core.errors import ConfigError
    from prunekit.surgery.shrink import remove_channels_
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))
    x = torch.randn(1, 3, 6, 6)
    graph = build_graph(model, x)
    assert estimate_cost(model, graph, {"0": [1, 1, 5, 5, 5]}) == estimate_cost(model, graph, {"0": [1, 5]})
    est = CostEstimator(model, graph)
    assert est({"0": [5, 1, 1]}) == est.of_distinct({"0": [1, 5]})
    assert est({"0": [], "no such group": []}) == est({})  # nothing named, nothing looked up
    for bad in ([1, 8], [-1, 7]):
        with pytest.raises(ConfigError, match="has 8 channels"):
            est({"0": bad})
    graph.groups[0].name = "renamed"  # names are read again when one is not found
    assert est({"renamed": [1, 5]}) == estimate_cost(model, graph, {"renamed": [1, 5]})
    graph.groups[0].name = "0"
    remove_channels_(model, graph, {"0": [1, 1, 5]})
    after = cost_after(model, graph, {"0": [5, 1, 1]})
    assert (after.params, after.macs) == (count_cost(model, x).params, count_cost(model, x).macs)


def test_a_parameter_registered_twice_in_one_module_is_counted_once():
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.lin.register_parameter("alias", self.lin.weight)

        def forward(self, x):
            return self.lin(x)
    cost = count_cost(Aliased(), torch.randn(2, 3))
    assert cost.params == 16 and cost.per_module["lin"]["params"] == 16  # 12 weights + 4 biases


def test_a_masked_layer_counts_its_stored_weight_in_its_own_row():
    from prunekit.surgery.masks import apply_mask

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    x = torch.randn(2, 3, 4, 4)
    dense = count_cost(model, x)
    apply_mask(model[0], "weight", torch.rand_like(model[0].weight) > 0.5)  # the weight moves under parametrizations
    masked = count_cost(model, x)
    assert masked.params == dense.params and masked.per_module == dense.per_module
    assert masked.per_module["0"]["params"] == 8 * 3 * 9  # the report's per-layer row, not 0


class _EinsumNet(nn.Module):
    """Attention written with einsum (q.k and a.v), and an output projection as an einsum with
    a raw weight."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 8)
        self.w = nn.Parameter(torch.randn(3, 8))

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)  # (B, 5 tokens, 8)
        a = torch.softmax(torch.einsum("bid,bjd->bij", q, k), -1)  # (B, 5, 5)
        h = torch.einsum("bij,bjd->bid", a, v)
        return torch.einsum("btd,od->bto", h, self.w)


def test_einsum_products_are_counted_like_matmul():
    model, x = _EinsumNet().eval(), torch.randn(2, 5, 6)
    hand = (3 * 5 * 6 * 8  # q, k, v projections over 5 tokens
            + 5 * 5 * 8    # q.k
            + 5 * 5 * 8    # a.v
            + 5 * 8 * 3)   # the einsum projection
    assert count_cost(model, x).macs == hand


class _EinsumDot(nn.Module):
    """A dot product of two ReLU features as an einsum: their channels stay prunable."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(4, 8)

    def forward(self, x):  # x: (1, 4)
        x = x[0]
        return torch.einsum("c,c->", self.a(x).relu(), self.b(x).relu())


def test_einsum_macs_shrink_with_the_channels_it_sums():
    from prunekit.surgery.shrink import remove_channels_
    from prunekit.surgery.verify import build_safe_graph

    torch.manual_seed(0)
    model, x = _EinsumDot().eval(), torch.randn(1, 4)
    assert count_cost(model, x).macs == 2 * 4 * 8 + 8
    graph = build_safe_graph(model, x)
    group = next(g for g in graph.prunable_groups() if g.size == 8)
    removal = {group.name: [0, 2, 5]}
    params, macs = estimate_cost(model, graph, removal)
    remove_channels_(model, graph, removal)
    assert (params, macs) == (count_cost(model, x).params, 2 * 4 * 5 + 5)


class _Attention(nn.Module):
    """nn.MultiheadAttention on a token stream (B, 5 tokens, 8 features), 2 heads."""

    def __init__(self, **kw):
        super().__init__()
        self.a = nn.MultiheadAttention(8, 2, batch_first=True, **kw)

    def forward(self, x):
        return self.a(x, x, x)[0]


_ATTENTION_MACS = 4 * 5 * 8 * 8 + 2 * 5 * 5 * 8  # q, k, v, out projections; QK^T and AV over 5 keys


def test_attention_with_a_masked_projection_is_still_counted():
    """A mask makes the out-projection weight a computed tensor: the heads stay, the MACs count."""
    from prunekit.surgery.masks import apply_mask

    model, x = _Attention().eval(), torch.randn(2, 5, 8)
    assert count_cost(model, x).macs == _ATTENTION_MACS
    apply_mask(model.a.out_proj, "weight", torch.rand(8, 8) > 0.5)
    assert count_cost(model, x).macs == _ATTENTION_MACS


@pytest.mark.parametrize("extra", [{"add_bias_kv": True}, {"add_zero_attn": True}])
def test_attention_counts_the_key_that_bias_kv_and_zero_attn_append(extra):
    """add_bias_kv and add_zero_attn each append one key (and value): QK^T and AV run over 6 keys."""
    cost = count_cost(_Attention(**extra).eval(), torch.randn(2, 5, 8))
    assert cost.macs == 4 * 5 * 8 * 8 + 2 * 5 * 6 * 8


def test_a_conv_on_an_unbatched_input_is_counted():
    """A conv run on each sample alone (a 3-D input to Conv2d) counts its MACs like a batched one."""
    class PerSample(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.stack([self.conv(s) for s in x])

    assert count_cost(PerSample(), torch.randn(2, 3, 5, 5)).macs == 4 * 9 * 3 * 9


@pytest.mark.parametrize("inputs", [lambda x, s: {"scale": s, "x": x}, lambda x, s: (s, x)], ids=["dict", "tuple"])
def test_macs_are_per_sample_when_a_scalar_input_comes_first(inputs):
    """The batch is read from the first input that has one, not from a scalar given before it."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, scale, x):
            return self.lin(x) * scale

    assert count_cost(Scaled(), inputs(torch.randn(4, 5), torch.tensor(2.0))).macs == 5 * 3


class _SeqFirstEncoder(nn.Module):
    """A sequence-first Transformer layer (PyTorch's default batch_first=False) on (L, N, E)."""
    def __init__(self, batch_first: bool = False):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(16, 3)
        self.batch_first = batch_first

    def forward(self, x):
        return self.head(self.enc(x).mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("batch_first", [False, True])
def test_macs_are_per_sample_for_sequence_first_inputs(batch, batch_first):
    """(L, N, E) inputs are divided by N, not by L: the same hand count at every batch, either layout.
    L=10, E=16, FFN 32, 3 classes: q/k/v/out projections 4*L*E*E, QK^T and AV 2*L*L*E, the FFN
    2*L*E*32, the head E*3 (after the mean over tokens)."""
    torch.manual_seed(0)
    model = _SeqFirstEncoder(batch_first).eval()
    x = torch.randn(batch, 10, 16) if batch_first else torch.randn(10, batch, 16)
    L, E = 10, 16
    assert count_cost(model, x).macs == 4 * L * E * E + 2 * L * L * E + 2 * L * E * 32 + E * 3


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", ["seq_first", "batch_first", "packed"])
def test_macs_of_an_lstm_are_per_sample_in_every_layout(batch, layout):
    """nn.LSTM(8, 4) over 6 steps: 6 * (4*4*8 + 4*4*4) MACs per sample, then a Linear(4, 2)."""
    from torch.nn.utils.rnn import pack_padded_sequence

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(8, 4, batch_first=layout != "seq_first")
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            if layout == "packed":
                x = pack_padded_sequence(x, torch.full((x.shape[0],), 6), batch_first=True)
            return self.head(self.rnn(x)[1][0][-1])

    x = torch.randn(6, batch, 8) if layout == "seq_first" else torch.randn(batch, 6, 8)
    assert count_cost(Recurrent(), x).macs == 6 * (16 * 8 + 16 * 4) + 4 * 2


def test_a_batch_first_model_whose_first_rnn_runs_on_more_sequences_than_samples_keeps_dim_0():
    """A hierarchical model: a word GRU over the N*S sentences of W words, then a sentence GRU. At
    N=1 its input (1, S, W, 8) must not be read as sequence-first because the word GRU's batch S
    is the input's dim 1 (the count was divided by S)."""
    class Hierarchical(nn.Module):
        def __init__(self):
            super().__init__()
            self.words, self.sents, self.head = nn.GRU(8, 6, batch_first=True), nn.GRU(6, 4, batch_first=True), \
                nn.Linear(4, 2)

        def forward(self, x):
            n, s, w, e = x.shape
            h = self.words(x.reshape(n * s, w, e))[1][-1].reshape(n, s, -1)
            return self.head(self.sents(h)[1][-1])

    counts = {n: count_cost(Hierarchical(), torch.randn(n, 5, 7, 8)).macs for n in (1, 2, 3)}
    assert len(set(counts.values())) == 1, counts
    assert counts[1] == 5 * 7 * (3 * 6 * 8 + 3 * 6 * 6) + 5 * (3 * 4 * 6 + 3 * 4 * 4) + 4 * 2


class _Attend(nn.Module):
    def __init__(self, packed: bool = True):
        super().__init__()
        kv = {} if packed else {"kdim": 12, "vdim": 20}
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True, **kv)
        self.head = nn.Linear(16, 4)
        self.packed = packed

    def forward(self, x, y):
        if self.packed:  # self-attention
            return self.head(self.attn(x, x, x, need_weights=False)[0])
        return self.head(self.attn(x, y[..., :12], y, need_weights=False)[0])  # keys 12 wide, values 20


@pytest.mark.parametrize("packed", [True, False])
def test_nonzero_macs_of_masked_attention_equal_a_hand_count(packed):
    """q/k/v projections scale by their own rows' density, the out-projection by its weight's,
    the attention products not at all; a Linear by its weight's density."""
    from prunekit.cost.macs import nonzero_macs
    from prunekit.surgery.masks import apply_mask, unstructured_mask

    torch.manual_seed(0)
    model = _Attend(packed)
    L, S = 5, 7
    x, y = torch.randn(1, L, 16), torch.randn(1, S, 20)
    if packed:
        S = L
    a = model.attn
    names = ["in_proj_weight"] if packed else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    for i, name in enumerate(names):
        apply_mask(a, name, unstructured_mask(getattr(a, name), 0.3 + 0.1 * i))
    apply_mask(a.out_proj, "weight", unstructured_mask(a.out_proj.weight, 0.75))
    apply_mask(model.head, "weight", unstructured_mask(model.head.weight, 0.5))
    kept = lambda w: int((w != 0).sum())
    if packed:
        w = a.in_proj_weight
        q, k, v = kept(w[:16]) * L, kept(w[16:32]) * S, kept(w[32:]) * S
    else:
        q, k, v = kept(a.q_proj_weight) * L, kept(a.k_proj_weight) * S, kept(a.v_proj_weight) * S
    products = 2 * L * S * 16  # QK^T and AV over all heads
    expected = q + k + v + kept(a.out_proj.weight) * L + products + kept(model.head.weight) * L
    assert nonzero_macs(model, build_graph(model, (x, y))) == expected
    assert count_cost(model, (x, y)).macs > expected  # the dense count is unchanged by masks


class _MatmulLinear(nn.Linear):
    """A Linear whose forward is its own matmul: with a masked weight the op names no parameter."""

    def forward(self, x):
        return torch.matmul(x, self.weight.t()) + self.bias


def test_nonzero_macs_of_a_masked_layer_with_its_own_matmul_use_its_weight_density():
    from prunekit.cost.macs import nonzero_macs
    from prunekit.surgery.masks import apply_mask, unstructured_mask

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), _MatmulLinear(32, 32), nn.Linear(32, 4))
    for layer in model:
        apply_mask(layer, "weight", unstructured_mask(layer.weight, 0.9))
    x = torch.randn(2, 16)
    expected = sum(int((layer.weight != 0).sum()) for layer in model)  # one position per sample
    assert nonzero_macs(model, build_graph(model, x)) == expected


@pytest.mark.parametrize("kind", ["attention", "lstm"])
def test_an_unbatched_sequence_input_is_one_sample(kind):
    """A sequence op called on an unbatched (L, E) input (no batch dim) sees one sample: its MACs
    are not divided by L. Hand counts: attention 4*L*E*E + 2*L*L*E; LSTM L * (4*H*E + 4*H*H)."""
    L, E, H = 7, 8, 4

    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.MultiheadAttention(E, 2) if kind == "attention" else nn.LSTM(E, H)

        def forward(self, x):
            return self.seq(x, x, x, need_weights=False)[0] if kind == "attention" else self.seq(x)[0]

    want = 4 * L * E * E + 2 * L * L * E if kind == "attention" else L * (4 * H * E + 4 * H * H)
    assert count_cost(Unbatched().eval(), torch.randn(L, E)).macs == want


def test_a_batch_as_long_as_the_sequence_each_sample_runs_is_still_a_batch():
    """A batch-first model running an unbatched LSTM on each sample of (N, L, E): at N == L the
    input is a batch of N, not one unbatched sequence. Hand count L*(4*4*6 + 4*4*4) + 4*3."""
    class PerSample(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.fc = nn.LSTM(6, 4), nn.Linear(4, 3)

        def forward(self, x):
            return torch.stack([self.fc(self.lstm(s)[0][-1]) for s in x])

    counts = {n: count_cost(PerSample(), torch.randn(n, 8, 6)).macs for n in (4, 8)}
    assert counts == {4: 8 * (96 + 64) + 12, 8: 8 * (96 + 64) + 12}


class _TopLevelMatmul(nn.Module):
    """The model itself holds the weight its forward multiplies with (no submodule owns it)."""

    def __init__(self):
        super().__init__()
        self.stem, self.W, self.head = nn.Conv2d(3, 32, 3, padding=1), nn.Parameter(torch.randn(32, 16) * .1), \
            nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(self.stem(x)).flatten(2).transpose(1, 2) @ self.W)


class _TopLevelConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.w, self.head = nn.Conv2d(3, 32, 3, padding=1), nn.Parameter(torch.randn(16, 32, 3, 3) * .1), \
            nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(torch.nn.functional.conv2d(torch.relu(self.stem(x)), self.w, padding=1))


@pytest.mark.parametrize("build", [_TopLevelMatmul, _TopLevelConv])
def test_a_weight_of_the_model_itself_is_counted_after_pruning(build):
    """Its node named the weight ".W", which no parameter is called: the estimate kept its MACs whole
    (0.498 of the MACs reported for 0.162 counted), and a conv's made the target look impossible."""
    from prunekit import MagnitudeConfig, prune_

    torch.manual_seed(0)
    model, x = build(), torch.randn(1, 3, 16, 16)
    result = prune_(model, MagnitudeConfig(macs_fraction=0.5, round_to=None), x)
    assert result.cost_after.macs == count_cost(model, x).macs
    assert 0.45 <= result.cost_after.macs / result.cost_before.macs <= 0.5


def test_counting_a_model_over_an_op_without_a_rule_names_count_costs_ignore():
    """pixel_shuffle has no channel rule: the count's error named the pruning's way out only."""
    from prunekit.core.errors import UnsupportedOpError

    class Upscale(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 12, 3, padding=1)

        def forward(self, x):
            return torch.nn.functional.pixel_shuffle(self.b(torch.relu(self.a(x))), 2)

    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(UnsupportedOpError, match=r"pass that ignore list to count_cost too"):
        count_cost(Upscale(), x)
    assert count_cost(Upscale(), x, ["b"]).macs == 36 * (3 * 9 * 8 + 8 * 9 * 12)
