"""Checks at the plan boundary: a plan read from a file, or applied to a model, either fits
exactly or raises one CheckpointError before anything changes.

- `parse_plan_dict`: the JSON layout (types of every field, known dtypes) of `Plan.to_dict`;
- `architecture_fingerprint`: a short hash of a model's parameter names and shapes. A plan stores
  the fingerprint of the model it was made on ("dense") and of the model it produced ("pruned"),
  so a plan from resnet20 is refused by resnet32 instead of pruning it partially, and a plan
  that does not describe a pruned model cannot be saved with it;
- `removal_from_plan`: every kept-index list sorted, unique, in range, non-empty, and leaving
  the group's fixed channels in place; every group name and size as in the model's graph.

>>> import torch.nn as nn
>>> a, b = nn.Linear(3, 4), nn.Linear(3, 5)
>>> architecture_fingerprint(a) == architecture_fingerprint(nn.Linear(3, 4)), architecture_fingerprint(a) == architecture_fingerprint(b)
(True, False)
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Mapping

from torch import nn

from ..core.errors import CheckpointError
from ..graph import Graph

DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8")
# A weight under torch.nn.utils.parametrize is stored as "<module>.parametrizations.<name>.original";
# it is the same architecture as the plain "<module>.<name>".
# A plan records one example batch (batch 1 when saved by prunekit); load_pruned traces the model
# on it, and the trace holds activations in proportion (a 1x1x1024x1024 input took 1.7 GB through
# the digits CNN). 2**24 elements (one 3x2048x2048 image fits) bounds what a crafted plan can make
# a load allocate.
MAX_INPUT_ELEMENTS = 2 ** 24
PLAN_KEYS = ("format", "version", "input_shapes", "input_dtypes", "ignore", "meta", "groups", "fingerprint")
_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original\d*$")


def architecture_fingerprint(model: nn.Module) -> str:
    """16 hex digits of sha256 over the sorted (parameter name, shape) pairs of `model`."""
    items = sorted((_PARAMETRIZED.sub(r"\1\2", name), list(p.shape)) for name, p in model.named_parameters())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def check_fingerprint(model: nn.Module, expected: str | None, which: str) -> None:
    """CheckpointError unless `model`'s fingerprint is `expected` (None: not recorded, accepted)."""
    if expected is None:
        return
    got = architecture_fingerprint(model)
    if got != expected:
        what = ("the model the plan was made on" if which == "dense" else "the pruned model the plan produces")
        steps = ("; a plan saved after several prunings starts where its last one started: save the composed "
                 "plan (first.plan.compose(second.plan)) so that it starts from the freshly built model"
                 if which == "dense" else "")
        raise CheckpointError(f"this model's architecture (fingerprint {got}) is not {what} (fingerprint "
                              f"{expected}); build the same architecture (name, depth, num_classes, options) "
                              f"the plan was made for{steps}")


def _fail(what: str) -> CheckpointError:
    return CheckpointError(f"plan is malformed: {what}; re-export it with prunekit (save_plan / save_pruned)")


def _int(value: Any, what: str, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise _fail(f"{what} is {value!r}, not an integer >= {lo}")
    return value


def _str_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(f"{what} must be a list of strings, got {type(value).__name__}")
    return list(value)


def parse_plan_dict(data: Mapping[str, Any]) -> dict[str, Any]:
    """Validated keyword arguments of `Plan` from its `to_dict` layout (format/version checked by
    the caller). Only types and ranges: whether the plan fits a model is `apply_plan_`'s check."""
    unknown = sorted(str(k) for k in data if k not in PLAN_KEYS)
    if unknown:  # a misspelt key ("grups") would be dropped, and the plan replay less than it says
        raise _fail(f"unknown key(s) {unknown[:3]}; a plan holds {', '.join(PLAN_KEYS)}")
    groups = data.get("groups")
    if not isinstance(groups, Mapping):
        raise _fail(f"'groups' must be a mapping of group name -> {{size, keep}}, got {type(groups).__name__}")
    keep, sizes = {}, {}
    for name, g in groups.items():
        if not isinstance(g, Mapping) or set(g) != {"size", "keep"}:
            raise _fail(f"group {name!r} must be {{'size': int, 'keep': [int, ...]}}"
                        + (f", not keys {sorted(map(str, g))}" if isinstance(g, Mapping) else ""))
        sizes[name] = _int(g["size"], f"size of group {name!r}", 1)
        if not isinstance(g["keep"], list):
            raise _fail(f"keep of group {name!r} must be a list of channel indices")
        keep[name] = [_int(i, f"a kept index of group {name!r}") for i in g["keep"]]
    shapes = data.get("input_shapes")
    if not isinstance(shapes, list) or not all(isinstance(s, list) for s in shapes):
        raise _fail("'input_shapes' must be a list of shapes (lists of integers)")
    shapes = [[_int(d, "an input dimension") for d in s] for s in shapes]
    elements = sum(math.prod(s) for s in shapes)
    if elements > MAX_INPUT_ELEMENTS:
        raise _fail(f"'input_shapes' {shapes} ask for {elements:,} input elements to trace the model, more than "
                    f"{MAX_INPUT_ELEMENTS:,}; a plan records one example batch, so this file is damaged or "
                    "was not written by prunekit: save the plan again from the pruned model")
    dtypes = _str_list(data.get("input_dtypes", []), "'input_dtypes'")
    bad = [d for d in dtypes if d not in DTYPE_NAMES]
    if bad:
        raise _fail(f"input dtype {bad[0]!r} is not one of {', '.join(DTYPE_NAMES)}")
    if dtypes and len(dtypes) != len(shapes):
        raise _fail(f"{len(dtypes)} input dtypes for {len(shapes)} input shapes")
    meta = data.get("meta", {})
    if not isinstance(meta, Mapping):
        raise _fail(f"'meta' must be a mapping, got {type(meta).__name__}")
    fingerprint = data.get("fingerprint", {})
    if not isinstance(fingerprint, Mapping) or not set(fingerprint) <= {"dense", "pruned"} or \
            not all(isinstance(v, str) for v in fingerprint.values()):
        raise _fail("'fingerprint' must be {'dense': str, 'pruned': str}")
    return {"groups": keep, "sizes": sizes, "input_shapes": shapes, "input_dtypes": dtypes,
            "ignore": _str_list(data.get("ignore", []), "'ignore'"), "meta": dict(meta),
            "fingerprint": dict(fingerprint)}


def removal_from_plan(graph: Graph, keep: Mapping[str, list[int]], sizes: Mapping[str, int]) -> dict[str, list[int]]:
    """{group: channels to remove} for replaying `keep` on the model `graph` was traced from."""
    names = {g.name: g for g in graph.groups}
    remove = {}
    for name, kept in keep.items():
        group = names.get(name)
        if group is None:
            raise CheckpointError(f"plan names group {name!r}, which this model does not have; build the same "
                                  "architecture the plan was made on (if it is the same, its forward takes another "
                                  "path on the zero inputs a replay traces with than on the inputs it was pruned on: "
                                  "a branch on input values cannot be replayed)")
        if group.size != sizes.get(name):
            raise CheckpointError(f"group {name!r} has {group.size} channels here but {sizes.get(name)} in the "
                                  "plan; the plan was made on a different architecture or an already pruned model")
        if not kept:
            raise CheckpointError(f"plan keeps no channel of group {name!r}; a group keeps at least one")
        if any(b <= a for a, b in zip(kept, kept[1:])) or kept[0] < 0 or kept[-1] >= group.size:
            raise CheckpointError(f"kept indices of group {name!r} must be sorted, unique and in 0..{group.size - 1}; "
                                  f"{_first_bad(kept, group.size)} (of {len(kept)} kept)")
        kept_set = set(kept)
        dead = [i for i in range(group.size) if i not in kept_set]
        fixed = [i for i in dead if not bool(group.prunable[i])]
        if fixed:
            raise CheckpointError(f"plan removes channels {fixed[:8]} of group {name!r}, which this model cannot "
                                  "lose (they reach an input/output or a fixed-position op)")
        remove[name] = dead
    return remove


def _first_bad(kept: list[int], size: int) -> str:
    """Where a list of kept indices first breaks the rule (sorted, unique, in 0..size-1)."""
    for i, k in enumerate(kept):
        if k < 0 or k >= size:
            return f"entry {i} is {k}, outside 0..{size - 1}"
        if i and k <= kept[i - 1]:
            return f"entry {i} is {k}, after {kept[i - 1]}"
    return "they are not"
