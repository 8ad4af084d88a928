"""Batched augmentation and normalisation on whatever device the images live on.

Random crop with zero padding and horizontal flip are one gather: for sample b with crop
offset (dy, dx) from the zero-padded image, output pixel (i, j) reads padded pixel
(dy + i, dx + j), or (dy + i, dx + W - 1 - j) when b is flipped. That is exactly
torchvision's RandomCrop(padding=p) followed by RandomHorizontalFlip, done for a whole batch
without a Python loop.

>>> g = torch.Generator().manual_seed(0)
>>> x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).reshape(2, 1, 4, 4)
>>> offsets, flips = sample_crop_flip(2, pad=1, flip=True, generator=g)
>>> crop_flip(pad_images(x, 1), offsets, flips, (4, 4)).shape
torch.Size([2, 1, 4, 4])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_padding(height: int) -> int:
    """The crop padding used for images of this height: 4 for 32x32, 1 for 8x8."""
    return max(1, height // 8)


def pad_images(images: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad (N, C, H, W) to (N, C, H + 2 pad, W + 2 pad)."""
    return F.pad(images, (pad, pad, pad, pad))


def sample_crop_flip(n: int, pad: int, flip: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw crop offsets (n, 2) int64 in [0, 2 pad] as (dy, dx), and flips (n,) bool."""
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    if flip:
        flips = torch.rand(n, generator=generator) < 0.5
    else:
        flips = torch.zeros(n, dtype=torch.bool)
    return offsets, flips


def crop_flip(padded: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop each padded image (B, C, Hp, Wp) at its offset to (B, C, H, W), mirrored where flipped."""
    b, c, hp, wp = padded.shape
    h, w = size
    device = padded.device
    offsets, flips = offsets.to(device), flips.to(device)
    rows = offsets[:, 0, None] + torch.arange(h, device=device)  # (B, H)
    cols = torch.arange(w, device=device).expand(b, w)
    cols = torch.where(flips[:, None], w - 1 - cols, cols) + offsets[:, 1, None]  # (B, W)
    flat_index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w)  # (B, 1, H*W)
    out = padded.reshape(b, c, hp * wp).gather(2, flat_index.expand(b, c, h * w))
    return out.reshape(b, c, h, w)


def normalizer(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str):
    """Return f(uint8 (B, C, H, W)) -> float32 ((x / 255) - mean) / std, computed on `device`."""
    shift = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
    scale = 1.0 / (torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0)

    def normalize(images: torch.Tensor) -> torch.Tensor:
        return (images.to(torch.float32) - shift) * scale

    return normalize


def cutout_(images: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one length x length square per image of (B, C, H, W), in place (DeVries & Taylor 2017).

    As in the DARTS evaluation code: the centre (cy, cx) is uniform over the image and the square
    rows cy - length // 2 .. cy + length // 2 - 1 (likewise columns) are clipped to the image.
    Applied after normalisation, so the square holds the dataset mean.

    >>> x = torch.ones(2, 1, 8, 8)
    >>> int((cutout_(x, 4, torch.Generator().manual_seed(0)) == 0).sum()) <= 2 * 16
    True
    """
    b, _, h, w = images.shape
    centre = torch.stack([torch.randint(0, h, (b,), generator=generator),
                          torch.randint(0, w, (b,), generator=generator)], 1).to(images.device)  # (B, 2)
    rows = torch.arange(h, device=images.device)[None, :]  # (1, H)
    cols = torch.arange(w, device=images.device)[None, :]
    half = length // 2
    in_rows = (rows >= centre[:, :1] - half) & (rows < centre[:, :1] + half)  # (B, H)
    in_cols = (cols >= centre[:, 1:] - half) & (cols < centre[:, 1:] + half)  # (B, W)
    hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (B, 1, H, W)
    return images.masked_fill_(hole, 0.0)


class CutoutLoader:
    """Wraps a loader of (x, y) batches and applies `cutout_` to every x; draws are seeded by
    (seed, epoch), so an epoch repeats exactly.

    >>> data = [(torch.ones(2, 1, 8, 8), torch.zeros(2))]
    >>> x, _ = next(iter(CutoutLoader(data, 4, seed=0)))
    >>> bool((x == 0).any())
    True
    """

    def __init__(self, loader, length: int, seed: int = 0):
        self.loader, self.length, self.seed, self._epoch = loader, length, seed, 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)
        if callable(getattr(self.loader, "set_epoch", None)):
            self.loader.set_epoch(epoch)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._epoch)
        self._epoch += 1
        for x, y in self.loader:
            yield cutout_(x.clone(), self.length, gen), y
