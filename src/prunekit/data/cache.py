"""A cache of decoded datasets, kept outside the repository.

Decoding CIFAR-10's 60,000 JPEGs takes seconds per core; the decoded uint8 arrays (184 MB)
load in a fraction of a second. The cache folder is $PRUNEKIT_CACHE, else ~/.cache/prunekit.
An entry is keyed by the source's path, by its state (size + modification time of the
archive, or of every file in a folder) and by the decode options (image_size), so a changed
source is decoded afresh and the stale entries of the same path are deleted, while the entries
of other image sizes of an unchanged source are kept.

>>> key = cache_key("/data/images.tar.gz", state="123-456", options={"image_size": None})
>>> key.startswith("imagefolder-")
True
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from .sources import ImageArrays

CACHE_ENV = "PRUNEKIT_CACHE"
FORMAT_VERSION = 1  # bump when the stored layout or the decoding changes


def cache_dir() -> Path:
    """The prunekit cache folder ($PRUNEKIT_CACHE or ~/.cache/prunekit); not created here."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "prunekit")


def source_state(path: Path) -> str:
    """A string that changes whenever the archive file or any file under the folder changes."""
    if path.is_file():
        st = path.stat()
        return f"{st.st_size}-{st.st_mtime_ns}"
    digest = hashlib.sha256()
    for dirpath, filenames in walk_folder(path):
        for name in filenames:
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:  # a broken link: its own state (reading it fails later, naming the file)
                st = os.lstat(full)
            digest.update(os.fsencode(f"{os.path.relpath(full, path)}\0{st.st_size}\0{st.st_mtime_ns}\n"))
    return digest.hexdigest()


def walk_folder(path: str | Path) -> Iterator[tuple[str, list[str]]]:
    """(folder, sorted names of what is not a folder in it) for path and every folder under it.

    Links to folders are followed, as a class folder may be one, but never into a folder that
    holds the link: a link back up the tree would otherwise be walked round forever.
    """
    stack = [(str(path), frozenset({os.path.realpath(path)}))]
    while stack:
        folder, ancestors = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:  # unreadable, or removed meanwhile: as os.walk, skip it
            continue
        is_folder = [_is_folder(e) for e in entries]
        subfolders = [e.name for e, sub in zip(entries, is_folder) if sub]
        yield folder, [e.name for e, sub in zip(entries, is_folder) if not sub]
        for name in reversed(subfolders):  # popped in sorted order
            sub = os.path.join(folder, name)
            real = os.path.realpath(sub)
            if real not in ancestors:
                stack.append((sub, ancestors | {real}))


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:
        return False


def cache_key(path: str | Path, state: str, options: dict) -> str:
    """File stem "imagefolder-<path hash>-<state hash>-<options hash>" for this source and decode options."""
    where = hashlib.sha256(os.fsencode(os.path.abspath(path))).hexdigest()[:12]
    when = json.dumps({"state": state, "format": FORMAT_VERSION}, sort_keys=True)
    how = json.dumps(options, sort_keys=True)
    return f"imagefolder-{where}-{_short_hash(when)}-{_short_hash(how)}"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_cached(key: str) -> ImageArrays | None:
    """The cached arrays under `key`, or None if absent or unreadable."""
    path = cache_dir() / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = ImageArrays(z["train_x"], z["train_y"], z["test_x"], z["test_y"],
                                 [str(c) for c in z["class_names"]])
    except (OSError, KeyError, ValueError, TypeError, EOFError, MemoryError, zipfile.BadZipFile):
        # a truncated or foreign file (class names not a list: TypeError; an edited array header
        # claiming terabytes: MemoryError): decode again and overwrite it
        return None
    return arrays if _consistent(arrays) else None


def _consistent(a: ImageArrays) -> bool:
    """Whether cached arrays have the layout `save_cached` writes: uint8 (N, C, H, W) images with
    C 1 or 3, one integer label per image, every label naming one of the classes."""
    images = all(x.dtype == np.uint8 and x.ndim == 4 and x.shape[1] in (1, 3) for x in (a.train_x, a.test_x))
    if not images or not a.class_names or a.train_x.shape[1:] != a.test_x.shape[1:]:
        return False
    for x, y in ((a.train_x, a.train_y), (a.test_x, a.test_y)):
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            return False
        if len(y) and (y.min() < 0 or y.max() >= len(a.class_names)):
            return False
    return True


def save_cached(key: str, arrays: ImageArrays) -> Path:
    """Write arrays under `key` atomically and delete the entries of older states of the same source path."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{key}.npz"
    partial = folder / f"{key}.{os.getpid()}.partial.npz"
    try:
        np.savez(
            partial,
            train_x=arrays.train_x, train_y=arrays.train_y, test_x=arrays.test_x, test_y=arrays.test_y,
            class_names=np.array(arrays.class_names, dtype=str),
        )
        os.replace(partial, final)  # readers see the old entry or the whole new one, never half
    except BaseException:  # a full disk or an interrupt leaves no half-written file behind
        partial.unlink(missing_ok=True)
        raise
    source, state = key.rsplit("-", 2)[0], key.rsplit("-", 1)[0]
    for old in folder.glob(f"{source}-*.npz"):  # entries of this source's other options stay
        if not old.name.startswith(f"{state}-") and ".partial" not in old.name:
            old.unlink(missing_ok=True)
    return final
