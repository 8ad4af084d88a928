"""Removal == zeroing, for every toy model (every channel rule) and several random picks."""
import pytest
import torch
from torch import nn

from prunekit.graph import build_graph
from prunekit.testing.checks import build_and_check, check_removal_matches_zeroing, randomise_norms_
from prunekit.testing.toy_models import TOY_MODELS


@pytest.mark.parametrize("name", sorted(TOY_MODELS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_removal_matches_zeroing(name, seed):
    build, make_input = TOY_MODELS[name]
    torch.manual_seed(seed)
    model = build()
    randomise_norms_(model)
    x = make_input()
    before = model(x) if not isinstance(x, dict) else model(**x)
    build_and_check(model, x, fraction=0.5, seed=seed)
    model.eval()
    # the original is untouched by the check
    assert all(p.shape == q.shape for p, q in zip(build().parameters(), model.parameters()))


@pytest.mark.parametrize("name", sorted(TOY_MODELS))
def test_every_toy_model_has_a_prunable_group(name):
    build, make_input = TOY_MODELS[name]
    graph = build_graph(build(), make_input())
    assert graph.prunable_groups(), f"{name}: nothing prunable"


def test_residual_stream_is_one_group():
    build, make_input = TOY_MODELS["residual_projection"]
    graph = build_graph(build(), make_input())
    stream = graph.group("proj.0")
    owners = {m.qualname for m in stream.members if m.role == "out"}
    assert owners == {"proj.0.weight", "b2.0.weight", "b2.0.bias"}
    consumers = {m.qualname for m in stream.members if m.role == "in"}
    assert consumers == {"fc.weight"}


def test_zero_pad_shortcut_keeps_padded_channels():
    build, make_input = TOY_MODELS["residual_zeropad"]
    graph = build_graph(build(), make_input())
    stream = graph.group("stem.0")
    assert stream.size == 16 and int(stream.prunable.sum()) == 8


def test_flatten_linear_removes_hw_columns():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 2 * 2, 2))
    x = torch.randn(1, 3, 4, 4)
    graph = build_graph(model, x)
    check_removal_matches_zeroing(model, x, graph, {"0": [1, 3]})
    from prunekit.surgery.shrink import remove_channels_
    remove_channels_(model, graph, {"0": [1, 3]})
    assert model[2].in_features == 8 and model[0].out_channels == 2


def test_grouped_conv_prunes_whole_groups():
    build, make_input = TOY_MODELS["mobilenet"]
    model = build()
    graph = build_graph(model, make_input())
    from prunekit.surgery.shrink import remove_channels_
    remove_channels_(model, graph, {"stem.0": [0]})
    assert model.grouped[0].groups == 3 and model.grouped[0].in_channels == 6
    assert model.dw_mult.groups == 12 and model.dw_mult.out_channels == 24
    model(make_input())
