"""Record the software and hardware a run or benchmark happened on.

Every report and benchmark stores `environment()` next to its numbers, because a latency or an
accuracy without the machine, library versions and code revision that produced it cannot be
compared or reproduced. Every probe is best-effort: a missing `git`, an unreadable
/proc/cpuinfo or an absent GPU gives None for that entry, never an exception.

>>> env = environment()
>>> sorted(env)[:3]
['cpu_count', 'cpu_model', 'cuda']
>>> env["torch"] == __import__("torch").__version__
True
"""
from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import ConfigError


def environment(cwd: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Describe the current process: versions, CPU, threads, GPU and git revision.

    `cwd` is the directory whose git commit is recorded (default: the working directory).
    Keys: prunekit, torch, python, platform, cpu_model, cpu_count, torch_threads,
    cuda (None without a GPU, else {"device_name", "capability", "count", "cuda_version"}),
    git_commit (None outside a git checkout), git_dirty (None when unknown).

    >>> environment()["python"] == platform.python_version()
    True
    """
    commit, dirty = git_revision(cwd)
    return {
        "prunekit": prunekit_version(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": cuda_info(),
        "git_commit": commit,
        "git_dirty": dirty,
    }


def memory_bytes() -> int | None:
    """This machine's physical memory in bytes, or None where the OS does not say."""
    try:
        page, pages = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return page * pages if page > 0 and pages > 0 else None  # -1: the OS does not know


def check_input_fits(shape: Sequence[int], what: str, element_bytes: int = 4) -> None:
    """ConfigError when one input of `shape` could not be held here: more than 8 dimensions (no
    model takes one), or more than half of the machine's memory for the input alone (its
    activations need more). Said before anything is allocated, not as an allocator's traceback."""
    if len(shape) > 8:
        raise ConfigError(f"{what}: an input of {len(shape)} dimensions ({list(shape)[:10]}...) is not one any "
                          "model takes; give the batch and per-sample shape, e.g. 16 and 3,32,32")
    need, total = math.prod(int(d) for d in shape) * element_bytes, memory_bytes()
    if total is not None and need > total // 2:
        raise ConfigError(f"{what}: an input of shape {list(shape)} alone needs {need / 2**30:,.1f} GiB, more than "
                          f"half of this machine's {total / 2**30:,.1f} GiB; give a smaller batch or input shape")


def prunekit_version() -> str:
    """The installed prunekit version, or "unknown" when the package metadata is absent."""
    try:
        return metadata.version("prunekit")
    except metadata.PackageNotFoundError:
        return "unknown"


def cpu_model() -> str:
    """A human-readable CPU model string, e.g. "AMD EPYC 7763 64-Core Processor".

    Linux reads /proc/cpuinfo, macOS asks sysctl; otherwise (or when both fail) the generic
    `platform.processor()` / `platform.machine()` answer is returned.

    >>> isinstance(cpu_model(), str) and len(cpu_model()) > 0
    True
    """
    name = _cpu_from_proc() or _cpu_from_sysctl()
    return name or platform.processor() or platform.machine() or "unknown"


def _cpu_from_proc() -> str | None:
    path = Path("/proc/cpuinfo")
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    # x86 calls it "model name"; some ARM kernels only give "Hardware" or "Processor".
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        for line in text.splitlines():
            head, sep, value = line.partition(":")
            if sep and head.strip() == key and value.strip():
                return value.strip()
    return None


def _cpu_from_sysctl() -> str | None:
    if sys.platform != "darwin":
        return None
    out = _run(["sysctl", "-n", "machdep.cpu.brand_string"], None)
    return out or None


def cuda_info() -> dict[str, Any] | None:
    """Name, compute capability, count and CUDA version of GPU 0, or None without CUDA."""
    try:
        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
        return {
            "device_name": torch.cuda.get_device_name(0),
            "capability": f"{major}.{minor}",
            "count": torch.cuda.device_count(),
            "cuda_version": torch.version.cuda,
        }
    except (RuntimeError, AssertionError):
        # A broken driver makes these calls raise; the record then just says "no GPU".
        return None


def git_revision(cwd: str | os.PathLike[str] | None = None) -> tuple[str | None, bool | None]:
    """(commit hash, has uncommitted changes) of the checkout at `cwd`; (None, None) if unknown.

    >>> commit, dirty = git_revision("/")  # the root directory is no checkout
    >>> commit is None or len(commit) == 40
    True
    """
    commit = _run(["git", "rev-parse", "HEAD"], cwd)
    if not commit:
        return None, None
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd)
    return commit, (None if status is None else bool(status))


def _run(cmd: list[str], cwd: str | os.PathLike[str] | None) -> str | None:
    """stdout of `cmd` stripped, or None when it is missing, fails or hangs."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None
