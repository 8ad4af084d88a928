"""Plans: which channels of each group are kept, as plain JSON-serialisable data.

A plan is replayable: tracing a freshly built model of the same architecture gives the same
groups (names come from the producing modules), so `apply_plan_` repeats the pruning exactly.
Pruned models are saved as plan + safetensors weights (`save_pruned` / `load_pruned`): no pickle,
so loading an untrusted file cannot run code. A plan is checked against the model it is applied
to (architecture fingerprint, group names and sizes, kept indices, every replay entry) before
the model changes; any mismatch is one CheckpointError (see plan_check.py).

>>> import torch, torch.nn as nn
>>> make = lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> m = make(); x = torch.randn(1, 3, 8, 8)
>>> plan = prune_channels_(m, x, {"0": [0, 2, 4]})
>>> fresh = apply_plan_(make(), plan)
>>> fresh[0].out_channels, plan.groups["0"]
(5, [1, 3, 5, 6, 7])
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..core.errors import CheckpointError, PruningError, read_json
from ..core.integrity import atomic_write_text
from ..graph import Graph, build_graph
from .copying import adopt_, share_copy
from .plan_check import architecture_fingerprint, check_fingerprint, parse_plan_dict, removal_from_plan
from .shrink import channel_indices, remove_channels_, removed_roots

PLAN_FORMAT = "prunekit.plan"


@dataclass(frozen=True)
class ReplayStep:
    """A step after channel removal (cutting whole branches, say), described by one plan entry.

    `check(model, graph, plan, entry)` runs on the unpruned model and its graph before anything
    changes: it accepts only entries the step itself could have written (else CheckpointError)
    and returns what `apply(model, parsed)` needs after the channels are removed. `merge(earlier,
    later)`, if given, is the entry of two composed plans that both hold one (without it the later
    entry stands); `describe(model, entry)`, if given, is the entry as the pruned model stands
    when `save_pruned` writes it.
    """

    check: Callable[[nn.Module, Graph, "Plan", Any], Any]
    apply: Callable[[nn.Module, Any], None]
    merge: Callable[[Any, Any], Any] | None = None
    describe: Callable[[nn.Module, Any], Any] | None = None


# Keyed by the entry's name in plan.meta["replay"]. A step registers in the module defining it;
# the core's steps are imported by prunekit.surgery, a method's by the method package.
REPLAY_STEPS: dict[str, ReplayStep] = {}
# Plans written before meta["replay"] existed kept their entry at the top of meta.
LEGACY_REPLAY_KEYS = ("gator",)


def register_replay_step(key: str, apply: Callable[[nn.Module, Any], None],
                         check: Callable[[nn.Module, Graph, "Plan", Any], Any],
                         merge: Callable[[Any, Any], Any] | None = None,
                         describe: Callable[[nn.Module, Any], Any] | None = None) -> None:
    """Run `apply(model, check(model, graph, plan, entry))` for every replayed plan whose
    meta["replay"] holds `key` (see `ReplayStep`)."""
    REPLAY_STEPS[key] = ReplayStep(check, apply, merge, describe)


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
    # architecture_fingerprint of the model the plan was made on ("dense") and of the result ("pruned")
    fingerprint: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "input_shapes": self.input_shapes,
               "input_dtypes": self.input_dtypes, "ignore": self.ignore, "meta": self.meta,
               "groups": {n: {"size": self.sizes[n], "keep": k} for n, k in self.groups.items()}}
        if self.fingerprint:
            out["fingerprint"] = self.fingerprint
        return out

    def stamp(self, dense: nn.Module | None = None, pruned: nn.Module | None = None) -> "Plan":
        """Record the fingerprints of the model the plan starts from and of the one it produces."""
        for key, model in (("dense", dense), ("pruned", pruned)):
            if model is not None:
                self.fingerprint[key] = architecture_fingerprint(model)
        return self

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise CheckpointError("not a prunekit plan (missing format 'prunekit.plan'); "
                                  "pass a file written by prunekit's save_plan/save_pruned")
        if data.get("version") != PLAN_VERSION:
            raise CheckpointError(f"plan version {data.get('version')!r} is not supported (this prunekit reads "
                                  f"{PLAN_VERSION!r})")
        return cls(**parse_plan_dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def compose(self, later: "Plan") -> "Plan":
        """This plan followed by `later` (whose indices count channels left by this one)."""
        fingerprint = {k: v for k, v in (("dense", self.fingerprint.get("dense")),
                                         ("pruned", later.fingerprint.get("pruned"))) if v}
        # the replay traces once for both: with what both ignored, so that neither's removal meets a
        # layer the other ignored (a plan that removes nothing constrains nothing)
        ignore = (later.ignore if not self.groups else self.ignore if not later.groups
                  else [n for n in self.ignore if n in later.ignore])
        meta = {**self.meta, **later.meta}
        if isinstance(self.meta.get("replay"), Mapping) and isinstance(later.meta.get("replay"), Mapping):
            meta["replay"] = _merge_replay(self.meta["replay"], later.meta["replay"])
        out = Plan(dict(self.groups), dict(self.sizes), self.input_shapes, self.input_dtypes, list(ignore),
                   meta, fingerprint)
        for name, keep in later.groups.items():
            base = self.groups.get(name)
            if base is None:
                out.groups[name], out.sizes[name] = list(keep), later.sizes[name]
            elif later.sizes[name] != len(base):
                raise PruningError(f"the later plan counts {later.sizes[name]} channels in group {name!r}, where this "
                                   f"plan kept {len(base)}: its channels are not those this plan left (a grouped conv "
                                   "pruned to one group becomes a plain conv, whose channels trace as groups of their "
                                   "own), so the two plans do not compose into one")
            else:
                out.groups[name] = [base[i] for i in keep]
        return out

    def example_inputs(self, like: nn.Module | None = None) -> tuple[torch.Tensor, ...]:
        """Zeros of the recorded shapes and dtypes; with `like`, on that model's device and with
        floating inputs in its floating dtype (a model cast to float16 or moved to the GPU)."""
        dtypes = self.input_dtypes or ["float32"] * len(self.input_shapes)
        inputs = tuple(torch.zeros(s, dtype=_DTYPES.get(d, torch.float32)) for s, d in zip(self.input_shapes, dtypes))
        return inputs if like is None else _inputs_like(like, inputs)


def _inputs_like(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    params = list(model.parameters())
    tensors = params or list(model.buffers())
    if not tensors:
        return inputs
    floating = next((p.dtype for p in params if p.is_floating_point()), None)  # a float64 constant buffer is no guide
    return tuple(t.to(tensors[0].device, floating if floating is not None and t.is_floating_point() else t.dtype)
                 for t in inputs)


def _merge_replay(earlier: Mapping[str, Any], later: Mapping[str, Any]) -> dict[str, Any]:
    """The replay entries of two composed plans: both plans' steps, in order; a step both hold is
    merged by its `merge` (the later entry stands for a step without one)."""
    out = dict(earlier)
    for key, entry in later.items():
        if key in out and key not in REPLAY_STEPS:
            importlib.import_module("prunekit.methods")  # the built-in methods register their steps
        merge = REPLAY_STEPS[key].merge if key in out and key in REPLAY_STEPS else None
        out[key] = merge(out[key], entry) if merge is not None else entry
    return out


def describe_replay(model: nn.Module, plan: Plan) -> None:
    """Rewrite each of `plan`'s replay entries whose step has `describe` as `model` stands now."""
    if not isinstance(plan.meta.get("replay"), Mapping):
        return
    described = {}
    for key, entry in replay_entries(plan).items():
        describe = REPLAY_STEPS[key].describe
        described[key] = entry if describe is None else describe(model, entry)
    plan.meta["replay"] = described  # a new mapping: plans composed from this one share its old one


def plan_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """`example_inputs` as the tuple of tensors a plan records; PruningError for any other form."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise PruningError(f"plans record positional tensor inputs only, got {type(example_inputs).__name__}; pass "
                       "example_inputs as a tensor or a tuple of tensors (the model's positional arguments)")


def empty_plan(example_inputs: Any, ignore: Sequence[str] = ()) -> Plan:
    """A plan that removes nothing yet, recording the inputs a replay traces with."""
    inputs = plan_inputs(example_inputs)
    return Plan(input_shapes=[list(t.shape) for t in inputs],
                input_dtypes=[str(t.dtype).removeprefix("torch.") for t in inputs], ignore=list(ignore))


def make_plan(graph: Graph, remove: Mapping[str, Sequence[int]], example_inputs: Any, ignore: Sequence[str] = ()) -> Plan:
    plan = empty_plan(example_inputs, ignore)
    for name, idx in remove.items():
        size = graph.group(name).size
        dead = set(channel_indices(name, idx))
        if dead:
            plan.groups[name] = [i for i in range(size) if i not in dead]
            plan.sizes[name] = size
    return plan


def prune_channels_(model: nn.Module, example_inputs: Any, remove: Mapping[str, Sequence[int]],
                    ignore: Sequence[str] = (), graph: Graph | None = None) -> Plan:
    """Trace (unless `graph` is given), remove channels in place and return the plan."""
    from .verify import unproven_removal_error

    graph = graph if graph is not None else build_graph(model, example_inputs, ignore)
    plan = make_plan(graph, remove, example_inputs, ignore).stamp(dense=model)
    removed_roots(graph, remove)  # indices and names checked first, with their own messages
    why = unproven_removal_error(model, example_inputs, graph, {n: channel_indices(n, i) for n, i in remove.items()})
    if why:
        raise PruningError(f"removing these channels is not what zeroing them gives in {why}: the group meets an op "
                           "the rules cannot vouch for; leave it whole, or its layers out with ignore=[...]")
    remove_channels_(model, graph, remove)
    return plan.stamp(pruned=model)


def apply_plan_(model: nn.Module, plan: Plan) -> nn.Module:
    """Replay `plan` on a freshly built, unpruned model of the same architecture.

    Everything is checked before the model changes (fingerprints, groups, indices, replay
    entries); the replay runs on a working copy that `model` becomes only when it matches the
    plan's pruned fingerprint. Any mismatch: CheckpointError, `model` untouched.
    """
    if not isinstance(plan, Plan):
        hint = " (a plan read as JSON: Plan.from_dict(it), or load_plan(path))" if isinstance(plan, Mapping) else ""
        raise CheckpointError(f"apply_plan_ needs a Plan, got {type(plan).__name__}{hint}")
    check_fingerprint(model, plan.fingerprint.get("dense"), "dense")
    try:
        graph = build_graph(model, plan.example_inputs(model), plan.ignore)
    except Exception as err:  # noqa: BLE001 (any tracing failure means the plan's inputs do not fit)
        raise CheckpointError(f"cannot trace this model with the plan's recorded inputs {plan.input_shapes} "
                              f"({type(err).__name__}: {err}); build the architecture the plan was made on") from None
    remove = removal_from_plan(graph, plan.groups, plan.sizes)
    steps = [(REPLAY_STEPS[key], REPLAY_STEPS[key].check(model, graph, plan, entry))
             for key, entry in replay_entries(plan).items()]
    from .verify import unproven_removal_error

    why = unproven_removal_error(model, plan.example_inputs(model), graph, remove)
    if why:  # a group prune_'s probe would refuse, in a plan written by hand (or for other code)
        raise CheckpointError(f"the plan removes channels where this model's forward no longer gives what zeroing "
                              f"them gives ({why}); it was not made by pruning this model's code: prune the model "
                              "again")
    work = share_copy(model)  # surgery assigns new tensors: sharing the rest is safe
    remove_channels_(work, graph, remove)
    for step, parsed in steps:
        step.apply(work, parsed)
    check_fingerprint(work, plan.fingerprint.get("pruned"), "pruned")
    adopt_(model, work)
    return model


def replay_entries(plan: Plan) -> dict[str, Any]:
    """meta["replay"] (or a legacy top-level entry), each key checked to be a registered step."""
    from . import branches  # noqa: F401  (registers the core's replay steps)

    replay = plan.meta.get("replay")
    if replay is None:
        replay = {k: plan.meta[k] for k in LEGACY_REPLAY_KEYS if k in plan.meta}
    if not isinstance(replay, Mapping):
        raise CheckpointError(f"plan meta 'replay' must be a mapping of step -> entry, got {type(replay).__name__}; "
                              "re-export the plan with prunekit")
    unknown = sorted(k for k in replay if k not in REPLAY_STEPS)
    if unknown:  # the built-in methods register their steps when imported: load them, by name only
        importlib.import_module("prunekit.methods")
        unknown = sorted(k for k in replay if k not in REPLAY_STEPS)
    if unknown:
        raise CheckpointError(f"plan needs replay steps {unknown}, which are not registered (known: "
                              f"{sorted(REPLAY_STEPS)}); import the package that defines them first")
    return dict(replay)


def save_plan(plan: Plan, path: str | Path) -> None:
    """Write the plan as JSON atomically: a failed write leaves the previous file whole."""
    atomic_write_text(path, plan.to_json())


def load_plan(path: str | Path) -> Plan:
    return Plan.from_dict(read_json(path, "plan", "save the plan again (save_plan)"))


def remove_zero_channels_(model: nn.Module, example_inputs: Any, ignore: Sequence[str] = ()) -> Plan:
    """Remove every prunable channel whose producing parameters are all exactly zero.

    A channel qualifies when all its "out" and "through" *parameter* slices (filters, biases, BN
    gamma/beta, layer scale) are zero, and so is the running mean of a norm layer without affine
    terms: it then contributes exactly zero to every consumer, so removal changes no output.
    Channels under a LayerNorm-style statistic all stay. Structured-sparsity methods end with this call.
    """
    graph = build_graph(model, example_inputs, ignore)
    params = dict(model.named_parameters())
    remove = {}
    for g in graph.prunable_groups():
        if any(m.name == "#statistics" for m in g.members):
            continue  # a LayerNorm-style statistic over the channels changes when a zero channel goes
        alive = torch.zeros(g.size, dtype=torch.long)
        for m in g.tensor_members():
            t = params.get(m.qualname, _shift_without_affine(model, m))
            if m.role == "in" or t is None:
                continue
            nz = t.detach().ne(0).movedim(m.dim, 0).reshape(t.shape[m.dim], -1).any(1)
            sel = m.channel >= 0
            alive.scatter_reduce_(0, m.channel[sel], nz[sel].long(), "amax")
        dead = ((alive == 0) & g.prunable).nonzero().flatten().tolist()
        if dead and len(dead) < g.size:
            remove[g.name] = dead
    return prune_channels_(model, example_inputs, remove, ignore, graph)


def _shift_without_affine(model: nn.Module, member) -> torch.Tensor | None:
    """The running mean of a norm layer without an affine scale: a zero channel leaves it as
    -mean / sqrt(var + eps), so the channel is alive wherever that mean is not zero. None for
    any other member (an affine norm's output is read from its scale and shift)."""
    if member.name != "running_mean":
        return None
    norm = model.get_submodule(member.module)
    if not isinstance(norm, nn.modules.batchnorm._NormBase) or getattr(norm, "weight", None) is not None:
        return None
    return norm.running_mean
