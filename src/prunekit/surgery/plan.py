"""Plans: which channels of each group are kept, as plain JSON-serialisable data.

A plan is replayable: tracing a freshly built model of the same architecture gives the same
groups (names come from the producing modules), so `apply_plan_` repeats the pruning exactly.
Pruned models are saved as plan + safetensors weights (`save_pruned` / `load_pruned`): no pickle,
so loading an untrusted file cannot run code.

>>> import torch, torch.nn as nn
>>> make = lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> m = make(); x = torch.randn(1, 3, 8, 8)
>>> plan = prune_channels_(m, x, {"0": [0, 2, 4]})
>>> fresh = apply_plan_(make(), plan)
>>> fresh[0].out_channels, plan.groups["0"]
(5, [1, 3, 5, 6, 7])
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..core.errors import CheckpointError, PruningError
from ..graph import Graph, build_graph
from .shrink import remove_channels_

PLAN_FORMAT = "prunekit.plan"

# Steps a method adds after channel removal (Gator cutting out whole branches, say), keyed by the
# plan.meta entry that describes them: `apply_plan_` runs the step whenever that key is present,
# so `load_pruned` replays every method's plans with no method-specific loader.
REPLAY_STEPS: dict[str, Callable[[nn.Module, Any], None]] = {}


def register_replay_step(meta_key: str, step: Callable[[nn.Module, Any], None]) -> None:
    """Run `step(model, plan.meta[meta_key])` after the channel removal of every replayed plan
    carrying that key."""
    REPLAY_STEPS[meta_key] = step


PLAN_VERSION = 1
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16,
                                                     torch.float64, torch.int64, torch.int32, torch.uint8)}


@dataclass
class Plan:
    """`groups[name]` = kept channel indices of that group, in the *original* model's numbering."""

    groups: dict[str, list[int]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # original size of each group
    input_shapes: list[list[int]] = field(default_factory=list)
    input_dtypes: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "input_shapes": self.input_shapes,
                "input_dtypes": self.input_dtypes, "ignore": self.ignore, "meta": self.meta,
                "groups": {n: {"size": self.sizes[n], "keep": k} for n, k in self.groups.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise CheckpointError("not a prunekit plan (missing format 'prunekit.plan'); "
                                  "pass a file written by prunekit's save_plan/save_pruned")
        if data.get("version") != PLAN_VERSION:
            raise CheckpointError(f"plan version {data.get('version')} is not supported (this prunekit reads {PLAN_VERSION})")
        try:
            groups = {n: [int(i) for i in g["keep"]] for n, g in data["groups"].items()}
            sizes = {n: int(g["size"]) for n, g in data["groups"].items()}
            return cls(groups, sizes, [list(map(int, s)) for s in data["input_shapes"]],
                       list(data.get("input_dtypes", [])), list(data.get("ignore", [])), dict(data.get("meta", {})))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"plan is malformed ({err!r}); re-export it with prunekit") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def compose(self, later: "Plan") -> "Plan":
        """This plan followed by `later` (whose indices count channels left by this one)."""
        out = Plan(dict(self.groups), dict(self.sizes), self.input_shapes, self.input_dtypes, self.ignore,
                   {**self.meta, **later.meta})
        for name, keep in later.groups.items():
            base = self.groups.get(name)
            if base is None:
                out.groups[name], out.sizes[name] = list(keep), later.sizes[name]
            else:
                out.groups[name] = [base[i] for i in keep]
        return out

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        dtypes = self.input_dtypes or ["float32"] * len(self.input_shapes)
        return tuple(torch.zeros(s, dtype=_DTYPES.get(d, torch.float32)) for s, d in zip(self.input_shapes, dtypes))


def _as_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise PruningError("plans record positional tensor inputs only; pass example_inputs as a tensor or tuple of tensors")


def empty_plan(example_inputs: Any, ignore: Sequence[str] = ()) -> Plan:
    """A plan that removes nothing yet, recording the inputs a replay traces with."""
    inputs = _as_tuple(example_inputs)
    return Plan(input_shapes=[list(t.shape) for t in inputs],
                input_dtypes=[str(t.dtype).removeprefix("torch.") for t in inputs], ignore=list(ignore))


def make_plan(graph: Graph, remove: Mapping[str, Sequence[int]], example_inputs: Any, ignore: Sequence[str] = ()) -> Plan:
    plan = empty_plan(example_inputs, ignore)
    for name, idx in remove.items():
        size = graph.group(name).size
        dead = {int(i) for i in idx}
        if dead:
            plan.groups[name] = [i for i in range(size) if i not in dead]
            plan.sizes[name] = size
    return plan


def prune_channels_(model: nn.Module, example_inputs: Any, remove: Mapping[str, Sequence[int]],
                    ignore: Sequence[str] = (), graph: Graph | None = None) -> Plan:
    """Trace (unless `graph` is given), remove channels in place and return the plan."""
    graph = graph if graph is not None else build_graph(model, example_inputs, ignore)
    plan = make_plan(graph, remove, example_inputs, ignore)
    remove_channels_(model, graph, remove)
    return plan


def apply_plan_(model: nn.Module, plan: Plan) -> nn.Module:
    """Replay `plan` on a freshly built, unpruned model of the same architecture."""
    graph = build_graph(model, plan.example_inputs(), plan.ignore)
    remove = {}
    for name, keep in plan.groups.items():
        try:
            group = graph.group(name)
        except Exception:
            raise CheckpointError(f"plan names group {name!r}, which this model does not have; "
                                  "build the same architecture the plan was made on") from None
        if group.size != plan.sizes[name]:
            raise CheckpointError(f"group {name!r} has {group.size} channels here but {plan.sizes[name]} in the plan; "
                                  "the plan was made on a different architecture or an already pruned model")
        kept = set(keep)
        remove[name] = [i for i in range(group.size) if i not in kept]
    remove_channels_(model, graph, remove)
    from .. import methods  # noqa: F401  (importing the methods registers their replay steps)

    for key, step in REPLAY_STEPS.items():
        if key in plan.meta:
            step(model, plan.meta[key])
    return model


def save_plan(plan: Plan, path: str | Path) -> None:
    Path(path).write_text(plan.to_json())


def load_plan(path: str | Path) -> Plan:
    try:
        return Plan.from_dict(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read plan {path}: {err}") from None


def remove_zero_channels_(model: nn.Module, example_inputs: Any, ignore: Sequence[str] = ()) -> Plan:
    """Remove every prunable channel whose producing parameters are all exactly zero.

    A channel qualifies when all its "out" and "through" *parameter* slices (filters, biases, BN
    gamma/beta, layer scale) are zero: it then contributes exactly zero to every consumer, so
    removal changes no output. Structured-sparsity methods end with this call.
    """
    graph = build_graph(model, example_inputs, ignore)
    params = dict(model.named_parameters())
    remove = {}
    for g in graph.prunable_groups():
        alive = torch.zeros(g.size, dtype=torch.long)
        for m in g.tensor_members():
            t = params.get(m.qualname)
            if m.role == "in" or t is None:
                continue
            nz = t.detach().ne(0).movedim(m.dim, 0).reshape(t.shape[m.dim], -1).any(1)
            sel = m.channel >= 0
            alive.scatter_reduce_(0, m.channel[sel], nz[sel].long(), "amax")
        dead = ((alive == 0) & g.prunable).nonzero().flatten().tolist()
        if dead and len(dead) < g.size:
            remove[g.name] = dead
    return prune_channels_(model, example_inputs, remove, ignore, graph)
