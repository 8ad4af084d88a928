"""Damaged files are refused by checksum; failed writes are one-line errors and leave no file."""
from __future__ import annotations

import errno
import os

import pytest
import torch
from torch import nn

from prunekit.core import integrity
from prunekit.core.errors import CheckpointError, ConfigError
from prunekit.engine import CHECKPOINT_NAME, TrainConfig, load_checkpoint, train
from prunekit.engine.checkpoint import atomic_torch_save
from prunekit.surgery import tensor_file
from prunekit.surgery.persist import load_pruned, save_pruned
from prunekit.surgery.plan import empty_plan


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def _flip_inside(path, tensor: torch.Tensor, n: int = 64) -> None:
    """Flip `n` bytes in the middle of `tensor`'s stored bytes (located by content)."""
    data = bytearray(path.read_bytes())
    raw = tensor.detach().contiguous().numpy().tobytes()
    at = data.find(raw)
    assert at >= 0, "tensor bytes not found in the file"
    mid = at + len(raw) // 2
    for i in range(mid, mid + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_pruned_file_are_refused(tmp_path):
    net = _net()
    path = save_pruned(net, empty_plan(torch.zeros(1, 64)), tmp_path / "net.safetensors")
    _flip_inside(path, net[0].weight)
    with pytest.raises(CheckpointError, match=r"net\.safetensors is corrupt.*checksum"):
        load_pruned(_net(), path)


def _rewrite_metadata(path, change) -> None:
    """The same tensors written again with `change(metadata)`: what a damaged header would read as."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata=change(meta))


def test_changed_metadata_in_a_pruned_file_is_refused(tmp_path):
    """The tensors' checksum does not cover the metadata (plan, tied names, module versions):
    a second checksum does, and an edit there is refused as corruption."""
    net = _net()
    path = save_pruned(net, empty_plan(torch.zeros(1, 64)), tmp_path / "net.safetensors")
    _rewrite_metadata(path, lambda m: {**m, tensor_file.ALIASES_KEY: '{"2.weight": "0.weight"}'})
    with pytest.raises(CheckpointError, match=r"net\.safetensors is corrupt: its metadata"):
        load_pruned(_net(), path)


def test_a_file_written_before_the_metadata_checksum_still_loads(tmp_path):
    net = _net()
    path = save_pruned(net, empty_plan(torch.zeros(1, 64)), tmp_path / "net.safetensors")
    _rewrite_metadata(path, lambda m: {k: v for k, v in m.items() if k != tensor_file.META_SHA_KEY})
    twin = load_pruned(_net(), path)
    assert torch.equal(twin[0].weight, net[0].weight)


def test_flipped_bytes_in_a_training_checkpoint_are_refused(tmp_path):
    net = _net()
    data = [(torch.randn(8, 64), torch.randint(0, 4, (8,)))]
    train(net, data, None, TrainConfig(epochs=1, log_every=0), ckpt_dir=tmp_path, progress=False)
    path = tmp_path / CHECKPOINT_NAME
    _flip_inside(path, net[0].weight, n=4096)  # 4 KB, as a damaged disk block would
    with pytest.raises(CheckpointError, match=r"last\.pt is corrupt.*checksum"):
        load_checkpoint(path)


def _no_space(*args, **kwargs):
    path = args[1] if len(args) > 1 else None
    if isinstance(path, (str, os.PathLike)):
        with open(path, "wb") as f:
            f.write(b"half a file")  # the writer got this far before the disk filled
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_saving_a_pruned_file(tmp_path, monkeypatch):
    net = _net()
    good = save_pruned(net, empty_plan(torch.zeros(1, 64)), tmp_path / "net.safetensors")
    before = good.read_bytes()
    monkeypatch.setattr(tensor_file, "save_file", _no_space)
    with pytest.raises(CheckpointError) as info:
        save_pruned(_net(), empty_plan(torch.zeros(1, 64)), good)
    message = str(info.value)
    assert "net.safetensors" in message and "no space left" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.safetensors"]  # no temporary file
    assert good.read_bytes() == before  # the previous file is intact


def test_disk_full_while_saving_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _no_space)
    with pytest.raises(CheckpointError, match="no space left"):
        atomic_torch_save({"x": torch.zeros(2)}, tmp_path / CHECKPOINT_NAME)
    assert list(tmp_path.iterdir()) == []


def test_read_only_file_system_is_one_clear_error(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(integrity.tempfile, "mkstemp", read_only)
    with pytest.raises(CheckpointError, match="read-only") as info:
        save_pruned(_net(), empty_plan(torch.zeros(1, 64)), tmp_path / "net.safetensors")
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="read-only"):
        atomic_torch_save({"x": torch.zeros(2)}, tmp_path / CHECKPOINT_NAME)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write to read-only directories")
def test_read_only_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match="permission denied"):
            save_pruned(_net(), empty_plan(torch.zeros(1, 64)), locked / "net.safetensors")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_written_file_has_the_permissions_a_plain_write_gives(tmp_path):
    # mkstemp's temporary file is 0o600: renamed over a 0o644 file, the file became unreadable
    # to everyone but its owner, and every new file was written so too
    path = tmp_path / "net.safetensors"
    path.write_bytes(b"old")
    path.chmod(0o644)
    save_pruned(_net(), empty_plan(torch.zeros(1, 64)), path)
    assert path.stat().st_mode & 0o777 == 0o644
    umask = os.umask(0o022)
    try:
        fresh = save_pruned(_net(), empty_plan(torch.zeros(1, 64)), tmp_path / "new.safetensors")
    finally:
        os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "default-name"])
def test_a_run_directory_is_claimed_empty_or_not_at_all(tmp_path, explicit):
    # another command's run (its first file differs) or the user's own files: neither is shared
    used = tmp_path / "used"
    used.mkdir()
    (used / "recipe.json").write_text("another run")
    if explicit:
        with pytest.raises(ConfigError, match=r"used already holds other files \(recipe\.json\); choose a new path"):
            integrity.claim_dir(used, "recipe.yaml", "mine", explicit=True)
        assert sorted(p.name for p in used.iterdir()) == ["recipe.json"]
        assert (used / "recipe.json").read_text() == "another run"
    else:
        got = integrity.claim_dir(used, "recipe.yaml", "mine", explicit=False)
        assert got == tmp_path / "used-2" and sorted(p.name for p in got.iterdir()) == ["recipe.yaml"]
    empty = tmp_path / "empty"
    empty.mkdir()
    got = integrity.claim_dir(empty, "recipe.yaml", "mine", explicit=explicit)
    assert got == (empty if explicit else tmp_path / "empty-2") and (got / "recipe.yaml").read_text() == "mine"


def test_hold_dir_is_reentrant_in_a_process_and_exclusive_across_processes(tmp_path):
    """A command holding its run directory may call code that holds it again; another process
    cannot take it until the holder lets go."""
    import subprocess
    import sys

    from prunekit.core.integrity import hold_dir

    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY)\n"
             "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
             "except OSError:\n    print('held')\n")
    taken = lambda: subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True,
                                   text=True, check=True).stdout.strip()
    with hold_dir(tmp_path):
        with hold_dir(tmp_path):
            assert taken() == "held"
        assert taken() == "held"  # the inner exit does not let go of the outer hold
    assert taken() == "free"
