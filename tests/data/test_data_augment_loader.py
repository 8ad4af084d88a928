"""Batched crop/flip against a per-image reference, and the in-memory loader's batching."""
from __future__ import annotations

import pytest
import torch

from prunekit.data.augment import crop_flip, crop_padding, normalizer, pad_images, sample_crop_flip
from prunekit.data.device_loader import DeviceLoader


def reference_crop_flip(images, pad, offsets, flips):
    """torchvision's RandomCrop(padding) + RandomHorizontalFlip, one image at a time."""
    n, c, h, w = images.shape
    padded = torch.zeros(n, c, h + 2 * pad, w + 2 * pad, dtype=images.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = images
    out = []
    for i in range(n):
        dy, dx = offsets[i].tolist()
        crop = padded[i, :, dy:dy + h, dx:dx + w]
        out.append(crop.flip(-1) if flips[i] else crop)
    return torch.stack(out)


def test_crop_flip_matches_the_per_image_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    offsets, flips = sample_crop_flip(16, 4, True, g)
    out = crop_flip(pad_images(images, 4), offsets, flips, (32, 32))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, reference_crop_flip(images, 4, offsets, flips))
    assert 0 < int(flips.sum()) < 16 and offsets.min() >= 0 and offsets.max() <= 8


def test_flips_are_exact_mirror_images():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (8, 2, 5, 7), dtype=torch.uint8, generator=g)
    offsets, flips = sample_crop_flip(8, 2, True, torch.Generator().manual_seed(7))
    centred = torch.full_like(offsets, 2)  # offset (pad, pad) is the uncropped image
    out = crop_flip(pad_images(images, 2), centred, flips, (5, 7))
    for i in range(8):
        assert torch.equal(out[i], images[i].flip(-1) if flips[i] else images[i])
    # The same generator seed draws the same offsets and flips.
    again = sample_crop_flip(8, 2, True, torch.Generator().manual_seed(7))
    assert torch.equal(again[0], offsets) and torch.equal(again[1], flips)


def test_corner_crop_shows_the_zero_padding():
    images = torch.full((1, 1, 4, 4), 9, dtype=torch.uint8)
    out = crop_flip(pad_images(images, 1), torch.tensor([[0, 0]]), torch.tensor([False]), (4, 4))
    expected = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    expected[..., 1:, 1:] = 9
    assert torch.equal(out, expected)


def test_no_flip_draws_no_flips_and_padding_rule():
    _, flips = sample_crop_flip(50, 1, False, torch.Generator().manual_seed(0))
    assert not flips.any()
    assert (crop_padding(32), crop_padding(8), crop_padding(224)) == (4, 1, 28)


def test_normalizer_matches_the_formula():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(normalizer(mean, std, "cpu")(x), expected, atol=1e-5)


def make_loader(n=10, **kw):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return DeviceLoader(images, torch.arange(n), mean=(0.0,), std=(1 / 255,), seed=0, **kw)


@pytest.mark.parametrize("drop_last,lengths", [(False, [4, 4, 2]), (True, [4, 4])])
def test_batch_counts_and_sizes(drop_last, lengths):
    loader = make_loader(batch_size=4, drop_last=drop_last, shuffle=True)
    assert len(loader) == len(lengths)
    assert [len(y) for _, y in loader] == lengths


def test_every_sample_once_per_epoch_with_its_own_label():
    loader = make_loader(n=23, batch_size=5, shuffle=True, crop_pad=1, flip=True)
    for epoch in range(3):
        loader.set_epoch(epoch)
        xs, ys = zip(*loader)
        y = torch.cat(ys)
        assert sorted(y.tolist()) == list(range(23))
        # Image k is the constant k, so every non-padding pixel of a crop equals its label.
        x = torch.cat(xs)
        assert torch.all((x == 0) | (x == y.view(-1, 1, 1, 1).float()))
        assert x[:, :, 1:3, 1:3].eq(y.view(-1, 1, 1, 1).float()).all()  # the centre survives any crop


def test_shuffle_off_keeps_order_and_epochs_differ_when_on():
    fixed = make_loader(batch_size=10)
    assert [y.tolist() for _, y in fixed] == [list(range(10))]
    loader = make_loader(batch_size=10, shuffle=True)
    orders = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        orders.append(next(iter(loader))[1].tolist())
    assert orders[0] == orders[2] != orders[1]
