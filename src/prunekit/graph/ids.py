"""Channel-id tensors and the union-find that couples them.

Every tensor seen while tracing gets an *id tensor*: an int64 tensor with the same number of
dimensions, holding for each element the id of the channel it belongs to (-1: no channel, e.g. a
scalar constant). Id tensors are stored *compressed*: a dim along which the ids do not vary has
size 1, so a conv output (N, C, H, W) costs only C integers, shape (1, C, 1, 1).

Two special values: NO_ID (-1) couples nothing; OPAQUE (-2) stands for channels whose count is
fixed (model inputs, tensors made in forward with a hard-coded shape, outputs of ignored
modules); any id joined with OPAQUE becomes fixed. OPAQUE tensors compress to a single value, so
a fixed activation costs nothing to carry around.

Ids are allocated in *spaces* (one per producer: a conv's output filters, a parameter's channel
dim, a model input). Two ids that must be pruned together are joined in the union-find; a class
of the union-find is one prunable channel.

>>> uf = UnionFind(); a = uf.allocate(3); b = uf.allocate(3)
>>> uf.union_pairs(a, b); bool((uf.find(a) == uf.find(b)).all())
True
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

NO_ID = -1  # no channel here (a scalar, a constant that broadcasts)
OPAQUE = -2  # channels nobody may move (model inputs, outputs of fixed ops): meeting one fixes you


class UnionFind:
    """Union-find over int ids; ids are handed out in contiguous ranges by `allocate`.

    Vectorised in numpy: joins are done by hooking whole arrays of roots at once (the smaller id
    becomes the root, so names stay stable), which keeps tracing a ResNet-50 well under a second.
    A class is fixed when any of its ids was marked fixed.
    """

    def __init__(self) -> None:
        self._size = 0
        self.parent = np.empty(0, dtype=np.int64)  # capacity grows by doubling; ids < len(self) are live
        self.fixed = np.empty(0, dtype=bool)  # per id; a class is fixed if any member is
        self._class_fixed: np.ndarray | None = None

    def __len__(self) -> int:
        return self._size

    def allocate(self, n: int, fixed: bool = False) -> torch.Tensor:
        start, end = self._size, self._size + n
        if end > self.parent.size:
            cap = max(end, 2 * self.parent.size, 1024)
            self.parent = np.concatenate([self.parent[:start], np.empty(cap - start, dtype=np.int64)])
            self.fixed = np.concatenate([self.fixed[:start], np.zeros(cap - start, dtype=bool)])
        self.parent[start:end] = np.arange(start, end)
        self.fixed[start:end] = fixed
        self._size = end
        self._class_fixed = None
        return torch.arange(start, end)

    def _find_np(self, ids: np.ndarray) -> np.ndarray:
        cur = ids
        while True:
            nxt = self.parent[cur]
            if np.array_equal(nxt, cur):
                break
            cur = nxt
        self.parent[ids] = cur  # path compression
        return cur

    def find(self, ids: torch.Tensor) -> torch.Tensor:
        """Representative of each id (ids < 0 stay as they are)."""
        out = ids.numpy().copy()
        valid = out >= 0
        out[valid] = self._find_np(out[valid])
        return torch.from_numpy(out)

    def find_many(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """`find` of several id tensors in one pass (shapes kept)."""
        if not tensors:
            return []
        arrays = [t.numpy() for t in tensors]
        flat = np.concatenate([a.reshape(-1) for a in arrays])
        valid = flat >= 0
        flat[valid] = self._find_np(flat[valid])
        parts = np.split(flat, np.cumsum([a.size for a in arrays])[:-1])
        return [torch.from_numpy(part.reshape(a.shape)) for part, a in zip(parts, arrays)]

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Join a[i] with b[i] for every i where both are valid ids."""
        a, b = a.reshape(-1).numpy(), b.reshape(-1).numpy()
        hit = np.concatenate([a[(a >= 0) & (b == OPAQUE)], b[(b >= 0) & (a == OPAQUE)]])
        if hit.size:
            self.fixed[hit] = True
            self._class_fixed = None
        keep = (a >= 0) & (b >= 0) & (a != b)
        a, b = a[keep], b[keep]
        while a.size:
            ra, rb = self._find_np(a), self._find_np(b)
            differ = ra != rb
            if not differ.any():
                break
            ra, rb = ra[differ], rb[differ]
            lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
            np.minimum.at(self.parent, hi, lo)  # hook each larger root under a smaller one
            a, b = a[differ], b[differ]
        self._class_fixed = None

    def union_all(self, ids: torch.Tensor) -> None:
        """Join every valid id of `ids` into one class."""
        flat = torch.unique(ids[ids >= 0])
        if flat.numel() > 1:
            self.union_pairs(flat[:1].expand(flat.numel() - 1), flat[1:])

    def mark_fixed(self, ids: torch.Tensor) -> None:
        ids = ids[ids >= 0].numpy()
        if ids.size:
            self.fixed[ids] = True
            self._class_fixed = None

    def is_fixed(self, ids: torch.Tensor) -> torch.Tensor:
        if self._class_fixed is None:
            roots = self._find_np(np.arange(len(self)))
            flags = np.zeros(len(self), dtype=bool)
            np.logical_or.at(flags, roots, self.fixed[:len(self)])
            self._class_fixed = flags
        return torch.from_numpy(self._class_fixed[self.find(ids).numpy()])


class IdSet:
    """A fixed set of class ids, tested against whole id tensors at once through a lookup table
    (negative ids, NO_ID and OPAQUE, are never members)."""

    def __init__(self, ids: Iterable[int]):
        ids = sorted(ids)
        self.top = ids[-1] if ids else -1
        self.table = np.zeros(self.top + 2, dtype=bool)  # the last entry stays False
        self.table[ids] = True

    def contains(self, ids: torch.Tensor) -> np.ndarray:
        """Bool array of `ids`' shape: which entries are in the set."""
        a = ids.numpy()
        return self.table[np.clip(a, -1, self.top + 1)] & (a >= 0)


def compress(ids: torch.Tensor) -> torch.Tensor:
    """Shrink every dim along which `ids` does not vary to size 1."""
    a = ids.numpy()
    big = [n for n in a.shape if n > 1]
    if len(big) <= 1 and ids.is_contiguous():  # the common case: one varying dim, or none
        if not big or a.flat[0] != a.flat[-1]:
            return ids
    for d in range(a.ndim):
        if a.shape[d] > 1:
            first = a[(slice(None),) * d + (slice(0, 1),)]
            if (a == first).all():
                a = first
    return torch.from_numpy(np.ascontiguousarray(a))


def varying_dims(ids: torch.Tensor) -> list[int]:
    return [d for d in range(ids.dim()) if ids.shape[d] > 1]


def has_ids(ids: torch.Tensor | None) -> bool:
    return ids is not None and bool((ids >= 0).any())


def along(ids: torch.Tensor, dim: int, size: int, uf: UnionFind) -> torch.Tensor:
    """One id per position along `dim` (length `size`), as a consumer's weight slice sees them.

    Elements that share a position along `dim` but differ elsewhere (a class token concatenated
    to patch tokens, say) are joined: the consumer's slice `dim=j` applies to all of them, so
    pruning position j removes all of them together.
    """
    dim = dim % ids.dim()
    full = ids.expand(*ids.shape[:dim], size, *ids.shape[dim + 1:]) if ids.shape[dim] == 1 else ids
    rows = full.movedim(dim, 0).reshape(size, -1)
    if rows.shape[1] == 1:
        return rows[:, 0].clone()
    rep = rows.max(dim=1).values  # a valid id of each row, or negative where the row has none
    uf.union_pairs(rep.unsqueeze(1).expand_as(rows), rows)
    return rep.clone()
