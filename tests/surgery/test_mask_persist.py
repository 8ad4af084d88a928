"""Weight masks through save_pruned/load_pruned, and the module versions some modules need.

Oracles: the reloaded model equals the saved one output for output, carries the same `Mask`
parametrizations (same bits), the file's tensors hold exactly the masked zeros, and baking
gives plain parameters with the same outputs.
"""
from __future__ import annotations


import pytest
import torch
from safetensors import safe_open
from torch import nn

from prunekit import bake_masks_
from prunekit.core.errors import CheckpointError
from prunekit.methods import prune_
from prunekit.methods.magnitude import MagnitudeConfig
from prunekit.models import create_model
from prunekit.surgery.mask_io import describe_masks, mask_kind
from prunekit.surgery.masks import Mask, apply_mask, get_mask, masked_modules, nm_mask, unstructured_mask
from prunekit.surgery.persist import PLAN_KEY, load_pruned, read_plan, save_pruned
from prunekit.surgery.plan import empty_plan
from prunekit.surgery.projections import projection_mask
from prunekit.surgery.tensor_file import write_tensor_file
from prunekit.testing.toy_models import TiedHead
from zoo_imports import import_zoo

X = torch.randn(2, 3, 32, 32)


def _masked_resnet(seed: int = 0):
    """resnet20 with 3 channels pruned away, then irregular, 2:4 and pattern masks on three convs."""
    torch.manual_seed(seed)
    model = create_model("resnet20", num_classes=10).eval()
    plan = prune_(model, MagnitudeConfig(channel_ratio=0.2, probe=False), X).plan
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    nm_conv = next(m for m in convs[3:] if m.in_channels % 4 == 0)  # 2:4 needs inputs in runs of 4
    apply_mask(convs[1], "weight", unstructured_mask(convs[1].weight, 0.7))
    apply_mask(nm_conv, "weight", nm_mask(nm_conv.weight, 2, 4))
    apply_mask(convs[2], "weight", projection_mask(convs[2].weight, "pattern"))
    return model, plan


def test_masks_round_trip_into_a_fresh_model(tmp_path):
    model, plan = _masked_resnet()
    path = save_pruned(model, plan, tmp_path / "m.safetensors")
    again = load_pruned(create_model("resnet20", num_classes=10), path).eval()
    with torch.no_grad():
        assert torch.equal(again(X), model(X))
    saved = {n: get_mask(m, p) for n, m, p in masked_modules(model)}
    loaded = {n: get_mask(m, p) for n, m, p in masked_modules(again)}
    assert saved.keys() == loaded.keys() and len(saved) == 3
    for name in saved:
        assert torch.equal(loaded[name], saved[name].expand_as(loaded[name])), name
        assert isinstance(again.get_submodule(name).parametrizations.weight[0], Mask)


def test_file_holds_the_effective_weights_and_describes_the_masks(tmp_path):
    model, plan = _masked_resnet()
    path = save_pruned(model, plan, tmp_path / "m.safetensors")
    desc = read_plan(path).meta["masks"]
    assert desc == describe_masks(model)
    kinds = [(d["kind"], d.get("n"), d.get("m")) for d in desc["tensors"].values()]
    assert sorted(kinds, key=str) == sorted([("irregular", None, None), ("nm", 2, 4), ("pattern", None, None)], key=str)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert not any("parametrizations" in k for k in keys)
        for name, d in desc["tensors"].items():
            w = f.get_tensor(name)
            assert int((w == 0).sum()) == d["masked"], name  # exactly the masked zeros
            assert f"{name}::mask" in keys and f.get_tensor(f"{name}::mask").numel() == -(-w.numel() // 8)
    assert desc["masked"] == sum(d["masked"] for d in desc["tensors"].values())


def test_bake_for_export_gives_plain_parameters_with_the_same_outputs(tmp_path):
    model, plan = _masked_resnet()
    again = load_pruned(create_model("resnet20", num_classes=10), save_pruned(model, plan, tmp_path / "m.safetensors"))
    again.eval()
    with torch.no_grad():
        want = again(X)
        bake_masks_(again)
        assert torch.equal(again(X), want)
    assert not masked_modules(again) and not any("parametrizations" in k for k in again.state_dict())
    # a baked model saves and reloads as a plain pruned model (no masks described)
    path = save_pruned(again, plan, tmp_path / "baked.safetensors")
    assert read_plan(path).meta["masks"]["tensors"] == {}
    with torch.no_grad():
        assert torch.equal(load_pruned(create_model("resnet20", num_classes=10), path).eval()(X), want)


def test_loading_into_a_masked_model_is_refused(tmp_path):
    model, plan = _masked_resnet()
    path = save_pruned(model, plan, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="freshly built"):
        load_pruned(model, path)


def test_masks_that_disagree_with_the_plan_are_refused(tmp_path):
    lin = nn.Sequential(nn.Linear(8, 4))
    apply_mask(lin[0], "weight", unstructured_mask(lin[0].weight, 0.5))
    good = save_pruned(lin, empty_plan(torch.zeros(1, 8)), tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    lying = read_plan(good)
    lying.meta["masks"]["tensors"]["0.weight"]["masked"] = 3  # the bits remove 16
    bad = tmp_path / "bad.safetensors"
    write_tensor_file(bad, tensors, {**meta, PLAN_KEY: lying.to_json()})
    with pytest.raises(CheckpointError, match="damaged"):
        load_pruned(nn.Sequential(nn.Linear(8, 4)), bad)
    negative = read_plan(good)
    negative.meta["masks"]["tensors"]["0.weight"]["shape"] = [-4, -8]  # as many entries as (4, 8)
    write_tensor_file(bad, tensors, {**meta, PLAN_KEY: negative.to_json()})
    fresh = nn.Sequential(nn.Linear(8, 4))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match="negative size"):
        load_pruned(fresh, bad)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    for key, value, fragment in (("shape", [float("inf"), 8], "not a list of whole numbers"),
                                 ("shape", [4.0, 8.0], "not a list of whole numbers"),
                                 ("masked", float("inf"), "not a whole number")):
        edited = read_plan(good)
        edited.meta["masks"]["tensors"]["0.weight"][key] = value  # Infinity is valid JSON to Python
        write_tensor_file(bad, tensors, {**meta, PLAN_KEY: edited.to_json()})
        with pytest.raises(CheckpointError, match=fragment):
            load_pruned(fresh, bad)


def test_a_crafted_file_whose_weights_or_kinds_disagree_with_its_masks_is_refused(tmp_path):
    """Checksums detect damage, not edits: a file whose mask bits were moved (same count) or whose
    irregular mask is described as 2:4, checksums written again, loaded without a word."""
    lin = nn.Sequential(nn.Linear(8, 4))
    apply_mask(lin[0], "weight", unstructured_mask(lin[0].weight, 0.5))
    good = save_pruned(lin, empty_plan(torch.zeros(1, 8)), tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    bad, fresh = tmp_path / "bad.safetensors", nn.Sequential(nn.Linear(8, 4))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    bits = tensors["0.weight::mask"]
    moved = {**tensors, "0.weight::mask": bits.roll(1)}  # the same count, other entries
    assert not torch.equal(moved["0.weight::mask"], bits)
    write_tensor_file(bad, moved, meta)
    with pytest.raises(CheckpointError, match=r"0.weight is nonzero where its stored mask removes entries"):
        load_pruned(fresh, bad)
    relabelled = read_plan(good)
    relabelled.meta["masks"]["tensors"]["0.weight"].update(kind="nm", n=2, m=4)
    write_tensor_file(bad, tensors, {**meta, PLAN_KEY: relabelled.to_json()})
    with pytest.raises(CheckpointError, match=r"described as \{'kind': 'nm', 'n': 2, 'm': 4\} but is "):
        load_pruned(fresh, bad)
    short = {**tensors, "0.weight::mask": bits[:-1]}
    write_tensor_file(bad, short, meta)
    with pytest.raises(CheckpointError, match=r"bad.safetensors: the mask on 0.weight: packed mask of 3 "):
        load_pruned(fresh, bad)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    assert load_pruned(fresh, good)[0].weight.eq(0).sum() == 16


def test_a_file_that_described_an_all_zero_mask_as_0_of_m_still_loads(tmp_path):
    """Files written before an all-zero mask was called 'irregular' describe it as N:M 0:2."""
    lin = nn.Sequential(nn.Linear(8, 4))
    apply_mask(lin[0], "weight", torch.zeros(4, 8, dtype=torch.bool))
    good = save_pruned(lin, empty_plan(torch.zeros(1, 8)), tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    old = read_plan(good)
    old.meta["masks"]["tensors"]["0.weight"].update(kind="nm", n=0, m=2)
    write_tensor_file(tmp_path / "old.safetensors", tensors, {**meta, PLAN_KEY: old.to_json()})
    assert not load_pruned(nn.Sequential(nn.Linear(8, 4)), tmp_path / "old.safetensors")[0].weight.any()


def test_mask_kinds_are_recognised():
    w = torch.randn(8, 8, 3, 3)
    assert mask_kind(unstructured_mask(w, 0.5)) == {"kind": "irregular"}
    assert mask_kind(nm_mask(torch.randn(4, 16), 2, 4))["kind"] == "nm"
    assert mask_kind(projection_mask(w, "pattern")) == {"kind": "pattern"}
    assert mask_kind(torch.zeros(4, 16, dtype=torch.bool)) == {"kind": "irregular"}  # not "0:2"


class Versioned(nn.Module):
    """A module that, like torchvision's MNASNet, refuses a state dict without its version."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") != 2:
            raise ValueError(f"version should be 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def test_module_state_versions_survive_the_file(tmp_path):
    model = nn.Sequential(Versioned(), nn.ReLU(), nn.Linear(4, 2))
    path = save_pruned(model, empty_plan(torch.zeros(1, 4)), tmp_path / "v.safetensors")
    again = load_pruned(nn.Sequential(Versioned(), nn.ReLU(), nn.Linear(4, 2)), path)
    x = torch.randn(3, 4)
    assert torch.equal(again(x), model(x))


def _torchvision_models():
    return import_zoo("torchvision.models")


def test_pruned_torchvision_mnasnet_saves_and_reloads(tmp_path):
    tvm = _torchvision_models()
    torch.manual_seed(0)
    model = tvm.mnasnet0_5(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    plan = prune_(model, MagnitudeConfig(channel_ratio=0.3, probe=False), x).plan
    path = save_pruned(model, plan, tmp_path / "mnasnet.safetensors")
    again = load_pruned(tvm.mnasnet0_5(weights=None), path).eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


class _OnDevice(torch.Tensor):
    """What `.cpu()` does to a GPU tensor: a new CPU copy (strides kept) that nothing else holds."""

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor).clone()


def test_weights_of_a_gpu_model_in_channels_last_are_each_stored(tmp_path, monkeypatch):
    # The CPU copy of a channels_last GPU weight was freed after contiguous() copied it again,
    # and the next copy of the same shape could land at its address: that weight was then
    # stored as an alias of the earlier one and loaded with its values.
    from prunekit.surgery import tensor_file

    torch.manual_seed(0)
    make = lambda: nn.Sequential(*[nn.Conv2d(8, 8, 3) for _ in range(8)])  # noqa: E731
    model = make().to(memory_format=torch.channels_last)
    own = tensor_file.effective_state
    monkeypatch.setattr(tensor_file, "effective_state", lambda m: {
        name: (t.as_subclass(_OnDevice), mask) for name, (t, mask) in own(m).items()})
    path = save_pruned(model, empty_plan(torch.zeros(1, 8, 20, 20)), tmp_path / "gpu.safetensors")
    monkeypatch.undo()
    again = load_pruned(make(), path)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_a_masked_weight_tied_to_an_unmasked_one_round_trips(tmp_path):
    # Element methods mask Linear weights, not embeddings: the head's zeros were loaded into the
    # shared tensor, so the reloaded embedding lost half its entries
    torch.manual_seed(0)
    model, x = TiedHead(), torch.randint(0, 16, (2, 5))
    apply_mask(model.head, "weight", unstructured_mask(model.head.weight, 0.5))
    path = save_pruned(model, empty_plan(x), tmp_path / "tied.safetensors")
    again = load_pruned(TiedHead(), path)
    assert torch.equal(again.emb.weight, model.emb.weight)
    assert torch.equal(again(x), model(x))
    assert torch.equal(get_mask(again.head, "weight"), get_mask(model.head, "weight"))


class _SharedByTwo(nn.Module):
    """Two layers holding one weight."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_weight_masked_differently_by_the_two_layers_sharing_it_round_trips(tmp_path):
    # each layer's entry holds its own zeros; the one loaded last overwrote the shared tensor,
    # so the other layer lost the entries only its own mask keeps
    torch.manual_seed(0)
    model, x = _SharedByTwo(), torch.randn(3, 8)
    apply_mask(model.a, "weight", unstructured_mask(model.a.weight, 0.5))
    apply_mask(model.b, "weight", torch.rand(8, 8) < 0.5)
    path = save_pruned(model, empty_plan(x), tmp_path / "shared.safetensors")
    again = load_pruned(_SharedByTwo(), path)
    assert again.a.parametrizations.weight.original is again.b.parametrizations.weight.original
    for name in ("a", "b"):
        assert torch.equal(getattr(again, name).weight, getattr(model, name).weight), name
        assert torch.equal(get_mask(getattr(again, name), "weight"), get_mask(getattr(model, name), "weight")), name
    assert torch.equal(again(x), model(x))


class _CalledTwice(nn.Module):
    """One Linear applied twice (the same module under two names)."""

    def __init__(self):
        super().__init__()
        layer = nn.Linear(8, 8)
        self.seq = nn.Sequential(layer, nn.ReLU(), layer)

    def forward(self, x):
        return self.seq(x)


def test_a_masked_layer_called_twice_round_trips(tmp_path):
    # its second name was written as "seq.2.parametrizations.weight.original" and "...0.mask",
    # which no freshly built model has: the file could not be loaded
    torch.manual_seed(0)
    model, x = _CalledTwice(), torch.randn(3, 8)
    apply_mask(model.seq[0], "weight", unstructured_mask(model.seq[0].weight, 0.5))
    path = save_pruned(model, empty_plan(x), tmp_path / "twice.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert not any("parametrizations" in k for k in f.keys())
    again = load_pruned(_CalledTwice(), path)
    assert again.seq[0] is again.seq[2]
    assert torch.equal(get_mask(again.seq[0], "weight"), get_mask(model.seq[0], "weight"))
    assert int((again.seq[0].weight == 0).sum()) == 32
    assert torch.equal(again(x), model(x))


def test_a_masked_model_that_is_a_single_layer_saves_with_its_plan(tmp_path):
    # the fingerprint read the root's "parametrizations.weight.original" as another tensor than
    # "weight", so the plan recorded on the unmasked layer was refused
    from prunekit.surgery.plan import prune_channels_

    torch.manual_seed(0)
    model, x = nn.Linear(8, 4), torch.randn(3, 8)
    plan = prune_channels_(model, x, {})
    apply_mask(model, "weight", unstructured_mask(model.weight, 0.5))
    again = load_pruned(nn.Linear(8, 4), save_pruned(model, plan, tmp_path / "lin.safetensors"))
    assert torch.equal(get_mask(again, "weight"), get_mask(model, "weight"))
    assert torch.equal(again(x), model(x))


def test_a_save_that_fails_leaves_the_plan_as_it_was_and_writes_nothing(tmp_path):
    """A weight under weight_norm besides a Mask cannot be saved; plan.meta had gained a 'masks'
    entry by then."""
    from prunekit.core.errors import PruningError

    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
    plan = empty_plan(torch.zeros(1, 8))
    apply_mask(model[1], "weight", unstructured_mask(model[1].weight, 0.5))
    torch.nn.utils.parametrizations.weight_norm(model[0])
    before = plan.to_json()
    with pytest.raises(PruningError, match="parametrizations other than a prunekit Mask"):
        save_pruned(model, plan, tmp_path / "m.safetensors")
    assert plan.to_json() == before and "masks" not in plan.meta
    assert not list(tmp_path.iterdir())


def test_masks_described_in_another_format_version_are_refused(tmp_path):
    # the version of plan.meta["masks"] was written but never read: a file whose masks follow
    # another layout loaded as if they were this one's
    lin = nn.Sequential(nn.Linear(8, 4))
    apply_mask(lin[0], "weight", unstructured_mask(lin[0].weight, 0.5))
    good = save_pruned(lin, empty_plan(torch.zeros(1, 8)), tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    other = read_plan(good)
    other.meta["masks"]["format_version"] = 2
    bad = tmp_path / "v2.safetensors"
    write_tensor_file(bad, tensors, {**meta, PLAN_KEY: other.to_json()})
    fresh = nn.Sequential(nn.Linear(8, 4))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match="v2.safetensors.*masks format version 2.*reads 1"):
        load_pruned(fresh, bad)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_file_loads_into_a_fresh_model_already_in_half_precision(tmp_path, dtype):
    # the replay traced the model with the plan's float32 example, so a model built and cast to
    # float16 (or moved to the GPU) before loading was refused as "another architecture"
    model, plan = _masked_resnet()
    path = save_pruned(model, plan, tmp_path / "m.safetensors")
    again = load_pruned(create_model("resnet20", num_classes=10).to(dtype), path).eval()
    want = load_pruned(create_model("resnet20", num_classes=10), path).to(dtype).eval()
    assert all(p.dtype == dtype for p in again.parameters())
    with torch.no_grad():
        assert torch.equal(again(X.to(dtype)), want(X.to(dtype)))
    assert {n for n, _, _ in masked_modules(again)} == {n for n, _, _ in masked_modules(model)}


def test_a_fresh_model_on_the_meta_device_is_refused(tmp_path):
    # its tensors hold no values, so loading would copy nothing and hand back a model on meta
    model, plan = _masked_resnet()
    path = save_pruned(model, plan, tmp_path / "m.safetensors")
    with torch.device("meta"):
        shell = create_model("resnet20", num_classes=10)
    with pytest.raises(CheckpointError, match="meta device"):
        load_pruned(shell, path)


def test_a_compiled_model_saves_and_a_compiled_fresh_model_loads(tmp_path):
    # torch.compile's wrapper names every tensor "_orig_mod.<name>": save_pruned refused the
    # pruned model as "another architecture" and load_pruned refused the freshly built one
    model, plan = _masked_resnet()
    path = save_pruned(torch.compile(model), plan, tmp_path / "compiled.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert not any(k.startswith("_orig_mod") for k in f.keys())
    again = load_pruned(torch.compile(create_model("resnet20", num_classes=10)), path).eval()
    with torch.no_grad():
        assert torch.equal(again(X), model(X))
