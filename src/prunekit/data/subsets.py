"""Fixed subsets of a loader for cheap evaluation (smoke runs, per-epoch checks).

`FirstBatches` takes the first n batches of every pass: cheap, but biased when the split is
stored in class order (CIFAR's test split in the image-folder layout is). `random_batches` draws
a seeded random subset once and replays it: unbiased, at the price of reading the whole split
once into memory, so use it for splits that fit there.

>>> import torch
>>> batches = [(torch.full((4, 1), float(c)), torch.full((4,), c)) for c in range(5)]  # class-sorted
>>> [int(y[0]) for _, y in FirstBatches(batches, 2)]
[0, 1]
>>> sub = random_batches(batches, 2, seed=0)
>>> len(sub), sub.num_samples, sorted({int(v) for _, y in sub for v in y}) != [0, 1]
(2, 8, True)
"""
from __future__ import annotations

from typing import Any, Iterator

import torch


def _num_samples(loader: Any) -> int:
    known = getattr(loader, "num_samples", None)
    return int(known) if known is not None else sum(len(y) for _, y in loader)


class FirstBatches:
    """The first `n` batches of `loader` on every pass (all of them when n is None)."""

    def __init__(self, loader: Any, n: int | None):
        self.loader, self.n = loader, n
        size = getattr(loader, "batch_size", None)
        total = _num_samples(loader)
        self.num_samples = total if n is None or size is None else min(total, n * size)

    def __len__(self) -> int:
        return len(self.loader) if self.n is None else min(self.n, len(self.loader))

    def set_epoch(self, epoch: int) -> None:
        if callable(getattr(self.loader, "set_epoch", None)):
            self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.loader):
            if self.n is not None and i >= self.n:
                break
            yield batch


class FixedBatches:
    """A list of (inputs, labels) batches replayed on every pass, with the loader attributes
    evaluation reads (`num_samples`, `batch_size`)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.batches = batches
        self.batch_size = len(batches[0][1]) if batches else 0
        self.num_samples = sum(len(y) for _, y in batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.batches)


def random_batches(loader: Any, n_batches: int | None, seed: int = 0) -> Any:
    """A seeded random subset of `n_batches` batches' worth of samples of `loader`, the same on
    every pass (the loader itself when n_batches is None or covers it)."""
    if n_batches is None or n_batches >= len(loader):
        return loader
    xs, ys = zip(*[(x, y) for x, y in loader])
    x, y = torch.cat(xs), torch.cat(ys)
    size = xs[0].shape[0]
    pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[: n_batches * size].to(y.device)
    return FixedBatches([(x[pick[i:i + size]], y[pick[i:i + size]]) for i in range(0, len(pick), size)])
