"""A loader for datasets that fit in memory: the whole uint8 set lives on the target device.

Each batch is an index into that tensor, the augmentation (crop + flip) runs batched on the
device, then normalisation; no worker processes and no per-image Python. On a GPU an epoch of
CIFAR-10 costs a few milliseconds of loading instead of seconds of DataLoader work.

Determinism: every epoch's shuffle and augmentation draws come from a CPU generator seeded by
(seed, stream, epoch), so the same (seed, epoch) gives the same batches on any device.
`set_epoch(e)` picks the epoch; without it, each new iteration advances by one, which is the
same as calling set_epoch(0), set_epoch(1), ... before each pass.

>>> images = torch.zeros(10, 1, 8, 8, dtype=torch.uint8); labels = torch.arange(10)
>>> loader = DeviceLoader(images, labels, batch_size=4, mean=(0.5,), std=(0.25,), seed=0)
>>> len(loader), [tuple(x.shape) for x, _ in loader][-1]
(3, (2, 1, 8, 8))
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .augment import crop_flip, normalizer, pad_images, sample_crop_flip


class EpochState:
    """Batch count, epoch counter and per-epoch random draws shared by both loader kinds."""

    def __init__(self, num_samples: int, batch_size: int, shuffle: bool, drop_last: bool,
                 crop_pad: int, flip: bool, image_shape: tuple[int, int, int], seed: int, stream: int):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.pad = crop_pad
        self.flip = flip
        self.augment = crop_pad > 0 or flip
        self.image_shape = image_shape
        self.seed = seed
        self.stream = stream
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use the shuffle and augmentation draws of `epoch`."""
        self._epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def _next_epoch_draws(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(order (N,), crop offsets (N, 2) or None, flips (N,) or None) for the current epoch.

        Draws are per position in the epoch's order, so batch k always gets rows
        k*B .. k*B+B-1 of the offsets whichever samples the shuffle put there.
        """
        epoch = self._epoch
        self._epoch += 1
        state = np.random.SeedSequence([self.seed, self.stream, epoch]).generate_state(1, dtype=np.uint64)
        gen = torch.Generator().manual_seed(int(state[0]))
        n = self.num_samples
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        if not self.augment:
            return order, None, None
        offsets, flips = sample_crop_flip(n, self.pad, self.flip, gen)
        return order, offsets, flips

    def _batches(self) -> Iterator[slice]:
        for k in range(len(self)):
            yield slice(k * self.batch_size, min((k + 1) * self.batch_size, self.num_samples))


class DeviceLoader(EpochState):
    """Batches (x float32 (B, C, H, W) normalised, y int64 (B,)) from in-memory uint8 images.

    `images` is uint8 (N, C, H, W) and `labels` int64 (N,); both are moved to `device` once.
    `crop_pad` > 0 turns on random crops with that much zero padding (a padded copy is kept,
    so cropping is one gather per batch); `flip` turns on random horizontal flips.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...], seed: int, *, shuffle: bool = False,
                 drop_last: bool = False, crop_pad: int = 0, flip: bool = False,
                 device: str | torch.device = "cpu", stream: int = 0):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        shape = tuple(int(s) for s in images.shape[1:])
        super().__init__(len(labels), batch_size, shuffle, drop_last, crop_pad, flip, shape, seed, stream)
        self.device = torch.device(device)
        images = images.to(self.device)
        # (N, C, H+2p, W+2p): padding once here beats padding every batch.
        self.images = pad_images(images, self.pad) if self.augment else images
        self.labels = labels.to(self.device, torch.int64)
        self.normalize = normalizer(mean, std, self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, offsets, flips = self._next_epoch_draws()
        order = order.to(self.device)
        if offsets is not None:  # one copy per epoch rather than two small ones per batch
            offsets, flips = offsets.to(self.device), flips.to(self.device)
        for part in self._batches():
            index = order[part]
            x = self.images[index]
            if offsets is not None:
                x = crop_flip(x, offsets[part], flips[part], self.image_shape[1:])
            yield self.normalize(x), self.labels[index]
