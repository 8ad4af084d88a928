"""CIFAR-10/100 in the official python-batch format, from fake copies built in tmp_path."""
from __future__ import annotations

import dataclasses
import pickle
import urllib.error

import numpy as np
import pytest

from prunekit.data import DataConfig, DataError, load_data
from prunekit.data import cifar
from prunekit.data.cifar import load_cifar_arrays, md5_of


def expect_arrays(arrays, fake):
    assert np.array_equal(arrays.train_x, fake.train_x) and np.array_equal(arrays.train_y, fake.train_y)
    assert np.array_equal(arrays.test_x, fake.test_x) and np.array_equal(arrays.test_y, fake.test_y)
    assert arrays.class_names == fake.class_names


def trust_archive(monkeypatch, name, archive):
    """Make the fake archive's MD5 the 'official' one for this test."""
    official = dataclasses.replace(cifar.OFFICIAL[name], md5=md5_of(archive))
    monkeypatch.setitem(cifar.OFFICIAL, name, official)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_extracted_folder_loads_from_its_parent_or_itself(tmp_path, fakes, name):
    fake = fakes.write_fake_cifar(tmp_path, name)
    for root in (tmp_path, fake.folder):
        expect_arrays(load_cifar_arrays(DataConfig(name=name, root=str(root))), fake)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_official_archive_loads_when_its_md5_matches(tmp_path, fakes, monkeypatch, name):
    fake = fakes.write_fake_cifar(tmp_path / "src", name)
    archive = fake.archive.rename(tmp_path / fake.archive.name)  # no extracted folder beside it
    trust_archive(monkeypatch, name, archive)
    expect_arrays(load_cifar_arrays(DataConfig(name=name, root=str(archive))), fake)
    expect_arrays(load_cifar_arrays(DataConfig(name=name, root=str(tmp_path))), fake)


def test_md5_mismatch_is_a_clear_data_error(tmp_path, fakes):
    fake = fakes.write_fake_cifar(tmp_path, "cifar10")
    with pytest.raises(DataError, match=r"MD5 [0-9a-f]{32}, but the official cifar-10-python.tar.gz has c58f3010"):
        load_cifar_arrays(DataConfig(name="cifar10", root=str(fake.archive)))


def test_real_md5_constants_are_the_published_ones():
    assert cifar.OFFICIAL["cifar10"].md5 == "c58f30108f718f92721af3b95e74349a"
    assert cifar.OFFICIAL["cifar100"].md5 == "eb9058c3a382ffc7106e4002c42a8d85"


def test_missing_files_without_network_ask_for_a_local_copy(tmp_path, monkeypatch):
    calls = []

    def offline(url, timeout):
        calls.append(url)
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(cifar.urllib.request, "urlopen", offline)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="pass root= a local copy of cifar-10-python.tar.gz"):
        load_cifar_arrays(DataConfig(name="cifar10", root=str(tmp_path / "empty")))
    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert not any((tmp_path / "empty").iterdir())  # no partial download left behind
    # A root that did not exist is not left behind as empty folders (a typo stays a typo).
    with pytest.raises(DataError, match="pass root= a local copy"):
        load_cifar_arrays(DataConfig(name="cifar10", root=str(tmp_path / "typo" / "cifar")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_download_is_used_when_nothing_is_local(tmp_path, fakes, monkeypatch):
    fake = fakes.write_fake_cifar(tmp_path / "server", "cifar10")
    trust_archive(monkeypatch, "cifar10", fake.archive)
    monkeypatch.setattr(cifar.urllib.request, "urlopen", lambda url, timeout: open(fake.archive, "rb"))
    root = tmp_path / "data"
    expect_arrays(load_cifar_arrays(DataConfig(name="cifar10", root=str(root))), fake)
    assert (root / "cifar-10-python.tar.gz").read_bytes() == fake.archive.read_bytes()


def test_default_protocol_pickles_load_too(tmp_path, fakes):
    fake = fakes.write_fake_cifar(tmp_path, "cifar10", protocol=pickle.HIGHEST_PROTOCOL)
    expect_arrays(load_cifar_arrays(DataConfig(name="cifar10", root=str(tmp_path))), fake)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_batches_that_would_run_code_are_refused(tmp_path, fakes, capsys):
    fake = fakes.write_fake_cifar(tmp_path, "cifar10")
    (fake.folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil()}))
    with pytest.raises(DataError, match="data_batch_3.*builtins.print is not allowed"):
        load_cifar_arrays(DataConfig(name="cifar10", root=str(tmp_path)))
    assert "never run" not in capsys.readouterr().out


def test_malformed_batches_are_reported(tmp_path, fakes):
    fake = fakes.write_fake_cifar(tmp_path, "cifar10")
    (fake.folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError, match="test_batch.*expected \\(N, 3072\\)"):
        load_cifar_arrays(DataConfig(name="cifar10", root=str(tmp_path)))


@pytest.mark.parametrize("file, content, fragment", [
    ("batches.meta", {b"num_cases_per_batch": 2}, "does not hold the 10 class names"),
    ("batches.meta", {b"label_names": list(range(10))}, "does not hold the 10 class names"),
    ("test_batch", {1: 2, b"x": 3}, "lacks b'data'"),
    ("test_batch", {b"data": np.full((2, 3072), -1), b"labels": [0, 1]}, "expected uint8 pixels"),
    ("test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}, "integer labels"),
])
def test_batches_of_the_wrong_content_get_one_data_error(tmp_path, fakes, file, content, fragment):
    fake = fakes.write_fake_cifar(tmp_path, "cifar10")
    (fake.folder / file).write_bytes(pickle.dumps(content))
    with pytest.raises(DataError, match=f"{file}.*{fragment}"):
        load_cifar_arrays(DataConfig(name="cifar10", root=str(tmp_path)))


def test_load_data_on_fake_cifar_gives_normalised_batches(tmp_path, fakes):
    fake = fakes.write_fake_cifar(tmp_path, "cifar10", per_batch=8)  # 40 train, 8 test
    bundle = load_data(DataConfig(name="cifar10", root=str(tmp_path), batch_size=9, eval_batch_size=4))
    assert (bundle.train.num_samples, bundle.val.num_samples, bundle.test.num_samples) == (36, 4, 8)
    assert bundle.input_shape == (3, 32, 32) and bundle.num_classes == 10
    x, y = next(iter(bundle.train))
    assert x.shape == (9, 3, 32, 32) and len(bundle.train) == 4
    test_x = np.concatenate([fakes.unnormalize(xb, bundle.mean, bundle.std) for xb, _ in bundle.test])
    assert np.array_equal(test_x, fake.test_x)
