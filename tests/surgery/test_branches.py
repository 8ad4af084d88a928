"""Whole-branch cutting: the cut model equals the one whose branch reads only zeros; plans replay
the cut (also in the older meta["gator"] layout) and refuse cuts the graph does not allow."""
import copy

import pytest
import torch
from torch import nn

from prunekit.core.errors import CheckpointError
from prunekit.graph import build_graph
from prunekit.models import create_model
from prunekit.surgery.branches import ConstantOutput, EmptyOutput, cut_branches_, find_branch
from prunekit.surgery.plan import Plan, apply_plan_, empty_plan

X = torch.randn(2, 3, 32, 32)
GROUP = "layer1.1.conv1"  # the inner group of a ResNet block: conv1 -> bn1 -> conv2


def _model(seed=0):
    torch.manual_seed(seed)
    model = create_model("resnet20", num_classes=10).eval()
    for m in model.modules():  # BN with non-trivial statistics: bn2(0) is not 0
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _cut_plan(model):
    graph = build_graph(model, X)
    branch = find_branch(model, graph, graph.group(GROUP))
    plan = empty_plan(X)
    plan.meta["replay"] = {"cut_branches": {"branches": [branch.to_dict()]}}
    return plan, branch


def test_cut_branch_equals_the_branch_reading_zeros():
    model = _model()
    graph = build_graph(model, X)
    branch = find_branch(model, graph, graph.group(GROUP))
    assert (branch.empty, branch.identity, branch.constant) == (["layer1.1.conv1"], ["layer1.1.bn1"], ["layer1.1.conv2"])
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        oracle.layer1[1].conv2.weight.zero_()  # every input channel of conv2 closed
    cut_branches_(model, [branch])
    assert isinstance(model.layer1[1].conv1, EmptyOutput) and isinstance(model.layer1[1].conv2, ConstantOutput)
    with torch.no_grad():
        torch.testing.assert_close(model(X), oracle(X), atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["replay", "legacy"])
def test_plan_replays_the_cut(layout):
    model = _model()
    plan, branch = _cut_plan(model)
    if layout == "legacy":  # plans written before meta["replay"]: the entry sat under meta["gator"]
        plan.meta = {"gator": {"branches": [branch.to_dict()], "silent": []}}
    cut = copy.deepcopy(model)
    cut_branches_(cut, [branch])
    replayed = apply_plan_(copy.deepcopy(model), Plan.from_dict(plan.to_dict()))
    assert isinstance(replayed.layer1[1].conv2, ConstantOutput)
    with torch.no_grad():
        assert torch.equal(replayed(X), cut(X))


@pytest.mark.parametrize("meta", [
    # a crafted entry that would swap a whole stage for Identity
    {"replay": {"cut_branches": {"branches": [{"group": GROUP, "empty": [], "identity": ["layer1"], "constant": []}]}}},
    {"gator": {"branches": [{"group": GROUP, "empty": ["layer1.1.conv1"], "identity": ["layer1.1.bn1", "layer2"],
                             "constant": ["layer1.1.conv2"]}]}},
    {"gator": 5},
    {"gator": {"branches": "layer1"}},
    {"gator": {"branches": [], "silent": 3}},
    {"replay": {"cut_branches": {"branches": [], "extra": 1}}},
    {"replay": {"cut_branches": {"branches": [{"group": "no.such.group", "empty": [], "identity": [], "constant": []}]}}},
    {"replay": {"unknown_step": {}}},
    {"replay": ["cut_branches"]},
])
def test_foreign_replay_entries_are_refused_and_leave_the_model_alone(meta):
    model = _model()
    before = {n: type(m) for n, m in model.named_modules()}
    plan = empty_plan(X)
    plan.meta = meta
    with pytest.raises(CheckpointError):
        apply_plan_(model, Plan.from_dict(plan.to_dict()))
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_two_cuts_composed_replay_both(tmp_path):
    """A pruning of a model whose branch an earlier one cut (Gator run again on a Gator-pruned
    run): the composed plan kept only the later cut, so save_pruned wrote a file load_pruned refused."""
    from prunekit.surgery.persist import load_pruned, save_pruned

    model = _model()
    plans = []
    for group in (GROUP, "layer2.1.conv1"):
        graph = build_graph(model, X)
        branch = find_branch(model, graph, graph.group(group))
        plan = empty_plan(X).stamp(dense=model)
        plan.meta["replay"] = {"cut_branches": {"branches": [branch.to_dict()]}}
        cut_branches_(model, [branch])
        plans.append(plan.stamp(pruned=model))
    again = load_pruned(_model(), save_pruned(model, plans[0].compose(plans[1]), tmp_path / "cut.safetensors"))
    assert isinstance(again.layer1[1].conv2, ConstantOutput) and isinstance(again.layer2[1].conv2, ConstantOutput)
    with torch.no_grad():
        assert torch.equal(again(X), model(X))
