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
