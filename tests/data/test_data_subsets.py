"""Fixed evaluation subsets: the first batches, and a seeded random subset of a class-sorted split."""
from __future__ import annotations

import torch

from prunekit.data.subsets import FirstBatches, FixedBatches, random_batches


def _class_sorted(classes: int = 10, per_batch: int = 4):
    # image value == label, so a sample's image and label can be checked to stay together
    return [(torch.full((per_batch, 1), float(c)), torch.full((per_batch,), c)) for c in range(classes)]


def test_random_batches_is_a_seeded_unbiased_subset():
    loader = _class_sorted()
    sub = random_batches(loader, 3, seed=0)
    labels = torch.cat([y for _, y in sub])
    assert isinstance(sub, FixedBatches) and len(sub) == 3 and sub.num_samples == 12 and sub.batch_size == 4
    assert labels.unique().numel() > 3  # the first 3 batches hold exactly 3 classes
    assert all(torch.equal(a[1], b[1]) for a, b in zip(sub, random_batches(loader, 3, seed=0)))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(sub, random_batches(loader, 3, seed=1)))
    assert all(torch.equal(x[:, 0], y.float()) for x, y in sub)  # images stay with their labels
    assert [len(list(sub)), len(list(sub))] == [3, 3]  # replayed on every pass
    assert random_batches(loader, None) is loader and random_batches(loader, 10) is loader


def test_first_batches_counts_and_passes_set_epoch_on():
    class Loader(list):
        batch_size, num_samples, epochs = 4, 40, []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    loader = Loader(_class_sorted())
    first = FirstBatches(loader, 2)
    assert [int(y[0]) for _, y in first] == [0, 1] and len(first) == 2 and first.num_samples == 8
    first.set_epoch(3)
    assert loader.epochs == [3]
    everything = FirstBatches(loader, None)
    assert len(everything) == 10 and everything.num_samples == 40 and len(list(everything)) == 10
