"""SSC conversion of whole models: which convs convert, exact costs, save/reload, strict meta."""
import json

import pytest
import torch
from torch import nn

from prunekit.core.errors import CheckpointError, ConfigError, PruningError
from prunekit.cost.macs import count_cost
from prunekit.layers.ssc import EXECUTIONS, SSCConv2d
from prunekit.methods import prune_
from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.methods.ssc import PRESETS, SSCConfig, layer_reduction, preset_for
from prunekit.models import create_model
from prunekit.surgery.persist import load_pruned, read_plan, save_pruned
from prunekit.surgery.plan import Plan, apply_plan_

X = torch.randn(2, 3, 32, 32)


def _resnet20():
    torch.manual_seed(0)
    return create_model("resnet20", num_classes=10).eval()


def test_resnet20_converts_every_3x3_but_the_stem_and_reloads(tmp_path):
    model = _resnet20()
    dense = count_cost(model, X)
    r = prune_(model, SSCConfig(reduction=4), X)
    ssc = {n: m for n, m in model.named_modules() if isinstance(m, SSCConv2d)}
    convs = {n: m for n, m in model.named_modules() if type(m) is nn.Conv2d}
    assert len(ssc) == 18 and sorted(ssc) == sorted(r.plan.meta["replay"]["ssc"]["layers"])
    assert [n for n, m in convs.items() if m.kernel_size == (3, 3)] == ["conv1"]  # the stem stays dense
    assert (r.cost_before.params, r.cost_after.params) == (dense.params, count_cost(model, X).params)
    # hand count: dense params minus what the converted layers drop
    drop = sum(m.in_channels * m.out_channels * 9 - (m.real_params() - (m.out_channels if m.bias is not None else 0))
               for m in ssc.values())
    assert r.cost_after.params == dense.params - drop
    assert r.cost_after.macs < dense.macs / 2
    path = save_pruned(model, r.plan, tmp_path / "ssc.safetensors")
    again = load_pruned(_resnet20(), path).eval()
    torch.testing.assert_close(again(X), model(X), atol=0, rtol=0)
    assert read_plan(path).meta["replay"]["ssc"]["layers"]["layer1.0.conv1"] == preset_for(4).to_dict()


def test_an_explicit_preset_that_does_not_divide_128_converts_the_layers_it_fits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), nn.ReLU(), nn.Conv2d(48, 48, 3, padding=1)).eval()
    x = torch.randn(1, 3, 8, 8)
    r = prune_(model, SSCConfig(groups=3, spatial_period=2), x)
    assert isinstance(model[2], SSCConv2d) and type(model[0]) is nn.Conv2d
    taps = model[2].real_params() - 48  # the bias is not a tap
    assert r.metrics["layer_reduction"] == pytest.approx(48 * 48 * 9 / taps)
    assert r.cost_before.params - r.cost_after.params == 48 * 48 * 9 - taps


def test_a_fresh_interpreter_reloads_a_converted_model_without_importing_the_method(tmp_path):
    import subprocess
    import sys

    model = _resnet20()
    r = prune_(model, SSCConfig(reduction=4), X)
    path = save_pruned(model, r.plan, tmp_path / "ssc.safetensors")
    torch.save({"x": X, "y": model(X).detach()}, tmp_path / "io.pt")
    code = ("import sys, torch\n"
            "from prunekit.models import create_model\n"
            "from prunekit.surgery.persist import load_pruned\n"
            "assert 'prunekit.methods.ssc' not in sys.modules\n"
            "torch.manual_seed(0)\n"
            f"m = load_pruned(create_model('resnet20', num_classes=10), {str(path)!r}).eval()\n"
            f"io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)\n"
            "torch.testing.assert_close(m(io['x']), io['y'], atol=0, rtol=0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet20"])
def test_presets_reach_their_layer_reduction(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    r = prune_(model, SSCConfig(reduction=8, family="grouped"), X)
    spec = preset_for(8, "grouped")
    assert r.metrics["preset"] == spec.to_dict() and not r.metrics["left_dense"]
    for m in model.modules():
        if isinstance(m, SSCConv2d):
            dense_w = m.in_channels * m.out_channels * 9
            real_w = m.real_params() - (m.out_channels if m.bias is not None else 0)
            assert dense_w / real_w == pytest.approx(layer_reduction(spec))


def test_table_values():
    assert {f: {r: round(layer_reduction(preset_for(r, f)), 1) for r in t} for f, t in PRESETS.items()} == {
        "het": {2: 1.8, 4: 4.5, 8: 9.0, 16: 18.0}, "grouped": {2: 1.8, 4: 3.6, 8: 7.2, 16: 14.4},
        "block": {2: 2.0, 4: 3.6, 8: 7.2, 16: 14.4}}


def test_indivisible_layers_stay_dense_and_are_reported():
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1),
                      nn.Conv2d(16, 12, 3, padding=1), nn.Conv2d(12, 16, 3, padding=1), nn.Conv2d(16, 16, 1))
    r = prune_(m, SSCConfig(groups=1, spatial_period=8, fallback=False), torch.randn(1, 3, 8, 8))
    assert set(r.metrics["left_dense"]) == {"2", "3"} and r.metrics["converted"] == ["1"]
    assert [type(c).__name__ for c in m] == ["Conv2d", "SSCConv2d", "Conv2d", "Conv2d", "Conv2d"]


def test_fallback_fits_the_nearest_preset():
    # 16x "het" is G=4, P_s=8 (18x): ResNet-20's 16-channel stage cannot take it; G=2, P_s=8 (9x) or
    # G=8, P_s=2 (14.4x) fit; the nearest to 18x on a log scale is 14.4x
    model = _resnet20()
    r = prune_(model, SSCConfig(reduction=16), X)
    assert r.metrics["refitted"]["layer1.0.conv1"] == {"groups": 8, "spatial_period": 2, "point_period": 1,
                                                       "pattern": "full", "version": 1}
    assert "layer3.0.conv2" not in r.metrics["refitted"] and not r.metrics["left_dense"]
    assert r.params_ratio > 13  # 13.4x: the stem, BN and classifier stay dense


def test_config_errors_and_untouched_model():
    with pytest.raises(ConfigError, match="not both"):
        SSCConfig(reduction=4, spatial_period=2)
    with pytest.raises(ConfigError, match="must divide"):
        SSCConfig(spatial_period=4, point_period=3)
    with pytest.raises(ConfigError, match="groups=4 needs spatial_period too: 1 for a groupwise conv"):
        SSCConfig(groups=4)  # would otherwise be read as pointwise
    assert SSCConfig(groups=4, spatial_period=1).spec().spatial_period == 1  # groupwise
    assert SSCConfig(groups=4, spatial_period=0).spec().spatial_period is None  # pointwise
    for ignored in ({"reduction": 4, "point_period": 2}, {"point_period": 4}):  # the reduction's preset has P_p = 1
        with pytest.raises(ConfigError, match="point_period=.* explicit preset"):
            SSCConfig(**ignored)
    model = _resnet20()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match="no conv"):
        prune_(model, SSCConfig(groups=1, spatial_period=128, fallback=False), X)
    with pytest.raises(ConfigError, match="no.such"):
        prune_(model, SSCConfig(ignore=["no.such"]), X)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("bad", [
    {"layers": {"layer1.0.conv1": {"groups": "__import__('os')", "spatial_period": 2, "point_period": 1,
                                    "pattern": "full"}}},
    {"layers": {"layer1.0.conv1": {"groups": 1, "spatial_period": 2, "point_period": 1, "pattern": "nope"}}},
    {"layers": {"no.such": {"groups": 1, "spatial_period": 2, "point_period": 1, "pattern": "full"}}},
    {"layers": {"layer1.0.conv1": {"groups": 1, "spatial_period": 2, "extra": 1}}},
    {"layers": [], "execution": "structured"},
    {"layers": {}, "execution": "fast"},
    {"layers": {"layer1.0.conv1": {"groups": 1, "spatial_period": 2, "point_period": 1, "pattern": "full"}},
     "execution": {"layer1.0.conv1": ["masked"]}},
    {"layers": {"layer1.0.conv1": {"groups": 1, "spatial_period": 2, "point_period": 1, "pattern": "full"}},
     "execution": {"layer1.0.conv2": "masked"}},
])
def test_replay_rejects_malformed_meta(bad):
    model = _resnet20()
    r = prune_(model, SSCConfig(reduction=2), X)
    data = json.loads(r.plan.to_json())
    data["meta"]["replay"]["ssc"] = bad
    with pytest.raises(CheckpointError):
        apply_plan_(_resnet20(), Plan.from_dict(data))


def test_auto_execution_keeps_the_faster_measured_one_and_reloads_with_it(tmp_path):
    model, ref = _resnet20(), _resnet20()
    r = prune_(model, SSCConfig(reduction=4, execution="auto", latency={"warmup": 1, "repeats": 3}), X)
    rec = r.metrics["execution"]
    assert rec["choice"] in ("structured", "masked") and rec["device"] == "cpu" and rec["batch"] == 1
    assert rec[f"{rec['choice']}_ms"] == min(rec["structured_ms"], rec["masked_ms"])
    assert {m.execution for m in model.modules() if isinstance(m, SSCConv2d)} == {rec["choice"]}
    assert r.plan.meta["replay"]["ssc"]["execution"] == rec["choice"]
    prune_(ref, SSCConfig(reduction=4), X)  # the same seeded weights, structured
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(X), ref(X), rtol=1e-5, atol=1e-5)  # the choice changes no output
    again = load_pruned(_resnet20(), save_pruned(model, r.plan, tmp_path / "auto.safetensors")).eval()
    assert {m.execution for m in again.modules() if isinstance(m, SSCConv2d)} == {rec["choice"]}


def test_fixed_execution_is_recorded_and_latency_fields_are_checked():
    r = prune_(_resnet20(), SSCConfig(reduction=4, execution="masked"), X)
    assert r.metrics["execution"] == {"choice": "masked"}
    with pytest.raises(ConfigError, match="unknown field"):
        SSCConfig(execution="auto", latency={"batch": 4})
    with pytest.raises(ConfigError, match="execution='fast'"):
        SSCConfig(execution="fast")


def test_weight_sparsity_counts_an_ssc_layer_as_the_dense_conv_it_replaces():
    from prunekit.surgery.mask_io import weight_sparsity

    model = _resnet20()
    dense = weight_sparsity(model)["weights"]
    prune_(model, SSCConfig(reduction=4), X)
    ssc = [m for m in model.modules() if isinstance(m, SSCConv2d)]
    taps = sum(m.real_params() - (m.out_channels if m.bias is not None else 0) for m in ssc)
    full = sum(m.out_channels * m.in_channels * m.kernel_size ** 2 for m in ssc)
    got = weight_sparsity(model)["weights"]
    assert got["numel"] == dense["numel"] and got["zeros"] == dense["zeros"] + full - taps


def test_channel_pruning_a_fully_converted_model_says_that_nothing_can_be_removed():
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10).eval()
    x = torch.randn(1, 1, 8, 8)
    prune_(model, SSCConfig(reduction=4), x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    r = prune_(model, MagnitudeConfig(channel_ratio=0.5), x)
    assert r.plan.groups == {} and r.metrics["notes"][0].startswith("nothing was removed: none of the model's")
    with pytest.raises(ConfigError, match="impossible target: none of the model's .* such as SSC layers"):
        prune_(model, MagnitudeConfig(macs_fraction=0.5), x)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_channel_level_pai_on_a_fully_converted_model_says_why_nothing_can_be_removed():
    from prunekit.methods.pai import RandomInitConfig

    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10).eval()
    x = torch.randn(1, 1, 8, 8)
    prune_(model, SSCConfig(reduction=4), x)
    with pytest.raises(PruningError, match="none of the model's .* such as SSC layers"):  # not "ignore fewer modules"
        prune_(model, RandomInitConfig(sparsity=0.5, level="channel"), x)


def _chain(width: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)).eval()


def test_a_preset_that_fits_only_after_channel_removal_reloads(tmp_path):
    from prunekit.graph import build_graph
    from prunekit.surgery.plan import prune_channels_

    model, x = _chain(20), torch.randn(1, 3, 8, 8)
    groups = [g.name for g in build_graph(model, x).groups]
    removed = prune_channels_(model, x, {groups[0]: [0, 1, 2, 3], groups[1]: [0, 1, 2, 3]})  # 20 -> 16 -> 16 -> 20
    r = prune_(model, SSCConfig(groups=1, spatial_period=8, fallback=False), x)
    assert r.metrics["converted"] == ["2"]  # 16 -> 16 fits P_s = 8; the unpruned 20 -> 20 would not
    again = load_pruned(_chain(20), save_pruned(model, removed.compose(r.plan), tmp_path / "m.safetensors"))
    assert isinstance(again[2], SSCConv2d)
    torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)


def test_a_preset_that_does_not_fit_the_replayed_channels_is_a_checkpoint_error():
    model, x = _chain(16), torch.randn(1, 3, 8, 8)
    plan = prune_(model, SSCConfig(groups=1, spatial_period=8), x).plan
    with pytest.raises(CheckpointError, match="plan converts layer '2' to SSC, but here: spatial_period=8"):
        apply_plan_(_chain(20), Plan.from_dict({**json.loads(plan.to_json()), "fingerprint": {}}))


def test_channel_pruning_after_ssc_with_ignored_layers_reloads(tmp_path):
    model = _resnet20()
    first = prune_(model, SSCConfig(reduction=4, ignore=["layer3"]), X)
    second = prune_(model, MagnitudeConfig(channel_ratio=0.5), X)
    assert second.plan.groups and all(name.startswith("layer3.") for name in second.plan.groups)
    path = save_pruned(model, first.plan.compose(second.plan), tmp_path / "m.safetensors")
    torch.testing.assert_close(load_pruned(_resnet20(), path).eval()(X), model(X), atol=0, rtol=0)


def test_masked_convs_are_reported_and_a_masked_stem_is_still_the_first_conv():
    from prunekit.surgery.masks import apply_mask, unstructured_mask

    model = nn.Sequential(*[nn.Conv2d(3 if i == 0 else 16, 16, 3, padding=1) for i in range(4)])
    for i in (0, 2):
        apply_mask(model[i], "weight", unstructured_mask(model[i].weight, 0.5))
    r = prune_(model, SSCConfig(groups=1, spatial_period=4), torch.randn(1, 3, 8, 8))
    assert r.metrics["converted"] == ["1", "3"]
    assert list(r.metrics["left_dense"]) == ["2"] and "parametrized" in r.metrics["left_dense"]["2"]


def test_a_model_that_is_a_single_conv_is_refused_and_left_as_it_was():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    with pytest.raises(PruningError, match="the model itself is this conv"):
        prune_(conv, SSCConfig(groups=1, spatial_period=2, keep_first=False), torch.randn(1, 8, 6, 6))
    assert not list(conv.children()) and conv.state_dict().keys() == before.keys()


def test_a_converted_layer_keeps_the_hooks_and_the_frozen_weights_of_its_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    x = torch.randn(1, 3, 8, 8)
    seen = []
    model[2].register_forward_hook(lambda mod, args, out: seen.append(out))
    handle = model[4].register_forward_pre_hook(lambda mod, args: (2 * args[0],))
    model[2].requires_grad_(False)
    prune_(model, SSCConfig(groups=1, spatial_period=4, init="project"), x)
    assert isinstance(model[2], SSCConv2d) and isinstance(model[4], SSCConv2d)
    assert [p.requires_grad for p in model[2].parameters()] == [False] * 3  # frozen as the conv was
    assert all(p.requires_grad for p in model[4].parameters())
    seen.clear()
    hidden = model[1](model[0](x))
    out = model(x)
    assert len(seen) == 1 and torch.equal(seen[0], model[2].forward(hidden))  # the forward hook still sees the layer
    assert torch.equal(out, model[4].forward(2 * model[3](seen[0])))  # the pre-hook still doubles the input
    handle.remove()  # the caller's handle still reaches the hook
    assert torch.equal(model(x), model[4].forward(model[3](seen[0])))


def _executions(model: nn.Module) -> dict[str, str]:
    return {n: m.execution for n, m in model.named_modules() if isinstance(m, SSCConv2d)}


def test_two_conversions_compose_and_reload_with_each_layers_execution(tmp_path):
    """The later plan's SSC entry replaced the earlier one in the composed plan: the file saved
    but never loaded (a fingerprint mismatch). Both conversions replay, each in its execution."""
    model = _resnet20()
    first = prune_(model, SSCConfig(reduction=4, ignore=["layer3"]), X)
    second = prune_(model, SSCConfig(reduction=8, execution="masked"), X)
    assert len(first.metrics["converted"]) == 12 and len(second.metrics["converted"]) == 6
    again = load_pruned(_resnet20(), save_pruned(model, first.plan.compose(second.plan), tmp_path / "m.safetensors"))
    assert _executions(again) == _executions(model) and set(_executions(model).values()) == set(EXECUTIONS)
    torch.testing.assert_close(again.eval()(X), model(X), atol=0, rtol=0)


def test_an_execution_switched_after_conversion_is_saved_with_the_model(tmp_path):
    """set_execution_ after the conversion, for all layers or one: load_pruned rebuilt the plan's
    execution instead (outputs within 1e-5, not identical)."""
    from prunekit.layers.ssc import set_execution_

    model = _resnet20()
    r = prune_(model, SSCConfig(reduction=4), X)
    set_execution_(model, "masked")
    model.layer2[0].conv1.execution = "structured"
    again = load_pruned(_resnet20(), save_pruned(model, r.plan, tmp_path / "m.safetensors")).eval()
    assert _executions(again) == _executions(model)
    torch.testing.assert_close(again(X), model(X), atol=0, rtol=0)


class _WeightReusedOutside(nn.Module):
    """TridentNet-style: conv `a` runs as a module and, with its weight, dilated by the parent."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = (nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1),
                                     nn.Conv2d(16, 16, 3, padding=1))

    def forward(self, x):
        x = self.stem(x).relu()
        x = self.a(x) + nn.functional.conv2d(x, self.a.weight, self.a.bias, padding=2, dilation=2)
        return self.b(x.relu())


def test_a_conv_whose_weight_is_used_outside_its_forward_stays_dense():
    """The parent's functional conv read `a.weight`, which an SSC layer does not have: the
    conversion failed with a bare AttributeError. `a` stays dense and says why; `b` converts."""
    torch.manual_seed(0)
    model, x = _WeightReusedOutside().eval(), torch.randn(1, 3, 8, 8)
    r = prune_(model, SSCConfig(groups=1, spatial_period=4), x)
    assert r.metrics["converted"] == ["b"] and type(model.a) is nn.Conv2d
    assert "its weight is also read outside its own forward (by the model itself)" in r.metrics["left_dense"]["a"]
    assert model(x).shape == (1, 16, 8, 8)
