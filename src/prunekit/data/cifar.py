"""The "cifar10" and "cifar100" datasets in the official python-batch format (Krizhevsky 2009).

`root` may be the official .tar.gz, a folder holding it, a folder holding the extracted
cifar-10-batches-py/ (cifar-100-python/) folder, or that extracted folder itself. With
root=None the prunekit cache folder is used. A .tar.gz is checked against the official MD5
and read without extracting it; a mismatch raises DataError. Only when nothing is found is
the archive downloaded from the official site; without network that fails with a message
asking for root= a local copy. CIFAR-100 uses its 100 fine labels.

Batches are pickles; they are read with an unpickler that admits only the numpy array
constructors the official files use, so a tampered file cannot run code.

>>> arrays = load_cifar_arrays(DataConfig(name="cifar10", root="~/data"))  # doctest: +SKIP
>>> arrays.train_x.shape, arrays.test_x.shape  # doctest: +SKIP
((50000, 3, 32, 32), (10000, 3, 32, 32))
"""
from __future__ import annotations

import io
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError
from ..core.integrity import file_digest
from .cache import cache_dir
from .config import DataConfig
from .errors import DataError
from .registry import DATASETS, DatasetSpec
from .sources import ImageArrays

URL_BASE = "https://www.cs.toronto.edu/~kriz/"
DOWNLOAD_TIMEOUT_S = 30


@dataclass(frozen=True)
class OfficialFormat:
    """Where the pieces of one official CIFAR distribution are and what they are called."""

    archive: str
    md5: str
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: bytes
    names_key: bytes
    num_classes: int


OFFICIAL = {
    "cifar10": OfficialFormat(
        "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
        b"labels", b"label_names", 10,
    ),
    "cifar100": OfficialFormat(
        "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python",
        ("train",), ("test",), "meta", b"fine_labels", b"fine_label_names", 100,
    ),
}


def load_cifar_arrays(cfg: DataConfig) -> ImageArrays:
    """Load cfg.name ("cifar10" or "cifar100") as uint8 (N, 3, 32, 32) arrays."""
    if cfg.image_size is not None:
        raise ConfigError(f"dataset {cfg.name!r} is 32x32; image_size applies to 'imagefolder' only")
    fmt = OFFICIAL[cfg.name]
    root = Path(cfg.root).expanduser() if cfg.root is not None else cache_dir() / "datasets"
    read = _find_source(root, fmt)
    if read is None:
        read = _archive_reader(_download(root, fmt), fmt)
    train_x, train_y = _read_batches(read, fmt.train, fmt)
    test_x, test_y = _read_batches(read, fmt.test, fmt)
    return ImageArrays(train_x, train_y, test_x, test_y, _class_names(_unpickle(read(fmt.meta), fmt.meta), fmt))


def _class_names(meta: dict, fmt: OfficialFormat) -> list[str]:
    names = meta.get(fmt.names_key)
    if (not isinstance(names, list) or len(names) != fmt.num_classes
            or not all(isinstance(n, bytes) for n in names)):
        raise DataError(f"CIFAR file {fmt.meta!r} does not hold the {fmt.num_classes} class names under "
                        f"{fmt.names_key!r}; the download is damaged: delete it to fetch it again")
    return [n.decode("utf-8", "replace") for n in names]


def _find_source(root: Path, fmt: OfficialFormat):
    """A function name -> bytes reading the batch files under root, or None if there are none."""
    if root.is_file():
        return _archive_reader(root, fmt)
    for folder in (root / fmt.folder, root):
        if (folder / fmt.meta).is_file():
            return lambda name, folder=folder: _read_file(folder / name)
    if (root / fmt.archive).is_file():
        return _archive_reader(root / fmt.archive, fmt)
    return None


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read CIFAR batch file {str(path)!r}: {err}") from None


def _archive_reader(archive: Path, fmt: OfficialFormat):
    """Check the archive's MD5, then return a reader of its members by base name."""
    actual = md5_of(archive)
    if actual != fmt.md5:
        raise DataError(
            f"{str(archive)!r} has MD5 {actual}, but the official {fmt.archive} has {fmt.md5}; "
            f"the file is corrupt or not the official archive: download it again from {URL_BASE}, "
            "or pass root= the folder with the extracted batch files (data.root=... on the command line)"
        )
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {Path(m.name).name: tar.extractfile(m).read() for m in tar if m.isfile()}
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"cannot read {str(archive)!r} as a .tar.gz: {err}") from None

    def read(name: str) -> bytes:
        if name not in members:
            raise DataError(f"{str(archive)!r} has no member {name!r}; is it {fmt.archive}?")
        return members[name]

    return read


def md5_of(path: Path) -> str:
    """Hex MD5 of a file (the digest the official archives publish)."""
    return file_digest(path, "md5")


def _download(root: Path, fmt: OfficialFormat) -> Path:
    target = root / fmt.archive
    url = URL_BASE + fmt.archive
    partial = target.with_name(target.name + ".partial")
    created = [p for p in (root, *root.parents) if not p.exists()]  # deepest first
    try:
        root.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as out:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
        os.replace(partial, target)
    except OSError as err:  # URLError, timeouts and disk errors are all OSErrors
        partial.unlink(missing_ok=True)
        for folder in created:  # a failed download leaves no empty folder at the path the user gave
            try:
                folder.rmdir()
            except OSError:
                break
        raise DataError(
            f"no {fmt.archive} or {fmt.folder}/ under {str(root)!r}, and downloading {url} failed ({err}); "
            f"pass root= a local copy of {fmt.archive} or of the extracted {fmt.folder}/ folder (data.root=... on the command line)"
        ) from None
    return target


class _ArrayUnpickler(pickle.Unpickler):
    # The official batches hold dicts of bytes, lists and numpy arrays; nothing else may load.
    # _codecs.encode is how Python 3 writes bytes at pickle protocol 2 (re-saved copies).
    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _unpickle(data: bytes, name: str) -> dict:
    try:
        # encoding="bytes": the official files were written by Python 2; keys stay bytes.
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DataError(f"CIFAR file {name!r} is not a valid python batch: {err}") from None
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR file {name!r} holds a {type(obj).__name__}, expected a dict")
    return obj


def _read_batches(read, names: tuple[str, ...], fmt: OfficialFormat) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate batches into uint8 (N, 3, 32, 32) images and int64 (N,) labels."""
    xs, ys = [], []
    for name in names:
        batch = _unpickle(read(name), name)
        if b"data" not in batch or fmt.label_key not in batch:
            raise DataError(f"CIFAR batch {name!r} lacks b'data' or {fmt.label_key!r}; keys: "
                            f"{sorted(map(repr, batch))[:8]}")
        try:
            data = np.asarray(batch[b"data"])
            labels = np.asarray(batch[fmt.label_key])
        except (TypeError, ValueError, OverflowError) as err:
            raise DataError(f"CIFAR batch {name!r} holds data or labels that are not arrays ({err})") from None
        if data.dtype != np.uint8 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"CIFAR batch {name!r}: data of {data.dtype} and labels of {labels.dtype}; "
                            "expected uint8 pixels and integer labels; the download is damaged")
        labels = labels.astype(np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise DataError(f"CIFAR batch {name!r}: data {data.shape} and {len(labels)} labels; expected (N, 3072) and N")
        if labels.size and (labels.min() < 0 or labels.max() >= fmt.num_classes):
            raise DataError(f"CIFAR batch {name!r} has labels outside 0..{fmt.num_classes - 1}")
        xs.append(data.reshape(-1, 3, 32, 32))  # rows are 1024 R, then 1024 G, then 1024 B values
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


DATASETS.register("cifar10", DatasetSpec(load_cifar_arrays, "CIFAR-10, official python batches, 32x32 RGB", crop=True, flip=True))
DATASETS.register("cifar100", DatasetSpec(load_cifar_arrays, "CIFAR-100 (fine labels), official python batches", crop=True, flip=True))
