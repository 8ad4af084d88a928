"""Wrong example inputs give one ConfigError saying what was given and what the model takes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit
from prunekit.core.errors import ConfigError
from prunekit.graph import build_graph
from prunekit.graph.rules import RULES
from prunekit.models import create_model

WRONG = {  # name: (example inputs, what the message must say was given)
    "channels": (torch.zeros(1, 5, 8, 8), "a tensor float32 (1, 5, 8, 8)"),
    "no_batch_dim": (torch.zeros(8, 8), "a tensor float32 (8, 8)"),
    "int_dtype": (torch.zeros(1, 1, 8, 8, dtype=torch.int64), "a tensor int64 (1, 1, 8, 8)"),
    "double_dtype": (torch.zeros(1, 1, 8, 8, dtype=torch.float64), "a tensor float64 (1, 1, 8, 8)"),
    "nested_list": ([[0.0, 1.0]], "a list of 2 items"),
    "two_tensors": ((torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)), "a tensor float32 (1, 1, 8, 8), a tensor"),
    "wrong_keyword": ({"image": torch.zeros(1, 1, 8, 8)}, "image=a tensor float32"),
}
ENTRY_POINTS = {
    "build_graph": lambda m, x: build_graph(m, x),
    "count_cost": lambda m, x: prunekit.count_cost(m, x),
    "prune_": lambda m, x: prunekit.prune_(m, prunekit.MagnitudeConfig(channel_ratio=0.5), x),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("case", sorted(WRONG))
def test_wrong_example_inputs_name_what_was_given_and_what_is_expected(entry, case):
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    example, given = WRONG[case]
    with pytest.raises(ConfigError) as info:
        ENTRY_POINTS[entry](model, example)
    msg = str(info.value)
    assert "cannot run on the example inputs" in msg and f"given {given}" in msg, msg
    assert "expected forward(x); its first layer `conv1` (Conv2d) takes a float32 tensor (N, 1, H, W)" in msg, msg
    assert "\n" not in msg
    after = model.state_dict()  # the model is left as it was
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_linear_or_embedding_first_layer_is_named():
    with pytest.raises(ConfigError, match=r"`0` \(Linear\) takes a float32 tensor \(N, \.\.\., 6\)"):
        build_graph(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)), torch.zeros(2, 5))
    with pytest.raises(ConfigError, match=r"`0` \(Embedding\) takes an integer tensor of ids < 10"):
        build_graph(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)), torch.zeros(2, 3))


@pytest.mark.parametrize("where", ["during the forward", "after the forward"])
def test_a_failure_of_tracing_itself_is_not_blamed_on_the_inputs(monkeypatch, where):
    """The plain forward runs, so the tracer's own error goes through unchanged."""
    from prunekit.graph import trace

    def broken(*args, **kwargs):
        raise RuntimeError("a broken tracer")
    if where == "during the forward":
        monkeypatch.setattr(trace.Tracer, "push", broken)  # called as each module starts
    else:
        monkeypatch.setitem(RULES._items, "relu", broken)  # rules run after the forward
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    with pytest.raises(RuntimeError, match="a broken tracer"):
        build_graph(model, torch.zeros(1, 1, 8, 8))


def test_right_inputs_still_trace():
    model = create_model("small_cnn", num_classes=10)
    assert build_graph(model, torch.zeros(1, 1, 8, 8)).prunable_groups()


def test_example_inputs_without_a_sample_are_one_config_error():
    from prunekit.methods import prune_
    from prunekit.methods.magnitude import MagnitudeConfig

    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with pytest.raises(ConfigError, match=r"example_inputs hold no sample \(a tensor float32 \(0, 1, 8, 8\)\)"):
        prune_(model, MagnitudeConfig(channel_ratio=0.5), torch.randn(0, 1, 8, 8))
    assert model[0].out_channels == 8
