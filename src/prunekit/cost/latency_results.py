"""What a latency measurement gives back: per-model statistics over the timed repeats
(`LatencyResult`), an interleaved comparison of several models (`LatencyComparison`), and the
paired sign test that says whether an interleaved difference is a change (`paired_change`).
`cost.latency` takes the measurements and re-exports these names.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.errors import ConfigError


@dataclasses.dataclass
class LatencyResult:
    """Latency statistics over `n` timed repeats of one forward pass, in milliseconds.

    device is "cpu" or "cuda"; device_name the CPU model or GPU name; settings the config and
    measurement details (resolved device, threads, input shapes, whether a converted copy was
    timed); times_ms every repeat in the order measured.
    """

    median_ms: float
    mean_ms: float
    std_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    max_ms: float
    n: int
    device: str
    device_name: str
    dtype: str
    batch: int
    torch_version: str
    settings: dict[str, Any]
    times_ms: list[float] = dataclasses.field(default_factory=list)

    @classmethod
    def from_times(cls, times_ms: Sequence[float], **meta: Any) -> "LatencyResult":
        """Summarise raw per-repeat times; `meta` fills the descriptive fields."""
        t = np.asarray(times_ms, dtype=np.float64)
        p10, p90 = np.percentile(t, [10, 90])
        return cls(
            median_ms=float(np.median(t)), mean_ms=float(t.mean()),
            std_ms=float(t.std(ddof=1)) if t.size > 1 else 0.0,
            p10_ms=float(p10), p90_ms=float(p90), min_ms=float(t.min()), max_ms=float(t.max()),
            n=int(t.size), times_ms=[float(x) for x in t], **meta,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LatencyResult":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(data) - {"times_ms"})  # raw times are optional in saved results
        if missing:
            raise ConfigError(f"latency result lacks field(s) {', '.join(missing)}; "
                              "pass a dict made by LatencyResult.to_dict()")
        return cls(**{k: data[k] for k in names if k in data})


@dataclasses.dataclass
class LatencyComparison:
    """Results of an interleaved measurement; ratios are median / median of `reference`."""

    results: dict[str, LatencyResult]
    ratios: dict[str, float]
    reference: str

    @property
    def speedups(self) -> dict[str, float]:
        """How many times faster than the reference each model is (inverse of `ratios`)."""
        return {k: (1.0 / r if r > 0 else float("inf")) for k, r in self.ratios.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "ratios": dict(self.ratios),
                "results": {k: r.to_dict() for k, r in self.results.items()}}


def paired_change(before_ms: Sequence[float], after_ms: Sequence[float]) -> dict[str, Any]:
    """Whether an interleaved measurement shows a change: round i timed both models back to back,
    so each round is one paired comparison. {"faster_rounds": rounds where `after` was faster,
    "rounds": rounds that differ, "p_value": two-sided sign test, "measured": p_value < 0.05, or
    None under 6 rounds, too few for the test to tell}.
    Load that comes and goes hits both models of a round alike, so a difference of medians that
    only the noise made has about half the rounds faster, and is not `measured`.

    >>> paired_change([2.0] * 20, [1.0] * 20)["measured"], paired_change([1, 2] * 10, [2, 1] * 10)["measured"]
    (True, False)
    """
    diffs = [b - a for b, a in zip(before_ms, after_ms) if b != a]
    n, k = len(diffs), sum(d > 0 for d in diffs)
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n if n else 1.0
    p = min(1.0, 2 * tail)
    # under 6 rounds even a change in every round has p >= 0.0625: the test cannot tell (None)
    return {"faster_rounds": k, "rounds": n, "p_value": p, "measured": p < 0.05 if n >= 6 else None}
