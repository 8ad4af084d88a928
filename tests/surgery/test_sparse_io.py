"""Compact sparse checkpoints: exact round trip, size, corruption handling; 2:4 kernel guard."""
import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from prunekit.core.errors import CheckpointError, PruningError
from prunekit.surgery.masks import apply_mask, get_mask, nm_mask, remove_masks, unstructured_mask
from prunekit.surgery.sparse_io import load_sparse, save_sparse, to_semi_structured_
from prunekit.testing.toy_models import TiedHead


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 64), nn.Linear(64, 10)
    )


def _sparse_net(seed=0):
    net = _net(seed)
    net[1].running_mean.uniform_()  # a buffer with no zeros
    apply_mask(net[0], "weight", unstructured_mask(net[0].weight, 0.9))
    apply_mask(net[4], "weight", unstructured_mask(net[4].weight, 0.9))
    apply_mask(net[5], "weight", nm_mask(net[5].weight, 2, 4))
    return net


def _flat_state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_round_trip_is_exact_and_restores_masks(tmp_path):
    src = _sparse_net()
    path = tmp_path / "net.safetensors"
    infos = save_sparse(src, path)
    assert infos["0.weight"]["encoding"] == "bitmask" and infos["0.weight"]["masked"]
    assert infos["5.weight"]["kind"] == "nm" and (infos["5.weight"]["n"], infos["5.weight"]["m"]) == (2, 4)
    assert infos["1.num_batches_tracked"]["encoding"] == "dense"
    dst = _net(seed=1)
    load_sparse(dst, path, restore_masks=True)
    for name in ("0", "4", "5"):
        assert torch.equal(getattr(dst, name).weight, getattr(src, name).weight)
        assert torch.equal(get_mask(getattr(dst, name), "weight"), get_mask(getattr(src, name), "weight"))
    x = torch.randn(2, 3, 8, 8)
    src.eval(), dst.eval()
    assert torch.equal(dst(x), src(x))
    remove_masks(src)
    remove_masks(dst)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())


def test_plain_model_with_zeros_round_trips_without_masks(tmp_path):
    src = _net()
    with torch.no_grad():
        src[4].weight.mul_(unstructured_mask(src[4].weight, 0.8))
    path = tmp_path / "plain.safetensors"
    assert save_sparse(src, path)["4.weight"]["masked"] is False
    dst = _net(seed=2)
    load_sparse(dst, path)
    assert get_mask(dst[4], "weight") is None
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())


def test_ninety_percent_sparse_file_is_under_a_quarter_of_dense(tmp_path):
    net = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    for layer in net:
        apply_mask(layer, "weight", unstructured_mask(layer.weight, 0.9))
        apply_mask(layer, "bias", unstructured_mask(layer.bias, 0.9))
    sparse_path, dense_path = tmp_path / "s.safetensors", tmp_path / "d.safetensors"
    save_sparse(net, sparse_path)
    remove_masks(net)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, dense_path)
    assert os.path.getsize(sparse_path) < 0.25 * os.path.getsize(dense_path)


def _assert_corrupt(path, net, match):
    before = _flat_state(net)
    with pytest.raises(CheckpointError, match=match):
        load_sparse(net, path)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())  # model untouched


def test_corrupt_files_raise_checkpoint_error(tmp_path):
    good = tmp_path / "good.safetensors"
    save_sparse(_sparse_net(), good)
    raw = good.read_bytes()
    target = _net(seed=3)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    _assert_corrupt(truncated, target, "cannot read")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    _assert_corrupt(garbage, target, "cannot read")

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    _assert_corrupt(plain, target, "no prunekit sparse metadata")

    tensors = load_file(good)
    with safe_open(str(good), "pt") as f:
        meta = json.loads(f.metadata()["prunekit_sparse"])
    tampered = dict(tensors)
    tampered["4.weight::values"] = tensors["4.weight::values"][:-1]
    bad_values = tmp_path / "values.safetensors"
    save_file(tampered, bad_values, metadata={"prunekit_sparse": json.dumps(meta)})
    _assert_corrupt(bad_values, target, "values for")

    meta_shape = json.loads(json.dumps(meta))
    meta_shape["tensors"]["4.weight"]["shape"] = [64, 500]
    bad_shape = tmp_path / "shape.safetensors"
    save_file(tensors, bad_shape, metadata={"prunekit_sparse": json.dumps(meta_shape)})
    _assert_corrupt(bad_shape, target, "bit bytes")

    meta_negative = json.loads(json.dumps(meta))  # same element count, so the bit count alone passes
    meta_negative["tensors"]["4.weight"]["shape"] = [-64, -576]
    negative = tmp_path / "negative.safetensors"
    save_file(tensors, negative, metadata={"prunekit_sparse": json.dumps(meta_negative)})
    _assert_corrupt(negative, target, "negative size")

    meta_inf = json.loads(json.dumps(meta))  # Infinity is valid JSON to Python's reader
    meta_inf["tensors"]["4.weight"]["shape"] = [float("inf"), 576]
    infinite = tmp_path / "inf.safetensors"
    save_file(tensors, infinite, metadata={"prunekit_sparse": json.dumps(meta_inf)})
    _assert_corrupt(infinite, target, "bad shape")

    meta_dtype = json.loads(json.dumps(meta))  # the values stay float32
    meta_dtype["tensors"]["4.weight"]["dtype"] = "float16"
    bad_dtype = tmp_path / "dtype.safetensors"
    save_file(tensors, bad_dtype, metadata={"prunekit_sparse": json.dumps(meta_dtype)})
    _assert_corrupt(bad_dtype, target, "its values are float32, its metadata says float16")

    meta_nm = json.loads(json.dumps(meta))
    meta_nm["tensors"]["4.weight"].update(kind="nm", n=2, m=4)
    bad_nm = tmp_path / "nm.safetensors"
    save_file(tensors, bad_nm, metadata={"prunekit_sparse": json.dumps(meta_nm)})
    _assert_corrupt(bad_nm, target, "N:M")


@pytest.mark.parametrize("where", ["values", "bits", "metadata"])
def test_a_flipped_bit_is_caught_by_the_checksums(tmp_path, where):
    """One bit flipped in the kept values, in the bit mask or in the metadata JSON: one
    CheckpointError, the target model unchanged (a flipped exponent bit loaded as 3.6e36)."""
    good = tmp_path / "good.safetensors"
    save_sparse(_sparse_net(), good)
    raw = bytearray(good.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    with safe_open(str(good), "pt") as f:
        names = list(f.keys())
    offsets = json.loads(raw[8:header])
    if where == "metadata":
        at = raw.index(b"bitmask", 8)  # inside the metadata's JSON string: still valid JSON
        raw[at] ^= 0x20  # "bitmask" -> "Bitmask", which the metadata checksum catches
    else:
        name = next(n for n in names if n.endswith("::" + where))
        start, end = offsets[name]["data_offsets"]
        raw[header + (start + end) // 2] ^= 0x40
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    _assert_corrupt(bad, _net(seed=3), "is corrupt")


def test_wrong_architecture_or_masked_target_is_refused(tmp_path):
    path = tmp_path / "net.safetensors"
    save_sparse(_sparse_net(), path)
    other = nn.Sequential(nn.Linear(4, 4))
    _assert_corrupt(path, other, "does not fit")
    masked = _net()
    apply_mask(masked[4], "weight", torch.ones_like(masked[4].weight, dtype=torch.bool))
    with pytest.raises(CheckpointError, match="without masks"):
        load_sparse(masked, path)


class _Versioned(nn.Module):
    """A module that, like torchvision's MNASNet, refuses a state dict without its version."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        if local_metadata.get("version") != 2:
            raise ValueError(f"version should be 2 instead of {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


def test_module_state_versions_survive_the_sparse_file(tmp_path):
    # torchvision's MNASNet saved with save_sparse did not load again: a raw ValueError
    torch.manual_seed(0)
    net = nn.Sequential(_Versioned(), nn.Linear(16, 4))
    apply_mask(net[0].lin, "weight", unstructured_mask(net[0].lin.weight, 0.9))
    save_sparse(net, tmp_path / "v.safetensors")
    twin = nn.Sequential(_Versioned(), nn.Linear(16, 4))
    load_sparse(twin, tmp_path / "v.safetensors", restore_masks=True)
    assert torch.equal(twin[0].lin.weight, net[0].lin.weight) and get_mask(twin[0].lin, "weight") is not None


def test_save_failure_leaves_no_file(tmp_path):
    net = nn.Module()
    net.register_buffer("a::b", torch.zeros(2))
    path = tmp_path / "x.safetensors"
    with pytest.raises(CheckpointError, match="reserves"):
        save_sparse(net, path)
    assert not path.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0), reason="an Ampere+ GPU is present"
)
def test_semi_structured_needs_an_ampere_gpu():
    net = nn.Sequential(nn.Linear(64, 64))
    apply_mask(net[0], "weight", nm_mask(net[0].weight))
    with pytest.raises(PruningError, match="Ampere"):
        to_semi_structured_(net)
    assert get_mask(net[0], "weight") is not None  # untouched


def test_semi_structured_copy_leaves_the_original_masked(monkeypatch):
    # no GPU needed: fake an Ampere device and the conversion; what is checked is the module swap
    net = nn.Sequential(nn.Linear(64, 64))
    apply_mask(net[0], "weight", nm_mask(net[0].weight))
    fast = copy.deepcopy(net)  # deep copies share torch's generated ParametrizedLinear class
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda t: t.clone())
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert to_semi_structured_(fast) == ["0"]
    monkeypatch.undo()
    assert type(fast[0]) is nn.Linear
    x = torch.randn(2, 64)
    torch.testing.assert_close(net(x), fast(x), rtol=0, atol=0)  # the original still has its masked weight
    assert get_mask(net[0], "weight") is not None


def test_restoring_a_masked_weight_tied_to_an_unmasked_one_keeps_the_unmasked_values(tmp_path):
    # the head's masked zeros were loaded into the tensor it shares with the embedding
    torch.manual_seed(0)
    src, x = TiedHead(), torch.randint(0, 16, (2, 5))
    apply_mask(src.head, "weight", unstructured_mask(src.head.weight, 0.5))
    save_sparse(src, tmp_path / "tied.safetensors")
    dst = TiedHead()
    load_sparse(dst, tmp_path / "tied.safetensors", restore_masks=True)
    assert torch.equal(dst.emb.weight, src.emb.weight)
    assert torch.equal(get_mask(dst.head, "weight"), get_mask(src.head, "weight"))
    assert torch.equal(dst(x), src(x))


def test_a_masked_layer_called_twice_round_trips(tmp_path):
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    src, x = nn.Sequential(layer, nn.ReLU(), layer), torch.randn(3, 8)
    apply_mask(layer, "weight", unstructured_mask(layer.weight, 0.5))
    infos = save_sparse(src, tmp_path / "twice.safetensors")
    assert set(infos) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    twin = nn.Linear(8, 8)
    dst = nn.Sequential(twin, nn.ReLU(), twin)
    load_sparse(dst, tmp_path / "twice.safetensors", restore_masks=True)
    assert torch.equal(get_mask(twin, "weight"), get_mask(layer, "weight"))
    assert torch.equal(dst(x), src(x))


def test_a_mask_recorded_on_a_tensor_that_cannot_carry_one_is_refused_before_loading(tmp_path):
    """A file that marks an integer buffer as masked: restore_masks=True refuses it with the
    model untouched (the weights were loaded and the earlier masks applied before it failed)."""
    good = tmp_path / "good.safetensors"
    save_sparse(_sparse_net(), good)
    tensors = load_file(good)
    with safe_open(str(good), "pt") as f:
        meta = json.loads(f.metadata()["prunekit_sparse"])
    name = "1.num_batches_tracked"
    meta["tensors"][name].update(encoding="bitmask", masked=True, kind="irregular")
    tensors[f"{name}::bits"] = torch.tensor([128], dtype=torch.uint8)
    tensors[f"{name}::values"] = tensors.pop(name).reshape(1)
    path = tmp_path / "int_mask.safetensors"
    save_file(tensors, path, metadata={"prunekit_sparse": json.dumps(meta)})
    target = _net(seed=3)
    before = _flat_state(target)
    with pytest.raises(CheckpointError, match="num_batches_tracked.*floating-point"):
        load_sparse(target, path, restore_masks=True)
    assert list(target.state_dict()) == list(before)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())


def test_an_nm_mask_on_a_transposed_conv_is_described_and_checked_as_nm(tmp_path):
    """A transposed conv's weight is (in, out / groups, k, k): its inputs run along dim 0, so its
    N:M mask (runs of inputs, as SLR makes it) is read in a conv's layout, not called irregular."""
    from prunekit.methods.slr import SLRConfig, hard_prune_
    from prunekit.surgery.mask_io import describe_masks

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ConvTranspose2d(8, 12, 3, groups=2))
    x = torch.randn(2, 1, 6, 6)
    hard_prune_(net, SLRConfig(sparsity_type="nm", layers=["1"]), example_inputs=x)
    weight = net[1].weight.detach()  # (8, 6, 3, 3): runs of 4 inputs lie along dim 0, per group
    runs = weight.reshape(2, 4, 6, 9).ne(0).sum(dim=1)
    assert bool((runs == 2).all())
    assert {k: v for k, v in describe_masks(net)["tensors"]["1.weight"].items() if k in ("kind", "n", "m")} == \
        {"kind": "nm", "n": 2, "m": 4}
    infos = save_sparse(net, tmp_path / "t.safetensors")
    assert (infos["1.weight"]["kind"], infos["1.weight"]["n"], infos["1.weight"]["m"]) == ("nm", 2, 4)
    fresh = copy.deepcopy(net)
    remove_masks(fresh)
    load_sparse(fresh, tmp_path / "t.safetensors", restore_masks=True)
    assert torch.equal(get_mask(fresh[1], "weight"), get_mask(net[1], "weight"))


def test_a_file_recording_a_transposed_conv_s_nm_mask_in_its_stored_layout_still_loads(tmp_path):
    """Files written before N:M was read in a conv's layout recorded it along the stored dim 1."""
    net = nn.Sequential(nn.ConvTranspose2d(8, 8, 3, groups=2))
    apply_mask(net[0], "weight", nm_mask(net[0].weight, 2, 4, dim=1))  # runs along the stored dim 1
    path = tmp_path / "new.safetensors"
    assert save_sparse(net, path)["0.weight"]["kind"] == "irregular"  # in a conv's layout it is not N:M
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    meta = json.loads(metadata["prunekit_sparse"])
    meta["tensors"]["0.weight"].update(kind="nm", n=2, m=4)  # as the earlier reader recorded it
    path = tmp_path / "old.safetensors"  # and without the checksums, which such files did not carry
    old = {k: v for k, v in metadata.items() if k not in ("prunekit.sha256", "prunekit.meta_sha256")}
    save_file(tensors, path, metadata={**old, "prunekit_sparse": json.dumps(meta)})
    fresh = nn.Sequential(nn.ConvTranspose2d(8, 8, 3, groups=2))
    load_sparse(fresh, path, restore_masks=True)
    assert torch.equal(get_mask(fresh[0], "weight"), get_mask(net[0], "weight"))
