"""Every registered dataset passes the same contract; each needs a small source below."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from prunekit.data import DATASETS, DataConfig, load_data
from prunekit.data import cifar
from prunekit.data.cifar import md5_of


def digits_source(tmp_path, fakes, monkeypatch):
    return DataConfig(name="digits", batch_size=32)


def cifar_source(name):
    def build(tmp_path, fakes, monkeypatch):
        fake = fakes.write_fake_cifar(tmp_path, name, per_batch=20)
        monkeypatch.setitem(cifar.OFFICIAL, name, dataclasses.replace(cifar.OFFICIAL[name], md5=md5_of(fake.archive)))
        return DataConfig(name=name, root=str(fake.archive), batch_size=8)

    return build


def imagefolder_source(tmp_path, fakes, monkeypatch):
    fake = fakes.write_image_folder(tmp_path / "imgs", size=(8, 8), train_per_class=10)
    return DataConfig(name="imagefolder", root=str(fake.root), batch_size=8)


SOURCES = {"digits": digits_source, "cifar10": cifar_source("cifar10"), "cifar100": cifar_source("cifar100"),
           "imagefolder": imagefolder_source}


@pytest.mark.parametrize("name", DATASETS.list())
def test_dataset_contract(name, tmp_path, fakes, monkeypatch, private_cache):
    assert name in SOURCES, f"add a small test source for dataset {name!r} to SOURCES"
    cfg = SOURCES[name](tmp_path, fakes, monkeypatch)
    bundle = load_data(cfg)
    c = bundle.input_shape[0]
    assert len(bundle.class_names) == bundle.num_classes and len(bundle.mean) == len(bundle.std) == c
    for split in ("train", "val", "test"):
        loader = getattr(bundle, split)
        loader.set_epoch(1)
        batches = list(loader)
        assert len(batches) == len(loader) > 0, split
        for x, y in batches:
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert x.shape[1:] == bundle.input_shape and x.shape[0] == y.shape[0] <= loader.batch_size
            assert y.min() >= 0 and y.max() < bundle.num_classes
        loader.set_epoch(1)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, loader)), f"{split} is not repeatable"
    # normalised with the training statistics: the unaugmented test split has about mean 0 and std 1
    # per channel (the augmented training batches less so: crop padding adds zeros before normalising)
    test_x = torch.cat([x for x, _ in bundle.test])
    assert np.allclose(test_x.mean((0, 2, 3)).numpy(), 0, atol=0.2)
    assert np.allclose(test_x.std((0, 2, 3)).numpy(), 1, atol=0.15)
