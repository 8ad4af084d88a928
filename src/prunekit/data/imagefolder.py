"""The "imagefolder" dataset: <split>/<class>/<image> in a folder or a .tar/.tar.gz archive.

Splits: train/ is required; test/ is the test split (val/ is taken instead when there is no
test/, as in ImageNet's layout); with neither, 20 % of every class is carved out as test with
a fixed seed. Class labels are the sorted class-folder names of train/. A common top folder
(e.g. "cifar10/train/...") is fine. Images are decoded with Pillow to grey, or to RGB as soon as
one of them is not grey (a streamed set reads every image's header when its first is grey), and,
with `image_size`, resized to a square.

Small sets are decoded once into uint8 arrays and cached (see cache.py); a set whose decoded
size would pass MAX_IN_MEMORY_BYTES is streamed from the folder by a DataLoader instead.

>>> arrays = load_imagefolder(DataConfig(name="imagefolder", root="../shared/data/cifar10-jpg.tar.gz"))  # doctest: +SKIP
>>> arrays.train_x.shape, arrays.class_names[:2]  # doctest: +SKIP
((50000, 3, 32, 32), ['airplane', 'automobile'])
"""
from __future__ import annotations

import os
import tarfile
import warnings
import zlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError, PrunekitWarning
from .cache import cache_key, load_cached, save_cached, source_state, walk_folder
from .config import DataConfig
from .decode import PILLOW_ERRORS, decode_image, is_image_name, probe_image
from .errors import DataError
from .registry import DATASETS, DatasetSpec
from .sources import TEST_SPLIT_SEED, ImageArrays, ImageFiles, stratified_carve

MAX_IN_MEMORY_BYTES = 2 * 1024**3
MAX_IMAGE_BYTES = 64 * 1024**2  # one image file read from an archive
MAX_ARCHIVE_BYTES = 8 * 1024**3  # the encoded files of an archive, held while they are decoded
CARVED_TEST_FRACTION = 0.2
LAYOUT_HELP = "expected <root>/train/<class>/<image> (and optionally test/<class>/<image>)"

# entries[split][class] = list of (name, payload); payload is bytes (archive) or a file path.
Entries = dict[str, dict[str, list[tuple[str, object]]]]


def existing_root(root: str) -> Path:
    """`root` as a path; DataError saying which path (and from which directory a relative one was
    read) when it does not exist."""
    path = Path(root).expanduser()
    if not path.exists():
        kind = "archive" if path.name.endswith((".tar", ".tar.gz", ".tgz")) else "image folder"
        where = f" (relative to the current directory {Path.cwd()})" if not path.is_absolute() else ""
        raise DataError(f"{kind} {str(path)!r} does not exist{where}; set data.root= to where it is (a folder or "
                        f".tar/.tar.gz archive); {LAYOUT_HELP}")
    return path


def load_imagefolder(cfg: DataConfig) -> ImageArrays | ImageFiles:
    """Read the image folder or archive at cfg.root; decoded arrays come from the cache when fresh."""
    if cfg.root is None:
        raise ConfigError(f"dataset 'imagefolder' needs root= a folder or .tar/.tar.gz archive; {LAYOUT_HELP}")
    path = existing_root(cfg.root)
    if path.is_file() and not tarfile.is_tarfile(path):
        raise DataError(f"{str(path)!r} is not a .tar/.tar.gz archive; pass a folder or an archive; {LAYOUT_HELP}")
    key = cache_key(path, source_state(path), {"image_size": cfg.image_size})
    cached = load_cached(key)
    if cached is not None:
        return cached
    entries = _read_archive(path) if path.is_file() else _list_folder(path)
    class_names, train, test = _organise(entries, path)
    mode, size = _probe(train[0][1])
    shape = (1 if mode == "L" else 3, *((cfg.image_size,) * 2 if cfg.image_size else size))
    resize = cfg.image_size is not None
    if not _fits_in_memory(path, len(train) + len(test or []), shape):
        if mode == "L" and _any_colour(train + (test or [])):  # streamed: one mode for every image
            shape = (3, *shape[1:])
        return _as_files(class_names, train, test, shape, resize)
    try:
        arrays = _decode_all(class_names, train, test, mode, shape, resize)
    except _ColourAmongGrey:  # the first image is grey but not every one: all are decoded as colour
        shape = (3, *shape[1:])
        if not _fits_in_memory(path, len(train) + len(test or []), shape):
            return _as_files(class_names, train, test, shape, resize)
        arrays = _decode_all(class_names, train, test, "RGB", shape, resize)
    try:
        save_cached(key, arrays)
    except OSError as err:  # a read-only or full disk costs speed next time, not this load
        warnings.warn(f"could not write the decoded-image cache ({err}); set PRUNEKIT_CACHE to a writable folder",
                      PrunekitWarning)
    return arrays


class _ColourAmongGrey(Exception):
    """A colour image met while decoding a set whose first image is grey."""


def _fits_in_memory(path: Path, count: int, shape: tuple[int, int, int]) -> bool:
    """Whether `count` images of `shape` fit in memory; an archive that does not is a DataError."""
    total_bytes = count * int(np.prod(shape))
    if total_bytes > MAX_IN_MEMORY_BYTES and path.is_file():
        raise DataError(
            f"{str(path)!r} decodes to {total_bytes / 1e9:.1f} GB, more than fits in memory here; "
            "extract it and pass the folder as root so that images are streamed from disk"
        )
    return total_bytes <= MAX_IN_MEMORY_BYTES


def _read_archive(path: Path) -> Entries:
    # One sequential pass: a .tar.gz cannot seek cheaply, so bytes are read as members stream by.
    # The members' sizes are summed before each is read: a small .tar.gz can hold gigabytes.
    entries: Entries = defaultdict(lambda: defaultdict(list))
    held = 0
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parts = member.name.split("/")
                if member.isfile() and len(parts) >= 3 and is_image_name(member.name):
                    if member.size > MAX_IMAGE_BYTES:
                        raise DataError(f"{member.name!r} in {str(path)!r} is {member.size / 1e6:.0f} MB, more than an "
                                        f"image file may be here ({MAX_IMAGE_BYTES / 1e6:.0f} MB); remove it")
                    held += member.size
                    if held > MAX_ARCHIVE_BYTES:
                        raise DataError(f"the images in {str(path)!r} take more than {MAX_ARCHIVE_BYTES / 1e9:.1f} GB "
                                        "unpacked, more than is read into memory here; extract it and pass the folder "
                                        "as root so that images are streamed from disk")
                    data = tar.extractfile(member).read()
                    entries[parts[-3]][parts[-2]].append((member.name, data))
            _check_archive_end(tar)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:  # cut short or damaged (gzip raises OSErrors)
        raise DataError(f"cannot read {str(path)!r} as a .tar/.tar.gz archive ({type(err).__name__}: {err}); it is "
                        "damaged or cut short: copy it again, or pass the extracted folder as root") from None
    return entries


def _check_archive_end(tar: tarfile.TarFile) -> None:
    """ReadError unless the archive ended with its end-of-archive block. tarfile takes a header
    cut short, or missing, for the end, so a copy cut between members would lose them silently."""
    if tar.fileobj.tell() < tar.offset + tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"it stops at byte {tar.fileobj.tell()}, before the end-of-archive block; "
                                "the members after that point are missing")


def _list_folder(path: Path) -> Entries:
    entries: Entries = defaultdict(lambda: defaultdict(list))
    for dirpath, filenames in walk_folder(path):
        for name in filenames:
            full = os.path.join(dirpath, name)
            parts = Path(os.path.relpath(full, path)).parts
            # a pipe or device is skipped, as in archives: reading one would wait or never end
            special = os.path.exists(full) and not os.path.isfile(full)
            if len(parts) >= 3 and is_image_name(name) and not special:
                entries[parts[-3]][parts[-2]].append((full, full))
    return entries


def _organise(entries: Entries, path: Path) -> tuple[list[str], list, list | None]:
    """(class names, train [(label, payload, name)], test [...] or None), sorted by name. A payload is
    a file's path, or an archive member's bytes (`name`: the member's path in the archive)."""
    if "train" not in entries:
        found = ", ".join(sorted(entries)) or "no images"
        raise DataError(f"{str(path)!r} has no train/ split (found: {found}); {LAYOUT_HELP}")
    class_names = sorted(entries["train"])
    test_split = "test" if "test" in entries else "val" if "val" in entries else None
    if test_split is not None:
        unknown = sorted(set(entries[test_split]) - set(class_names))
        if unknown:
            raise DataError(f"{test_split}/ of {str(path)!r} has classes missing from train/: {', '.join(unknown)}")

    def labelled(split: str) -> list[tuple[int, object]]:
        items = []
        for label, name in enumerate(class_names):
            items += [(label, payload, member) for member, payload in sorted(entries[split].get(name, []))]
        return items

    return class_names, labelled("train"), labelled(test_split) if test_split else None


def _probe(payload: object) -> tuple[str, tuple[int, int]]:
    try:
        return probe_image(_payload_bytes(payload))
    except PILLOW_ERRORS as err:
        name = f" {payload}" if isinstance(payload, str) else ""
        raise DataError(f"cannot read the first train image{name} with Pillow ({type(err).__name__}: {err}); "
                        "remove or replace the file") from None


def _any_colour(items: list) -> bool:
    """Whether any image (file path payloads) is not grey, read from the headers only. A header
    that cannot be read is left to decoding, which names the file."""
    def colour(item: tuple) -> bool:
        try:
            return probe_image(item[1])[0] != "L"
        except PILLOW_ERRORS:
            return False

    chunk = 1024
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(items), chunk):  # stops at the first chunk holding a colour image
            if any(pool.map(colour, items[start:start + chunk])):
                return True
    return False


def _payload_bytes(payload: object) -> bytes:
    return payload if isinstance(payload, bytes) else Path(payload).read_bytes()


def _decode_all(class_names: list[str], train: list, test: list | None, mode: str,
                shape: tuple[int, int, int], resize: bool) -> ImageArrays:
    size = shape[1:] if resize else None

    def decode(item: tuple[int, object]) -> np.ndarray:
        name = item[2]
        try:
            data = _payload_bytes(item[1])
            if mode == "L" and probe_image(data)[0] != "L":
                raise _ColourAmongGrey()
            array = decode_image(data, mode, size)
        except PILLOW_ERRORS as err:
            raise DataError(f"cannot decode {name} ({type(err).__name__}: {err}); remove or replace the file") from None
        if array.shape != shape:
            raise DataError(f"{name} decodes to {array.shape}, the first image to {shape}; set image_size to resize all")
        return array

    def stack(items: list) -> tuple[np.ndarray, np.ndarray]:
        x = np.empty((len(items), *shape), dtype=np.uint8)
        # Pillow releases the GIL while decoding, so threads share the work without pickling.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for i, array in enumerate(pool.map(decode, items)):
                x[i] = array
        return x, np.array([item[0] for item in items], dtype=np.int64)

    train_x, train_y = stack(train)
    if test is not None:
        test_x, test_y = stack(test)
        return ImageArrays(train_x, train_y, test_x, test_y, class_names)
    kept, held = stratified_carve(train_y, CARVED_TEST_FRACTION, TEST_SPLIT_SEED)
    return ImageArrays(train_x[kept], train_y[kept], train_x[held], train_y[held], class_names)


def _as_files(class_names: list[str], train: list, test: list | None, shape: tuple[int, int, int],
              resize: bool) -> ImageFiles:
    files = [str(item[1]) for item in train]
    labels = np.array([item[0] for item in train], dtype=np.int64)
    if test is not None:
        test_files, test_y = [str(item[1]) for item in test], np.array([item[0] for item in test], dtype=np.int64)
    else:
        kept, held = stratified_carve(labels, CARVED_TEST_FRACTION, TEST_SPLIT_SEED)
        test_files, test_y = [files[i] for i in held], labels[held]
        files, labels = [files[i] for i in kept], labels[kept]
    return ImageFiles(files, labels, test_files, test_y, class_names, shape, resize)


DATASETS.register(
    "imagefolder", DatasetSpec(load_imagefolder, "<split>/<class>/<image> folder or .tar/.tar.gz", crop=True, flip=True)
)
