"""Files that are whole or absent, and checksums that tell a damaged file from a good one.

`atomic_write(path, write)` lets `write(tmp)` fill a temporary file in the target's directory,
flushes it to disk and renames it over `path` (with the permissions a plain write would leave);
on any failure the temporary file is removed and an OSError (disk full, read-only file system,
no permission) becomes one CheckpointError line naming the file. `tensors_sha256(tensors)`
hashes names, dtypes, shapes and bytes of a mapping of tensors in sorted-name order, so the same
tensors always give the same digest.

>>> import tempfile, os, torch
>>> path = os.path.join(tempfile.mkdtemp(), "note.txt")
>>> atomic_write(path, lambda tmp: open(tmp, "w").write("hi"))
>>> open(path).read(), os.listdir(os.path.dirname(path))
('hi', ['note.txt'])
>>> tensors_sha256({"a": torch.zeros(2)}) == tensors_sha256({"a": torch.zeros(2)})
True
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from .errors import CheckpointError, ConfigError

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
        _chmod(tmp, _plain_mode(path))
        os.replace(tmp, path)  # same directory, so one file system: the rename is atomic
    except OSError as err:
        _remove(tmp)
        raise write_error(path, err) from None
    except BaseException:
        _remove(tmp)
        raise


def check_writable(directory: str | os.PathLike[str]) -> None:
    """CheckpointError (as `write_error` words it) unless a file can be made in `directory`: a
    long job checks its output folder before the work whose results it could not save."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-check.", dir=directory)
        os.close(fd)
    except OSError as err:
        raise write_error(Path(directory) / ".write-check", err) from None
    _remove(tmp)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """`text` (UTF-8) at `path`, replaced atomically (`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _plain_mode(path: Path) -> int:
    """The permissions `open(path, "w")` would leave: those of the file it replaces, else 0o666
    less the umask (mkstemp makes its file 0o600, which nobody else could read)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask: read from /proc where it is shown (Linux), else set and put straight back
    (the only portable way to read it; another thread creating a file at that instant could see it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _chmod(tmp: str, mode: int) -> None:
    try:
        os.chmod(tmp, mode)
    except OSError:  # a file system without POSIX permissions (FAT, some network shares)
        pass


def _remove(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def claim_dir(path: str | os.PathLike[str], first_file: str, text: str, explicit: bool = True) -> Path:
    """Make `path` this caller's alone and write `first_file` (text) into it; returns the directory.

    Two callers never share a directory, even when started in the same second: a name that is
    not `explicit` (a timestamped default) and is taken moves on to `-2`, `-3`, ... through an
    exclusive mkdir; an `explicit` path may be an empty directory made beforehand, and the
    exclusive creation of `first_file` decides: of two callers given the same path, one gets it
    and the other gets a ConfigError before writing anything. A directory that holds anything
    besides `first_file` once it is written (the user's files, another command's run) is given up
    again with a ConfigError: a run never writes among files it did not make.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if explicit:
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
    else:
        base, n = path, 2
        while True:
            try:
                os.mkdir(path)
                break
            except FileExistsError:  # another run took this name first (or an older run has it)
                path, n = base.with_name(f"{base.name}-{n}"), n + 1
    try:
        with open(path / first_file, "x", encoding="utf-8") as f:
            f.write(text)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"{path} was taken by another run started at the same time; choose a new path "
                          "(prunekit never shares a run directory)") from None
    others = sorted(p.name for p in path.iterdir() if p.name != first_file)
    if others:
        (path / first_file).unlink()
        raise ConfigError(f"{path} already holds other files ({', '.join(others[:5])}"
                          f"{', ...' if len(others) > 5 else ''}); choose a new path "
                          "(prunekit never shares a run directory)")
    return path


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


_HELD: dict[tuple[int, int], int] = {}  # directories this process holds (device, inode) -> depth


@contextlib.contextmanager
def hold_dir(path: str | os.PathLike[str], what: str = "run") -> Iterator[None]:
    """Hold an exclusive lock on the directory `path` while the body runs (flock on the directory
    itself: no file is added; the OS releases it when the process ends, however it ends), so that
    two processes never continue one run side by side. ConfigError when another process holds it;
    where the platform or file system has no such locks the body runs unlocked. Re-entrant within
    a process (a command holding its run directory calls a function that holds it too)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        yield
        return
    st = os.stat(path)
    key = (st.st_dev, st.st_ino)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:  # any other error: a file system without locks, where the body runs unlocked
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"{path} is in use by another prunekit process (this {what} is still going); wait "
                                  "for it to finish, or stop it, before resuming it") from None
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
    finally:
        os.close(fd)
