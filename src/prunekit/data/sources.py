"""What a dataset loader hands to `load_data`, and the seeded splits made from it.

A loader returns either `ImageArrays` (everything decoded, uint8, in memory) or `ImageFiles`
(paths decoded batch by batch, for folders too large to hold). Either way `load_data` then
carves validation out of train with `carve` and builds the loaders.

>>> keep, held = carve(10, 0.2, seed=0)
>>> len(keep), len(held), sorted(set(keep) | set(held)) == list(range(10))
(8, 2, True)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The train/test split of a dataset that ships without one is made with this fixed seed, not
# with DataConfig.seed: runs with different seeds must be scored on the same test images.
TEST_SPLIT_SEED = 0
# Stream ids keep the random draws of different purposes independent for the same seed.
STREAM_VAL = 1
STREAM_TEST = 2


@dataclass
class ImageArrays:
    """A whole dataset in memory: images uint8 (N, C, H, W), labels int64 (N,)."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.train_x.shape[1:])  # type: ignore[return-value]


@dataclass
class ImageFiles:
    """Image files decoded on the fly: paths, labels int64, and the decoded (C, H, W) shape."""

    train_files: list[str]
    train_y: np.ndarray
    test_files: list[str]
    test_y: np.ndarray
    class_names: list[str]
    image_shape: tuple[int, int, int]
    resize: bool  # decode with a resize to image_shape[1:] (otherwise sizes must already match)


def seeded_rng(seed: int, stream: int, *more: int) -> np.random.Generator:
    """A numpy generator for (seed, stream, *more), independent of every other tuple."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, *more]))


def carve(n: int, fraction: float, seed: int, stream: int = STREAM_VAL) -> tuple[np.ndarray, np.ndarray]:
    """Split range(n) by a seeded permutation into (kept, held_out) with round(n * fraction) held.

    Both parts keep the permuted order, so "the first N kept items" is a random subset rather
    than, say, the first classes of a class-sorted folder.
    """
    order = seeded_rng(seed, stream).permutation(n)
    held = int(round(n * fraction))
    return order[held:], order[:held]


def stratified_carve(labels: np.ndarray, fraction: float, seed: int, stream: int = STREAM_TEST) -> tuple[np.ndarray, np.ndarray]:
    """Like `carve`, but holds out round(fraction * count) items of every class separately."""
    rng = seeded_rng(seed, stream)
    kept, held = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        k = int(round(len(members) * fraction))
        held.append(members[:k])
        kept.append(members[k:])
    return rng.permutation(np.concatenate(kept)), rng.permutation(np.concatenate(held))


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 images (N, C, H, W), on the 0..1 scale.

    Counting the 256 possible values per channel (a histogram) keeps the sums exact and the
    memory flat, where a float64 copy of CIFAR's train split would take 1.1 GB.
    """
    means, stds = [], []
    values = np.arange(256, dtype=np.float64) / 255.0
    for c in range(images.shape[1]):
        hist = np.bincount(images[:, c].ravel(), minlength=256).astype(np.float64)
        total = hist.sum()
        mean = float((hist * values).sum() / total)
        var = float((hist * (values - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(max(var, 1e-12) ** 0.5)
    return tuple(means), tuple(stds)
