"""Plans are checked at the boundary: every mismatch with the model is one CheckpointError and
leaves the model (and the disk) unchanged."""
import json

import pytest
import torch

from prunekit.core.errors import CheckpointError
from prunekit.methods import prune_
from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.models import create_model
from prunekit.surgery.persist import PLAN_KEY, load_pruned, read_plan, save_pruned
from prunekit.surgery.plan import Plan, apply_plan_, prune_channels_
from prunekit.surgery.plan_check import architecture_fingerprint
from prunekit.surgery.tensor_file import save_state_file

X = torch.randn(2, 3, 32, 32)


def _pruned(ratio=0.4, name="resnet20"):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    return model, prune_(model, MagnitudeConfig(channel_ratio=ratio, probe=False), X).plan


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _edited(plan, edit):
    data = plan.to_dict()
    edit(data)
    return data


def _first(data):
    return next(iter(data["groups"].values()))


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: _first(d)["keep"].append(_first(d)["size"] + 3), r"in 0\.\.\d+; entry \d+ is \d+, outside"),
    (lambda d: _first(d)["keep"].__setitem__(-1, 999), r"entry \d+ is 999, outside 0\.\."),  # past the first 8 shown before
    (lambda d: _first(d)["keep"].insert(0, -1), "integer >= 0"),
    (lambda d: _first(d)["keep"].append(_first(d)["keep"][-1]), r"sorted, unique.*entry \d+ is (\d+), after \1"),
    (lambda d: _first(d)["keep"].reverse(), "sorted, unique"),
    (lambda d: _first(d).update(keep=[]), "keeps no channel"),
])
def test_bad_kept_indices_are_refused(edit, fragment):
    _, plan = _pruned()
    fresh = create_model("resnet20", num_classes=10)
    shapes = _shapes(fresh)
    with pytest.raises(CheckpointError, match=fragment):
        apply_plan_(fresh, Plan.from_dict(_edited(plan, edit)))
    assert _shapes(fresh) == shapes


def test_a_plan_for_another_depth_is_refused_by_its_fingerprint():
    _, plan = _pruned(name="resnet20")
    deeper = create_model("resnet32", num_classes=10)
    assert set(plan.groups) & {n for n, _ in deeper.named_modules()}  # the names alone would match
    shapes = _shapes(deeper)
    with pytest.raises(CheckpointError, match="fingerprint"):
        apply_plan_(deeper, plan)
    assert _shapes(deeper) == shapes


def test_a_plan_whose_result_differs_from_its_record_is_refused():
    model, plan = _pruned()
    plan.fingerprint["pruned"] = architecture_fingerprint(create_model("resnet32", num_classes=10))
    fresh = create_model("resnet20", num_classes=10)
    shapes = _shapes(fresh)
    with pytest.raises(CheckpointError, match="pruned model the plan produces"):
        apply_plan_(fresh, plan)
    assert _shapes(fresh) == shapes


def test_save_pruned_refuses_a_plan_of_another_pruning(tmp_path):
    model, _ = _pruned(0.4)
    _, other_plan = _pruned(0.2)
    with pytest.raises(CheckpointError, match="fingerprint"):
        save_pruned(model, other_plan, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_prune_channels_plans_carry_fingerprints(tmp_path):
    make = lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    model, x = make(), torch.randn(1, 3, 8, 8)
    plan = prune_channels_(model, x, {"0": [1, 2]})
    assert plan.fingerprint == {"dense": architecture_fingerprint(make()), "pruned": architecture_fingerprint(model)}
    with pytest.raises(CheckpointError, match="fingerprint"):
        save_pruned(make(), plan, tmp_path / "m.safetensors")
    save_pruned(model, plan, tmp_path / "m.safetensors")
    assert read_plan(tmp_path / "m.safetensors").fingerprint == plan.fingerprint


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: d.update(groups=[["layer1.0.conv1", [0, 1]]]), "'groups' must be a mapping"),
    (lambda d: d.update(groups={"a": [0, 1]}), "must be {'size'"),
    (lambda d: _first(d).update(size="16"), "size of group"),
    (lambda d: _first(d).update(keep="0,1"), "must be a list"),
    (lambda d: _first(d)["keep"].__setitem__(0, 1.5), "integer"),
    (lambda d: d.update(meta=["gator"]), "'meta' must be a mapping"),
    (lambda d: d.update(input_shapes=[[2, "3", 32, 32]]), "input dimension"),
    (lambda d: d.update(input_shapes=[[4096, 3, 4096, 4096]]), "input elements"),
    (lambda d: d.update(input_shapes=[[1, 1, 4097, 4097]]), "input elements"),  # 16.8M: 1.7 GB per 1M traced
    (lambda d: d.update(input_dtypes=["complex64"]), "input dtype"),
    (lambda d: d.update(ignore="fc"), "'ignore'"),
    (lambda d: d.update(grups={}), r"unknown key\(s\) \['grups'\]"),  # a misspelt key was dropped
    (lambda d: _first(d).update(kept=[0]), r"not keys \['keep', 'kept', 'size'\]"),
    (lambda d: d.update(fingerprint="abc"), "'fingerprint'"),
])
def test_malformed_plan_files_give_one_clear_error(tmp_path, edit, fragment):
    model, plan = _pruned()
    path = tmp_path / "m.safetensors"
    # A crafted file carries a valid checksum: the checksum covers the tensors, not the plan's sense.
    save_state_file(model, path, {PLAN_KEY: json.dumps(_edited(plan, edit))})
    fresh = create_model("resnet20", num_classes=10)
    shapes = _shapes(fresh)
    with pytest.raises(CheckpointError, match=fragment):
        load_pruned(fresh, path)
    assert _shapes(fresh) == shapes


def test_a_crafted_gator_entry_cannot_swap_modules_in_load_pruned(tmp_path):
    model, plan = _pruned()
    path = tmp_path / "m.safetensors"
    bad = _edited(plan, lambda d: d["meta"].update(gator={"branches": [
        {"group": "layer1.0.conv1", "empty": [], "identity": ["layer3"], "constant": []}]}))
    save_state_file(model, path, {PLAN_KEY: json.dumps(bad)})
    with pytest.raises(CheckpointError, match="branch"):
        load_pruned(create_model("resnet20", num_classes=10), path)
