"""Batched cutout against a per-image loop written as in DARTS's Cutout transform."""
import numpy as np
import torch

from prunekit.data.augment import CutoutLoader, cutout_


def _loop_oracle(images, centres, length):
    out = images.clone().numpy()
    h, w = out.shape[2:]
    for b, (y, x) in enumerate(centres):
        y1, y2 = np.clip(y - length // 2, 0, h), np.clip(y + length // 2, 0, h)
        x1, x2 = np.clip(x - length // 2, 0, w), np.clip(x + length // 2, 0, w)
        out[b, :, y1:y2, x1:x2] = 0
    return torch.from_numpy(out)


def test_cutout_equals_loop_oracle():
    images = torch.randn(16, 3, 9, 7)
    gen = torch.Generator().manual_seed(3)
    got = cutout_(images.clone(), 4, gen)
    gen = torch.Generator().manual_seed(3)  # replay the same centre draws
    ys = torch.randint(0, 9, (16,), generator=gen)
    xs = torch.randint(0, 7, (16,), generator=gen)
    assert torch.equal(got, _loop_oracle(images, list(zip(ys.tolist(), xs.tolist())), 4))


def test_cutout_loader_repeats_an_epoch():
    data = [(torch.ones(4, 1, 8, 8), torch.zeros(4))]
    loader = CutoutLoader(data, 4, seed=1)
    loader.set_epoch(2)
    first = next(iter(loader))[0]
    loader.set_epoch(2)
    assert torch.equal(next(iter(loader))[0], first) and torch.equal(data[0][0], torch.ones(4, 1, 8, 8))


def test_cutout_loader_draws_new_holes_each_epoch_and_seed():
    data = [(torch.ones(16, 1, 8, 8), torch.zeros(16))]

    def holes(seed, epoch):
        loader = CutoutLoader(data, 4, seed=seed)
        loader.set_epoch(epoch)
        return next(iter(loader))[0] == 0

    two = holes(1, 2)
    assert bool(two.any(dim=(1, 2, 3)).all())  # every image has a hole
    assert not torch.equal(holes(1, 3), two) and not torch.equal(holes(2, 2), two)
