"""Channels chosen to meet a measured-latency target, allocated by importance per ms saved.

1. A `LatencyModel` (cost/latency_model.py) estimates the model's latency after any removal
   from per-layer tables timed on the target device, batch, dtype and memory format.
2. Greedy allocation (importance/rounding.py, started from the whole model): each group steps
   by `round_to` channels, or by 1/16 of its width when round_to is not set; the next step is
   always taken from the group that loses the least normalised importance per ms saved, until
   the estimate meets the goal. Groups are not thinned uniformly: a layer that is slow for its
   importance gives up more channels.
3. The pruned model is *measured* against the original, interleaved. A measurement that
   disagrees with the estimate by more than 2 x `tolerance` is taken twice more and the median of
   the three kept: one burst of load on a shared machine once read 0.24 for an estimate of 0.68,
   and the correction that followed kept an almost unpruned model. A removal of nothing is not
   timed (the model against itself reads only noise): its fraction is 1.0. When the measured fraction
   misses the target by more than `tolerance` (the tables do not see everything), the goal handed
   to step 2 is scaled by target / measured, by at most x0.8 or x1.25 per attempt, and the
   allocation is repeated, at most `attempts` times; the attempt closest to the target is kept
   and every attempt is reported (with all its measurements).

>>> import torch, torch.nn as nn
>>> from prunekit.graph import build_graph
>>> from prunekit.cost.latency import LatencyConfig
>>> m = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Conv2d(64, 4, 1))
>>> x = torch.randn(1, 3, 24, 24)
>>> g = build_graph(m, x)
>>> scores = {grp.name: torch.rand(grp.size) for grp in g.prunable_groups()}
>>> removal, report = latency_removal(m, g, scores, 0.5, LatencyConfig(warmup=1, repeats=5, threads=1), x, tolerance=1.0)
>>> sorted(report)[:3]
['attempts', 'estimate', 'measured_fraction']
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..core.errors import ConfigError
from ..cost.latency import LatencyConfig, compare_latency
from ..cost.latency_model import LatencyModel, per_sample_inputs
from ..graph import Graph
from ..surgery.copying import share_copy
from ..surgery.shrink import remove_channels_
from .rounding import round_to_target
from .select import group_multiple, smaller_multiple


def latency_removal(model: nn.Module, graph: Graph, scores: Mapping[str, torch.Tensor], fraction: float,
                    lcfg: LatencyConfig, example_inputs: Any, tolerance: float = 0.05, round_to: int | None = None,
                    max_ratio: float = 0.9, normalizer: str = "mean", attempts: int = 3,
                    estimate: LatencyModel | None = None, halve: bool = True
                    ) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """Removal whose measured latency is `fraction` of the model's, and a report of how it was found.
    `halve`: a multiple too coarse to move nearer the target is halved (False: round_slack=None,
    which keeps the multiple asked for)."""
    est = estimate or LatencyModel(model, graph, example_inputs, lcfg)
    if scores and not est.tabled_groups.intersection(scores):
        raise ConfigError("latency_fraction cannot be aimed at: no prunable channel group reaches a layer the "
                          "latency tables cover (Conv2d with groups=1 or depthwise, Linear, BatchNorm2d, "
                          "one-dimensional LayerNorm, batch_first nn.MultiheadAttention); use macs_fraction or "
                          "params_fraction; the model was left unchanged")
    def allocate(goal: float, multiple: int | None):
        steps = {n: group_multiple(graph.group(n).size, multiple) if multiple else max(1, graph.group(n).size // 16)
                 for n in scores}
        return round_to_target(graph, scores, {}, steps, est, goal * est.measured_ms, max_ratio, normalizer,
                               refresh_every=max(1, len(scores)), best_effort=True)

    goal, tried, multiple = fraction, [], round_to
    for _ in range(attempts):
        res = allocate(goal, multiple)
        # a goal the estimate cannot reach at this multiple, or a new goal that moves no channel:
        # the multiple is too coarse to get nearer; lower it (16, 8, 4, 2), as the params/MACs
        # targets do, rather than time the same model again
        while halve and multiple and multiple > 2:
            if tried and any(t["removal"] == res.removal for t in tried):
                multiple = smaller_multiple(multiple)
                res = allocate(goal, multiple)
            elif res.cost > goal * est.measured_ms:  # kept only where the finer multiple gets nearer
                finer = allocate(goal, smaller_multiple(multiple))
                if finer.cost >= res.cost:
                    break  # max_ratio, not the multiple, is what stops it
                multiple, res = smaller_multiple(multiple), finer
            else:
                break
        estimated = res.cost / est.measured_ms
        readings = _readings(model, graph, res.removal, estimated, lcfg, example_inputs, tolerance)
        measured = sorted(readings)[len(readings) // 2] if readings else 1.0  # nothing removed: the model itself
        tried.append({"goal": goal, "estimated_fraction": estimated, "measured_fraction": measured,
                      "readings": readings, "round_to": multiple, "reachable": res.cost <= goal * est.measured_ms,
                      "removal": res.removal})
        if abs(measured - fraction) <= tolerance or (not tried[-1]["reachable"] and measured > fraction):
            break  # met, or every group is at max_ratio already
        goal = min(0.999, goal * min(1.25, max(0.8, fraction / measured)))
    best = min(tried, key=lambda t: abs(t["measured_fraction"] - fraction))
    report = {"target": fraction, "tolerance": tolerance, "measured_fraction": best["measured_fraction"],
              "estimate": est.describe(), "settings": lcfg.to_dict(),
              "round_to": best["round_to"],
              "attempts": [{k: v for k, v in t.items() if k != "removal"} for t in tried]}
    if best["round_to"] != round_to:
        report["round_to_note"] = (f"round_to={round_to} could not get nearer the latency target; widths are "
                                   f"multiples of {best['round_to']}")
    if abs(best["measured_fraction"] - fraction) > tolerance:
        if best["measured_fraction"] > fraction and not best["reachable"] and (best["round_to"] or 1) > 2 and not halve:
            # (with round_slack set, a multiple is lowered while that gets nearer: then max_ratio is what stops it)
            why = (f"the estimate cannot reach it with widths in multiples of {best['round_to']}, as "
                   "round_slack=None keeps them (a narrow group keeps at least one multiple): set round_slack "
                   "or a smaller round_to")
        elif best["measured_fraction"] > fraction and not best["reachable"]:
            why = (f"the estimate cannot reach it with every group at max_ratio={max_ratio}"
                   + (" (raise max_ratio)" if max_ratio < 0.999 else ""))
        elif len({str(t["removal"]) for t in tried}) < len(tried) and (best["round_to"] or 1) > 1:
            why = (f"the kept widths move in steps of round_to={best['round_to']}, too coarse for this target "
                   "(a smaller round_to lands nearer)")
        else:
            why = ("timing on a loaded machine is noisy (raise latency.repeats or latency_tolerance), or at small "
                   "batches the time outside the pruned layers (Python per-module overhead, activations) sets a "
                   "floor that channel removal cannot pass")
        report["note"] = (f"latency target {fraction} missed: measured {best['measured_fraction']:.3f} after "
                          f"{len(tried)} attempt(s) (tolerance {tolerance}): {why}")
    return best["removal"], report


def _readings(model: nn.Module, graph: Graph, removal: Mapping[str, list[int]], estimated: float, lcfg: LatencyConfig,
              example_inputs: Any, tolerance: float) -> list[float]:
    """Measured fractions of `model` after `removal`: one, or three when the first is more than
    2 x `tolerance` from the estimate (an outlier, or a real gap); none when nothing is removed
    (the model timed against itself reads only noise)."""
    if not any(len(v) for v in removal.values()):
        return []
    trial = share_copy(model)  # new module objects sharing tensors: removal leaves `model` intact
    remove_channels_(trial, graph, removal)
    readings = [_measured_fraction(model, trial, lcfg, example_inputs)]
    if abs(readings[0] - estimated) > 2 * tolerance:
        readings += [_measured_fraction(model, trial, lcfg, example_inputs) for _ in range(2)]
    return readings


def _measured_fraction(model: nn.Module, trial: nn.Module, lcfg: LatencyConfig, example_inputs: Any) -> float:
    """Median latency of the pruned `trial` over the original `model`'s, timed interleaved."""
    cmp = compare_latency({"full": model, "pruned": trial}, per_sample_inputs(example_inputs, lcfg.batch_size), lcfg)
    return cmp.ratios["pruned"]
