"""Common slips in the Python API get one message saying what to pass instead."""
import copy
import json

import pytest
import torch
from torch import nn

import prunekit
from prunekit.core.errors import CheckpointError, ConfigError
from prunekit.graph import build_graph, register_rule
from prunekit.graph import rules
from prunekit.surgery.plan import apply_plan_, prune_channels_
from prunekit.surgery.tensor_file import write_tensor_file

X = torch.randn(1, 3, 8, 8)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))


@pytest.mark.parametrize("call", [lambda m: build_graph(m, X, ignore="conv1"),
                                  lambda m: prunekit.prepare_pruning(m, X, ignore="conv1")])
def test_a_bare_name_as_ignore_is_named_not_spelt_out(call):
    with pytest.raises(ConfigError, match=r"ignore='conv1' must be a list of names .*\['conv1'\]"):
        call(_net())  # it listed the modules 'c', 'o', 'n', 'v', '1' as missing


def test_a_compiled_or_meta_model_is_refused_with_what_to_prune_instead():
    net = _net()
    with pytest.raises(ConfigError, match=r"model._orig_mod for torch.compile"):
        prunekit.prune_(torch.compile(net), prunekit.MagnitudeConfig(channel_ratio=0.5), X)
    assert net[0].out_channels == 8
    with pytest.raises(ConfigError, match="meta device"):
        prunekit.prune_(_net().to("meta"), prunekit.MagnitudeConfig(channel_ratio=0.5), X)


def test_a_plan_given_as_json_or_a_file_of_another_kind_says_what_reads_it(tmp_path):
    net = _net()
    plan = prune_channels_(copy.deepcopy(net), X, {"0": [0, 1]})
    with pytest.raises(CheckpointError, match=r"apply_plan_ needs a Plan, got dict .*Plan.from_dict"):
        apply_plan_(net, json.loads(plan.to_json()))
    (tmp_path / "plan.json").write_text(plan.to_json())
    with pytest.raises(CheckpointError, match=r"a plan.json replays with apply_plan_\(model, load_plan\(path\)\)"):
        prunekit.load_pruned(net, tmp_path / "plan.json")
    write_tensor_file(tmp_path / "dense.safetensors", dict(net.state_dict()), {})  # as a run's dense weights
    with pytest.raises(CheckpointError, match=r"holds no prunekit plan, so it holds unpruned weights"):
        prunekit.load_pruned(_net(), tmp_path / "dense.safetensors")


def test_a_callable_criterion_asking_for_gradients_without_data_is_named():
    def mine(group, ctx):
        ctx.gradients()
        return torch.ones(group.size)
    with pytest.raises(ConfigError, match=r"criterion '<callable .*mine>' needs data"):  # it said 'taylor'
        prunekit.prune_(_net(), prunekit.MagnitudeConfig(channel_ratio=0.5, criterion=mine), X)


def test_register_rule_checks_the_rule_and_replaces_one_only_when_asked():
    with pytest.raises(ConfigError, match="must be a callable rule"):
        register_rule("my_op_x", 3)
    with pytest.raises(ConfigError, match=r"must take two arguments \(tracer, call\)"):
        register_rule("my_op_x", lambda tracer: None)
    with pytest.raises(ConfigError, match="already has a rule; pass replace=True"):
        register_rule("relu", rules.opaque)
    try:
        register_rule("relu", rules.opaque, replace=True)  # keeps every channel a relu touches
        graph = build_graph(_net(), X)
        assert not graph.group("0").prunable.any() and not graph.group("0").proven
    finally:
        register_rule("relu", rules._BUILTIN["relu"], replace=True)
    assert build_graph(_net(), X).group("0").prunable.any()


def test_prepared_pruning_names_an_unknown_keyword():
    net = _net()
    prepared = prunekit.prepare_pruning(net, X)
    with pytest.raises(ConfigError, match=r"unexpected keyword argument 'foo'.*prune_prepared_"):
        prepared.prune_(copy.deepcopy(net), prunekit.MagnitudeConfig(channel_ratio=0.5), foo=1)


def test_tracing_and_pruning_leave_a_max_norm_embeddings_weights_alone():
    """torch renormalises an Embedding(max_norm=...) in place in every forward: build_graph,
    prepare_pruning and count_cost changed the caller's weights."""
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(10, 8, max_norm=1.0), nn.Linear(8, 3)

        def forward(self, ids):
            return self.fc(self.emb(ids).relu()).mean(1)

    torch.manual_seed(0)
    model, ids = Tokens().eval(), torch.arange(10).view(1, 10)
    with torch.no_grad():
        model.emb.weight.mul_(5)  # rows well above max_norm
    before = model.emb.weight.detach().clone()
    build_graph(model, ids)
    prunekit.prepare_pruning(model, ids)
    prunekit.count_cost(model, ids)
    assert torch.equal(model.emb.weight, before)


def test_a_model_that_fails_past_its_first_layer_is_not_blamed_on_the_inputs():
    """Linear(5, 8) then Linear(6, 3) on a fitting input: the message said to change the inputs."""
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.o = nn.Linear(5, 8), nn.Linear(6, 3)

        def forward(self, x):
            return self.o(self.emb(x))

    with pytest.raises(ConfigError, match=r"fails in or after layer `o` \(Linear\), once 1 earlier layer") as info:
        build_graph(Broken(), torch.randn(2, 5))
    assert isinstance(info.value.__cause__, RuntimeError)  # the failing line stays reachable
    with pytest.raises(ConfigError, match=r"cannot run on the example inputs.*first layer `emb`"):
        build_graph(Broken(), torch.randn(2, 4))  # the first layer refuses: the inputs are at fault


def test_a_functional_grouped_conv_keeps_its_groups_instead_of_failing_the_whole_pruning():
    """F.conv2d(x, w, groups=2) with w a raw parameter: `groups` is written in the code, so whole
    conv groups cannot go; the pruning refused everything after a pruned copy failed to run."""
    import torch.nn.functional as F

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.o = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(14, 4, 1)
            self.w = nn.Parameter(torch.randn(8, 4, 3, 3))

        def forward(self, x):
            return self.o(torch.cat([F.conv2d(self.a(x), self.w, padding=1, groups=2), self.b(x)], 1))

    torch.manual_seed(0)
    r = prunekit.prune_(Grouped().eval(), prunekit.MagnitudeConfig(channel_ratio=0.5, round_to=None), X)
    assert "a" not in r.plan.groups and r.plan.groups.get("b")  # the other group still prunes


def test_a_parameter_free_first_layer_does_not_turn_wrong_inputs_into_a_model_bug():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(ConfigError, match=r"cannot run on the example inputs.*first layer `1` \(Linear\)"):
        build_graph(model, torch.randn(1, 3, 32, 32))


def test_a_copy_in_the_other_train_eval_mode_is_still_a_fresh_copy():
    net = _net().train()
    prepared = prunekit.prepare_pruning(net, X)
    r = prepared.prune_(copy.deepcopy(net).eval(), prunekit.MagnitudeConfig(channel_ratio=0.5, round_to=None))
    assert r.plan.groups["0"]


def test_channel_numbers_are_checked_past_the_first_odd_one():
    from prunekit.core.errors import PruningError

    with pytest.raises(PruningError, match=r"got 1.5 \(float\)"):
        prune_channels_(_net(), X, {"0": [torch.tensor(0), 1.5]})
