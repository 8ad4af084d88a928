"""Bad input gets one clear error and leaves the model as it was."""
import copy

import pytest
import torch
from torch import nn

from prunekit.core.errors import ConfigError, PruningError, UnsupportedOpError
from prunekit.graph import RULES, build_graph, opaque
from prunekit.methods import prune_
from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.surgery.shrink import remove_channels_

X = torch.randn(2, 3, 8, 8)


class Spectral(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.out(torch.fft.fft2(x).real)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_unsupported_op_names_op_module_and_the_way_out():
    with pytest.raises(UnsupportedOpError) as err:
        build_graph(Spectral(), X)
    msg = str(err.value)
    assert "fft_fft2" in msg and "(top level)" in msg and "register_rule" in msg and "ignore=['block.0']" in msg
    # following the advice works
    graph = build_graph(Spectral(), X, ignore=["block.0"])
    assert not graph.group("block.0").prunable.any()


def test_registering_a_rule_fixes_the_op():
    try:
        RULES.register("fft_fft2", opaque)
        graph = build_graph(Spectral(), X)
        assert not graph.group("block.0").prunable.any()  # the op mixes channels: kept whole
        assert graph.group("stem").prunable.all()
    finally:
        RULES.unregister("fft_fft2")


@pytest.mark.parametrize("kwargs, message", [
    (dict(channel_ratio=1.0), "out of range"),
    (dict(channel_ratio=-0.1), "out of range"),
    (dict(), "exactly one target"),
    (dict(channel_ratio=0.5, macs_fraction=0.5), "exactly one target.*method.channel_ratio=null or method.macs_fraction=null"),
    (dict(macs_fraction=0.0), "range"),
    (dict(channel_ratio=0.5, criterion="l7"), "criterion"),
    (dict(channel_ratio=0.5, scope="sideways"), "scope"),
    (dict(channel_ratio=0.5, round_to=0), "round_to"),
])
def test_invalid_configs_are_rejected_up_front(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MagnitudeConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(macs_fraction=0.001), "impossible target"),
    (dict(params_fraction=0.001), "impossible target"),
    (dict(channel_ratio=0.5, ignore=["nope"]), "do not exist"),
])
def test_bad_requests_leave_model_unchanged(kwargs, message):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    before = _state(model)
    with pytest.raises(ConfigError, match=message):
        prune_(model, MagnitudeConfig(**kwargs), X)
    assert _same(model, before)


def test_surgery_refuses_to_empty_a_group_or_touch_fixed_channels():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    graph = build_graph(model, X)
    before = _state(model)
    for remove, message in [({"0": list(range(8))}, "empty"), ({"2": [0]}, "fixed"),
                            ({"0": [9]}, "out of range"), ({"nope": [0]}, "no group")]:
        with pytest.raises((PruningError, ConfigError), match=message):
            remove_channels_(model, graph, remove)
        assert _same(model, before)


def test_failed_prune_of_unsupported_model_leaves_it_intact():
    model = Spectral()
    before = _state(model)
    with pytest.raises(UnsupportedOpError):
        prune_(model, MagnitudeConfig(channel_ratio=0.5), X)
    assert _same(model, before)
    copy.deepcopy(model)(X)


@pytest.mark.parametrize("fail", [False, True])
def test_tracing_restores_each_modules_own_training_mode(fail):
    """A training model with a frozen (eval) BN keeps exactly those modes, error or not."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), Spectral() if fail else nn.ReLU())
    if fail:
        model[0] = nn.Conv2d(3, 3, 3)
        model[1] = nn.BatchNorm2d(3)
    model.train()
    model[1].eval()
    before = {n: m.training for n, m in model.named_modules()}
    if fail:
        with pytest.raises(UnsupportedOpError):
            build_graph(model, X)
    else:
        build_graph(model, X)
    assert {n: m.training for n, m in model.named_modules()} == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("max_ratio, hint", [(0.9, True), (0.9995, False)])
def test_an_impossible_target_suggests_only_what_can_help(max_ratio, hint):
    """Every group at its cap: a wider scope cannot help; a higher cap can, unless it is already whole."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with pytest.raises(ConfigError, match="impossible target") as err:
        prune_(model, MagnitudeConfig(macs_fraction=0.001, max_ratio=max_ratio, round_to=None), X)
    text = str(err.value)
    assert "scope" not in text and "larger fraction" in text and "input and output layers" in text
    assert ("raise max_ratio" in text) == hint
