"""Save and load pruned models as safetensors weights with the plan in the file's metadata.

Loading rebuilds the architecture from the user's own constructor, replays the plan, then loads
the weights: no pickle is involved, so an untrusted file cannot execute code. A file that is
missing, corrupt, or made for another architecture raises CheckpointError and leaves the model
the caller passed in unchanged.

>>> import torch, torch.nn as nn, tempfile, os
>>> from prunekit.surgery.plan import prune_channels_
>>> make = lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> m = make(); x = torch.randn(1, 3, 8, 8); plan = prune_channels_(m, x, {"0": [3]})
>>> path = os.path.join(tempfile.mkdtemp(), "pruned.safetensors"); _ = save_pruned(m, plan, path)
>>> again = load_pruned(make(), path); bool(torch.equal(again(x), m(x)))
True
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from ..core.errors import CheckpointError, PrunekitError
from .plan import Plan, apply_plan_
from .plan_check import check_fingerprint

PLAN_KEY = "prunekit.plan"


def save_pruned(model: nn.Module, plan: Plan, path: str | Path) -> Path:
    """Write weights + plan atomically (temp file, then rename).

    A plan that records the pruned architecture's fingerprint must match `model`: otherwise the
    file could never be loaded, so CheckpointError and nothing is written.
    """
    if not isinstance(plan, Plan):
        raise CheckpointError(f"save_pruned needs a Plan, got {type(plan).__name__}")
    check_fingerprint(model, plan.fingerprint.get("pruned"), "pruned")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_model(model, str(tmp), metadata={PLAN_KEY: plan.to_json()})
    tmp.replace(path)
    return path


def read_plan(path: str | Path) -> Plan:
    """The plan stored in a pruned-model file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (OSError, SafetensorError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}; pass a file written by prunekit save_pruned") from None
    if PLAN_KEY not in meta:
        raise CheckpointError(f"{path} holds no prunekit plan; it was not written by save_pruned")
    try:
        return Plan.from_dict(json.loads(meta[PLAN_KEY]))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"the plan in {path} is corrupt ({err})") from None


def load_pruned(model: nn.Module, path: str | Path) -> nn.Module:
    """Return a pruned copy of the freshly built `model` carrying the stored weights.

    `model` itself is never modified, so a failed load leaves nothing half-changed.
    """
    plan = read_plan(path)
    work = copy.deepcopy(model)
    try:
        apply_plan_(work, plan)
        _check_fit(work, path)
        load_model(work, str(path), strict=True)
    except PrunekitError:
        raise
    except (RuntimeError, OSError, SafetensorError, ValueError) as err:
        raise CheckpointError(f"weights in {path} do not fit this model after replaying its plan: {err}") from None
    return work


def _check_fit(model: nn.Module, path: str | Path) -> None:
    """Compare tensor names and shapes first, for a short message instead of a key dump."""
    with safe_open(str(path), framework="pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    state = model.state_dict()
    ours = {k: tuple(v.shape) for k, v in state.items()}
    aliases: dict[tuple, set[str]] = {}  # tied tensors are stored once, under one of their names
    for k, v in state.items():
        aliases.setdefault((v.data_ptr(), tuple(v.shape)), set()).add(k)
    missing = sorted(k for k, v in state.items()
                     if not aliases[(v.data_ptr(), tuple(v.shape))] & set(stored))
    extra = sorted(set(stored) - set(ours))
    wrong = sorted(k for k in set(ours) & set(stored) if ours[k] != stored[k])
    if missing or extra or wrong:
        parts = [f"{len(v)} {what} (first: {v[0]})" for what, v in
                 (("tensors missing from the file", missing), ("unexpected tensors", extra),
                  ("shape mismatches", wrong)) if v]
        raise CheckpointError(f"weights in {path} do not fit this model after replaying its plan: "
                              f"{'; '.join(parts)}. Build the same architecture (name, num_classes, "
                              "options) that the file was pruned from")
