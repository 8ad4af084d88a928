"""Latency lookup tables: grid build, bilinear interpolation, gradients, JSON round trip."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from prunekit.core.errors import CheckpointError, ConfigError
from prunekit.cost.latency import LatencyConfig
from prunekit.cost.lut import LatencyTable, LayerSpec, build_conv_lut, channel_grid

FAST = LatencyConfig(warmup=1, repeats=3, threads=1)  # one thread: see test_more_channels_measure_slower
IN, OUT = [8, 16, 32], [4, 8, 20]


def _f(i: float, o: float) -> float:
    # Bilinear in (i, o): interpolation over any grid reproduces it exactly.
    return 0.5 + 0.1 * i + 0.02 * o + 0.003 * i * o


def _table(in_counts=IN, out_counts=OUT, values=None) -> LatencyTable:
    if values is None:
        values = [[_f(i, o) for o in out_counts] for i in in_counts]
    spec = LayerSpec(kind="conv2d", in_channels=8, out_channels=8).to_dict()
    return LatencyTable(spec=spec, in_counts=list(in_counts), out_counts=list(out_counts), values_ms=values,
                        device="cpu", device_name="test", dtype="float32", batch=1, torch_version=torch.__version__,
                        settings={})


def test_lookup_hits_grid_points_exactly():
    t = _table()
    for a, i in enumerate(IN):
        for b, o in enumerate(OUT):
            assert t.lookup(i, o) == pytest.approx(t.values_ms[a][b], abs=1e-12)


@pytest.mark.parametrize("i, o", [(12, 6), (9.5, 19), (31, 4.5), (20, 8), (16, 13)])
def test_lookup_is_bilinear_between_grid_points(i, o):
    assert _table().lookup(i, o) == pytest.approx(_f(i, o), abs=1e-12)


def test_lookup_by_hand_on_one_cell():
    # Cell corners (8,4)=1, (8,8)=3, (16,4)=5, (16,8)=11; at (12, 5): in-fraction 0.5, out-fraction 0.25.
    t = _table([8, 16], [4, 8], [[1.0, 3.0], [5.0, 11.0]])
    expected = 0.5 * 0.75 * 1.0 + 0.5 * 0.25 * 3.0 + 0.5 * 0.75 * 5.0 + 0.5 * 0.25 * 11.0
    assert t.lookup(12, 5) == pytest.approx(expected)  # 4.25


def test_outside_grid_clamps_or_raises_when_strict():
    t = _table()
    assert t.lookup(2, 1) == pytest.approx(_f(8, 4))
    assert t.lookup(100, 100) == pytest.approx(_f(32, 20))
    assert t.lookup(100, 8) == pytest.approx(_f(32, 8))
    with pytest.raises(ConfigError, match="outside the table's grid"):
        t.lookup(2, 8, strict=True)
    assert t.lookup(8, 20, strict=True) == pytest.approx(_f(8, 20))  # edges are inside


def test_lookup_tensor_is_vectorised_and_differentiable():
    t = _table()
    i = torch.tensor([10.0, 24.0], requires_grad=True)
    o = torch.tensor([6.0, 15.0], requires_grad=True)
    y = t.lookup_tensor(i, o)
    assert torch.allclose(y, torch.tensor([_f(10, 6), _f(24, 15)]), atol=1e-5)
    y.sum().backward()
    # d f / d i = 0.1 + 0.003 * o ; d f / d o = 0.02 + 0.003 * i (exact inside a cell).
    assert torch.allclose(i.grad, 0.1 + 0.003 * o.detach(), atol=1e-5)
    assert torch.allclose(o.grad, 0.02 + 0.003 * i.detach(), atol=1e-5)


def test_single_point_axis_and_depthwise_table():
    one = _table([16], [4, 8], [[1.0, 2.0]])
    assert one.lookup(3, 6) == pytest.approx(1.5) and one.lookup(99, 6) == pytest.approx(1.5)
    dw = _table([8, 16], [], [[2.0], [4.0]])
    assert dw.depthwise and dw.lookup(12) == pytest.approx(3.0)
    with pytest.raises(ConfigError, match="out_c"):
        _table().lookup(8)


def test_table_validates_its_shape():
    with pytest.raises(ConfigError, match="values_ms"):
        _table([8, 16], [4], [[1.0]])
    with pytest.raises(ConfigError, match="increasing"):
        _table([16, 8], [4], [[1.0], [2.0]])


def test_build_conv_lut_and_json_round_trip(tmp_path):
    spec = LayerSpec(kind="conv2d", in_channels=16, out_channels=16, kernel=3, padding=1, height=8, width=8)
    t = build_conv_lut(spec, ([4, 16], [4, 8, 16]), FAST)
    assert (t.in_counts, t.out_counts) == ([4, 16], [4, 8, 16])
    assert len(t.values_ms) == 2 and all(len(row) == 3 for row in t.values_ms)
    assert all(v > 0 for row in t.values_ms for v in row)
    assert (t.device, t.dtype, t.batch, t.torch_version) == ("cpu", "float32", 1, torch.__version__)
    assert t.settings["repeats"] == 3 and t.spec["kernel"] == 3
    assert t.lookup(16, 8) == t.values_ms[1][1]
    path = t.save(tmp_path / "lut.json")
    back = LatencyTable.load(path)
    assert back == t and back.to_dict() == json.loads(path.read_text())
    assert back.lookup(10, 12) == t.lookup(10, 12)
    assert LayerSpec.from_dict(back.spec) == spec


def test_more_channels_measure_slower():
    # 16x the channels on both sides is 256x the multiply-adds; the table must see a gap.
    # One thread: on a shared 2-core machine a parallel region can stall for a whole scheduler
    # slice (~4 ms) waiting for a descheduled worker, which would swamp a tiny layer's time.
    spec = LayerSpec(kind="conv2d", in_channels=128, out_channels=128, kernel=3, padding=1, height=16, width=16)
    t = build_conv_lut(spec, [8, 128], LatencyConfig(warmup=2, repeats=3, batch_size=4, threads=1))
    assert t.values_ms[1][1] > 3 * t.values_ms[0][0]


def test_build_depthwise_and_linear_tables():
    dw = LayerSpec.from_module(nn.Conv2d(16, 32, 3, padding=1, groups=16), (8, 8))
    assert dw.depthwise
    t = build_conv_lut(dw, [4, 16], FAST)
    assert t.depthwise and t.out_counts == [] and len(t.values_ms) == 2
    assert t.lookup(10) == pytest.approx((t.values_ms[0][0] + t.values_ms[1][0]) / 2)
    with pytest.raises(ConfigError, match="one axis"):
        build_conv_lut(dw, ([4, 16], [8, 32]), FAST)
    lin = LayerSpec.from_module(nn.Linear(12, 6), (2, 3))  # 6 tokens
    assert lin.input_shape(5) == (6, 5)
    assert build_conv_lut(lin, None, FAST).in_counts == channel_grid(12)


def test_make_layer_matches_spec():
    spec = LayerSpec.from_module(nn.Conv2d(8, 16, (3, 5), stride=2, padding=(1, 2), bias=False), (10, 10))
    layer = spec.make_layer(4, 6)
    assert layer.kernel_size == (3, 5) and layer.stride == (2, 2) and layer.bias is None
    assert layer(torch.randn(1, *spec.input_shape(4))).shape == (1, 6, 5, 5)
    dw = LayerSpec(kind="conv2d", in_channels=8, out_channels=16, kernel=3, groups=8, height=4, width=4)
    assert dw.make_layer(4, 8).groups == 4


def test_channel_grid():
    assert channel_grid(64) == [16, 32, 48, 64]
    assert channel_grid(3, steps=4) == [1, 2, 3]
    assert channel_grid(100, steps=2, multiple_of=8) == [48, 100]
    with pytest.raises(ConfigError):
        channel_grid(0)


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "conv3d"}, "kind"),
    ({"groups": 2}, "groups=2"),
    ({"kernel": [3, 3, 3]}, "kernel"),
    ({"padding": -1}, "padding"),
    ({"in_channels": 0}, "in_channels"),
    ({"bias": 1}, "bias"),
])
def test_layer_spec_rejects_bad_values(kwargs, message):
    base = dict(kind="conv2d", in_channels=8, out_channels=8)
    with pytest.raises(ConfigError, match=message):
        LayerSpec(**{**base, **kwargs})


def test_bad_counts_and_files(tmp_path):
    spec = LayerSpec(kind="linear", in_channels=8, out_channels=8)
    with pytest.raises(ConfigError, match="channel counts"):
        build_conv_lut(spec, [0, 4], FAST)
    with pytest.raises(ConfigError, match="not supported"):
        LayerSpec.from_module(nn.ReLU())
    (tmp_path / "plan.json").write_text(json.dumps({"groups": []}))
    with pytest.raises(CheckpointError, match="not a prunekit latency table"):
        LatencyTable.load(tmp_path / "plan.json")
    with pytest.raises(CheckpointError, match="latency table .* (is not valid JSON|cannot be read)"):
        LatencyTable.load(tmp_path / "missing.json")
    data = _table().to_dict()
    data["values_ms"] = data["values_ms"][:2]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        LatencyTable.load(tmp_path / "bad.json")


@pytest.mark.parametrize("field, value", [
    ("in_counts", 5), ("in_counts", ["a", "b", "c"]), ("in_counts", [-8, 16, 32]), ("out_counts", [4.5, 8, 20]),
    ("values_ms", None), ("values_ms", [["x", 1, 1]] * 3), ("values_ms", [[float("nan"), 1, 1]] * 3),
    ("values_ms", [[-1e300, 1, 1]] * 3), ("spec", "conv"), ("batch", "one"), ("settings", [1]),
    ("spec", {"kind": "evil", "in_channels": 8, "out_channels": 8}), ("spec", {"kind": "conv2d"}),
    ("spec", {"kind": "linear", "in_channels": 8, "out_channels": 8, "unknown": 1}),
])
def test_a_latency_table_file_of_the_wrong_types_is_one_checkpoint_error(tmp_path, field, value):
    """A hand-edited table is refused when it is read, not by a TypeError (or a NaN latency) at lookup."""
    data = _table().to_dict()
    data[field] = value
    path = tmp_path / "lut.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="corrupt latency table"):
        LatencyTable.load(path)


def test_string_padding_is_tabled_as_the_integers_it_stands_for():
    """'same' (odd kernels, any dilation) and 'valid' convs are timed as the equivalent integer
    padding, with the same output shape; an uneven 'same' (even kernel) is refused by name."""
    for conv, padding in ((nn.Conv2d(4, 8, 3, padding="same"), [1, 1]),
                          (nn.Conv2d(4, 8, 5, padding="same", dilation=2), [4, 4]),
                          (nn.Conv2d(4, 8, 3, padding="valid"), [0, 0])):
        spec = LayerSpec.from_module(conv, (9, 9))
        x = torch.randn(1, 4, 9, 9)
        assert spec.padding == padding and spec.make_layer(4, 8)(x).shape == conv(x).shape
    with pytest.raises(ConfigError, match="pads one side more"):
        LayerSpec.from_module(nn.Conv2d(4, 8, 4, padding="same"), (9, 9))


def test_padding_mode_is_part_of_the_spec_and_the_timed_layer():
    """A reflect-padded conv is timed as one (it was timed zero-padded, under a zero-padded conv's key)."""
    reflect = LayerSpec.from_module(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), (9, 9))
    zeros = LayerSpec.from_module(nn.Conv2d(8, 8, 3, padding=1), (9, 9))
    assert reflect.make_layer(4, 4).padding_mode == "reflect" and zeros.make_layer(4, 4).padding_mode == "zeros"
    assert json.dumps(reflect.to_dict(), sort_keys=True) != json.dumps(zeros.to_dict(), sort_keys=True)
    old = {k: v for k, v in zeros.to_dict().items() if k != "padding_mode"}  # a table file written before
    assert LayerSpec.from_dict(old) == zeros
