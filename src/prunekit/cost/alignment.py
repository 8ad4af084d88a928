"""Which channel multiple the device rewards: measured, for `round_to="auto"`.

A layer's time is not proportional to its width everywhere. On this project's CPU (oneDNN,
1 thread, batch 1) a 3x3 conv at 28x28 takes 1.5 ms at 120, 123, 125, 127 or 128 channels but
9.8 ms at 124 and 5.9 ms at 126 (docs/latency.md); GPUs slow down off multiples of 8 in bf16.
So the model's most expensive conv (or Linear, for a transformer) is timed at every width in
[w - span, w] around a multiple of 16 near half its width (where pruned widths land), and the
smallest multiple m whose widths all stay within `slack` of the best time per unit of work (w * w
multiply-accumulates per position for a w -> w layer, w for a depthwise conv) wins. A
model with depthwise convs has its costliest one timed too, and the larger multiple is kept: on
this CPU (AVX-512, float32, 28x28, batch 16) a depthwise 3x3 conv takes twice the time per
channel at 72 or 104 channels as at 64, 80 or 96, which the costliest 1x1 conv of mobilenet_v2
does not show.

>>> import torch.nn as nn
>>> from prunekit.cost.latency import LatencyConfig
>>> from prunekit.cost.lut import LayerSpec
>>> rec = measure_alignment(LayerSpec.from_module(nn.Conv2d(32, 32, 3, padding=1), (8, 8)),
...                         LatencyConfig(warmup=1, repeats=3, threads=1), span=8)
>>> rec["multiple"] in (1, 2, 4, 8, 16) and len(rec["widths"]) == 9
True
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .latency import LatencyConfig, compare_latency
from .lut import LayerSpec

MULTIPLES = (1, 2, 4, 8, 16)
MIN_INPUT_WIDTH = 8  # layers with fewer input channels (a stem on the image) are not timed


def measure_alignment(spec: LayerSpec, cfg: LatencyConfig, span: int = 16, slack: float = 0.1) -> dict[str, Any]:
    """Time `spec`'s layer with both widths = w for w in [top - span, top] and pick the multiple.

    top = a multiple of 16 near half the layer's width (at least 16). Returns {"multiple",
    "widths", "ms", "per_channel_ratio" (time per unit of work, w * w for a dense layer and w for a
    depthwise conv, over the best), "spec", "settings", and "fallback" when no multiple stays
    within `slack`}.
    """
    top = max(16, (max(spec.in_channels, spec.out_channels) // 2 + 8) // 16 * 16)
    widths = list(range(max(1, top - span), top + 1))
    ms = {}
    # one interleaved run per width (inputs differ in channels); two rounds, keep the faster
    for _ in range(2):
        for w in widths:
            layer = spec.make_layer(w, w)
            t = compare_latency({str(w): layer}, spec.input_shape(w), cfg).results[str(w)].median_ms
            ms[w] = min(ms.get(w, float("inf")), t)
    # time per unit of work: a w -> w conv or Linear does w * w multiply-accumulates per position,
    # a depthwise conv w (time per channel alone would favour the narrowest width). Narrow widths
    # that run less efficiently for reasons other than alignment fail every multiple: then no
    # multiple passes, 16 is used, and the record says so
    per = {w: ms[w] / (w if spec.depthwise else w * w) for w in widths}
    best = min(per.values())
    ratio = {w: per[w] / best for w in widths}
    fits = [m for m in MULTIPLES if all(ratio[w] <= 1 + slack for w in widths if w % m == 0)]
    record = {"multiple": fits[0] if fits else MULTIPLES[-1], "widths": widths, "ms": [ms[w] for w in widths],
              "per_channel_ratio": [ratio[w] for w in widths], "spec": spec.to_dict(), "slack": slack,
              "settings": cfg.to_dict()}
    if not fits:
        record["fallback"] = (f"every multiple has a width more than {slack:.0%} above the best time per unit of "
                              f"work; {MULTIPLES[-1]} is used")
    return record


def costliest_layer(model: nn.Module, example_inputs: Any, depthwise: bool = False) -> LayerSpec | None:
    """Spec of the Conv2d (groups=1) or Linear with the most MACs on `example_inputs` (counted by
    `count_cost`, so a strided conv counts its output positions), among those with at least
    MIN_INPUT_WIDTH inputs; with `depthwise`, of the depthwise Conv2d (groups == in_channels ==
    out_channels) instead."""
    from .latency_model import _input_grids  # input sizes per module, from one forward
    from .macs import count_cost
    grids = _input_grids(model, example_inputs)
    counted = count_cost(model, example_inputs).per_module
    best, best_macs = None, -1
    for name, mod in model.named_modules():
        if name not in grids or not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        if (mod.in_channels if isinstance(mod, nn.Conv2d) else mod.in_features) < MIN_INPUT_WIDTH:
            continue  # reads the image (RGB, grey): timed at w -> w it would be a layer the model never has
        is_dw = isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
        if depthwise != is_dw or (isinstance(mod, nn.Conv2d) and mod.groups != 1 and not is_dw):
            continue
        h, w = grids[name]
        macs = counted.get(name, {}).get("macs", 0)
        if macs > best_macs:
            try:
                best, best_macs = LayerSpec.from_module(mod, (h, w)), macs
            except Exception:  # string padding and the like: not tabled
                continue
    return best


def pick_round_to(model: nn.Module, example_inputs: Any, cfg: LatencyConfig) -> dict[str, Any]:
    """The measured multiple for `model` on `cfg`'s device ({"multiple": 1} without a tabled
    layer): the larger of its costliest dense layer's and its costliest depthwise conv's."""
    spec = costliest_layer(model, example_inputs)
    if spec is None:
        return {"multiple": 1, "reason": f"no Conv2d (groups=1) or Linear with at least {MIN_INPUT_WIDTH} input "
                                         "channels ran on the example inputs"}
    with torch.no_grad():
        rec = measure_alignment(spec, cfg)
        dw = costliest_layer(model, example_inputs, depthwise=True)
        if dw is not None:
            rec["depthwise"] = measure_alignment(dw, cfg)
            rec["multiple"] = max(rec["multiple"], rec["depthwise"]["multiple"])
            if rec["depthwise"].get("fallback") and rec["multiple"] == rec["depthwise"]["multiple"]:
                rec.setdefault("fallback", "depthwise: " + rec["depthwise"]["fallback"])
    return rec
