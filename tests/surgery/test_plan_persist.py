"""Plans are plain JSON and replay exactly; pruned models round-trip through safetensors."""
import json

import pytest
import torch

from prunekit.core.errors import CheckpointError, PruningError
from prunekit.methods import prune_
from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.models import create_model
from prunekit.surgery.persist import load_pruned, read_plan, save_pruned
from prunekit.surgery.plan import Plan, apply_plan_, load_plan, save_plan
from prunekit.surgery import tensor_file
from prunekit.testing.checks import randomise_norms_

X = torch.randn(2, 3, 32, 32)


def _dense(seed=0):
    """resnet20 with random norm statistics and affine terms, so that a wrongly kept channel shows up."""
    torch.manual_seed(seed)
    return randomise_norms_(create_model("resnet20", num_classes=10).eval())


def _pruned(steps=1, seed=0):
    model = _dense(seed)
    result = prune_(model, MagnitudeConfig(channel_ratio=0.4, steps=steps, probe=False), X)
    return model, result.plan


@pytest.mark.parametrize("steps", [1, 3])
def test_replayed_plan_equals_original(steps, tmp_path):
    model, plan = _pruned(steps)
    save_plan(plan, tmp_path / "plan.json")
    data = json.loads((tmp_path / "plan.json").read_text())  # human-readable JSON
    assert data["format"] == "prunekit.plan" and all("keep" in g for g in data["groups"].values())
    fresh = _dense()  # the same dense weights: replaying must keep exactly the channels the pruner kept
    apply_plan_(fresh, load_plan(tmp_path / "plan.json"))
    replayed, pruned = fresh.state_dict(), model.state_dict()
    assert replayed.keys() == pruned.keys()
    for key, value in pruned.items():
        assert torch.equal(replayed[key], value), key
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))


def test_composed_iterative_plan_keeps_original_numbering():
    _, plan = _pruned(steps=3)
    for name, keep in plan.groups.items():
        assert keep == sorted(set(keep)) and keep[-1] < plan.sizes[name]


def test_prunings_with_different_ignore_lists_compose_and_reload(tmp_path):
    """A pruning that ignored layer3, then one that pruned layer3: the composed plan replays on a
    trace that ignores only what both ignored (the first's list would make layer3 unprunable)."""
    model = _dense()
    first = prune_(model, MagnitudeConfig(channel_ratio=0.4, probe=False, ignore=["layer3", "fc"]), X).plan
    second = prune_(model, MagnitudeConfig(channel_ratio=0.4, probe=False, ignore=["fc"]), X).plan
    assert any(name.startswith("layer3") for name in second.groups)
    both = first.compose(second)
    assert both.ignore == ["fc"]
    path = save_pruned(model, both, tmp_path / "m.safetensors")
    again = load_pruned(_dense(), path).eval()
    with torch.no_grad():
        assert torch.equal(again(X), model(X))
    assert Plan(ignore=["layer3"]).compose(second).ignore == ["fc"]  # a plan that removes nothing adds none


def test_plans_whose_group_widths_disagree_do_not_compose():
    """The first pruning keeps one of a grouped conv's two groups, and the conv becomes a plain
    one: the second's group "0" counts 4 channels where the first kept one conv group. Composing
    them is refused by name, not an IndexError or a plan that keeps the wrong channels."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 16, 3, padding=1, groups=2), torch.nn.Conv2d(16, 4, 1))
    x = torch.randn(2, 3, 8, 8)
    first = prune_(model, MagnitudeConfig(channel_ratio=0.5, round_to=None, probe=False), x).plan
    second = prune_(model, MagnitudeConfig(channel_ratio=0.5, round_to=None, probe=False), x).plan
    assert (first.sizes["0"], len(first.groups["0"]), second.sizes["0"]) == (2, 1, 4)
    with pytest.raises(PruningError, match="group '0'"):
        first.compose(second)


def test_save_and_load_pruned_round_trip(tmp_path):
    model, plan = _pruned()
    path = save_pruned(model, plan, tmp_path / "m.safetensors")
    assert read_plan(path).groups == plan.groups
    again = load_pruned(create_model("resnet20", num_classes=10), path).eval()
    with torch.no_grad():
        assert torch.equal(again(X), model(X))


def test_corrupt_or_foreign_files_raise_and_leave_model_alone(tmp_path):
    model, plan = _pruned()
    good = save_pruned(model, plan, tmp_path / "m.safetensors")
    fresh = create_model("resnet20", num_classes=10)
    shapes = {k: v.shape for k, v in fresh.state_dict().items()}
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_pruned(fresh, bad)
    with pytest.raises(CheckpointError, match="same architecture|does not have"):
        load_pruned(create_model("resnet32", num_classes=10), good)
    other = create_model("resnet20", num_classes=100)
    with pytest.raises(CheckpointError):
        load_pruned(other, good)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == shapes
    with pytest.raises(CheckpointError, match="not a prunekit plan"):
        Plan.from_dict({"groups": {}})


def _with_metadata(src, dst, key, value):
    """Copy a safetensors file with one metadata entry replaced (the tensors stay intact) and the
    metadata checksum made to match: a crafted file, which the checksum (not a signature) lets
    through, so the loader's own checks of each entry are what is tested."""
    import struct

    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["__metadata__"][key] = value
    meta = header["__metadata__"]
    meta[tensor_file.META_SHA_KEY] = tensor_file._metadata_sha256(meta)
    blob = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    return dst


@pytest.mark.parametrize("key", ["prunekit.plan", "prunekit.aliases", "prunekit.module_versions"])
def test_hostile_nested_json_in_a_pruned_file_is_a_checkpoint_error(tmp_path, key):
    # JSON nested 50,000 deep makes Python's decoder raise RecursionError, not a ValueError.
    model, plan = _pruned()
    good = save_pruned(model, plan, tmp_path / "m.safetensors")
    bad = _with_metadata(good, tmp_path / "deep.safetensors", key, "[" * 50_000 + "]" * 50_000)
    fresh = create_model("resnet20", num_classes=10)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match="deep.safetensors"):
        load_pruned(fresh, bad)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("version", ["2", [2]])
def test_module_versions_that_are_not_whole_numbers_are_a_checkpoint_error(tmp_path, version):
    # BatchNorm compares its version with 2: a string or a list from an edited file was a raw TypeError
    model, plan = _pruned()
    good = save_pruned(model, plan, tmp_path / "m.safetensors")
    bad = _with_metadata(good, tmp_path / "versions.safetensors", "prunekit.module_versions",
                         json.dumps({"bn1": {"version": version}}))
    with pytest.raises(CheckpointError, match="versions.safetensors.*version that is not a whole number"):
        load_pruned(create_model("resnet20", num_classes=10), bad)


def test_a_plan_file_that_is_not_json_text_is_a_checkpoint_error(tmp_path):
    for name, data in [("binary.json", b"\xff\xfe\x00 not text"), ("deep.json", b"[" * 50_000 + b"]" * 50_000)]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=f"plan .*{name}.* (is not valid JSON|cannot be read)"):
            load_plan(tmp_path / name)


def test_a_failed_plan_write_leaves_the_previous_plan_whole(tmp_path, monkeypatch):
    # save_plan wrote in place: a full disk left a truncated plan.json and a raw OSError
    import errno
    import pathlib

    _, plan = _pruned()
    save_plan(plan, tmp_path / "plan.json")
    before = (tmp_path / "plan.json").read_bytes()
    own = pathlib.Path.write_text

    def no_space(self, *args, **kwargs):
        own(self, "{\"format\": ")  # the writer got this far before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", no_space)
    with pytest.raises(CheckpointError, match="plan.json: no space left"):
        save_plan(plan, tmp_path / "plan.json")
    monkeypatch.undo()
    assert (tmp_path / "plan.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_the_last_of_two_plans_saved_alone_says_to_save_the_composed_plan(tmp_path):
    """Prune twice and save only the second plan: it starts from the once-pruned model, so a fresh
    model cannot take it; the error says to save first.compose(second), which loads."""
    torch.manual_seed(0)
    model, x = create_model("small_cnn", 10), torch.randn(1, 1, 8, 8)
    first = prune_(model, MagnitudeConfig(channel_ratio=0.25, round_to=None), x)
    second = prune_(model, MagnitudeConfig(channel_ratio=0.25, round_to=None), x)
    save_pruned(model, second.plan, tmp_path / "last.safetensors")
    with pytest.raises(CheckpointError, match=r"save the composed plan \(first\.plan\.compose\(second\.plan\)\)"):
        load_pruned(create_model("small_cnn", 10), tmp_path / "last.safetensors")
    save_pruned(model, first.plan.compose(second.plan), tmp_path / "both.safetensors")
    loaded = load_pruned(create_model("small_cnn", 10), tmp_path / "both.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x))


def test_a_channels_last_model_reloads_channels_last(tmp_path):
    """save_pruned records the layout the model runs in (memory_format='channels_last', or what
    'auto' chose); the file's tensors are plain, so load_pruned puts the layout back."""
    import torch
    from torch import nn

    from prunekit.core.errors import CheckpointError
    from prunekit.core.layout import is_channels_last
    from prunekit.methods import prune_
    from prunekit.methods.magnitude import MagnitudeConfig
    from prunekit.surgery.persist import load_pruned, read_plan, save_pruned

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 8, 3, padding=1)).eval()

    x = torch.randn(2, 3, 8, 8)
    for fmt, expect in (("channels_last", True), ("contiguous", False)):
        model = build()
        r = prune_(model, MagnitudeConfig(channel_ratio=0.5, memory_format=fmt), x)
        path = save_pruned(model, r.plan, tmp_path / f"{fmt}.safetensors")
        back = load_pruned(build(), path)
        assert is_channels_last(back) == expect
        assert torch.allclose(back(x), model(x), atol=1e-5)
    plan = read_plan(tmp_path / "channels_last.safetensors")
    assert plan.meta["memory_format"] == "channels_last"
    assert "memory_format" not in read_plan(tmp_path / "contiguous.safetensors").meta
    import prunekit.surgery.persist as persist
    plan.meta["memory_format"] = "sideways"  # an entry no prunekit writes is refused, not ignored
    real = persist._plan_of
    persist._plan_of = lambda meta, path: plan
    try:
        with pytest.raises(CheckpointError, match="memory_format.*damaged"):
            load_pruned(build(), tmp_path / "channels_last.safetensors")
    finally:
        persist._plan_of = real


def test_a_directory_given_as_the_weights_file_names_the_file_inside(tmp_path):
    """It read 'No such device (os error 19)'."""
    (tmp_path / "pruned.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"it is a directory; give {tmp_path / 'pruned.safetensors'}"):
        load_pruned(create_model("small_cnn"), tmp_path)
    with pytest.raises(CheckpointError, match="it is a directory; give a .safetensors file"):
        load_pruned(create_model("small_cnn"), tmp_path.parent)
