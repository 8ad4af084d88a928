"""SSCConv2d against oracles: PyTorch's grouped/depthwise/pointwise convs, an independent NumPy
build of the support from its stated rule, hand counts of parameters and MACs."""
import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from prunekit.core.errors import ConfigError
from prunekit.cost.macs import count_cost
from prunekit.layers.ssc import SSCConv2d, from_conv
from prunekit.layers.ssc_patterns import SSCSpec


def _pair_outputs(layer, x):
    return layer(x), layer.with_execution("masked")(x)


def _check_equal_to(conv: nn.Conv2d, layer: SSCConv2d, x, dense_weight=None):
    layer.load_dense_weight_(conv.weight if dense_weight is None else dense_weight, conv.bias)
    ref = conv(x)
    s, m = _pair_outputs(layer, x)
    assert s.shape == ref.shape
    torch.testing.assert_close(s, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0), (2, 2)])
def test_standard_conv(stride, padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride, padding)
    layer = SSCConv2d(6, 10, 3, SSCSpec(groups=1, spatial_period=1), stride, padding)
    assert bool(layer.support().all())
    _check_equal_to(conv, layer, torch.randn(2, 6, 9, 9))


@pytest.mark.parametrize("groups", [2, 4, 8])
def test_groupwise_and_depthwise(groups):
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 8, 3, 1, 1, groups=groups)  # groups=8: depthwise
    layer = SSCConv2d(8, 8, 3, SSCSpec(groups=groups, spatial_period=1), 1, 1)
    assert bool(layer.support().all())
    _check_equal_to(conv, layer, torch.randn(3, 8, 7, 7))


@pytest.mark.parametrize("groups,stride", [(1, 1), (2, 2), (4, 1)])
def test_pointwise(groups, stride):
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 12, 1, stride, 0, groups=groups)
    layer = SSCConv2d(8, 12, 3, SSCSpec(groups=groups, spatial_period=None), stride, 1)
    dense = torch.zeros(12, 8 // groups, 3, 3)
    dense[:, :, 1, 1] = conv.weight[:, :, 0, 0]
    _check_equal_to(conv, layer, torch.randn(2, 8, 9, 9), dense)
    assert layer.real_params() == conv.weight.numel() + 12


@pytest.mark.parametrize("p", [2, 4, 8])
def test_hetconv(p):
    """HetConv: filter n has a 3x3 kernel on input i iff (i - n) mod P == 0, else a 1x1."""
    torch.manual_seed(3)
    c, o = 16, 24
    mask = torch.zeros(o, c, 3, 3)
    for n in range(o):
        for i in range(c):
            if (i - n) % p == 0:
                mask[n, i] = 1
            else:
                mask[n, i, 1, 1] = 1
    conv = nn.Conv2d(c, o, 3, 1, 1)
    with torch.no_grad():
        conv.weight.mul_(mask)
    layer = SSCConv2d(c, o, 3, SSCSpec(groups=1, spatial_period=p, point_period=1), 1, 1)
    assert torch.equal(layer.support(), mask.bool())
    _check_equal_to(conv, layer, torch.randn(2, c, 8, 8))


def _support_oracle(c, o, k, g, ps, pp, pattern):
    """The rule of ssc_patterns.py written out literally, in NumPy."""
    cg, og = c // g, o // g
    m = np.zeros((o, cg, k, k), dtype=bool)
    a, b = np.indices((k, k))
    for f in range(o):
        fo = f % og
        for ci in range(cg):
            if ps is None:
                m[f, ci, k // 2, k // 2] = True
                continue
            j = fo // ps
            if (ci - fo) % ps == 0:
                taps = {"full": np.ones((k, k), bool), "cross": (a == k // 2) | (b == k // 2),
                        "checker": (a + b) % 2 == j % 2}[pattern]
                m[f, ci] = taps
            elif (ci % ps) // (ps // pp) == (fo % ps) // (ps // pp):
                m[f, ci, k // 2, k // 2] = True
    return m


@st.composite
def presets(draw):
    g = draw(st.sampled_from([1, 2, 4]))
    ps = draw(st.sampled_from([None, 1, 2, 4]))
    pp = 1 if ps is None else draw(st.sampled_from([d for d in (1, 2, 4) if ps % d == 0]))
    pattern = draw(st.sampled_from(["full", "cross", "checker"]))
    per = g * (ps or 1)
    c = per * draw(st.integers(1, 3))
    o = per * draw(st.integers(1, 3))
    k = draw(st.sampled_from([1, 3, 5]))
    stride = draw(st.integers(1, 2))
    padding = draw(st.integers(0, k // 2 + 1))
    dilation = draw(st.integers(1, 2))
    return c, o, k, SSCSpec(g, ps, pp, pattern), stride, padding, dilation


@settings(max_examples=60, deadline=None)
@given(presets(), st.integers(0, 2**16), st.booleans())
def test_structured_equals_masked_and_support_matches_rule(preset, seed, bias):
    c, o, k, spec, stride, padding, dilation = preset
    torch.manual_seed(seed)
    layer = SSCConv2d(c, o, k, spec, stride, padding, dilation, bias=bias)
    size = max(dilation * (k - 1) + 1 - 2 * padding, 1) + 4
    x = torch.randn(2, c, size, size + 1)
    s, m = _pair_outputs(layer, x)
    torch.testing.assert_close(s, m, atol=1e-5, rtol=1e-5)
    oracle = _support_oracle(c, o, k, spec.groups, spec.spatial_period, spec.point_period, spec.pattern)
    assert np.array_equal(layer.support().numpy(), oracle)
    assert not bool(layer.dense_weight()[~layer.support()].any())
    assert layer.real_params() == int(oracle.sum()) + (o if bias else 0)


def test_cost_counts_real_taps_by_hand():
    layer = SSCConv2d(8, 8, 3, SSCSpec(groups=1, spatial_period=4, point_period=2), padding=1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), layer, nn.BatchNorm2d(8))
    cost = count_cost(model, torch.randn(1, 3, 5, 5))
    # per filter: 2 channels x 9 taps + 2 channels x 1 tap = 20; 8 filters; a 5x5 output
    assert cost.params == 8 * 3 * 9 + (8 * 20 + 8) + 16
    assert cost.macs == 25 * 8 * 3 * 9 + 25 * 8 * 20
    assert cost.per_module["1"] == {"params": 168, "macs": 25 * 160, "out": 8}


def test_cost_of_checker_and_grouped_pointwise():
    # checker 3x3, G=2, P_s=2, P_p=2: per filter 2 spatial channels (8 in, 4 per group, 2 per class),
    # filters alternate 5 and 4 taps; no 1x1 taps
    layer = SSCConv2d(8, 8, 3, SSCSpec(groups=2, spatial_period=2, point_period=2, pattern="checker"), bias=False)
    real = sum(2 * (5 if (f % 4) // 2 % 2 == 0 else 4) for f in range(8))
    assert layer.real_params() == real
    assert count_cost(layer, torch.randn(1, 8, 6, 6)).macs == real * 16


def test_kaiming_uses_real_fan_in_and_zeros_stay_zero():
    torch.manual_seed(0)
    layer = SSCConv2d(256, 256, 3, SSCSpec(groups=1, spatial_period=4, point_period=1), padding=1)
    fan = 256 // 4 * 9 + (256 - 256 // 4)
    w = layer.dense_weight().detach()[layer.support()]
    assert abs(float(w.std()) - (2.0 / fan) ** 0.5) < 0.02 * (2.0 / fan) ** 0.5
    assert float(layer.weight_1x1.detach()[layer.point_mask.expand_as(layer.weight_1x1) == 0].abs().max()) == 0.0
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(2, 256, 6, 6)).square().mean().backward()
        opt.step()
    assert float(layer.weight_1x1.detach()[layer.point_mask.expand_as(layer.weight_1x1) == 0].abs().max()) == 0.0


def test_from_conv_project_and_errors():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    layer = from_conv(conv, SSCSpec(spatial_period=2), init="project")
    torch.testing.assert_close(layer.dense_weight(), conv.weight * layer.support())
    with pytest.raises(ConfigError, match="does not fit"):
        SSCConv2d(6, 8, 3, SSCSpec(spatial_period=4))
    with pytest.raises(ConfigError, match="must divide spatial_period"):
        SSCSpec(spatial_period=4, point_period=3)
    with pytest.raises(ConfigError, match="ungrouped"):
        from_conv(nn.Conv2d(8, 8, 3, groups=2), SSCSpec())


def test_inference_weight_cache_follows_parameter_updates():
    torch.manual_seed(0)
    layer = SSCConv2d(8, 8, 3, SSCSpec(spatial_period=4, point_period=1), padding=1)
    x = torch.randn(1, 8, 5, 5)
    with torch.inference_mode():
        before = layer(x)
    with torch.no_grad():
        layer.weight_1x1.add_(1.0)
    with torch.inference_mode():
        after = layer(x)
    torch.testing.assert_close(after, layer.with_execution("masked")(x).detach())
    assert not torch.allclose(before, after)


def test_layer_copied_under_inference_mode_runs():
    layer = SSCConv2d(8, 8, 3, SSCSpec(spatial_period=4), padding=1)
    x = torch.randn(1, 8, 5, 5)
    want = layer(x).detach()
    with torch.inference_mode():
        twin = copy.deepcopy(layer).to(memory_format=torch.channels_last)  # inference-tensor parameters
        torch.testing.assert_close(twin(x.contiguous(memory_format=torch.channels_last)), want, atol=1e-6, rtol=1e-5)


def test_inference_sees_in_place_weight_changes_and_clear_cache_after_data_writes():
    torch.manual_seed(0)
    for execution in ("structured", "masked"):
        layer = SSCConv2d(8, 8, 3, SSCSpec(groups=1, spatial_period=4, point_period=2), padding=1,
                          execution=execution).eval()
        x = torch.randn(2, 8, 5, 5)

        def fresh():  # the same layer's output with autograd on: never cached
            with torch.enable_grad():
                return layer(x).detach()
        with torch.no_grad():
            layer(x)  # fills the cache
            layer.weight_1x1.mul_(2.0)  # in place: the version counter moves
            torch.testing.assert_close(layer(x), fresh())
            layer.weight_1x1.data.mul_(0.5)  # through .data: not seen until the cache is cleared
            layer.clear_cache()
            torch.testing.assert_close(layer(x), fresh())


@pytest.mark.parametrize("execution", ["structured", "masked"])
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_inference_after_a_fused_optimizer_step_sees_the_new_weights(execution, opt):
    """Fused optimizers write the weights without bumping their version counters: a cache filled
    before the step (prune_ runs the model without autograd) gave the old outputs after it."""
    torch.manual_seed(0)
    layer = SSCConv2d(16, 16, 3, SSCSpec(spatial_period=4, pattern="cross"), padding=1, execution=execution)
    x = torch.randn(2, 16, 6, 6)
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, fused=True),
            "adamw": lambda p: torch.optim.AdamW(p, lr=0.1, fused=True)}[opt]
    optimizer = make(layer.parameters())
    with torch.no_grad():
        layer(x)  # fills the cache
    versions = [p._version for p in layer.parameters()]
    layer(x).square().mean().backward()
    with torch.no_grad():
        layer(x)  # a metric logged between backward and step fills the cache again
    optimizer.step()
    with torch.no_grad():
        after = layer(x)
    with torch.enable_grad():
        torch.testing.assert_close(after, layer(x).detach())
    # the case the cache could not see: the step moved no version counter
    assert [p._version for p in layer.parameters()] == versions


def test_a_state_dict_loaded_into_inference_parameters_is_seen():
    torch.manual_seed(0)
    other = SSCConv2d(8, 8, 3, SSCSpec(spatial_period=4), padding=1)
    x = torch.randn(1, 8, 5, 5)
    with torch.inference_mode():
        layer = SSCConv2d(8, 8, 3, SSCSpec(spatial_period=4), padding=1)  # inference tensors: no version
        layer(x)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), other(x))


def test_kernel_given_as_a_pair_and_numeric_arguments_are_checked():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, (3, 3), (2, 1), (1, 2), (1, 2))
    layer = SSCConv2d(8, 8, conv.kernel_size, SSCSpec(spatial_period=2), conv.stride, conv.padding, conv.dilation)
    with torch.no_grad():
        conv.weight.mul_(layer.support())
    _check_equal_to(conv, layer, torch.randn(2, 8, 9, 9))
    for bad, match in [({"padding": "same"}, "padding='same' .* string padding"),
                       ({"padding": (1,)}, "padding=\\(1,\\)"),
                       ({"stride": 0}, "stride=0 must be an integer >= 1"), ({"dilation": 1.5}, "dilation=1.5")]:
        with pytest.raises(ConfigError, match=match):
            SSCConv2d(8, 8, 3, SSCSpec(spatial_period=2), **bad)
    with pytest.raises(ConfigError, match="odd square kernel"):
        SSCConv2d(8, 8, (3, 5), SSCSpec(spatial_period=2))


@pytest.mark.parametrize("spatial_period", [1, 4])
def test_projecting_a_dense_conv_onto_a_grouped_preset_keeps_each_groups_block(spatial_period):
    """init="project" with G > 1: filter o of group g keeps the dense conv's taps on group g's input
    channels (that block projected onto the support); it used to refuse the ungrouped weight."""
    from prunekit.layers.ssc import from_conv

    torch.manual_seed(0)
    conv = nn.Conv2d(32, 64, 3, padding=1)
    layer = from_conv(conv, SSCSpec(groups=2, spatial_period=spatial_period), init="project")
    blocks = torch.cat([conv.weight[:32, :16], conv.weight[32:, 16:]])  # each filter's own group
    with torch.no_grad():
        torch.testing.assert_close(layer.dense_weight(), blocks * layer.support(), rtol=0, atol=0)


def test_trace_and_export_without_autograd_record_the_masking_not_a_cached_weight():
    """Deployment runs under torch.no_grad(): the inference cache must not freeze the masked weight
    into a trace as a constant, nor meet export's fake tensors (they have no data pointer)."""
    torch.manual_seed(0)
    layer = SSCConv2d(16, 16, 3, SSCSpec(spatial_period=4, point_period=2), padding=1).eval()
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        ref = layer(x)  # fills the inference cache
        traced = torch.jit.trace(layer, x)  # the default check runs the layer twice
        exported = torch.export.export(layer, (x,)).module()
        torch.testing.assert_close(traced(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(exported(x), ref, rtol=0, atol=0)
        layer.weight_1x1.mul_(2)  # the traced layer shares the parameters: it must follow them
        torch.testing.assert_close(traced(x), layer(x), rtol=0, atol=0)
