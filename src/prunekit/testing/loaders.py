"""Loaders for testing interrupted runs: a crash in the middle of a chosen epoch.

>>> loader = InterruptingLoader([1, 2, 3], crash_at=2)
>>> list(loader), loader.passes
([1, 2, 3], 1)
>>> try:
...     list(loader)
... except Interrupted:
...     print("stopped in pass", loader.passes)
stopped in pass 2
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence


class Interrupted(Exception):
    """What `InterruptingLoader` raises: stands for a kill in the middle of an epoch."""


class InterruptingLoader:
    """A train loader over `batches` that raises `Interrupted` in its `crash_at`-th pass (1-based)
    after one batch; `passes` counts the passes made over it (one per epoch of every phase)."""

    def __init__(self, batches: Sequence[Any], crash_at: int | None = None):
        self.batches, self.crash_at, self.passes = batches, crash_at, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        self.passes += 1
        for i, batch in enumerate(self.batches):
            if self.passes == self.crash_at and i == 1:
                raise Interrupted
            yield batch
