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
            if not (nxt != cur).any():
                break
            cur = nxt
        self.parent[ids] = cur  # path compression
        return cur

    def roots(self) -> np.ndarray:
        """The root of every id, as one array indexed by id."""
        return self._find_np(np.arange(self._size))

    def find(self, ids: torch.Tensor) -> torch.Tensor:
        """Representative of each id (ids < 0 stay as they are)."""
        out = ids.numpy().copy()
        valid = out >= 0
        out[valid] = self._find_np(out[valid])
        return torch.from_numpy(out)

    def union_pairs(self, a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> None:
        """Join a[i] with b[i] for every i where both are valid ids (arrays of equal size)."""
        a, b = _flat(a), _flat(b)
        if not a.size:
            return
        if min(a.min(), b.min()) < 0:  # NO_ID couples nothing; OPAQUE fixes what it meets
            hit = np.concatenate([a[(a >= 0) & (b == OPAQUE)], b[(b >= 0) & (a == OPAQUE)]])
            if hit.size:
                self.fixed[hit] = True
                self._class_fixed = None
            keep = (a >= 0) & (b >= 0) & (a != b)
        else:
            keep = a != b
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
        flat = _flat(ids)
        flat = np.unique(flat[flat >= 0])
        if flat.size > 1:
            self.union_pairs(np.broadcast_to(flat[:1], (flat.size - 1,)), flat[1:])

    def mark_fixed(self, ids: torch.Tensor | np.ndarray) -> None:
        flat = _flat(ids)
        flat = flat[flat >= 0]
        if flat.size:
            self.fixed[flat] = True
            self._class_fixed = None

    def is_fixed(self, ids: torch.Tensor) -> torch.Tensor:
        if self._class_fixed is None:
            roots = self.roots()
            flags = np.zeros(len(self), dtype=bool)
            np.logical_or.at(flags, roots, self.fixed[:len(self)])
            self._class_fixed = flags
        return torch.from_numpy(self._class_fixed[self.find(ids).numpy()])


def _array(ids: torch.Tensor | np.ndarray) -> np.ndarray:
    """`ids` as a numpy array (sharing memory with a tensor)."""
    return ids if isinstance(ids, np.ndarray) else ids.numpy()


def _flat(ids: torch.Tensor | np.ndarray) -> np.ndarray:
    return _array(ids).reshape(-1)


class IdSet:
    """A fixed set of class ids, tested against whole id tensors at once through a lookup table
    (negative ids, NO_ID and OPAQUE, are never members)."""

    def __init__(self, ids: Iterable[int]):
        ids = sorted(ids)
        self.top = ids[-1] if ids else -1
        self.table = np.zeros(self.top + 2, dtype=bool)  # the last entry stays False
        self.table[ids] = True

    def contains(self, ids: torch.Tensor | np.ndarray) -> np.ndarray:
        """Bool array of `ids`' shape: which entries are in the set."""
        a = _array(ids)
        return self.table[np.clip(a, -1, self.top + 1)] & (a >= 0)


def compress(ids: torch.Tensor) -> torch.Tensor:
    """Shrink every dim along which `ids` does not vary to size 1."""
    a = ids.numpy()
    if a.size == 0:  # 0 channels (a cut branch): nothing varies, nothing to shrink
        return ids
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
    a = ids.numpy()
    dim = dim % a.ndim
    if a.size == size and a.shape[dim] == size:  # the common case: ids vary along `dim` only
        return torch.from_numpy(a.reshape(size).copy())
    if a.shape[dim] == 1:
        a = np.broadcast_to(a, a.shape[:dim] + (size,) + a.shape[dim + 1:])
    rows = np.moveaxis(a, dim, 0).reshape(size, -1)
    if rows.shape[1] == 0:  # 0 channels elsewhere (a cut branch): no position carries an id
        return torch.from_numpy(np.full(size, NO_ID, dtype=a.dtype))
    if rows.shape[1] == 1:
        return torch.from_numpy(rows[:, 0].copy())
    rep = rows.max(axis=1)  # a valid id of each row, or negative where the row has none
    uf.union_pairs(np.broadcast_to(rep[:, None], rows.shape), rows)
    return torch.from_numpy(rep)
