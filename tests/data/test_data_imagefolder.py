"""The imagefolder dataset: folders and archives of small PNGs written in tmp_path."""
from __future__ import annotations

import errno
import io
import os
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prunekit.core.errors import ConfigError
from prunekit.data import DataConfig, DataError, load_data
from prunekit.data import cache, imagefolder
from prunekit.data.device_loader import DeviceLoader
from prunekit.data.imagefolder import load_imagefolder
from prunekit.data.sources import ImageFiles
from prunekit.data.stream_loader import StreamLoader


def cfg_for(root, **kw) -> DataConfig:
    return DataConfig(name="imagefolder", root=str(root), **kw)


def expect(arrays, fake):
    assert arrays.class_names == fake.class_names == ["ant", "cat", "dog"]
    for split in ("train", "test"):
        x, y = fake.expected[split]
        assert np.array_equal(getattr(arrays, f"{split}_x"), x), split
        assert np.array_equal(getattr(arrays, f"{split}_y"), y), split


def test_folder_loads_with_sorted_class_labels(tmp_path, fakes, private_cache):
    fake = fakes.write_image_folder(tmp_path / "imgs")
    expect(load_imagefolder(cfg_for(fake.root)), fake)


@pytest.mark.parametrize("suffix,top", [(".tar.gz", None), (".tar.gz", "mydata"), (".tar", None)])
def test_archive_loads_with_correct_labels(tmp_path, fakes, private_cache, suffix, top):
    fake = fakes.write_image_folder(tmp_path / "imgs")
    archive = tmp_path / f"imgs{suffix}"
    if suffix == ".tar":
        import tarfile

        with tarfile.open(archive, "w") as tar:
            for child in sorted(fake.root.iterdir()):
                tar.add(child, arcname=child.name)
    else:
        fakes.tar_folder(fake.root, archive, top=top)
    expect(load_imagefolder(cfg_for(archive)), fake)


def test_load_data_batches_carry_the_right_labels(tmp_path, fakes, private_cache):
    fake = fakes.write_image_folder(tmp_path / "imgs", train_per_class=6)
    bundle = load_data(cfg_for(fake.root, val_fraction=0.0, batch_size=5, eval_batch_size=4))
    assert bundle.input_shape == (3, 6, 5) and bundle.class_names == ["ant", "cat", "dog"]
    x_test, y_test = fake.expected["test"]
    got = [(fakes.unnormalize(x, bundle.mean, bundle.std), y.numpy()) for x, y in bundle.test]
    assert np.array_equal(np.concatenate([g[0] for g in got]), x_test)
    assert np.array_equal(np.concatenate([g[1] for g in got]), y_test)


def test_cache_is_reused_and_refreshed_when_the_archive_changes(tmp_path, fakes, private_cache, monkeypatch):
    fake = fakes.write_image_folder(tmp_path / "imgs")
    archive = fakes.tar_folder(fake.root, tmp_path / "imgs.tar.gz")
    calls = []
    real_decode = imagefolder.decode_image
    monkeypatch.setattr(imagefolder, "decode_image", lambda *a: calls.append(1) or real_decode(*a))
    expect(load_imagefolder(cfg_for(archive)), fake)
    assert len(calls) == 18 and len(list(private_cache.glob("imagefolder-*.npz"))) == 1
    calls.clear()
    expect(load_imagefolder(cfg_for(archive)), fake)
    assert calls == []  # served from the cache, nothing decoded

    # New contents (and a new mtime): decoded afresh, and the stale entry is replaced.
    fake2 = fakes.write_image_folder(tmp_path / "imgs2", seed=1)
    fakes.tar_folder(fake2.root, archive)
    os.utime(archive, ns=(1_000_000_000, 1_000_000_000))
    expect(load_imagefolder(cfg_for(archive)), fake2)
    assert len(calls) == 18 and len(list(private_cache.glob("imagefolder-*.npz"))) == 1


@pytest.mark.parametrize("damage", ["truncated", "flat images", "labels out of range", "other label count",
                                    "class names not a list"])
def test_a_damaged_cache_entry_is_decoded_again_and_replaced(tmp_path, fakes, private_cache, damage, monkeypatch):
    fake = fakes.write_image_folder(tmp_path / "imgs")
    calls = []
    real_decode = imagefolder.decode_image
    monkeypatch.setattr(imagefolder, "decode_image", lambda *a: calls.append(1) or real_decode(*a))
    expect(load_imagefolder(cfg_for(fake.root)), fake)
    entry = next(private_cache.glob("imagefolder-*.npz"))
    with np.load(entry) as z:
        arrays = dict(z)
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:200])
    else:
        if damage == "flat images":
            arrays["train_x"] = arrays["train_x"].reshape(len(arrays["train_x"]), -1)
        elif damage == "labels out of range":
            arrays["train_y"][0] = 99
        elif damage == "class names not a list":
            arrays["class_names"] = np.array("ant")
        else:
            arrays["test_y"] = arrays["test_y"][1:]
        np.savez(entry, **arrays)
    calls.clear()
    expect(load_imagefolder(cfg_for(fake.root)), fake)
    assert len(calls) == 18  # the damaged entry was not served: every image decoded again
    calls.clear()
    expect(load_imagefolder(cfg_for(fake.root)), fake)  # the entry written again is whole
    assert calls == []


def test_folder_cache_notices_a_changed_file(tmp_path, fakes, private_cache):
    fake = fakes.write_image_folder(tmp_path / "imgs")
    first = load_imagefolder(cfg_for(fake.root))
    target = fake.root / "train" / "ant" / "000.png"
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(target)
    second = load_imagefolder(cfg_for(fake.root))
    assert first.train_x[0].any() and not second.train_x[0].any()


def test_folder_cache_notices_a_file_rewritten_at_the_same_size(tmp_path, fakes, private_cache):
    """New contents of exactly the old byte count (a PNG padded after its end): only the
    modification time tells the cache that the file changed."""
    fake = fakes.write_image_folder(tmp_path / "imgs")
    target = fake.root / "train" / "ant" / "000.png"
    noisy = np.random.default_rng(0).integers(1, 255, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(target)
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))
    size = target.stat().st_size
    first = load_imagefolder(cfg_for(fake.root))
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(target)
    target.write_bytes(target.read_bytes().ljust(size, b"\0"))  # PIL stops reading at the PNG's end
    os.utime(target, ns=(2_000_000_000, 2_000_000_000))
    assert target.stat().st_size == size
    second = load_imagefolder(cfg_for(fake.root))
    assert first.train_x[0].all() and not second.train_x[0].any()


def test_archive_cache_notices_a_new_archive_of_the_same_size(tmp_path, fakes, private_cache, monkeypatch):
    fake = fakes.write_image_folder(tmp_path / "imgs")
    archive = fakes.tar_folder(fake.root, tmp_path / "imgs.tar.gz")
    os.utime(archive, ns=(1_000_000_000, 1_000_000_000))
    expect(load_imagefolder(cfg_for(archive)), fake)
    calls = []
    real_decode = imagefolder.decode_image
    monkeypatch.setattr(imagefolder, "decode_image", lambda *a: calls.append(1) or real_decode(*a))
    os.utime(archive, ns=(2_000_000_000, 2_000_000_000))  # the same bytes, touched: read again
    expect(load_imagefolder(cfg_for(archive)), fake)
    assert len(calls) == 18


def test_missing_test_split_is_carved_per_class(tmp_path, fakes, private_cache):
    fake = fakes.write_image_folder(tmp_path / "imgs", train_per_class=5, test_per_class=0)
    arrays = load_imagefolder(cfg_for(fake.root))
    assert np.bincount(arrays.test_y).tolist() == [1, 1, 1] and np.bincount(arrays.train_y).tolist() == [4, 4, 4]
    x, y = fake.expected["train"]
    pairs = lambda xs, ys: sorted(a.tobytes() + bytes([int(b)]) for a, b in zip(xs, ys))
    assert pairs(np.concatenate([arrays.train_x, arrays.test_x]), np.concatenate([arrays.train_y, arrays.test_y])) == pairs(x, y)


def test_a_dataset_too_small_for_its_splits_gets_one_data_error(tmp_path, private_cache):
    for c in ("a", "b"):
        (tmp_path / "imgs" / "train" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / "train" / c / "0.png")
    with pytest.raises(DataError, match="has no test images; add a test/ folder"):
        load_data(cfg_for(tmp_path / "imgs"))
    (tmp_path / "imgs" / "test" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / "test" / "a" / "0.png")
    with pytest.raises(DataError, match="leaves no training images once val_fraction=0.99"):
        load_data(cfg_for(tmp_path / "imgs", val_fraction=0.99))


def test_grey_images_give_one_channel(tmp_path, fakes, private_cache):
    fake = fakes.write_image_folder(tmp_path / "imgs", mode="L")
    arrays = load_imagefolder(cfg_for(fake.root))
    assert arrays.train_x.shape == (12, 1, 6, 5)
    assert np.array_equal(arrays.train_x, fake.expected["train"][0])


def test_sixteen_bit_grey_images_are_scaled_not_clipped(tmp_path, private_cache):
    pixels = np.arange(30, dtype=np.uint16).reshape(6, 5) * 2000  # 0 .. 58000 of 65535
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    arrays = load_imagefolder(cfg_for(tmp_path))
    assert arrays.train_x.shape == (4, 1, 6, 5)
    assert np.array_equal(arrays.train_x[0, 0], (pixels >> 8).astype(np.uint8))


def test_a_broken_link_and_non_utf8_names_in_the_folder_do_not_stop_loading(tmp_path, fakes, private_cache):
    fake = fakes.write_image_folder(tmp_path / "imgs")
    (fake.root / "notes.txt").symlink_to(tmp_path / "gone.txt")  # a link whose target was removed
    odd = os.fsdecode(b"zebra\xff")  # a class folder named in another encoding (Latin-1)
    for split in ("train", "test"):
        (fake.root / split / "dog").rename(fake.root / split / odd)
    arrays = load_imagefolder(cfg_for(fake.root))
    assert arrays.class_names == ["ant", "cat", odd] and arrays.train_x.shape == (12, 3, 6, 5)
    (fake.root / "train" / "ant" / "999.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(DataError, match="cannot decode .*999.png.*remove or replace the file"):
        load_imagefolder(cfg_for(fake.root))


@pytest.mark.timeout(30, method="thread")  # a blocked read holds a decoding thread
def test_a_pipe_named_like_an_image_is_skipped_not_read(tmp_path, fakes, private_cache):
    fake = fakes.write_image_folder(tmp_path / "imgs")
    os.mkfifo(fake.root / "train" / "dog" / "999.png")  # reading it would wait for a writer forever
    expect(load_imagefolder(cfg_for(fake.root)), fake)


def test_mixed_sizes_need_image_size(tmp_path, fakes, private_cache):
    fake = fakes.write_image_folder(tmp_path / "imgs")
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(fake.root / "train" / "dog" / "999.png")
    with pytest.raises(DataError, match="set image_size"):
        load_imagefolder(cfg_for(fake.root))
    arrays = load_imagefolder(cfg_for(fake.root, image_size=4))
    assert arrays.train_x.shape == (13, 3, 4, 4)
    solid = Image.fromarray(np.full((6, 5, 3), 77, np.uint8)).resize((4, 4), Image.BILINEAR)
    Image.fromarray(np.full((6, 5, 3), 77, np.uint8)).save(fake.root / "test" / "ant" / "000.png")
    resized = load_imagefolder(cfg_for(fake.root, image_size=4))
    assert np.array_equal(resized.test_x[0], np.asarray(solid).transpose(2, 0, 1))


@pytest.mark.parametrize("archive", [False, True], ids=["folder", "archive"])
def test_a_corrupt_image_is_named_in_one_data_error(tmp_path, fakes, private_cache, archive):
    fake = fakes.write_image_folder(tmp_path / "imgs")
    (fake.root / "train" / "dog" / "900.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    root = fakes.tar_folder(fake.root, tmp_path / "imgs.tar.gz") if archive else fake.root
    name = "train/dog/900.png"
    with pytest.raises(DataError, match=f"cannot decode .*{name}.*remove or replace the file"):
        load_imagefolder(cfg_for(root))


@pytest.mark.parametrize("mode", ["w:gz", "w"], ids=["tar.gz", "tar"])
def test_an_archive_cut_short_is_one_data_error(tmp_path, fakes, private_cache, mode):
    fake = fakes.write_image_folder(tmp_path / "imgs")
    archive = tmp_path / ("imgs.tar.gz" if mode == "w:gz" else "imgs.tar")
    with tarfile.open(archive, mode) as tar:
        tar.add(fake.root / "train", arcname="train")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])  # a copy that stopped half way
    with pytest.raises(DataError, match="cannot read .* archive .*damaged or cut short"):
        load_imagefolder(cfg_for(archive))


def test_bad_roots_are_reported(tmp_path, fakes, private_cache):
    with pytest.raises(ConfigError, match="needs root="):
        load_data(DataConfig(name="imagefolder"))
    with pytest.raises(DataError, match="image folder .* does not exist; set data.root="):
        load_imagefolder(cfg_for(tmp_path / "nope"))
    with pytest.raises(DataError, match=r"archive 'nope.tar.gz' does not exist \(relative to the current directory"):
        load_imagefolder(cfg_for("nope.tar.gz"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="not a .tar/.tar.gz archive"):
        load_imagefolder(cfg_for(tmp_path / "notes.txt"))
    (tmp_path / "flat" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="no train/ split"):
        load_imagefolder(cfg_for(tmp_path / "flat"))


def test_large_folders_stream_and_match_the_in_memory_batches(tmp_path, fakes, private_cache, monkeypatch):
    fake = fakes.write_image_folder(tmp_path / "imgs", size=(8, 8), train_per_class=7)
    cfg = cfg_for(fake.root, batch_size=4, eval_batch_size=5, val_fraction=0.2, seed=3)
    with monkeypatch.context() as patch:
        patch.setattr(imagefolder, "MAX_IN_MEMORY_BYTES", 0)
        assert isinstance(load_imagefolder(cfg), ImageFiles)
        streamed = load_data(cfg)
    assert not list(private_cache.glob("*.npz"))  # streamed sets are not cached
    in_memory = load_data(cfg)
    assert isinstance(in_memory.train, DeviceLoader) and isinstance(streamed.train, StreamLoader)
    # 2,000-image stats sample covers all 17 train images here, so the stats agree exactly.
    assert np.allclose(in_memory.mean, streamed.mean) and np.allclose(in_memory.std, streamed.std)
    for name in ("train", "val", "test"):
        a, b = getattr(in_memory, name), getattr(streamed, name)
        a.set_epoch(2)
        b.set_epoch(2)
        batches_a, batches_b = list(a), list(b)
        assert len(batches_a) == len(a) == len(batches_b) == len(b) > 0
        for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
            assert torch.equal(ya, yb) and torch.allclose(xa, xb), name


def test_large_archives_ask_to_be_extracted(tmp_path, fakes, private_cache, monkeypatch):
    fake = fakes.write_image_folder(tmp_path / "imgs")
    archive = fakes.tar_folder(fake.root, tmp_path / "imgs.tar.gz")
    monkeypatch.setattr(imagefolder, "MAX_IN_MEMORY_BYTES", 0)
    with pytest.raises(DataError, match="extract it and pass the folder"):
        load_imagefolder(cfg_for(archive))


def test_an_archive_is_refused_before_its_members_are_read_into_memory(tmp_path, fakes, private_cache, monkeypatch):
    """A small .tar.gz can unpack to gigabytes: sizes are checked from the headers, per file and in all."""
    fake = fakes.write_image_folder(tmp_path / "imgs")
    archive = fakes.tar_folder(fake.root, tmp_path / "imgs.tar.gz")
    with monkeypatch.context() as patch:
        patch.setattr(imagefolder, "MAX_IMAGE_BYTES", 10)
        with pytest.raises(DataError, match="more than an image file may be here .*; remove it"):
            load_imagefolder(cfg_for(archive))
    read = []
    monkeypatch.setattr(imagefolder.tarfile.TarFile, "extractfile", lambda self, m: read.append(m) or None)
    monkeypatch.setattr(imagefolder, "MAX_ARCHIVE_BYTES", 0)
    with pytest.raises(DataError, match="extract it and pass the folder"):
        load_imagefolder(cfg_for(archive))
    assert not read


def test_a_decompression_bomb_as_the_first_image_gets_a_data_error(tmp_path, fakes, private_cache, monkeypatch):
    fake = fakes.write_image_folder(tmp_path / "imgs")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4)  # every fake image is now a "bomb" (> 2 x the limit)
    with pytest.raises(DataError, match="first train image .*DecompressionBombError.*remove or replace"):
        load_imagefolder(cfg_for(fake.root))


def test_a_corrupt_image_met_while_streaming_is_named_in_one_data_error(tmp_path, fakes, private_cache, monkeypatch):
    fake = fakes.write_image_folder(tmp_path / "imgs")
    monkeypatch.setattr(imagefolder, "MAX_IN_MEMORY_BYTES", 0)
    bundle = load_data(cfg_for(fake.root, val_fraction=0.0))
    (fake.root / "test" / "dog" / "001.png").write_bytes(b"")  # damaged after the folder was read
    with pytest.raises(DataError, match="cannot decode .*001.png.*remove or replace the file"):
        list(bundle.test)


def test_streaming_with_worker_processes_keeps_the_order(tmp_path, fakes, private_cache, monkeypatch):
    fake = fakes.write_image_folder(tmp_path / "imgs", size=(8, 8), test_per_class=5)
    monkeypatch.setattr(imagefolder, "MAX_IN_MEMORY_BYTES", 0)
    bundle = load_data(cfg_for(fake.root, eval_batch_size=4, num_workers=2))
    x = np.concatenate([fakes.unnormalize(xb, bundle.mean, bundle.std) for xb, _ in bundle.test])
    y = np.concatenate([yb.numpy() for _, yb in bundle.test])
    assert np.array_equal(x, fake.expected["test"][0]) and np.array_equal(y, fake.expected["test"][1])


def test_unwritable_cache_warns_but_loads(tmp_path, fakes, monkeypatch):
    fake = fakes.write_image_folder(tmp_path / "imgs")
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("PRUNEKIT_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="set PRUNEKIT_CACHE to a writable folder"):
        expect(load_imagefolder(cfg_for(fake.root)), fake)


def _tiff_with_text_strip_offsets() -> bytes:
    """A 6x5 TIFF whose StripOffsets tag is typed as text: Pillow opens it, then its decoder
    fails with a TypeError rather than an OSError."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack_from("<H", data, entry)[0] == 273:  # StripOffsets
            struct.pack_into("<H", data, entry + 2, 2)  # type ASCII
    return bytes(data)


@pytest.mark.parametrize("archive", [False, True], ids=["folder", "archive"])
def test_a_damaged_tiff_that_pillow_fails_on_with_a_type_error_is_one_data_error(tmp_path, fakes, private_cache,
                                                                                  archive):
    fake = fakes.write_image_folder(tmp_path / "imgs")
    (fake.root / "train" / "dog" / "900.tif").write_bytes(_tiff_with_text_strip_offsets())
    root = fakes.tar_folder(fake.root, tmp_path / "imgs.tar.gz") if archive else fake.root
    with pytest.raises(DataError, match="cannot decode .*TypeError.*remove or replace the file"):
        load_imagefolder(cfg_for(root))
    assert not list(private_cache.glob("*.npz"))


def test_a_damaged_tiff_met_while_streaming_is_one_data_error(tmp_path, fakes, private_cache, monkeypatch):
    fake = fakes.write_image_folder(tmp_path / "imgs")
    (fake.root / "test" / "dog" / "900.tif").write_bytes(_tiff_with_text_strip_offsets())
    monkeypatch.setattr(imagefolder, "MAX_IN_MEMORY_BYTES", 0)
    bundle = load_data(cfg_for(fake.root, val_fraction=0.0))
    with pytest.raises(DataError, match="cannot decode .*900.tif.*remove or replace the file"):
        list(bundle.test)


@pytest.mark.parametrize("cut", ["at a member's header", "inside a member's header"])
def test_an_uncompressed_archive_cut_between_members_is_one_data_error(tmp_path, fakes, private_cache, cut):
    """tarfile takes a missing or partial header for the end of the archive: without a check the
    members after the cut (here the whole test/ split) would silently be missing."""
    fake = fakes.write_image_folder(tmp_path / "imgs")
    archive = tmp_path / "imgs.tar"
    with tarfile.open(archive, "w") as tar:
        for split in ("train", "test"):
            tar.add(fake.root / split, arcname=split)
    with tarfile.open(archive) as tar:
        first_test = next(m for m in tar if m.name.startswith("test/") and m.isfile())
    end = first_test.offset + (0 if cut == "at a member's header" else 100)
    archive.write_bytes(archive.read_bytes()[:end])
    with pytest.raises(DataError, match="cannot read .* archive .*damaged or cut short"):
        load_imagefolder(cfg_for(archive))
    assert not list(private_cache.glob("*.npz"))


def test_a_cache_entry_claiming_a_huge_array_is_decoded_again(tmp_path, fakes, private_cache, monkeypatch):
    """An entry whose array header was edited to terabytes: numpy's MemoryError must not escape."""
    fake = fakes.write_image_folder(tmp_path / "imgs")
    expect(load_imagefolder(cfg_for(fake.root)), fake)
    entry = next(private_cache.glob("imagefolder-*.npz"))
    with zipfile.ZipFile(entry) as z:
        members = {name: z.read(name) for name in z.namelist()}
    data = members["train_x.npy"]
    length = int.from_bytes(data[8:10], "little")
    header = data[10:10 + length].decode("latin1").replace("(12, 3, 6, 5)", "(100000000000000, 3, 6, 5)")
    members["train_x.npy"] = data[:10] + (header.rstrip().ljust(length - 1) + "\n").encode("latin1") + data[10 + length:]
    with zipfile.ZipFile(entry, "w") as z:
        for name, payload in members.items():
            z.writestr(name, payload)
    calls = []
    real_decode = imagefolder.decode_image
    monkeypatch.setattr(imagefolder, "decode_image", lambda *a: calls.append(1) or real_decode(*a))
    expect(load_imagefolder(cfg_for(fake.root)), fake)
    assert len(calls) == 18


def test_a_failed_cache_write_leaves_no_partial_file(tmp_path, fakes, private_cache, monkeypatch):
    fake = fakes.write_image_folder(tmp_path / "imgs")

    def disk_full(file, **arrays):
        Path(file).write_bytes(b"PK" + b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache.np, "savez", disk_full)
    with pytest.warns(UserWarning, match="could not write the decoded-image cache"):
        expect(load_imagefolder(cfg_for(fake.root)), fake)
    assert list(private_cache.iterdir()) == []


def test_entries_for_other_image_sizes_of_one_source_are_kept(tmp_path, fakes, private_cache, monkeypatch):
    """Only entries of an older state of the source are stale; one per image_size is kept."""
    fake = fakes.write_image_folder(tmp_path / "imgs")
    load_imagefolder(cfg_for(fake.root))
    load_imagefolder(cfg_for(fake.root, image_size=4))
    calls = []
    real_decode = imagefolder.decode_image
    monkeypatch.setattr(imagefolder, "decode_image", lambda *a: calls.append(1) or real_decode(*a))
    expect(load_imagefolder(cfg_for(fake.root)), fake)
    assert load_imagefolder(cfg_for(fake.root, image_size=4)).train_x.shape[2:] == (4, 4)
    assert calls == [] and len(list(private_cache.glob("imagefolder-*.npz"))) == 2
    os.utime(fake.root / "train" / "ant" / "000.png", ns=(1_000_000_000, 1_000_000_000))
    expect(load_imagefolder(cfg_for(fake.root)), fake)  # a changed source replaces the entries of its path
    assert len(list(private_cache.glob("imagefolder-*.npz"))) == 1


def test_class_folders_that_are_links_are_loaded_and_a_link_loop_ends(tmp_path, fakes, private_cache):
    """A dataset assembled from links to class folders elsewhere keeps every class; a link back
    up the tree is not followed round and round."""
    store = fakes.write_image_folder(tmp_path / "store")
    root = tmp_path / "linked"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        for cls in ("ant", "cat"):
            os.symlink(store.root / split / cls, root / split / cls)
    (root / "train" / "dog").mkdir()
    for name in sorted(os.listdir(store.root / "train" / "dog")):
        (root / "train" / "dog" / name).write_bytes((store.root / "train" / "dog" / name).read_bytes())
    os.symlink(store.root / "test" / "dog", root / "test" / "dog")
    os.symlink(root, root / "train" / "ant" / "loop")  # inside store/train/ant, pointing back up
    expect(load_imagefolder(cfg_for(root)), store)
    before = load_imagefolder(cfg_for(root))
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(store.root / "train" / "cat" / "000.png")
    os.utime(store.root / "train" / "cat" / "000.png", ns=(1_000_000_000, 1_000_000_000))
    after = load_imagefolder(cfg_for(root))  # a change behind a link is a change of the source
    assert before.train_x[4].any() and not after.train_x[4].any()


@pytest.mark.parametrize("archive", [False, True], ids=["folder", "archive"])
def test_one_grey_image_sorted_first_does_not_make_a_colour_set_grey(tmp_path, fakes, private_cache, archive):
    fake = fakes.write_image_folder(tmp_path / "imgs")
    grey = np.arange(30, dtype=np.uint8).reshape(6, 5)
    Image.fromarray(grey, "L").save(fake.root / "train" / "ant" / "000.png")
    root = fakes.tar_folder(fake.root, tmp_path / "imgs.tar.gz") if archive else fake.root
    arrays = load_imagefolder(cfg_for(root))
    assert arrays.train_x.shape == (12, 3, 6, 5) and arrays.test_x.shape == (6, 3, 6, 5)
    assert all(np.array_equal(channel, grey) for channel in arrays.train_x[0])
    assert np.array_equal(arrays.train_x[1:], fake.expected["train"][0][1:])


def test_a_corrupt_image_met_by_a_worker_process_is_one_plain_data_error(tmp_path, fakes, private_cache, monkeypatch):
    fake = fakes.write_image_folder(tmp_path / "imgs")
    monkeypatch.setattr(imagefolder, "MAX_IN_MEMORY_BYTES", 0)
    bundle = load_data(cfg_for(fake.root, val_fraction=0.0, num_workers=1))
    (fake.root / "test" / "dog" / "001.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"^cannot decode .*001.png.*remove or replace the file$") as caught:
        list(bundle.test)
    assert "Traceback" not in str(caught.value)


def test_a_streamed_folder_whose_first_image_is_grey_keeps_its_colour(tmp_path, fakes, private_cache, monkeypatch):
    """Streamed sets decode every image in one mode: a grey first image must not make the colour
    images grey (their headers are read to choose)."""
    fake = fakes.write_image_folder(tmp_path / "imgs")
    grey = np.arange(30, dtype=np.uint8).reshape(6, 5)
    Image.fromarray(grey, "L").save(fake.root / "train" / "ant" / "000.png")
    monkeypatch.setattr(imagefolder, "MAX_IN_MEMORY_BYTES", 0)
    files = load_imagefolder(cfg_for(fake.root))
    assert isinstance(files, ImageFiles) and files.image_shape == (3, 6, 5)
    for p in fake.root.rglob("*.*"):
        Image.fromarray(grey, "L").save(p)
    assert load_imagefolder(cfg_for(fake.root)).image_shape == (1, 6, 5)  # all grey: one channel


def test_a_corrupt_image_in_an_archive_is_named_by_its_member_path(tmp_path, fakes, private_cache):
    fake = fakes.write_image_folder(tmp_path / "imgs")
    (fake.root / "train" / "dog" / "900.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    archive = fakes.tar_folder(fake.root, tmp_path / "imgs.tar.gz")
    with pytest.raises(DataError, match=r"cannot decode \S*train/dog/900\.png \("):
        load_imagefolder(cfg_for(archive))
