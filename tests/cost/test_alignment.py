"""round_to='auto': the multiple is picked from measured times per unit of work."""
import types

import torch
from torch import nn

import prunekit.cost.alignment as alignment
from prunekit.cost.latency import LatencyConfig
from prunekit.cost.lut import LayerSpec
from prunekit.methods import prune_
from prunekit.methods.magnitude import MagnitudeConfig


def _fake_times(slow, work=lambda w: w * w):
    """Times proportional to the layer's work (w * w for a w -> w conv), 3x where slow(w)."""
    def compare(models, inputs, cfg):
        (name,) = models
        w = int(name)
        ms = work(w) * (3.0 if slow(w) else 1.0)
        return types.SimpleNamespace(results={name: types.SimpleNamespace(median_ms=ms)})
    return compare


def test_picks_the_smallest_multiple_that_avoids_slow_widths(monkeypatch):
    spec = LayerSpec.from_module(nn.Conv2d(64, 64, 3, padding=1), (8, 8))
    cfg = LatencyConfig(warmup=1, repeats=1, threads=1)
    cases = {(lambda w: False): 1, (lambda w: w % 2 == 1): 2, (lambda w: w % 8 != 0): 8,
             (lambda w: w in (18, 30)): 4, (lambda w: w % 16 != 0): 16}
    for slow, expected in cases.items():
        monkeypatch.setattr(alignment, "compare_latency", _fake_times(slow))
        rec = alignment.measure_alignment(spec, cfg)
        assert rec["widths"] == list(range(16, 33)) and rec["multiple"] == expected
    dw = LayerSpec.from_module(nn.Conv2d(64, 64, 3, padding=1, groups=64), (8, 8))  # work: w
    for slow, expected in cases.items():
        monkeypatch.setattr(alignment, "compare_latency", _fake_times(slow, work=lambda w: w))
        assert alignment.measure_alignment(dw, cfg)["multiple"] == expected


def test_prune_with_round_to_auto_records_the_measurement():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), nn.ReLU(), nn.Conv2d(48, 48, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))
    x = torch.randn(1, 3, 16, 16)
    r = prune_(model, MagnitudeConfig(macs_fraction=0.6, round_to="auto", latency={"repeats": 3}), x)
    m = r.metrics["round_to"]["multiple"]
    assert m in alignment.MULTIPLES and r.config["round_to"] == "auto"  # as asked; the multiple is in metrics
    used = r.metrics["rounding"]["multiple"]  # m, or halved where m would land beyond round_slack
    assert m % used == 0 and all(c.out_channels % used == 0 for c in (model[0], model[2]))
    assert r.cost_after.macs <= 0.6 * r.cost_before.macs


def test_auto_keeps_the_larger_multiple_of_the_costliest_dense_and_depthwise_convs(monkeypatch):
    """A depthwise conv slow off multiples of 16 decides, although the 1x1 conv (the costliest
    layer) is fine at multiples of 2 (timings faked: slow widths by layer kind)."""
    model = nn.Sequential(nn.Conv2d(3, 64, 1), nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.Conv2d(64, 64, 1))
    x = torch.randn(1, 3, 8, 8)
    assert alignment.costliest_layer(model, x).groups == 1
    assert alignment.costliest_layer(model, x, depthwise=True).depthwise

    def measure(spec, cfg):
        return {"multiple": 16 if spec.depthwise else 2, "spec": spec.to_dict()}
    monkeypatch.setattr(alignment, "measure_alignment", measure)
    rec = alignment.pick_round_to(model, x, LatencyConfig(warmup=1, repeats=1, threads=1))
    assert rec["multiple"] == 16 and rec["depthwise"]["multiple"] == 16
    plain = nn.Sequential(nn.Conv2d(3, 64, 1), nn.Conv2d(64, 64, 1))
    assert "depthwise" not in alignment.pick_round_to(plain, x, LatencyConfig(warmup=1, repeats=1, threads=1))


def test_the_costliest_layer_counts_a_strided_conv_at_its_output_positions():
    """A ViT-like stem: a 8x8 patch conv with stride 8 on 64x64 (3 -> 32 channels, 64 output
    positions: 32*3*64*64 = 393,216 MACs) and a Linear 32 -> 256 over the 64 tokens (8,192 * 64 =
    524,288 MACs). The Linear is the costlier; weights times input positions would rank the conv
    first (3,072 * 4,096 = 12.6M) and time a 224x224-sized layer that the model does not have."""
    class PatchNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch, self.mlp = nn.Conv2d(3, 32, 8, stride=8), nn.Linear(32, 256)

        def forward(self, x):
            return self.mlp(self.patch(x).flatten(2).transpose(1, 2))

    spec = alignment.costliest_layer(PatchNet(), torch.randn(1, 3, 64, 64))
    assert (spec.kind, spec.in_channels, spec.out_channels, spec.height) == ("linear", 32, 256, 64)


def test_a_stem_on_the_image_is_not_the_layer_timed():
    """The 7x7 stem has the most MACs (3*64*49*256) but reads 3 channels: timed at w -> w it would
    be a layer the model does not have, so the 1x1 conv after it is chosen."""
    model = nn.Sequential(nn.Conv2d(3, 64, 7, padding=3), nn.Conv2d(64, 16, 1))
    spec = alignment.costliest_layer(model, torch.randn(1, 3, 16, 16))
    assert (spec.in_channels, spec.out_channels) == (64, 16)


def test_auto_leaves_the_model_in_the_mode_it_was_given(monkeypatch):
    monkeypatch.setattr(alignment, "measure_alignment", lambda spec, cfg: {"multiple": 8, "spec": spec.to_dict()})
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Dropout())
    model.train()
    model[4].eval()  # mixed modes survive too
    alignment.pick_round_to(model, torch.randn(1, 3, 12, 12), LatencyConfig(warmup=1, repeats=1, threads=1))
    assert [m.training for m in model.modules()] == [True, True, True, True, True, False]


def test_auto_without_a_layer_to_time_says_so_in_the_notes():
    """Every layer reads fewer than 8 channels: nothing is timed and the widths are unrounded;
    the record said "no Conv2d/Linear to time" of a model of Conv2d layers, and no note said it."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3))
    r = prune_(model, MagnitudeConfig(channel_ratio=0.5, round_to="auto"), torch.randn(1, 3, 8, 8))
    rec = r.metrics["round_to"]
    assert rec["multiple"] == 1 and "at least 8 input channels" in rec["reason"]
    assert any("round_to='auto'" in n and "unrounded" in n for n in r.metrics["notes"])


def test_narrow_widths_less_efficient_per_unit_of_work_give_a_said_fallback(monkeypatch):
    """A fixed per-call cost makes narrow layers less efficient per multiply-accumulate: the rule
    (time per unit of work against the best width) then passes no multiple. It used 16 without a
    word; the record and the result now say it fell back."""
    spec = LayerSpec.from_module(nn.Conv2d(64, 64, 3, padding=1), (8, 8))
    monkeypatch.setattr(alignment, "compare_latency", _fake_times(lambda w: False, work=lambda w: 2000 + w * w))
    rec = alignment.measure_alignment(spec, LatencyConfig(warmup=1, repeats=1, threads=1))
    assert rec["multiple"] == 16 and "fallback" in rec


def test_no_multiple_within_the_slack_is_said(monkeypatch):
    spec = LayerSpec.from_module(nn.Conv2d(64, 64, 3, padding=1), (8, 8))
    monkeypatch.setattr(alignment, "compare_latency", _fake_times(lambda w: w == 16))
    rec = alignment.measure_alignment(spec, LatencyConfig(warmup=1, repeats=1, threads=1))
    assert rec["multiple"] == 16 and "fallback" in rec
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 8, 1))
    monkeypatch.setattr(alignment, "measure_alignment", lambda spec, cfg: dict(rec))
    r = prune_(model, MagnitudeConfig(channel_ratio=0.5, round_to="auto"), torch.randn(1, 3, 8, 8))
    assert any("found no multiple" in n for n in r.metrics["notes"])
