"""load_data on real digits: shapes, a disjoint val split, determinism, normalisation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from prunekit.core.errors import ConfigError
from prunekit.data import DataConfig, load_data
from prunekit.data.digits import load_digits_arrays
from prunekit.data.sources import carve, channel_stats, stratified_carve


def rows(images: np.ndarray) -> list[bytes]:
    return sorted(img.tobytes() for img in images)


def all_batches(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_digits_bundle_shapes_and_sizes():
    bundle = load_data(DataConfig(name="digits", batch_size=100, eval_batch_size=50))
    assert bundle.input_shape == (1, 8, 8) and bundle.num_classes == 10
    assert bundle.class_names == [str(i) for i in range(10)]
    # 1,797 images: 359 stratified test (round(0.2 * count) per class), 1,438 train, of which
    # round(0.1 * 1438) = 144 go to val.
    assert (bundle.train.num_samples, bundle.val.num_samples, bundle.test.num_samples) == (1294, 144, 359)
    assert len(bundle.train) == 1294 // 100  # last partial train batch dropped
    assert len(bundle.val) == 3 and len(bundle.test) == 8
    x, y = next(iter(bundle.train))
    assert x.shape == (100, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert [b[0].shape[0] for b in bundle.test] == [50] * 7 + [9]


def test_train_and_val_partition_the_train_split():
    cfg = DataConfig(name="digits", batch_size=2000, augment=False)
    bundle = load_data(cfg)
    source = load_digits_arrays(cfg)
    train_x, train_y = all_batches(bundle.train)  # one batch: all 1,294 samples
    val_x, val_y = all_batches(bundle.val)
    train_u8 = _pixels(train_x, bundle)
    val_u8 = _pixels(val_x, bundle)
    assert len(train_u8) + len(val_u8) == len(source.train_x)
    # Same multiset of (image, label) rows as the source's train split, so every source row is
    # in exactly one of the two parts; and none of the test rows leaked in.
    pairs = lambda xs, ys: sorted(x.tobytes() + bytes([int(y)]) for x, y in zip(xs, ys))
    got = pairs(np.concatenate([train_u8, val_u8]), torch.cat([train_y, val_y]))
    assert got == pairs(source.train_x, source.train_y)


def test_test_split_is_fixed_and_val_follows_the_seed():
    a = load_data(DataConfig(name="digits", seed=0, augment=False))
    b = load_data(DataConfig(name="digits", seed=1, augment=False))
    test_a, test_b = all_batches(a.test)[0], all_batches(b.test)[0]
    assert np.array_equal(_pixels(test_a, a), _pixels(test_b, b))
    assert rows(_pixels(all_batches(a.val)[0], a)) != rows(_pixels(all_batches(b.val)[0], b))


def test_set_epoch_makes_shuffles_repeatable():
    bundle = load_data(DataConfig(name="digits", batch_size=64, seed=3))
    bundle.train.set_epoch(5)
    first = [y for _, y in bundle.train]
    bundle.train.set_epoch(5)
    again = [y for _, y in bundle.train]
    bundle.train.set_epoch(6)
    other = [y for _, y in bundle.train]
    assert all(torch.equal(p, q) for p, q in zip(first, again))
    assert not all(torch.equal(p, q) for p, q in zip(first, other))
    # Without set_epoch, each pass advances one epoch: pass after epoch 6 is epoch 7.
    implicit = [y for _, y in bundle.train]
    bundle.train.set_epoch(7)
    assert all(torch.equal(p, q) for p, q in zip(implicit, [y for _, y in bundle.train]))


def test_limit_train_takes_the_first_images_after_the_split():
    full = load_data(DataConfig(name="digits", batch_size=2000, augment=False))
    small = load_data(DataConfig(name="digits", batch_size=2000, augment=False, limit_train=50))
    assert small.train.num_samples == 50 and len(small.train) == 1
    assert small.mean == full.mean and small.std == full.std  # stats from the whole train part
    assert torch.equal(full.train.labels[:50], small.train.labels)


def test_zero_val_fraction_gives_an_empty_val_loader():
    bundle = load_data(DataConfig(name="digits", val_fraction=0.0))
    assert bundle.val.num_samples == 0 and len(bundle.val) == 0 and list(bundle.val) == []
    assert bundle.train.num_samples == 1438


def test_normalisation_inverts_to_the_source_pixels():
    cfg = DataConfig(name="digits", augment=False)
    bundle = load_data(cfg)
    x, _ = all_batches(bundle.test)
    per_channel = x.transpose(0, 1).reshape(1, -1)
    assert np.array_equal(_pixels(x, bundle), load_digits_arrays(cfg).test_x)
    assert per_channel.mean().abs() < 0.1 and (per_channel.std() - 1).abs() < 0.1  # test set ~ train stats


def test_digits_pixels_are_rescaled_from_0_16():
    from sklearn.datasets import load_digits

    raw = load_digits()
    arrays = load_digits_arrays(DataConfig(name="digits"))
    scaled = np.rint(raw.images * 255 / 16).astype(np.uint8)[:, None]  # 16 -> 255, 8 -> 128
    ours = np.concatenate([arrays.train_x, arrays.test_x])
    labels = np.concatenate([arrays.train_y, arrays.test_y])
    pairs = lambda xs, ys: sorted(x.tobytes() + bytes([int(y)]) for x, y in zip(xs, ys))
    assert pairs(ours, labels) == pairs(scaled, raw.target)


def test_channel_stats_match_numpy():
    images = np.random.default_rng(0).integers(0, 256, (7, 3, 5, 4), dtype=np.uint8)
    mean, std = channel_stats(images)
    ref = images.astype(np.float64) / 255
    assert np.allclose(mean, ref.mean(axis=(0, 2, 3)), atol=1e-12)
    assert np.allclose(std, ref.std(axis=(0, 2, 3)), atol=1e-12)


def test_carve_and_stratified_carve_partition_indices():
    kept, held = carve(103, 0.1, seed=4)
    assert len(held) == 10 and sorted(np.concatenate([kept, held])) == list(range(103))
    labels = np.repeat(np.arange(3), [10, 20, 30])
    kept, held = stratified_carve(labels, 0.2, seed=0)
    assert sorted(np.concatenate([kept, held])) == list(range(60))
    assert np.bincount(labels[held]).tolist() == [2, 4, 6]


@pytest.mark.parametrize("bad", [{"val_fraction": 1.0}, {"batch_size": 0}, {"device": "gpu"},
                                 {"limit_train": 0}, {"name": "mnist"}, {"augment": "yes"}])
def test_bad_configs_are_rejected(bad):
    with pytest.raises(ConfigError):
        DataConfig(**{"name": "digits", **bad})


def test_a_root_with_a_nul_character_is_a_config_error():
    # no path holds one: without this check, a missing CIFAR root would reach mkdir with it
    with pytest.raises(ConfigError, match=r"root='data\\x00x' holds a NUL character"):
        DataConfig(name="cifar10", root="data\0x")


def test_config_round_trips_and_digits_rejects_a_root():
    cfg = DataConfig(name="digits", seed=2, limit_train=10)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="leave root"):
        load_data(DataConfig(name="digits", root="/tmp"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_request_without_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        load_data(DataConfig(name="digits", device="cuda"))


def _pixels(x: torch.Tensor, bundle) -> np.ndarray:
    m = torch.tensor(bundle.mean).view(1, -1, 1, 1)
    s = torch.tensor(bundle.std).view(1, -1, 1, 1)
    return (x * s + m).mul(255).round().to(torch.uint8).numpy()
