"""Files that are whole or absent, and checksums that tell a damaged file from a good one.

`atomic_write(path, write)` lets `write(tmp)` fill a temporary file in the target's directory,
flushes it to disk and renames it over `path`; on any failure the temporary file is removed
and an OSError (disk full, read-only file system, no permission) becomes one CheckpointError
line naming the file. `tensors_sha256(tensors)` hashes names, dtypes, shapes and bytes of a
mapping of tensors in sorted-name order, so the same tensors always give the same digest.

>>> import tempfile, os, torch
>>> path = os.path.join(tempfile.mkdtemp(), "note.txt")
>>> atomic_write(path, lambda tmp: open(tmp, "w").write("hi"))
>>> open(path).read(), os.listdir(os.path.dirname(path))
('hi', ['note.txt'])
>>> tensors_sha256({"a": torch.zeros(2)}) == tensors_sha256({"a": torch.zeros(2)})
True
"""
from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .errors import CheckpointError

__all__ = ["atomic_write", "tensors_sha256", "write_error"]

_WHY = {
    errno.ENOSPC: "no space left on the device; free some space or write elsewhere",
    errno.EROFS: "the file system is read-only; write to a writable directory",
    errno.EACCES: "permission denied; write to a directory you may write to",
    errno.EPERM: "operation not permitted; write to a directory you may write to",
    errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere",
}


def write_error(path: str | os.PathLike[str], err: OSError) -> CheckpointError:
    """One-line CheckpointError for an OSError met while writing `path`."""
    why = _WHY.get(err.errno) or (err.strerror or str(err) or type(err).__name__)
    return CheckpointError(f"cannot write {os.fspath(path)}: {why}")


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], Any]) -> None:
    """Call `write(tmp_path)`, fsync the result and rename it to `path`; nothing is left on failure."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise write_error(path, err) from None
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # same directory, so one file system: the rename is atomic
    except OSError as err:
        _remove(tmp)
        raise write_error(path, err) from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def tensors_sha256(tensors: Mapping[str, Any]) -> str:
    """Hex sha256 over (name, dtype, shape, bytes) of every tensor, names in sorted order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{str(t.dtype)}|{list(t.shape)}|".encode())
        # reshape(-1) makes 0-d tensors viewable; view(uint8) reads the raw bytes of any dtype
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks (sha256 for weights, md5 where a
    published archive states one)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
