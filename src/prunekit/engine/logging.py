"""Metrics as JSON Lines: one JSON object per line, appended and flushed as training goes.

A JSONL file survives a crash up to its last complete line and is read by any tool. Every record
has an "event" key: "epoch" (per-epoch metrics, hooks' additions included), "step" (every
`log_every` optimizer steps), "note" (a remark such as "bf16 ignored on CPU") or "resume".
A resumed run appends to the same file, so an epoch that was logged and then lost to a crash
before its checkpoint was written appears twice; `epoch_records` keeps the last one (and keeps the
epochs of each "stage" of a run directory apart).

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "metrics.jsonl")
>>> with MetricsLog(path) as log:
...     log.write("epoch", epoch=0, val_acc=0.5)
>>> epoch_records(path)
[{'event': 'epoch', 'epoch': 0, 'val_acc': 0.5}]
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import ConfigError


class MetricsLog:
    """Append JSON records to `path`; a disabled log (or `path=None`) writes nothing.

    Only rank 0 of a distributed run is given an enabled log, so lines are never interleaved.
    """

    def __init__(self, path: str | os.PathLike[str] | None, enabled: bool = True):
        self.path = Path(path) if path is not None else None
        self._file = None
        if self.path is not None and enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> None:
        """Append one record {"event": event, **fields}; values are made JSON-safe first."""
        if self._file is None:
            return
        record = {"event": event, **to_plain(fields)}
        self._file.write(json.dumps(record) + "\n")
        # Flush every line: the file is the record of a run that may be killed at any moment.
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def to_plain(value: Any) -> Any:
    """Turn metrics into JSON-safe Python values.

    One-element tensors and numpy scalars become numbers, larger tensors/arrays become lists,
    tuples become lists, dict keys become strings. Anything else raises ConfigError, because a
    metric that cannot be written would silently vanish from the log.

    >>> to_plain({"a": torch.tensor(2.5), "b": np.int64(3), "c": (1, 2)})
    {'a': 2.5, 'b': 3, 'c': [1, 2]}
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    raise ConfigError(
        f"metric value of type {type(value).__name__} cannot be logged; "
        "use numbers, strings, bools, None, tensors, numpy values, or lists/dicts of them"
    )


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All complete records of a JSONL file, in order; a torn last line (crash) is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # only a crash mid-write produces this; the line is incomplete
    return records


def epoch_records(path: str | os.PathLike[str], stage: str | None = None) -> list[dict[str, Any]]:
    """The "epoch" records, one per epoch (the last written wins), sorted by epoch.

    A run directory's metrics.jsonl holds several trainings, each after a "stage" record naming
    it (train, finetune): their epochs are kept apart, stage by stage in the order they first
    appear, and each record returned carries its "stage". `stage` keeps one stage's records."""
    by_key: dict[tuple[str | None, int], dict[str, Any]] = {}
    current = None
    for rec in read_jsonl(path):
        if rec.get("event") == "stage":
            current = rec.get("name")
        elif rec.get("event") == "epoch" and (stage is None or current == stage):
            by_key[(current, int(rec["epoch"]))] = rec if current is None else {**rec, "stage": current}
    order = list(dict.fromkeys(name for name, _ in by_key))
    return [by_key[k] for k in sorted(by_key, key=lambda k: (order.index(k[0]), k[1]))]


def is_finite_number(value: Any) -> bool:
    """True for an int/float that is neither NaN nor infinite (used to pick a best epoch)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
