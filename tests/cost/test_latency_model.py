"""Latency estimates from per-layer tables: widths match the pruned model; tables cover norms."""
import torch
from torch import nn

from prunekit.cost.latency import LatencyConfig
from prunekit.cost.latency_model import LatencyModel
from prunekit.cost.lut import LayerSpec, build_conv_lut
from prunekit.graph import build_graph
from prunekit.surgery.copying import share_copy
from prunekit.surgery.shrink import remove_channels_

FAST = LatencyConfig(warmup=1, repeats=3, threads=1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c2, self.b2 = nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24)
        self.ln, self.fc = nn.LayerNorm(24), nn.Linear(24, 5)

    def forward(self, x):
        x = self.c2(self.dw(self.b1(self.c1(x)).relu()))
        x = self.b2(x).relu().mean((2, 3))
        return self.fc(self.ln(x))


def test_widths_equal_the_pruned_model():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(1, 3, 8, 8)
    graph = build_graph(model, x)
    est = LatencyModel(model, graph, x, FAST, grid_steps=2)
    assert {spec.kind for _, spec, _ in est.layers} == {"conv2d", "batchnorm2d", "layernorm", "linear"}
    groups = {g.members[0].module: g for g in graph.prunable_groups()}
    removal = {groups["c1"].name: [0, 3, 5], groups["c2"].name: list(range(0, 24, 3))}
    pruned = share_copy(model)
    remove_channels_(pruned, graph, removal)
    mods = dict(pruned.named_modules())
    for (name, spec, _), (c_in, c_out) in zip(est.layers, est.widths(removal)):
        m = mods[name]
        if isinstance(m, nn.Conv2d):
            assert (m.in_channels if m.groups == 1 else m.out_channels, m.out_channels) == (c_in, c_out), name
        elif isinstance(m, nn.Linear):
            assert (m.in_features, m.out_features) == (c_in, c_out), name
        else:
            width = m.num_features if isinstance(m, nn.BatchNorm2d) else m.normalized_shape[0]
            assert width == c_out == c_in, name
    assert est({}) == est.measured_ms
    assert 0 < est(removal) <= est.measured_ms


def test_norm_tables_are_one_axis_and_round_trip(tmp_path):
    for mod, hw in ((nn.BatchNorm2d(8), (4, 4)), (nn.LayerNorm(8), (5, 1))):
        spec = LayerSpec.from_module(mod, hw)
        table = build_conv_lut(spec, [4, 8], FAST)
        assert table.depthwise and len(table.values_ms) == 2
        assert table.lookup(8) == table.values_ms[1][0]
        path = table.save(tmp_path / f"{spec.kind}.json")
        assert type(table).load(path) == table


def test_tuple_example_inputs_are_timed_at_the_tables_batch(monkeypatch):
    """The whole model and its layer tables are timed at LatencyConfig.batch_size whether the
    example is a tensor or a tuple of tensors (a tuple was timed at the example's own batch)."""
    import prunekit.cost.latency_model as lm

    batches = []
    real = lm.measure_latency

    def measure(model, inputs, cfg=None):
        result = real(model, inputs, cfg)
        if not isinstance(model, nn.ReLU):  # the call-overhead probe is timed at batch 1 on purpose
            batches.append(result.batch)
        return result
    monkeypatch.setattr(lm, "measure_latency", measure)
    m = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
    x = torch.randn(2, 8, 16, 16)
    cfg = LatencyConfig(warmup=1, repeats=2, threads=1, batch_size=5)
    for example in (x, (x,)):
        lm.LatencyModel(m, build_graph(m, x), example, cfg, grid_steps=2)
    assert batches == [5, 5]
    assert [t.shape[0] for t in lm.per_sample_inputs((x, x[:, :1]), 5)] == [5, 5]


class _Tokens(nn.Module):
    """Token ids -> embedding -> MLP: the example input is an integer tensor."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Embedding(50, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, ids):
        return self.fc2(self.fc1(self.emb(ids)).relu()).mean(1)


def test_integer_example_inputs_keep_their_values():
    """Token ids are timed as token ids (repeated to the batch), not replaced by random floats."""
    from prunekit.cost.latency_model import per_sample_inputs

    ids = torch.randint(0, 50, (2, 6))
    timed = per_sample_inputs(ids, 5)
    assert isinstance(timed, tuple) and len(timed) == 1
    assert timed[0].dtype == ids.dtype and timed[0].shape == (5, 6)
    assert torch.equal(timed[0][:2], ids) and torch.equal(timed[0][2:4], ids)
    model = _Tokens()
    est = LatencyModel(model, build_graph(model, ids), ids, FAST, grid_steps=2)
    assert est.measured_ms > 0 and {spec.kind for _, spec, _ in est.layers} == {"linear"}


class _MaskedAttention(nn.Module):
    """Self-attention with a (tokens, tokens) mask passed next to the batch."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.out = nn.Linear(32, 4)

    def forward(self, x, mask):
        h = self.inp(x)
        return self.out(self.attn(h, h, h, attn_mask=mask, need_weights=False)[0])


def test_inputs_without_the_batch_dim_are_passed_whole():
    """A shared mask whose first size is not the batch is not cut to one sample when the layer
    inputs are read (nn.MultiheadAttention rejects a (1, tokens) mask)."""
    from prunekit.cost.latency_model import _input_grids

    model, x, mask = _MaskedAttention(), torch.randn(2, 5, 8), torch.zeros(5, 5)
    grids = _input_grids(model, (x, mask))
    assert grids["inp"] == (5, 1) and grids["attn"] == (5, 1) and grids["out"] == (5, 1)
    est = LatencyModel(model, build_graph(model, (x, mask)), (x, mask), FAST, grid_steps=2)
    assert {spec.kind for _, spec, _ in est.layers} == {"linear", "attention"}


def test_list_example_inputs_are_timed_at_the_tables_batch(monkeypatch):
    """A list of tensors (prune_ takes one like a tuple) was timed at the example's own batch."""
    import prunekit.cost.latency_model as lm

    batches, real = [], lm.measure_latency

    def measure(model, inputs, cfg=None):
        result = real(model, inputs, cfg)
        if not isinstance(model, nn.ReLU):
            batches.append(result.batch)
        return result
    monkeypatch.setattr(lm, "measure_latency", measure)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(2, 16)
    lm.LatencyModel(m, build_graph(m, x), [x], LatencyConfig(warmup=1, repeats=1, threads=1, batch_size=5),
                    grid_steps=2)
    assert batches == [5]
    assert [t.shape[0] for t in lm.per_sample_inputs([x], 5)] == [5]


def test_inputs_are_brought_to_the_table_batch_when_a_scalar_comes_first():
    from prunekit.cost.latency_model import per_sample_inputs
    scale, x = torch.tensor(2.0), torch.randn(3, 5)
    out = per_sample_inputs((scale, x), batch_size=8)
    assert out[0] is scale and out[1].shape == (8, 5)
    assert torch.equal(out[1][3], x[0])
