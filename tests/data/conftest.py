"""Fixtures for the data tests: a private cache folder, and builders of
small fake datasets in the official CIFAR format and the image-folder layout."""
from __future__ import annotations

import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

CIFAR_LAYOUT = {  # name: (folder, train files, test files, meta file, label key, names key, classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", b"labels", b"label_names", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names", 100),
}


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    """Point $PRUNEKIT_CACHE at an empty folder for this test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("PRUNEKIT_CACHE", str(folder))
    return folder


@dataclass
class FakeCifar:
    folder: Path  # the extracted cifar-10-batches-py / cifar-100-python folder
    archive: Path  # the same files as an official-style .tar.gz
    train_x: np.ndarray  # uint8 (N, 3, 32, 32), in file order
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str]


def write_fake_cifar(root: Path, name: str, per_batch: int = 6, protocol: int = 2) -> FakeCifar:
    """Write an official-format CIFAR copy with random images under root."""
    folder_name, train_files, test_files, meta, label_key, names_key, classes = CIFAR_LAYOUT[name]
    folder = root / folder_name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(name))
    parts = {}
    for fname in train_files + test_files:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, classes, per_batch)]
        batch = {b"batch_label": fname.encode(), b"data": data, label_key: labels,
                 b"filenames": [f"{fname}_{i}.png".encode() for i in range(per_batch)]}
        if name == "cifar100":
            batch[b"coarse_labels"] = [v // 5 for v in labels]
        (folder / fname).write_bytes(pickle.dumps(batch, protocol=protocol))
        parts[fname] = (data.reshape(-1, 3, 32, 32), np.array(labels, dtype=np.int64))
    names = [f"class{i:03d}" for i in range(classes)]
    (folder / meta).write_bytes(pickle.dumps({names_key: [n.encode() for n in names]}, protocol=protocol))
    (folder / "readme.html").write_text("fake")
    archive = root / ("cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder_name)

    def cat(files, i):
        return np.concatenate([parts[f][i] for f in files])

    return FakeCifar(folder, archive, cat(train_files, 0), cat(train_files, 1), cat(test_files, 0),
                     cat(test_files, 1), names)


@dataclass
class FakeFolder:
    root: Path  # the folder holding train/ (and test/)
    class_names: list[str]
    expected: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (uint8 (N, C, H, W), labels), sorted


def write_image_folder(root: Path, classes=("cat", "ant", "dog"), train_per_class: int = 4,
                       test_per_class: int = 2, size=(6, 5), mode: str = "RGB", seed: int = 0) -> FakeFolder:
    """Write lossless PNGs of random pixels under root/<split>/<class>/NNN.png."""
    rng = np.random.default_rng(seed)
    names = sorted(classes)
    channels = 1 if mode == "L" else 3
    expected = {}
    splits = {"train": train_per_class, "test": test_per_class}
    for split, count in splits.items():
        if count == 0:
            continue
        xs, ys = [], []
        for label, cls in enumerate(names):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size[0], size[1], channels), dtype=np.uint8)
                Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(root / split / cls / f"{i:03d}.png")
                xs.append(pixels.transpose(2, 0, 1))
                ys.append(label)
        expected[split] = (np.stack(xs), np.array(ys, dtype=np.int64))
    return FakeFolder(root, names, expected)


def tar_folder(folder: Path, archive: Path, top: str | None = None) -> Path:
    """Pack folder's contents into a .tar.gz, optionally under one top-level folder name."""
    with tarfile.open(archive, "w:gz") as tar:
        for child in sorted(folder.iterdir()):
            tar.add(child, arcname=f"{top}/{child.name}" if top else child.name)
    return archive


def unnormalize(x: torch.Tensor, mean, std) -> np.ndarray:
    """Invert the loaders' normalisation back to uint8 pixels (N, C, H, W)."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x * s + m).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()


@pytest.fixture
def fakes():
    """The builders above, for test modules (which should not import conftest by name)."""
    return SimpleNamespace(write_fake_cifar=write_fake_cifar, write_image_folder=write_image_folder,
                           tar_folder=tar_folder, unnormalize=unnormalize)
